"""`QuantLinear`: an nn.Linear whose weight stays in its GGUF quantized form, and `swap_linears`.

Owns: QuantLinear (built by `from_gguf`; `forward` dispatch by device and batch size; the dense reference
weight `dequantize`; `cat`, its rows stacked with its neighbours' for swap.Joined; `int8_input`, the buffer
a producer kernel fills for its int8 GEMV), and `swap_linears`, which replaces every nn.Linear whose GGUF
weight is quantized (and, where the kernels serve the device, every quantized nn.Embedding) through
swap.py's walker.
Not: the kernels and the packed layout (kernels.py), the GGUF block formats (legacy.py, kquants.py,
iquants.py), the walker and the joining rule (swap.py), wiring into kiln/load.py (the loader calls
swap_linears on the model it builds).

Storage is chosen once, at construction, by where the weight lives:
- a device the Triton kernels serve (CUDA; CPU too under KILN_TRITON_CPU=1, for tests): the rows are
  repacked into kernels.PackedWeight planes (lossless, within 4% of the file's bytes);
- anywhere else: the raw GGUF rows as given (for an mmap'd file on CPU: no copy).
Everything is a non-persistent buffer: the quantized bytes never enter state_dict, so a loader that fills
the dense parameters with load_state_dict(strict=True) only has to leave out the names swap_linears returns.

forward(x (..., K)) flattens the leading dims to M rows:
- packed and Triton serves x's device: M <= kernels.gemv_max_rows (8; 1 for Q6_K with 16-bit x) ->
  kernels.gemv (dequantization fused: the decode path, and a server's batched decode step); 9..32 rows
  where kernels.mma_config picks it (output heads, wide matrices) -> kernels.gemm_mma (tensor cores,
  dequantization fused: a server's batched step); more rows or elsewhere -> kernels.dequantize_gpu into
  an x.dtype scratch, then x @ W.T on cuBLAS (the prefill path);
- otherwise the reference: the dense weight (`dequantize`), then a matmul — slow, obviously correct.
The decode path is CUDA-graph capturable once it has run for its shape (no host sync; the only allocations
are the output and split-K partials, sized by the shapes).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kiln.errors import KilnError
from kiln.quant import dequantize as dequantize_gguf
from kiln.quant import kernels
from kiln.quant.kernels import FORMATS, PackedWeight
from kiln.quant.swap import quantized, swap_layers

__all__ = ["QuantLinear", "QuantEmbedding", "swap_linears"]


def _kernels_serve(device: torch.device) -> bool:
    return kernels.use_triton(torch.empty(0, device=device))


class QuantLinear(nn.Module):
    """y = x @ W.T (+ bias) with W (out_features, in_features) held as GGUF-quantized data."""

    def __init__(self, in_features: int, out_features: int, qtype: int, *, packed: PackedWeight | None = None,
                 raw: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        super().__init__()
        if (packed is None) == (raw is None):
            raise ValueError("QuantLinear holds exactly one of packed planes or raw GGUF rows")
        self.in_features, self.out_features, self.qtype = in_features, out_features, int(qtype)
        for name in kernels.packed_fields():
            self.register_buffer(name, getattr(packed, name) if packed is not None else None, persistent=False)
        self.register_buffer("raw", raw, persistent=False)
        # A buffer, not a Parameter: float32 like the file, and never the first of `model.parameters()`,
        # whose dtype the caches and decoders take as the model's compute dtype.
        self.register_buffer("bias", bias, persistent=False)

    @classmethod
    def from_gguf(cls, raw_rows: torch.Tensor, qtype: int, shape: tuple[int, int],
                  bias: torch.Tensor | None = None, device=None) -> QuantLinear:
        """raw_rows (N, row_bytes) uint8 of a GGUF tensor of torch-order shape (N, K) -> a QuantLinear on device
        (default: raw_rows' device)."""
        fmt = kernels._format(qtype)  # KilnError for types without kernels (plain floats stay nn.Linear)
        n, k = (int(s) for s in shape)
        if k % fmt.block or raw_rows.dtype != torch.uint8 or raw_rows.numel() != n * k // fmt.block * fmt.type_size:
            raise KilnError(f"{fmt.name} weight of shape {(n, k)} needs {n} rows of {k // fmt.block * fmt.type_size}"
                            f" bytes (uint8), got {tuple(raw_rows.shape)} of {raw_rows.dtype}")
        device = torch.device(device) if device is not None else raw_rows.device
        rows = raw_rows.reshape(n, -1)
        if bias is not None:
            bias = bias.detach().to(device)
        if _kernels_serve(device):
            return cls(k, n, qtype, packed=kernels.repack(rows.to(device), qtype, (n, k)), bias=bias)
        return cls(k, n, qtype, raw=rows.to(device), bias=bias)

    @property
    def packed(self) -> PackedWeight | None:
        if self.qs is None:
            return None
        return PackedWeight(self.qtype, (self.out_features, self.in_features),
                            **{name: getattr(self, name) for name in kernels.packed_fields()})

    @property
    def nbytes(self) -> int:
        """Bytes of the quantized weight as held (packed planes or raw rows; bias not counted)."""
        if self.raw is not None:
            return self.raw.numel()
        return self.packed.nbytes

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight (out_features, in_features) in dtype, on the module's device (reference path)."""
        if self.raw is not None:  # kiln.quant.dequantize works on CPU tensors
            w = dequantize_gguf(self.raw.reshape(-1).cpu(), self.qtype, (self.out_features, self.in_features), dtype)
            return w.to(self.raw.device)
        return kernels.dequantize_ref(self.packed).to(dtype)

    @classmethod
    def cat(cls, layers: list[QuantLinear]) -> QuantLinear:
        """One QuantLinear with the rows of `layers` (one GGUF type, packed: `joins`) stacked: every plane
        of the packed layout is row-major, so the planes concatenate."""
        a = layers[0]
        n = sum(layer.out_features for layer in layers)
        planes = {name: torch.cat([getattr(layer, name) for layer in layers]) for name in a.packed.planes()}
        bias = None if a.bias is None else torch.cat([layer.bias for layer in layers])
        packed = type(a.packed)(a.qtype, (n, a.in_features), **planes)
        return cls(a.in_features, n, a.qtype, packed=packed, bias=bias)  # merge: pass policy=a.policy here

    def joins(self, other: QuantLinear) -> bool:
        """May `cat` stack these two? The same GGUF type, both packed."""
        return self.qtype == other.qtype and self.qs is not None and other.qs is not None

    def int8_input(self, x: torch.Tensor) -> kernels.QuantAct | None:
        """An empty buffer for x quantized to int8 when forward(x) takes the int8 GEMV (`takes_int8`), for
        the kernel that produces x to fill in the same launch (ops.rms_norm, silu_mul: `q8=`); else None."""
        return kernels.empty_act(self.in_features, x.dtype, x.device) if self.takes_int8(x) else None

    def takes_prologue(self, x: torch.Tensor) -> bool:
        """Can `forward(x, prologue=...)` fold a norm or gated activation into the GEMV (decode, M = 1)?"""
        return self.qs is not None and kernels.use_triton(x) and x.numel() == x.shape[-1]

    def takes_int8(self, x: torch.Tensor) -> bool:
        """Does forward(x) take the int8-activation GEMV (so that a caller may quantize x once, for several
        layers, with kernels.quantize_act and pass it as `act`)?"""
        return self.qs is not None and kernels.use_triton(x) and kernels.takes_int8(self.packed, x)

    def forward(self, x: torch.Tensor, prologue: kernels.Prologue | None = None,
                act: kernels.QuantAct | None = None) -> torch.Tensor:
        """x (..., K) -> (..., N); with a prologue (only where takes_prologue(x)) x is (1, K) before the
        norm, or (1, 2K) [gate | up] before the activation; `act` is x already quantized (takes_int8)."""
        if prologue is not None:
            y = kernels.gemv(x.reshape(1, -1), self.packed, self.bias, prologue=prologue)
            return y.view(*x.shape[:-1], self.out_features)
        x2 = x.reshape(-1, self.in_features)                           # (M, K)
        m = x2.shape[0]
        bias = self.bias
        if self.qs is not None and kernels.use_triton(x2):
            if 1 <= m <= kernels.gemv_max_rows(self.qtype, x2.dtype):
                y = kernels.gemv(x2, self.packed, bias, act=act if m == 1 else None)
            elif (mma := kernels.mma_config(self.qtype, self.out_features, self.in_features, m,
                                            x2.dtype)) is not None:
                y = kernels.gemm_mma(x2, self.packed, None if bias is None else bias.to(x.dtype), config=mma)
            else:
                w = kernels.dequantize_gpu(self.packed, x.dtype)      # (N, K) scratch
                y = F.linear(x2, w, None if bias is None else bias.to(x.dtype))
        else:
            y = F.linear(x2, self.dequantize(x.dtype).to(x.device), None if bias is None else bias.to(x.dtype))
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"qtype={FORMATS[self.qtype].name}, bias={self.bias is not None}, "
                f"storage={'gguf rows' if self.raw is not None else 'packed'}")


