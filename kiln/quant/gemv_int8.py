"""The int8-activation kernels: x quantized to int8 per 32 values, dp4a integer dot products with the codes.

Owns: `QuantAct` (x as int8 codes, scales and run sums in the weights' byte-lane order, kiln.ops.q8),
`quantize_act` / `empty_act`, `gemv_int8` (one row: the decode hot path) and `gemm_int8` (2..32 rows: a
server's batched decode step) — llama.cpp's MMVQ arithmetic, relative error ~1e-3 against float x.
Not: routing and configs (route.py), the producers that store x quantized (ops.rms_norm, ops.silu_mul), the
tile helpers (tiles.py), the packed layout (packed.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.ops import pdl
from kiln.ops.dispatch import interpreted, jit, tl, triton
from kiln.ops.q8 import store_q8
from kiln.ops.rope import RopeOut, rotate_halves
from kiln.policy import DEFAULT, Policy
from kiln.quant.packed import FORMATS, V, PackedWeight
from kiln.quant.route import INT8_FORMATS, Q8Config
from kiln.quant.tiles import (OFFSETS, block_scales, const, gemv_constants, geometry, high_bits, plane_args,
                              qh_words, scales, shift)


MAX_ROWS = 32  # activation rows `gemm_int8`'s tiles take (route.MAX_INT8_M sends it at most 8)

_V = const(V)


@jit
def _dp4a(a, b, c, ASM: tl.constexpr):
    """c + sum over the four bytes of a (unsigned) times b (signed): PTX dp4a on the GPU; the same integer
    arithmetic spelled out for the Triton interpreter (which cannot run inline assembly)."""
    if ASM:
        out = tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                        is_pure=True, pack=1)
    else:
        out = c + ((a & 0xFF) * ((b << 24) >> 24) + ((a >> 8) & 0xFF) * ((b << 16) >> 24)
                   + ((a >> 16) & 0xFF) * ((b << 8) >> 24) + ((a >> 24) & 0xFF) * (b >> 24))
    return out


@jit
def _quantize_x_kernel(x_ptr, xq_ptr, xd_ptr, xs_ptr, K, stride_x, BLOCKS: tl.constexpr, PDL: tl.constexpr):
    """x (1, K) -> its int8 codes, scales and run sums (kiln.ops.q8.store_q8: the layout the GEMV reads),
    BLOCKS 32-blocks per program."""
    pdl.start(PDL)
    pdl.wait(PDL)
    blk0 = tl.program_id(0) * BLOCKS
    m = tl.program_id(1).to(tl.int64)                                  # activation row
    idx = blk0 * 32 + tl.arange(0, BLOCKS * 32)
    x = tl.load(x_ptr + m * stride_x + idx, mask=idx < K, other=0.0).to(tl.float32)
    store_q8(x, blk0, K // 32, xq_ptr + m * (K // 4), xd_ptr + m * (K // 32), xs_ptr + m * (K // 16), BLOCKS)


@jit
def _spread(hi, H: tl.constexpr):
    """A word's high bits (field f at bits [H*f, H*f + H)) -> the high bits of the fields of byte position t at
    byte t: for 4-bit codes (8 fields), 2*H bits (fields 2t, 2t + 1); for 2-bit codes (16 fields), 4 bits."""
    if H == 1:
        s = hi & 0xFF
        s = (s | (s << 12)) & 0x000F000F
        s = (s | (s << 6)) & 0x03030303
    else:
        s = hi & 0xFFFF
        s = (s | (s << 8)) & 0x00FF00FF
        s = (s | (s << 4)) & 0x0F0F0F0F
    return s


@jit
def _operand(words, spread, k: tl.constexpr, B: tl.constexpr, H: tl.constexpr):
    """Byte lanes k of the words: the codes of fields k, L + k, 2L + k, 3L + k (L = 8 / B fields per byte) as
    four unsigned bytes, high bits included."""
    if B == 8:
        w = words
    else:
        w = (words >> (B * k)) & (((1 << B) - 1) * 0x01010101)
        if H > 0:
            w = w | (shift(spread, B - H * k) & ((((1 << H) - 1) << B) * 0x01010101))
    return w


@jit
def _q8_weights(qs_ptr, qh32_ptr, d_ptr, dm_ptr, r, rmask, kw0, KW: tl.constexpr, G: tl.constexpr,
                WPB: tl.constexpr, H: tl.constexpr, HAS_QH: tl.constexpr, HAS_DM: tl.constexpr, BN: tl.constexpr,
                W: tl.constexpr):
    """The int8 GEMVs' weight tile of rows r (BN, 1) from word kw0: qs words (BN, NG, V), their high bits
    spread to byte lanes (`_spread`; the words themselves where there are none), the group indices ng (NG,)
    with their masks (NG,) and (BN, NG), and the f16 block scales d and dmin (BN, NG) as float32."""
    kw = kw0 + tl.arange(0, W)
    words = tl.reshape(tl.load(qs_ptr + r * KW + kw[None, :], mask=rmask & (kw < KW)[None, :], other=0),
                       (BN, W // _V, _V))                               # (BN, NG, V)
    ng = kw0 // _V + tl.arange(0, W // _V)                             # (NG,)
    gok = ng < KW // _V
    gmask = rmask & gok[None, :]                                       # (BN, NG)
    spread = words
    if HAS_QH:
        spread = _spread(high_bits(qh32_ptr, r, ng, gmask, KW, G, H), H if G == 8 else 2)
    d, dmn = block_scales(d_ptr, dm_ptr, r, ng[None, :], gmask, KW, WPB, HAS_DM)
    return words, spread, ng, gok, gmask, d, dmn


@jit
def _gemv_q8_kernel(xq_ptr, xd_ptr, xs_ptr, y_ptr, b_ptr, qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, qh32_ptr, N,
                    pos_ptr, inv_ptr, attn_factor, kc_ptr, vc_ptr, skh, sks, NQ, NK, OFF,
                    KW: tl.constexpr, SUBS: tl.constexpr, FMT: tl.constexpr, G: tl.constexpr, WPB: tl.constexpr,
                    GPS: tl.constexpr, SPG: tl.constexpr, HAS_QH: tl.constexpr, HAS_DM: tl.constexpr,
                    HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr, H: tl.constexpr, OFFSET: tl.constexpr,
                    BN: tl.constexpr, W: tl.constexpr, NIT: tl.constexpr, ROPE: tl.constexpr, HD: tl.constexpr,
                    ASM: tl.constexpr, PDL: tl.constexpr):
    """y (1, N) = x @ w.T with x given as int8 codes (`_quantize_x_kernel`); program p: rows p·BN.. (`_gemv_rows`;
    with ROPE, rows OFF.. of a joined q | k | v rotated and stored where the decode step reads them)."""
    pdl.start(PDL)
    _gemv_rows(tl.program_id(0), xq_ptr, xd_ptr, xs_ptr, y_ptr, b_ptr, qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr,
               qh32_ptr, N, pos_ptr, inv_ptr, attn_factor, kc_ptr, vc_ptr, skh, sks, NQ, NK, OFF, KW, SUBS, FMT, G, WPB,
               GPS, SPG, HAS_QH, HAS_DM, HAS_MIN, HAS_BIAS, H, OFFSET, BN, W, NIT, ROPE, HD, ASM, PDL)


@jit
def _gemv_q8_pair_kernel(xq_ptr, xd_ptr, xs_ptr, P0,
                         y0, b0, qs0, qh0, sc0, mn0, d0, dm0, qh320, N0,
                         y1, b1, qs1, qh1, sc1, mn1, d1, dm1, qh321, N1,
                         pos_ptr, inv_ptr, attn_factor, kc_ptr, vc_ptr, skh, sks, NQ, NK,
                         KW0: tl.constexpr, SUBS0: tl.constexpr, FMT0: tl.constexpr, G0: tl.constexpr,
                         WPB0: tl.constexpr, GPS0: tl.constexpr, SPG0: tl.constexpr, HAS_QH0: tl.constexpr,
                         HAS_DM0: tl.constexpr, HAS_MIN0: tl.constexpr, HAS_BIAS0: tl.constexpr, H0: tl.constexpr,
                         OFFSET0: tl.constexpr, BN0: tl.constexpr, W0: tl.constexpr, NIT0: tl.constexpr,
                         KW1: tl.constexpr, SUBS1: tl.constexpr, FMT1: tl.constexpr, G1: tl.constexpr,
                         WPB1: tl.constexpr, GPS1: tl.constexpr, SPG1: tl.constexpr, HAS_QH1: tl.constexpr,
                         HAS_DM1: tl.constexpr, HAS_MIN1: tl.constexpr, HAS_BIAS1: tl.constexpr, H1: tl.constexpr,
                         OFFSET1: tl.constexpr, BN1: tl.constexpr, W1: tl.constexpr, NIT1: tl.constexpr,
                         ROPE: tl.constexpr, HD: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr):
    """Two weights of one x in one launch (`gemv_int8_pair`): programs 0..P0-1 compute weight 0's rows, the rest
    weight 1's, each as `_gemv_q8_kernel` would with its own format and launch constants."""
    pdl.start(PDL)
    pid = tl.program_id(0)
    if pid < P0:
        _gemv_rows(pid, xq_ptr, xd_ptr, xs_ptr, y0, b0, qs0, qh0, sc0, mn0, d0, dm0, qh320, N0, pos_ptr, inv_ptr,
                   attn_factor, kc_ptr, vc_ptr, skh, sks, NQ, NK, 0, KW0, SUBS0, FMT0, G0, WPB0, GPS0, SPG0, HAS_QH0,
                   HAS_DM0, HAS_MIN0, HAS_BIAS0, H0, OFFSET0, BN0, W0, NIT0, ROPE, HD, ASM, PDL)
    else:
        _gemv_rows(pid - P0, xq_ptr, xd_ptr, xs_ptr, y1, b1, qs1, qh1, sc1, mn1, d1, dm1, qh321, N1, pos_ptr, inv_ptr,
                   attn_factor, kc_ptr, vc_ptr, skh, sks, NQ, NK, N0, KW1, SUBS1, FMT1, G1, WPB1, GPS1, SPG1, HAS_QH1,
                   HAS_DM1, HAS_MIN1, HAS_BIAS1, H1, OFFSET1, BN1, W1, NIT1, ROPE, HD, ASM, PDL)


