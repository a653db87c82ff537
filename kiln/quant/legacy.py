"""Legacy GGUF block formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (32 weights per block), as torch dequantizers.

Owns: each block's byte layout (below), one `dequantize_<type>(blocks)` per format, and the helpers every
format file shares (`words`, `f16_at`, `unpack`, `into`). Not: dispatch, checks, chunking, output dtype
(kiln/quant/__init__.py), quantizing, kernels.
Each takes (N, type_size) uint8 and returns (N, 32) float32 (into `out` when given), bit-identical to gguf-py:
its float32 operations in its order (Q4_1 rounds `d * q`, then adds `m`), widened and scaled in place in the
result (no float32 temporary; x * d == d * x exactly).

Shapes: N = blocks, F = bit-fields per byte (2 nibbles, 4 crumbs or 8 bits), L = packed bytes in a row.
"""

import math

import torch

# Byte offsets of each field inside a block (little-endian, as in llama.cpp ggml-common.h).
#   Q4_0 (18 B): d f16 [0:2] | qs [2:18]         weight j<16 = lo nibble of qs[j], j>=16 = hi nibble of qs[j-16]
#   Q4_1 (20 B): d f16 [0:2] | m f16 [2:4] | qs [4:20]                   same nibble order as Q4_0
#   Q5_0 (22 B): d f16 [0:2] | qh u32 [2:6] | qs [6:22]                  bit j of qh is weight j's 5th bit
#   Q5_1 (24 B): d f16 [0:2] | m f16 [2:4] | qh u32 [4:8] | qs [8:24]
#   Q8_0 (34 B): d f16 [0:2] | qs int8 [2:34]
# Weight values: Q4_0 d*(q-8), Q4_1 d*q+m, Q5_0 d*(q-16), Q5_1 d*q+m, Q8_0 d*q.


def words(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (..., L) uint8 reread as (..., L / itemsize) of dtype, copied first if strided or unaligned.

    GGUF is little-endian, as is every host torch runs on, so the bytes need no swapping.
    """
    if not x.is_contiguous() or x.storage_offset() % dtype.itemsize:
        x = x.clone(memory_format=torch.contiguous_format)
    return x.view(dtype)


def f16_at(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The f16 field at byte `offset` of every block, widened to float32: (N, 1)."""
    return words(blocks[:, offset:offset + 2], torch.float16).float()


# Per-byte masks keeping the low 1, 2 or 4 bits of each of the eight bytes in an int64.
_BYTE_MASKS = {1: 0x0101010101010101, 2: 0x0303030303030303, 4: 0x0F0F0F0F0F0F0F0F}


def unpack(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Split each byte of x (..., L) into its 8/bits fields, lowest first: (..., F, L) uint8."""
    n_fields, mask = 8 // bits, (1 << bits) - 1
    if x.shape[-1] % 8:  # only the small per-block scale fields; plain byte ops are fine there
        return torch.stack([(x >> (f * bits)) & mask for f in range(n_fields)], dim=-2)
    # Shift eight bytes at once as one int64 (torch's uint8 ops are slow on short strided rows); the bits
    # that cross in from the next byte land above `bits` and the per-byte mask drops them.
    w = words(x, torch.int64)                                          # (..., L/8)
    fields = w.new_empty(*w.shape[:-1], n_fields, w.shape[-1])         # (..., F, L/8)
    for f in range(n_fields):
        torch.bitwise_right_shift(w, f * bits, out=fields.select(-2, f))
    return fields.bitwise_and_(_BYTE_MASKS[bits]).view(torch.uint8)    # (..., F, L)


def into(out: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    """Values q (N, ...), integer quants or raw floats, as float32 in `out` (new when None): (N, block_size)."""
    if out is None:
        out = torch.empty(q.shape[0], math.prod(q.shape[1:]), dtype=torch.float32)
    return out.copy_(q.reshape(out.shape))


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(N, 16) packed bytes -> (N, 32) values 0..15 in weight order (all lo nibbles, then all hi)."""
    return unpack(qs, 4).flatten(1)


# _FIFTH[b] is the int64 whose byte i is 16 * (bit i of b): one table lookup turns each byte of qh into
# the fifth-bit values (0 or 16) of its eight weights.
_FIFTH = torch.tensor([sum(((b >> i) & 1) << (8 * i + 4) for i in range(8)) for b in range(256)])  # int64


def _five_bit(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Q5 quants 0..31 as uint8 (N, 32), from qh (N, 4) (bit j of its u32 is weight j's 5th bit), qs (N, 16)."""
    # int32 indices: a uint8 index would be read as a boolean mask.
    fifth = _FIFTH.index_select(0, qh.reshape(-1).int())               # (N*4,) int64
    return _nibbles(qs).bitwise_or_(fifth.view(torch.uint8).view(qs.shape[0], 32))


def dequantize_q4_0(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    q = _nibbles(blocks[:, 2:18]).view(torch.int8).sub_(8)             # (N, 32) -8..7
    return into(out, q).mul_(f16_at(blocks, 0))


def dequantize_q4_1(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    q = _nibbles(blocks[:, 4:20])                                      # (N, 32) 0..15
    return into(out, q).mul_(f16_at(blocks, 0)).add_(f16_at(blocks, 2))


def dequantize_q5_0(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    q = _five_bit(blocks[:, 2:6], blocks[:, 6:22]).view(torch.int8).sub_(16)  # (N, 32) -16..15
    return into(out, q).mul_(f16_at(blocks, 0))


def dequantize_q5_1(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    q = _five_bit(blocks[:, 4:8], blocks[:, 8:24])                     # (N, 32) 0..31
    return into(out, q).mul_(f16_at(blocks, 0)).add_(f16_at(blocks, 2))


def dequantize_q8_0(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return into(out, blocks[:, 2:34].view(torch.int8)).mul_(f16_at(blocks, 0))  # (N, 32)
