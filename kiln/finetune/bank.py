"""Several LoRA adapters over one loaded model, one picked per batch row: what `kiln serve --adapter` loads.

Owns: `AdapterBank` (the adapters' names and scales, and the row -> adapter selection the engine sets before
each model call) and what it puts beside each targeted projection: stacks A (n+1, r, K) and B (n+1, N, r)
of every adapter's LoRA (ranks padded to the largest with zeros; entry 0 all zeros: the base model), so
that rows of one batch running different adapters go through one forward — per layer a gather of each
row's A and B and two batched matmuls, `scale[b] * (x[b] @ A[b]^T) @ B[b]^T`. The selection lives in
tensors the engine owns (static buffers inside its CUDA graphs), so a captured step serves any mix.
Not: reading adapter folders (layers.read_adapter), one adapter over a model for generate and chat
(layers.load_adapter), which request asks for which adapter (server/), slots and prefix reuse (engine.py).

Shape alphabet: B rows, T tokens per row, K in features, N out features, r rank, n adapters.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kiln.errors import KilnError

BASE = "base"  # the name that picks no adapter (and may not name one)


class AdapterBank:
    """The adapters of one model; `select(rows, scales)` says which runs on each batch row of the next calls.

        bank = AdapterBank.load(model, [("sql", "out/sql"), ("poet", "out/poet")])
        bank.index("sql")                     # -> 1 (0 is the base)
        with bank.select(torch.tensor([1, 0, 2]), torch.tensor([1.0, 1.0, 0.5])): logits = model(ids, step)
    """

    def __init__(self, names: list[str], scales: list[float]):
        self.names, self.scales = names, scales  # adapter i + 1 of the stacks
        self.rows: torch.Tensor | None = None  # (B,) long: each row's adapter, 0 = base
        self.row_scale: torch.Tensor | None = None  # (B,) the model's dtype: each row's scale

    @classmethod
    def load(cls, model: nn.Module, adapters: list[tuple[str, str | Path]], scale: float = 1.0) -> AdapterBank:
        """Read PEFT LoRA folders [(name, path)] and put their stacks beside the model's projections; the bank
        is `model.adapter_bank`. `scale` multiplies every adapter's alpha / r (--adapter-scale)."""
        from kiln.finetune.layers import read_adapter
        names = [name for name, _ in adapters]
        for name in names:
            if not name or name == BASE or ":" in name:
                raise KilnError(f"adapter name {name!r}: must be non-empty, have no ':' and not be {BASE!r}")
        if len(set(names)) != len(names):
            raise KilnError(f"two adapters share a name: {', '.join(names)} (name them: --adapter NAME=PATH)")
        read = [read_adapter(path) for _, path in adapters]
        bank = cls(names, [scale * float(cfg.get("lora_alpha", 8)) / int(cfg.get("r", 8)) for cfg, _ in read])
        modules = sorted({m for _, pairs in read for m in pairs})
        for m in modules:
            stacks = [pairs.get(m) for _, pairs in read]
            _install(model, m, bank, stacks)
        model.adapter_bank = bank
        return bank

    def index(self, name: str | None) -> int:
        """The stack entry of adapter `name` (0 for BASE or None); KilnError naming the choices otherwise."""
        if name is None or name == BASE:
            return 0
        if name not in self.names:
            raise KilnError(f"no adapter named {name!r}; loaded: {', '.join(self.names)} (or {BASE!r})")
        return self.names.index(name) + 1

    def select(self, rows: torch.Tensor, scales: torch.Tensor) -> _Selection:
        """For the calls inside the `with`: row b runs adapter rows[b] (0: none) at scales[b] times its own
        alpha / r scale. The tensors are read by the layers as they are (no copy): a CUDA graph captured
        inside reads them again at every replay."""
        return _Selection(self, rows, scales)


class _Selection:
    def __init__(self, bank: AdapterBank, rows: torch.Tensor, scales: torch.Tensor):
        self.bank, self.rows, self.scales = bank, rows, scales

    def __enter__(self):
        self.bank.rows, self.bank.row_scale = self.rows, self.scales

    def __exit__(self, *exc):
        self.bank.rows = self.bank.row_scale = None


