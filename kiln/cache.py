"""KV cache: pre-allocated keys and values for every layer; attention calls one verb.

Owns: the storage (layers, B, K, max_len, D) and `update(layer, pos, k, v)`, which writes the new keys
and values at positions pos..pos+T and returns everything the layer may attend to; for a server's slot
cache (one batch row per sequence), `slot(i)` (a batch-1 view of row i: prefill one request with the
ordinary int-`pos` code) and `rows(slots, n_keys)` (a `RowsView` for a batched step whose rows sit at
different positions in different slots).
Not: masks (the model builds them from positions and its own sliding windows), eviction, paging, which
slot holds which request (engine.py).

Shape alphabet: L layers, B batch (rows of a step), N slots, K kv heads, S positions, D head dim.
"""

from __future__ import annotations

import torch

from kiln.errors import KilnError


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype=torch.float32, device="cpu"):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)  # (L, B, K, S, D)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    @classmethod
    def for_model(cls, model, batch: int = 1, max_len: int | None = None, dtype=None, device=None):
        a = model.args
        p = next(model.parameters())
        return cls(a.num_hidden_layers, batch, a.num_key_value_heads, a.head_dim,
                   max_len or a.max_position_embeddings, dtype or p.dtype, device or p.device)

    def update(self, layer: int, pos, k: torch.Tensor, v: torch.Tensor):
        """k, v (B, K, T, D) → all keys and values (B, K, pos+T, D) of this layer.

        With `pos` a 0-dim device tensor (a CUDA-graph step) the write is an index_copy at positions
        pos..pos+T-1 and the whole static cache comes back; the caller's mask hides unwritten slots.
        """
        if isinstance(pos, torch.Tensor):
            idx = pos + torch.arange(k.shape[2], device=k.device)
            self.k[layer].index_copy_(2, idx, k)
            self.v[layer].index_copy_(2, idx, v)
            return self.k[layer], self.v[layer]
        end = pos + k.shape[2]
        if end > self.max_len:
            raise KilnError(f"context is full: position {end} exceeds the cache's {self.max_len} slots")
        self.k[layer, :, :, pos:end] = k
        self.v[layer, :, :, pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def slot(self, i: int) -> KVCache:
        """A batch-1 cache sharing row i's storage: writes through it land in this cache."""
        view = object.__new__(KVCache)
        view.k, view.v, view.max_len = self.k[:, i:i + 1], self.v[:, i:i + 1], self.max_len
        return view

    def rows(self, slots: list[int] | torch.Tensor, n_keys: int) -> RowsView:
        """A view for one step over the given slots (batch row b lives in slot slots[b]) in which no row
        needs more than `n_keys` keys (its position + its new tokens). `slots` may be a (B,) device tensor
        (a CUDA-graph step's static input: nothing is copied from the host)."""
        if n_keys > self.max_len:
            raise KilnError(f"context is full: position {n_keys} exceeds the cache's {self.max_len} slots")
        return RowsView(self, slots, n_keys)


class RowsView:
    """Rows of a slot cache at per-row positions: the model is called with `pos` a (B,) tensor.

    `update(layer, pos, k, v)` with pos (B, T) absolute positions writes row b's keys into slot slots[b]
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

    def update(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
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
