"""GGUF weights kept quantized on the GPU: a lossless repacked layout, fused GEMVs and a dequantizer in Triton.

Owns: the packed layout (`PackedWeight`, built once at load by `repack` — plain torch, runs on the tensor's
device), its plain-torch twin `dequantize_ref` (the obviously correct path the kernels are tested against),
the Triton kernels behind `gemv` (x (M, K) with M <= 8 times a packed (N, K) weight, dequantization fused —
the decode hot path): the int8-activation kernels (`_gemv_q8_kernel` for one row, `_gemm_q8_kernel` for
2..8; x quantized per 32 values by `quantize_act` or by the kernel that produced it, kiln.ops.q8; dp4a
integer dot products; the table's choice for 16-bit x in INT8_FORMATS) and the float kernel
(`_gemv_kernel`: float32 accumulation of exact dequantized weights — float32 x, IQ4, prologues, tl.dot
tiles), `dequantize_gpu` (packed -> dense (N, K), for the prefill matmul), and the launch-config table
`GEMV_CONFIGS` with the int8 kernels' per-shape rows (`_q8_table_rows`) and `gemv_max_rows`, and
`gemm_mma` (9..32 rows of x, a server's batched decode step: tensor-core products per field with the
weights dequantized in registers; `mma_config` says where it beats dequantize + cuBLAS).
Not: the GGUF byte layouts' reference dequantizers (legacy.py, kquants.py, iquants.py, which this file is
tested bit-exact against), the nn.Module and the dispatch by batch size (linear.py), quantizing, CPU speed.

Formats: Q4_0 Q4_1 Q5_0 Q5_1 Q8_0, Q2_K Q3_K Q4_K Q5_K Q6_K, IQ4_NL IQ4_XS.

The packed layout. A GGUF block interleaves scales and quants, scatters a block's weights over its bytes in
format-specific lane orders, and is 18, 34, 110 or 210 bytes long, so loads of it are unaligned and every
format needs its own index arithmetic. `repack` splits each tensor into planes, each row-major (N, ·):
  qs  int32 words of G fields of b = 32 / G bits (4-bit: G = 8; 2-bit: G = 16; Q8_0's bytes: G = 4), the low
      bits of every weight, all unsigned (Q8_0's int8 q is stored as q + 128). Words come in groups of V = 4
      (one 128-bit load) holding V*G consecutive weights: field f of word j of a group is weight
      field_offset(f) + j — with L = G / 4 fields per byte and f = m*L + l, offset l*4V + m*V — so that the
      fields sharing byte position l of the four words are one run of 16 consecutive weights (one dp4a
      operand per word: `(word >> b*l) & mask`, all of one sub-block; the activations are stored in the same
      order, kiln.ops.q8).
  qh  int8 or int16, one element per qs word: the high bits of that word's fields, field f at bits
      [h*f, h*f + h) (h = 1 for Q5_0, Q5_1, Q5_K, Q3_K; 2 for Q6_K).
  sc, mn  uint8 or int8, one per sub-block: the 6-bit scale (and min) already decoded from GGUF's packed
      12-byte form (Q3_K, Q4_K, Q5_K, IQ4_XS: +4, +4, +4, +2 bytes per super-block, at most +3.7%).
  d, dm   int16, one per GGUF block: the f16 block scale (and min / dmin) as raw bits — bits, not float16,
      so that `model.to(dtype)` cannot round them.
Why this order: a thread that loads four words (128 bits) extracts field f from each with the same mask, in
the registers the words were loaded into — no shuffles or shared-memory round trips — and the four
activations those fields multiply, x[field_offset(f) + j], j = 0..3, are contiguous (one 64-bit load). All
fields of a word share their block scale; a sub-block (16 or 32 weights) is a set of whole fields of a group
(sub-block s of 16: the fields f with f % L == s).

Per format (the weight formula is gguf-py's, evaluated in the same float32 order by dequantize_gpu):
  Q4_0   qs 4b                  d              w = d * (q - 8)
  Q4_1   qs 4b                  d, dm = m      w = d * q + m
  Q5_0   qs 4b + qh 1b          d              w = d * (q - 16)
  Q5_1   qs 4b + qh 1b          d, dm = m      w = d * q + m
  Q8_0   qs 8b (q + 128)        d              w = d * q
  Q2_K   qs 2b   sc u8 (lo nibble scale, hi nibble min, per 16)   d, dm = dmin (per 256)  w = d*sc*q - dmin*min
  Q3_K   qs 2b + qh 1b   sc i8 (-32..31, per 16)                  d                       w = d*sc * (q - 4)
  Q4_K   qs 4b   sc u8, mn u8 (per 32)                            d, dm = dmin            w = d*sc*q - dmin*mn
  Q5_K   qs 4b + qh 1b   sc u8, mn u8 (per 32)                    d, dm = dmin            w = d*sc*q - dmin*mn
  Q6_K   qs 4b + qh 2b   sc i8 (per 16)                           d                       w = d*sc * (q - 32)
  IQ4_NL qs 4b                  d              w = d * KVALUES[q]
  IQ4_XS qs 4b   sc i8 (-32..31, per 32)                          d                       w = d*sc * KVALUES[q]

How the GEMV spends its instructions (PERF-GUIDE.md, "A 4-bit GEMV can be ALU-bound"): a program owns BN
rows and walks K in steps of W words per row, as (BN, NG, V) tiles — rows, groups, the four words of a
128-bit load — so every field is one elementwise op on the registers the words were loaded into. Per field
f (unrolled) and weight: one LOP3 masks the code *where it lies* in its word (no shift; the top fields
come from one copy of the word shifted right once) and ORs in 0x4B000000, whose float32 reading is
2^23 + code * 2^pos; one FADD takes 2^23 away (that replaces an int -> float conversion, which runs at
quarter rate; GemvConfig.cvt = 1 uses the plain conversion instead); one FFMA multiplies by the activation,
pre-scaled by 2^-pos once per thread and shared by the thread's rows. High bits (Q5, Q6_K, Q3_K) cost a
shift and a LOP3 more. Scales are factored out of the inner loop per sub-block:
sum((d*sc*q - dmin*m) * x) = d*sc * sum(q*x) - dmin*m * sum(x), and formats with an offset (Q4_0's
q - 8, ...) use the same sum(x) term. The accumulator (BN, [M,] NG) stays in registers and is reduced
across threads once, after the loop. Split-K (a second grid axis; float32 partials summed by a tiny
second kernel) and smaller BN fill the SMs when N is small. For 2 <= M <= 8 (int8 aside) the default is the tl.dot
variant (dense tiles in x's dtype on the tensor cores: the FMA form costs M FMAs per weight). The K loop's
trip count is a compile-time constant (K is specialized: a model has a handful of distinct K), which also
lets the Triton interpreter used by the CPU tests run the kernels. Instruction counts of the compiled
sm_90 loop (nvdisasm, no GPU needed) guided these choices; timings come from bench/gpu_quant_check.py.
`dequantize_gpu` and the tl.dot path build dense tiles (BN, NG, G, V) — natural weight order — with
`_codes` and `_scales`, in gguf-py's float32 order (exact; no FMA contraction in dequantize_gpu).

Shape alphabet: M activation rows (tokens), N weight rows (out features), K weights per row (in features),
BN rows per program, W packed words per row per K step, G fields per word, V = 4 words per group,
NG = W / V groups per step, MX activation rows per tile (M rounded up to a power of two; >= 16 for tl.dot).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, fields, replace

import torch

from kiln.errors import KilnError
from kiln.ops import HAVE_TRITON, jit, tl, triton, use_triton
from kiln.ops import pdl
from kiln.ops.q8 import store_q8

__all__ = ["FORMATS", "GEMV_CONFIGS", "GemvConfig", "PackedWeight", "Prologue", "repack", "dequantize_ref", "gemv",
           "gemv_config", "dequantize_gpu", "use_triton", "HAVE_TRITON", "MAX_GEMV_M", "gemv_max_rows", "INT8_FORMATS", "QuantAct",
           "quantize_act", "empty_act", "takes_int8", "MMA_FORMATS", "MAX_MMA_M", "MmaConfig", "gemm_mma",
           "mma_config"]

# Activation rows the GEMV takes; more go through dequantize_gpu + cuBLAS. Measured in-graph on the H100 at
# Llama-3.2-1B's shapes (bench/results/2026-11-26-h100/int8_ab_batch.json): up to 8 rows the int8 kernel
# beats dequantize + cuBLAS on Q4_K (16384x2048: 16.5 / 23.5 / 42.6 µs at 2 / 4 / 8 rows vs 62; the tl.dot
# tiles 43 / 47 / 57), from 16 rows dequantize + cuBLAS wins (62 vs 100); on Q6_K it wins from 2 rows
# (2048x8192: 31 µs vs 44 int8, 33 tl.dot) — `gemv_max_rows`.
MAX_GEMV_M = 8
MAX_INT8_M = 8  # rows the int8 kernels take

# GGML type ids (gguf.GGMLQuantizationType), spelled out so that this file needs no gguf import.
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 2, 3, 6, 7, 8
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = 10, 11, 12, 13, 14
IQ4_NL, IQ4_XS = 20, 23

# Values of IQ4 codes 0..15 (llama.cpp kvalues_iq4nl; kiln/quant/iquants.py KVALUES).
KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclass(frozen=True)
class Format:
    """One GGUF type's block geometry and packed planes."""

    name: str
    block: int                   # weights per GGUF block
    type_size: int               # bytes per GGUF block
    g: int                       # weights per qs word (and per qh element)
    sub: int                     # weights per sc / mn entry (== block where there are no sub-block scales)
    qh: torch.dtype | None       # high-bit plane element type
    sc: torch.dtype | None       # sub-block scale plane
    mn: bool = False             # 6-bit sub-block mins (Q4_K, Q5_K)
    dm: bool = False             # a second f16 per block: Q4_1/Q5_1 min, Q2_K/Q4_K/Q5_K dmin
    has_min: bool = False        # w = dl * q - ml (else w = dl * q)

    def packed_bytes(self, k: int) -> int:
        """Bytes of one packed row of k weights."""
        nb, ns = k // self.block, k // self.sub
        n = k // self.g * 4 + nb * 2 * (1 + self.dm)
        if self.qh is not None:
            n += k // self.g * self.qh.itemsize
        return n + ns * ((self.sc is not None) + self.mn)


