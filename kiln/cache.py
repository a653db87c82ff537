"""KV cache: pre-allocated keys and values for every layer, and the `Step` that says where a forward's new
tokens go in it; attention calls one verb, `k, v = step.update(layer, k, v)`.

Owns: the storage (layers, B, K, max_len, D), its writes and reads (`update`, `update_at`; `encode_at` and
the stored parts for the fused decode kernels), a server's slot cache (one batch row per sequence: `slot(i)`,
a batch-1 view; `rows(slots, n_keys)`, a `RowsView` for a batched step), and `Step` with its three kinds.
Bounded layers (`Ring`): a sliding-window layer keeps only its window, and a rotating cache (mlx-lm's
max_kv_size) the first `keep` positions and the most recent ones, in a ring of slots; `update` then returns
the ring's slots plus the new keys, and `Step.ring_keys` says which absolute position each of them holds (the
mask is built from that, so the slots need no reordering). `shift` drops positions and re-rotates the keys
after them (llama.cpp's context shift). Each part is stored in its cache type (kv_types.py: the codecs and
the basis q8_0 / q4_0 store in); attention over what `update` returns goes through `queries` / `outputs`,
which rotate its query into that basis and its output back (the fused step: `encode_at`, `out_rotation`).
Not: masks and RoPE tables (models/base.prepare builds them once per forward from the step), paging, which
slot holds which request (engine.py), which layers get a ring (`plan_rings` from the caller's choice).

Shape alphabet: L layers, B batch (rows of a step), N slots, K kv heads, S positions, T new tokens,
D head dim.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kiln.errors import KilnError
from kiln.kv_types import BLOCK_TYPES, QK, basis_for, cache_type, decode, encode, layout
from kiln.native import KV_TYPES, KVStore
from kiln.ops.kv_write import Side, encode_kv
from kiln.policy import DEFAULT, Policy

PREFILL, GRAPH, ROWS = "prefill", "graph", "rows"


@dataclass(frozen=True, eq=False)
class Step:
    """Where one forward's T new tokens go, built by the caller with one of three constructors:

    - `Step.prefill(cache, pos)`: every row's tokens at positions pos..pos+T-1 (an int) of `cache` (a
      KVCache or a slot's batch-1 view): a prompt chunk, or an eager decode step. Without a cache, a whole
      sequence from position 0 (what `model(ids)` runs). A split model's one-token step given `graphs`
      (split.DeviceGraphs) replays its GPU blocks from a graph (split.run_blocks); so does `Step.rows`'s.
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
    valid: torch.Tensor | None = None  # prefill: how many of the T rows are real (device; None: all)
    graphs: object = None  # a split model's one-token step: where its GPU blocks' captured graphs are kept
    #                        (split.DeviceGraphs: the Decoder's, the engine's); None: they run eagerly
    # Filled once per forward by models/base.prepare:
    positions: torch.Tensor | None = None  # (T,) absolute positions, or (B, T), one row each
    fused: bool = False  # a GRAPH / ROWS step the fused decode kernels serve (RoPE + KV write, then split-KV;
    #                      up to models.base.FUSED_MAX_T tokens a row)
    rope: dict = field(default_factory=dict)  # RoPE name ("global", "local") -> base.RopeAt
    mask: dict = field(default_factory=dict)  # window (None: none) -> bool mask (T, S) or (B, 1, T, S);
    #                                           (window, Ring) -> the mask of a ring layer's keys
    n_keys: int = 0  # keys S of a layer without a ring
    slots: dict = field(default_factory=dict)  # Ring -> where the fused step writes its tokens (`ring_slots`)

    @classmethod
    def prefill(cls, cache: KVCache | None = None, pos: int = 0, policy: Policy | None = None,
                valid: torch.Tensor | None = None, graphs=None) -> Step:
        if isinstance(pos, torch.Tensor) or pos < 0 or (cache is None and pos):
            raise ValueError(f"Step.prefill takes an int position >= 0 (0 without a cache), got {pos!r}")
        return cls(PREFILL, cache, int(pos), policy, valid, graphs)

    @classmethod
    def graph(cls, cache: KVCache, pos: torch.Tensor, policy: Policy | None = None) -> Step:
        if not isinstance(pos, torch.Tensor) or pos.ndim != 0 or cache is None:
            raise ValueError("Step.graph takes a cache and a 0-dim position tensor")
        return cls(GRAPH, cache, pos, policy)

    @classmethod
    def rows(cls, view: RowsView, pos: torch.Tensor, policy: Policy | None = None, graphs=None) -> Step:
        if not isinstance(pos, torch.Tensor) or pos.ndim != 1 or not isinstance(view, RowsView):
            raise ValueError("Step.rows takes a RowsView (KVCache.rows) and per-row positions (B,)")
        return cls(ROWS, view, pos, policy, graphs=graphs)

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
            return self.cache.update(layer, self.pos, k, v, self.valid)
        return self.cache.update_at(layer, self.positions, k, v)

    def ring(self, layer: int) -> Ring | None:
        """The layer's ring, None: it keeps every position (or there is no cache)."""
        return None if self.cache is None else self.cache.ring(layer)

    def ring_slots(self, ring: Ring) -> torch.Tensor:
        """The slots of a ring layer (positions' shape) this step's tokens are written to, computed once per
        forward for each ring (device tensors: a CUDA-graph step's too)."""
        if ring not in self.slots:
            self.slots[ring] = ring.slot(self.positions)
        return self.slots[ring]

    def ring_keys(self, ring: Ring, t: int, device) -> torch.Tensor:
        """Absolute positions (S,) of the keys a ring layer's `update` returns for T new tokens (-1: an empty
        slot): one token is written first and the ring read whole; a longer chunk gets the ring as it was
        before it (nothing from position 0), then its own T keys (it may overwrite slots its earlier queries
        still need)."""
        if t == 1 and self.valid is None:
            return ring.held(self.pos + 1, device)
        if self.kind != PREFILL:
            raise KilnError("a ring (bounded) KV cache takes one token per CUDA-graph or batched step")
        new = torch.arange(self.pos, self.pos + t, device=device)
        return torch.cat([ring.held(self.pos, device), new]) if self.pos else new  # from 0: nothing held

    def static_kv(self, layer: int):
        """(k_cache, v_cache, rows) that the fused decode kernels write and read: the layer's (B, K, S, D)
        with rows None, or for ROWS every slot (N, K, S, D) with the rows' slot index (B,); a q8_0 part's
        codes (its scales: the cache's `layer_scales`)."""
        kc, vc = self.cache.layer_kv(layer)
        return kc, vc, (self.cache.slot_index if self.kind == ROWS else None)


