"""A decode step's keys and values into a KV cache stored in its own types and basis, in one kernel.

Owns: `encode_kv` (Triton: the query rotated into the keys' basis; keys less their offset, rotated and
encoded; values rotated and encoded; both written at the step's positions) and `encode_kv_ref` (the same
in torch: kv_types' `Basis` and codecs, then the slots' write), and `Side` (one of keys / values: its type,
its stored parts of one layer, its basis).
Types: a dense float type (the part's dtype), fp8 (e4m3, saturated at ±448: rounded to its grid in float32
arithmetic, then stored — a value on the grid converts exactly on a GPU and in Triton's interpreter, whose own
fp8 rounding is wrong), q8_0 and q4_0 (kv_types' layouts: codes, then a float16 scale per 32 values along D).
Not: RoPE (rope.py, before this), the cache object (cache.py builds the sides), attention over the stored
parts (attention.py), prompts (cache.py's torch writes).

Shape alphabet: B batch, T new tokens, H query heads, K kv heads, D head dim, S cache positions,
N cache rows, W a part's width (D, D/2 for q4_0 codes, D/32 for scales).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kiln.kv_types import Basis, encode
from kiln.ops import pdl
from kiln.ops.dispatch import jit, tl, triton, use_triton
from kiln.ops.rope import write_rows_ref
from kiln.policy import DEFAULT, Policy

_ROWS = 16  # heads a program: the rotation is a (16, D) x (D, D) dot
# The rotation's dots are "ieee" float32 (Basis's x.float() @ h up to the order of the sums): FMA loops whose
# operands each thread holds. Whole rows held in registers: at D = 128 with 4 warps that took 32 registers and
# ~1,800 spills a thread on the H100 (100 µs a call), with 8 warps 174 registers and 7.6 µs, D = 64 with 4 warps
# 2.7 µs (tf32x3 dots spilled as well: 19.9 µs at D = 128); at D = 256 they spill with any warps. Summed over 32
# columns of x at a time in a loop nothing spills, but it measured slower where whole rows fit (13.2 µs at 128,
# 4.1 at 64), so it serves D > 128 only (46.5 µs at D = 256, 8 warps). tests/test_kernels_aot.py runs ptxas -v on
# each form; bench/encode_kv_time.py, bench/results/2026-12-06-h100/.
WHOLE_ROWS_MAX = 128
ROT_PREC = "ieee"


def encode_warps(d: int) -> int:
    """Warps of the encoder's programs (few: one per token and 16 heads): 8 above head dim 64."""
    return 8 if d > 64 else 4


def whole_rows(d: int) -> bool:
    """Does the encoder hold each row whole in registers for the rotation (else it sums 32 columns at a time)?"""
    return triton.next_power_of_2(d) <= WHOLE_ROWS_MAX


_KINDS = {"q8_0": 1, "q4_0": 2, "fp8": 3}  # the kernel's codes; 0: another float type


class Side(NamedTuple):
    """Keys or values of one layer: `kind` (a kv_types cache type), `parts` its stored tensors (N, K, S, W)
    in kv_types.layout's order, `basis` (None: stored in the model's basis) and the `layer` it is for."""
    kind: str
    parts: tuple
    basis: Basis | None
    layer: int


def encode_kv_ref(q, k, v, ks: Side, vs: Side, pos, rows=None) -> torch.Tensor:
    """q (B, T, H, D), k and v (B, T, K, D) (q and k after RoPE); pos (T,) or (B, T) int64; rows (B,) the
    cache row of each batch row (None: row b). Each of k and v is moved into its side's basis (`Basis.into`),
    encoded (`kv_types.encode`) and written at its positions → q in the keys' basis (B, T, H, D)."""
    for side, x in ((ks, k), (vs, v)):
        x = x.transpose(1, 2)  # (B, K, T, D): the basis' layout
        x = x if side.basis is None else side.basis.into(side.layer, x)
        for part, new in zip(side.parts, encode(side.kind, x)):
            write_rows_ref(part, new.transpose(1, 2), pos, rows)
    return q if ks.basis is None else ks.basis.rotate(q)


