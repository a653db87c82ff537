"""The compact CPU path: GGUF weights repacked, tensor by tensor, into torch's packed CPU matmuls.

Owns the CPU layer types and the swap that builds them from a GGUF model's weights:
- `BlockLinear`: a tensor's blocks as the file holds them (exact): Q4_K and Q6_K (4.5 / 6.56 bits a weight),
  and Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 regrouped four blocks at a time in the same bytes where K % 128 == 0; run by
  ops.cpu.block_linear: native GEMVs for a few rows (x rounded to 16 bits per block, integer products), an
  fp32 matmul of the exact weight for a prompt; the output head too when it is one of them.
- `Int4Linear`: 4-bit codes in torch's CPU int4 layout with one bf16 (scale, zero) per 32 weights,
  `w = (q - 8) * scale + zero`, through `_weight_int4pack_mm_for_cpu`. Q4_0 and Q4_1 rows that BlockLinear
  does not take (and the output head's screen) map onto it exactly up to the bf16 rounding of scale and zero.
- `Int8Linear`: int8 codes with a scale per block or per row. Q8_0 and Q5_0 keep the file's own codes and
  block scales (f16, per 32 weights: exact, `from_gguf`; Q6_K can too, its d * scale in f16); every other
  type (the other K-quants, plain floats, a Q4 tensor that int4 tiles do not fit) becomes int8 rows with one bf16
  scale per row through `_weight_int8pack_mm`, a second rounding finer than the grids it re-quantizes.
  One float32 row (the batch-1 decode step) goes through a native GEMV instead, where built (the choice
  is ops/cpu.int8_linear's, under the layer's policy).
- `ScreenedHead`: the output head (the largest matrix: 151936 x 896 for Qwen2.5-0.5B). A 4-bit copy
  screens the whole vocabulary, then the `SCREEN_TOP` best candidates of each row are recomputed exactly
  in fp32 from the file's own rows; the argmax and the head of the distribution are exact, the tail
  carries the 4-bit error.
- `GGUFEmbedding`: the token table stays in the file's blocks (no copy of an mmap'd file); a lookup
  dequantizes only the rows it reads, exactly.
- `compact_linears(model, weights)`: swaps these in on a meta-device model (swap.py's walker) before the
  loader assigns the rest, so peak memory stays near the compact size (one tensor is dense at a time), then
  joins q/k/v and gate/up where they stack (swap.join_projections; each type's `cat`).
Not: GPU kernels (route.py and the files it routes to, linear.py), the GGUF block formats (legacy.py,
kquants.py), loading order, the native kernels and when they serve (kiln.ops.cpu).

Activations enter torch's packed matmuls as bfloat16 (its CPU kernels vectorize only that; fp32 inputs
run ~10x slower) and the result comes back in the caller's dtype; block-scaled int8 and Q4_K run many rows
as an fp32 matmul of their exact weight. The native GEMVs stream int8 about twice as fast as `_weight_int8pack_mm`
at batch 1 (per-row scales: x in fp32; block scales: x rounded to int16 per block, integer products).

Shape alphabet: M rows of activations, N output features, K input features, G = K / 32 groups,
U candidate rows, V vocabulary.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
from collections.abc import Mapping

import gguf
import torch
from torch import nn

from kiln.errors import KilnError
from kiln.formats.gguf import release_pages
from kiln.ops import cpu as ops_cpu
from kiln.policy import DEFAULT, Policy
from kiln.quant import dequantize as dequantize_gguf
from kiln.quant import kquants, legacy
from kiln.quant.swap import dense, join_projections, quantized, swap_layers

_T = gguf.GGMLQuantizationType
GROUP = 32  # weights per (scale, zero) of the int4 layout
PACK_ROWS = 4096  # rows repacked per step (a multiple of the int4 layout's 64-row tiles: N % 64 == 0)
SCREEN_TOP = 64  # head candidates per row recomputed exactly
SCREEN_MIN_ROWS = 16384  # heads smaller than this are plain Int8Linear


def _bias(bias) -> torch.Tensor | None:
    # A buffer, not a Parameter: the loader assigns only the parameters a swap did not take.
    return None if bias is None else bias.detach().float()


def _finish(y: torch.Tensor, x: torch.Tensor, bias, n: int) -> torch.Tensor:
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.view(*x.shape[:-1], n)


def _cat_bias(layers) -> torch.Tensor | None:
    return None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])


class Int8Linear(nn.Module):
    """y = x @ W.T (+ bias) with W held as int8 rows and one bf16 scale per row, or (`from_gguf`, the exact
    codes of a Q8_0 / Q5_0 / Q6_K tensor) one f16 scale per block of 32 or 16 weights."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 policy: Policy = DEFAULT):
        super().__init__()
        self.register_buffer("q", q)                                  # (N, K) int8
        self.register_buffer("scale", scale)                          # (N,) bf16, or (N, K / G) float16
        self.register_buffer("bias", _bias(bias))
        self.out_features, self.in_features = q.shape
        self.policy = policy  # whether the native GEMV may serve (kiln.ops.cpu)

    @classmethod
    def from_gguf(cls, raw: torch.Tensor, qtype: int, shape: tuple[int, int], bias=None,
                  policy: Policy = DEFAULT) -> Int8Linear:
        """raw (N, row_bytes) uint8 rows of a type in INT8_EXACT -> its codes and block scales as they are
        (no second rounding: the per-row int8 grid of `from_dense` costs a Q5_0 model ~1% of top-1). The
        scales are f16: Q8_0's and Q5_0's own; Q6_K's d * scale rounded once (2^-11 relative)."""
        n, k = shape
        _, type_size = gguf.GGML_QUANT_SIZES[_T(qtype)]
        fn, group = INT8_EXACT[int(qtype)]
        q, scale = torch.empty(n, k, dtype=torch.int8), torch.empty(n, k // group, dtype=torch.float16)
        for a in range(0, n, PACK_ROWS):
            codes, s = fn(raw[a:a + PACK_ROWS].reshape(-1, type_size))  # (B, block) int8, (B, block / G) f32
            rows = codes.numel() // k
            q[a:a + rows] = codes.reshape(rows, k)
            scale[a:a + rows] = s.reshape(rows, -1)
        return cls(q, scale, bias, policy)

    @property
    def group(self) -> int | None:
        """Weights per scale (None: one per row)."""
        return self.in_features // self.scale.shape[1] if self.scale.dim() == 2 else None

    def joins(self, other: Int8Linear) -> bool:
        return self.group == other.group

    def native_parts(self) -> list:
        """This matmul as a native decode step of every block reads it (native.Stack's parts)."""
        return [ops_cpu.int8_part(self.q, self.scale, self.bias)]

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   policy: Policy = DEFAULT) -> Int8Linear:
        w = weight.detach().float()  # (N, K)
        # The kernel applies bf16 scales, so quantize on that grid; nudging up by 2^-8 before rounding
        # to bf16 (relative error <= 2^-8) keeps every |w| / scale below 127.01, which rounds to 127.
        scale = ((w.abs().amax(1) / 127).clamp_min(1e-12) * (1 + 2 ** -8)).to(torch.bfloat16)  # (N,)
        return cls(torch.round(w / scale.float()[:, None]).to(torch.int8), scale, bias, policy)

    @classmethod
    def cat(cls, layers: list[Int8Linear]) -> Int8Linear:
        """The rows of `layers` stacked (swap.Joined): one product instead of several."""
        return cls(torch.cat([b.q for b in layers]), torch.cat([b.scale for b in layers]), _cat_bias(layers),
                   layers[0].policy)

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.element_size() * self.scale.numel()

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return ops_cpu.int8_weight_ref(self.q, self.scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops_cpu.int8_linear(x, self.q, self.scale, self.bias, self.policy)  # native GEMV or torch's

    def extra_repr(self) -> str:
        per = "row" if self.group is None else f"{self.group} weights"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, a scale per {per}"


# --- int8: GGUF blocks whose codes are int8 already -> (codes (B, block) int8, scales (B, block / G) float32) ---

def _q8_0(b: torch.Tensor):
    return b[:, 2:34].view(torch.int8), legacy.f16_at(b, 0)


def _q5_0(b: torch.Tensor):
    return legacy._five_bit(b[:, 2:6], b[:, 6:22]).view(torch.int8).sub_(16), legacy.f16_at(b, 0)


def _q6_k(b: torch.Tensor):
    q = kquants._nibbles(b[:, 0:128], 64).bitwise_or_(kquants._crumbs(b[:, 128:192], 2) << 4)
    return q.view(torch.int8).sub_(32), legacy.f16_at(b, 208) * b[:, 192:208].view(torch.int8)  # (B, 16)


INT8_EXACT = {int(_T.Q8_0): (_q8_0, 32), int(_T.Q5_0): (_q5_0, 32), int(_T.Q6_K): (_q6_k, 16)}  # (codes, weights
# per f16 scale)
KQUANT = (int(_T.Q4_K), int(_T.Q6_K))  # kept as the file's blocks (BlockLinear), before INT8_EXACT
LEGACY = (int(_T.Q4_0), int(_T.Q4_1), int(_T.Q5_0), int(_T.Q5_1), int(_T.Q8_0))  # regrouped blocks (BlockLinear)
# where K % 128 == 0


# --- int4: GGUF blocks -> (codes 0..15, scale, zero) with w = (q - 8) * scale + zero per 32 weights ---
# Each maps raw blocks (B, type_size) uint8 -> codes (B, block) uint8, scale and zero (B, block / 32) fp32.

def _q4_0(b: torch.Tensor):
    d = legacy.f16_at(b, 0)                                            # (B, 1)
    return legacy._nibbles(b[:, 2:18]), d, torch.zeros_like(d)


def _q4_1(b: torch.Tensor):
    d, m = legacy.f16_at(b, 0), legacy.f16_at(b, 2)
    return legacy._nibbles(b[:, 4:20]), d, m + 8 * d                  # d*q + m = d*(q-8) + (m + 8d)


def _q4_k(b: torch.Tensor):
    dl, ml = kquants._k_dl_ml(b)                                       # (B, 8) each
    return kquants._nibbles(b[:, 16:144], 32), dl, 8 * dl - ml        # dl*q - ml = dl*(q-8) + (8dl - ml)


INT4_EXACT = {int(_T.Q4_0): _q4_0, int(_T.Q4_1): _q4_1, int(_T.Q4_K): _q4_k}


def _requantize4(w: torch.Tensor):
    """Dense rows (R, K) -> nearest asymmetric 4-bit codes per 32 weights (lossy): codes, scale, zero."""
    g = w.float().view(w.shape[0], -1, GROUP)                          # (R, G, 32)
    lo, hi = torch.aminmax(g, dim=-1)                                  # (R, G)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    codes = ((g - lo[..., None]) / scale[..., None]).round_().clamp_(0, 15)
    return codes.to(torch.uint8).view(w.shape), scale, lo + 8 * scale


def _int4_rows(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
    """codes (R, K) uint8, scale/zero (R, G) fp32 -> packed (R, K/2) uint8, (G, R, 2) bf16."""
    packed = torch._convert_weight_to_int4pack_for_cpu(codes.int(), 1)
    sz = torch.stack([scale, zero], -1).to(torch.bfloat16).transpose(0, 1).contiguous()
    return packed, sz


def _pack_int4(n: int, k: int, rows_of) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack a (N, K) weight in steps of PACK_ROWS rows; rows_of(a, b) -> (codes, scale, zero) of rows a:b."""
    packed, szs = None, None  # filled in place: a torch.cat of the parts would hold the tensor twice at its peak
    for a in range(0, n, PACK_ROWS):
        codes, scale, zero = rows_of(a, min(n, a + PACK_ROWS))
        p, sz = _int4_rows(codes.reshape(-1, k), scale.reshape(codes.numel() // k, -1),
                           zero.reshape(codes.numel() // k, -1))
        if packed is None:
            packed = p.new_empty((n, *p.shape[1:]))
            szs = sz.new_empty((sz.shape[0], n, *sz.shape[2:]))
        packed[a:a + p.shape[0]] = p
        szs[:, a:a + p.shape[0]] = sz
    return packed, szs


def _gguf_int4_rows(raw: torch.Tensor, qtype: int, k: int):
    """rows_of for a GGUF tensor of an exact type: raw (N, row_bytes) uint8."""
    block, type_size = gguf.GGML_QUANT_SIZES[_T(qtype)]
    fn = INT4_EXACT[qtype]
    return lambda a, b: fn(raw[a:b].reshape(-1, type_size))


@functools.cache
def _int4_tile_rows() -> int:
    """Rows per tile of torch's CPU int4 layout on this machine (it follows the CPU's vector width):
    the tile size under which a known pattern of codes packs and reads back unchanged."""
    codes = torch.arange(64 * 2, dtype=torch.int32).view(64, 2) % 16
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    for r in (64, 32, 16):
        tiles = packed.view(64 // r, 2, r // 2)
        if torch.equal(torch.cat([tiles & 15, tiles >> 4], -1).permute(0, 2, 1).reshape(64, 2).int(), codes):
            return r
    raise KilnError("torch's CPU int4 layout is not one kiln knows; use quantized=False")


class Int4Linear(nn.Module):
    """y = x @ W.T (+ bias) with W as packed 4-bit codes and a bf16 (scale, zero) per 32 weights."""

    def __init__(self, packed: torch.Tensor, scale_zero: torch.Tensor, shape: tuple[int, int], bias=None):
        super().__init__()
        if shape[0] % 64 or shape[1] % GROUP:
            raise KilnError(f"int4 CPU layout needs whole 64-row tiles and 32-weight groups, got {shape}")
        self.register_buffer("packed", packed)                        # (N, K/2) uint8, torch's CPU layout
        self.register_buffer("scale_zero", scale_zero)                # (G, N, 2) bf16
        self.out_features, self.in_features = shape
        self.register_buffer("bias", _bias(bias))

    @classmethod
    def from_gguf(cls, raw: torch.Tensor, qtype: int, shape: tuple[int, int], bias=None) -> Int4Linear:
        """raw (N, row_bytes) uint8 rows of a Q4_0 / Q4_1 / Q4_K tensor -> exact repack (up to bf16)."""
        n, k = shape
        return cls(*_pack_int4(n, k, _gguf_int4_rows(raw, int(qtype), k)), shape, bias)

    @classmethod
    def cat(cls, layers: list[Int4Linear]) -> Int4Linear:
        """The rows of `layers` stacked (swap.Joined): whole 64-row tiles each, so the packed rows stack."""
        n = sum(b.out_features for b in layers)
        return cls(torch.cat([b.packed for b in layers]), torch.cat([b.scale_zero for b in layers], 1),
                   (n, layers[0].in_features), _cat_bias(layers))

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + 2 * self.scale_zero.numel()

    def codes(self) -> torch.Tensor:
        """The 4-bit codes (N, K) uint8, read back from torch's CPU layout: per tile of R rows and per
        column k, R/2 bytes whose low nibbles are the tile's first R/2 rows and high nibbles the rest
        (R = _int4_tile_rows(): 64 where torch's kernel uses AVX-512, 32 with AVX2; tests check this
        against the kernel)."""
        n, k, r = self.out_features, self.in_features, _int4_tile_rows()
        tiles = self.packed.view(n // r, k, r // 2)                   # (N/R, K, R/2)
        both = torch.cat([tiles & 15, tiles >> 4], -1)                 # (N/R, K, R)
        return both.permute(0, 2, 1).reshape(n, k)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The weight (N, K) the kernel applies: (q - 8) * scale + zero in fp32 from the bf16 scale, zero."""
        sz = self.scale_zero.float().permute(1, 0, 2)                 # (N, G, 2)
        q = self.codes().float().view(self.out_features, -1, GROUP)   # (N, G, 32)
        return (((q - 8) * sz[..., :1]) + sz[..., 1:]).view(self.out_features, -1).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)      # (M, K)
        y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, GROUP, self.scale_zero)  # (M, N)
        return _finish(y, x, self.bias, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of 32, bf16 x"


class BlockLinear(nn.Module):
    """y = x @ W.T (+ bias) with W a tensor's rows in its file's blocks (exact): Q4_K and Q6_K as the file holds
    them (4.5 / 6.56 bits a weight), Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 (4.5 to 8.5 bits) regrouped four blocks at a time
    in the same bytes (native.regroup_lq); ops.cpu.block_linear runs it (native GEMVs for a few rows)."""

    def __init__(self, blocks: torch.Tensor, qtype: int, shape: tuple[int, int], bias=None,
                 policy: Policy = DEFAULT):
        super().__init__()
        self.register_buffer("blocks", blocks)                        # (N, K / W * B) uint8
        self.register_buffer("bias", _bias(bias))
        self.qtype, (self.out_features, self.in_features) = int(qtype), shape
        self.policy = policy

    @classmethod
    def from_gguf(cls, raw: torch.Tensor, qtype: int, shape: tuple[int, int], bias=None,
                  policy: Policy = DEFAULT) -> BlockLinear:
        """raw (N, row_bytes) uint8 rows of a `takes` type (the file's mapping: copied or regrouped, so its pages
        can go)."""
        return cls(ops_cpu.block_rows(raw, int(qtype)), qtype, shape, bias, policy)

    @staticmethod
    def takes(qtype: int | None, k: int) -> bool:
        """Does a (N, K) tensor of this type stay in its blocks? K-quants always; legacy types where K is whole
        groups of four blocks and the native kernels are built (else Int8Linear / Int4Linear take them)."""
        return qtype in KQUANT or (qtype in LEGACY and k % 128 == 0 and ops_cpu.legacy_blocks_run())

    def joins(self, other: BlockLinear) -> bool:
        return self.qtype == other.qtype

    @classmethod
    def cat(cls, layers: list[BlockLinear]) -> BlockLinear:
        n = sum(b.out_features for b in layers)
        return cls(torch.cat([b.blocks for b in layers]), layers[0].qtype, (n, layers[0].in_features),
                   _cat_bias(layers), layers[0].policy)

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return ops_cpu.block_weight_ref(self.blocks, self.qtype).to(dtype)

    def native_parts(self) -> list:
        """This matmul as a native decode step of every block reads it (native.Stack's parts)."""
        return [ops_cpu.block_part(self.blocks, self.qtype, self.bias)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops_cpu.block_linear(x, self.blocks, self.qtype, self.bias, self.policy)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{_T(self.qtype).name} blocks")


class GGUFRows:
    """Exact fp32 rows of a GGUF tensor on demand: `rows(idx)` dequantizes only the rows asked for."""

    def __init__(self, raw: torch.Tensor, qtype: int, shape: tuple[int, int], add: float = 0.0):
        self.raw, self.qtype, self.shape, self.add = raw, int(qtype), tuple(shape), add  # raw (N, row_bytes)

    @classmethod
    def of(cls, t) -> GGUFRows:
        return cls(t.raw_rows(), t.qtype, tuple(t.shape), t.add)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (U,) long -> (U, K) float32, bit-equal to the same rows of the whole tensor's dequantization."""
        w = dequantize_gguf(self.raw.index_select(0, idx).reshape(-1), self.qtype, (idx.numel(), self.shape[1]))
        return w + self.add if self.add else w

    def span(self, a: int, b: int) -> torch.Tensor:
        """Rows a:b as (b - a, K) float32 (a slice of the blocks: no gather)."""
        w = dequantize_gguf(self.raw[a:b].reshape(-1), self.qtype, (b - a, self.shape[1]))
        return w + self.add if self.add else w

    @property
    def nbytes(self) -> int:
        return self.raw.numel()


class GGUFEmbedding(nn.Module):
    """nn.Embedding whose table stays in GGUF blocks; a lookup dequantizes the rows it reads (exact)."""

    def __init__(self, rows: GGUFRows, dtype=torch.float32):
        super().__init__()
        self.table, self.dtype = rows, dtype
        self.num_embeddings, self.embedding_dim = rows.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        uniq, inv = flat.unique(return_inverse=True)
        e = self.table.rows(uniq).to(self.dtype)                      # (U, E)
        return e.index_select(0, inv).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, gguf rows ({self.table.nbytes / 1e6:.0f} MB)"


class ScreenedHead(nn.Module):
    """The output head: a 4-bit screen over the vocabulary, then exact fp32 logits for the top candidates.

    For every row of x its SCREEN_TOP highest screened logits are recomputed from the file's rows (the
    candidates of a chunk of rows in one matmul, each row keeping its own: a row's logits are the same
    however it is batched).
    """

    ROWS_PER_CHUNK = 16  # rows of x whose candidates are pooled (bounds the exact rows dequantized at once)

    def __init__(self, rows: GGUFRows, screen: Int4Linear, top: int = SCREEN_TOP):
        super().__init__()
        self.exact, self.screen, self.top = rows, screen, top
        self.out_features, self.in_features = rows.shape

    @classmethod
    def from_gguf(cls, t, top: int = SCREEN_TOP) -> ScreenedHead:
        rows = GGUFRows.of(t)
        n, k = rows.shape
        screen = Int4Linear(*_pack_int4(n, k, lambda a, b: _requantize4(rows.span(a, b))), (n, k))
        return cls(rows, screen, top)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return self.exact.rows(torch.arange(self.out_features)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)                           # (M, K)
        y = self.screen(x2).float()                                    # (M, V)
        for a in range(0, x2.shape[0], self.ROWS_PER_CHUNK):
            part = y[a:a + self.ROWS_PER_CHUNK]
            own = part.topk(min(self.top, self.out_features), dim=-1).indices  # (m, top)
            cand = own.reshape(-1).unique()                                     # (U,) sorted
            exact = x2[a:a + self.ROWS_PER_CHUNK].float() @ self.exact.rows(cand).t()  # (m, U)
            # each row takes its own candidates only: its logits do not depend on the rows batched with it
            part.scatter_(1, own, exact.gather(1, torch.searchsorted(cand, own)))
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 screen, top {self.top} exact"


# --- the swap ---

def compact_linear(w, bias=None, head: bool = False, policy: Policy = DEFAULT) -> nn.Module:
    """The CPU layer for one weight (a GGUFTensor or a dense tensor): see the module docstring."""
    qtype = int(w.qtype) if quantized(w) else None
    if BlockLinear.takes(qtype, w.shape[1]) and not getattr(w, "add", 0):  # a head too: exact, and faster
        return BlockLinear.from_gguf(w.raw_rows(), qtype, tuple(w.shape), bias, policy)  # than a screen
    if head and qtype is not None and w.shape[0] >= SCREEN_MIN_ROWS and w.shape[0] % 64 == 0 and bias is None:
        return ScreenedHead.from_gguf(w)
    if qtype in INT4_EXACT and w.shape[0] % 64 == 0 and not getattr(w, "add", 0):  # whole 64-row tiles
        return Int4Linear.from_gguf(w.raw_rows(), qtype, tuple(w.shape), bias)
    if qtype in INT8_EXACT and not getattr(w, "add", 0):
        return Int8Linear.from_gguf(w.raw_rows(), qtype, tuple(w.shape), bias, policy)
    return Int8Linear.from_dense(dense(w), bias, policy)


def compact_linears(model: nn.Module, weights: Mapping, policy: Policy = DEFAULT, floats: bool = True) -> list[str]:
    """On a (meta-device) model, replace every nn.Linear with a compact CPU layer and a quantized GGUF
    embedding table with a GGUFEmbedding, then join q/k/v and gate/up where they stack. `floats`: a float
    weight becomes int8 rows too (False: it stays a float32 nn.Linear, the CPU default's rule: only what the
    file quantized stays quantized). Returns the parameter names now held (the caller loads the rest)."""
    def embedding(name, w):
        return GGUFEmbedding(GGUFRows.of(w)) if quantized(w) else None

    def linear(name, w, b):
        if not floats and not quantized(w):
            return None
        layer = compact_linear(w, None if b is None else dense(b), head=name == "lm_head", policy=policy)
        if hasattr(w, "release"):  # the file's pages of a repacked tensor: read again only where needed
            w.release()
        return layer

    with _small_mmap_threshold():
        taken = swap_layers(model, weights, linear=linear, embedding=embedding)
        join_projections(model)
        if policy.huge_pages:  # off by default: a slower load for a faster decode
            _to_huge_pages(model)
    return taken


HUGE_PAGE = 2 << 20


def _to_huge_pages(model: nn.Module) -> None:
    """Move the compact layers' large buffers into one anonymous mapping advised for transparent huge pages
    (policy.huge_pages, KILN_HUGE_PAGES=1; off by default).

    A decode step streams every weight once; in 4 KiB pages each page costs a TLB miss and the hardware
    prefetchers stop at its edge (the 1.5B Q4_K_M: 37.4 -> 39.6 tok/s on two threads, the same process
    alternating), but the huge pages' first faults cost the load (that 1.5B: 0.72-0.76 s -> 1.16-2.35 s on the
    EPYC VM of bench/results/2026-12-06-cpu-b). Each tensor moves a few MiB at a time, the old copy's pages given
    back as they are copied, so the load's peak memory does not grow. Only buffers that own their whole storage
    move (never a view of the file's mapping); one shared by two layers moves once. Nothing happens where the
    system has no MADV_HUGEPAGE; where the system's huge pages are off the mapping is plain memory."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return
    kinds = (BlockLinear, Int4Linear, Int8Linear)
    found = [(m, k) for m in model.modules() if isinstance(m, kinds) for k, t in m._buffers.items()
             if t is not None and t.nbytes >= HUGE_PAGE and t.is_contiguous() and t.storage_offset() == 0
             and t.untyped_storage().nbytes() == t.nbytes]
    olds = {m._buffers[k].data_ptr(): m._buffers[k] for m, k in found}
    if not olds:
        return
    size = lambda t: -(-t.nbytes // 64) * 64  # noqa: E731  (each tensor on a cache line)
    arena = mmap.mmap(-1, sum(size(t) for t in olds.values()) + HUGE_PAGE,
                      flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # private: shared memory takes huge pages
    arena.madvise(mmap.MADV_HUGEPAGE)                               # under another, usually closed, setting
    room = torch.frombuffer(arena, dtype=torch.uint8)  # holds `arena` for as long as any view of it lives
    at, new = -room.data_ptr() % HUGE_PAGE, {}
    for ptr, t in olds.items():
        src, dst = t.view(-1).view(torch.uint8), room[at:at + t.nbytes]
        for a in range(0, t.nbytes, 4 * HUGE_PAGE):
            dst[a:a + 4 * HUGE_PAGE].copy_(src[a:a + 4 * HUGE_PAGE])
            release_pages(src[a:a + 4 * HUGE_PAGE])  # read no more: the tensor goes below
        new[ptr] = dst.view(t.dtype).view(t.shape)
        at += size(t)
    for m, k in found:
        m._buffers[k] = new[m._buffers[k].data_ptr()]


@contextlib.contextmanager
def _small_mmap_threshold(threshold: int = 1 << 18):
    """glibc's malloc, during the repack: every block over `threshold` bytes its own mapping, returned whole when
    freed. Left to itself glibc raises its threshold to the largest block freed so far (up to 32 MiB), and the
    repack's temporaries (one tensor's rows at a time) then come from the heap, which fragments under the
    weights kept between them: the 1.5B Q4_K_M peaked at 1.65x the file instead of 1.40x. Afterwards the
    heap's free top goes back to the system and the thresholds are what glibc's dynamic rule reaches once a
    large block is freed (mmap 32 MiB, trim 64 MiB: a fixed mmap threshold would otherwise leave the trim
    threshold at 128 KiB, and prefill's temporaries would fault in anew each step, measured 8% slower).
    A no-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        yield
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h's M_TRIM_THRESHOLD, M_MMAP_THRESHOLD
    mallopt(m_mmap_threshold, threshold)
    try:
        yield
    finally:
        trim(0)
        mallopt(m_mmap_threshold, 32 << 20)
        mallopt(m_trim_threshold, 64 << 20)  # the dynamic rule's pair (twice the mmap threshold): freed heap
        # stays for the next step's temporaries instead of going back to the system and faulting in again
