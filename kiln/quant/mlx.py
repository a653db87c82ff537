"""mlx's affine group quantization (what `mlx_lm.convert -q` writes), in torch: pack, unpack, quantize,
dequantize, and the exact translation of 4- and 5-bit groups into GGUF Q4_1 / Q5_1 blocks.

Owns: the layout of one quantized weight — `weight` uint32 (R, K * bits / 32), `scales` and `biases`
(R, K / G) in the model dtype, w = scales * q + biases per group of G inputs — and `pack` / `unpack` of
its codes, `quantize` (mlx's rule, byte-identical to `mx.quantize`), `dequantize` (mlx's roundings,
bit-identical to `mx.dequantize`), `to_blocks` (Q4_1 / Q5_1 bytes for kiln's quantized matmuls).
Not: reading or writing folders (formats/mlx.py, convert_mlx.py), kernels (a Q4_1 / Q5_1 weight runs on
the GGUF paths: quant/linear.py, quant/cpu.py).

Packing (mlx backend/cpu/quantized.cpp): the codes of a row form one little-endian bit stream, code i in
bits [i * bits, (i + 1) * bits); 2, 4, 8 bits fill whole 32-bit words, 3, 5, 6 bits cross them (8 codes
every `bits` bytes). Unpacking reads the stream `bits` bytes (8 codes) at a time as one int64.

Shapes: R = rows (outputs), K = inputs, G = group size, U = 8-code units in a row (K / 8), N = blocks of 32.
"""

from __future__ import annotations

import gguf
import torch

from kiln.errors import KilnError

BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)
_T = gguf.GGMLQuantizationType
BLOCK_TYPES = {4: int(_T.Q4_1), 5: int(_T.Q5_1)}  # bits whose groups are exactly GGUF blocks
_CHUNK = 1 << 21  # codes unpacked per step: temporaries of a few bytes each stay in tens of MiB


def check(bits, group_size, where: str = "") -> None:
    if bits not in BITS or type(bits) is not int:
        raise KilnError(f"{where}quantization bits {bits!r} is not one mlx writes (supported: "
                        f"{', '.join(map(str, BITS))})")
    if group_size not in GROUPS or type(group_size) is not int:
        raise KilnError(f"{where}quantization group size {group_size!r} is not one mlx writes (supported: "
                        f"{', '.join(map(str, GROUPS))})")


