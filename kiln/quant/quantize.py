"""Quantize float weights into GGUF blocks: `quantize(x, qtype) -> (rows, row_bytes) uint8`.

Owns: kiln's own quantizers, vectorized in torch over all blocks of a tensor (on whatever device `x` is):
F32, F16, BF16; Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 byte-identical to gguf-py's `gguf.quants.quantize`; Q4_K,
Q5_K, Q6_K following llama.cpp's reference quantizers (`quantize_row_q4_K_ref`, `make_qkx2_quants`,
`make_qx_quants`, `quantize_row_q6_K_ref` in ggml-quants.c), byte-identical to llama.cpp's
`ggml_quantize_chunk` without an importance matrix.
Not: block layouts for reading (legacy.py, kquants.py, the `dequantize_*` there), choosing a type per
tensor, or writing files (kiln/convert.py).

Byte identity needs llama.cpp's float operations in its order, in float32: every sum over a block's
weights runs sequentially (`_seqsum`, one vectorized add per position, as the C loop adds), products are
rounded before they are added (no fused multiply-add), and `_nearest_int` is ggml's `nearest_int`
(add 1.5 * 2^23, keep the mantissa bits: round half to even).
"""

import gguf
import torch

from kiln.errors import KilnError

__all__ = ["QUANTIZABLE", "quantize"]

_T = gguf.GGMLQuantizationType
_F32 = torch.float32


def _f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=_F32)


def _rdiv(a: float, t: torch.Tensor) -> torch.Tensor:
    """a / t rounded once (torch's `a / t` is `a * (1 / t)`, rounded twice)."""
    return torch.div(torch.tensor(a, dtype=_F32, device=t.device), t)


def _positive(t: torch.Tensor) -> torch.Tensor:
    """t where t > 0, else +0 (a C running maximum started at 0: never -0)."""
    return torch.where(t > 0, t, torch.zeros_like(t))


def _f16_bytes(v: torch.Tensor) -> torch.Tensor:
    """float32 (N, 1) rounded to f16 (round to nearest even, as GGML_FP32_TO_FP16) as (N, 2) uint8."""
    return v.to(torch.float16).view(torch.uint8).reshape(v.shape[0], 2)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, 2k) values 0..15 -> (N, k) bytes: weight j in the low nibble of byte j, weight j+k in the high."""
    k = q.shape[-1] // 2
    return q[..., :k] | (q[..., k:] << 4)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(N, 8m) values 0/1 -> (N, m) bytes, bit i of byte b = value 8b + i (little bit order)."""
    b = bits.reshape(bits.shape[0], -1, 8).to(torch.uint8)
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return (b << shifts).sum(-1, dtype=torch.uint8)


# ---- plain floats ------------------------------------------------------------------------------------

def _quantize_f32(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.uint8)


def _quantize_f16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).contiguous().view(torch.uint8)


def _quantize_bf16(x: torch.Tensor) -> torch.Tensor:
    # ggml_compute_fp32_to_bf16: NaN forced quiet, else round to nearest even on the top 16 bits.
    n = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    nan = (n & 0x7FFFFFFF) > 0x7F800000
    n = torch.where(nan, (n & 0xFFFF0000) | (64 << 16), n)
    n = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
    return n.to(torch.int32).to(torch.int16).view(torch.uint8).reshape(x.shape[0], -1)


# ---- legacy 32-weight blocks: gguf-py's float operations, in its order ---------------------------------

