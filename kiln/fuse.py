"""Fewer kernels per decode step: projections of one input concatenated into one matmul at load time
(q/k/v, gate/up), and the norm before a matmul / the gated activation before the down projection storing
their output already quantized for the int8 GEMV that reads it.

Owns: `FusedLinear` (several linear layers of one input as one or a few wider ones; `forward` returns one
output per original layer, as views of the wide outputs), `fuse_projections(model)`, which gives every
attention block a `qkv` and every MLP a `gate_up` where that saves launches, `Normed` (norm(x + residual)
not yet computed: a FusedLinear of int8-GEMV QuantLinears has the norm kernel quantize its output too,
anything else computes it with ops.rms_norm) and `gated(down, gate_up, x, act)` (the MLP's second half,
the activation kernel quantizing its output for an int8 down projection).
Not: the models' use of them (a block passes a Normed to `self.qkv` when it exists and calls `value()`
otherwise), the kernels (quant/), CPU speed.

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
from kiln.quant.gemv_int8 import empty_act, quantize_act
from kiln.quant.linear import QuantLinear


class Normed:
    """norm(x + residual) — or norm(x) without a residual — before it is computed. `value()` computes it
    (one ops.rms_norm kernel; with q8, also stored quantized for the int8 GEMVs). Either way `h` is then the
    residual stream x + residual (x itself without one)."""

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
    """down(act(gate) * up) with gate, up = gate_up(x): ops.silu_mul / gelu_tanh_mul, which also quantize
    their output where the down projection takes the int8 GEMV."""
    if gate_up.wide is None:
        g, u = gate_up(x)
        return down((F.silu(g) if act == "silu" else F.gelu(g, approximate="tanh")) * u)
    gu = gate_up.wide_forward(x)  # (..., 2I)
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
        return QuantLinear(layers[0].in_features, n, layers[0].qtype, packed=packed, bias=bias,
                           policy=layers[0].policy)
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
