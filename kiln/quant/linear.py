"""`QuantLinear`: an nn.Linear whose weight stays in its GGUF quantized form, and `swap_linears`.

Owns: QuantLinear, `run` (the one place that maps a route.Plan's kind to its kernel entry point), `matmul`
and `swap_linears` (every nn.Linear whose GGUF weight is quantized and, where the kernels serve the device,
every quantized nn.Embedding, through swap.py's walker).
Not: the routing decisions (route.py), the kernels (gemv.py, gemv_int8.py, mma.py, dequant.py) and the packed
layout (packed.py), the GGUF block formats (legacy.py, kquants.py, iquants.py), the walker and the joining
rule (swap.py), wiring into kiln/load.py (the loader calls swap_linears on the model it builds).

Storage is chosen once, at construction, by where the weight lives:
- a device the Triton kernels serve under the policy (CUDA; CPU too with triton_cpu, for tests): the rows are
  repacked into packed.PackedWeight planes (lossless, within 4% of the file's bytes);
- anywhere else: the raw GGUF rows as given (for an mmap'd file on CPU: no copy).
Everything is a non-persistent buffer: the quantized bytes never enter state_dict, so a loader that fills
the dense parameters with load_state_dict(strict=True) only has to leave out the names swap_linears returns.

forward(x (..., K)) flattens the leading dims to M rows and asks route.plan(qtype, M, N, K, x.dtype,
policy) once: where the kernels serve x's device, up to 8 rows go through a GEMV (int8 activations or
float; dequantization fused: decode, and a server's batched decode step), 9..32 rows through the
tensor-core tiles where they measured faster, anything else through dequantize_gpu into an x.dtype scratch
and cuBLAS (prefill); elsewhere the reference: the dense weight (`dequantize`), then a matmul — slow,
obviously correct. The policy is the layer's own (swap_linears hands the model's to every layer). The
decode path is CUDA-graph capturable once it has run for its shape (no host sync; the only allocations are
the output and split-K partials, sized by the shapes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from kiln.errors import KilnError
from kiln.ops import use_triton
from kiln.ops.rope import RopeOut
from kiln.policy import DEFAULT, Policy
from kiln.quant import dequantize as dequantize_gguf
from kiln.quant import route
from kiln.quant.dequant import dequantize_gpu
from kiln.quant.gemv import gemv
from kiln.quant.gemv_int8 import QuantAct, empty_act, gemm_int8, gemv_int8, gemv_int8_pair, quantize_act
from kiln.quant.mma import gemm_mma
from kiln.quant.packed import FORMATS, PackedWeight, dequantize_ref, format_of, packed_fields, repack
from kiln.quant.swap import dense, quantized, swap_layers


def _kernels_serve(device: torch.device, policy: Policy = DEFAULT) -> bool:
    return use_triton(torch.empty(0, device=device), policy)


def run(plan: route.Plan, x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None, *,
        act: QuantAct | None = None, policy: Policy = DEFAULT) -> torch.Tensor:
    """x (M, K) @ w.T (+ bias) -> (M, N) in x.dtype by the kernel and config of `plan`; `act`: x already
    quantized (a one-row int8 plan only). The GEMVs take the float32 bias as it is; the rest in x's dtype."""
    kind, cfg = plan.kind, plan.config
    if kind == "gemv_int8":
        return gemv_int8(act if act is not None else quantize_act(x, policy), w, bias, cfg, policy)
    if kind == "gemm_int8":
        return gemm_int8(quantize_act(x, policy), w, bias, cfg, policy)
    if kind == "gemv":
        return gemv(x, w, bias, cfg)
    bias = None if bias is None else bias.to(x.dtype)
    if kind == "mma":
        return gemm_mma(x, w, bias, cfg)
    if kind == "dequant":
        return F.linear(x, dequantize_gpu(w, x.dtype, cfg), bias)               # (N, K) scratch, then cuBLAS
    assert kind == "reference", plan
    return F.linear(x, dequantize_ref(w).to(x.dtype), bias)


