"""KV cache: pre-allocated keys and values for every layer, and the `Step` that says where a forward's new
tokens go in it; attention calls one verb, `k, v = step.update(layer, k, v)`.

Owns: the storage (layers, B, K, max_len, D); `update(layer, pos, k, v)`, which writes the new keys and
values at positions pos..pos+T and returns everything the layer may attend to, and `update_at` (the same
at device-side positions: the whole static cache comes back); for a server's slot cache (one batch row per
sequence), `slot(i)` (a batch-1 view of row i: prefill one request as a batch-1 cache) and
`rows(slots, n_keys)` (a `RowsView` for a batched step whose rows sit at different positions in different
slots); `Step` with its three kinds (prefill / CUDA-graph step / batched rows) and their positions.
Not: masks and RoPE tables (models/base.prepare builds them once per forward from the step), eviction,
paging, which slot holds which request (engine.py).

Shape alphabet: L layers, B batch (rows of a step), N slots, K kv heads, S positions, T new tokens,
D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kiln.errors import KilnError
from kiln.policy import Policy

PREFILL, GRAPH, ROWS = "prefill", "graph", "rows"


@dataclass(frozen=True, eq=False)
class Step:
    """Where one forward's T new tokens go, built by the caller with one of three constructors:

    - `Step.prefill(cache, pos)`: every row's tokens at positions pos..pos+T-1 (an int) of `cache` (a
      KVCache or a slot's batch-1 view): a prompt chunk, or an eager decode step. Without a cache, a whole
      sequence from position 0 (what `model(ids)` runs).
    - `Step.graph(cache, pos)`: a decode step captured in a CUDA graph. `pos` is a 0-dim device tensor (the
      graph's static input); the keys are the whole static cache, the slots past pos masked.
    - `Step.rows(view, pos)`: a batched step over a slot cache (a server): row b at position pos[b] ((B,)
      device tensor) of slot view.slot_index[b] (`KVCache.rows`).

    `policy` picks the kernels of the model's own ops (kiln/policy.py); None: the model's, the one kiln.load
    was given. The model's forward fills the other fields once (models/base.prepare) for its layers.
    """

    kind: str
    cache: KVCache | RowsView | None = None
    pos: int | torch.Tensor = 0
    policy: Policy | None = None
    # Filled once per forward by models/base.prepare:
    positions: torch.Tensor | None = None  # (T,) absolute positions, or (B, T), one row each
    fused: bool = False  # a GRAPH / ROWS step the fused decode kernels serve (RoPE + KV write, then split-KV)
    rope: dict = field(default_factory=dict)  # RoPE name ("global", "local") -> base.RopeAt
    mask: dict = field(default_factory=dict)  # window (None: none) -> bool mask (T, S) or (B, 1, T, S)

    @classmethod
    def prefill(cls, cache: KVCache | None = None, pos: int = 0, policy: Policy | None = None) -> Step:
        if isinstance(pos, torch.Tensor) or pos < 0 or (cache is None and pos):
            raise ValueError(f"Step.prefill takes an int position >= 0 (0 without a cache), got {pos!r}")
        return cls(PREFILL, cache, int(pos), policy)

    @classmethod
    def graph(cls, cache: KVCache, pos: torch.Tensor, policy: Policy | None = None) -> Step:
        if not isinstance(pos, torch.Tensor) or pos.ndim != 0 or cache is None:
            raise ValueError("Step.graph takes a cache and a 0-dim position tensor")
        return cls(GRAPH, cache, pos, policy)

    @classmethod
    def rows(cls, view: RowsView, pos: torch.Tensor, policy: Policy | None = None) -> Step:
        if not isinstance(pos, torch.Tensor) or pos.ndim != 1 or not isinstance(view, RowsView):
            raise ValueError("Step.rows takes a RowsView (KVCache.rows) and per-row positions (B,)")
        return cls(ROWS, view, pos, policy)

    def keys(self, t: int, device) -> tuple[torch.Tensor, int]:
        """(absolute positions of the T new tokens — (T,), or (B, T) for ROWS —, number of keys S)."""
        if self.kind == ROWS:
            return self.pos[:, None] + torch.arange(t, device=device), self.cache.n_keys
        if self.kind == GRAPH:
            return self.pos + torch.arange(t, device=device), self.cache.max_len
        return torch.arange(self.pos, self.pos + t, device=device), (t if self.cache is None else self.pos + t)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """k, v (B, K, T, D) written at this step's positions -> the keys and values (B, K, S, D) to attend."""
        if self.kind == PREFILL:
            return self.cache.update(layer, self.pos, k, v)
        return self.cache.update_at(layer, self.positions, k, v)

    def static_kv(self, layer: int):
        """(k_cache, v_cache, rows) that the fused decode kernels write and read: the layer's (B, K, S, D)
        with rows None, or for ROWS every slot (N, K, S, D) with the rows' slot index (B,)."""
        kc, vc = self.cache.layer_kv(layer)
        return kc, vc, (self.cache.slot_index if self.kind == ROWS else None)


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype=torch.float32, device="cpu"):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)  # (L, B, K, S, D)
        if isinstance(device, (list, tuple)):  # a split model: one (B, K, S, D) tensor per layer, on its device
            dtypes = dtype if isinstance(dtype, (list, tuple)) else [dtype] * n_layers
            self.k = _PerLayer(torch.zeros(shape[1:], dtype=t, device=d) for d, t in zip(device, dtypes))
            self.v = _PerLayer(torch.zeros(shape[1:], dtype=t, device=d) for d, t in zip(device, dtypes))
        else:
            self.k = torch.zeros(shape, dtype=dtype, device=device)
            self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    @classmethod
    def for_model(cls, model, batch: int = 1, max_len: int | None = None, dtype=None, device=None):
        a = model.args
        p = next(model.parameters())
        split = getattr(model, "places", None)  # kiln/split.py: each layer's KV on its device, in its dtype
        if split and device is None:
            device, dtype = [torch.device(q.device) for q in split], dtype or [q.dtype for q in split]
        return cls(a.num_hidden_layers, batch, a.num_key_value_heads, a.head_dim,
                   max_len or a.max_position_embeddings, dtype or p.dtype, device or p.device)

    def update(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor):
        """k, v (B, K, T, D) → all keys and values (B, K, pos+T, D) of this layer."""
        end = pos + k.shape[2]
        if end > self.max_len:
            raise KilnError(f"context is full: position {end} exceeds the cache's {self.max_len} slots")
        self.k[layer][:, :, pos:end] = k
        self.v[layer][:, :, pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def update_at(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """k, v (B, K, T, D) written at device-side positions (T,) (a CUDA-graph step: an index_copy) → the
        whole static cache (B, K, max_len, D); the caller's mask hides the slots not written yet."""
        self.k[layer].index_copy_(2, positions, k)
        self.v[layer].index_copy_(2, positions, v)
        return self.k[layer], self.v[layer]

    def layer_kv(self, layer: int):
        """A layer's whole cache, (B, K, S, D) keys and values."""
        return self.k[layer], self.v[layer]

    def slot(self, i: int) -> KVCache:
        """A batch-1 cache sharing row i's storage: writes through it land in this cache."""
        view = object.__new__(KVCache)
        if isinstance(self.k, _PerLayer):
            view.k, view.v = _PerLayer(t[i:i + 1] for t in self.k), _PerLayer(t[i:i + 1] for t in self.v)
        else:
            view.k, view.v = self.k[:, i:i + 1], self.v[:, i:i + 1]
        view.max_len = self.max_len
        return view

    def rows(self, slots: list[int] | torch.Tensor, n_keys: int) -> RowsView:
        """A view for one step over the given slots (batch row b lives in slot slots[b]) in which no row
        needs more than `n_keys` keys (its position + its new tokens). `slots` may be a (B,) device tensor
        (a CUDA-graph step's static input: nothing is copied from the host)."""
        if n_keys > self.max_len:
            raise KilnError(f"context is full: position {n_keys} exceeds the cache's {self.max_len} slots")
        return RowsView(self, slots, n_keys)


class _PerLayer(list):
    """A split model's keys or values: one (B, K, S, D) tensor per layer on the layer's device; `device` is
    the first layer's (the CPU, where a split model's tokens go in)."""

    @property
    def device(self) -> torch.device:
        return self[0].device


class RowsView:
    """Rows of a slot cache at per-row positions: the cache of a `Step.rows`.

    `update_at(layer, pos, k, v)` with pos (B, T) absolute positions writes row b's keys into slot slots[b]
    at pos[b] and returns the keys (B, K, n_keys, D) of those slots; positions past a row's own are stale
    and the caller's per-row mask hides them. The fused GPU path reads `layer_kv` and `slot_index` instead.
    """

    def __init__(self, cache: KVCache, slots: list[int] | torch.Tensor, n_keys: int):
        self.cache, self.n_keys, self.max_len = cache, n_keys, cache.max_len
        self._span = None  # the first slot, when the slots are consecutive (read as a view, no gather)
        if isinstance(slots, torch.Tensor):
            self.slot_index, self.n_rows = slots, slots.shape[0]  # (B,)
            return
        slots = list(slots)
        self.slot_index, self.n_rows = torch.tensor(slots, dtype=torch.long, device=cache.k.device), len(slots)
        if slots == list(range(slots[0], slots[0] + len(slots))):
            self._span = slots[0]

    def layer_kv(self, layer: int):
        """The whole slot cache of a layer, (N, K, S, D) keys and values."""
        return self.cache.k[layer], self.cache.v[layer]

    def update_at(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """pos (B, T), k/v (B, K, T, D) → keys and values (B, K, n_keys, D) of the rows' slots."""
        kc, vc = self.layer_kv(layer)  # (N, K, S, D)
        rows = self.slot_index[:, None]  # (B, 1) broadcasts against pos (B, T)
        kc[rows, :, pos] = k.transpose(1, 2).to(kc.dtype)  # indexed (B, T, K, D)
        vc[rows, :, pos] = v.transpose(1, 2).to(vc.dtype)
        if self._span is not None:  # consecutive slots: a view, no gather
            b, e = self._span, self._span + self.n_rows
            return kc[b:e, :, :self.n_keys], vc[b:e, :, :self.n_keys]
        return (kc[:, :, :self.n_keys].index_select(0, self.slot_index),
                vc[:, :, :self.n_keys].index_select(0, self.slot_index))
