"""Triton building blocks the quantized matmul kernels share, and their launch plumbing.

Owns: decoding packed codes and scales in registers (exact, in gguf-py's float32 order), storing outputs and
summing split-K partials, a format's compile-time geometry, and a PackedWeight's kernel arguments.
Not: the packed layout (packed.py), the kernels (gemv.py, gemv_int8.py, mma.py, dequant.py), routing (route.py).

Shape alphabet (every kernel file): M activation rows, N weight rows (out features), K weights per row (in
features), BN rows per program, W packed words per row per K step, G fields per word, V = 4 words per group,
NG = W / V groups per step, MX activation rows per tile (M rounded up to a power of two; >= 16 for tl.dot).
The K loop's trip count is a compile-time constant (a model has a handful of distinct K), which also lets the
Triton interpreter of the CPU tests run the kernels.
"""

from __future__ import annotations

import functools

import torch

from kiln.ops.dispatch import HAVE_TRITON, jit, tl, triton
from kiln.quant.packed import (FORMATS, IQ4_NL, IQ4_XS, KVALUES, Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K,
                               Q6_K, Q8_0, V, Format, PackedWeight, field_offset, packed_fields)


def const(v):
    """A module-level constant a @triton.jit function may read (Triton accepts only tl.constexpr globals)."""
    return tl.constexpr(v) if HAVE_TRITON else v


constexpr_function = triton.constexpr_function if HAVE_TRITON else (lambda fn: fn)

_Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0 = (const(v) for v in (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0))
_Q2_K, _Q3_K, _Q4_K, _Q5_K, _Q6_K = (const(v) for v in (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K))
_IQ4_NL, _IQ4_XS = const(IQ4_NL), const(IQ4_XS)
_V = const(V)

OFFSETS = {Q4_0: 8, Q5_0: 16, Q8_0: 128, Q3_K: 4, Q6_K: 32}  # weight = dl * (code - offset)

field_offset_c = constexpr_function(field_offset)  # packed.field_offset for a compile-time field index


