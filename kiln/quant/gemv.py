"""The float GEMV: y = x @ W.T for a few rows of x against a packed weight, dequantization fused.

Owns: `gemv` (x (M <= MAX_M, K), any float dtype; float32 accumulation of exactly dequantized weights) and its
kernel: decode for float32 x, the IQ4 formats and KILN_INT8=0, and — as tl.dot tiles — 2..8 rows of 16-bit x.
Not: routing and configs (route.py), the int8 kernels (gemv_int8.py), tiles.py, packed.py.

Instructions (PERF-GUIDE.md, "A 4-bit GEMV can be ALU-bound"): a program owns BN rows and walks K in steps of
W words, as (BN, NG, V) tiles, so every field is one elementwise op on the loaded registers. Per field and
weight: one LOP3 masks the code where it lies (the top fields from one right-shifted copy) and ORs in
0x4B000000 (float32 2^23 + code * 2^pos); one FADD removes 2^23 (instead of a quarter-rate int -> float
conversion); one FFMA by the activation, pre-scaled by 2^-pos once per thread. High bits cost a shift and a
LOP3. Scales leave the inner loop per sub-block: sum((d*sc*q - dmin*m) * x) = d*sc * sum(q*x) - dmin*m * sum(x),
offsets likewise. Split-K (float32 partials, summed by a second kernel) and smaller BN fill the SMs for small N.
`dot` (M >= 2, 16-bit x) builds dense tiles in x's dtype for the tensor cores (the FMA form costs M FMAs per
weight). Guided by sm_90 instruction counts (nvdisasm); timings from bench/gpu_quant_check.py.
"""

from __future__ import annotations

import torch

from kiln.ops.dispatch import jit, tl, triton
from kiln.quant.packed import IQ4_NL, IQ4_XS, V, PackedWeight
from kiln.quant.route import GemvConfig
from kiln.quant.tiles import (block_scales, const, constexpr_function, dense_tile, gemv_constants, geometry,
                              high_bits, plane_args, qh_words, scales, shift, store_rows, sum_splits)
from kiln.quant.tiles import field_offset_c as _fo


MAX_M = 8  # activation rows the kernel's tiles are sized for (route.MAX_GEMV_M sends it at most these)

_IQ4_NL, _IQ4_XS = const(IQ4_NL), const(IQ4_XS)
_V = const(V)
_MAGIC = 0x4B000000  # float32 2^23: (code | _MAGIC) read as float32 is 2^23 + code


@constexpr_function
def _direct(b, h, g):
    """Can field g (b low bits + h high bits) be used where it lies in its word (below bit 23)?"""
    return b * g + b + h <= 23


@constexpr_function
def _pos(b, h, sh, g):
    """Bit position of field g's code in the value the GEMV converts: where it lies in its word, or in the
    word shifted right by sh for the top fields."""
    return b * g if b * g + b + h <= 23 else b * g - sh


@constexpr_function
def _x_scale(b, h, sh, g, table):
    """2^-pos: what the activations under field g are scaled by (1 for code-book formats, whose codes are
    looked up rather than converted in place)."""
    return 1.0 if table else 2.0 ** -(b * g if b * g + b + h <= 23 else b * g - sh)


