"""Fewer kernels per decode step: projections of one input concatenated into one matmul at load time
(q/k/v, gate/up), and the norm before a matmul / the gated activation before the down projection folded
into the GEMV that reads them.

Owns: `FusedLinear` (several linear layers of one input as one or a few wider ones; `forward` returns one
output per original layer, as views of the wide outputs), `fuse_projections(model)`, which gives every
attention block a `qkv` and every MLP a `gate_up` where that saves launches, `Normed` (norm(x + residual)
not yet computed: a FusedLinear of QuantLinears runs it in its GEMV's prologue at decode, anything else
computes it with ops.rms_norm) and `gated(down, gate_up, x, act)` (the MLP's second half, the activation
in the down projection's prologue where it can be).
Not: the models' use of them (a block passes a Normed to `self.qkv` when it exists and calls `value()`
otherwise), the kernels (kernels.gemv and its Prologue), CPU speed.

Why: at batch 1 a small model's decode step is bound by the number of kernels, not by bytes (NOTES.md:
~1 µs fixed cost per kernel in a CUDA graph, a 1024-row GEMV is done in a few more). Concatenating weight
rows is exact: each output row is the same dot product as before. QuantLinears concatenate when they hold
the same GGUF type (every plane of the packed layout is row-major, so rows stack); a Q4_K_M file's Q6_K
`v_proj` next to Q4_K `q_proj`/`k_proj` gives two groups, q+k and v.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.ops import gelu_tanh_mul, rms_norm, silu_mul
from kiln.quant.kernels import Prologue, empty_act, quantize_act
from kiln.quant.linear import QuantLinear


# Which prologues the GEMV folds in ("norm", "silu", "gelu"). Off by default: measured on the H100
# (bench/prologue_ab.py, bench/results/2026-11-25-h100-b/), a prologue costs the GEMV more than the launch
# it saves — Qwen3-0.6B Q4_K_M decode 706 tok/s with none, 677 with the activations, 618 with all;
# Llama-3.2-1B Q4_K_M 767 vs 727. Each program would redo the row's norm before its first product.
PROLOGUES: set[str] = set()


class Normed:
    """norm(x + residual) — or norm(x) without a residual — before it is computed. `value()` computes it
    (one ops.rms_norm kernel); a FusedLinear whose layers take prologues computes it inside its GEMVs.
    Either way `h` is then the residual stream x + residual (x itself without one)."""

    def __init__(self, x: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module):
        self.x, self.residual, self.norm = x, residual, norm
        self.h, self._y = (x if residual is None else None), None

    @property
    def shape(self) -> torch.Size:
        return self.x.shape

    def value(self, q8: tuple | None = None) -> torch.Tensor:
        """The normed x; with q8 (a QuantAct's buffers) the norm kernel also stores it quantized to int8."""
        if self._y is None:
            n = self.norm
            if self.residual is None:
                self._y = rms_norm(self.x, n.weight, n.eps, n.offset, q8=q8)
            else:
                self._y, self.h = rms_norm(self.x, n.weight, n.eps, n.offset, self.residual, q8=q8)
        return self._y

    def prologue(self, write_h: bool) -> Prologue:
        """The GEMV prologue computing this norm; with write_h, that GEMV also stores h (allocated here)."""
        n, h = self.norm, None
        if write_h and self.residual is not None:
            self.h = h = torch.empty_like(self.x)
        res = None if self.residual is None else self.residual.reshape(-1)
        return Prologue("norm", n.weight, n.eps, n.offset, res, None if h is None else h.view(-1))


def project(module: nn.Module, x, fused: str, parts: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    """The projections `parts` of x: through module.<fused> (a FusedLinear, which may take a Normed) when
    fuse_projections made one, else each layer on the computed x."""
    if getattr(module, fused, None) is not None:
        return getattr(module, fused)(x)
    x = value(x)
    return tuple(getattr(module, p)(x) for p in parts)


def value(x) -> torch.Tensor:
    """A tensor as is; a Normed computed."""
    return x.value() if isinstance(x, Normed) else x


def gated(down: nn.Module, gate_up: FusedLinear, x, act: str = "silu") -> torch.Tensor:
    """down(act(gate) * up) with gate, up = gate_up(x): one kernel for both matmuls' glue where the down
    projection's GEMV takes the activation as its prologue, else ops.silu_mul / gelu_tanh_mul."""
    if gate_up.wide is None:
        g, u = gate_up(x)
        return down((F.silu(g) if act == "silu" else F.gelu(g, approximate="tanh")) * u)
    gu = gate_up.wide_forward(x)  # (..., 2I)
    if act in PROLOGUES and isinstance(down, QuantLinear) and down.takes_prologue(gu[..., :down.in_features]):
        return down(gu, prologue=Prologue(act))
    fn = silu_mul if act == "silu" else gelu_tanh_mul
    if isinstance(down, QuantLinear) and down.takes_int8(gu[..., :down.in_features]):
        a = empty_act(down.in_features, gu.dtype, gu.device)  # the activation kernel quantizes its output
        return down(fn(gu, q8=a.buffers), act=a)
    return down(fn(gu))


class FusedLinear(nn.Module):
    """Linear layers of one input x (..., K) -> a tuple of their outputs, computed by len(self.groups) matmuls."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        groups: list[list[nn.Module]] = []
        for layer in layers:
            if groups and _joinable(groups[-1][-1], layer):
                groups[-1].append(layer)
            else:
                groups.append([layer])
        self.groups = nn.ModuleList(_concat(g) for g in groups)
        self.splits = [[layer.out_features for layer in g] for g in groups]  # output widths per group

    def forward(self, x) -> tuple[torch.Tensor, ...]:
        """x (..., K) or a Normed of it -> one output per original layer."""
        outs = []
        for y, widths in zip(self._wide_outputs(x), self.splits):  # y (..., sum(widths))
            outs += y.split(widths, dim=-1) if len(widths) > 1 else [y]
        return tuple(outs)

    def wide_forward(self, x) -> torch.Tensor:
        """The single concatenated output (every part joined: `wide` is not None)."""
        return self._wide_outputs(x)[0]

    def _wide_outputs(self, x) -> list[torch.Tensor]:
        if isinstance(x, Normed) and x._y is None and "norm" in PROLOGUES and all(
                isinstance(g, QuantLinear) and g.takes_prologue(x.x) for g in self.groups):
            return [g(x.x, prologue=x.prologue(write_h=i == 0)) for i, g in enumerate(self.groups)]
        xt = x.x if isinstance(x, Normed) else x
        if all(isinstance(g, QuantLinear) and g.takes_int8(xt) for g in self.groups):
            if isinstance(x, Normed) and x._y is None:  # the norm kernel quantizes its output too
                act = empty_act(xt.shape[-1], xt.dtype, xt.device)
                y = x.value(q8=act.buffers)
            else:  # one quantization of x for every group's int8 GEMV
                y = value(x)
                act = quantize_act(y)
            return [g(y, act=act) for g in self.groups]
        x = value(x)
        return [g(x) for g in self.groups]

    @property
    def wide(self) -> nn.Module | None:
        """The single concatenated layer when every part joined (its output is the parts side by side)."""
        return self.groups[0] if len(self.groups) == 1 else None


def _joinable(a: nn.Module, b: nn.Module) -> bool:
    if isinstance(a, QuantLinear) and isinstance(b, QuantLinear):
        return (a.qtype == b.qtype and a.in_features == b.in_features and a.qs is not None
                and b.qs is not None and (a.bias is None) == (b.bias is None))
    if type(a) is nn.Linear and type(b) is nn.Linear:
        return (a.weight.dtype == b.weight.dtype and a.in_features == b.in_features
                and (a.bias is None) == (b.bias is None))
    return False


def _concat(layers: list[nn.Module]) -> nn.Module:
    if len(layers) == 1:
        return layers[0]
    bias = None if layers[0].bias is None else torch.cat([l.bias for l in layers])
    n = sum(l.out_features for l in layers)
    if isinstance(layers[0], QuantLinear):
        planes = {name: torch.cat([getattr(l, name) for l in layers])
                  for name, t in layers[0].packed.planes().items()}
        packed = type(layers[0].packed)(layers[0].qtype, (n, layers[0].in_features), **planes)
        return QuantLinear(layers[0].in_features, n, layers[0].qtype, packed=packed, bias=bias)
    out = nn.Linear(layers[0].in_features, n, bias=bias is not None, device="meta")
    out.weight = nn.Parameter(torch.cat([l.weight for l in layers]), requires_grad=False)
    if bias is not None:
        out.bias = nn.Parameter(bias, requires_grad=False)
    return out


def fuse_projections(model: nn.Module) -> nn.Module:
    """In place: every module with q_proj/k_proj/v_proj gets `qkv`, every one with gate_proj/up_proj gets
    `gate_up` (a FusedLinear); the separate layers are dropped so the weights are held once."""
    for mod in list(model.modules()):
        for fused, parts in (("qkv", ("q_proj", "k_proj", "v_proj")), ("gate_up", ("gate_proj", "up_proj"))):
            if all(isinstance(getattr(mod, p, None), nn.Module) for p in parts):
                f = FusedLinear([getattr(mod, p) for p in parts])
                if len(f.groups) == len(parts):
                    continue  # nothing joins: keep the layers as they are
                setattr(mod, fused, f)
                for p in parts:
                    delattr(mod, p)
    return model