def encode_kv(q, k, v, ks: Side, vs: Side, pos, rows=None, policy: Policy = DEFAULT) -> torch.Tensor:
    """Same contract as `encode_kv_ref`; one launch (head dim at least 16: the rotation is a dot). Returns q
    itself when the keys are not rotated."""
    if not use_triton(q, policy):
        return encode_kv_ref(q, k, v, ks, vs, pos, rows)
    b, t, h, d = q.shape
    assert d >= 16 and v.shape == k.shape
    kh = k.shape[2]
    rot_q = ks.basis is not None
    qo = torch.empty((b, t, h, d), dtype=q.dtype, device=q.device) if rot_q else q
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    nqb = triton.cdiv(h, _ROWS) if rot_q else 0
    nkb = triton.cdiv(kh, _ROWS)
    offset = ks.basis.offset[ks.layer] if rot_q and ks.basis.offset is not None else None  # (K, D)
    _encode_kernel[(b * t, nqb + 2 * nkb)](
        q, k, v, qo, *_side_args(ks, k), *_side_args(vs, k), offset if offset is not None else k,
        pos, rows if rows is not None else pos, t, h, kh, nqb, nkb, pos.stride(0) if pos.ndim == 2 else 0,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        D=d, K_KIND=_KINDS.get(ks.kind, 0), V_KIND=_KINDS.get(vs.kind, 0), K_ROT=rot_q,
        V_ROT=vs.basis is not None, HAS_OFFSET=offset is not None, HAS_ROWS=rows is not None,
        ROWS=_ROWS, BLOCK_D=triton.next_power_of_2(d), WHOLE=whole_rows(d), DOT_PREC=ROT_PREC,
        num_warps=encode_warps(d), **pdl.launch_kw(q, policy))
    return qo


def _side_args(side: Side, x: torch.Tensor) -> tuple:
    """(codes or values, scales, their row / head / position strides (scales': 0 without), the basis'
    (D, D) matrix) of one side for the kernel; stand-ins (never read) where it has none."""
    codes = side.parts[0]
    scales = side.parts[1] if len(side.parts) > 1 else codes
    strides = scales.stride()[:3] if len(side.parts) > 1 else (0, 0, 0)
    mat = side.basis.h if side.basis is not None else x
    return (codes, scales, mat, codes.stride(0), codes.stride(1), codes.stride(2), *strides)


