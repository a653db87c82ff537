"""Non-linear 4-bit GGUF formats, IQ4_NL (32-weight blocks) and IQ4_XS (256), as torch dequantizers.

Owns: their byte layouts (below), the code book `KVALUES`, one `dequantize_<type>(blocks)` per format. Not: the
grid IQ1/IQ2/IQ3 formats (rejected by kiln/quant/__init__.py), dispatch, chunking, quantizing, kernels.
Each takes (N, type_size) uint8 and returns (N, block_size) float32 (into `out` when given), bit-identical to
gguf-py. Shapes: N = blocks, S = sub-blocks of 32 weights.
"""

import math

import torch

from kiln.quant.legacy import f16_at, unpack

# Layouts (little-endian; llama.cpp ggml-common.h):
#   IQ4_NL (18 B):  d f16 [0:2] | qs [2:18]
#       weight j<16 = KVALUES[lo nibble of qs[j]], j>=16 = KVALUES[hi nibble of qs[j-16]]
#   IQ4_XS (136 B): d f16 [0:2] | scales_h u16 [2:4] | scales_l [4:8] | qs [8:136]
#       sub-block s (8 of 32 weights): 6-bit scale = lo/hi nibble s%2 of scales_l[s//2]
#       | bits 2s..2s+1 of scales_h << 4, biased by 32; its 32 weights use qs[16s:16s+16] as IQ4_NL does.

# Values of the 16 codes, a non-uniform grid denser near zero (llama.cpp kvalues_iq4nl).
KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _lookup(codes: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """Codes 0..15 (N, ...) uint8 -> their KVALUES as float32 in `out` (new when None): (N, block_size)."""
    if out is None:
        out = torch.empty(codes.shape[0], math.prod(codes.shape[1:]), dtype=torch.float32)
    table = torch.tensor(KVALUES, dtype=torch.float32)
    # int32 indices: a uint8 index would be read as a boolean mask.
    return torch.index_select(table, 0, codes.reshape(-1).int(), out=out.view(-1)).view(out.shape)


def dequantize_iq4_nl(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    codes = unpack(blocks[:, 2:18], 4)                                 # (N, 2, 16): lo nibbles, then hi
    return _lookup(codes, out).mul_(f16_at(blocks, 0))


def iq4_xs_scales(blocks: torch.Tensor) -> torch.Tensor:
    """Blocks (..., 136) -> (..., 8) int8 sub-block scales -32..31 (also packed.py's)."""
    lo = unpack(blocks[..., 4:8].unsqueeze(-1), 4).flatten(-3)         # (..., 4, 2, 1) -> (..., 8)
    hi = unpack(blocks[..., 2:4].unsqueeze(-1), 2).flatten(-3)         # (..., 2, 4, 1) -> (..., 8)
    return lo.bitwise_or_(hi << 4).view(torch.int8).sub_(32)


def dequantize_iq4_xs(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    n = blocks.shape[0]
    dl = f16_at(blocks, 0) * iq4_xs_scales(blocks)                    # (N, 8)
    codes = unpack(blocks[:, 8:136].reshape(n, 8, 16), 4)              # (N, S, 2, 16)
    y = _lookup(codes, out).view(n, 8, 32)                             # (N, S, 32)
    return y.mul_(dl.view(n, 8, 1)).view(n, -1)
