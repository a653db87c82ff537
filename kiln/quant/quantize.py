"""Quantize float weights into GGUF blocks: `quantize(x, qtype, imatrix=None) -> (rows, row_bytes) uint8`.

Owns: the type registry and its front door (checks, chunking, tiling an importance matrix over rows), and
the simple types, vectorized in torch over all blocks of a tensor (on whatever device `x` is): F32, F16,
BF16; Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 byte-identical to gguf-py's `gguf.quants.quantize`. The K-quants
(Q2_K ... Q6_K, quantize_k.py) and IQ4_NL / IQ4_XS (quantize_iq4.py) follow llama.cpp's `ggml_quantize_chunk`.
Not: block layouts for reading (legacy.py, kquants.py, iquants.py, the `dequantize_*` there), choosing a
type per tensor, or writing files (kiln/quantize.py).

An importance matrix (per input column, llama.cpp's `quant_weights`) steers the K-quants, IQ4 and Q4_0 ...
Q5_1 as it steers llama.cpp's (their `*_impl` functions: a weighted scale search instead of gguf-py's
absmax rule); Q8_0 and the float types ignore it, as in llama.cpp.
"""

import gguf
import torch

from kiln.errors import KilnError
from kiln.quant.qmath import absmax_signed as _absmax_signed
from kiln.quant.qmath import f16_bytes as _f16_bytes
from kiln.quant.qmath import pack_bits as _pack_bits
from kiln.quant.qmath import div, make_qkx2_quants, make_qx_quants, seqsum, sqrt32
from kiln.quant.qmath import pack_nibbles as _pack_nibbles
from kiln.quant.quantize_iq4 import quantize_iq4_nl, quantize_iq4_xs
from kiln.quant.quantize_k import quantize_q2_k, quantize_q3_k, quantize_q4_k, quantize_q5_k, quantize_q6_k

_T = gguf.GGMLQuantizationType
_F32 = torch.float32

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

def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _quantize_q4_0(b: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    if w is not None:  # quantize_row_q4_0_impl: a weighted least-squares scale, no offset
        d, L = make_qx_quants(b, 8, w)
        return torch.cat([_f16_bytes(d), _pack_nibbles(L.to(torch.uint8))], -1)
    d = _absmax_signed(b) / -8
    q = torch.trunc(b * _inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _pack_nibbles(q)], -1)


def _quantize_q4_1(b: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    if w is not None:  # quantize_row_q4_1_impl: make_qkx3_quants' scale and min
        d, neg_min, L = make_qkx2_quants(b, w, 15, -0.9, 0.05, 36)
        return torch.cat([_f16_bytes(d), _f16_bytes(-neg_min), _pack_nibbles(L.to(torch.uint8))], -1)
    mx, mn = b.amax(-1, keepdim=True), b.amin(-1, keepdim=True)
    d = div(mx - mn, 15)
    q = torch.trunc((b - mn) * _inverse(d) + 0.5).clamp(0, 15).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _f16_bytes(mn), _pack_nibbles(q)], -1)