FORMATS: dict[int, Format] = {
    Q4_0: Format("Q4_0", 32, 18, 8, 32, None, None),
    Q4_1: Format("Q4_1", 32, 20, 8, 32, None, None, dm=True, has_min=True),
    Q5_0: Format("Q5_0", 32, 22, 8, 32, torch.int8, None),
    Q5_1: Format("Q5_1", 32, 24, 8, 32, torch.int8, None, dm=True, has_min=True),
    Q8_0: Format("Q8_0", 32, 34, 4, 32, None, None),
    Q2_K: Format("Q2_K", 256, 84, 16, 16, None, torch.uint8, dm=True, has_min=True),
    Q3_K: Format("Q3_K", 256, 110, 16, 16, torch.int16, torch.int8),
    Q4_K: Format("Q4_K", 256, 144, 8, 32, None, torch.uint8, mn=True, dm=True, has_min=True),
    Q5_K: Format("Q5_K", 256, 176, 8, 32, torch.int8, torch.uint8, mn=True, dm=True, has_min=True),
    Q6_K: Format("Q6_K", 256, 210, 8, 16, torch.int16, torch.int8),
    IQ4_NL: Format("IQ4_NL", 32, 18, 8, 32, None, None),
    IQ4_XS: Format("IQ4_XS", 256, 136, 8, 32, None, torch.int8),
}

_PLANES = ("qs", "qh", "sc", "mn", "d", "dm")


@dataclass
class PackedWeight:
    """A (N, K) GGUF weight as planes (module docstring); None for planes the format lacks."""

    qtype: int
    shape: tuple[int, int]
    qs: torch.Tensor
    d: torch.Tensor
    qh: torch.Tensor | None = None
    sc: torch.Tensor | None = None
    mn: torch.Tensor | None = None
    dm: torch.Tensor | None = None

    @property
    def fmt(self) -> Format:
        return FORMATS[self.qtype]

    @property
    def device(self) -> torch.device:
        return self.qs.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.planes().values())

    def planes(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in _PLANES if getattr(self, k) is not None}

    def to(self, device) -> PackedWeight:
        return replace(self, **{k: v.to(device) for k, v in self.planes().items()})


def _format(qtype: int) -> Format:
    fmt = FORMATS.get(int(qtype))
    if fmt is None:
        names = ", ".join(f.name for f in FORMATS.values())
        raise KilnError(f"GGUF tensor type id {qtype} has no quantized GPU kernel (kernels exist for {names}); "
                        "keep it as a dense nn.Linear")
    return fmt


# ---------------------------------------------------------------- repack (torch, once at load)

V = 4  # qs words per group: one 128-bit load

# Weights repacked per step: bounds the temporaries (a few bytes per weight) on huge embedding matrices.
_REPACK_WEIGHTS = 1 << 24


def _fields(b: torch.Tensor, bits: int) -> torch.Tensor:
    """Bytes (..., L) uint8 -> their bit-fields (..., L, 8 / bits), lowest first."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=b.device)
    return (b.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)


def _lanes(b: torch.Tensor, lane: int, bits: int) -> torch.Tensor:
    """GGUF's lane order -> weight order: (R, nb, L) bytes -> (R, nb * L * 8 / bits) codes.

    The bytes run in groups of `lane`; field f of byte l in group h is weight h*lane*F + f*lane + l.
    """
    r, nb, n = b.shape
    f = _fields(b.reshape(r, nb, n // lane, lane), bits)               # (R, nb, groups, lane, F)
    return f.transpose(-1, -2).reshape(r, -1)                          # (R, nb, groups, F, lane) flattened


def _bit_order(b: torch.Tensor) -> torch.Tensor:
    """(R, nb, L) bytes whose bit i of byte l is weight 8*l + i (Q5_0/Q5_1 qh) -> (R, nb * L * 8) codes."""
    return _fields(b, 1).reshape(b.shape[0], -1)


def field_offset(f: int, g: int) -> int:
    """Where field f of a group's words starts in weight order: weight field_offset(f, G) + j of the group
    is field f of word j. With L = G / 4 fields per byte, field f = m*L + l sits at l*4V + m*V: the fields
    one byte position shares (l fixed) cover one run of 4V = 16 consecutive weights."""
    per_byte = g // 4
    return (f % per_byte) * 4 * V + (f // per_byte) * V


def _field_major(codes: torch.Tensor, g: int) -> torch.Tensor:
    """Weight order -> packed order: (R, K) -> (R, K), weight field_offset(f) + j of each group to position
    j*G + f."""
    r, per_byte = codes.shape[0], g // 4
    return codes.reshape(r, -1, per_byte, 4, V).permute(0, 1, 4, 3, 2).reshape(r, -1)


def _weight_order(codes: torch.Tensor, g: int) -> torch.Tensor:
    """The inverse of `_field_major`."""
    r, per_byte = codes.shape[0], g // 4
    return codes.reshape(r, -1, V, 4, per_byte).permute(0, 1, 4, 3, 2).reshape(r, -1)


def _pack(codes: torch.Tensor, bits: int, g: int, dtype: torch.dtype) -> torch.Tensor:
    """Codes (R, K) in weight order -> a plane (R, ·) of dtype: G fields per qs word, field-major groups."""
    c = _field_major(codes, g)
    per_byte = 8 // bits
    c = c.reshape(c.shape[0], -1, per_byte)                            # (R, K / per_byte, per_byte)
    out = c[..., 0].clone()
    for i in range(1, per_byte):
        out |= c[..., i] << (bits * i)
    return out.view(dtype)  # little-endian: byte 0 holds the lowest fields of an element


def _f16_bits(b: torch.Tensor, offset: int) -> torch.Tensor:
    """The f16 at byte `offset` of every block, as raw int16 bits: (R, nb, TS) -> (R, nb)."""
    return b[..., offset:offset + 2].contiguous().view(torch.int16).squeeze(-1)


def _bytes(b: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Bytes [lo, hi) of every block as one row: (R, nb, TS) -> (R, nb * (hi - lo)) uint8."""
    return b[..., lo:hi].reshape(b.shape[0], -1)


def _q3_k_scales(s: torch.Tensor) -> torch.Tensor:
    """(R, nb, 12) packed bytes -> (R, nb * 16) int8 in -32..31 (kquants._q3_k_scales)."""
    lo = torch.cat([s[..., 0:8] & 0xF, s[..., 0:8] >> 4], dim=-1)       # scale j<8: lo nibble of byte j
    hi = torch.stack([(s[..., 8:12] >> (2 * i)) & 3 for i in range(4)], dim=-2).flatten(-2)  # j: byte 8+j%4
    return ((lo | (hi << 4)).view(torch.int8) - 32).reshape(s.shape[0], -1)


