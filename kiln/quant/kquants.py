"""K-quant GGUF formats, Q2_K to Q6_K (super-blocks of 256 weights), as torch dequantizers.

Owns: each super-block's byte layout (below), one `dequantize_<type>(blocks)` per format, the 6-bit scale
decoders packed.py shares. Not: dispatch, checks, chunking, output dtype (kiln/quant/__init__.py), quantizing,
kernels. Each takes (N, type_size) uint8 and returns (N, 256) float32 (into `out` when given), bit-identical
to gguf-py: `dl = d * sc` is formed first in float32, then `dl * q - ml` (`d * (sc * q)` rounds differently).

Shapes: N = blocks, S = sub-blocks (8 of 32 or 16 of 16 weights), L = weights in a sub-block.
"""

import torch

from kiln.quant.legacy import f16_at, into, unpack

# Layouts (byte ranges inside one super-block, little-endian; llama.cpp ggml-common.h):
#   Q2_K (84 B):  scales [0:16] (lo nibble = scale, hi = min, per 16-weight sub-block) | qs [16:80] 2-bit
#                 | d f16 [80:82] | dmin f16 [82:84]
#   Q3_K (110 B): hmask [0:32] | qs [32:96] 2-bit | scales [96:108] 16 x 6-bit, biased by 32 | d f16 [108:110]
#   Q4_K (144 B): d f16 [0:2] | dmin f16 [2:4] | scales [4:16] 8 x (6-bit scale, 6-bit min) | qs [16:144] 4-bit
#   Q5_K (176 B): d [0:2] | dmin [2:4] | scales [4:16] as Q4_K | qh [16:48] 5th bits | qs [48:176] 4-bit
#   Q6_K (210 B): ql [0:128] 4-bit | qh [128:192] 2-bit | scales [192:208] int8 | d f16 [208:210]
#
# The 2-bit and 4-bit fields run in 32-byte lanes: field f of byte l in lane-group h is weight
# h*(32*F) + f*32 + l (Q6_K's ql uses 64-byte lanes). The 1-bit hmask/qh fields: bit f of byte l is
# weight f*32 + l.


def _crumbs(qs: torch.Tensor, groups: int) -> torch.Tensor:
    """2-bit fields of (N, groups*32) bytes in weight order: (N, groups*128) uint8."""
    return unpack(qs.reshape(qs.shape[0], groups, 32), 2).flatten(1)   # (N, groups, 4, 32)


def _nibbles(qs: torch.Tensor, lane: int) -> torch.Tensor:
    """4-bit fields of (N, k*lane) bytes in weight order: (N, 2*k*lane) uint8."""
    return unpack(qs.reshape(qs.shape[0], -1, lane), 4).flatten(1)     # (N, k, 2, lane)


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """1-bit fields of (N, 32) bytes in weight order: (N, 256) uint8, 0 or 1."""
    return unpack(qh, 1).flatten(1)                                    # (N, 8, 32)


def _apply(out: torch.Tensor | None, q: torch.Tensor, dl: torch.Tensor,
           ml: torch.Tensor | None = None) -> torch.Tensor:
    """dl * q (- ml) per sub-block; q (N, 256) integer, dl and ml (N, S) float32 -> (N, 256) float32."""
    n, s = dl.shape
    y = into(out, q).view(n, s, -1)                                    # (N, S, L)
    y.mul_(dl.view(n, s, 1))
    if ml is not None:
        y.sub_(ml.view(n, s, 1))
    return y.view(n, -1)


def dequantize_q2_k(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    sc = blocks[:, 0:16]                                               # (N, 16)
    dl = f16_at(blocks, 80) * (sc & 0xF)
    ml = f16_at(blocks, 82) * (sc >> 4)
    return _apply(out, _crumbs(blocks[:, 16:80], 2), dl, ml)


def q3_k_scales(sc: torch.Tensor) -> torch.Tensor:
    """(..., 12) packed bytes -> (..., 16) int8 scales -32..31 (also packed.py's)."""
    # Low 4 bits: scale j<8 in the lo nibble of byte j, j>=8 in the hi nibble of byte j-8.
    # High 2 bits: scale j in bits 2*(j//4) of byte 8 + j%4.
    lo = unpack(sc[..., 0:8], 4).flatten(-2)                           # (..., 2, 8) -> (..., 16)
    hi = unpack(sc[..., 8:12], 2).flatten(-2)                          # (..., 4, 4) -> (..., 16)
    return lo.bitwise_or_(hi << 4).view(torch.int8).sub_(32)


def dequantize_q3_k(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    dl = f16_at(blocks, 108) * q3_k_scales(blocks[:, 96:108])         # (N, 16)
    # A clear hmask bit means "subtract 4": q = ql - 4 * (1 - bit), in -4..3.
    minus = _high_bits(blocks[:, 0:32]).bitwise_xor_(1).mul_(4)
    q = _crumbs(blocks[:, 32:96], 2).sub_(minus).view(torch.int8)      # (N, 256)
    return _apply(out, q, dl)


def k_scales_mins(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K (..., 12) packed bytes -> 6-bit scales and mins, each (..., 8) uint8 (also packed.py's)."""
    # Bytes 0-3: scale 0-3 (low 6 bits) + top 2 bits of scale 4-7; bytes 4-7 the same for mins;
    # bytes 8-11: low 4 bits of scale 4-7 (lo nibble) and of min 4-7 (hi nibble).
    a, b, c = sc[..., 0:4], sc[..., 4:8], sc[..., 8:12]                # (..., 4) each
    scales = torch.cat([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], dim=-1)
    mins = torch.cat([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], dim=-1)
    return scales, mins


def _k_dl_ml(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K per-sub-block float32 scale and min: (N, 8) each."""
    scales, mins = k_scales_mins(blocks[:, 4:16])
    return f16_at(blocks, 0) * scales, f16_at(blocks, 2) * mins


def dequantize_q4_k(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return _apply(out, _nibbles(blocks[:, 16:144], 32), *_k_dl_ml(blocks))


def dequantize_q5_k(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    q = _nibbles(blocks[:, 48:176], 32).bitwise_or_(_high_bits(blocks[:, 16:48]) << 4)  # (N, 256) 0..31
    return _apply(out, q, *_k_dl_ml(blocks))


def dequantize_q6_k(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    dl = f16_at(blocks, 208) * blocks[:, 192:208].view(torch.int8)     # (N, 16)
    q = _nibbles(blocks[:, 0:128], 64).bitwise_or_(_crumbs(blocks[:, 128:192], 2) << 4)
    return _apply(out, q.view(torch.int8).sub_(32), dl)                # q in -32..31
