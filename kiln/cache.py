"""KV cache: pre-allocated keys and values for every layer; attention calls one verb.

Owns: the storage (layers, B, K, max_len, D) and `update(layer, pos, k, v)`, which writes the new keys
and values at positions pos..pos+T and returns everything the layer may attend to.
Not: masks (the model builds them from positions and its own sliding windows), eviction, paging.

Shape alphabet: L layers, B batch, K kv heads, S positions, D head dim.
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