# ---------------------------------------------------------------- bounded layers

@dataclass(frozen=True)
class Ring:
    """A bounded layer's slots: positions 0..keep-1 in slots 0..keep-1, then each later position p in slot
    keep + (p - keep) % span, overwriting the one `span` positions before it. A query at p sees a key j <= p
    of this layer when j < keep or p - j < span (and, as everywhere, p - j < the layer's window).
    The layer stores one more slot, `scratch` (never read as a key): where a padded prompt graph's padding
    rows and a chunk's overwritten rows are written, so a chunk's write is one fixed-shape index_copy."""

    keep: int
    span: int

    @property
    def slots(self) -> int:
        return self.keep + self.span

    @property
    def scratch(self) -> int:
        return self.slots  # the index of the extra slot

    def slot(self, pos):
        """The slot of absolute position(s) pos (an int, or a tensor of them)."""
        if isinstance(pos, int):
            return pos if pos < self.keep else self.keep + (pos - self.keep) % self.span
        return torch.where(pos < self.keep, pos, self.keep + (pos - self.keep).remainder(self.span))

    def held(self, end, device) -> torch.Tensor:
        """(slots + 1,) the position each slot holds once positions 0..end-1 are written, -1 where none is yet
        (and for the scratch slot). `end` an int or a 0-dim device tensor (a CUDA-graph step)."""
        s = torch.arange(self.slots + 1, device=device)
        back = end - 1 - s  # >= 0: slot s has been written
        recent = end - 1 - back.remainder(self.span)  # the latest p < end with p ≡ s (mod span), for s >= keep
        return torch.where((back < 0) | (s == self.scratch), -1, torch.where(s < self.keep, s, recent))


