"""KV cache types (llama.cpp's -ctk / -ctv): their names, codecs and the rotated basis block types store in.

Owns: `CACHE_TYPES` and `cache_type` (canonical names), the q8_0 / q4_0 codecs (`quantize_q8_0`, ...), how a
type is laid out in the cache (`layout`: its parts) and encoded / decoded (`encode`, `decode`), the
Walsh-Hadamard basis q8_0 / q4_0 store keys and values in (`hadamard`, `Basis`, `basis_for`).
Not: the cache's storage and its writes and reads (cache.py), attention over a
stored type (ops/attention.py reads q8_0 directly; models/base.attention decides).
"""

from __future__ import annotations

import torch

from kiln.errors import KilnError

# ---------------------------------------------------------------- cache types (llama.cpp's -ctk / -ctv)
# A type is a codec: `encode(x)` turns keys or values (..., D) into parts, each (..., width) of one dtype, stored
# side by side in the cache; `decode(parts, dtype)` turns a slice of them back. q8_0 and q4_0 are llama.cpp's
# blocks of 32 along D with an fp16 scale: q8_0 int8 x = q·d with d = amax/127; q4_0 x = (q - 8)·d with
# d = -max/8 (max: the element of largest magnitude, with its sign), two 4-bit q a byte, element j in the low
# nibble and element j + 16 in the high one. fp8 is e4m3 (saturated at ±448, no scale).

QK = 32  # elements per block of q8_0 / q4_0
_DENSE = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
_NAMES = {"float32": "f32", "fp32": "f32", "float16": "f16", "fp16": "f16", "bfloat16": "bf16",
          "f8_e4m3": "fp8", "e4m3": "fp8", "q8": "q8_0", "q4": "q4_0"}
CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "fp8")


def cache_type(name, dtype: torch.dtype) -> str:
    """The canonical name of a cache type (None: the model's dtype); KilnError for an unknown one."""
    if name is None:
        return next((k for k, v in _DENSE.items() if v == dtype), None)
    key = _NAMES.get(str(name).lower(), str(name).lower())
    if key not in CACHE_TYPES:
        raise KilnError(f"unknown KV cache type {name!r}; known: {', '.join(CACHE_TYPES)}")
    return key