def matmul(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None, *, policy: Policy = DEFAULT,
           act: QuantAct | None = None) -> torch.Tensor:
    """x (M, K) @ w.T (+ bias) by route.plan's kernel for this shape, dtype, policy and device."""
    plan = route.plan(w.qtype, x.shape[0], w.shape[0], w.shape[1], x.dtype, policy, sms=route.sm_count(x.device),
                      triton=use_triton(x, policy))
    return run(plan, x, w, bias, act=act, policy=policy)


class QuantLinear(nn.Module):
    """y = x @ W.T (+ bias) with W (out_features, in_features) held as GGUF-quantized data."""

    def __init__(self, in_features: int, out_features: int, qtype: int, *, packed: PackedWeight | None = None,
                 raw: torch.Tensor | None = None, bias: torch.Tensor | None = None, policy: Policy = DEFAULT):
        super().__init__()
        if (packed is None) == (raw is None):
            raise ValueError("QuantLinear holds exactly one of packed planes or raw GGUF rows")
        self.in_features, self.out_features, self.qtype = in_features, out_features, int(qtype)
        self.policy = policy
        for name in packed_fields():
            self.register_buffer(name, getattr(packed, name) if packed is not None else None, persistent=False)
        self.register_buffer("raw", raw, persistent=False)
        # A buffer, not a Parameter: float32 like the file, and never the first of `model.parameters()`,
        # whose dtype the caches and decoders take as the model's compute dtype.
        self.register_buffer("bias", bias, persistent=False)

    @classmethod
    def from_gguf(cls, raw_rows: torch.Tensor, qtype: int, shape: tuple[int, int],
                  bias: torch.Tensor | None = None, device=None, policy: Policy = DEFAULT) -> QuantLinear:
        """raw_rows (N, row_bytes) uint8 of a GGUF tensor of torch-order shape (N, K) -> a QuantLinear on device
        (default: raw_rows' device)."""
        fmt = format_of(qtype)  # KilnError for types without kernels (plain floats stay nn.Linear)
        n, k = (int(s) for s in shape)
        if k % fmt.block or raw_rows.dtype != torch.uint8 or raw_rows.numel() != n * k // fmt.block * fmt.type_size:
            raise KilnError(f"{fmt.name} weight of shape {(n, k)} needs {n} rows of {k // fmt.block * fmt.type_size}"
                            f" bytes (uint8), got {tuple(raw_rows.shape)} of {raw_rows.dtype}")
        device = torch.device(device) if device is not None else raw_rows.device
        rows = raw_rows.reshape(n, -1)
        if bias is not None:
            bias = bias.detach().to(device)
        if _kernels_serve(device, policy):
            return cls(k, n, qtype, packed=repack(rows, qtype, (n, k), device), bias=bias, policy=policy)
        return cls(k, n, qtype, raw=rows.to(device), bias=bias, policy=policy)

    @property
    def packed(self) -> PackedWeight | None:
        if self.qs is None:
            return None
        return PackedWeight(self.qtype, (self.out_features, self.in_features),
                            **{name: getattr(self, name) for name in packed_fields()})

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
        return dequantize_ref(self.packed).to(dtype)

    def plan(self, x: torch.Tensor) -> route.Plan:
        """route.plan for x (..., K) as forward would run it."""
        return route.plan(self.qtype, x.numel() // x.shape[-1], self.out_features, self.in_features, x.dtype,
                          self.policy, sms=route.sm_count(x.device),
                          triton=self.qs is not None and use_triton(x, self.policy))

    def takes_int8(self, x: torch.Tensor) -> bool:
        """Does forward(x) take the int8-activation GEMV (so that a caller may quantize x once, for several
        layers, with gemv_int8.quantize_act and pass it as `act`)?"""
        return self.plan(x).kind == "gemv_int8"

    def int8_input(self, x: torch.Tensor) -> QuantAct | None:
        """An empty buffer for x quantized to int8 when forward(x) takes the int8 GEMV (`takes_int8`), for
        the kernel that produces x to fill in the same launch (ops.rms_norm, silu_mul: `q8=`); else None."""
        return empty_act(self.in_features, x.dtype, x.device) if self.takes_int8(x) else None

    @classmethod
    def cat(cls, layers: list[QuantLinear]) -> QuantLinear:
        """One QuantLinear with the rows of `layers` (one GGUF type, packed: `joins`) stacked: every plane
        of the packed layout is row-major, so the planes concatenate."""
        a = layers[0]
        n = sum(layer.out_features for layer in layers)
        planes = {name: torch.cat([getattr(layer, name) for layer in layers]) for name in a.packed.planes()}
        bias = None if a.bias is None else torch.cat([layer.bias for layer in layers])
        packed = type(a.packed)(a.qtype, (n, a.in_features), **planes)
        return cls(a.in_features, n, a.qtype, packed=packed, bias=bias, policy=a.policy)

    def joins(self, other: QuantLinear) -> bool:
        """May `cat` stack these two? The same GGUF type, both packed, one policy."""
        return (self.qtype == other.qtype and self.qs is not None and other.qs is not None
                and self.policy == other.policy)

    def forward(self, x: torch.Tensor, act: QuantAct | None = None) -> torch.Tensor:
        """x (..., K) -> (..., N); `act` is x already quantized (where takes_int8(x))."""
        x2 = x.reshape(-1, self.in_features)                           # (M, K)
        plan = self.plan(x2)
        if plan.kind == "reference":  # raw GGUF rows or packed planes: the dense weight, then a matmul
            bias = None if self.bias is None else self.bias.to(x.dtype)
            y = F.linear(x2, self.dequantize(x.dtype).to(x.device), bias)
        else:
            y = run(plan, x2, self.packed, self.bias, act=act, policy=self.policy)
        return y.view(*x.shape[:-1], self.out_features)

    def _pair_configs(self, other: nn.Module, x2: torch.Tensor) -> tuple | None:
        """The two Q8Configs when self and other, for rows x2, both take the one-row int8 GEMV (policy.pair_gemv
        on); None elsewhere. One launch takes one warp count: other's program takes self's (route.q8_table
        may give a Q4_K q+k one warp beside a 4-warp v of another format)."""
        if not (isinstance(other, QuantLinear) and self.policy.pair_gemv and self.in_features == other.in_features):
            return None
        p0, p1 = self.plan(x2), other.plan(x2)
        if p0.kind != "gemv_int8" or p1.kind != "gemv_int8" or p0.config.num_stages != p1.config.num_stages:
            return None
        return p0.config, replace(p1.config, num_warps=p0.config.num_warps)

    def paired(self, other: nn.Module, x: torch.Tensor, act: QuantAct) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(self(x, act), other(x, act)) in one launch (gemv_int8_pair) where `_pair_configs` allows (a joined
        q/k/v whose parts differ in format); None elsewhere (or with policy.pair_gemv off, KILN_PAIR_GEMV=0)."""
        configs = self._pair_configs(other, x.reshape(-1, self.in_features))
        if configs is None:
            return None
        y = gemv_int8_pair(act, self.packed, other.packed, self.bias, other.bias, *configs, self.policy)
        y = y.view(*x.shape[:-1], y.shape[-1])
        return y[..., :self.out_features], y[..., self.out_features:]

    @classmethod
    def rope_joined(cls, groups: list[nn.Module], x: torch.Tensor, act: QuantAct, rope: RopeOut) -> torch.Tensor | None:
        """The rotated q rows (..., H·D) of a joined q | k | v's `groups` (in order) for one row of x, its k and
        v stored into rope's caches by the GEMVs' epilogue (ops.rope.RopeOut: no rope kernel after them) —
        where every group takes the one-row int8 GEMV with programs of whole rotation pairs (one launch for two
        groups where `paired` would take them); None elsewhere, nothing launched."""
        x2 = x.reshape(-1, groups[0].in_features)
        if not all(isinstance(g, cls) for g in groups) or x2.shape[0] != 1 or groups[0].out_features < rope.n_q:
            return None
        plans = [g.plan(x2) for g in groups]
        if any(p.kind != "gemv_int8" for p in plans):
            return None
        a, policy = groups[0], groups[0].policy
        pair = a._pair_configs(groups[1], x2) if len(groups) == 2 else None  # one launch where `paired` takes one
        # one row a program (route's rule for a small Q6_K v filling the SMs alone) -> two: a rotation pair
        configs = [replace(c, block_n=2) if c.block_n == 1 else c for c in (pair or [p.config for p in plans])]
        if not all(rope.fits(c, g.out_features) for c, g in zip(configs, groups)):
            return None
        if pair is not None:
            y = gemv_int8_pair(act, a.packed, groups[1].packed, a.bias, groups[1].bias, *configs, policy, rope=rope)
        else:
            outs, offset = [], 0
            for g, c in zip(groups, configs):  # each launch stores its own rows; the first's output holds q
                outs.append(gemv_int8(act, g.packed, g.bias, c, policy, rope=rope, offset=offset))
                offset += g.out_features
            y = outs[0]
        return y.view(*x.shape[:-1], y.shape[-1])[..., :rope.n_q]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"qtype={FORMATS[self.qtype].name}, bias={self.bias is not None}, "
                f"storage={'gguf rows' if self.raw is not None else 'packed'}")


class QuantEmbedding(nn.Module):
    """nn.Embedding over packed GGUF rows: a lookup dequantizes only the rows it reads (one dequantize_gpu
    launch that reads them from the planes; off the GPU kernels a gather per plane first), so a quantized
    embedding table costs its file bytes on the GPU, and a tied one shares its planes with the output head's
    QuantLinear."""

    def __init__(self, packed: PackedWeight, dtype: torch.dtype):
        super().__init__()
        self.qtype, self.dtype = packed.qtype, dtype
        self.num_embeddings, self.embedding_dim = packed.shape
        for name in packed_fields():
            self.register_buffer(name, getattr(packed, name), persistent=False)

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(self.qtype, (self.num_embeddings, self.embedding_dim),
                            **{name: getattr(self, name) for name in packed_fields()})

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)                                         # (B*T,)
        if use_triton(flat):  # the kernel reads the ids' rows from the planes itself
            w = dequantize_gpu(self.packed, self.dtype, rows=flat)     # (B*T, E)
        else:
            rows = {n: t.index_select(0, flat) for n, t in self.packed.planes().items()}
            w = dequantize_ref(PackedWeight(self.qtype, (flat.numel(), self.embedding_dim), **rows)).to(self.dtype)
        return w.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={FORMATS[self.qtype].name}, packed"


def swap_linears(model: nn.Module, weights: Mapping, device=None, dtype=torch.bfloat16,
                 policy: Policy = DEFAULT) -> list[str]:
    """Replace each nn.Linear whose weight (weights[f"{module}.weight"], a GGUFTensor-like with `raw_rows()`,
    `qtype`, `shape`) is quantized in a format with kernels by a QuantLinear on device, bias included.
    F32/F16/BF16 weights and plain tensors stay nn.Linear. Where the kernels serve the device, a quantized
    nn.Embedding becomes a QuantEmbedding (output in dtype) sharing its planes with a tied output head.
    Returns the parameter names now held by quantized modules (weights and biases), which the caller must
    not load. Every QuantLinear routes its matmuls by `policy`."""
    serve = device is not None and _kernels_serve(torch.device(device), policy)
    planes = {}  # id(embedding weight) -> its PackedWeight: a tied output head reads the same planes

    def embedding(name, w):
        if not serve or not _has_kernels(w):
            return None
        planes[id(w)] = packed = repack(w.raw_rows(), w.qtype, tuple(w.shape), device)
        return QuantEmbedding(packed, dtype)

    def linear(name, w, b):
        if not _has_kernels(w):
            return None
        bias = None if b is None else dense(b).to(device or "cpu")
        if id(w) in planes:  # the tied embedding's planes, held once
            return QuantLinear(w.shape[1], w.shape[0], w.qtype, packed=planes[id(w)], bias=bias, policy=policy)
        return QuantLinear.from_gguf(w.raw_rows(), w.qtype, tuple(w.shape), bias=bias, device=device, policy=policy)

    return swap_layers(model, weights, linear=linear, embedding=embedding)


def _has_kernels(w) -> bool:
    return quantized(w) and int(w.qtype) in FORMATS