def _k_scales_mins(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K (R, nb, 12) packed bytes -> 6-bit scales and mins, each (R, nb * 8) uint8."""
    a, b, c = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    scales = torch.cat([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], dim=-1)
    mins = torch.cat([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], dim=-1)
    return scales.reshape(s.shape[0], -1), mins.reshape(s.shape[0], -1)


def _iq4_xs_scales(b: torch.Tensor) -> torch.Tensor:
    """IQ4_XS blocks (R, nb, 136) -> (R, nb * 8) int8 in -32..31."""
    lo = _fields(b[..., 4:8], 4).flatten(-2)                           # sub-block s: nibble s%2 of byte s//2
    h = b[..., 2:4].contiguous().view(torch.int16).squeeze(-1).int() & 0xFFFF     # (R, nb) u16
    hi = torch.stack([(h >> (2 * s)) & 3 for s in range(8)], dim=-1).to(torch.uint8)
    return ((lo | (hi << 4)).view(torch.int8) - 32).reshape(b.shape[0], -1)


def _repack_rows(b: torch.Tensor, qtype: int) -> dict[str, torch.Tensor]:
    """GGUF blocks of R rows (R, nb, type_size) uint8 -> that slice of every plane."""
    f16 = lambda off: _f16_bits(b, off)  # noqa: E731
    nib = lambda lo, hi, lane: _pack(_lanes(b[..., lo:hi], lane, 4), 4, 8, torch.int32)  # noqa: E731
    five = lambda lo, hi: _pack(_bit_order(b[..., lo:hi]), 1, 8, torch.int8)  # noqa: E731
    if qtype in (Q4_0, IQ4_NL):
        return dict(qs=nib(2, 18, 16), d=f16(0))
    if qtype == Q4_1:
        return dict(qs=nib(4, 20, 16), d=f16(0), dm=f16(2))
    if qtype == Q5_0:
        return dict(qs=nib(6, 22, 16), qh=five(2, 6), d=f16(0))
    if qtype == Q5_1:
        return dict(qs=nib(8, 24, 16), qh=five(4, 8), d=f16(0), dm=f16(2))
    if qtype == Q8_0:  # stored as q + 128 (sign bit flipped): unsigned like every other format's codes
        return dict(qs=_pack(_bytes(b, 2, 34) ^ 0x80, 8, 4, torch.int32), d=f16(0))
    if qtype == Q2_K:
        return dict(qs=_pack(_lanes(b[..., 16:80], 32, 2), 2, 16, torch.int32), sc=_bytes(b, 0, 16),
                    d=f16(80), dm=f16(82))
    if qtype == Q3_K:
        return dict(qs=_pack(_lanes(b[..., 32:96], 32, 2), 2, 16, torch.int32),
                    qh=_pack(_lanes(b[..., 0:32], 32, 1), 1, 16, torch.int16),
                    sc=_q3_k_scales(b[..., 96:108]), d=f16(108))
    if qtype in (Q4_K, Q5_K):
        sc, mn = _k_scales_mins(b[..., 4:16])
        if qtype == Q4_K:
            return dict(qs=nib(16, 144, 32), sc=sc, mn=mn, d=f16(0), dm=f16(2))
        return dict(qs=nib(48, 176, 32), qh=_pack(_lanes(b[..., 16:48], 32, 1), 1, 8, torch.int8),
                    sc=sc, mn=mn, d=f16(0), dm=f16(2))
    if qtype == Q6_K:
        return dict(qs=nib(0, 128, 64), qh=_pack(_lanes(b[..., 128:192], 32, 2), 2, 8, torch.int16),
                    sc=_bytes(b, 192, 208).view(torch.int8), d=f16(208))
    assert qtype == IQ4_XS
    return dict(qs=nib(8, 136, 16), sc=_iq4_xs_scales(b), d=f16(0))


def repack(raw: torch.Tensor, qtype: int, shape: tuple[int, int]) -> PackedWeight:
    """A GGUF tensor's raw bytes (uint8, (N, row_bytes) or flat) -> PackedWeight on raw's device. Lossless."""
    fmt = _format(qtype)
    if len(shape) != 2:
        raise KilnError(f"{fmt.name} weight of shape {tuple(shape)}: a linear weight must be 2-D (N, K)")
    n, k = (int(s) for s in shape)
    if k % fmt.block:
        raise KilnError(f"{fmt.name} weight of shape {(n, k)}: row length {k} is not a multiple of its block "
                        f"size {fmt.block}")
    row_bytes = k // fmt.block * fmt.type_size
    if raw.dtype != torch.uint8 or raw.numel() != n * row_bytes:
        raise KilnError(f"{fmt.name} weight of shape {(n, k)} needs {n * row_bytes} bytes as uint8, got "
                        f"{raw.numel()} of {raw.dtype}; the file is truncated or its header is wrong")
    blocks = raw.reshape(n, k // fmt.block, fmt.type_size)             # (N, nb, type_size)
    step = max(1, _REPACK_WEIGHTS // k)
    parts = [_repack_rows(blocks[i:i + step], int(qtype)) for i in range(0, n, step)]
    # contiguous: a one-block row's byte slice reshapes to a strided view, and the kernels index planes
    # as dense row-major arrays
    planes = {name: torch.cat([p[name] for p in parts]) if len(parts) > 1 else parts[0][name].contiguous()
              for name in parts[0]}
    return PackedWeight(int(qtype), (n, k), **planes)


# ---------------------------------------------------------------- the slow, obviously correct twin

def _unpack(plane: torch.Tensor, bits: int, g: int) -> torch.Tensor:
    """A plane (N, ·) of any integer type -> its codes in weight order, (N, K) uint8."""
    b = plane.contiguous().view(torch.uint8)
    return _weight_order(_fields(b, bits).reshape(b.shape[0], -1), g)


def _sub_scales(w: PackedWeight, d: torch.Tensor, dm: torch.Tensor | None):
    """Per-sub-block float32 dl and ml (or None), each (N, K / sub), formed as gguf-py forms them."""
    n, fmt = w.shape[0], w.fmt
    if w.sc is None:                                                   # one scale per block
        return d, (None if dm is None else -dm)  # Q4_1/Q5_1: d*q + m == d*q - (-m), exactly
    per_block = fmt.block // fmt.sub
    sc = w.sc.view(n, -1, per_block)                                   # (N, nb, sub-blocks)
    if w.qtype == Q2_K:                                                # one byte: lo nibble scale, hi min
        return ((d.unsqueeze(-1) * (sc & 0xF)).reshape(n, -1),
                (dm.unsqueeze(-1) * (sc >> 4)).reshape(n, -1))
    dl = (d.unsqueeze(-1) * sc).reshape(n, -1)
    return dl, ((dm.unsqueeze(-1) * w.mn.view(n, -1, per_block)).reshape(n, -1) if fmt.mn else None)


def dequantize_ref(w: PackedWeight) -> torch.Tensor:
    """PackedWeight -> (N, K) float32 in plain torch, bit-identical to kiln.quant.dequantize of the GGUF bytes.

    The float operations are gguf-py's, in its order: sub-block scales dl = d * sc formed first in float32,
    then dl * q (- ml); Q4_1/Q5_1 round d * q before adding m.
    """
    fmt, (n, k) = w.fmt, w.shape
    d = w.d.view(torch.float16).float()                                # (N, K / block)
    dm = w.dm.view(torch.float16).float() if w.dm is not None else None
    if w.qtype == Q8_0:
        q = _unpack(w.qs, 8, fmt.g).int() - 128                        # (N, K) -128..127
    else:
        bits = 32 // fmt.g
        q = _unpack(w.qs, bits, fmt.g).int()                           # (N, K) low bits
        if w.qh is not None:
            q |= _unpack(w.qh, 2 if w.qtype == Q6_K else 1, fmt.g).int() << bits
    if w.qtype in (IQ4_NL, IQ4_XS):
        qf = torch.tensor(KVALUES, dtype=torch.float32, device=q.device)[q]
    else:
        qf = (q - {Q4_0: 8, Q5_0: 16, Q3_K: 4, Q6_K: 32}.get(w.qtype, 0)).float()
    dl, ml = _sub_scales(w, d, dm)
    y = qf.view(n, dl.shape[1], -1) * dl.unsqueeze(-1)                 # (N, sub-blocks, weights in one)
    if ml is not None:
        y = y - ml.unsqueeze(-1)
    return y.view(n, k)


# ---------------------------------------------------------------- Triton kernels

def _const(v):
    """A module-level constant a @triton.jit function may read (Triton accepts only tl.constexpr globals)."""
    return tl.constexpr(v) if HAVE_TRITON else v


_Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0 = (_const(v) for v in (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0))
_Q2_K, _Q3_K, _Q4_K, _Q5_K, _Q6_K = (_const(v) for v in (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K))
_IQ4_NL, _IQ4_XS = _const(IQ4_NL), _const(IQ4_XS)
_V = _const(V)


@jit
def _to_float(q, OFFSET: tl.constexpr, CVT: tl.constexpr):
    """Codes 0 <= q < 2^23 (int32) -> float32 q - OFFSET, exactly.

    CVT 0: the magic-number trick: (q | 0x4B000000) read as float32 is 2^23 + q, so one float subtraction
    (the offset folded in) replaces an int -> float conversion. CVT 1: the plain conversion (to compare).
    """
    if CVT == 0:
        f = (q | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)
    else:
        f = (q - OFFSET).to(tl.float32)
    return f


@jit
def _f16(bits):
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@jit
def _codes(words, hi, tab_ptr, g, FMT: tl.constexpr, CVT: tl.constexpr):
    """Field g (an int, or a tensor that broadcasts against the words) of qs words and of their high-bit
    elements hi (int32) -> float32 q, the integer part of weight = dl * q - ml, offset included (the dense
    path: exact, in gguf-py's order)."""
    if FMT == _Q8_0:
        q = _to_float((words >> (8 * g)) & 0xFF, 128, CVT)             # stored as q + 128
    elif FMT == _Q2_K:
        q = _to_float((words >> (2 * g)) & 3, 0, CVT)
    elif FMT == _Q3_K:
        q = _to_float(((words >> (2 * g)) & 3) | (((hi >> g) & 1) << 2), 4, CVT)
    else:
        lo = (words >> (4 * g)) & 0xF
        if FMT == _Q4_0:
            q = _to_float(lo, 8, CVT)
        elif FMT == _Q5_0:
            q = _to_float(lo | (((hi >> g) & 1) << 4), 16, CVT)
        elif FMT == _Q5_1 or FMT == _Q5_K:
            q = _to_float(lo | (((hi >> g) & 1) << 4), 0, CVT)
        elif FMT == _Q6_K:
            q = _to_float(lo | (((hi >> (2 * g)) & 3) << 4), 32, CVT)
        elif FMT == _IQ4_NL or FMT == _IQ4_XS:
            q = tl.load(tab_ptr + lo)  # a 16-entry code book, L1-resident
        else:  # Q4_1, Q4_K
            q = _to_float(lo, 0, CVT)
    return q


@jit
def _scales(sc_ptr, mn_ptr, sidx, mask, d, dmn, FMT: tl.constexpr):
    """Each element's sub-block scale and min, dl and ml (float32), from its block's d (and dmin / m) and its
    index sidx into the sc / mn planes. ml is d (unused) for formats without a min."""
    ml = d
    if FMT == _Q4_1 or FMT == _Q5_1:
        dl = d
        ml = -dmn  # d*q + m == d*q - (-m), exactly
    elif FMT == _Q2_K:
        s = tl.load(sc_ptr + sidx, mask=mask, other=0).to(tl.int32)   # uint8: lo nibble scale, hi min
        dl = d * (s & 0xF).to(tl.float32)
        ml = dmn * (s >> 4).to(tl.float32)
    elif FMT == _Q3_K or FMT == _Q6_K or FMT == _IQ4_XS:
        dl = d * tl.load(sc_ptr + sidx, mask=mask, other=0).to(tl.float32)
    elif FMT == _Q4_K or FMT == _Q5_K:
        dl = d * tl.load(sc_ptr + sidx, mask=mask, other=0).to(tl.float32)
        ml = dmn * tl.load(mn_ptr + sidx, mask=mask, other=0).to(tl.float32)
    else:
        dl = d
    return dl, ml


_constexpr_fn = triton.constexpr_function if HAVE_TRITON else (lambda fn: fn)


@_constexpr_fn
def _direct(b, h, g):
    """Can field g (b low bits + h high bits) be used where it lies in its word (below bit 23)?"""
    return b * g + b + h <= 23


@_constexpr_fn
def _pos(b, h, sh, g):
    """Bit position of field g's code in the value the GEMV converts: where it lies in its word, or in the
    word shifted right by sh for the top fields."""
    return b * g if b * g + b + h <= 23 else b * g - sh


@_constexpr_fn
def _x_scale(b, h, sh, g, table):
    """2^-pos: what the activations under field g are scaled by (1 for code-book formats, whose codes are
    looked up rather than converted in place)."""
    return 1.0 if table else 2.0 ** -(b * g if b * g + b + h <= 23 else b * g - sh)


@_constexpr_fn
def _fo(f, g):
    """field_offset(f, g) for a compile-time field index."""
    return (f % (g // 4)) * 16 + (f // (g // 4)) * 4


@jit
def _fo_t(f, G: tl.constexpr):
    """field_offset for a tensor of field indices."""
    return (f % (G // 4)) * (4 * _V) + (f // (G // 4)) * _V


@jit
def _move(v, n: tl.constexpr):
    """v << n for n >= 0, v >> -n otherwise (n a compile-time constant)."""
    if n >= 0:
        out = v << n
    else:
        out = v >> (-n)
    return out


@jit
def _gemv_code(words, words_sh, hi, tab_ptr, magic, g: tl.constexpr, FMT: tl.constexpr, B: tl.constexpr,
               H: tl.constexpr, SH: tl.constexpr, CVT: tl.constexpr):
    """Field g of the words as float32 code * 2^pos (pos = _pos(...)), offsets not applied: the GEMV's
    per-weight work. The code is masked where it lies instead of shifted down (one LOP3 with the magic OR
    folded in: `magic` is a runtime argument so the compiler keeps it in a register); the activations it
    multiplies are pre-scaled by 2^-pos, once per thread and shared by the thread's rows."""
    if FMT == _IQ4_NL or FMT == _IQ4_XS:
        q = tl.load(tab_ptr + ((words >> (4 * g)) & 0xF))
    else:
        src = words if _direct(B, H, g) else words_sh
        c = src & (((1 << B) - 1) << _pos(B, H, SH, g))
        if CVT == 0:
            c = c | magic  # before the high bits: (src & mask) | magic is one LOP3, so is (h & mask) | c
        if H > 0:  # the high bits of field g sit at H*g of its qh element: move them above the low bits
            c = c | (_move(hi, _pos(B, H, SH, g) + B - H * g) & (((1 << H) - 1) << (_pos(B, H, SH, g) + B)))
        if CVT == 0:
            q = c.to(tl.float32, bitcast=True) - 8388608.0
        else:
            q = c.to(tl.float32)
    return q


@jit
def _dense_tile(qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, tab_ptr, r, rmask, ng,
                KW: tl.constexpr, SUBS: tl.constexpr, FMT: tl.constexpr, G: tl.constexpr, WPB: tl.constexpr,
                GPS: tl.constexpr, SPG: tl.constexpr, HAS_QH: tl.constexpr, HAS_DM: tl.constexpr,
                HAS_MIN: tl.constexpr):
    """Weights of rows r (BN, 1, 1, 1) int64 and groups ng (NG,) as float32 (BN, NG, G, V) — element
    [n, i, f, j] is weight ng[i]*G*V + field_offset(f) + j of row r[n] — and the mask of the valid ones."""
    kw = ng[:, None, None] * _V + tl.arange(0, _V)[None, None, :]     # (NG, 1, V) word index
    mask = rmask & (kw < KW)[None, :, :, :]                            # (BN, NG, 1, V)
    words = tl.load(qs_ptr + r * KW + kw[None, :, :, :], mask=mask, other=0)
    hi = words
    if HAS_QH:
        hi = tl.load(qh_ptr + r * KW + kw[None, :, :, :], mask=mask, other=0).to(tl.int32)
    # Scales per (row, group) — or per (row, group, field) where a group spans sub-blocks — not per weight.
    gmask = rmask & (ng < KW // _V)[None, :, None, None]               # (BN, NG, 1, 1)
    blk = r * (KW // WPB) + (ng * _V // WPB)[None, :, None, None]
    d = _f16(tl.load(d_ptr + blk, mask=gmask, other=0))
    dmn = d
    if HAS_DM:
        dmn = _f16(tl.load(dm_ptr + blk, mask=gmask, other=0))
    g = tl.arange(0, G)[None, None, :, None]                           # (1, 1, G, 1)
    if SPG == 1:
        dl, ml = _scales(sc_ptr, mn_ptr, r * SUBS + (ng // GPS)[None, :, None, None], gmask, d, dmn, FMT)
    else:
        sidx = r * SUBS + (ng * SPG)[None, :, None, None] + g % SPG   # (BN, NG, G, 1): SPG == G / 4
        dl, ml = _scales(sc_ptr, mn_ptr, sidx, gmask & (g < G), d, dmn, FMT)
    w = _codes(words, hi, tab_ptr, g, FMT, 0) * dl
    if HAS_MIN:
        w = w - ml
    return w, mask & (g < G)


@jit
def _norm_prologue(x_ptr, r_ptr, h_ptr, eps, writer, KT: tl.constexpr, RES: tl.constexpr, WRITE: tl.constexpr):
    """1 / rms of the row x (+ r, rounded to x's dtype as ops.rms_norm rounds it) of KT elements; with
    WRITE, the program where `writer` holds stores that sum (the residual stream) to h."""
    acc = tl.zeros((1024,), dtype=tl.float32)
    for c in tl.static_range(0, KT, 1024):
        idx = c + tl.arange(0, 1024)
        m = idx < KT
        v = tl.load(x_ptr + idx, mask=m, other=0.0)
        if RES:
            v = (v.to(tl.float32) + tl.load(r_ptr + idx, mask=m, other=0.0).to(tl.float32)).to(v.dtype)
            if WRITE:
                tl.store(h_ptr + idx, v, mask=m & writer)
        vf = v.to(tl.float32)
        acc += vf * vf
    return tl.rsqrt(tl.sum(acc, axis=0) / KT + eps)


@jit
def _x_load(x_ptr, idx, mask, pa_ptr, pw_ptr, rstd, poff, KT: tl.constexpr, PRO: tl.constexpr,
            RES: tl.constexpr, OFF: tl.constexpr):
    """Activations at idx as float32, after the prologue: 0 none; 1 RMSNorm(x (+ r)) * (w (+ offset));
    2 silu(gate) * up, 3 gelu_tanh(gate) * up, where x is [gate | up] (2 KT wide). Each rounds to x's dtype
    where ops.rms_norm / ops.silu_mul round, so the product equals the unfused one."""
    if PRO == 0:
        v = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    elif PRO == 1:
        xv = tl.load(x_ptr + idx, mask=mask, other=0.0)
        if RES:
            xv = (xv.to(tl.float32) + tl.load(pa_ptr + idx, mask=mask, other=0.0).to(tl.float32)).to(xv.dtype)
        xf = xv.to(tl.float32)
        w = tl.load(pw_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        if OFF:
            y = xf * rstd * (poff + w)
        else:
            y = w * (xf * rstd).to(xv.dtype).to(tl.float32)
        v = y.to(xv.dtype).to(tl.float32)
    else:
        g = tl.load(x_ptr + idx, mask=mask, other=0.0)
        u = tl.load(x_ptr + KT + idx, mask=mask, other=0.0)
        gf = g.to(tl.float32)
        if PRO == 3:
            a = gf * tl.sigmoid(2.0 * (0.7978845608028654 * (gf + 0.044715 * gf * gf * gf)))
        else:
            a = gf * tl.sigmoid(gf)
        v = (a.to(g.dtype).to(tl.float32) * u.to(tl.float32)).to(g.dtype).to(tl.float32)
    return v


@jit
def _store_rows(y, y_ptr, b_ptr, rows, rmask, mi, M, N, pid_k, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    """A program's outputs y (BN, MX) for weight rows `rows` and activation rows mi < M: into y (M, N) in its
    dtype (+ bias), or with SPLIT_K > 1 as float32 partials (SPLIT_K, M, N) for _split_k_sum_kernel."""
    ymask = rmask & (mi < M)[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + mi[None, :] * N + rows[:, None], y.to(y_ptr.dtype.element_ty), mask=ymask)
    else:
        tl.store(y_ptr + (pid_k * M + mi[None, :]) * N + rows[:, None], y, mask=ymask)


@jit
def _gemv_kernel(x_ptr, y_ptr, b_ptr, qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, tab_ptr, qh32_ptr, N, stride_x,
                 magic, pa_ptr, pw_ptr, ph_ptr, eps, poff,
                 PRO: tl.constexpr, PRO_RES: tl.constexpr, PRO_OFF: tl.constexpr, PRO_H: tl.constexpr,
                 KW: tl.constexpr, SUBS: tl.constexpr, M: tl.constexpr, MX: tl.constexpr, FMT: tl.constexpr,
                 G: tl.constexpr, WPB: tl.constexpr, GPS: tl.constexpr, SPG: tl.constexpr,
                 HAS_QH: tl.constexpr, HAS_DM: tl.constexpr, HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr,
                 H: tl.constexpr, SH: tl.constexpr, OFFSET: tl.constexpr, GMIN: tl.constexpr,
                 BN: tl.constexpr, W: tl.constexpr, SPLIT_K: tl.constexpr, NIT: tl.constexpr,
                 CVT: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr):
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
    rstd = 0.0
    if PRO == 1:  # the RMSNorm folded in: this program's own pass over the whole row for 1/rms
        rstd = _norm_prologue(x_ptr, pa_ptr, ph_ptr, eps, (pid_n == 0) & (pid_k == 0), KW * G, PRO_RES, PRO_H)
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
            wt, _ = _dense_tile(qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, tab_ptr, r[:, :, None, None],
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
                hi = _high_bits(qh32_ptr, r, ng, gmask, KW, G, H)      # (BN, NG, V)
            d, dmn = _block_scales(d_ptr, dm_ptr, r, ng, gmask, KW, WPB, HAS_DM)   # (BN, NG)
            xo = ng[:, None] * (G * _V) + j[None, :]                   # (NG, V) weight under field 0
            xmask = (ng < KW // _V)[:, None] & (j < _V)[None, :]
            for s in tl.static_range(SPG):  # sub-block s of the group holds fields s, s + SPG, ...
                sidx = r * SUBS + ((ng // GPS) * SPG + s)[None, :]
                dl, ml = _scales(sc_ptr, mn_ptr, sidx, gmask, d, dmn, FMT)   # (BN, NG)
                if not HAS_MIN:
                    ml = dl * OFFSET  # sum((q - o) * x) = sum(q * x) - o * sum(x)
                for f in tl.static_range(FPS):
                    q = _gemv_code(words, words_sh, hi, tab_ptr, magic, f * SPG + s, FMT, 32 // G, H, SH, CVT)
                    if MX == 1:
                        xg = _x_load(x_ptr, xo + _fo(f * SPG + s, G), xmask, pa_ptr, pw_ptr, rstd, poff, KW * G,
                                     PRO, PRO_RES, PRO_OFF)
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
    _store_rows(y, y_ptr, b_ptr, rows, rmask, mi, M, N, pid_k, SPLIT_K, HAS_BIAS)


# ---------------------------------------------------------------- int8 activations: x quantized, dp4a dot products

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
            w = w | (_move(spread, B - H * k) & ((((1 << H) - 1) << B) * 0x01010101))
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
        spread = _spread(_high_bits(qh32_ptr, r, ng, gmask, KW, G, H), H if G == 8 else 2)
    d, dmn = _block_scales(d_ptr, dm_ptr, r, ng, gmask, KW, WPB, HAS_DM)
    return words, spread, ng, gok, gmask, d, dmn


@jit
def _high_bits(qh32_ptr, r, ng, gmask, KW: tl.constexpr, G: tl.constexpr, H: tl.constexpr):
    """The qh element of each word of groups ng of rows r (BN, 1), as int32 (BN, NG, V) whose low bits hold
    it. A group's high bits are 32 (Q5_*) or 64 (Q6_K, Q3_K) bits: one or two int32 loads."""
    j = tl.arange(0, _V)
    if G * H * _V == 32:
        hw = tl.load(qh32_ptr + r * (KW // _V) + ng[None, :], mask=gmask, other=0)             # (BN, NG)
        hi = hw[:, :, None] >> (j * (G * H))[None, None, :]                                    # (BN, NG, V)
    else:
        ha = tl.load(qh32_ptr + r * (KW // 2) + 2 * ng[None, :], mask=gmask, other=0)
        hb = tl.load(qh32_ptr + r * (KW // 2) + 2 * ng[None, :] + 1, mask=gmask, other=0)
        hi = tl.where((j < 2)[None, None, :], ha[:, :, None], hb[:, :, None])
        hi = hi >> ((j % 2) * 16)[None, None, :]                                                # (BN, NG, V)
    return hi


@jit
def _block_scales(d_ptr, dm_ptr, r, ng, gmask, KW: tl.constexpr, WPB: tl.constexpr, HAS_DM: tl.constexpr):
    """The f16 block scale d and dmin / m (d again where the format has none) of groups ng of rows r, as
    float32 (BN, NG)."""
    blk = r * (KW // WPB) + (ng * _V // WPB)[None, :]
    d = _f16(tl.load(d_ptr + blk, mask=gmask, other=0))
    dmn = d
    if HAS_DM:
        dmn = _f16(tl.load(dm_ptr + blk, mask=gmask, other=0))
    return d, dmn


@jit
def _gemv_q8_kernel(xq_ptr, xd_ptr, xs_ptr, y_ptr, b_ptr, qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, qh32_ptr, N,
                    KW: tl.constexpr, SUBS: tl.constexpr, FMT: tl.constexpr, G: tl.constexpr, WPB: tl.constexpr,
                    GPS: tl.constexpr, SPG: tl.constexpr, HAS_QH: tl.constexpr, HAS_DM: tl.constexpr,
                    HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr, H: tl.constexpr, OFFSET: tl.constexpr,
                    BN: tl.constexpr, W: tl.constexpr, NIT: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr):
    """y (1, N) = x @ w.T with x given as int8 codes (`_quantize_x_kernel`): per word of weights, one dp4a per
    byte position (4 weights of one 16-run), integer sums per sub-block, then
    sum(w * x) = dx * (dl * (sum(q * qx) - OFFSET * sum(qx)) - ml * sum(qx)) per sub-block.
    A program owns BN rows and walks K in steps of W words as (BN, NG, V) tiles; no split-K. With PDL the
    first step's weights are requested before waiting for the kernel that wrote x (kiln.ops.pdl)."""
    pdl.start(PDL)
    B: tl.constexpr = 32 // G
    L: tl.constexpr = 8 // B                                           # fields per byte = byte lanes per word
    RUNS: tl.constexpr = G * _V // 16                                  # 16-runs per group (== L)
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
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
                dl, ml = _scales(sc_ptr, mn_ptr, r * SUBS + (ng * SPG + k)[None, :], gmask, d, dmn, FMT)
                dot = tl.sum(_dp4a(wk, xk[None, :, :], tl.zeros_like(words), ASM), axis=2)   # (BN, NG)
                if HAS_MIN:
                    acc += (dl * dot.to(tl.float32) - ml * sk.to(tl.float32)[None, :]) * dx[None, :]
                else:
                    acc += dl * (dot - OFFSET * sk[None, :]).to(tl.float32) * dx[None, :]
        if SPG == 1:
            dx = tl.load(xd_ptr + (ng * RUNS) // 2, mask=gok, other=0.0)                      # (NG,)
            dl, ml = _scales(sc_ptr, mn_ptr, r * SUBS + (ng // GPS)[None, :], gmask, d, dmn, FMT)
            dot = tl.sum(isum, axis=2)                                 # (BN, NG)
            if HAS_MIN:
                acc += (dl * dot.to(tl.float32) - ml * ssum.to(tl.float32)[None, :]) * dx[None, :]
            else:
                acc += dl * (dot - OFFSET * ssum[None, :]).to(tl.float32) * dx[None, :]
    y = tl.sum(acc, axis=1)                                            # (BN,)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N)


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
                dl, ml = _scales(sc_ptr, mn_ptr, r * SUBS + (ng * SPG + k)[None, :], gmask, d, dmn, FMT)
                dot = tl.sum(_dp4a(wk, xk[None, :, :, :], tl.zeros_like(isum), ASM), axis=3)  # (BN, MX, NG)
                if HAS_MIN:
                    acc += (dl[:, None, :] * dot.to(tl.float32) - ml[:, None, :] * sk.to(tl.float32)[None]) * dx[None]
                else:
                    acc += dl[:, None, :] * (dot - OFFSET * sk[None]).to(tl.float32) * dx[None]
        if SPG == 1:
            dx = tl.load(xd_ptr + mi[:, None] * (KX // 32) + ((ng * RUNS) // 2)[None, :], mask=smask, other=0.0)
            dl, ml = _scales(sc_ptr, mn_ptr, r * SUBS + (ng // GPS)[None, :], gmask, d, dmn, FMT)
            dot = tl.sum(isum, axis=3)                                 # (BN, MX, NG)
            if HAS_MIN:
                acc += (dl[:, None, :] * dot.to(tl.float32) - ml[:, None, :] * ssum.to(tl.float32)[None]) * dx[None]
            else:
                acc += dl[:, None, :] * (dot - OFFSET * ssum[None]).to(tl.float32) * dx[None]
    y = tl.sum(acc, axis=2)                                            # (BN, MX)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + mi[None, :] * N + rows[:, None], y.to(y_ptr.dtype.element_ty), mask=rmask & mok[None, :])


@jit
def _split_k_sum_kernel(p_ptr, y_ptr, b_ptr, N, MN, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK: tl.constexpr):
    """y (M, N) = sum over splits of p (SPLIT_K, M, N) float32 (+ bias), cast to y's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(p_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@jit
def _dequant_kernel(out_ptr, qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, tab_ptr, N,
                    KW: tl.constexpr, SUBS: tl.constexpr, FMT: tl.constexpr, G: tl.constexpr, WPB: tl.constexpr,
                    GPS: tl.constexpr, SPG: tl.constexpr, HAS_QH: tl.constexpr, HAS_DM: tl.constexpr,
                    HAS_MIN: tl.constexpr, BN: tl.constexpr, W: tl.constexpr):
    """out (N, K) = the dense weight, BN rows x W words per program. Launched without FMA contraction, so
    `dl * q - ml` rounds twice, exactly as gguf-py does."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    r = rows.to(tl.int64)[:, None, None, None]                         # (BN, 1, 1, 1)
    ng = tl.program_id(1) * (W // _V) + tl.arange(0, W // _V)          # (NG,)
    w, _ = _dense_tile(qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, tab_ptr, r,
                       (rows < N)[:, None, None, None], ng, KW, SUBS, FMT, G, WPB, GPS, SPG, HAS_QH, HAS_DM,
                       HAS_MIN)
    # Back to weight order in registers (field f = m*L + l of word j is weight l*4V + m*V + j of its group), so
    # that each row's stores are contiguous: (BN, NG, 4, L, V) -> (BN, NG, L, 4, V) -> (BN, W*G).
    L: tl.constexpr = G // 4
    wn = tl.reshape(tl.permute(tl.reshape(w.to(out_ptr.dtype.element_ty), (BN, W // _V, 4, L, _V)),
                               (0, 1, 3, 2, 4)), (BN, W * G))
    cols = tl.program_id(1) * (W * G) + tl.arange(0, W * G)           # (W*G,) weight index in the row
    rr = rows.to(tl.int64)[:, None]
    tl.store(out_ptr + rr * (KW * G) + cols[None, :], wn, mask=(rows < N)[:, None] & (cols < KW * G)[None, :])


# ---------------------------------------------------------------- 9..32 rows: tensor-core tiles, one per field

@jit
def _mma_kernel(x_ptr, y_ptr, b_ptr, qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, N, M, stride_x,
                KW: tl.constexpr, SUBS: tl.constexpr, G: tl.constexpr, WPB: tl.constexpr, SUB: tl.constexpr,
                FMT: tl.constexpr, HAS_QH: tl.constexpr, HAS_DM: tl.constexpr, HAS_MIN: tl.constexpr,
                HAS_BIAS: tl.constexpr, BN: tl.constexpr, W: tl.constexpr, MX: tl.constexpr,
                SPLIT_K: tl.constexpr, NIT: tl.constexpr, NATURAL: tl.constexpr = False):
    """y (M, N) = x (M, K) @ w.T for 9..32 rows of x (a server's batched decode step): per K step of W
    words, one (MX, W) x (W, BN) tensor-core product per field f of the words, with the weights of that
    field dequantized in registers ((BN, W): one code per word) and the activations they multiply gathered
    in the same order (weight field_offset(f) + j of each four-word group): nothing is permuted. NATURAL:
    all fields of the step at once, permuted back to weight order in registers (as `_dequant_kernel`
    stores them), one (MX, W*G) x (W*G, BN) product with a contiguous x tile. SPLIT_K > 1: float32
    partials (SPLIT_K, M, N), summed by _split_k_sum_kernel."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BN + tl.arange(0, BN)
    r = rows.to(tl.int64)[:, None]                                     # (BN, 1)
    rmask = (rows < N)[:, None]
    mi = tl.arange(0, MX)
    xmask = (mi < M)[:, None]
    L: tl.constexpr = G // 4                                           # fields per byte of a word
    SPG: tl.constexpr = (_V * G) // SUB if SUB < _V * G else 1        # sub-blocks per four-word group
    acc = tl.zeros((MX, BN), dtype=tl.float32)
    for it in range(0, NIT):
        kw = (pid_k + it * SPLIT_K) * W + tl.arange(0, W)              # (W,) word index
        wmask = rmask & (kw < KW)[None, :]                             # (BN, W)
        words = tl.load(qs_ptr + r * KW + kw[None, :], mask=wmask, other=0)
        hi = words
        if HAS_QH:
            hi = tl.load(qh_ptr + r * KW + kw[None, :], mask=wmask, other=0).to(tl.int32)
        blk = r * (KW // WPB) + (kw // WPB)[None, :]
        d = tl.load(d_ptr + blk, mask=wmask, other=0).to(tl.float16, bitcast=True).to(tl.float32)
        dmn = d
        if HAS_DM:
            dmn = tl.load(dm_ptr + blk, mask=wmask, other=0).to(tl.float16, bitcast=True).to(tl.float32)
        # Weights as dequantize_gpu builds them (`_codes`, `_scales`: (q - offset) * dl [- ml]), in x's dtype.
        if SUB >= _V * G:  # a sub-block (or block) spans whole groups
            dl0, ml0 = _scales(sc_ptr, mn_ptr, r * SUBS + (kw // (SUB // G))[None, :], wmask, d, dmn, FMT)
            dl1, ml1 = dl0, ml0
        else:  # two sub-blocks of 16 per group (Q6_K): fields f % L == 0 and 1
            sidx = r * SUBS + (kw // _V * SPG)[None, :]
            dl0, ml0 = _scales(sc_ptr, mn_ptr, sidx, wmask, d, dmn, FMT)
            dl1, ml1 = _scales(sc_ptr, mn_ptr, sidx + 1, wmask, d, dmn, FMT)
        if NATURAL:  # all fields at once, back to weight order in registers, one product per step
            fi = tl.arange(0, G)[None, None, :]                        # (1, 1, G)
            if SPG == 2:
                dl3 = tl.where(fi % L == 1, dl1[:, :, None], dl0[:, :, None])
                ml3 = tl.where(fi % L == 1, ml1[:, :, None], ml0[:, :, None])
            else:
                dl3 = dl0[:, :, None]
                ml3 = ml0[:, :, None]
            w3 = _codes(words[:, :, None], hi[:, :, None], qs_ptr, fi, FMT, 0) * dl3
            if HAS_MIN:
                w3 = w3 - ml3
            w3 = w3.to(x_ptr.dtype.element_ty)                         # (BN, W, G)
            # [n, word, f]: word = 4*g + j, f = m*L + l -> weight g*4G + l*16 + m*4 + j of the step
            wn = tl.reshape(tl.permute(tl.reshape(w3, (BN, W // _V, _V, 4, L)), (0, 1, 4, 3, 2)), (BN, W * G))
            kx = (pid_k + it * SPLIT_K) * (W * G) + tl.arange(0, W * G)
            xt = tl.load(x_ptr + mi[:, None] * stride_x + kx[None, :], mask=xmask & (kx < KW * G)[None, :],
                         other=0.0)                                    # (MX, W*G)
            acc = tl.dot(xt, tl.trans(wn), acc)
        xbase = (kw // _V) * (_V * G) + kw % _V                        # (W,) weight under field 0
        for f in tl.static_range(0 if NATURAL else G):
            if SPG == 2 and f % L == 1:
                dl, ml = dl1, ml1
            else:
                dl, ml = dl0, ml0
            wt = _codes(words, hi, qs_ptr, f, FMT, 0) * dl
            if HAS_MIN:
                wt = wt - ml
            wt = wt.to(x_ptr.dtype.element_ty)                         # (BN, W)
            xt = tl.load(x_ptr + mi[:, None] * stride_x + (xbase + _fo(f, G))[None, :],
                         mask=xmask & (kw < KW)[None, :], other=0.0)  # (MX, W)
            acc = tl.dot(xt, tl.trans(wt), acc)                        # (MX, BN)
    y = tl.trans(acc)                                                  # (BN, MX)
    _store_rows(y, y_ptr, b_ptr, rows, rmask, mi, M, N, pid_k, SPLIT_K, HAS_BIAS)


# ---------------------------------------------------------------- launch configs and entry points

@dataclass(frozen=True)
class GemvConfig:
    """How `gemv` launches: rows per program, weights per row per K step, warps, split-K, code conversion."""

    block_n: int = 32
    block_k: int = 256       # a multiple of the format's V*G (32; 64 for Q2_K/Q3_K; 16 for Q8_0)
    num_warps: int = 4
    split_k: int = 0         # 0: pick from the grid size (`_auto_split_k`); 1: off; else that many
    cvt: int = 0             # 0: magic-number int -> float; 1: plain conversion (I2FP on sm_90)
    dot: bool = False        # M >= 2 only: dense tiles in x's dtype through tl.dot (x padded to 16 rows)
    num_stages: int | None = None   # None: Triton's default
    int8: bool = False       # M = 1, 16-bit x: quantize x to int8 per 32 and use dp4a (`_gemv_q8_kernel`)

    def __post_init__(self):
        for name in ("block_n", "block_k"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"GemvConfig.{name} must be a power of two, got {v}")


# The int8-activation GEMV on (the table's choice for M = 1 and 16-bit x) or off (float path everywhere):
# KILN_INT8=0 switches it off, for A/B measurements (bench/int8_ab.py) and as an escape hatch.
INT8 = os.environ.get("KILN_INT8", "1") != "0"

# Formats the int8-activation GEMV takes (the code-book IQ4 formats would need a table lookup per weight).
INT8_FORMATS = frozenset({Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K})

# Per format: (config for M == 1, config for 2 <= M <= 8; the int8 kernels take 16-bit x where they apply). Chosen from instruction and register counts of
# the compiled sm_90 code, not yet from timings: bench/gpu_quant_check.py times variants on the H100 — copy
# the winners here. 64 rows per program gives each thread 4 rows that share its activation loads; Q8_0
# (more registers per row) and the code-book formats (a gather per weight) get fewer.
_M1_WIDE = GemvConfig(block_n=64, block_k=256, num_warps=4)
# The int8-activation GEMV: block_n is the most rows per program (fewer while the grid is short of
# 2 programs per SM: no split-K), block_k the most weights per row per step. Measured in-graph on an H200
# (bench/int8_ab.py, bench/results/2026-11-26-h200/): 4 rows and whole rows up to 16384 weights per step
# were within ~5% of the best of a 24-config grid at every decode shape of Qwen3-0.6B, Llama-3.2-1B and
# Qwen3-8B but two (8B's Q6_K down projection: 18.5 vs 15.7 µs; 0.6B's gate/up: 3.8 vs 3.5 µs).
_M1_INT8 = GemvConfig(block_n=4, block_k=16384, num_warps=4, int8=True)
_M1_NARROW = GemvConfig(block_n=32, block_k=256, num_warps=4)
_MX = GemvConfig(block_n=32, block_k=256, num_warps=4, dot=True)
GEMV_CONFIGS: dict[int, tuple[GemvConfig, GemvConfig]] = {
    q: (_M1_INT8 if q in INT8_FORMATS else _M1_NARROW if q in (Q8_0, IQ4_NL, IQ4_XS) else _M1_WIDE, _MX)
    for q in FORMATS}
_DEFAULT = (_M1_NARROW, _MX)

_TARGET_PROGRAMS_PER_SM = 4  # split-K aims for at least this many programs per SM


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: any small number


def _auto_split_k(n_programs: int, n_steps: int, sms: int) -> int:
    """Double split-K while the grid is short of the target and each split keeps >= 2 K steps."""
    s = 1
    while n_programs * s < _TARGET_PROGRAMS_PER_SM * sms and n_steps >= 4 * s:
        s *= 2
    return s


def _shrink(cfg: GemvConfig, n: int, k: int, sms: int) -> GemvConfig:
    """A table config with fewer rows per program for small matrices, so that they still fill the SMs where
    split-K alone cannot (it keeps >= 2 K steps per split)."""
    bn, most_splits = cfg.block_n, max(1, triton.cdiv(k, cfg.block_k) // 2)
    while bn > 16 and triton.cdiv(n, bn) * most_splits < _TARGET_PROGRAMS_PER_SM * sms:
        bn //= 2
    return cfg if bn == cfg.block_n else replace(cfg, block_n=bn)


def _split(split_k: int, grid_n: int, n_steps: int, device: torch.device) -> int:
    """K splits of a launch: the config's (0: `_auto_split_k`), at most one per K step."""
    return max(1, min(split_k or _auto_split_k(grid_n, n_steps, _sm_count(device)), n_steps))


def _sum_splits(out: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None, split: int) -> torch.Tensor:
    """y (M, N) = the float32 partials out (split, M, N) summed (+ bias); y itself when split == 1."""
    if split > 1:
        m, n = y.shape
        block = 1024
        _split_k_sum_kernel[(triton.cdiv(m * n, block),)](
            out, y, bias if bias is not None else y, n, m * n, SPLIT_K=split, HAS_BIAS=bias is not None,
            BLOCK=block, num_warps=4)
    return y


@functools.lru_cache(maxsize=None)
def _kvalues(device: torch.device) -> torch.Tensor:
    # Created on the first call for a device, which must come before any CUDA-graph capture (as must
    # Triton's compilation of each shape).
    return torch.tensor(KVALUES, dtype=torch.float32, device=device)


def _plane_args(w: PackedWeight) -> list[torch.Tensor]:
    """qs, qh, sc, mn, d, dm, tab; a plane the format lacks is replaced by qs (never read)."""
    p = [w.qs if getattr(w, k) is None else getattr(w, k) for k in _PLANES]
    tab = _kvalues(w.device) if w.qtype in (IQ4_NL, IQ4_XS) else w.qs
    return p + [tab]


def _geometry(fmt: Format, k: int, block_k: int) -> dict:
    """The kernels' compile-time geometry for rows of k weights, block_k per step."""
    gw = V * fmt.g
    if block_k % gw:
        raise ValueError(f"block_k {block_k} is not a multiple of {fmt.name}'s {gw}-weight groups")
    spg, gps = (1, fmt.sub // gw) if fmt.sub >= gw else (gw // fmt.sub, 1)
    return dict(KW=k // fmt.g, SUBS=k // fmt.sub, G=fmt.g, WPB=fmt.block // fmt.g, GPS=gps, SPG=spg,
                HAS_QH=fmt.qh is not None, HAS_DM=fmt.dm, HAS_MIN=fmt.has_min, W=block_k // fmt.g)


_OFFSETS = {Q4_0: 8, Q5_0: 16, Q8_0: 128, Q3_K: 4, Q6_K: 32}  # weight = dl * (code - offset)
_MAGIC = 0x4B000000  # float32 2^23: (code | _MAGIC) read as float32 is 2^23 + code


def _gemv_constants(qtype: int) -> dict:
    fmt = FORMATS[qtype]
    return dict(H=2 if qtype == Q6_K else int(fmt.qh is not None), SH=16 if fmt.g == 4 else 12,
                OFFSET=_OFFSETS.get(qtype, 0), GMIN=qtype not in (IQ4_NL, IQ4_XS))


def gemv_config(w: PackedWeight, m: int, dtype: torch.dtype = torch.bfloat16) -> GemvConfig:
    """The table's config for this format, batch size and activation dtype. Float32 activations never take the tl.dot path: in float32
    it has no tensor-core form (input_precision="ieee") and spills registers."""
    cfg = GEMV_CONFIGS.get(w.qtype, _DEFAULT)[0 if m == 1 else 1]
    if cfg.dot and dtype == torch.float32:
        cfg = replace(cfg, dot=False, block_n=16)
    if cfg.int8 and (dtype == torch.float32 or not INT8):  # float32 activations stay exact: the float path
        cfg = _M1_NARROW if w.qtype == Q8_0 else _M1_WIDE
    return cfg


@dataclass
class Prologue:
    """Work folded into the GEMV's activation loads (M = 1): `kind` "norm" — x is normalized as
    ops.rms_norm(x, weight, eps, offset, residual) would, and with a residual the sum x + residual is
    written to `h` (K,) — or "silu" / "gelu" — x is [gate | up] (2K wide) and the GEMV reads
    silu(gate) * up (ops.silu_mul) or the tanh-GELU form."""

    kind: str
    weight: torch.Tensor | None = None
    eps: float = 1e-6
    offset: float = 0.0
    residual: torch.Tensor | None = None
    h: torch.Tensor | None = None

    @property
    def code(self) -> int:
        return {"norm": 1, "silu": 2, "gelu": 3}[self.kind]


@dataclass
class QuantAct:
    """Activation rows x (M, K) as the int8 GEMV reads them (`_quantize_x_kernel`): codes xq (K/4,) int32,
    scales xd (K/32,) float32, code sums per 16-run xs (K/16,) int32 — each (M, ·) for M > 1; `dtype` is x's,
    the GEMV's output's."""

    xq: torch.Tensor
    xd: torch.Tensor
    xs: torch.Tensor
    dtype: torch.dtype

    @property
    def k(self) -> int:
        return self.xq.shape[-1] * 4

    @property
    def m(self) -> int:
        return 1 if self.xq.dim() == 1 else self.xq.shape[0]

    @property
    def buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.xq, self.xd, self.xs


def quantize_act(x: torch.Tensor) -> QuantAct:
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
                                                           num_warps=2, **pdl.launch_kw(x2))
    return a


def empty_act(k: int, dtype: torch.dtype, device, m: int = 1) -> QuantAct:
    """Buffers for m quantized activation rows of k values (k a multiple of 32): 1-D for one row (which a
    producer kernel — ops.rms_norm / silu_mul with `q8=act.buffers` — may fill), (m, ·) otherwise."""
    shape = (lambda n: (n,)) if m == 1 else (lambda n: (m, n))
    return QuantAct(torch.empty(shape(k // 4), dtype=torch.int32, device=device),
                    torch.empty(shape(k // 32), dtype=torch.float32, device=device),
                    torch.empty(shape(k // 16), dtype=torch.int32, device=device), dtype)


def takes_int8(w: PackedWeight, x: torch.Tensor) -> bool:
    """Does gemv(x, w) (M = 1, no prologue) take the int8-activation path by the table's config?"""
    return x.numel() == x.shape[-1] and gemv_config(w, 1, x.dtype).int8


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _q8_table_rows(qtype: int, n: int, k: int) -> int:
    """Rows per program of the table's int8 config by shape, from the in-graph sweep on the H100
    (bench/results/2026-11-26-h100/int8_ab_8b.json; PDL on): Q6_K's extra high-bit work favours one row per
    program below ~8k rows of K >= 4096 (8B v and down projections: 2.27 vs 2.68 µs, 15.6 vs 19.0 µs) and 8
    for an output head (170 vs 195 µs); Q4_K favours 8 rows from 5120 rows of K 4096..8192 (4.4 vs 4.8 µs,
    20.3 vs 20.6 µs). Everything else: 4."""
    if qtype == Q6_K and k >= 4096:
        return 1 if n <= 8192 else 8 if n > 65536 else 4
    if qtype == Q4_K and n >= 5120 and 4096 <= k <= 8192:
        return 8
    return 4


def _q8_geometry(cfg: GemvConfig, fmt: Format, n: int, k: int, sms: int, rows: int | None = None) -> tuple[int, int]:
    """(rows per program, words per row per step) of the int8 GEMV: the whole row in one step when it fits
    block_k, and fewer rows per program while the grid is short of 2 programs per SM. `rows` overrides
    cfg.block_n (the table's per-shape choice)."""
    kw = k // fmt.g
    w = min(triton.next_power_of_2(kw), max(V, cfg.block_k // fmt.g))
    bn = rows or cfg.block_n
    while bn > 1 and triton.cdiv(n, bn) < 2 * sms:
        bn //= 2
    return bn, w


def _gemv_int8(act: QuantAct, w: PackedWeight, bias: torch.Tensor | None, cfg: GemvConfig,
               table: bool = False) -> torch.Tensor:
    fmt, (n, k) = w.fmt, w.shape
    rows = _q8_table_rows(w.qtype, n, k) if table else None
    bn, wd = _q8_geometry(cfg, fmt, n, k, _sm_count(act.xq.device), rows)
    geo = _geometry(fmt, k, V * fmt.g)
    geo["W"] = wd
    y = torch.empty((1, n), dtype=act.dtype, device=act.xq.device)
    qs, qh, sc, mn, d, dm, _ = _plane_args(w)
    extra = {} if cfg.num_stages is None else dict(num_stages=cfg.num_stages)
    _gemv_q8_kernel[(triton.cdiv(n, bn),)](
        act.xq, act.xd, act.xs, y, bias if bias is not None else y, qs, qh, sc, mn, d, dm,
        w.qs if w.qh is None else w.qh.view(torch.int32), n, FMT=w.qtype, HAS_BIAS=bias is not None,
        H=_gemv_constants(w.qtype)["H"], OFFSET=_OFFSETS.get(w.qtype, 0), BN=bn, NIT=triton.cdiv(geo["KW"], wd),
        ASM=not _interpreting(), num_warps=cfg.num_warps, **geo, **extra, **pdl.launch_kw(act.xq))
    return y


def gemv_max_rows(qtype: int, dtype: torch.dtype) -> int:
    """The most activation rows for which QuantLinear takes `gemv` rather than dequantize + cuBLAS
    (measurements at MAX_GEMV_M): 1 for Q6_K with 16-bit x, MAX_GEMV_M otherwise."""
    return 1 if qtype == Q6_K and dtype != torch.float32 else MAX_GEMV_M


def _gemm_int8(act: QuantAct, w: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """M = 2..32 quantized rows through `_gemm_q8_kernel` (the table sends it 2..MAX_INT8_M): 8 weight rows
    per program, 64 words per K step (32 from 16 activation rows, which also take 8 warps, to bound the
    (rows, activation rows, groups, V) tiles held in registers)."""
    fmt, (n, k) = w.fmt, w.shape
    m = act.m
    mx = triton.next_power_of_2(m)
    geo = _geometry(fmt, k, V * fmt.g)
    geo["W"] = wd = min(triton.next_power_of_2(geo["KW"]), 64 if mx <= 8 else 32)
    bn = 8
    y = torch.empty((m, n), dtype=act.dtype, device=act.xq.device)
    qs, qh, sc, mn, d, dm, _ = _plane_args(w)
    _gemm_q8_kernel[(triton.cdiv(n, bn),)](
        act.xq, act.xd, act.xs, y, bias if bias is not None else y, qs, qh, sc, mn, d, dm,
        w.qs if w.qh is None else w.qh.view(torch.int32), n, FMT=w.qtype, HAS_BIAS=bias is not None,
        H=_gemv_constants(w.qtype)["H"], OFFSET=_OFFSETS.get(w.qtype, 0), M=m, MX=mx, BN=bn,
        NIT=triton.cdiv(geo["KW"], wd), ASM=not _interpreting(), num_warps=4 if mx <= 8 else 8, **geo,
        **pdl.launch_kw(act.xq))
    return y


def gemv(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None, *,
         config: GemvConfig | None = None, prologue: Prologue | None = None,
         act: QuantAct | None = None) -> torch.Tensor:
    """x (M, K) with 1 <= M <= 8, float32/16 or bfloat16 -> y = x @ W.T (+ bias): (M, N) in x.dtype.

    Dequantization is fused; accumulation is float32. No host sync and no data-dependent allocation, so it
    can be captured in a CUDA graph once it has run once for this shape (Triton compiles on the first call).
    With a `prologue` (M = 1 only) the activations are transformed as they are loaded (Prologue).
    Where the config says `int8` (the table's, for M = 1 and 16-bit x in INT8_FORMATS), x is quantized to
    int8 per 32 values (`quantize_act`; pass `act` to reuse one quantization of x across GEMVs) and the
    products are dp4a integer dot products — llama.cpp's MMVQ arithmetic, relative error ~1e-3.
    """
    fmt, (n, k) = w.fmt, w.shape
    m = x.shape[0]
    if prologue is None and m == 1 and w.qtype in INT8_FORMATS and x.dim() == 2 and x.shape[1] == k:
        cfg = config or gemv_config(w, 1, x.dtype)
        if cfg.int8:
            return _gemv_int8(act if act is not None else quantize_act(x), w, bias, cfg, table=config is None)
    if (prologue is None and config is None and 2 <= m <= MAX_INT8_M and w.qtype in INT8_FORMATS and INT8
            and x.dtype != torch.float32 and x.dim() == 2 and x.shape[1] == k):
        return _gemm_int8(quantize_act(x), w, bias)
    kx = 2 * k if prologue is not None and prologue.kind != "norm" else k
    if x.dim() != 2 or x.shape[1] != kx or not 1 <= m <= MAX_GEMV_M or (prologue is not None and m != 1):
        raise ValueError(f"gemv takes x of shape (M <= {MAX_GEMV_M}, {kx}) (M = 1 with a prologue), "
                         f"got {tuple(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = config or _shrink(gemv_config(w, m, x.dtype), n, k, _sm_count(x.device))
    geo = _geometry(fmt, k, cfg.block_k)
    n_steps = triton.cdiv(geo["KW"], geo["W"])
    grid_n = triton.cdiv(n, cfg.block_n)
    split = _split(cfg.split_k, grid_n, n_steps, x.device)
    dot = cfg.dot and m > 1
    pro = prologue or Prologue("none")
    pro_code = 0 if prologue is None else pro.code
    pa = pro.residual if pro.residual is not None else x
    pw = pro.weight if pro.weight is not None else x
    ph = pro.h if pro.h is not None else x
    if dot and cfg.block_n < 16:
        raise ValueError(f"GemvConfig(dot=True) needs block_n >= 16 (tl.dot tiles), got {cfg.block_n}")
    mx = max(16, triton.next_power_of_2(m)) if dot else triton.next_power_of_2(m)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    out = y if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    extra = {} if cfg.num_stages is None else dict(num_stages=cfg.num_stages)
    # 32 activation rows in tl.dot tiles: 8 warps keep Q6_K / Q8_0 under ~100 registers (~170 with 4; ptxas)
    warps = max(cfg.num_warps, 8) if dot and mx >= 32 else cfg.num_warps
    _gemv_kernel[(grid_n, split)](
        x, out, bias if bias is not None else y, *_plane_args(w), w.qs if w.qh is None else w.qh.view(torch.int32),
        n, x.stride(0), _MAGIC, pa, pw, ph, float(pro.eps), float(pro.offset),
        PRO=pro_code, PRO_RES=pro.residual is not None, PRO_OFF=bool(pro.offset), PRO_H=pro.h is not None,
        M=m, MX=mx, FMT=w.qtype, HAS_BIAS=bias is not None and split == 1, BN=cfg.block_n, SPLIT_K=split,
        NIT=triton.cdiv(n_steps, split), CVT=cfg.cvt, DOT=dot, IEEE=x.dtype == torch.float32,
        num_warps=warps, **geo, **_gemv_constants(w.qtype), **extra)
    return _sum_splits(out, y, bias, split)


# Formats the tensor-core kernel takes (codes of 4 + 0/1/2 bits or 8 bits, one scale per 16 or more).
MMA_FORMATS = frozenset({Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K})
MAX_MMA_M = 32


@dataclass(frozen=True)
class MmaConfig:
    """How `gemm_mma` launches: weight rows per program, words per K step, warps, pipeline stages, split-K
    (0: from the grid size)."""

    block_n: int = 64
    words: int = 32
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 0
    natural: bool = False    # all fields of a step permuted back to weight order, one product per step


_MMA_DEFAULT = MmaConfig()

# The tensor-core kernel on (where `mma_config` picks it) or off (dequantize + cuBLAS for every 9..32-row
# step): KILN_MMA=0 switches it off, for A/B measurements (bench/engine_bench.py) and as an escape hatch.
MMA = os.environ.get("KILN_MMA", "1") != "0"


def mma_config(qtype: int, n: int, k: int, m: int, dtype: torch.dtype) -> MmaConfig | None:
    """The tensor-core kernel's config for an (n, k) weight and m rows of x, where it beat dequantize +
    cuBLAS in-graph on the H100 (bench/int8_ab.py mma step, bench/results/2026-11-26-h100-b/): on output
    heads in weight order (`natural`; Q6_K 128256x2048: 369 µs vs 500 at 32 rows, 357 vs 501 at 16) and on
    Llama-3.2-1B's gate/up up to 16 rows, per field (Q4_K 16384x2048: 47 µs vs 62; Llama-3.1-8B's
    28672x4096 was slower, 249 vs 215, hence k <= 2048). Elsewhere dequantize + cuBLAS was as fast or
    faster (Q4_K 2048x2048: 11.8 µs vs 10.6; Q6_K 2048x8192: 40 vs 32 at 32 rows); None there."""
    if not MMA or qtype not in MMA_FORMATS or dtype not in (torch.float16, torch.bfloat16) \
            or not MAX_GEMV_M < m <= MAX_MMA_M:
        return None
    if n >= 65536:
        return MmaConfig(block_n=32, words=32 if m > 16 else 16, num_warps=4, num_stages=3, natural=True)
    if 16384 <= n < 65536 and k <= 2048 and m <= 16:
        return MmaConfig(block_n=128, words=32, num_warps=4, num_stages=3)
    return None


def gemm_mma(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None, *,
             config: MmaConfig | None = None) -> torch.Tensor:
    """x (M, K) with 1 <= M <= 32 rows, 16-bit -> y = x @ W.T (+ bias): (M, N) in x.dtype, on the tensor cores
    with the weights dequantized in registers (`_mma_kernel`; float32 accumulation of weights rounded once
    to x's dtype). For MMA_FORMATS only; graph-capturable like `gemv`."""
    fmt, (n, k) = w.fmt, w.shape
    m = x.shape[0]
    if w.qtype not in MMA_FORMATS or x.dim() != 2 or x.shape[1] != k or not 1 <= m <= MAX_MMA_M \
            or x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"gemm_mma takes 16-bit x of shape (M <= {MAX_MMA_M}, {k}) and a weight in "
                         f"{sorted(FORMATS[q].name for q in MMA_FORMATS)}, got {tuple(x.shape)} {x.dtype} "
                         f"and {fmt.name}")
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = config or _MMA_DEFAULT
    kw_total = k // fmt.g
    n_steps = triton.cdiv(kw_total, cfg.words)
    grid_n = triton.cdiv(n, cfg.block_n)
    split = _split(cfg.split_k, grid_n, n_steps, x.device)
    mx = max(16, triton.next_power_of_2(m))
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    out = y if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    planes = [w.qs if getattr(w, p) is None else getattr(w, p) for p in _PLANES]
    _mma_kernel[(grid_n, split)](
        x, out, bias if bias is not None else y, *planes, n, m, x.stride(0),
        KW=kw_total, SUBS=k // fmt.sub, G=fmt.g, WPB=fmt.block // fmt.g, SUB=fmt.sub, FMT=w.qtype,
        HAS_QH=fmt.qh is not None, HAS_DM=fmt.dm, HAS_MIN=fmt.has_min,
        HAS_BIAS=bias is not None and split == 1, BN=cfg.block_n, W=cfg.words, MX=mx, SPLIT_K=split,
        NIT=triton.cdiv(n_steps, split), NATURAL=cfg.natural, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return _sum_splits(out, y, bias, split)


def dequantize_gpu(w: PackedWeight, dtype: torch.dtype = torch.bfloat16, *, block_n: int = 16,
                   block_k: int = 256, num_warps: int = 4) -> torch.Tensor:
    """PackedWeight -> dense (N, K) in dtype on w's device: float32 bit-identical to `dequantize_ref`, any
    other dtype that result rounded once."""
    fmt, (n, k) = w.fmt, w.shape
    geo = _geometry(fmt, k, block_k)
    out = torch.empty((n, k), dtype=dtype, device=w.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(geo["KW"], geo["W"]))
    _dequant_kernel[grid](out, *_plane_args(w), n, FMT=w.qtype, BN=block_n, num_warps=num_warps,
                          enable_fp_fusion=False, **geo)
    return out


def packed_fields() -> tuple[str, ...]:
    """Names of the planes a PackedWeight may hold, in kernel-argument order."""
    return _PLANES


def _check_formats() -> None:  # keeps the Format table honest: packed rows within 1.05x of the file's
    for fmt in FORMATS.values():
        assert fmt.packed_bytes(fmt.block) <= 1.05 * fmt.type_size, fmt.name
        assert fmt.block % (V * fmt.g) == 0 and (fmt.sub % (V * fmt.g) == 0 or (V * fmt.g) % fmt.sub == 0)
        assert {f.name for f in fields(PackedWeight)} >= set(_PLANES)


_check_formats()