def _row_chunks(rows: int, k: int):
    step = max(1, _CHUNK // max(1, k))
    return range(0, rows, step), step


def unpack(wq: torch.Tensor, bits: int) -> torch.Tensor:
    """wq (R, K * bits / 32) uint32 (or int32: only its bytes are read) -> codes (R, K) uint8."""
    rows = wq.contiguous().view(torch.uint8).view(wq.shape[0], -1)      # (R, K * bits / 8)
    k = rows.shape[1] * 8 // bits
    out = torch.empty(wq.shape[0], k, dtype=torch.uint8)
    starts, step = _row_chunks(wq.shape[0], k)
    mask = (1 << bits) - 1
    for a in starts:
        b = rows[a:a + step]
        if 8 % bits == 0:  # whole codes in each byte: plain byte ops (fast)
            codes = torch.stack([(b >> (f * bits)) & mask for f in range(8 // bits)], -1)  # (r, L, 8/bits)
        else:  # 8 codes in every `bits` bytes, read as one int64
            u = b.view(b.shape[0], -1, bits).long()                        # (r, U, bits)
            v = (u << _BYTE_SHIFTS[:bits]).sum(-1, keepdim=True)           # (r, U, 1)
            codes = (v >> (_EIGHT * bits)) & mask                          # (r, U, 8)
        out[a:a + step] = codes.view(-1, k)
    return out


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes (R, K) integers in [0, 2^bits) -> (R, K * bits / 32) uint32, the inverse of `unpack`."""
    r, k = codes.shape
    out = torch.empty(r, k * bits // 8, dtype=torch.uint8)
    starts, step = _row_chunks(r, k)
    for a in starts:
        c = codes[a:a + step].to(torch.uint8)
        if 8 % bits == 0:
            c = c.view(c.shape[0], -1, 8 // bits)                          # (r, L, 8/bits)
            b = c[..., 0].clone()
            for f in range(1, 8 // bits):
                b |= c[..., f] << (f * bits)                               # (r, L)
        else:
            v = (c.view(c.shape[0], -1, 8).long() << (_EIGHT * bits)).sum(-1, keepdim=True)  # (r, U, 1)
            b = ((v >> _BYTE_SHIFTS[:bits]) & 0xFF).to(torch.uint8)        # (r, U, bits)
        out[a:a + step] = b.view(-1, k * bits // 8)
    return out.view(torch.uint32)


_EIGHT = torch.arange(8)            # code j of a unit sits at bit j * bits
_BYTE_SHIFTS = torch.arange(8) * 8  # byte i of a unit at bit 8 * i


def quantize(w: torch.Tensor, bits: int, group_size: int):
    """w (R, K) float -> (weight (R, K * bits / 32) uint32, scales, biases (R, K / G) in w's dtype).

    mlx's affine rule (backend/cpu/quantized.cpp `quantize`), in float32 from w's values: the scale spans
    the group's range over 2^bits - 1 steps, signed so that the edge of larger magnitude is code 0, then
    re-fit so that edge is met exactly (bias = edge) unless it rounds to code 0; codes round half to even.
    """
    check(bits, group_size)
    r, k = w.shape
    wq = torch.empty(r, k * bits // 32, dtype=torch.uint32)
    scales, biases = (torch.empty(r, k // group_size, dtype=w.dtype) for _ in range(2))
    starts, step = _row_chunks(r, k)
    for a in starts:  # a few MiB of float32 at a time: no temporaries the size of a whole embedding
        q, scales[a:a + step], biases[a:a + step] = _quantize_rows(w[a:a + step], bits, group_size)
        wq[a:a + step] = pack(q, bits)
    return wq, scales, biases


def _quantize_rows(w: torch.Tensor, bits: int, group_size: int):
    """w (r, K) -> (codes (r, K) uint8, scales, biases (r, K / G) float32)."""
    r, k = w.shape
    g = w.float().view(r, k // group_size, group_size)                 # (r, K/G, G)
    n_bins = float((1 << bits) - 1)
    w_min, w_max = g.amin(-1), g.amax(-1)                              # (r, K/G)
    lower = w_min.abs() > w_max.abs()
    scale = torch.clamp((w_max - w_min) / n_bins, min=1e-7)
    scale = torch.where(lower, scale, -scale)
    edge = torch.where(lower, w_min, w_max)
    q0 = torch.round(edge / scale)
    moved = q0 != 0
    scale = torch.where(moved, edge / torch.where(moved, q0, 1.0), scale)
    bias = torch.where(moved, edge, torch.zeros_like(edge))
    q = g.sub_(bias[..., None]) if g.data_ptr() != w.data_ptr() else g - bias[..., None]
    q = q.div_(scale[..., None]).round_().clamp_(0, n_bins)            # (r, K/G, G)
    return q.to(torch.uint8).view(r, k), scale, bias


def dequantize(wq: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int,
               group_size: int) -> torch.Tensor:
    """(R, K) in the scales' dtype, as `mx.dequantize` computes it: scales * q, then + biases, each op
    rounded to that dtype (exact in float32; in bf16 / f16 the same two roundings mlx makes)."""
    codes = unpack(wq, bits)
    r, k = codes.shape
    dt = scales.dtype
    out = torch.empty(r, k, dtype=dt)
    starts, step = _row_chunks(r, k)
    for a in starts:
        c = codes[a:a + step].view(-1, k // group_size, group_size).to(dt)  # (r, K/G, G)
        c.mul_(scales[a:a + step, :, None]).add_(biases[a:a + step, :, None])
        out[a:a + step] = c.view(-1, k)
    return out


def f16_fits(scales: torch.Tensor, biases: torch.Tensor) -> tuple[bool, int]:
    """(every value finite in f16 and no nonzero one flushed to 0, how many values f16 rounds).

    Q4_1 / Q5_1 keep d and m in f16. bf16 values in f16's normal range (6.1e-5 ... 65504) fit exactly (8
    significant bits into 11); smaller ones lose bits, float32 ones round to 11 bits (relative 2^-12)."""
    n_inexact, ok = 0, True
    for t in (scales, biases):
        h = t.to(torch.float16)
        ok &= bool(torch.isfinite(h).all()) and not bool(((h == 0) & (t != 0)).any())
        n_inexact += int((h.to(t.dtype) != t).sum())
    return ok, n_inexact


def to_blocks(wq: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int,
              group_size: int) -> torch.Tensor:
    """A 4- or 5-bit mlx weight as GGUF Q4_1 / Q5_1 bytes (R, K / 32 * 20 or 24) uint8.

    A group of G weights is G / 32 blocks sharing its scale (d) and bias (m) in f16: w = d * q + m in both
    formats, codes unchanged. Block layouts (llama.cpp ggml-common.h; quant/legacy.py): Q4_1 d | m | qs[16]
    with weight j < 16 in the low nibble of qs[j] and j >= 16 in the high nibble of qs[j - 16]; Q5_1
    d | m | qh u32 (bit j: weight j's 5th bit) | qs[16] (the low 4 bits, same order).
    """
    codes = unpack(wq, bits)
    r, k = codes.shape
    per = group_size // 32
    d = scales.to(torch.float16).repeat_interleave(per, 1).view(r, -1, 1).view(torch.uint8)  # (R, N, 2)
    m = biases.to(torch.float16).repeat_interleave(per, 1).view(r, -1, 1).view(torch.uint8)  # (R, N, 2)
    c = codes.view(r, -1, 32)                                           # (R, N, 32)
    lo = c & 0x0F
    qs = lo[..., :16] | (lo[..., 16:] << 4)                             # (R, N, 16)
    parts = [d, m, qs]
    if bits == 5:
        fifth = ((c >> 4) & 1).long() << torch.arange(32)                # (R, N, 32) bit j at j
        qh = fifth.sum(-1, keepdim=True).view(torch.uint8)[..., :4]      # (R, N, 4) the u32, little-endian
        parts = [d, m, qh, qs]
    return torch.cat(parts, -1).view(r, -1)