@jit
def _to_float(q, OFFSET: tl.constexpr):
    """Codes 0 <= q < 2^23 (int32) -> float32 q - OFFSET, exactly, by the magic-number trick:
    (q | 0x4B000000) read as float32 is 2^23 + q, so one float subtraction (the offset folded in) replaces
    an int -> float conversion (quarter rate on sm_90)."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)


@jit
def _f16(bits):
    """An f16 stored as raw int16 bits -> float32."""
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@jit
def codes(words, hi, tab_ptr, g, FMT: tl.constexpr):
    """Field g (an int, or a tensor that broadcasts against the words) of qs words and of their high-bit
    elements hi (int32) -> float32 q, the integer part of weight = dl * q - ml, offset included (the dense
    path: exact, in gguf-py's order)."""
    if FMT == _Q8_0:
        q = _to_float((words >> (8 * g)) & 0xFF, 128)             # stored as q + 128
    elif FMT == _Q2_K:
        q = _to_float((words >> (2 * g)) & 3, 0)
    elif FMT == _Q3_K:
        q = _to_float(((words >> (2 * g)) & 3) | (((hi >> g) & 1) << 2), 4)
    else:
        lo = (words >> (4 * g)) & 0xF
        if FMT == _Q4_0:
            q = _to_float(lo, 8)
        elif FMT == _Q5_0:
            q = _to_float(lo | (((hi >> g) & 1) << 4), 16)
        elif FMT == _Q5_1 or FMT == _Q5_K:
            q = _to_float(lo | (((hi >> g) & 1) << 4), 0)
        elif FMT == _Q6_K:
            q = _to_float(lo | (((hi >> (2 * g)) & 3) << 4), 32)
        elif FMT == _IQ4_NL or FMT == _IQ4_XS:
            q = tl.load(tab_ptr + lo)  # a 16-entry code book, L1-resident
        else:  # Q4_1, Q4_K
            q = _to_float(lo, 0)
    return q


@jit
def scales(sc_ptr, mn_ptr, sidx, mask, d, dmn, FMT: tl.constexpr):
    """Each element's sub-block scale and min, dl and ml (float32), from its block's d (and dmin / m) and its
    index sidx into the sc / mn planes. ml is d (unused) for formats without a min."""
    ml = d
    if FMT == _Q4_1 or FMT == _Q5_1:
        dl = d
        ml = -dmn  # d*q + m == d*q - (-m), exactly
    elif FMT == _Q2_K:
        s = tl.load(sc_ptr + sidx, mask=mask, other=0).to(tl.int32)   # uint8: lo nibble scale, hi min
        dl = d * (s & 0xF).to(tl.float32)
        ml = dmn * (s >> 4).to(tl.float32)
    elif FMT == _Q3_K or FMT == _Q6_K or FMT == _IQ4_XS:
        dl = d * tl.load(sc_ptr + sidx, mask=mask, other=0).to(tl.float32)
    elif FMT == _Q4_K or FMT == _Q5_K:
        dl = d * tl.load(sc_ptr + sidx, mask=mask, other=0).to(tl.float32)
        ml = dmn * tl.load(mn_ptr + sidx, mask=mask, other=0).to(tl.float32)
    else:
        dl = d
    return dl, ml


@jit
def shift(v, n: tl.constexpr):
    """v << n for n >= 0, v >> -n otherwise (n a compile-time constant)."""
    if n >= 0:
        out = v << n
    else:
        out = v >> (-n)
    return out


@jit
def dense_tile(qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, tab_ptr, r, rmask, ng,
               KW: tl.constexpr, SUBS: tl.constexpr, FMT: tl.constexpr, G: tl.constexpr, WPB: tl.constexpr,
               GPS: tl.constexpr, SPG: tl.constexpr, HAS_QH: tl.constexpr, HAS_DM: tl.constexpr,
               HAS_MIN: tl.constexpr):
    """Weights of rows r (BN, 1, 1, 1) int64 and groups ng (NG,) as float32 (BN, NG, G, V) — element
    [n, i, f, j] is weight ng[i]*G*V + field_offset(f) + j of row r[n] — and the mask of the valid ones."""
    kw = ng[:, None, None] * _V + tl.arange(0, _V)[None, None, :]     # (NG, 1, V) word index
    mask = rmask & (kw < KW)[None, :, :, :]                            # (BN, NG, 1, V)
    words = tl.load(qs_ptr + r * KW + kw[None, :, :, :], mask=mask, other=0)
    hi = words
    if HAS_QH:
        hi = tl.load(qh_ptr + r * KW + kw[None, :, :, :], mask=mask, other=0).to(tl.int32)
    # Scales per (row, group) — or per (row, group, field) where a group spans sub-blocks — not per weight.
    gmask = rmask & (ng < KW // _V)[None, :, None, None]               # (BN, NG, 1, 1)
    d, dmn = block_scales(d_ptr, dm_ptr, r, ng[None, :, None, None], gmask, KW, WPB, HAS_DM)
    g = tl.arange(0, G)[None, None, :, None]                           # (1, 1, G, 1)
    if SPG == 1:
        dl, ml = scales(sc_ptr, mn_ptr, r * SUBS + (ng // GPS)[None, :, None, None], gmask, d, dmn, FMT)
    else:
        sidx = r * SUBS + (ng * SPG)[None, :, None, None] + g % SPG   # (BN, NG, G, 1): SPG == G / 4
        dl, ml = scales(sc_ptr, mn_ptr, sidx, gmask & (g < G), d, dmn, FMT)
    w = codes(words, hi, tab_ptr, g, FMT) * dl
    if HAS_MIN:
        w = w - ml
    return w, mask & (g < G)


@jit
def high_bits(qh32_ptr, r, ng, gmask, KW: tl.constexpr, G: tl.constexpr, H: tl.constexpr):
    """The qh element of each word of groups ng of rows r (BN, 1), as int32 (BN, NG, V) whose low bits hold
    it. A group's high bits are 32 (Q5_*) or 64 (Q6_K, Q3_K) bits: one or two int32 loads."""
    j = tl.arange(0, _V)
    if G * H * _V == 32:
        hw = tl.load(qh32_ptr + r * (KW // _V) + ng[None, :], mask=gmask, other=0)             # (BN, NG)
        hi = hw[:, :, None] >> (j * (G * H))[None, None, :]                                    # (BN, NG, V)
    else:
        ha = tl.load(qh32_ptr + r * (KW // 2) + 2 * ng[None, :], mask=gmask, other=0)
        hb = tl.load(qh32_ptr + r * (KW // 2) + 2 * ng[None, :] + 1, mask=gmask, other=0)
        hi = tl.where((j < 2)[None, None, :], ha[:, :, None], hb[:, :, None])
        hi = hi >> ((j % 2) * 16)[None, None, :]                                                # (BN, NG, V)
    return hi


@jit
def block_scales(d_ptr, dm_ptr, r, ng, gmask, KW: tl.constexpr, WPB: tl.constexpr, HAS_DM: tl.constexpr):
    """The f16 block scale d and dmin / m (d again where the format has none) of groups ng of rows r, as
    float32 (ng broadcast against r: (BN, NG) for r (BN, 1) and ng (1, NG))."""
    blk = r * (KW // WPB) + ng * _V // WPB
    d = _f16(tl.load(d_ptr + blk, mask=gmask, other=0))
    dmn = d
    if HAS_DM:
        dmn = _f16(tl.load(dm_ptr + blk, mask=gmask, other=0))
    return d, dmn


@jit
def store_rows(y, y_ptr, b_ptr, rows, rmask, mi, M, N, pid_k, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    """A program's outputs y (BN, MX) for weight rows `rows` and activation rows mi < M: into y (M, N) in its
    dtype (+ bias), or with SPLIT_K > 1 as float32 partials (SPLIT_K, M, N) for _split_k_sum_kernel."""
    ymask = rmask & (mi < M)[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + mi[None, :] * N + rows[:, None], y.to(y_ptr.dtype.element_ty), mask=ymask)
    else:
        tl.store(y_ptr + (pid_k * M + mi[None, :]) * N + rows[:, None], y, mask=ymask)


@jit
def _split_k_sum_kernel(p_ptr, y_ptr, b_ptr, N, MN, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK: tl.constexpr):
    """y (M, N) = sum over splits of p (SPLIT_K, M, N) float32 (+ bias), cast to y's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(p_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def sum_splits(out: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None, split: int) -> torch.Tensor:
    """y (M, N) = the float32 partials out (split, M, N) summed (+ bias); y itself when split == 1."""
    if split > 1:
        m, n = y.shape
        block = 1024
        _split_k_sum_kernel[(triton.cdiv(m * n, block),)](
            out, y, bias if bias is not None else y, n, m * n, SPLIT_K=split, HAS_BIAS=bias is not None,
            BLOCK=block, num_warps=4)
    return y


@functools.lru_cache(maxsize=None)
def code_book(device: torch.device) -> torch.Tensor:
    # Created on the first call for a device, which must come before any CUDA-graph capture (as must
    # Triton's compilation of each shape).
    return torch.tensor(KVALUES, dtype=torch.float32, device=device)


def plane_args(w: PackedWeight) -> list[torch.Tensor]:
    """qs, qh, sc, mn, d, dm, tab; a plane the format lacks is replaced by qs (never read)."""
    p = [w.qs if getattr(w, k) is None else getattr(w, k) for k in packed_fields()]
    tab = code_book(w.device) if w.qtype in (IQ4_NL, IQ4_XS) else w.qs
    return p + [tab]


def geometry(fmt: Format, k: int, block_k: int) -> dict:
    """The kernels' compile-time geometry for rows of k weights, block_k per step."""
    gw = V * fmt.g
    if block_k % gw:
        raise ValueError(f"block_k {block_k} is not a multiple of {fmt.name}'s {gw}-weight groups")
    spg, gps = (1, fmt.sub // gw) if fmt.sub >= gw else (gw // fmt.sub, 1)
    return dict(KW=k // fmt.g, SUBS=k // fmt.sub, G=fmt.g, WPB=fmt.block // fmt.g, GPS=gps, SPG=spg,
                HAS_QH=fmt.qh is not None, HAS_DM=fmt.dm, HAS_MIN=fmt.has_min, W=block_k // fmt.g)


def gemv_constants(qtype: int) -> dict:
    """A format's constants for the GEMVs: high bits per field H, the shift SH that brings the top fields
    below bit 23, the code offset, and whether offsets and mins go through sum(x) (GMIN; not the code books)."""
    fmt = FORMATS[qtype]
    return dict(H=2 if qtype == Q6_K else int(fmt.qh is not None), SH=16 if fmt.g == 4 else 12,
                OFFSET=OFFSETS.get(qtype, 0), GMIN=qtype not in (IQ4_NL, IQ4_XS))


def qh_words(w: PackedWeight) -> torch.Tensor:
    """The high-bit plane as int32 words (`high_bits` reads a group's bits in one or two loads); qs where
    the format has none (never read)."""
    return w.qs if w.qh is None else w.qh.view(torch.int32)