def layer_windows(model) -> list:
    """Each layer's sliding window (None: global attention), as its attention module declares it."""
    return [getattr(block.self_attn, "window", None) for block in model.model.layers]


def plan_rings(windows: list, max_len: int, max_kv_size: int | None = None, keep: int = 4,
               sliding: bool = True) -> list | None:
    """Per layer (windows: each layer's sliding window, None for a global one), the Ring it is stored in
    (None: all max_len positions); None when no layer gets one. A sliding-window layer keeps its window
    (`sliding`); with max_kv_size every layer keeps its first `keep` positions and the most recent ones,
    max_kv_size slots in all (mlx-lm's RotatingKVCache), or only its window where that is shorter."""
    if max_kv_size is not None and (not isinstance(max_kv_size, int) or isinstance(max_kv_size, bool)
                                    or not isinstance(keep, int) or keep < 0 or max_kv_size <= keep):
        raise KilnError(f"invalid max_kv_size {max_kv_size!r}: must be an integer larger than keep ({keep!r})")
    rings = []
    for w in windows:
        ring = Ring(0, w) if w and sliding else None
        if max_kv_size is not None:
            ring = Ring(0, w) if w and w <= max_kv_size - keep else Ring(keep, max_kv_size - keep)
        rings.append(ring if ring is not None and ring.slots < max_len else None)
    return rings if any(rings) else None


