"""The engine's batched decode forward, eager or as CUDA graphs of padded buckets, and the adapter selection of
a batch's rows.

Owns: `BatchStep`, `static_step` (whether the engine takes the static form), `adapters_of`, `fit_context` (a
slot cache's context from a KV byte budget; kiln.engine re-exports it).
Not: which rows step together or what is done with their logits (engine.py), the model's math (models/).
"""

from __future__ import annotations

import contextlib
import logging

import torch

from kiln.cache import KVCache, Step
from kiln.errors import KilnError
from kiln.ops.graph import capture_graph
from kiln.split import DeviceGraphs, gpu_blocks, input_device

log = logging.getLogger("kiln.engine")

VERIFY_MAX_T = 17  # tokens a row that a speculative check takes in the static form (16 drafts + 1)


class BatchStep:
    """The batched decode forward: `logits (B, V) = step(tokens, positions, slots)`, host lists in (the
    tokens may instead be a device tensor (B,): the previous step's picks, never read by the host).

    Eager (`static=False`): the inputs as given, keys gathered up to the longest row. Static: the rows
    are padded to a bucket size (powers of two up to n_slots) with rows that write into a scratch slot
    (the cache's extra last row) at position 0, and read from static device buffers — on CUDA each
    bucket is captured once as a CUDA graph and replayed (one launch per step instead of hundreds). On
    other devices the static form runs eagerly, exactly what a graph would replay, so CPU tests cover the
    padding and the scratch slot. A capture that fails falls back to eager replay of the static form.
    A model split across devices steps eagerly, each row count's GPU blocks from a graph of their own
    (`split_graphs`, split.DeviceGraphs; not with an adapter bank, whose row selection is set per call).
    """

    def __init__(self, model, cache: KVCache, n_slots: int, static: bool):
        self.model, self.cache, self.static, self.scratch = model, cache, static, n_slots
        device = self.device = input_device(model, cache.k.device)  # a split model's: the CPU (static is off)
        self.use_graphs = static and device.type == "cuda"
        self.buckets = sorted({min(1 << i, n_slots) for i in range(n_slots.bit_length() + 1)})
        self.inputs = torch.zeros(4, n_slots, dtype=torch.long, device=device)  # token, position, slot, adapter rows
        self.scales = torch.ones(n_slots, dtype=torch.float32, device=device)  # each row's adapter scale
        self.bank = getattr(model, "adapter_bank", None)  # finetune/bank.AdapterBank: an adapter per row
        self.graphs: dict = {}  # bucket, or (bucket, T) for a check of T tokens a row -> (graph, logits)
        self.checks: dict[int, torch.Tensor] = {}  # T -> the static (n_slots, T) tokens of a check
        # a split model steps eagerly, its GPU blocks from graphs
        self.split_graphs = DeviceGraphs() if gpu_blocks(model) and self.bank is None and not static else None

    def __call__(self, tokens: list[int] | torch.Tensor, pos: list[int], slots: list[int],
                 adapters: list[tuple[int, float]] | None = None) -> torch.Tensor:
        """`adapters`: each row's (adapter, scale) of the model's AdapterBank (default: none)."""
        b = len(pos)
        on_device = isinstance(tokens, torch.Tensor)
        adapters = adapters or [(0, 1.0)] * b
        if not self.static:
            ids = tokens if on_device else torch.tensor(tokens, dtype=torch.long, device=self.device)
            return self._eager(ids, pos, slots, adapters)
        bucket = next(n for n in self.buckets if n >= b)
        if self.use_graphs and bucket not in self.graphs:
            self._capture(bucket)
        self._fill(bucket, [0] * b if on_device else list(tokens), pos, slots, adapters)
        if on_device:
            self.inputs[0, :b].copy_(tokens)
        if bucket in self.graphs:
            graph, logits = self.graphs[bucket]
            graph.replay()
            return logits[:b]
        return self._static(bucket, max(pos) + 1)[:b]

    def verify(self, ids: torch.Tensor, pos: list[int], slots: list[int],
               adapters: list[tuple[int, float]] | None = None) -> torch.Tensor:
        """Speculative decoding's check: row b's T tokens ids[b] (B, T) into slot slots[b] from position pos[b]
        on → logits (B, T, V) of every one. The static form pads the rows to a bucket as `__call__` does, its
        tokens in a static (n_slots, T) buffer; on CUDA a graph per (bucket, T) up to VERIFY_MAX_T."""
        b, t = ids.shape
        adapters = adapters or [(0, 1.0)] * b
        if not self.static or t > VERIFY_MAX_T:
            return self._eager(ids, pos, slots, adapters)
        bucket = next(n for n in self.buckets if n >= b)
        key = (bucket, t)
        self.cache.check_keys(max(pos) + t)
        if t not in self.checks:
            self.checks[t] = torch.zeros(self.scratch, t, dtype=torch.long, device=self.device)
        if self.use_graphs and key not in self.graphs:
            self._capture(key)
        self._fill(bucket, [0] * b, pos, slots, adapters)
        self.checks[t][:b].copy_(ids)
        self.checks[t][b:bucket].zero_()
        if key in self.graphs:
            graph, logits = self.graphs[key]
            graph.replay()
            return logits[:b]
        return self._static(key, self.cache.max_len)[:b]

    def _eager(self, ids: torch.Tensor, pos: list[int], slots: list[int], adapters) -> torch.Tensor:
        """The step as given, no padding: ids (B,) (a decode step) or (B, T) (a check) → `_forward`'s logits."""
        dev = self.device
        rows = torch.tensor([i for i, _ in adapters], dtype=torch.long, device=dev)
        scales = torch.tensor([s for _, s in adapters], dtype=torch.float32, device=dev)
        t = 1 if ids.dim() == 1 else ids.shape[1]
        return self._forward(ids.to(dev, torch.long), torch.tensor(pos, dtype=torch.long, device=dev), slots,
                             max(pos) + t, rows, scales)

    def _fill(self, bucket: int, tokens: list[int], pos: list[int], slots: list[int], adapters) -> None:
        """The static inputs of the first `bucket` rows: the given rows, then pads on the scratch slot."""
        pad = bucket - len(pos)
        host = torch.tensor([tokens + [0] * pad, pos + [0] * pad, slots + [self.scratch] * pad,
                             [i for i, _ in adapters] + [0] * pad])  # (4, bucket)
        self.inputs[:, :bucket].copy_(host)
        if self.bank is not None:
            self.scales[:bucket].copy_(torch.tensor([s for _, s in adapters] + [1.0] * pad))

    def _forward(self, tokens: torch.Tensor, pos: torch.Tensor, slots, n_keys: int, rows: torch.Tensor,
                 scales: torch.Tensor) -> torch.Tensor:
        """The batched-rows model call: tokens (B,) each at its pos[b] in cache row slots[b] (a host list, or a
        device tensor in the static form), under adapter rows[b] at scales[b], no row reading past key
        n_keys - 1; logits (B, V) — or, for tokens (B, T), T tokens a row from pos[b] on: logits (B, T, V)."""
        with adapters_of(self.model, rows, scales):
            step = Step.rows(self.cache.rows(slots, n_keys), pos, graphs=self.split_graphs)
            logits = self.model(tokens[:, None] if tokens.dim() == 1 else tokens, step)
        logits = logits[:, -1] if tokens.dim() == 1 else logits
        return logits.float().to(self.device)  # a split model's come from the head's device

    def _static(self, key, n_keys: int) -> torch.Tensor:
        """The static form's call: key a bucket (a decode step) or (bucket, T) (a check of T tokens a row)."""
        bucket, t = key if isinstance(key, tuple) else (key, None)
        tokens = self.inputs[0, :bucket] if t is None else self.checks[t][:bucket]
        return self._forward(tokens, self.inputs[1, :bucket], self.inputs[2, :bucket], n_keys,
                             self.inputs[3, :bucket], self.scales[:bucket])

    def _capture(self, key) -> None:
        """Warm up (Triton compiles) and capture with every row on the scratch slot: nothing real is written."""
        self.inputs[:2].zero_()  # token 0 at position 0 …
        self.inputs[2].fill_(self.scratch)  # … of the scratch slot, for every row
        self.inputs[3].zero_()  # (the base model's rows; the adapters' LoRAs run for every row all the same)
        for buf in self.checks.values():
            buf.zero_()
        try:
            self.graphs[key] = capture_graph(lambda: self._static(key, self.cache.max_len))
        except Exception:
            log.exception("capturing the batched decode step failed; it runs eagerly from now on")
            self.use_graphs, self.graphs = False, {}