@jit
def _encode_kernel(q_ptr, k_ptr, v_ptr, qo_ptr,
                   kc_ptr, ks_ptr, kh_ptr, skcb, skch, skcs, sksb, sksh, skss,
                   vc_ptr, vs_ptr, vh_ptr, svcb, svch, svcs, svsb, svsh, svss,
                   off_ptr, pos_ptr, rows_ptr, T, H, KH, NQB, NKB, spb,
                   sqb, sqt, sqh, skb, skt, skh, svb, svt, svh,
                   D: tl.constexpr, K_KIND: tl.constexpr, V_KIND: tl.constexpr, K_ROT: tl.constexpr,
                   V_ROT: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_ROWS: tl.constexpr, ROWS: tl.constexpr,
                   BLOCK_D: tl.constexpr, WHOLE: tl.constexpr, DOT_PREC: tl.constexpr, PDL: tl.constexpr):
    """Program (token bt, block of ROWS heads): the first NQB blocks are query heads (rotated by the keys'
    matrix), the next NKB key heads, the last NKB value heads (each written into its cache at this token's
    row and position). Each row is produced 16 columns at a time (`_cols`: a (D, 16) slice of the matrix against
    the rows held whole (WHOLE), or (32, 16) slices against 32 columns of them at a time), two such halves making
    one block of 32."""
    pdl.start(PDL)
    pdl.wait(PDL)
    bt = tl.program_id(0)
    blk = tl.program_id(1)
    b = (bt // T).to(tl.int64)
    t = bt % T
    if blk < NQB:
        if K_ROT:  # (NQB is 0 without a key basis, and then kh_ptr is a stand-in this branch must not compile for)
            heads = blk * ROWS + tl.arange(0, ROWS)
            x_ptr = q_ptr + b * sqb + t * sqt
            x = _rows(x_ptr, heads, H, sqh, off_ptr, D, False, WHOLE, ROWS, BLOCK_D)
            _encode(x, x_ptr, heads, H, sqh, kh_ptr, off_ptr, qo_ptr + bt.to(tl.int64) * H * D, D, qo_ptr, 0, D, 0,
                    True, False, WHOLE, ROWS, BLOCK_D, DOT_PREC)
    else:
        cb = b  # the cache row this batch row writes (a server's slot), and this token's position
        if HAS_ROWS:
            cb = tl.load(rows_ptr + b).to(tl.int64)
        p = tl.load(pos_ptr + b * spb + t).to(tl.int64)
        if blk < NQB + NKB:  # keys less the layer's offset (K, D) before the rotation (kv_types.Basis.into)
            heads = (blk - NQB) * ROWS + tl.arange(0, ROWS)
            x_ptr = k_ptr + b * skb + t * skt
            x = _rows(x_ptr, heads, KH, skh, off_ptr, D, HAS_OFFSET, WHOLE and K_ROT, ROWS, BLOCK_D)
            _encode(x, x_ptr, heads, KH, skh, kh_ptr, off_ptr, kc_ptr + cb * skcb + p * skcs, skch,
                    ks_ptr + cb * sksb + p * skss, sksh, D, K_KIND, K_ROT, HAS_OFFSET, WHOLE, ROWS, BLOCK_D, DOT_PREC)
        else:
            heads = (blk - NQB - NKB) * ROWS + tl.arange(0, ROWS)
            x_ptr = v_ptr + b * svb + t * svt
            x = _rows(x_ptr, heads, KH, svh, off_ptr, D, False, WHOLE and V_ROT, ROWS, BLOCK_D)
            _encode(x, x_ptr, heads, KH, svh, vh_ptr, off_ptr, vc_ptr + cb * svcb + p * svcs, svch,
                    vs_ptr + cb * svsb + p * svss, svsh, D, V_KIND, V_ROT, False, WHOLE, ROWS, BLOCK_D, DOT_PREC)


@jit
def _rows(x_ptr, heads, n_heads, stride_h, off_ptr, D: tl.constexpr, OFFSET: tl.constexpr, LOAD: tl.constexpr,
          ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Heads (ROWS,) of one token whole, (ROWS, BLOCK_D) float32, less the offset rows with OFFSET; zeros past
    n_heads and D, and everywhere without LOAD (`_cols` then reads what it needs itself)."""
    x = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    if LOAD:
        d = tl.arange(0, BLOCK_D)
        mask = (heads[:, None] < n_heads) & (d[None, :] < D)
        x = tl.load(x_ptr + heads[:, None] * stride_h + d[None, :], mask=mask, other=0.0).to(tl.float32)
        if OFFSET:  # keys less the layer's offset (K, D) before the rotation (kv_types.Basis.into)
            x -= tl.load(off_ptr + heads[:, None] * D + d[None, :], mask=mask, other=0.0)
    return x


@jit
def _cols(x, x_ptr, heads, n_heads, stride_h, m_ptr, off_ptr, cols, D: tl.constexpr, ROT: tl.constexpr,
          OFFSET: tl.constexpr, WHOLE: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
          DOT_PREC: tl.constexpr):
    """Columns `cols` (16) of the rows in the stored basis, (ROWS, 16) float32: x @ M[:, cols] (as Basis does it,
    x.float() @ h) with the rows x held whole (WHOLE), else summed over 32 columns of the rows at x_ptr (less
    the offset rows at off_ptr) at a time; without a rotation the rows' own columns. Zeros past D."""
    hm = heads[:, None] < n_heads
    if ROT:
        if WHOLE:
            d = tl.arange(0, BLOCK_D)
            m = tl.load(m_ptr + d[:, None] * D + cols[None, :], mask=(d[:, None] < D) & (cols[None, :] < D),
                        other=0.0)
            y = tl.dot(x, m, input_precision=DOT_PREC)
        else:
            y = tl.zeros([ROWS, 16], dtype=tl.float32)
            for c in tl.range(BLOCK_D // 32):  # a loop, not unrolled: unrolled, the loads of x stayed live across it
                dk = c * 32 + tl.arange(0, 32)
                xm = hm & (dk[None, :] < D)
                xc = tl.load(x_ptr + heads[:, None] * stride_h + dk[None, :], mask=xm, other=0.0).to(tl.float32)
                if OFFSET:
                    xc -= tl.load(off_ptr + heads[:, None] * D + dk[None, :], mask=xm, other=0.0)
                m = tl.load(m_ptr + dk[:, None] * D + cols[None, :], mask=(dk[:, None] < D) & (cols[None, :] < D),
                            other=0.0)
                y += tl.dot(xc, m, input_precision=DOT_PREC)
    else:
        y = tl.load(x_ptr + heads[:, None] * stride_h + cols[None, :], mask=hm & (cols[None, :] < D),
                    other=0.0).to(tl.float32)
    return y


@jit
def _encode(x, x_ptr, heads, n_heads, stride_h, m_ptr, off_ptr, c_ptr, sch, s_ptr, ssh, D: tl.constexpr,
            KIND: tl.constexpr, ROT: tl.constexpr, OFFSET: tl.constexpr, WHOLE: tl.constexpr, ROWS: tl.constexpr,
            BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """The rows (x held whole, or read at x_ptr; less the offset rows with OFFSET) in the stored basis (`_cols`),
    encoded (kv_types.encode) into codes at c_ptr + head * sch (+ scales at s_ptr + head * ssh): KIND 0 the
    values in the part's dtype, 1 q8_0, 2 q4_0, 3 fp8 e4m3. One block of 32 columns at a time: its low and high
    halves of 16."""
    hm = heads[:, None] < n_heads
    for c in tl.static_range((BLOCK_D + 31) // 32):
        lo_cols = c * 32 + tl.arange(0, 16)
        hi_cols = lo_cols + 16
        lo = _cols(x, x_ptr, heads, n_heads, stride_h, m_ptr, off_ptr, lo_cols, D, ROT, OFFSET, WHOLE, ROWS, BLOCK_D,
                   DOT_PREC)  # (ROWS, 16)
        hi = _cols(x, x_ptr, heads, n_heads, stride_h, m_ptr, off_ptr, hi_cols, D, ROT, OFFSET, WHOLE, ROWS, BLOCK_D,
                   DOT_PREC)
        lo_at = c_ptr + heads[:, None] * sch + lo_cols[None, :]
        hi_at = c_ptr + heads[:, None] * sch + hi_cols[None, :]
        lo_ok = hm & (lo_cols[None, :] < D)
        hi_ok = hm & (hi_cols[None, :] < D)
        if KIND == 0:
            tl.store(lo_at, lo.to(c_ptr.dtype.element_ty), mask=lo_ok)
            tl.store(hi_at, hi.to(c_ptr.dtype.element_ty), mask=hi_ok)
        elif KIND == 3:
            tl.store(lo_at, _e4m3(lo).to(c_ptr.dtype.element_ty), mask=lo_ok)
            tl.store(hi_at, _e4m3(hi).to(c_ptr.dtype.element_ty), mask=hi_ok)
        else:
            amax = tl.maximum(tl.max(tl.abs(lo), axis=1), tl.max(tl.abs(hi), axis=1))  # (ROWS,) the block's
            if KIND == 1:  # q = round(x / d), d = amax / 127
                sc = amax / 127.0
                div = tl.where(sc == 0.0, 1.0, sc)[:, None]
                tl.store(lo_at, _round_clamp(lo / div).to(tl.int8), mask=lo_ok)
                tl.store(hi_at, _round_clamp(hi / div).to(tl.int8), mask=hi_ok)
            else:  # q4_0: d = -max / 8 (max: the signed element of largest magnitude), q = x / d + 8 in 0..15
                m_lo = tl.max(tl.where(tl.abs(lo) == amax[:, None], lo, float("-inf")), axis=1)
                m_hi = tl.max(tl.where(tl.abs(hi) == amax[:, None], hi, float("-inf")), axis=1)
                sc = tl.where(m_lo > float("-inf"), m_lo, m_hi) / -8.0  # the first such element's sign
                div = tl.where(sc == 0.0, 1.0, sc)[:, None]
                # element j of the block in the low nibble of byte j, element j + 16 in the high one
                packed = _nibble(lo / div) + 16 * _nibble(hi / div)
                e = c * 16 + tl.arange(0, 16)
                tl.store(c_ptr + heads[:, None] * sch + e[None, :], packed.to(tl.uint8), mask=lo_ok)
            tl.store(s_ptr + heads * ssh + c, sc.to(s_ptr.dtype.element_ty), mask=(heads < n_heads) & (c * 32 < D))


@jit
def _round_clamp(y):
    """y to the nearest integer (halves away from zero's upper side: floor(y + 0.5); torch.round's ties to even
    differ only on exact halves) within -127..127, float32."""
    return tl.minimum(tl.maximum(tl.floor(y + 0.5), -127.0), 127.0)


@jit
def _nibble(y):
    """A q4_0 code of y = x / d: floor(y + 8.5) within 0..15 (kv_types.quantize_q4_0), int32."""
    return tl.minimum(tl.minimum(tl.maximum(y + 8.5, 0.0), 15.99).to(tl.int32), 15)


@jit
def _e4m3(x):
    """x float32 clamped to ±448 and rounded to the nearest e4m3 value (ties to even), still float32: 3 mantissa
    bits below the exponent, which is at least -6 (smaller values on the subnormal grid of 2^-9)."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    e = ((x.to(tl.int32, bitcast=True) >> 23) & 255) - 127  # the exponent of |x| (x = 0: -127)
    e = tl.maximum(e, -6) - 3  # log2 of the grid's step at x: -9..5
    step = ((e + 127) << 23).to(tl.float32, bitcast=True)  # 2^e, and its inverse: exact products
    inv = ((127 - e) << 23).to(tl.float32, bitcast=True)
    big = 12582912.0  # 1.5 * 2^23: adding it rounds |y| < 2^22 to an integer, ties to even
    r = ((x * inv + big) - big) * step
    return tl.where(r == 0.0, x * 0.0, r)  # a value rounded to zero keeps its sign, as a conversion's does