class KVCache:
    """Keys and values of every layer, stored in `type_k` / `type_v` (None: `dtype`, the model's; see
    CACHE_TYPES); `update` returns them in the dtype of the keys and values it is given, and in the cache's
    basis: a block-quantized type's keys and values come back rotated (`k_basis`, `v_basis`: `Basis`, None
    for other types), and attention takes its queries through `queries` and its output through `outputs`.
    `k`, `v` are the first stored part of each ((L, B, K, S, D) for a dense type): the tensors the fused
    kernels read when the cache is `direct` (stored in the model's own dtype). `key_offset` (L, K, D): what
    a block type subtracts from keys before rotating them (`models/base.key_offsets`; None: nothing);
    `rotate`: which types are stored rotated (`kv_types.basis_for`; None: the block types)."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype=torch.float32, device="cpu", type_k: str | None = None, type_v: str | None = None,
                 rings: list | None = None, key_offset: torch.Tensor | None = None, rotate: bool | None = None):
        self.type_k, self.type_v = cache_type(type_k, dtype), cache_type(type_v, dtype)
        for t in (self.type_k, self.type_v):
            if t in ("q8_0", "q4_0") and head_dim % QK:
                raise KilnError(f"KV cache type {t} needs a head dim divisible by {QK}; this model's is {head_dim}")
        self.dtype, self.max_len = dtype, max_len
        self.rings = list(rings) if rings and any(rings) else None  # per layer: Ring or None (all positions)
        slots = [max_len if r is None else r.slots + 1 for r in (self.rings or [None] * n_layers)]  # + scratch
        if isinstance(device, (list, tuple)):  # a split model (kiln/split.py): each layer on its device, in its dtype
            if type_k is not None or type_v is not None:
                raise KilnError("a model split between devices keeps its KV cache in each layer's dtype: "
                                "drop the cache types, or load it on one device")
            dtypes = dtype if isinstance(dtype, (list, tuple)) else [dtype] * n_layers
            self.type_k = self.type_v = None
            rotate = False  # each layer in its own dtype, on its own device
            zeros = lambda: _PerLayer(torch.zeros((batch, n_kv_heads, n, head_dim), dtype=t, device=d)  # noqa: E731
                                      for n, d, t in zip(slots, device, dtypes))
            self.kp, self.vp = [zeros()], [zeros()]
        elif self.rings:  # layers of different lengths: one tensor each
            self.kp = [_PerLayer(torch.zeros((batch, n_kv_heads, n, w), dtype=dt, device=device) for n in slots)
                       for w, dt in layout(self.type_k, head_dim)]
            self.vp = [_PerLayer(torch.zeros((batch, n_kv_heads, n, w), dtype=dt, device=device) for n in slots)
                       for w, dt in layout(self.type_v, head_dim)]
        else:
            shape = (n_layers, batch, n_kv_heads, max_len)  # (L, B, K, S) + (width,)
            self.kp = [torch.zeros(shape + (w,), dtype=dt, device=device) for w, dt in layout(self.type_k, head_dim)]
            self.vp = [torch.zeros(shape + (w,), dtype=dt, device=device) for w, dt in layout(self.type_v, head_dim)]
        self.head_dim = head_dim
        self.plans: dict = {}  # what a native CPU decode step built for the blocks it runs (models/base.run_blocks)
        self.k_basis = basis_for(self.type_k, head_dim, self.kp[0].device, rotate, key_offset)
        self.v_basis = basis_for(self.type_v, head_dim, self.kp[0].device, rotate)
        self._views()

    def _views(self):
        self.k, self.v = self.kp[0], self.vp[0]
        self.direct = self.type_k is None or (  # None: a split model's, in each layer's dtype
            self.k.dtype == self.v.dtype == self.dtype and len(self.kp) == len(self.vp) == 1
            and self.k_basis is None and self.v_basis is None)  # the fused kernels read keys as they come
        # the native CPU token reads it (if float32 there): the model's dtype, or each side in a type it stores
        self.native_reads = self.direct or (self.type_k in KV_TYPES and self.type_v in KV_TYPES)

    def ring(self, layer: int) -> Ring | None:
        return None if self.rings is None else self.rings[layer]

    @classmethod
    def for_model(cls, model, batch: int = 1, max_len: int | None = None, dtype=None, device=None,
                  type_k: str | None = None, type_v: str | None = None, rings: list | None = None,
                  rotate: bool | None = None):
        a = model.args
        p = next(model.parameters())
        split = getattr(model, "places", None)  # kiln/split.py: each layer's KV on its device, in its dtype
        if split and device is None:
            device, dtype = [torch.device(q.device) for q in split], dtype or [q.dtype for q in split]
        offset = None
        if not split and (cache_type(type_k, p.dtype) in BLOCK_TYPES if rotate is None else rotate):
            offset = model.key_offsets()  # keys stored rotated, less the model's key bias (models/base.key_offsets)
        return cls(a.num_hidden_layers, batch, a.num_key_value_heads, a.head_dim,
                   max_len or a.max_position_embeddings, dtype or p.dtype, device or p.device, type_k, type_v, rings,
                   offset, rotate)

    @property
    def nbytes(self) -> int:
        """Bytes the cache's storage takes."""
        return sum(t.numel() * t.element_size() for p in self.kp + self.vp for t in (p if isinstance(p, list) else [p]))

    def queries(self, q: torch.Tensor) -> torch.Tensor:
        """q (..., D) in the basis of the keys `update` returns: rotated where they are stored rotated."""
        return q if self.k_basis is None else self.k_basis.rotate(q)

    def outputs(self, o: torch.Tensor) -> torch.Tensor:
        """An attention output (..., H*D) over the values `update` returned, back in the model's basis."""
        if self.v_basis is None:
            return o
        return self.v_basis.unrotate(o.unflatten(-1, (-1, self.head_dim))).flatten(-2)

    def _encoded(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """(stored part, its new content) for each part of keys, then of values: k, v (B, K, T, D) in the
        cache's basis and types."""
        for parts, kind, basis, x in ((self.kp, self.type_k, self.k_basis, k), (self.vp, self.type_v, self.v_basis, v)):
            yield from zip(parts, encode(kind, x if basis is None else basis.into(layer, x)))

    def _write(self, layer: int, sl, k: torch.Tensor, v: torch.Tensor):
        for part, new in self._encoded(layer, k, v):
            part[layer][:, :, sl] = new

    def _read(self, layer: int, sl, dtype):
        return (decode(self.type_k, [p[layer][:, :, sl] for p in self.kp], dtype),
                decode(self.type_v, [p[layer][:, :, sl] for p in self.vp], dtype))

    def update(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None):
        """k, v (B, K, T, D) → all keys and values (B, K, pos+T, D) of this layer; a ring layer's: those of
        `Step.ring_keys` (its slots, then the T new ones when T > 1). `valid`: a device count of the rows that
        are real (a padded prompt graph's; None: all): a ring layer keeps none of the rest."""
        end = pos + k.shape[2]
        if end > self.max_len:
            raise KilnError(f"context is full: position {end} exceeds the cache's {self.max_len} slots")
        ring = self.ring(layer)
        if ring is not None:
            return self._ring_update(layer, ring, pos, k, v, valid)
        self._write(layer, slice(pos, end), k, v)
        return self._read(layer, slice(0, end), k.dtype)

    def _ring_update(self, layer: int, ring: Ring, pos: int, k: torch.Tensor, v: torch.Tensor, valid=None):
        t = k.shape[2]
        if t == 1 and valid is None:  # written first, then the whole ring
            self._write(layer, slice(ring.slot(pos), ring.slot(pos) + 1), k, v)
            return self._read(layer, slice(None), k.dtype)
        new_k, new_v = self._stored(layer, k, v)
        keys, values = new_k, new_v  # a prompt from position 0: the ring holds nothing yet
        if pos:
            old_k, old_v = self._read(layer, slice(None), k.dtype)
            keys, values = torch.cat([old_k, new_k], 2), torch.cat([old_v, new_v], 2)  # (B, K, slots + T, D)
        p = torch.arange(pos, pos + t, device=k.device)
        end = pos + t if valid is None else pos + valid  # past the real rows
        stay = (p < end) & ((p < ring.keep) | (p >= end - ring.span))  # real, and not overwritten in the chunk
        self._scatter(layer, torch.where(stay, ring.slot(p), ring.scratch), k, v)  # the rest: to scratch
        return keys, values

    def _stored(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v as the cache gives them back once stored (its types' rounding, its basis), as a whole cache's
        update would."""
        enc = list(self._encoded(layer, k, v))
        n = len(self.kp)
        out = []
        for kind, pairs, x in ((self.type_k, enc[:n], k), (self.type_v, enc[n:], v)):
            if len(pairs) == 1 and pairs[0][0][layer].dtype == x.dtype and pairs[0][1] is x:
                out.append(x)  # stored as it is
            else:
                out.append(decode(kind, [new.to(part[layer].dtype) for part, new in pairs], x.dtype))
        return out[0], out[1]

    def _scatter(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, K, T, D) into cache slots (T,) (a device tensor: no host sync)."""
        for part, new in self._encoded(layer, k, v):
            dst = part[layer]
            new = new.to(dst.dtype)
            if dst.dtype == torch.float8_e4m3fn:  # no fp8 index_copy on the CPU: copy the bytes
                dst, new = dst.view(torch.uint8), new.view(torch.uint8)
            dst.index_copy_(2, slots, new)

    def write_at(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """k, v (B, K, T, D) encoded and written at device-side positions (T,) (a CUDA-graph step: an
        index_copy, no host sync), nothing read back. A ring layer takes one token, written at its slot
        (`Step.ring_keys` says what each slot holds)."""
        ring = self.ring(layer)
        if ring is not None:
            if k.shape[2] != 1:
                raise KilnError("a ring (bounded) KV cache takes one token per CUDA-graph step")
            positions = ring.slot(positions)
        self._scatter(layer, positions, k, v)

    def update_at(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """`write_at`, then the whole static cache (B, K, max_len, D) decoded; the caller's mask hides the
        slots not written yet."""
        self.write_at(layer, positions, k, v)
        return self._read(layer, slice(None), k.dtype)

    def shift(self, end: int, keep: int, discard: int, rotate: Callable) -> None:
        """Context shift (llama.cpp's): of positions 0..end-1, drop keep..keep+discard-1 and move the later
        ones `discard` positions down, their keys re-rotated by `rotate(layer, k (B, K, S, D), delta (S,))`
        (RoPE by delta positions, models/base.key_rotation). A ring layer keeps what it holds of them. Keys
        stored in a rotated basis are re-roped in the model's (`Basis.back`: RoPE and H do not commute)."""
        for layer in range(len(self.kp[0])):
            ring, device = self.ring(layer), self.kp[0][layer].device
            old = torch.arange(end, device=device) if ring is None else ring.held(end, device)  # per slot
            stay = ((old >= 0) & (old < keep)) | (old >= keep + discard)
            src = stay.nonzero().flatten()
            new = torch.where(old[src] < keep, old[src], old[src] - discard)
            if ring is not None:
                self._check_ring(ring, new, end - discard)
            k, v = self._plain(layer, *self._read(layer, slice(None), torch.float32))
            k = rotate(layer, k.index_select(2, src), (new - old[src]))
            self._scatter(layer, new if ring is None else ring.slot(new), k, v.index_select(2, src))

    def _plain(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values as `_read` gives them, in the model's basis."""
        return (k if self.k_basis is None else self.k_basis.back(layer, k),
                v if self.v_basis is None else self.v_basis.back(layer, v))

    @staticmethod
    def _check_ring(ring: Ring, kept: torch.Tensor, end: int):
        need = ring.held(end, kept.device)
        if not torch.isin(need[need >= 0], kept).all():
            raise KilnError(f"context shift: a sliding-window layer of {ring.span} positions would lose tokens it "
                            f"needs; use a context of at least twice the window plus keep")

    def layer_kv(self, layer: int):
        """A layer's whole cache, (B, K, S, D) keys and values (a `direct` cache's storage; q8_0's codes)."""
        return self.k[layer], self.v[layer]

    def layer_scales(self, layer: int):
        """The block scales (B, K, S, D/32) beside `layer_kv`'s keys and values (None: not a block type)."""
        return tuple(p[1][layer] if t in BLOCK_TYPES else None
                     for p, t in ((self.kp, self.type_k), (self.vp, self.type_v)))

    def native_kv(self, layer: int) -> KVStore | None:
        """How the native CPU token writes and reads this layer beside `layer_kv` (batch row 0's scales), or
        None: float32 as it comes (a `direct` cache of a float32 model, or a split model's), or not a cache it reads
        (`native_reads`). A direct cache of another dtype (a bfloat16 model on the CPU) is its type, unscaled."""
        if not self.native_reads or self.type_k is None:
            return None
        if self.direct:
            return None if self.k.dtype == torch.float32 else KVStore(self.type_k, self.type_v)
        k_scale, v_scale = (None if s is None else s[0] for s in self.layer_scales(layer))
        kb, vb = self.k_basis, self.v_basis
        off = None if kb is None or kb.offset is None else kb.offset[layer]
        return KVStore(self.type_k, self.type_v, k_scale, v_scale, None if kb is None else kb.h,
                       None if vb is None else vb.h, off)

    def out_rotation(self):
        """The (D, D) matrix that takes an attention output over the values as stored back to the model's
        basis (the values' Hᵀ), None where they are stored in it."""
        return None if self.v_basis is None else self.v_basis.ht

    def encode_at(self, layer: int, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  policy: Policy = DEFAULT, rows: torch.Tensor | None = None) -> torch.Tensor:
        """A fused step's write (ops.kv_write.encode_kv: one kernel on a GPU): q, k (B, T, H or K, D) after
        RoPE and v, k and v encoded into this layer at positions (T,) or (B, T) (cache rows `rows` (B,), else
        row b), nothing read back → q in the keys' basis."""
        sides = [Side(kind, tuple(p[layer] for p in parts), basis, layer) for kind, parts, basis in
                 ((self.type_k, self.kp, self.k_basis), (self.type_v, self.vp, self.v_basis))]
        return encode_kv(q, k, v, *sides, positions, rows, policy)

    def slot(self, i: int) -> KVCache:
        """A batch-1 cache sharing row i's storage: writes through it land in this cache."""
        view = object.__new__(KVCache)
        view.__dict__.update(self.__dict__)
        row = lambda p: _PerLayer(t[i:i + 1] for t in p) if isinstance(p, _PerLayer) else p[:, i:i + 1]  # noqa: E731
        view.kp, view.vp = [row(p) for p in self.kp], [row(p) for p in self.vp]
        view._views()
        return view

    def check_keys(self, n_keys: int) -> None:
        """KilnError unless a row needing `n_keys` keys (its position + its new tokens) fits the cache."""
        if n_keys > self.max_len:
            raise KilnError(f"context is full: position {n_keys} exceeds the cache's {self.max_len} slots")

    def rows(self, slots: list[int] | torch.Tensor, n_keys: int) -> RowsView:
        """A view for one step over the given slots (batch row b lives in slot slots[b]) in which no row
        needs more than `n_keys` keys (its position + its new tokens). `slots` may be a (B,) device tensor
        (a CUDA-graph step's static input: nothing is copied from the host)."""
        self.check_keys(n_keys)
        if self.rings is not None:
            raise KilnError("a slot cache keeps every position: bounded (ring) layers are for batch-1 caches")
        return RowsView(self, slots, n_keys)


class _PerLayer(list):
    """A split model's keys or values: one (B, K, S, D) tensor per layer on the layer's device; `device` is
    the first layer's (the CPU, where a split model's tokens go in)."""

    @property
    def device(self) -> torch.device:
        return self[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self[0].dtype


class RowsView:
    """Rows of a slot cache at per-row positions: the cache of a `Step.rows`.

    `update_at(layer, pos, k, v)` with pos (B, T) absolute positions writes row b's keys into slot slots[b]
    at pos[b] and returns the keys (B, K, n_keys, D) of those slots; positions past a row's own are stale
    and the caller's per-row mask hides them. The fused GPU path writes with `write_at` and reads `layer_kv`,
    `layer_scales` and `slot_index` instead.
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

    def to(self, device) -> RowsView:
        """This view with its slot index on `device`: a split model's rows crossing to the layers there
        (split.on_device; each layer's keys and values already live on its own device)."""
        view = copy.copy(self)
        view.slot_index = self.slot_index.to(device)
        return view

    def layer_kv(self, layer: int):
        """The whole slot cache of a layer, (N, K, S, D) keys and values."""
        return self.cache.k[layer], self.cache.v[layer]

    @property
    def direct(self) -> bool:
        return self.cache.direct

    @property
    def native_reads(self) -> bool:
        return self.cache.native_reads

    def layer_scales(self, layer: int):
        return self.cache.layer_scales(layer)

    def queries(self, q: torch.Tensor) -> torch.Tensor:
        return self.cache.queries(q)

    def out_rotation(self):
        return self.cache.out_rotation()

    def encode_at(self, layer: int, pos: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  policy: Policy = DEFAULT) -> torch.Tensor:
        """pos (B, T): `KVCache.encode_at` into the rows' slots."""
        return self.cache.encode_at(layer, pos, q, k, v, policy, rows=self.slot_index)

    def outputs(self, o: torch.Tensor) -> torch.Tensor:
        return self.cache.outputs(o)

    def ring(self, layer: int) -> None:
        return None  # a slot cache keeps every position (KVCache.rows)

    def write_at(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """pos (B, T), k/v (B, K, T, D) encoded and written into the rows' slots, nothing read back."""
        rows = self.slot_index[:, None]  # (B, 1) broadcasts against pos (B, T)
        for part, new in self.cache._encoded(layer, k, v):
            part[layer][rows, :, pos] = new.transpose(1, 2).to(part[layer].dtype)  # indexed (B, T, K, W)

    def update_at(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """pos (B, T), k/v (B, K, T, D) → keys and values (B, K, n_keys, D) of the rows' slots."""
        c = self.cache
        self.write_at(layer, pos, k, v)
        if self._span is not None:  # consecutive slots: a view, no gather
            sel = lambda p: p[layer][self._span:self._span + self.n_rows, :, :self.n_keys]  # noqa: E731
        else:
            sel = lambda p: p[layer][:, :, :self.n_keys].index_select(0, self.slot_index)  # noqa: E731
        return (decode(c.type_k, [sel(p) for p in c.kp], k.dtype),
                decode(c.type_v, [sel(p) for p in c.vp], v.dtype))
