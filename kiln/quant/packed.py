"""GGUF weights in a lossless repacked layout the GPU kernels read, and its plain-torch twin.

Owns: the type ids and block geometry of the formats with kernels (`Format`, `FORMATS`), the packed layout
(`PackedWeight`, built once at load by `repack`, plain torch on the tensor's device) and `dequantize_ref`, the
obviously correct dequantization the kernels are tested against.
Not: the GGUF reference dequantizers (legacy.py, kquants.py, iquants.py: this file is tested bit-exact against
them), the Triton kernels, routing (route.py), quantizing.

A GGUF block interleaves scales and quants, scatters its weights over its bytes in format-specific lane orders
and is 18, 34, 110 or 210 bytes long: unaligned loads and per-format index arithmetic. `repack` splits each
tensor into planes, each row-major (N, ·):
  qs  int32 words of G fields of b = 32 / G bits (4-bit: G = 8; 2-bit: G = 16; Q8_0's bytes: G = 4), the low
      bits of every weight, unsigned (Q8_0's q stored as q + 128). Words come in groups of V = 4 (one 128-bit
      load) holding V*G consecutive weights: field f of word j is weight field_offset(f) + j — with L = G / 4
      fields per byte and f = m*L + l, offset l*4V + m*V — so the fields at byte position l of the four words
      are one run of 16 consecutive weights (one dp4a operand per word, of one sub-block; kiln.ops.q8 stores
      the activations in the same order).
  qh  int8 or int16, one per qs word: the high bits of its fields, field f at bits [h*f, h*f + h) (h = 1 for
      Q5_0, Q5_1, Q5_K, Q3_K; 2 for Q6_K).
  sc, mn  uint8 or int8, one per sub-block: the 6-bit scale (and min) decoded from GGUF's packed 12-byte form
      (at most +3.7% bytes).
  d, dm   int16, one per GGUF block: the f16 scale (and min / dmin) as raw bits, so `model.to(dtype)` cannot
      round them.
Why: a thread that loads four words extracts field f from each with the same mask, in the registers they were
loaded into (no shuffles), and the four activations it multiplies, x[field_offset(f) + j], are contiguous.
All fields of a word share a block scale; a sub-block is a set of whole fields of a group.

Per format (gguf-py's weight formula, in its float32 order in dequantize_ref and the kernels' dense tiles):
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
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from kiln.errors import KilnError
from kiln.quant.iquants import KVALUES, iq4_xs_scales
from kiln.quant.kquants import k_scales_mins, q3_k_scales

# GGML type ids (gguf.GGMLQuantizationType), spelled out so that this file needs no gguf import.
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 2, 3, 6, 7, 8
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = 10, 11, 12, 13, 14
IQ4_NL, IQ4_XS = 20, 23


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


def format_of(qtype: int) -> Format:
    """The Format of a GGUF type id; KilnError for a type without kernels."""
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
    """GGUF's lane order -> weight order: (R, nb, L) bytes -> (R, nb * L * 8 / bits) codes; the bytes run in
    groups of `lane`, field f of byte l in group h is weight h*lane*F + f*lane + l."""
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


def _repack_rows(b: torch.Tensor, qtype: int) -> dict[str, torch.Tensor]:
    """GGUF blocks of R rows (R, nb, type_size) uint8 -> that slice of every plane."""
    f16 = lambda off: _f16_bits(b, off)  # noqa: E731
    rows = lambda t: t.reshape(b.shape[0], -1)  # noqa: E731  (R, nb, S) -> (R, nb * S)
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
                    sc=rows(q3_k_scales(b[..., 96:108])), d=f16(108))
    if qtype in (Q4_K, Q5_K):
        sc, mn = map(rows, k_scales_mins(b[..., 4:16]))
        if qtype == Q4_K:
            return dict(qs=nib(16, 144, 32), sc=sc, mn=mn, d=f16(0), dm=f16(2))
        return dict(qs=nib(48, 176, 32), qh=_pack(_lanes(b[..., 16:48], 32, 1), 1, 8, torch.int8),
                    sc=sc, mn=mn, d=f16(0), dm=f16(2))
    if qtype == Q6_K:
        return dict(qs=nib(0, 128, 64), qh=_pack(_lanes(b[..., 128:192], 32, 2), 2, 8, torch.int16),
                    sc=_bytes(b, 192, 208).view(torch.int8), d=f16(208))
    assert qtype == IQ4_XS
    return dict(qs=nib(8, 136, 16), sc=rows(iq4_xs_scales(b)), d=f16(0))


def repack(raw: torch.Tensor, qtype: int, shape: tuple[int, int], device=None) -> PackedWeight:
    """A GGUF tensor's raw bytes (uint8, (N, row_bytes) or flat) -> PackedWeight on `device` (default: raw's).
    Lossless. Rows cross to the device a slice at a time, into planes allocated once: the device holds the
    planes and one slice, never the whole raw tensor beside them (a GPU budget of a split counts on it)."""
    fmt = format_of(qtype)
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
    device = raw.device if device is None else torch.device(device)
    blocks = raw.reshape(n, k // fmt.block, fmt.type_size)             # (N, nb, type_size)
    step = max(1, _REPACK_WEIGHTS // k)
    planes = None  # dense row-major planes, as the kernels index them
    for i in range(0, n, step):
        part = _repack_rows(to_device(blocks[i:i + step], device), int(qtype))
        if planes is None:
            planes = {name: torch.empty((n, *t.shape[1:]), dtype=t.dtype, device=device) for name, t in part.items()}
        for name, t in part.items():
            planes[name][i:i + step] = t
    return PackedWeight(int(qtype), (n, k), **planes)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on `device`. A CPU tensor bound for a CUDA device crosses through `_Staging`'s pinned buffers: the
    device's copy is asynchronous, so the host reads the next slice from the file while the device copies and
    repacks this one (a pageable tensor's `.to` copies synchronously through the driver's own staging)."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _STAGING:
        _STAGING[key] = _Staging()
    return _STAGING[key].to(t, torch.device("cuda", key))


class _Staging:
    """Two pinned host buffers used in turn (one per CUDA device, kept for the process: 2 x ~18 MB). A buffer is
    refilled only after the device's copy out of it is done (its event)."""

    def __init__(self):
        self.bufs: list[torch.Tensor | None] = [None, None]
        self.done: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0

    def to(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        j, self.turn = self.turn, self.turn ^ 1
        if self.done[j] is not None:
            self.done[j].synchronize()
        n = t.numel() * t.element_size()
        if self.bufs[j] is None or self.bufs[j].numel() < n:
            self.bufs[j] = None  # the old buffer goes back before the bigger one is pinned
            self.bufs[j] = torch.empty(max(n, _REPACK_WEIGHTS * 34 // 32), dtype=torch.uint8, pin_memory=True)
        buf = self.bufs[j][:n]
        buf.copy_(t.contiguous().view(-1).view(torch.uint8))
        out = torch.empty(t.shape, dtype=t.dtype, device=device)
        out.view(-1).view(torch.uint8).copy_(buf, non_blocking=True)
        self.done[j] = torch.cuda.Event()
        self.done[j].record(torch.cuda.current_stream(device))
        return out


_STAGING: dict[int, _Staging] = {}


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
    """PackedWeight -> (N, K) float32 in plain torch, bit-identical to kiln.quant.dequantize of the GGUF bytes:
    gguf-py's float operations in its order (dl = d * sc in float32 first, then dl * q (- ml); Q4_1/Q5_1 round
    d * q before adding m)."""
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

def packed_fields() -> tuple[str, ...]:
    """Names of the planes a PackedWeight may hold, in kernel-argument order."""
    return _PLANES


def _check_formats() -> None:  # keeps the Format table honest: packed rows within 1.05x of the file's
    for fmt in FORMATS.values():
        assert fmt.packed_bytes(fmt.block) <= 1.05 * fmt.type_size, fmt.name
        assert fmt.block % (V * fmt.g) == 0 and (fmt.sub % (V * fmt.g) == 0 or (V * fmt.g) % fmt.sub == 0)
        assert {f.name for f in fields(PackedWeight)} >= set(_PLANES)


_check_formats()