def adapters_of(model, rows: torch.Tensor, scales: torch.Tensor):
    """The model's AdapterBank selection for one call (row b: adapter rows[b] at scales[b]); a no-op context
    for a model without adapters."""
    bank = getattr(model, "adapter_bank", None)
    return contextlib.nullcontext() if bank is None else bank.select(rows, scales)


def static_step(model, graphs: bool | None) -> bool:
    """Whether the engine runs the static, padded batched step (`graphs`; None: on CUDA). A model split across
    devices (kiln/split.py) steps eagerly: a CUDA graph's static buffers live on one device."""
    if getattr(model, "places", None) is not None:
        if graphs:
            raise KilnError("a model split across devices runs the batched step eagerly: graphs=False, or load "
                            "the model on one device")
        return False
    return next(model.parameters()).device.type == "cuda" if graphs is None else bool(graphs)


def fit_context(model, kv_bytes: int, n_slots: int, cache_type_k: str | None = None,
                cache_type_v: str | None = None, graphs: bool | None = None) -> int:
    """The ctx_size of the largest slot cache (n_slots rows of keys and values, and the static step's scratch
    row) that takes at most kv_bytes, at most the model's positions: a KV memory budget in positions per slot
    (what llama-server's -c over -np is). q8_0 stores 34 bytes per 32 values, bf16 64: 1.88x the positions."""
    per_row = KVCache.for_model(model, max_len=1, type_k=cache_type_k, type_v=cache_type_v, rotate=False).nbytes
    static = static_step(model, graphs)
    ctx = min(kv_bytes // (per_row * (n_slots + static)), model.args.max_position_embeddings)
    if ctx < 16:
        raise KilnError(f"a KV budget of {kv_bytes} bytes gives {n_slots} slots {ctx} positions each "
                        f"({per_row} bytes a position a slot); need at least 16")
    return int(ctx)