@jit
def _gemv_rows(pid, xq_ptr, xd_ptr, xs_ptr, y_ptr, b_ptr, qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, qh32_ptr, N,
               pos_ptr, inv_ptr, attn_factor, kc_ptr, vc_ptr, skh, sks, NQ, NK, OFF,
               KW: tl.constexpr, SUBS: tl.constexpr, FMT: tl.constexpr, G: tl.constexpr, WPB: tl.constexpr,
               GPS: tl.constexpr, SPG: tl.constexpr, HAS_QH: tl.constexpr, HAS_DM: tl.constexpr,
               HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr, H: tl.constexpr, OFFSET: tl.constexpr,
               BN: tl.constexpr, W: tl.constexpr, NIT: tl.constexpr, ROPE: tl.constexpr, HD: tl.constexpr,
               ASM: tl.constexpr, PDL: tl.constexpr):
    """Rows pid·BN.. of y (1, N) = x @ w.T, x as int8 codes: per word of weights, one dp4a per byte position
    (4 weights of one 16-run), integer sums per sub-block, then
    sum(w * x) = dx * (dl * (sum(q * qx) - OFFSET * sum(qx)) - ml * sum(qx)) per sub-block.
    BN rows walk K in steps of W words as (BN, NG, V) tiles; no split-K. With PDL the first step's weights are
    requested before waiting for the kernel that wrote x (kiln.ops.pdl).
    ROPE: these rows are OFF.. of a joined q | k | v of head dim HD (`_rope_store`); the BN rows of a program
    are then two runs of BN/2 in one head, HD/2 apart, so that it holds both halves of each rotated pair."""
    B: tl.constexpr = 32 // G
    L: tl.constexpr = 8 // B                                           # fields per byte = byte lanes per word
    RUNS: tl.constexpr = G * _V // 16                                  # 16-runs per group (== L)
    if ROPE:  # the head starting at row `head`, dims half0.. and half0 + HD/2.. (half0 = (pid·BN) % HD / 2)
        head = (pid * BN) // HD * HD
        half0 = (pid * BN) % HD // 2
        t = tl.arange(0, BN)
        dim = half0 + t // (BN // 2) * (HD // 2) + t % (BN // 2)       # (BN,) within the head
        rows = head + dim
    else:
        rows = pid * BN + tl.arange(0, BN)
    r = rows.to(tl.int64)[:, None]                                     # (BN, 1)
    rmask = (rows < N)[:, None]
    j = tl.arange(0, _V)
    acc = tl.zeros((BN, W // _V), dtype=tl.float32)
    for it in range(0, NIT):
        words, spread, ng, gok, gmask, d, dmn = _q8_weights(qs_ptr, qh32_ptr, d_ptr, dm_ptr, r, rmask, it * W, KW,
                                                            G, WPB, H, HAS_QH, HAS_DM, BN, W)
        if it == 0:  # the weights above need nothing from earlier kernels; x does
            pdl.wait(PDL)
        xmask = gok[:, None] & (j < _V)[None, :]
        isum = tl.zeros((BN, W // _V, _V), dtype=tl.int32)
        ssum = tl.zeros((W // _V,), dtype=tl.int32)
        for k in tl.static_range(L):
            run = ng * RUNS + k                                        # (NG,) the 16-run of byte lanes k
            xk = tl.load(xq_ptr + run[:, None] * _V + j[None, :], mask=xmask, other=0)      # (NG, V)
            sk = tl.load(xs_ptr + run, mask=gok, other=0)              # (NG,)
            wk = _operand(words, spread, k, B, H)
            if SPG == 1:  # one sub-block (and one x block) for every lane of the group: chain the sums
                isum = _dp4a(wk, xk[None, :, :], isum, ASM)
                ssum += sk
            else:  # lanes k are sub-block k (16 weights); x blocks are 32
                dx = tl.load(xd_ptr + (ng * RUNS + k) // 2, mask=gok, other=0.0)               # (NG,)
                dl, ml = scales(sc_ptr, mn_ptr, r * SUBS + (ng * SPG + k)[None, :], gmask, d, dmn, FMT)
                dot = tl.sum(_dp4a(wk, xk[None, :, :], tl.zeros_like(words), ASM), axis=2)   # (BN, NG)
                if HAS_MIN:
                    acc += (dl * dot.to(tl.float32) - ml * sk.to(tl.float32)[None, :]) * dx[None, :]
                else:
                    acc += dl * (dot - OFFSET * sk[None, :]).to(tl.float32) * dx[None, :]
        if SPG == 1:
            dx = tl.load(xd_ptr + (ng * RUNS) // 2, mask=gok, other=0.0)                      # (NG,)
            dl, ml = scales(sc_ptr, mn_ptr, r * SUBS + (ng // GPS)[None, :], gmask, d, dmn, FMT)
            dot = tl.sum(isum, axis=2)                                 # (BN, NG)
            if HAS_MIN:
                acc += (dl * dot.to(tl.float32) - ml * ssum.to(tl.float32)[None, :]) * dx[None, :]
            else:
                acc += dl * (dot - OFFSET * ssum[None, :]).to(tl.float32) * dx[None, :]
    y = tl.sum(acc, axis=1)                                            # (BN,)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
    if ROPE:
        _rope_store(y.to(y_ptr.dtype.element_ty), rows, dim, OFF + head, half0, y_ptr, pos_ptr, inv_ptr, attn_factor,
                    kc_ptr, vc_ptr, skh, sks, NQ, NK, BN, HD)
    else:
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N)


@jit
def _rope_store(y, rows, dim, head0, half0, y_ptr, pos_ptr, inv_ptr, attn_factor, kc_ptr, vc_ptr, skh, sks, NQ, NK,
                BN: tl.constexpr, HD: tl.constexpr):
    """The q/k/v GEMV's epilogue in a one-token decode step: y (BN,) at rows of one head, rounded to the model's
    dtype as the projection stores it: dims `dim` = half0.. and half0 + HD/2.. of the head whose first row is head0 of
    the joined output (q: [0, NQ), k: [NQ, NQ + NK), v after). q and k are rotated at the position pos_ptr
    holds (rope.py's `rotate_halves`: the rope kernel's arithmetic), q stored to y, k and v into the layer's
    caches (kv head h at that position: kc_ptr + h·skh + pos·sks), where the decode attention reads them."""
    tl.static_assert(BN % 2 == 0 and HD % BN == 0, "a program's rows are pairs within one head")
    p = tl.load(pos_ptr)
    y1, y2 = tl.split(tl.permute(tl.reshape(y, (2, BN // 2)), (1, 0)))  # dims i and i + HD/2
    f = p.to(tl.float32) * tl.load(inv_ptr + half0 + tl.arange(0, BN // 2))
    o1, o2 = rotate_halves(y1[None, :], y2[None, :], tl.zeros([1, 1], dtype=tl.float32), inv_ptr,
                           tl.cos(f) * attn_factor, tl.sin(f) * attn_factor, 0.0, BN // 2, False, False, BN // 2)
    rot = tl.reshape(tl.permute(tl.join(tl.reshape(o1, (BN // 2,)), tl.reshape(o2, (BN // 2,))), (1, 0)), (BN,))
    if head0 < NQ:
        tl.store(y_ptr + rows, rot)
    elif head0 < NQ + NK:
        tl.store(kc_ptr + (head0 - NQ) // HD * skh + p * sks + dim, rot.to(kc_ptr.dtype.element_ty))
    else:
        tl.store(vc_ptr + (head0 - NQ - NK) // HD * skh + p * sks + dim, y.to(vc_ptr.dtype.element_ty))


@jit
def _gemm_q8_kernel(xq_ptr, xd_ptr, xs_ptr, y_ptr, b_ptr, qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, qh32_ptr, N,
                    KW: tl.constexpr, SUBS: tl.constexpr, FMT: tl.constexpr, G: tl.constexpr, WPB: tl.constexpr,
                    GPS: tl.constexpr, SPG: tl.constexpr, HAS_QH: tl.constexpr, HAS_DM: tl.constexpr,
                    HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr, H: tl.constexpr, OFFSET: tl.constexpr,
                    M: tl.constexpr, MX: tl.constexpr, BN: tl.constexpr, W: tl.constexpr, NIT: tl.constexpr,
                    ASM: tl.constexpr, PDL: tl.constexpr):
    """y (M, N) = x @ w.T for 2 <= M <= 32 rows of x given as int8 codes (quantize_act): `_gemv_q8_kernel`
    with an activation-row axis — each weight word's byte lanes are unpacked once and meet every row of x
    in a dp4a — for a server's batched decode step. Tiles (BN, MX, NG, V)."""
    B: tl.constexpr = 32 // G
    L: tl.constexpr = 8 // B
    RUNS: tl.constexpr = G * _V // 16
    KX: tl.constexpr = KW * G                                          # weights per row = x values per row
    pdl.start(PDL)
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    r = rows.to(tl.int64)[:, None]                                     # (BN, 1)
    rmask = (rows < N)[:, None]
    mi = tl.arange(0, MX)
    mok = mi < M
    j = tl.arange(0, _V)
    acc = tl.zeros((BN, MX, W // _V), dtype=tl.float32)
    for it in range(0, NIT):
        words, spread, ng, gok, gmask, d, dmn = _q8_weights(qs_ptr, qh32_ptr, d_ptr, dm_ptr, r, rmask, it * W, KW,
                                                            G, WPB, H, HAS_QH, HAS_DM, BN, W)
        if it == 0:
            pdl.wait(PDL)
        xmask = mok[:, None, None] & gok[None, :, None] & (j < _V)[None, None, :]          # (MX, NG, V)
        smask = mok[:, None] & gok[None, :]                                                # (MX, NG)
        isum = tl.zeros((BN, MX, W // _V, _V), dtype=tl.int32)
        ssum = tl.zeros((MX, W // _V), dtype=tl.int32)
        for k in tl.static_range(L):
            run = ng * RUNS + k
            xk = tl.load(xq_ptr + mi[:, None, None] * (KX // 4) + (run[:, None] * _V + j[None, :])[None, :, :],
                         mask=xmask, other=0)                                              # (MX, NG, V)
            sk = tl.load(xs_ptr + mi[:, None] * (KX // 16) + run[None, :], mask=smask, other=0)  # (MX, NG)
            wk = _operand(words, spread, k, B, H)[:, None, :, :]                             # (BN, 1, NG, V)
            if SPG == 1:
                isum = _dp4a(wk, xk[None, :, :, :], isum, ASM)
                ssum += sk
            else:
                dx = tl.load(xd_ptr + mi[:, None] * (KX // 32) + ((ng * RUNS + k) // 2)[None, :], mask=smask,
                             other=0.0)                                                    # (MX, NG)
                dl, ml = scales(sc_ptr, mn_ptr, r * SUBS + (ng * SPG + k)[None, :], gmask, d, dmn, FMT)
                dot = tl.sum(_dp4a(wk, xk[None, :, :, :], tl.zeros_like(isum), ASM), axis=3)  # (BN, MX, NG)
                if HAS_MIN:
                    acc += (dl[:, None, :] * dot.to(tl.float32) - ml[:, None, :] * sk.to(tl.float32)[None]) * dx[None]
                else:
                    acc += dl[:, None, :] * (dot - OFFSET * sk[None]).to(tl.float32) * dx[None]
        if SPG == 1:
            dx = tl.load(xd_ptr + mi[:, None] * (KX // 32) + ((ng * RUNS) // 2)[None, :], mask=smask, other=0.0)
            dl, ml = scales(sc_ptr, mn_ptr, r * SUBS + (ng // GPS)[None, :], gmask, d, dmn, FMT)
            dot = tl.sum(isum, axis=3)                                 # (BN, MX, NG)
            if HAS_MIN:
                acc += (dl[:, None, :] * dot.to(tl.float32) - ml[:, None, :] * ssum.to(tl.float32)[None]) * dx[None]
            else:
                acc += dl[:, None, :] * (dot - OFFSET * ssum[None]).to(tl.float32) * dx[None]
    y = tl.sum(acc, axis=2)                                            # (BN, MX)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + mi[None, :] * N + rows[:, None], y.to(y_ptr.dtype.element_ty), mask=rmask & mok[None, :])


@dataclass
class QuantAct:
    """Activation rows x (M, K) as the int8 GEMV reads them (`_quantize_x_kernel`): codes xq (K/4,) int32,
    scales xd (K/32,) float32, code sums per 16-run xs (K/16,) int32 — each (M, ·) for M > 1; `dtype` is x's,
    the GEMV's output's."""

    xq: torch.Tensor
    xd: torch.Tensor
    xs: torch.Tensor
    dtype: torch.dtype
    filled: bool = False  # set by a producer that fills the buffers only where it can (ops.decode_attention)

    @property
    def k(self) -> int:
        return self.xq.shape[-1] * 4

    @property
    def m(self) -> int:
        return 1 if self.xq.dim() == 1 else self.xq.shape[0]

    @property
    def buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.xq, self.xd, self.xs


def quantize_act(x: torch.Tensor, policy: Policy = DEFAULT) -> QuantAct:
    """x (M, K) or (K,), K a multiple of 32 -> QuantAct (one launch), for every int8 GEMV that reads x."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    if k % 32:
        raise ValueError(f"quantize_act needs K a multiple of 32, got {k}")
    a = empty_act(k, x.dtype, x.device, m)
    blocks = 8
    _quantize_x_kernel[(triton.cdiv(k // 32, blocks), m)](x2, a.xq, a.xd, a.xs, k, x2.stride(0), BLOCKS=blocks,
                                                           num_warps=2, **pdl.launch_kw(x2, policy))
    return a


def empty_act(k: int, dtype: torch.dtype, device, m: int = 1) -> QuantAct:
    """Buffers for m quantized activation rows of k values (k a multiple of 32): 1-D for one row (which a
    producer kernel — ops.rms_norm / silu_mul with `q8=act.buffers` — may fill), (m, ·) otherwise."""
    shape = (lambda n: (n,)) if m == 1 else (lambda n: (m, n))
    return QuantAct(torch.empty(shape(k // 4), dtype=torch.int32, device=device),
                    torch.empty(shape(k // 32), dtype=torch.float32, device=device),
                    torch.empty(shape(k // 16), dtype=torch.int32, device=device), dtype)


def _check(act: QuantAct, w: PackedWeight, rows: range) -> None:
    if w.qtype not in INT8_FORMATS or act.k != w.shape[1] or act.m not in rows:
        raise ValueError(f"{w.fmt.name} weight of shape {w.shape} with {act.m} quantized rows of {act.k}: the int8 "
                         f"kernels take {rows.start}..{rows.stop - 1} rows of K and the formats "
                         f"{sorted(FORMATS[q].name for q in INT8_FORMATS)}")


def _rope_args(rope: RopeOut | None, stand_in: torch.Tensor) -> tuple[list, dict]:
    """The int8 GEMVs' epilogue arguments and constants for `rope` (stand_in's pointer where there is none)."""
    if rope is None:
        return [stand_in, stand_in, 1.0, stand_in, stand_in, 0, 0, 0, 0], dict(ROPE=False, HD=2)
    kc, vc = rope.k_cache, rope.v_cache
    assert kc.stride() == vc.stride() and kc.stride(-1) == 1 and kc.shape[0] == 1
    return ([rope.pos, rope.inv_freq, float(rope.attn_factor), kc, vc, kc.stride(1), kc.stride(2), rope.n_q,
             kc.shape[1] * kc.shape[3]], dict(ROPE=True, HD=kc.shape[3]))


def gemv_int8(act: QuantAct, w: PackedWeight, bias: torch.Tensor | None, config: Q8Config,
              policy: Policy = DEFAULT, rope: RopeOut | None = None, offset: int = 0) -> torch.Tensor:
    """One quantized row of x (`quantize_act`) -> y = x @ W.T (+ bias): (1, N) in act.dtype, through
    `_gemv_q8_kernel` launched as `config` says (route.q8_config); PDL as the policy allows. Graph-capturable.
    `rope`: W's rows are rows offset.. of a joined q | k | v (RopeOut; config must `fit`); y then holds the
    rotated q rows only."""
    _check(act, w, range(1, 2))
    r_args, r_consts = _rope_args(rope, act.xq)
    return _launch(_gemv_q8_kernel, act, w, bias, config, policy, tail=(*r_args, offset), **r_consts)


def gemm_int8(act: QuantAct, w: PackedWeight, bias: torch.Tensor | None, config: Q8Config,
              policy: Policy = DEFAULT) -> torch.Tensor:
    """M = 2..32 quantized rows of x -> y = x @ W.T (+ bias): (M, N) in act.dtype, through `_gemm_q8_kernel`
    launched as `config` says (route.q8_rows_config); PDL as the policy allows. Graph-capturable."""
    _check(act, w, range(2, MAX_ROWS + 1))
    return _launch(_gemm_q8_kernel, act, w, bias, config, policy, M=act.m, MX=triton.next_power_of_2(act.m))


def gemv_int8_pair(act: QuantAct, w0: PackedWeight, w1: PackedWeight, b0: torch.Tensor | None,
                   b1: torch.Tensor | None, c0: Q8Config, c1: Q8Config, policy: Policy = DEFAULT,
                   rope: RopeOut | None = None) -> torch.Tensor:
    """One quantized row of x against two weights of its K columns in one launch (a joined q/k/v whose parts
    differ in format: two launches' tails and waits become one): y (1, N0 + N1) = [x @ W0.T + b0 | x @ W1.T + b1]
    in act.dtype, each weight's rows as `gemv_int8` with its config computes them (the configs' warps and stages
    must agree); `rope` as gemv_int8's, W0's rows first."""
    _check(act, w0, range(1, 2))
    _check(act, w1, range(1, 2))
    if (c0.num_warps, c0.num_stages) != (c1.num_warps, c1.num_stages):
        raise ValueError(f"one launch takes one num_warps / num_stages, got {c0} and {c1}")
    n0, n1 = w0.shape[0], w1.shape[0]
    y = torch.empty((1, n0 + n1), dtype=act.dtype, device=act.xq.device)
    (a0, k0), (a1, k1) = _weight_args(w0, b0, c0, y[:, :n0]), _weight_args(w1, b1, c1, y[:, n0:])
    extra = {} if c0.num_stages is None else dict(num_stages=c0.num_stages)
    p0 = triton.cdiv(n0, c0.block_n)
    r_args, r_consts = _rope_args(rope, y)
    _gemv_q8_pair_kernel[(p0 + triton.cdiv(n1, c1.block_n),)](
        *act.buffers, p0, *a0, *a1, *r_args, **r_consts, **{f"{key}0": v for key, v in k0.items()},
        **{f"{key}1": v for key, v in k1.items()}, ASM=not interpreted(), num_warps=c0.num_warps, **extra,
        **pdl.launch_kw(act.xq, policy))
    return y


def _weight_args(w: PackedWeight, bias: torch.Tensor | None, config: Q8Config, y: torch.Tensor) -> tuple[list, dict]:
    """An int8 kernel's arguments for weight w writing y: the pointers and row count, and the constants."""
    fmt, (n, k) = w.fmt, w.shape
    geo = dict(geometry(fmt, k, V * fmt.g), W=config.words)
    qs, qh, sc, mn, d, dm, _ = plane_args(w)
    args = [y, bias if bias is not None else y, qs, qh, sc, mn, d, dm, qh_words(w), n]
    return args, dict(FMT=w.qtype, HAS_BIAS=bias is not None, H=gemv_constants(w.qtype)["H"],
                      OFFSET=OFFSETS.get(w.qtype, 0), BN=config.block_n, NIT=triton.cdiv(geo["KW"], config.words),
                      **geo)


def _launch(kernel, act: QuantAct, w: PackedWeight, bias: torch.Tensor | None, config: Q8Config, policy: Policy,
            tail: tuple = (), **rows) -> torch.Tensor:
    """One int8 kernel over every row of act, config.block_n weight rows per program; `tail`: the kernel's
    arguments after the weight's (the one-row kernel's epilogue, gemv_int8), `rows` its other constants."""
    n = w.shape[0]
    y = torch.empty((act.m, n), dtype=act.dtype, device=act.xq.device)
    args, consts = _weight_args(w, bias, config, y)
    extra = {} if config.num_stages is None else dict(num_stages=config.num_stages)
    kernel[(triton.cdiv(n, config.block_n),)](
        *act.buffers, *args, *tail, ASM=not interpreted(), num_warps=config.num_warps, **consts, **rows, **extra,
        **pdl.launch_kw(act.xq, policy))
    return y
