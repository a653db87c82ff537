"""Native CPU kernels (native.c, native_legacy.c, native_step.c): compiled once per machine with the system C
compiler, loaded by ctypes.

Owns: building and caching the library (<kiln cache>/kernels/, keyed by source, compiler, flags, CPU and
OpenMP runtime), linking the OpenMP runtime torch already uses (two thread pools on two cores stall each
other), `available()`, and the typed entry points with the shape checks that keep the C side simple (`Stack`: a
model's blocks as native_step.c reads them).
Not: when they serve (ops/cpu.py, policy.native), the kernels (native.c), batched work (torch's kernels).

Why not torch.compile (2-core AVX-512, 2026-11-26): inductor's int8 GEMV streams 18-21 GB/s against native.c's
26-34 (torch's _weight_int8pack_mm ~14); in a compiled decode step it recomputed the preceding norm per output
row, so the compiled Qwen2.5-0.5B step (15 s to compile warm) ran no faster than eager; the rest of the step is
dispatch of small ops that one C call per norm and attention replaces. This library builds in 0.25 s.
Optional: without a C compiler, OpenMP runtime or Linux, `available()` is False and callers keep torch.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

SOURCES = [Path(__file__).with_name(n) for n in ("native.c", "native_legacy.c", "native_step.c")]
HEADER = Path(__file__).with_name("native.h")
Q4K_BYTES = 144  # one Q4_K block: 256 weights
Q6K_BYTES = 210  # one Q6_K block: 256 weights
KQUANT_BYTES = {12: Q4K_BYTES, 14: Q6K_BYTES}  # GGML type -> bytes per 256 weights (Q4_K, Q6_K)
LEGACY_BYTES = {2: 18, 3: 20, 6: 22, 7: 24, 8: 34}  # GGML type -> bytes per 32 weights (Q4_0 ... Q8_0)
MAX_ROWS = 16  # rows of x a block GEMV (and the one-call step) takes: native.c keeps an accumulator per row
BLOCK_WEIGHTS = {**{t: (b, 256) for t, b in KQUANT_BYTES.items()}, **{t: (b, 32) for t, b in LEGACY_BYTES.items()}}
# every type gemv_block serves -> (bytes, weights) of one block
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC"]


def available() -> bool:
    return _lib() is not None


def gemv_i8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (K,) float32, q (N, K) int8, scale (N,) bf16, bias (N,) float32 or None -> (N,) float32."""
    n, k = q.shape
    x, q, scale, bias = _c(x), _c(q), _c(scale), _c(bias)
    y = torch.empty(n, dtype=torch.float32)
    _lib().kiln_gemv_i8(_ptr(q), _ptr(x), _ptr(scale), _ptr(bias), _ptr(y), n, k, torch.get_num_threads())
    return y