def quantize_q8_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) → int8 q (..., D), fp16 scales (..., D/32)."""
    xb = x.float().unflatten(-1, (-1, QK))  # (..., D/32, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    q = (xb / torch.where(d == 0, 1.0, d)).round().clamp(-127, 127).to(torch.int8)
    return q.flatten(-2), d.squeeze(-1).to(torch.float16)


def dequantize_q8_0(q: torch.Tensor, d: torch.Tensor, dtype) -> torch.Tensor:
    return (q.unflatten(-1, (-1, QK)).float() * d.float()[..., None]).flatten(-2).to(dtype)


def quantize_q4_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) → uint8 packed q (..., D/2), fp16 scales (..., D/32)."""
    xb = x.float().unflatten(-1, (-1, QK))  # (..., D/32, 32)
    mx = xb.gather(-1, xb.abs().argmax(-1, keepdim=True))  # signed element of largest magnitude
    d = mx / -8
    q = (xb / torch.where(d == 0, 1.0, d) + 8.5).clamp(0, 15.99).to(torch.uint8).clamp(max=15)
    packed = q[..., :QK // 2] | (q[..., QK // 2:] << 4)  # (..., D/32, 16)
    return packed.flatten(-2), d.squeeze(-1).to(torch.float16)


def dequantize_q4_0(packed: torch.Tensor, d: torch.Tensor, dtype) -> torch.Tensor:
    p = packed.unflatten(-1, (-1, QK // 2))  # (..., D/32, 16)
    q = torch.cat([p & 15, p >> 4], -1).float() - 8  # (..., D/32, 32)
    return (q * d.float()[..., None]).flatten(-2).to(dtype)


def encode(kind: str, x: torch.Tensor) -> tuple:
    if kind == "q8_0":
        return quantize_q8_0(x)
    if kind == "q4_0":
        return quantize_q4_0(x)
    if kind == "fp8":
        return (x.float().clamp(-448, 448).to(torch.float8_e4m3fn),)
    return (x,)  # dense: the cache's store casts


def decode(kind: str, parts, dtype) -> torch.Tensor:
    if kind == "q8_0":
        return dequantize_q8_0(*parts, dtype)
    if kind == "q4_0":
        return dequantize_q4_0(*parts, dtype)
    return parts[0] if parts[0].dtype == dtype else parts[0].to(dtype)


def layout(kind: str, d: int) -> list[tuple[int, torch.dtype]]:
    """(width, dtype) of each stored part for head dim d."""
    if kind == "q8_0":
        return [(d, torch.int8), (d // QK, torch.float16)]
    if kind == "q4_0":
        return [(d // 2, torch.uint8), (d // QK, torch.float16)]
    return [(d, _DENSE[kind])]


# ---------------------------------------------------------------- the rotated basis of block types
# A block's scale is set by its largest element: a key with a few channels ~100x the rest (Qwen2.5's keys
# carry its k bias in a few low-frequency RoPE channels, and a high-frequency positional pair in layer 0)
# quantizes the rest of that block to nothing. So q8_0 / q4_0 store keys and values rotated by an
# orthonormal Walsh-Hadamard matrix H along D (QuaRot; llama.cpp's attn_rot_k / attn_rot_v), which spreads
# a large channel over the block, and keys first less a fixed offset c per layer and head (the model's key
# bias, `models/base.key_offsets`). Attention is unchanged in exact arithmetic: the query is rotated the
# same way, q·H(k - c) = q·k - q·c with q·c the same for every key of a query (softmax does not see it),
# and the output over rotated values is rotated back, (Σ p_i H v_i) Hᵀ = Σ p_i v_i.


def hadamard(d: int) -> torch.Tensor:
    """(D, D) float32 orthonormal Walsh-Hadamard matrix, block-diagonal in blocks of the largest power of two
    dividing d (the whole of d for 64, 128, 256; blocks of 32 for 96 or 160; of 64 for 192). Symmetric:
    H = Hᵀ = H⁻¹."""
    n = d & -d  # the largest power of two dividing d
    h = torch.ones(1, 1)
    while h.shape[0] < n:  # Sylvester: [[h, h], [h, -h]]
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return torch.block_diag(*[h / n ** 0.5] * (d // n))


class Basis:
    """Where a block-quantized type stores keys or values: `into(layer, x)` = (x - offset[layer]) H (float32),
    what is encoded; `back(layer, y)` its inverse (a context shift re-ropes keys in the model's basis);
    `rotate(x)` = x H for queries and `unrotate(x)` = x Hᵀ for attention outputs, in x's dtype."""

    def __init__(self, d: int, device, offset: torch.Tensor | None = None):
        self.h = hadamard(d).to(device)
        self.ht = self.h.T.contiguous()  # what takes an output over rotated values back (decode_attention's out_rot)
        self.offset = None if offset is None else offset.to(device, torch.float32)  # (L, K, D) or None
        self.name = f"hadamard{d & -d}" + ("-bias" if offset is not None else "")  # a prompt cache file's check

    def into(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        x = x.float() if self.offset is None else x.float() - self.offset[layer][:, None]  # (B, K, T, D)
        return x @ self.h

    def back(self, layer: int, y: torch.Tensor) -> torch.Tensor:
        y = y.float() @ self.h.T
        return y if self.offset is None else y + self.offset[layer][:, None]

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() @ self.h).to(x.dtype)

    def unrotate(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() @ self.ht).to(x.dtype)


BLOCK_TYPES = ("q8_0", "q4_0")  # the types stored rotated (by default)


def basis_for(kind: str, d: int, device, rotate: bool | None, offset=None) -> Basis | None:
    """The basis a type is stored in: rotated for a block type (rotate None), for every type (True: a test's
    f32 cache in the rotated basis, exact), or for none (False: llama.cpp's layout before its rotation)."""
    return Basis(d, device, offset) if (kind in BLOCK_TYPES if rotate is None else rotate) else None