class LoRAStack(nn.Module):
    """Every adapter's LoRA of one projection; `forward(x)` is each row's own delta, or None outside a
    selection. A (n+1, r, K) and B (n+1, N, r), B scaled by its adapter's scale; float32 until the first
    call, then in the dtype the model computes in (the engine's warm-up calls come before any capture)."""

    def __init__(self, bank: AdapterBank, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.bank = bank
        self.register_buffer("a", a, persistent=False)
        self.register_buffer("b", b, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        rows = self.bank.rows
        if rows is None:
            return None
        if x.shape[0] != rows.shape[0]:
            raise RuntimeError(f"adapter rows for {rows.shape[0]} batch rows, input of {x.shape[0]}")
        if self.a.dtype != x.dtype:
            self.a, self.b = self.a.to(x.dtype), self.b.to(x.dtype)
        rows = rows.to(x.device)  # a split model's layers past the CPU: the selection crosses with them
        xs = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, K)
        h = torch.bmm(xs, self.a[rows].transpose(1, 2))  # (B, T, r)
        d = torch.bmm(h, self.b[rows].transpose(1, 2))  # (B, T, N)
        d = d * self.bank.row_scale.to(x.device, x.dtype)[:, None, None]
        return d.reshape(*x.shape[:-1], d.shape[-1])


class BankedLinear(nn.Module):
    """A projection with a LoRAStack beside it: base(x) + the row's adapter delta. It keeps the base's int8
    hand-off (`int8_input`, `act=`), so a GPU decode step reads its input as before."""

    def __init__(self, base: nn.Module, stack: LoRAStack):
        super().__init__()
        self.base, self.stack = base, stack
        self.in_features, self.out_features = base.in_features, base.out_features
        if getattr(base, "int8_input", None) is not None:
            self.int8_input = base.int8_input

    def forward(self, x: torch.Tensor, act=None) -> torch.Tensor:
        y = self.base(x) if act is None else self.base(x, act=act)
        d = self.stack(x)
        return y if d is None else y + d


def _install(model: nn.Module, name: str, bank: AdapterBank, pairs: list) -> None:
    """Put the stacks of module `name` (q_proj ... of one layer; pairs[i] adapter i's (A, B) or None where it
    does not adapt it) beside the model's projection: a BankedLinear, or a part of a Joined q/k/v, gate/up."""
    from kiln.finetune.layers import _joined_part
    parent_name, attr = name.rsplit(".", 1)
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError:
        raise KilnError(f"an adapter names {name}, which this model does not have") from None
    joined = _joined_part(parent, attr)
    if joined is not None:
        mod, part = joined
        k, n = mod.groups[0].in_features, [w for ws in mod.splits for w in ws][part]
    else:
        base = getattr(parent, attr, None)
        if base is None or not hasattr(base, "in_features"):
            raise KilnError(f"an adapter names {name}, which this model does not have")
        k, n = base.in_features, base.out_features
    owner = mod if joined is not None else base
    device = next(iter([*owner.parameters(), *owner.buffers()])).device
    r = max(a.shape[0] for a, _ in (p for p in pairs if p is not None))
    a_st = torch.zeros(len(pairs) + 1, r, k, dtype=torch.float32)
    b_st = torch.zeros(len(pairs) + 1, n, r, dtype=torch.float32)
    for i, p in enumerate(pairs):
        if p is None:
            continue
        a, b = p
        if a.shape[1] != k or b.shape[0] != n:
            raise KilnError(f"adapter {bank.names[i]!r}: its weights for {name} are of shape {tuple(a.shape)} / "
                            f"{tuple(b.shape)}, the model's layer takes {k} in and gives {n} out")
        a_st[i + 1, :a.shape[0]] = a.float()
        b_st[i + 1, :, :b.shape[1]] = b.float() * bank.scales[i]
    stack = LoRAStack(bank, a_st.to(device), b_st.to(device))
    if joined is not None:
        mod.add_stack(part, stack)
    else:
        setattr(parent, attr, BankedLinear(base, stack))