@jit
def _fo_t(f, G: tl.constexpr):
    """field_offset for a tensor of field indices."""
    return (f % (G // 4)) * (4 * _V) + (f // (G // 4)) * _V


@jit
def _gemv_code(words, words_sh, hi, tab_ptr, magic, g: tl.constexpr, FMT: tl.constexpr, B: tl.constexpr,
               H: tl.constexpr, SH: tl.constexpr):
    """Field g of the words as float32 code * 2^pos (pos = _pos(...)), offsets not applied: the GEMV's
    per-weight work. The code is masked where it lies instead of shifted down (one LOP3 with the magic OR
    folded in: `magic` is a runtime argument so the compiler keeps it in a register); the activations it
    multiplies are pre-scaled by 2^-pos, once per thread and shared by the thread's rows."""
    if FMT == _IQ4_NL or FMT == _IQ4_XS:
        q = tl.load(tab_ptr + ((words >> (4 * g)) & 0xF))
    else:
        src = words if _direct(B, H, g) else words_sh
        c = src & (((1 << B) - 1) << _pos(B, H, SH, g))
        c = c | magic  # before the high bits: (src & mask) | magic is one LOP3, so is (h & mask) | c
        if H > 0:  # the high bits of field g sit at H*g of its qh element: move them above the low bits
            c = c | (shift(hi, _pos(B, H, SH, g) + B - H * g) & (((1 << H) - 1) << (_pos(B, H, SH, g) + B)))
        q = c.to(tl.float32, bitcast=True) - 8388608.0
    return q


@jit
def _gemv_kernel(x_ptr, y_ptr, b_ptr, qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, tab_ptr, qh32_ptr, N, stride_x,
                 magic, KW: tl.constexpr, SUBS: tl.constexpr, M: tl.constexpr, MX: tl.constexpr, FMT: tl.constexpr,
                 G: tl.constexpr, WPB: tl.constexpr, GPS: tl.constexpr, SPG: tl.constexpr,
                 HAS_QH: tl.constexpr, HAS_DM: tl.constexpr, HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr,
                 H: tl.constexpr, SH: tl.constexpr, OFFSET: tl.constexpr, GMIN: tl.constexpr,
                 BN: tl.constexpr, W: tl.constexpr, SPLIT_K: tl.constexpr, NIT: tl.constexpr,
                 DOT: tl.constexpr, IEEE: tl.constexpr):
    """y (M, N) = x (M, K) @ w.T for BN rows per program; with SPLIT_K > 1, float32 partials (SPLIT_K, M, N).

    Without DOT: words as (BN, NG, V) tiles, one field at a time (`_gemv_code`), partial sums per field
    p (BN, [MX,] NG, V), scales applied per sub-block to their sum over V, accumulator (BN, [MX,] NG).
    Offsets (Q4_0's -8, ...) and mins go through sum(x) (GMIN). DOT: dense (BN, W*G) tiles in x's dtype,
    multiplied on the tensor cores (MX >= 16).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BN + tl.arange(0, BN)
    r = rows.to(tl.int64)[:, None]                                     # (BN, 1)
    rmask = (rows < N)[:, None]
    mi = tl.arange(0, MX)
    FPS: tl.constexpr = G // SPG                                       # fields per sub-block
    if DOT:
        acc = tl.zeros((MX, BN), dtype=tl.float32)
    elif MX == 1:
        acc = tl.zeros((BN, W // _V), dtype=tl.float32)
    else:
        acc = tl.zeros((BN, MX, W // _V), dtype=tl.float32)
    for it in range(0, NIT):  # splits interleave: split s takes K steps s, s + SPLIT_K, ...
        kw0 = (pid_k + it * SPLIT_K) * W
        if DOT:
            ng = kw0 // _V + tl.arange(0, W // _V)                     # (NG,)
            wt, _ = dense_tile(qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, tab_ptr, r[:, :, None, None],
                               rmask[:, :, None, None], ng, KW, SUBS, FMT, G, WPB, GPS, SPG, HAS_QH, HAS_DM,
                               HAS_MIN)
            w2 = tl.reshape(wt, (BN, W * G)).to(x_ptr.dtype.element_ty)                      # (BN, BK)
            xk = tl.reshape((ng * (G * _V))[:, None, None] + _fo_t(tl.arange(0, G), G)[None, :, None]
                            + tl.arange(0, _V)[None, None, :], (W * G,))   # the weights' order in w2
            x2 = tl.load(x_ptr + mi[:, None] * stride_x + xk[None, :],
                         mask=(mi < M)[:, None] & (xk < KW * G)[None, :], other=0.0)         # (MX, BK)
            if IEEE:
                acc = tl.dot(x2, tl.trans(w2), acc, input_precision="ieee")
            else:
                acc = tl.dot(x2, tl.trans(w2), acc)                                          # (MX, BN)
        else:
            kw = kw0 + tl.arange(0, W)                                 # (W,) word index
            words = tl.reshape(tl.load(qs_ptr + r * KW + kw[None, :], mask=rmask & (kw < KW)[None, :], other=0),
                               (BN, W // _V, _V))                       # (BN, NG, V)
            words_sh = words >> SH
            ng = kw0 // _V + tl.arange(0, W // _V)                     # (NG,) group index
            gmask = rmask & (ng < KW // _V)[None, :]                   # (BN, NG)
            j = tl.arange(0, _V)
            hi = words
            if HAS_QH:
                hi = high_bits(qh32_ptr, r, ng, gmask, KW, G, H)      # (BN, NG, V)
            d, dmn = block_scales(d_ptr, dm_ptr, r, ng[None, :], gmask, KW, WPB, HAS_DM)   # (BN, NG)
            xo = ng[:, None] * (G * _V) + j[None, :]                   # (NG, V) weight under field 0
            xmask = (ng < KW // _V)[:, None] & (j < _V)[None, :]
            for s in tl.static_range(SPG):  # sub-block s of the group holds fields s, s + SPG, ...
                sidx = r * SUBS + ((ng // GPS) * SPG + s)[None, :]
                dl, ml = scales(sc_ptr, mn_ptr, sidx, gmask, d, dmn, FMT)   # (BN, NG)
                if not HAS_MIN:
                    ml = dl * OFFSET  # sum((q - o) * x) = sum(q * x) - o * sum(x)
                for f in tl.static_range(FPS):
                    q = _gemv_code(words, words_sh, hi, tab_ptr, magic, f * SPG + s, FMT, 32 // G, H, SH)
                    if MX == 1:
                        xg = tl.load(x_ptr + xo + _fo(f * SPG + s, G), mask=xmask, other=0.0).to(tl.float32)
                        t = q * (xg * _x_scale(32 // G, H, SH, f * SPG + s, not GMIN))[None, :, :]     # (BN, NG, V)
                    else:
                        xg = tl.load(x_ptr + mi[:, None, None] * stride_x + (xo + _fo(f * SPG + s, G))[None, :, :],
                                     mask=(mi < M)[:, None, None] & xmask[None, :, :], other=0.0).to(tl.float32)
                        t = q[:, None, :, :] * (xg * _x_scale(32 // G, H, SH, f * SPG + s, not GMIN))[None, :, :, :]
                    if f == 0:
                        p = t
                        sx = xg
                    else:
                        p += t
                        sx += xg
                if MX == 1:
                    acc += tl.sum(p, axis=2) * dl                      # (BN, NG)
                    if GMIN:
                        acc -= ml * tl.sum(sx, axis=1)[None, :]
                else:
                    acc += tl.sum(p, axis=3) * dl[:, None, :]          # (BN, MX, NG)
                    if GMIN:
                        acc -= ml[:, None, :] * tl.sum(sx, axis=2)[None, :, :]
    if DOT:
        y = tl.trans(acc)                                              # (BN, MX)
    elif MX == 1:
        y = tl.sum(acc, axis=1)[:, None]                               # (BN, 1)
    else:
        y = tl.sum(acc, axis=2)                                        # (BN, MX)
    store_rows(y, y_ptr, b_ptr, rows, rmask, mi, M, N, pid_k, SPLIT_K, HAS_BIAS)

def gemv(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None, config: GemvConfig) -> torch.Tensor:
    """x (M, K) with 1 <= M <= MAX_M, float32/16 or bfloat16 -> y = x @ W.T (+ bias): (M, N) in x.dtype, launched
    exactly as `config` says (route.float_config makes a partial one launchable). No host sync and no
    data-dependent allocation: graph-capturable once it has run for this shape (Triton compiles on the first call).
    """
    fmt, (n, k) = w.fmt, w.shape
    m = x.shape[0]
    cfg = config
    if x.dim() != 2 or x.shape[1] != k or not 1 <= m <= MAX_M:
        raise ValueError(f"gemv takes x of shape (M <= {MAX_M}, {k}), got {tuple(x.shape)}")
    if cfg.split_k < 1:
        raise ValueError(f"gemv needs a launchable config (split_k >= 1; route.float_config), got {cfg}")
    if cfg.dot and cfg.block_n < 16:
        raise ValueError(f"GemvConfig(dot=True) needs block_n >= 16 (tl.dot tiles), got {cfg.block_n}")
    if x.stride(1) != 1:
        x = x.contiguous()
    geo = geometry(fmt, k, cfg.block_k)
    n_steps = triton.cdiv(geo["KW"], geo["W"])
    split = cfg.split_k
    mx = max(16, triton.next_power_of_2(m)) if cfg.dot else triton.next_power_of_2(m)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    out = y if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    extra = {} if cfg.num_stages is None else dict(num_stages=cfg.num_stages)
    _gemv_kernel[(triton.cdiv(n, cfg.block_n), split)](
        x, out, bias if bias is not None else y, *plane_args(w), qh_words(w), n, x.stride(0), _MAGIC,
        M=m, MX=mx, FMT=w.qtype, HAS_BIAS=bias is not None and split == 1, BN=cfg.block_n, SPLIT_K=split,
        NIT=triton.cdiv(n_steps, split), DOT=cfg.dot, IEEE=x.dtype == torch.float32, num_warps=cfg.num_warps,
        **geo, **gemv_constants(w.qtype), **extra)
    return sum_splits(out, y, bias, split)