def _five_bit_fields(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q5 codes (N, 32) 0..31 -> qh (N, 4) (bit j = code j's 5th bit), qs (N, 16) low nibbles."""
    return _pack_bits(q >> 4), _pack_nibbles(q & 0x0F)


def _quantize_q5_0(b: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    if w is not None:
        d, L = make_qx_quants(b, 16, w)
        qh, qs = _five_bit_fields(L.to(torch.uint8))
        return torch.cat([_f16_bytes(d), qh, qs], -1)
    d = _absmax_signed(b) / -16
    q = torch.trunc(b * _inverse(d) + 16.5).clamp(0, 31).to(torch.uint8)
    qh, qs = _five_bit_fields(q)
    return torch.cat([_f16_bytes(d), qh, qs], -1)


def _quantize_q5_1(b: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    if w is not None:
        d, neg_min, L = make_qkx2_quants(b, w, 31, -0.9, 0.05, 36)
        qh, qs = _five_bit_fields(L.to(torch.uint8))
        return torch.cat([_f16_bytes(d), _f16_bytes(-neg_min), qh, qs], -1)
    mx, mn = b.amax(-1, keepdim=True), b.amin(-1, keepdim=True)
    d = div(mx - mn, 31)
    q = torch.trunc((b - mn) * _inverse(d) + 0.5).clamp(0, 31).to(torch.uint8)
    qh, qs = _five_bit_fields(q)
    return torch.cat([_f16_bytes(d), _f16_bytes(mn), qh, qs], -1)


def _quantize_q8_0(b: torch.Tensor) -> torch.Tensor:
    d = div(b.abs().amax(-1, keepdim=True), 127)
    v = b * _inverse(d)
    a = v.abs()
    fl = torch.floor(a)
    q = torch.sign(v) * (fl + torch.floor(2 * (a - fl)))          # roundf: half away from zero
    return torch.cat([_f16_bytes(d), q.to(torch.int8).view(torch.uint8)], -1)



# type -> quantizer over (blocks, block_size) float32 [, importance (blocks, block_size)] -> (blocks, type_size) uint8
_QUANTIZERS = {
    _T.F32: _quantize_f32,
    _T.F16: _quantize_f16,
    _T.BF16: _quantize_bf16,
    _T.Q4_0: _quantize_q4_0,
    _T.Q4_1: _quantize_q4_1,
    _T.Q5_0: _quantize_q5_0,
    _T.Q5_1: _quantize_q5_1,
    _T.Q8_0: _quantize_q8_0,
    _T.Q2_K: quantize_q2_k,
    _T.Q3_K: quantize_q3_k,
    _T.Q4_K: quantize_q4_k,
    _T.Q5_K: quantize_q5_k,
    _T.Q6_K: quantize_q6_k,
    _T.IQ4_NL: quantize_iq4_nl,
    _T.IQ4_XS: quantize_iq4_xs,
}
QUANTIZABLE = frozenset(_QUANTIZERS)
IMATRIX_TYPES = frozenset({_T.Q2_K, _T.Q3_K, _T.Q4_K, _T.Q5_K, _T.Q6_K, _T.IQ4_NL, _T.IQ4_XS,
                           _T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q5_1})
# the legacy types' *_impl weigh by the whole row's mean square, so they get their weights made per row here
_ROW_SIGMA = frozenset({_T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q5_1})

# Weights per step (whole blocks): bounds the temporaries of the scale searches (tens of float32 copies
# each); counted in weights, not blocks, so that 32-weight and 256-weight types take steps of one size.
_CHUNK_WEIGHTS = 1 << 18


def _check(x: torch.Tensor, qtype, imatrix) -> int:
    qtype = _T(qtype)
    if qtype not in _QUANTIZERS:
        raise KilnError(f"kiln cannot quantize to {qtype.name}; it can write "
                        + ", ".join(t.name for t in _QUANTIZERS))
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if x.ndim == 0 or x.shape[-1] % block:
        raise KilnError(f"a row of {x.shape[-1] if x.ndim else 0} weights is not a multiple of "
                        f"{qtype.name}'s block of {block}")
    if imatrix is not None and tuple(imatrix.shape) != (x.shape[-1],):
        raise KilnError(f"an importance matrix of {tuple(imatrix.shape)} values does not fit rows of "
                        f"{x.shape[-1]} weights")
    return qtype


def quantize(x: torch.Tensor, qtype: int, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of x (..., n) float -> (rows, row_bytes) uint8 of GGUF type `qtype` (a GGMLQuantizationType).

    x is taken as float32 (as llama.cpp and gguf-py take their input); n must be a multiple of the type's
    block size. `imatrix` (n,): the importance of each input column (mean squared activation), used by the
    types in IMATRIX_TYPES.
    """
    qtype = _check(x, qtype, imatrix)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    x = x.detach().to(_F32).reshape(-1, x.shape[-1])
    rows, n = x.shape
    if qtype in (_T.F32, _T.F16, _T.BF16):
        return _QUANTIZERS[qtype](x).reshape(rows, -1)
    blocks = x.reshape(-1, block)
    qw = None
    if imatrix is not None and qtype in IMATRIX_TYPES:
        qw = imatrix.detach().to(_F32, copy=True).to(x.device).reshape(1, n).expand(rows, n)
        if qtype in _ROW_SIGMA:  # quantize_row_q4_0_impl & co: qw * sqrt(mean x^2 of the row + x^2)
            qw = qw * sqrt32(div(seqsum(x * x), n) + x * x)
        qw = qw.reshape(-1, block)
    out = torch.empty(blocks.shape[0], size, dtype=torch.uint8, device=x.device)
    step = max(1, _CHUNK_WEIGHTS // block)
    for s in range(0, blocks.shape[0], step):
        part = blocks[s:s + step]
        out[s:s + step] = (_QUANTIZERS[qtype](part) if qw is None
                           else _QUANTIZERS[qtype](part, qw[s:s + step]))
    return out.reshape(rows, n // block * size)