class QuantEmbedding(nn.Module):
    """nn.Embedding over packed GGUF rows: a lookup dequantizes only the rows it reads (one gather per plane
    and one dequantize_gpu launch), so a quantized embedding table costs its file bytes on the GPU, and a
    tied one shares its planes with the output head's QuantLinear."""

    def __init__(self, packed: PackedWeight, dtype: torch.dtype):
        super().__init__()
        self.qtype, self.dtype = packed.qtype, dtype
        self.num_embeddings, self.embedding_dim = packed.shape
        for name in kernels.packed_fields():
            self.register_buffer(name, getattr(packed, name), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)                                         # (B*T,)
        rows = PackedWeight(self.qtype, (flat.numel(), self.embedding_dim),
                            **{n: getattr(self, n).index_select(0, flat) for n in kernels.packed_fields()
                               if getattr(self, n) is not None})
        if kernels.use_triton(flat):
            w = kernels.dequantize_gpu(rows, self.dtype)               # (B*T, E)
        else:
            w = kernels.dequantize_ref(rows).to(self.dtype)
        return w.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={FORMATS[self.qtype].name}, packed"


def _dense_bias(b, device) -> torch.Tensor | None:
    if b is None:
        return None
    return (b.dequantize(torch.float32) if hasattr(b, "dequantize") else b).to(device)