def gemv_i8g(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """gemv_i8g_ref's contract, in native.c: x (K,) or (M, K) float32 (a few rows: q is read once for all),
    q (N, K) int8, scale (N, K / G) float16 (one per G weights of a row), bias (N,) float32 or None -> (N,)
    or (M, N) float32."""
    n, k = q.shape
    group = k // scale.shape[1]
    x2 = _c(x.reshape(-1, k))
    q, scale, bias = _c(q), _c(scale), _c(bias)
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    _lib().kiln_gemv_i8g(_ptr(q), _ptr(x2), _ptr(scale), group, _ptr(bias), _ptr(y), n, k, x2.shape[0],
                         torch.get_num_threads())
    return y.view(*x.shape[:-1], n)


def dequant_i8g(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q (N, K) int8, scale (N, K / G) float16 -> the weight (N, K) float32, scale * q per group (exact), or those
    rounded to bfloat16 (dtype: as torch's .bfloat16() rounds them)."""
    n, k = q.shape
    q, scale = _c(q), _c(scale)
    out = torch.empty(n, k, dtype=_out_dtype(dtype))
    _lib().kiln_dequant_i8g(_ptr(q), _ptr(scale), k // scale.shape[1], _ptr(out), out.dtype == torch.bfloat16, n, k,
                            torch.get_num_threads())
    return out


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    """A dequantizer's output dtype: float32, or bfloat16 (rounded from the float32 weights)."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"the native dequantizers write float32 or bfloat16, not {dtype}")
    return dtype


def gemv_k(x: torch.Tensor, blocks: torch.Tensor, qtype: int, bias: torch.Tensor | None) -> torch.Tensor:
    """gemv_k_ref's contract, in native.c: x (K,) or (M, K) float32 with M <= 16, blocks (N, K / 256 * B) uint8
    (a Q4_K or Q6_K tensor's rows as the file holds them: qtype 12 or 14), bias (N,) float32 or None -> (N,) or
    (M, N) float32."""
    fn = _lib().kiln_gemv_q4k if qtype == 12 else _lib().kiln_gemv_q6k
    return _few_rows("gemv_k", x, blocks, in_features(blocks, qtype), bias, fn)


def _few_rows(name: str, x: torch.Tensor, blocks: torch.Tensor, k: int, bias: torch.Tensor | None, fn):
    """A block GEMV's call: fn(blocks, x (M, K), bias, y (M, N), N, K, M, threads) for M <= 16 rows of x."""
    n = blocks.shape[0]
    x2 = _c(x.reshape(-1, k))
    if x2.shape[0] > MAX_ROWS:
        raise ValueError(f"{name} takes at most {MAX_ROWS} rows of x, got {x2.shape[0]}")
    blocks, bias = _c(blocks), _c(bias)
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    fn(_ptr(blocks), _ptr(x2), _ptr(bias), _ptr(y), n, k, x2.shape[0], torch.get_num_threads())
    return y.view(*x.shape[:-1], n)


# GGML type -> (bytes a block, offset of qs, of qh (None: none), of m (None: none)); d is at 0 in each
_LEGACY_FIELDS = {2: (18, 2, None, None), 3: (20, 4, None, 2), 6: (22, 6, 2, None), 7: (24, 8, 4, 2),
                  8: (34, 2, None, None)}


def regroup_lq(raw: torch.Tensor, qtype: int) -> torch.Tensor:
    """A Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 tensor's rows as the file holds them, raw (N, K / 32 * B) uint8 with
    K % 128 == 0, -> the same bytes regrouped four blocks at a time as native_legacy.c reads them (its comment
    draws the layout): (N, K / 128 * 4B) uint8. In one native pass where the library is built
    (kiln_permute_groups over `_group_runs`: most of a compact CPU load's repacking was torch's strided copies
    here), else `regroup_lq_ref`."""
    if _lib() is None:
        return regroup_lq_ref(raw, qtype)
    raw = raw.contiguous()
    runs = _group_runs(qtype)
    out = torch.empty_like(raw)
    group = 4 * _LEGACY_FIELDS[qtype][0]
    _lib().kiln_permute_groups(_ptr(raw), _ptr(out), raw.numel() // group, group, runs.shape[0], _ptr(runs),
                               torch.get_num_threads())
    return out


@functools.cache
def _group_runs(qtype: int) -> torch.Tensor:
    """(R, 4) int16 runs (to, from, length, flip) that rewrite one group of four blocks as regroup_lq_ref does,
    read off it run on the byte positions themselves (and on zeros, for the flipped bits)."""
    size = _LEGACY_FIELDS[qtype][0]
    perm = regroup_lq_ref(torch.arange(4 * size, dtype=torch.int16).view(1, -1), qtype, flip=False).view(-1)
    flip = regroup_lq_ref(torch.zeros(1, 4 * size, dtype=torch.uint8), qtype).view(-1)
    runs = []
    for i, (src, f) in enumerate(zip(perm.tolist(), flip.tolist())):
        r = runs[-1] if runs else None
        if r and r[1] + r[2] == src and r[0] + r[2] == i and r[3] == bool(f):
            r[2] += 1
        else:
            runs.append([i, src, 1, bool(f)])
    return torch.tensor(runs, dtype=torch.int16)


def regroup_lq_ref(raw: torch.Tensor, qtype: int, flip: bool = True) -> torch.Tensor:
    """regroup_lq in torch (the reference; `flip` False leaves Q8_0's codes unflipped: `_group_runs` runs it on
    byte positions)."""
    size, qs, qh, m = _LEGACY_FIELDS[qtype]
    n = raw.shape[0]
    b = raw.reshape(n, -1, 4, size)                                            # (N, G, 4, B)
    if qtype == 8:  # first halves of the four blocks' codes, then second halves, each + 128
        halves = b[..., qs:qs + 32].reshape(n, -1, 4, 2, 16).transpose(2, 3).reshape(n, -1, 128)
        halves = halves ^ 0x80 if flip else halves
        return torch.cat([halves, b[..., 0:2].reshape(n, -1, 8)], -1).reshape(n, -1)
    parts = [b[..., qs:qs + 16].reshape(n, -1, 64)]
    if qh is not None:  # the four low halves of qh, then the four high halves
        halves = b[..., qh:qh + 4].reshape(n, -1, 4, 2, 2)                    # (N, G, block, half, 2 bytes)
        parts.append(halves.transpose(2, 3).reshape(n, -1, 16))
    parts.append(b[..., 0:2].reshape(n, -1, 8))
    if m is not None:
        parts.append(b[..., m:m + 2].reshape(n, -1, 8))
    return torch.cat(parts, -1).reshape(n, -1)


def ungroup_lq(rows: torch.Tensor, qtype: int) -> torch.Tensor:
    """regroup_lq's inverse: the file's blocks (N, K / 32 * B) uint8."""
    size, qs, qh, m = _LEGACY_FIELDS[qtype]
    n = rows.shape[0]
    g = rows.reshape(n, -1, 4 * size)                                          # (N, G, 4B)
    b = torch.empty(n, g.shape[1], 4, size, dtype=torch.uint8)                 # (N, G, 4, B)
    if qtype == 8:
        b[..., qs:qs + 32] = (g[..., :128] ^ 0x80).reshape(n, -1, 2, 4, 16).transpose(2, 3).reshape(n, -1, 4, 32)
        b[..., 0:2] = g[..., 128:136].reshape(n, -1, 4, 2)
        return b.reshape(n, -1)
    b[..., qs:qs + 16] = g[..., :64].reshape(n, -1, 4, 16)
    at = 64
    if qh is not None:
        b[..., qh:qh + 4] = g[..., at:at + 16].reshape(n, -1, 2, 4, 2).transpose(2, 3).reshape(n, -1, 4, 4)
        at += 16
    b[..., 0:2] = g[..., at:at + 8].reshape(n, -1, 4, 2)
    if m is not None:
        b[..., m:m + 2] = g[..., at + 8:at + 16].reshape(n, -1, 4, 2)
    return b.reshape(n, -1)


def gemv_lq(x: torch.Tensor, rows: torch.Tensor, qtype: int, bias: torch.Tensor | None) -> torch.Tensor:
    """gemv_lq_ref's contract, in native_legacy.c: x (K,) or (M, K) float32 with M <= 16, rows (N, K / 128 * 4B)
    uint8 (a Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 tensor regrouped by `regroup_lq`: qtype 2, 3, 6, 7, 8), bias (N,)
    float32 or None -> (N,) or (M, N) float32."""
    return _few_rows("gemv_lq", x, rows, in_features(rows, qtype), bias,
                     lambda b, *rest: _lib().kiln_gemv_lq(b, qtype, *rest))


def dequant_lq(rows: torch.Tensor, qtype: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """rows (N, K / 128 * 4B) uint8 regrouped by `regroup_lq` -> the weight (N, K) float32, bit-equal to
    quant/legacy.py's dequantization of the file's blocks (or those rounded to bfloat16: dtype)."""
    n, k = rows.shape[0], rows.shape[1] // LEGACY_BYTES[qtype] * 32
    rows = _c(rows)
    out = torch.empty(n, k, dtype=_out_dtype(dtype))
    _lib().kiln_dequant_lq(_ptr(rows), qtype, _ptr(out), out.dtype == torch.bfloat16, n, k, torch.get_num_threads())
    return out


def gemv_lq_ref(x: torch.Tensor, raw: torch.Tensor, qtype: int, bias: torch.Tensor | None) -> torch.Tensor:
    """The product gemv_lq computes, in torch, from the file's blocks raw (N, K / 32 * B): x rounded per 32 to
    |xq| <= 32639 (_round_x), each block's dot exact, then y = sum_b xs_b * (d_b * (q_b . xq_b) [+ m_b *
    sum(xq_b)]) with q the codes less the type's offset (Q4_0: 8, Q5_0: 16; the _1 types: none, and their m)
    (+ bias)."""
    from kiln.quant import legacy
    size, qs, qh, m = _LEGACY_FIELDS[qtype]
    n = raw.shape[0]
    b = raw.reshape(-1, size)                                                  # (N * B, size)
    if qtype == 8:
        q = b[:, 2:34].view(torch.int8).double().view(n, -1, 32)
    else:
        q = legacy._nibbles(b[:, qs:qs + 16]) if qh is None else legacy._five_bit(b[:, qh:qh + 4], b[:, qs:qs + 16])
        q = (q.double() - {2: 8, 3: 0, 6: 16, 7: 0}[qtype]).view(n, -1, 32)  # (N, B, 32)
    d = legacy.f16_at(b, 0).double().view(n, -1)                              # (N, B)
    xq, xs = _round_x(x, 32, 32639)                                            # (..., B, 32), (..., B)
    per_block = d * torch.einsum("...bl,nbl->...nb", xq, q)                    # exact integer dots
    if m is not None:
        per_block = per_block + legacy.f16_at(b, m).double().view(n, -1) * xq.sum(-1)[..., None, :]
    y = (xs.double()[..., None, :] * per_block).sum(-1).float()
    return y if bias is None else y + bias


def in_features(blocks: torch.Tensor, qtype: int) -> int:
    """K of a weight held as rows of blocks (N, K / W * B) of a BLOCK_WEIGHTS type (legacy types regrouped)."""
    size, weights = BLOCK_WEIGHTS[qtype]
    return blocks.shape[1] // size * weights


def gemv_block(x: torch.Tensor, blocks: torch.Tensor, qtype: int, bias: torch.Tensor | None) -> torch.Tensor:
    """gemv_k or gemv_lq, by qtype."""
    return (gemv_k if qtype in KQUANT_BYTES else gemv_lq)(x, blocks, qtype, bias)


def dequant_block(blocks: torch.Tensor, qtype: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dequant_k or dequant_lq, by qtype."""
    return (dequant_k if qtype in KQUANT_BYTES else dequant_lq)(blocks, qtype, dtype)


def dequant_k(blocks: torch.Tensor, qtype: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks (N, K / 256 * B) uint8 of a Q4_K / Q6_K tensor -> the weight (N, K) float32, bit-equal to
    kquants.dequantize_q4_k / _q6_k (or those rounded to bfloat16: dtype)."""
    n, k = blocks.shape[0], blocks.shape[1] // KQUANT_BYTES[qtype] * 256
    blocks = _c(blocks)
    out = torch.empty(n, k, dtype=_out_dtype(dtype))
    fn = _lib().kiln_dequant_q4k if qtype == 12 else _lib().kiln_dequant_q6k
    fn(_ptr(blocks), _ptr(out), out.dtype == torch.bfloat16, n, k, torch.get_num_threads())
    return out


def gemv_k_ref(x: torch.Tensor, blocks: torch.Tensor, qtype: int, bias: torch.Tensor | None) -> torch.Tensor:
    """The product gemv_k computes, in torch: x rounded per 256 to |xq| <= 32639 (_round_x), each sub-block's
    dot exact, then per block Q4_K: xs * (d * sum_j sc_j * dot_j - dmin * sum_j m_j * sum(xq_j)); Q6_K:
    xs * d * sum_s sc_s * (dot_s - 32 * sum(xq_s)) with its codes 0..63 (+ bias)."""
    from kiln.quant.kquants import _crumbs, _nibbles, k_scales_mins
    from kiln.quant.legacy import f16_at
    size = KQUANT_BYTES[qtype]
    n = blocks.shape[0]
    b = blocks.reshape(-1, size)                                               # (N * B, size)
    xq, xs = _round_x(x, 256, 32639)                                           # (..., B, 256), (..., B)
    if qtype == 12:
        sc, mn = (t.double().view(n, -1, 8) for t in k_scales_mins(b[:, 4:16]))  # (N, B, 8)
        d, dmin = (f16_at(b, o).double().view(n, -1) for o in (0, 2))          # (N, B)
        q = _nibbles(b[:, 16:144], 32).double().view(n, -1, 8, 32)             # (N, B, 8, 32)
        xq = xq.view(*xq.shape[:-1], 8, 32)                                    # (..., B, 8, 32)
        dots = torch.einsum("...bjl,nbjl->...nbj", xq, q)                      # exact integers
        mins = torch.einsum("...bj,nbj->...nb", xq.sum(-1), mn)
        per_block = d * (dots * sc).sum(-1) - dmin * mins                     # (..., N, B)
    else:
        sc = b[:, 192:208].view(torch.int8).double().view(n, -1, 16)           # (N, B, 16)
        d = f16_at(b, 208).double().view(n, -1)
        q = _nibbles(b[:, 0:128], 64).bitwise_or_(_crumbs(b[:, 128:192], 2) << 4).double().view(n, -1, 16, 16)
        xq = xq.view(*xq.shape[:-1], 16, 16)
        dots = torch.einsum("...bjl,nbjl->...nbj", xq, q) - 32 * xq.sum(-1)[..., None, :, :]
        per_block = d * (dots * sc).sum(-1)
    y = (xs.double()[..., None, :] * per_block).sum(-1).float()
    return y if bias is None else y + bias


def _round_x(x: torch.Tensor, group: int, qmax: int = 32767):
    """x (..., K) rounded to integers per group of G: (xq (..., K / G, G) float64 holding integers, xs (..., K / G)
    float32) with xs = max|x| / qmax and xq = round(x / xs), ties to even."""
    xg = x.float().reshape(*x.shape[:-1], -1, group)
    xs = xg.abs().amax(-1) / qmax
    xq = torch.round(xg * torch.where(xs > 0, 1 / xs, torch.zeros_like(xs))[..., None])
    return xq.double(), xs


def gemv_i8g_ref(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The product gemv_i8g computes, in torch: x rounded by _round_x, each group's dot product exact, then
    y[n] = sum_g scale[n, g] * xs[g] * dot[n, g] (+ bias)."""
    n, k = q.shape
    group = k // scale.shape[1]
    xq, xs = _round_x(x, group)                                      # (..., G', group), (..., G')
    dots = torch.einsum("...gj,ngj->...ng", xq, q.view(n, -1, group).double())  # exact integers
    y = ((scale.float() * xs[..., None, :]).double() * dots).sum(-1).float()
    return y if bias is None else y + bias


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
             residual: torch.Tensor | None = None):
    """ops.rms_norm_ref's contract for one float32 row x (..., E): y, or (y, h) with a residual."""
    x, weight, residual = _c(x), _c(weight), _c(residual)
    y = torch.empty(x.shape, dtype=torch.float32)
    h = None if residual is None else torch.empty(x.shape, dtype=torch.float32)
    _lib().kiln_rms_norm(_ptr(x), _ptr(residual), _ptr(weight), eps, offset, _ptr(y), _ptr(h), x.shape[-1])
    return y if h is None else (y, h)


KV_TYPES = {"f32": 0, "f16": 1, "bf16": 2, "q8_0": 3, "q4_0": 4}  # native.h's KV_*: the cache types it stores
_WIDTH = {"q4_0": 2}  # elements a stored item holds (q4_0: two a byte; the rest one each)


class KVStore(NamedTuple):
    """How a layer's cache is stored where it is not plain float32 (native.h's kiln_kv; KVCache.native_kv):
    each side's type (KV_TYPES' names), a block type's f16 scales (K, S, D/32) else None, each side's basis
    (D, D) float32 or None (not rotated), the keys' offset (K, D) or None."""
    k_type: str
    v_type: str
    k_scales: torch.Tensor | None = None
    v_scales: torch.Tensor | None = None
    k_rot: torch.Tensor | None = None
    v_rot: torch.Tensor | None = None
    k_offset: torch.Tensor | None = None

    def ints(self) -> tuple[int, ...]:
        """The six ints a `where` row ends with (native_step.c): scales, rotations, offset addresses (0: none),
        the types (k + 16 * v)."""
        ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
        return (*map(ptr, self[2:]), KV_TYPES[self.k_type] + 16 * KV_TYPES[self.v_type])


class _KV(ctypes.Structure):  # native.h's kiln_kv
    _fields_ = [*((n, ctypes.c_void_p) for n in ("ks", "vs", "krot", "vrot", "koff")),
                ("kt", ctypes.c_int64), ("vt", ctypes.c_int64)]


def decode_attention(q, k, v, k_cache, v_cache, pos: int, inv_freq, attn_factor: float, q_norm_w, k_norm_w,
                     eps: float, offset: float, scale: float, window: int | None,
                     ring: tuple[int, int] | None = None, store: KVStore | None = None) -> torch.Tensor:
    """One token: q (H, D), k/v (K, D) float32 before RoPE; k_cache/v_cache (K, S, D) float32 that
    `attention_fits` (k, v are written at `pos`) -> (H * D,) attention output. See native.c.
    `ring` (slot, n_keys): a ring layer's (cache.Ring) write slot, and the slots 0..n_keys-1 it attends to
    (the caller has checked that every one of them is visible: `window` is then not used).
    `store`: the caches are stored so instead (KVStore; each (K, S, D) in its type, q4_0's (K, S, D/2) bytes),
    written and read so."""
    h, d = q.shape
    slot, lo, n_keys = attention_slots(pos, window, ring)
    q, k, v, inv_freq, q_norm_w, k_norm_w = _c(q), _c(k), _c(v), _c(inv_freq), _c(q_norm_w), _c(k_norm_w)
    out, qr = torch.empty(h * d, dtype=torch.float32), torch.empty(h * d, dtype=torch.float32)
    assert stored_fits(k_cache, v_cache, d, store), "decode_attention: a cache not stored as its KVStore says"
    kv = None
    if store is not None:
        parts = store[2:4] + tuple(map(_c, store[4:]))  # kept alive through the call
        kv = ctypes.byref(_KV(*map(_ptr, parts), KV_TYPES[store.k_type], KV_TYPES[store.v_type]))
    _lib().kiln_decode_attention(
        _ptr(q), _ptr(qr), _ptr(k), _ptr(v), k_cache.data_ptr(), v_cache.data_ptr(), head_stride(k_cache, store), pos,
        h, k.shape[0], d, _ptr(inv_freq), inv_freq.numel(), attn_factor, _ptr(q_norm_w), _ptr(k_norm_w),
        eps, offset, scale, slot, lo, n_keys, _ptr(out), torch.get_num_threads(), kv)
    return out


_STORED = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "q8_0": torch.int8,
           "q4_0": torch.uint8}


def stored_fits(k_cache: torch.Tensor, v_cache: torch.Tensor, d: int, store: KVStore | None) -> bool:
    """Does a layer's cache (K, S, ·) keys and values hold rows of d as decode_attention reads them: float32
    (store None) or the KVStore's types with their scales, each row unit-strided right after the last, and one
    head stride in elements for both sides?"""
    types = ("f32", "f32") if store is None else store[:2]
    scales = (None, None) if store is None else store[2:4]
    for c, t, sc in zip((k_cache, v_cache), types, scales):
        if not (c.dtype == _STORED[t] and c.shape[-1] * _WIDTH.get(t, 1) == d and c.stride(-1) == 1
                and c.stride(-2) == c.shape[-1] and (sc is None) == (t not in ("q8_0", "q4_0"))
                and (sc is None or (sc.is_contiguous() and sc.shape == (*c.shape[:2], d // 32)))):
            return False
    return head_stride(k_cache, store) == v_cache.stride(0) * _WIDTH.get(types[1], 1)


def head_stride(k_cache: torch.Tensor, store: KVStore | None) -> int:
    """A (K, S, ·) cache's distance between kv heads in elements (q4_0's: twice its bytes)."""
    return k_cache.stride(0) * (1 if store is None else _WIDTH.get(store.k_type, 1))


I8_ROWS, I8_GROUPS = -1, -2  # native_step.c's codes for int8 rows: one bf16 scale a row, one f16 scale a group


class _Mat(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("scale", ctypes.c_void_p),
                *((n, ctypes.c_int64) for n in ("n", "qtype", "group"))]


class _Layer(ctypes.Structure):
    _fields_ = [*((n, ctypes.c_void_p) for n in ("norm_attn", "norm_mlp", "post_attn", "post_mlp", "q_norm", "k_norm")),
                ("qkv", _Mat * 3), ("o", _Mat), ("gate_up", _Mat * 2), ("down", _Mat),
                *((n, ctypes.c_int64) for n in ("n_qkv", "n_gate_up", "rope", "act")), ("scale", ctypes.c_float)]


class _Stack(ctypes.Structure):
    _fields_ = [*((n, ctypes.c_int64) for n in ("n_layers", "e", "heads", "kv_heads", "d", "inter")),
                *((n, ctypes.c_float) for n in ("eps", "offset", "qk_eps", "qk_offset")),
                ("inv_freq", ctypes.c_void_p * 2), ("half", ctypes.c_int64 * 2), ("attn_factor", ctypes.c_float * 2),
                ("rows", ctypes.c_int64), ("pos", ctypes.c_void_p), ("where", ctypes.c_void_p)]


ACTS = {"silu": 0, "gelu_tanh": 1}  # native_step.c's activation codes


class Stack:
    """Blocks as kiln_decode_layers (native_step.c) reads them, built once: `layers` one dict per block —
    norm_attn, norm_mlp, post_attn, post_mlp (E,) float32 (the post norms None: none); q_norm, k_norm (D,) or
    None; rope (0 or 1: which of a step's two tables), act (an ACTS name), scale; qkv (up to 3), o (1), gate_up
    (up to 2), down (1): lists of (weight, qtype, bias (N,) float32 or None, scale, group), a projection's parts
    in output order (blocks of a BLOCK_WEIGHTS type: scale None, group 0; int8 rows (N, K): qtype I8_ROWS with
    scale (N,) bf16, or I8_GROUPS with (N, K / group) float16) — and what every block shares: dims (E, H, K, D,
    I), eps / offset of the block norms and of the per-head norms. The caller has checked the shapes
    (ops/cpu.layer_plan); the tensors are kept alive here."""

    def __init__(self, layers: list[dict], dims: tuple[int, ...], norm: tuple[float, float],
                 qk_norm: tuple[float, float]):
        self.keep, self.dims = [], dims
        self.layers = (_Layer * len(layers))(*(self._layer(b) for b in layers))
        self.shared = _Stack(len(layers), *dims, *norm, *qk_norm)

    def _ptr(self, t: torch.Tensor | None):
        if t is None:
            return None
        self.keep.append(t)
        return t.data_ptr()

    def _mat(self, part) -> _Mat:
        w, qtype, bias, scale, group = part
        return _Mat(self._ptr(w), self._ptr(bias), self._ptr(scale), w.shape[0], qtype, group)

    def _layer(self, b: dict) -> _Layer:
        mats = lambda parts, n: (_Mat * n)(*(self._mat(p) for p in parts))  # noqa: E731
        return _Layer(*(self._ptr(b[n]) for n in ("norm_attn", "norm_mlp", "post_attn", "post_mlp", "q_norm",
                                                  "k_norm")),
                      mats(b["qkv"], 3), self._mat(b["o"][0]), mats(b["gate_up"], 2), self._mat(b["down"][0]),
                      len(b["qkv"]), len(b["gate_up"]), b["rope"], ACTS[b["act"]], b["scale"])


def decode_layers(stack: Stack, x: torch.Tensor, residual: torch.Tensor | None, pos, where: torch.Tensor,
                  ropes: list[tuple[torch.Tensor, float]]):
    """Tokens through every block of `stack` (native_step.c), one a row: x (B, E) (or (E,)) float32, the first
    block's input; residual likewise, the stream coming in, or None (the first block's: x itself); pos the
    rows' positions (an int for one row); where (B, L, 12) (or (L, 12)) int64, per row and block the addresses
    of its k and v cache (K, S, D) (positions D apart, dims unit-strided), the head stride in elements, the slot
    the row's token is written to, the first slot attended and how many, then how they are stored
    (KVStore.ints(); float32: 0, 0, 0, 0, 0, 0); ropes: up to two (inv_freq (R/2,) float32, attn_factor), the
    tables the blocks' `rope` picks -> (the last block's MLP output, the residual stream), (B, E) each (the
    rows' own order). The rows share each weight's read (the GEMVs take MAX_ROWS)."""
    e = stack.dims[0]
    x = x.reshape(-1, e).clone()
    res = torch.empty_like(x) if residual is None else residual.reshape(-1, e).clone()
    pos = torch.tensor([pos] if isinstance(pos, int) else list(pos), dtype=torch.int64)
    if not 1 <= len(pos) <= MAX_ROWS or len(pos) != x.shape[0]:
        raise ValueError(f"decode_layers takes 1 to {MAX_ROWS} rows, one position each: {x.shape[0]} rows, "
                         f"{len(pos)}")
    s = _Stack.from_buffer_copy(stack.shared)  # this call's own: a Stack may serve two threads
    ropes = [(_c(inv), factor) for inv, factor in ropes]
    for i, (inv, factor) in enumerate(ropes):
        s.inv_freq[i], s.half[i], s.attn_factor[i] = inv.data_ptr(), inv.numel(), factor
    where = where.contiguous()
    s.rows, s.pos, s.where = len(pos), pos.data_ptr(), where.data_ptr()
    _lib().kiln_decode_layers(stack.layers, ctypes.byref(s), _ptr(x), _ptr(res), residual is not None,
                              torch.get_num_threads())
    return x, res


def attention_slots(pos: int, window: int | None, ring: tuple[int, int] | None) -> tuple[int, int, int]:
    """(the slot a token at `pos` is written to, the first slot it attends, how many): a plain cache's slot pos
    and keys 0..pos, or the last `window` of them; a ring layer's (slot, n_keys) as given, from slot 0."""
    if ring is not None:
        return ring[0], 0, ring[1]
    lo = pos + 1 - window if window and pos + 1 > window else 0
    return pos, lo, pos + 1 - lo


def attention_fits(q: torch.Tensor, k_cache: torch.Tensor, inv_freq: torch.Tensor) -> bool:
    """Does `decode_attention` take these? q (H, D) float32 and a layer's cache (K, S, ·) in a type it stores
    (KV_TYPES), rows unit-strided one after another (the cache's own layout), H a multiple of K, D within
    native.c's buffers."""
    d = q.shape[-1]
    return (d <= 1024 and 2 * inv_freq.numel() <= d and q.dtype == torch.float32
            and k_cache.dtype in _STORED.values()
            and k_cache.stride(2) == 1 and k_cache.stride(1) == k_cache.shape[2]
            and q.shape[0] % k_cache.shape[0] == 0)


def _c(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


@functools.cache
def _lib():
    if platform.system() != "Linux":
        return None
    try:
        path = _build()
        lib = None if path is None else ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError):
        return None
    if lib is None:
        return None
    p, i, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    signatures = {"kiln_gemv_i8": [p] * 5 + [i] * 2 + [ctypes.c_int],
                  "kiln_gemv_i8g": [p] * 3 + [i] + [p] * 2 + [i] * 3 + [ctypes.c_int],
                  "kiln_dequant_i8g": [p] * 2 + [i, p, ctypes.c_int] + [i] * 2 + [ctypes.c_int],
                  "kiln_gemv_q4k": [p] * 4 + [i] * 3 + [ctypes.c_int],
                  "kiln_gemv_q6k": [p] * 4 + [i] * 3 + [ctypes.c_int],
                  "kiln_gemv_lq": [p, ctypes.c_int] + [p] * 3 + [i] * 3 + [ctypes.c_int],
                  "kiln_dequant_lq": [p, ctypes.c_int, p, ctypes.c_int] + [i] * 2 + [ctypes.c_int],
                  "kiln_permute_groups": [p] * 2 + [i] * 3 + [p, ctypes.c_int],
                  "kiln_dequant_q4k": [p] * 2 + [ctypes.c_int] + [i] * 2 + [ctypes.c_int],
                  "kiln_dequant_q6k": [p] * 2 + [ctypes.c_int] + [i] * 2 + [ctypes.c_int],
                  "kiln_rms_norm": [p] * 3 + [f] * 2 + [p] * 2 + [i],
                  "kiln_decode_attention": [p] * 6 + [i] * 5 + [p, i, f, p, p, f, f, f, i, i, i, p, ctypes.c_int, p],
                  "kiln_decode_layers": [p] * 4 + [ctypes.c_int] * 2}
    for name, args in signatures.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = args, None
    return lib


def _build() -> Path | None:
    """The shared library for this machine, compiled on first use; None when it cannot be built."""
    cc, omp = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"), _torch_openmp()
    if cc is None or omp is None:
        return None
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    texts = [f.read_text() for f in (*SOURCES, HEADER)]
    key = hashlib.sha256("\0".join([*texts, cc, version, " ".join(CFLAGS), omp, _cpu_flags(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    from kiln.hub import cache_dir
    out = cache_dir() / "kernels" / f"native-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        objs, so = [Path(tmp) / f"{f.stem}.o" for f in SOURCES], Path(tmp) / "k.so"
        # Compile with OpenMP, but link the runtime torch loaded (by path, not -lgomp: a wheel's bundled
        # libgomp has its own soname, and the system one would be a second pool of threads).
        cmds = [[cc, *CFLAGS, "-c", str(f), "-o", str(o)] for f, o in zip(SOURCES, objs)]
        for cmd in [*cmds, [cc, "-shared", *map(str, objs), omp, "-o", str(so)]]:
            if subprocess.run(cmd, capture_output=True, timeout=120).returncode:
                return None
        os.replace(so, out)  # atomic: a concurrent build of the same key writes the same bytes
    return out


def _torch_openmp() -> str | None:
    """Path of the OpenMP runtime torch's own code calls (other wheels may map theirs into the process too:
    gguf's sentencepiece brings a second libgomp): where `omp_get_max_threads`, looked up from torch's
    extension module through its dependencies, lives."""
    class DlInfo(ctypes.Structure):
        _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                    ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]
    try:
        fn = ctypes.CDLL(torch._C.__file__).omp_get_max_threads
        info = DlInfo()
        if not ctypes.CDLL(None).dladdr(ctypes.cast(fn, ctypes.c_void_p), ctypes.byref(info)):
            return None
    except (OSError, AttributeError):
        return None
    return os.path.realpath(info.dli_fname.decode())


def _cpu_flags() -> str:
    """The CPU's feature flags (-march=native code may not run on another CPU sharing the cache)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    m = re.search(r"^(flags|Features)\s*:(.*)$", text, re.M)
    return m.group(2).strip() if m else ""