def _absmax_signed(b: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude in each block (the first of equals): (N, 1)."""
    return b.gather(-1, b.abs().argmax(-1, keepdim=True))


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _quantize_q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _absmax_signed(b) / -8
    q = torch.trunc(b * _inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _pack_nibbles(q)], -1)


def _quantize_q4_1(b: torch.Tensor) -> torch.Tensor:
    mx, mn = b.amax(-1, keepdim=True), b.amin(-1, keepdim=True)
    d = (mx - mn) / 15
    q = torch.trunc((b - mn) * _inverse(d) + 0.5).clamp(0, 15).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _f16_bytes(mn), _pack_nibbles(q)], -1)


def _five_bit_fields(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q5 codes (N, 32) 0..31 -> qh (N, 4) (bit j = code j's 5th bit), qs (N, 16) low nibbles."""
    return _pack_bits(q >> 4), _pack_nibbles(q & 0x0F)


def _quantize_q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _absmax_signed(b) / -16
    q = torch.trunc(b * _inverse(d) + 16.5).clamp(0, 31).to(torch.uint8)
    qh, qs = _five_bit_fields(q)
    return torch.cat([_f16_bytes(d), qh, qs], -1)


def _quantize_q5_1(b: torch.Tensor) -> torch.Tensor:
    mx, mn = b.amax(-1, keepdim=True), b.amin(-1, keepdim=True)
    d = (mx - mn) / 31
    q = torch.trunc((b - mn) * _inverse(d) + 0.5).clamp(0, 31).to(torch.uint8)
    qh, qs = _five_bit_fields(q)
    return torch.cat([_f16_bytes(d), _f16_bytes(mn), qh, qs], -1)


def _quantize_q8_0(b: torch.Tensor) -> torch.Tensor:
    d = b.abs().amax(-1, keepdim=True) / 127
    v = b * _inverse(d)
    a = v.abs()
    fl = torch.floor(a)
    q = torch.sign(v) * (fl + torch.floor(2 * (a - fl)))          # roundf: half away from zero
    return torch.cat([_f16_bytes(d), q.to(torch.int8).view(torch.uint8)], -1)


# ---- K-quants (256-weight super-blocks): llama.cpp's reference quantizers --------------------------------

_MAGIC = 12582912.0  # 1.5 * 2^23


def _nearest_int(f: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: round half to even through the float32 mantissa, as int32."""
    return ((f + _MAGIC).view(torch.int32) & 0x007FFFFF) - 0x00400000


def _seqsum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim in index order, one rounding per add, as a C loop sums: (..., 1)."""
    acc = t[..., 0:1].clone()
    for i in range(1, t.shape[-1]):
        acc = acc + t[..., i:i + 1]
    return acc


def _make_qkx2_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                      nstep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_qkx2_quants (use_mad false) on every row of x (G, n): (scale (G,1), -min (G,1), L (G,n) int32)."""
    mn = x.amin(-1, keepdim=True).clamp(max=0)
    mx = x.amax(-1, keepdim=True)
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)
    flat = mx == mn
    rng = torch.where(flat, torch.ones_like(mx), mx - mn)
    iscale = _rdiv(nmax, rng)
    scale = 1 / iscale
    L = _nearest_int(iscale * (x - mn)).clamp(0, nmax)
    diff = scale * L.to(_F32) + mn - x
    best = _seqsum(w * (diff * diff))
    for step in range(nstep + 1):
        # min is the best fit so far: the range moves with it, as in llama.cpp
        iscale = (_f32(rmin) + _f32(rdelta) * step + nmax) / torch.where(flat, rng, mx - mn)
        la = _nearest_int(iscale * (x - mn)).clamp(0, nmax)
        lf = la.to(_F32)
        wl = w * lf
        sum_l, sum_l2, sum_xl = _seqsum(wl), _seqsum(wl * lf), _seqsum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = torch.where(ok, D, torch.ones_like(D))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        d2 = this_scale * lf + this_min - x
        err = _seqsum(w * (d2 * d2))
        better = ok & (err < best)
        L = torch.where(better, la, L)
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    L = torch.where(flat, torch.zeros_like(L), L)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, -mn, L


def _k4_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """6-bit scales and mins (N, 8) uint8 -> the 12 packed bytes of Q4_K / Q5_K (get_scale_min_k4's inverse)."""
    lo = (ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6))
    hi = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return torch.cat([lo[0], lo[1], hi], -1)


def _qk_scale_min(x: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """The common part of quantize_row_q4_K_ref / q5_K_ref on super-blocks x (N, 256): d, dmin as f16
    bytes, the packed scales (N, 12) and the final codes L (N, 256) int32."""
    n = x.shape[0]
    xs = x.reshape(n * 8, 32)
    av_x = torch.sqrt(_seqsum(xs * xs) / 32)
    w = av_x + xs.abs()
    scales, mins, L = _make_qkx2_quants(xs, w, nmax, rmin, rdelta, nstep)
    scales, mins, L = scales.reshape(n, 8), mins.reshape(n, 8), L.reshape(n, 8, 32)
    max_scale = _positive(scales.amax(-1, keepdim=True))
    max_min = _positive(mins.amax(-1, keepdim=True))
    inv_scale = torch.where(max_scale > 0, _rdiv(63, max_scale), torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, _rdiv(63, max_min), torch.zeros_like(max_min))
    ls = (_nearest_int(inv_scale * scales) & 0xFF).clamp(max=63).to(torch.uint8)   # uint8_t, then MIN(63)
    lm = (_nearest_int(inv_min * mins) & 0xFF).clamp(max=63).to(torch.uint8)
    d16, dmin16 = (max_scale / 63).to(torch.float16), (max_min / 63).to(torch.float16)
    d = d16.float() * ls.float()                                                   # (N, 8)
    dm = dmin16.float() * lm.float()
    ds = torch.where(d == 0, torch.ones_like(d), d)
    requant = _nearest_int((x.reshape(n, 8, 32) + dm[..., None]) / ds[..., None]).clamp(0, nmax)
    L = torch.where((d != 0)[..., None], requant, L).reshape(n, 256)
    head = torch.cat([d16.view(torch.uint8).reshape(n, 2), dmin16.view(torch.uint8).reshape(n, 2),
                      _k4_scales(ls, lm)], -1)
    return head, L


def _quantize_q4_k(x: torch.Tensor) -> torch.Tensor:
    head, L = _qk_scale_min(x, 15, -1.0, 0.1, 20)
    qs = _pack_nibbles(L.to(torch.uint8).reshape(-1, 4, 64)).reshape(x.shape[0], 128)
    return torch.cat([head, qs], -1)


def _quantize_q5_k(x: torch.Tensor) -> torch.Tensor:
    head, L = _qk_scale_min(x, 31, -0.5, 0.1, 15)
    L = L.to(torch.uint8).reshape(-1, 4, 64)                           # (N, pair of 32-runs, 64)
    qs = _pack_nibbles(L & 0xF).reshape(x.shape[0], 128)
    hb = (L >> 4).reshape(-1, 8, 32)                                   # run r = 2*pair + half, bit r of qh[j]
    qh = (hb << torch.arange(8, dtype=torch.uint8, device=x.device)[:, None]).sum(1, dtype=torch.uint8)
    return torch.cat([head, qh, qs], -1)


def _make_qx_quants_rmse1(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants(rmse_type=1, no weights) on every row of x (G, n): (scale (G,1), L (G,n) int32)."""
    amax_i = x.abs().argmax(-1, keepdim=True)
    mx = x.gather(-1, amax_i)
    zero = mx.abs() < 1e-15
    mxs = torch.where(zero, torch.ones_like(mx), mx)
    w = x * x
    wx = w * x

    def attempt(iscale):
        l = _nearest_int(iscale * x).clamp(-nmax, nmax - 1)
        lf = l.to(_F32)
        return l, _seqsum(wx * lf), _seqsum(w * lf * lf)

    l, sumlx, suml2 = attempt(_rdiv(-nmax, mxs))
    L = l + nmax
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, torch.ones_like(suml2)),
                        torch.zeros_like(suml2))
    best = scale * sumlx
    for step in [s for s in range(-9, 10) if s]:
        l, sumlx, suml2 = attempt(-(nmax + _f32(0.1) * step) / mxs)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new_scale = sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2))
        L = torch.where(better, l + nmax, L)
        scale = torch.where(better, new_scale, scale)
        best = torch.where(better, new_scale * sumlx, best)
    return torch.where(zero, torch.zeros_like(scale), scale), torch.where(zero, torch.zeros_like(L), L)


def _quantize_q6_k(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    scales, L = _make_qx_quants_rmse1(x.reshape(n * 16, 16), 32)
    scales, L = scales.reshape(n, 16), L.reshape(n, 16, 16)
    i_max = scales.abs().argmax(-1, keepdim=True)
    max_scale = scales.gather(-1, i_max)
    empty = max_scale.abs() < 1e-15
    iscale = _rdiv(-128, torch.where(empty, torch.ones_like(max_scale), max_scale))
    d16 = (1 / iscale).to(torch.float16)
    sc = _nearest_int(iscale * scales).clamp(max=127).to(torch.int8)              # (N, 16)
    d = d16.float() * sc.float()
    ds = torch.where(d == 0, torch.ones_like(d), d)
    requant = _nearest_int(x.reshape(n, 16, 16) / ds[..., None]).clamp(-32, 31) + 32
    L = torch.where((d != 0)[..., None], requant, L).reshape(n, 2, 4, 32).to(torch.uint8)
    lo, hi = L & 0xF, L >> 4                                           # (N, half, run, 32)
    ql = torch.cat([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], -1)  # (N, 2, 64)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)          # (N, 2, 32)
    out = torch.cat([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(torch.uint8),
                     d16.view(torch.uint8).reshape(n, 2)], -1)
    return torch.where(empty, torch.zeros_like(out), out)


# type -> (quantizer over (blocks, block_size) float32 -> (blocks, type_size) uint8)
_QUANTIZERS = {
    _T.F32: _quantize_f32,
    _T.F16: _quantize_f16,
    _T.BF16: _quantize_bf16,
    _T.Q4_0: _quantize_q4_0,
    _T.Q4_1: _quantize_q4_1,
    _T.Q5_0: _quantize_q5_0,
    _T.Q5_1: _quantize_q5_1,
    _T.Q8_0: _quantize_q8_0,
    _T.Q4_K: _quantize_q4_k,
    _T.Q5_K: _quantize_q5_k,
    _T.Q6_K: _quantize_q6_k,
}
QUANTIZABLE = frozenset(_QUANTIZERS)

# Super-blocks per step: bounds the temporaries of the K-quant searches (tens of float32 copies each).
_CHUNK_BLOCKS = 1 << 14


def quantize(x: torch.Tensor, qtype: int) -> torch.Tensor:
    """Rows of x (..., n) float -> (rows, row_bytes) uint8 of GGUF type `qtype` (a GGMLQuantizationType).

    x is taken as float32 (as llama.cpp and gguf-py take their input); n must be a multiple of the type's
    block size.
    """
    qtype = _T(qtype)
    if qtype not in _QUANTIZERS:
        raise KilnError(f"kiln cannot quantize to {qtype.name}; it can write "
                        + ", ".join(t.name for t in _QUANTIZERS))
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if x.ndim == 0 or x.shape[-1] % block:
        raise KilnError(f"a row of {x.shape[-1] if x.ndim else 0} weights is not a multiple of "
                        f"{qtype.name}'s block of {block}")
    x = x.detach().to(_F32).reshape(-1, x.shape[-1])
    rows, n = x.shape
    if qtype in (_T.F32, _T.F16, _T.BF16):
        return _QUANTIZERS[qtype](x).reshape(rows, -1)
    blocks = x.reshape(-1, block)
    out = torch.empty(blocks.shape[0], size, dtype=torch.uint8, device=x.device)
    for s in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        out[s:s + _CHUNK_BLOCKS] = _QUANTIZERS[qtype](blocks[s:s + _CHUNK_BLOCKS])
    return out.reshape(rows, n // block * size)