def swap_linears(model: nn.Module, weights: Mapping, device=None, dtype=torch.bfloat16) -> list[str]:
    """Replace each nn.Linear whose weight (weights[f"{module}.weight"], a GGUFTensor-like with `raw_rows()`,
    `qtype`, `shape`) is quantized in a format with kernels by a QuantLinear on device, bias included.
    F32/F16/BF16 weights and plain tensors stay nn.Linear. Where the kernels serve the device, a quantized
    nn.Embedding becomes a QuantEmbedding (output in dtype) sharing its planes with a tied output head.
    Returns the parameter names now held by quantized modules (weights and biases), which the caller must
    not load."""
    serve = device is not None and _kernels_serve(torch.device(device))
    planes = {}  # id(embedding weight) -> its PackedWeight: a tied output head reads the same planes

    def embedding(name, w):
        if not serve or not _has_kernels(w):
            return None
        planes[id(w)] = packed = kernels.repack(w.raw_rows().to(device), w.qtype, tuple(w.shape))
        return QuantEmbedding(packed, dtype)

    def linear(name, w, b):
        if not _has_kernels(w):
            return None
        bias = _dense_bias(b, device or "cpu")
        if id(w) in planes:  # the tied embedding's planes, held once
            return QuantLinear(w.shape[1], w.shape[0], w.qtype, packed=planes[id(w)], bias=bias)
        return QuantLinear.from_gguf(w.raw_rows(), w.qtype, tuple(w.shape), bias=bias, device=device)

    return swap_layers(model, weights, linear=linear, embedding=embedding)


def _has_kernels(w) -> bool:
    return quantized(w) and int(w.qtype) in FORMATS
