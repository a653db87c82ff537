"""Projections that read the same input, concatenated into one matmul at load time (q/k/v, gate/up).

Owns: `FusedLinear` (several linear layers of one input as one or a few wider ones; `forward` returns one
output per original layer, as views of the wide outputs) and `fuse_projections(model)`, which gives every
attention block a `qkv` and every MLP a `gate_up` where that saves launches.
Not: the models' use of them (a block calls `self.qkv(x)` when it exists, its three projections
otherwise), the kernels (QuantLinear's GEMV takes the wider matrix as it is), CPU speed.

Why: at batch 1 a small model's decode step is bound by the number of kernels, not by bytes (NOTES.md:
~1 µs fixed cost per kernel in a CUDA graph, a 1024-row GEMV is done in a few more). Concatenating weight
rows is exact: each output row is the same dot product as before. QuantLinears concatenate when they hold
the same GGUF type (every plane of the packed layout is row-major, so rows stack); a Q4_K_M file's Q6_K
`v_proj` next to Q4_K `q_proj`/`k_proj` gives two groups, q+k and v.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.quant.linear import QuantLinear


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

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = []
        for lin, widths in zip(self.groups, self.splits):
            y = lin(x)  # (..., sum(widths))
            outs += y.split(widths, dim=-1) if len(widths) > 1 else [y]
        return tuple(outs)

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
