"""The compact CPU path: GGUF weights repacked, tensor by tensor, into torch's packed CPU matmuls.

Owns the CPU layer types and the swap that builds them from a GGUF model's weights:
- `Int4Linear`: 4-bit codes in torch's CPU int4 layout with one bf16 (scale, zero) per 32 weights,
  `w = (q - 8) * scale + zero`, through `_weight_int4pack_mm_for_cpu`. Q4_0, Q4_1 and Q4_K map onto it
  exactly up to the bf16 rounding of scale and zero (their codes are copied, not re-quantized).
- `Int8Linear`: int8 rows with one bf16 scale per row, through `_weight_int8pack_mm`; every other type
  (Q5_0, Q6_K, Q8_0, …, plain floats). A second rounding, finer than the GGUF block grids it re-quantizes.
  One float32 row (the batch-1 decode step) goes through kiln/native.py's GEMV instead, where built.
- `ScreenedHead`: the output head (the largest matrix: 151936 x 896 for Qwen2.5-0.5B). A 4-bit copy
  screens the whole vocabulary, then the `SCREEN_TOP` best candidates of each row are recomputed exactly
  in fp32 from the file's own rows; the argmax and the head of the distribution are exact, the tail
  carries the 4-bit error.
- `GGUFEmbedding`: the token table stays in the file's blocks (no copy of an mmap'd file); a lookup
  dequantizes only the rows it reads, exactly.
- `compact_linears(model, weights)`: swaps these in on a meta-device model before the loader assigns the
  rest, so peak memory stays near the compact size (one tensor is dense at a time).
Not: GPU kernels (route.py and the files it routes to, linear.py), the GGUF block formats (legacy.py,
kquants.py), loading order.

Activations enter the packed matmuls as bfloat16 (torch's CPU kernels vectorize only that; fp32 inputs
run ~10x slower) and the result comes back in the caller's dtype. The native GEMV keeps x in fp32 and
streams the int8 rows about twice as fast as `_weight_int8pack_mm` at batch 1; `Fused` computes the norm
before it (kiln.fuse.Normed) in one native call too.

Shape alphabet: M rows of activations, N output features, K input features, G = K / 32 groups,
U candidate rows, V vocabulary.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import gguf
import torch
from torch import nn

from kiln import native
from kiln.errors import KilnError
from kiln.fuse import FusedLinear, Normed
from kiln.quant import dequantize as dequantize_gguf
from kiln.quant import kquants, legacy

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


def _native_row(x: torch.Tensor) -> bool:
    """One float32 row (a batch-1 decode step), nothing to differentiate, and the native kernels built:
    native.py serves it."""
    return (x.dtype == torch.float32 and x.numel() == x.shape[-1] and not x.requires_grad
            and native.available())


class Int8Linear(nn.Module):
    """y = x @ W.T (+ bias) with W held as int8 rows and one bf16 scale per row."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("q", q)                                  # (N, K) int8
        self.register_buffer("scale", scale)                          # (N,) bf16
        self.register_buffer("bias", _bias(bias))
        self.out_features, self.in_features = q.shape

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        w = weight.detach().float()  # (N, K)
        # The kernel applies bf16 scales, so quantize on that grid; nudging up by 2^-8 before rounding
        # to bf16 (relative error <= 2^-8) keeps every |w| / scale below 127.01, which rounds to 127.
        scale = ((w.abs().amax(1) / 127).clamp_min(1e-12) * (1 + 2 ** -8)).to(torch.bfloat16)  # (N,)
        return cls(torch.round(w / scale.float()[:, None]).to(torch.int8), scale, bias)

    @property
    def nbytes(self) -> int:
        return self.q.numel() + 2 * self.scale.numel()

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return (self.q.float() * self.scale.float()[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _native_row(x):  # the decode step's GEMV, at memory speed and with x in fp32
            return native.gemv_i8(x.reshape(-1), self.q, self.scale, self.bias).view(*x.shape[:-1], -1)
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (M, K)
        return _finish(torch._weight_int8pack_mm(x2, self.q, self.scale), x, self.bias, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 rows, bf16 x"


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
    packs, szs = [], []
    for a in range(0, n, PACK_ROWS):
        codes, scale, zero = rows_of(a, min(n, a + PACK_ROWS))
        p, sz = _int4_rows(codes.reshape(-1, k), scale.reshape(codes.numel() // k, -1),
                           zero.reshape(codes.numel() // k, -1))
        packs.append(p)
        szs.append(sz)
    return torch.cat(packs), torch.cat(szs, 1)


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

    For every row of x the SCREEN_TOP highest screened logits are recomputed from the file's rows; all
    candidates of a chunk of rows are recomputed for every row of the chunk (more exact logits, one matmul).
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
            cand = part.topk(min(self.top, self.out_features), dim=-1).indices.reshape(-1).unique()  # (U,)
            exact = x2[a:a + self.ROWS_PER_CHUNK].float() @ self.exact.rows(cand).t()  # (m, U)
            part.index_copy_(1, cand, exact)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 screen, top {self.top} exact"


# --- the swap ---

def _quantized(w) -> bool:
    return getattr(w, "qtype", None) is not None and int(w.qtype) not in (_T.F32, _T.F16, _T.BF16)


def _dense(w) -> torch.Tensor:
    return w if isinstance(w, torch.Tensor) else w.dequantize(torch.float32)


def compact_linear(w, bias=None, head: bool = False) -> nn.Module:
    """The CPU layer for one weight (a GGUFTensor or a dense tensor): see the module docstring."""
    qtype = int(w.qtype) if _quantized(w) else None
    if head and qtype is not None and w.shape[0] >= SCREEN_MIN_ROWS and w.shape[0] % 64 == 0 and bias is None:
        return ScreenedHead.from_gguf(w)
    if qtype in INT4_EXACT and w.shape[0] % 64 == 0 and not getattr(w, "add", 0):  # whole 64-row tiles
        return Int4Linear.from_gguf(w.raw_rows(), qtype, tuple(w.shape), bias)
    return Int8Linear.from_dense(_dense(w), bias)


def _linear_weight(weights: Mapping, name: str):
    if name in weights:
        return weights[name]
    if name == "lm_head.weight":  # tied output head
        return weights.get("model.embed_tokens.weight")
    return None


class Fused(FusedLinear):
    """Compact layers of one input joined into one wider layer, behind kiln.fuse's FusedLinear protocol
    (the model calls it with x or a Normed of x, gets one output per part, or `wide_forward`)."""

    def __init__(self, wide: nn.Module, widths: list[int]):
        nn.Module.__init__(self)  # FusedLinear's own grouping knows only nn.Linear and QuantLinear
        self.groups, self.splits = nn.ModuleList([wide]), [list(widths)]

    def _wide_outputs(self, x) -> list[torch.Tensor]:
        if isinstance(x, Normed) and _native_row(x.x):  # the decode step's norm: one native call
            n = x.norm
            if x.residual is None:
                return [self.groups[0](native.rms_norm(x.x, n.weight, n.eps, n.offset))]
            y, x.h = native.rms_norm(x.x, n.weight, n.eps, n.offset, x.residual.float())
            return [self.groups[0](y)]
        return super()._wide_outputs(x)


def _join(layers: list[nn.Module]) -> nn.Module | None:
    """One layer with the rows of `layers` stacked, or None when they do not share a type and input."""
    a = layers[0]
    if any(type(b) is not type(a) or b.in_features != a.in_features or (b.bias is None) != (a.bias is None)
           for b in layers) or type(a) not in (Int8Linear, Int4Linear):
        return None
    bias = None if a.bias is None else torch.cat([b.bias for b in layers])
    if isinstance(a, Int8Linear):
        return Int8Linear(torch.cat([b.q for b in layers]), torch.cat([b.scale for b in layers]), bias)
    n = sum(b.out_features for b in layers)  # whole 64-row tiles each, so the packed rows stack
    return Int4Linear(torch.cat([b.packed for b in layers]), torch.cat([b.scale_zero for b in layers], 1),
                      (n, a.in_features), bias)


FUSE = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}


def fuse_compact(model: nn.Module) -> nn.Module:
    """In place: a module whose q/k/v (gate/up) projections are compact layers of one kind gets `qkv`
    (`gate_up`), one matmul instead of three (two); fewer, wider calls cost less per-call overhead."""
    for mod in list(model.modules()):
        for fused, parts in FUSE.items():
            if not (hasattr(mod, fused) and all(hasattr(mod, p) for p in parts)):
                continue
            wide = _join([getattr(mod, p) for p in parts])
            if wide is not None:
                setattr(mod, fused, Fused(wide, [getattr(mod, p).out_features for p in parts]))
                for p in parts:
                    delattr(mod, p)
    return model


def compact_linears(model: nn.Module, weights: Mapping) -> list[str]:
    """On a (meta-device) model, replace every nn.Linear with a compact CPU layer and a quantized GGUF
    embedding table with a GGUFEmbedding. Returns the parameter names now held (the caller loads the rest)."""
    taken = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, nn.Embedding) and _quantized(weights.get(f"{name}.weight")):
                setattr(parent, child_name, GGUFEmbedding(GGUFRows.of(weights[f"{name}.weight"])))
                taken.append(f"{name}.weight")
                continue
            w = _linear_weight(weights, f"{name}.weight") if isinstance(child, nn.Linear) else None
            if w is None:
                continue
            if tuple(w.shape) != (child.out_features, child.in_features):
                raise KilnError(f"tensor {name}.weight has shape {tuple(w.shape)} but the model needs "
                                f"{(child.out_features, child.in_features)}; config and weights disagree")
            b = weights.get(f"{name}.bias") if child.bias is not None else None
            setattr(parent, child_name, compact_linear(w, None if b is None else _dense(b), head=name == "lm_head"))
            taken += [f"{name}.weight"] + ([f"{name}.bias"] if b is not None else [])
    fuse_compact(model)
    return taken

