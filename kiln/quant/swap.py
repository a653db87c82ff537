"""Layer surgery at load: the one walker that replaces a model's layers by what their weights call for, and
the one rule that joins projections of one input (q/k/v, gate/up) into one wider layer.

Owns: `swap_layers`, the walker both compact paths share (quant/linear.swap_linears on GPUs,
quant/cpu.compact_linears on the CPU), with `weight_of` (the tied-output rule), `quantized` and `dense`;
`Joined`, `joinable` / `cat` and `join_projections` (every attention block's `qkv`, every MLP's `gate_up`).
Not: the layer types and how each stacks its rows (a `cat` classmethod on QuantLinear, cpu.Int8Linear,
cpu.Int4Linear; nn.Linear's is here), which layer a path makes of a weight (the callbacks), the kernels,
how models call joined layers (models/base.project, gated, int8_buffer).

Why join: at batch 1 a small model's decode step is bound by the number of kernels, not by bytes (NOTES.md:
~1 µs fixed cost per kernel in a CUDA graph, a 1024-row GEMV is done in a few more); on the CPU fewer, wider
calls cost less overhead. Concatenating weight rows is exact: each output row is the same dot product as
before. Neighbouring layers join when they are of one type, input and bias layout and their type allows it
(QuantLinear: the same GGUF type, packed; nn.Linear: one dtype): a Q4_K_M file's Q6_K `v_proj` next to Q4_K
`q_proj`/`k_proj` gives two groups, q+k and v.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import gguf
import torch
import torch.nn.functional as F
from torch import nn

from kiln.errors import KilnError

JOINS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}
_T = gguf.GGMLQuantizationType
_FLOAT_TYPES = frozenset({int(_T.F32), int(_T.F16), int(_T.BF16)})


def quantized(w) -> bool:
    """Is w held in a GGUF block format (not a plain tensor, not an F32 / F16 / BF16 GGUF tensor)?"""
    return getattr(w, "qtype", None) is not None and int(w.qtype) not in _FLOAT_TYPES


def dense(w) -> torch.Tensor:
    """w as a torch tensor: a GGUF tensor dequantized to float32, a plain tensor as it is."""
    return w if isinstance(w, torch.Tensor) else w.dequantize(torch.float32)


def weight_of(weights: Mapping, name: str):
    """weights[name], or None; a model without `lm_head.weight` ties its output head to the token embedding."""
    if name in weights:
        return weights[name]
    if name == "lm_head.weight":
        return weights.get("model.embed_tokens.weight")
    return None


def swap_layers(model: nn.Module, weights: Mapping, linear: Callable | None = None,
                embedding: Callable | None = None) -> list[str]:
    """In place, on a (meta-device) model: each nn.Embedding, then each nn.Linear, that has a weight in
    `weights` becomes what `embedding(name, weight)` / `linear(name, weight, bias)` returns (None: keep the
    layer). `bias` is the raw weights entry, or None when the layer has none. Returns the parameter names the
    new layers hold (weights and biases), which the loader must not assign."""
    taken = []
    for kind, make in ((nn.Embedding, embedding), (nn.Linear, linear)):  # embeddings first: a tied head may
        if make is None:                                                 # share what its embedding made
            continue
        for parent, attr, name, child in _children(model, kind):
            w = weight_of(weights, f"{name}.weight")
            if w is None:
                continue
            want = (child.out_features, child.in_features) if kind is nn.Linear else tuple(child.weight.shape)
            if tuple(w.shape) != want:
                raise KilnError(f"tensor {name}.weight has shape {tuple(w.shape)} but the model needs {want}; "
                                f"config and weights disagree")
            bias = weights.get(f"{name}.bias") if kind is nn.Linear and child.bias is not None else None
            new = make(name, w, bias) if kind is nn.Linear else make(name, w)
            if new is not None:
                setattr(parent, attr, new)
                taken += [f"{name}.weight"] + ([f"{name}.bias"] if bias is not None else [])
    return taken


def _children(model: nn.Module, kind: type):
    """(parent, attribute, dotted name, child) for every child module of type `kind`, listed up front so
    that the caller may replace them as it goes."""
    return [(parent, attr, f"{pname}.{attr}" if pname else attr, child)
            for pname, parent in model.named_modules() for attr, child in parent.named_children()
            if isinstance(child, kind)]


# ---------------------------------------------------------------- joined projections

class Joined(nn.Module):
    """Linear layers of one input x (..., K) -> a tuple of their outputs, computed by len(self.groups) matmuls."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        groups: list[list[nn.Module]] = []
        for layer in layers:
            if groups and joinable(groups[-1][-1], layer):
                groups[-1].append(layer)
            else:
                groups.append([layer])
        self.groups = nn.ModuleList(cat(g) for g in groups)
        self.splits = [[layer.out_features for layer in g] for g in groups]  # output widths per group
        self.lora: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}  # part -> LoRA A (r, K), B (N, r), scale
        self.stacks: dict[int, nn.Module] = {}  # part -> several adapters' LoRAs, one per batch row (add_stack)

    def add_lora(self, part: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Add scale * B @ A to original layer `part`'s weight, as a LoRA beside the joined matmul (an adapter
        over a GPU or compact CPU load, whose q/k/v and gate/up are joined)."""
        widths = [w for ws in self.splits for w in ws]
        if not 0 <= part < len(widths) or b.shape[0] != widths[part]:
            raise ValueError(f"LoRA of {tuple(b.shape[:1])} outputs for part {part} of widths {widths}")
        self.lora[part] = (a, b, scale)

    def add_stack(self, part: int, stack: nn.Module) -> None:
        """Put `stack(x)` (finetune/bank.LoRAStack: each batch row's own adapter, or None) beside part `part`."""
        self.stacks[part] = stack

    def _delta(self, x: torch.Tensor, part: int) -> torch.Tensor | None:
        d = None
        if part in self.lora:
            a, b, scale = self.lora[part]
            d = F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)) * scale
        if part in self.stacks:
            s = self.stacks[part](x)
            d = s if d is None else d if s is None else d + s
        return d

    def forward(self, x: torch.Tensor, act=None) -> tuple[torch.Tensor, ...]:
        """x (..., K) -> one output per original layer; `act`: x already quantized to int8, the buffer
        `int8_input(x)` gave and the kernel that produced x filled."""
        outs = []
        for y, widths in zip(self._outputs(x, act), self.splits):  # y (..., sum(widths))
            outs += y.split(widths, dim=-1) if len(widths) > 1 else [y]
        if self.lora or self.stacks:
            outs = [y if (d := self._delta(x, i)) is None else y + d for i, y in enumerate(outs)]
        return tuple(outs)

    def wide_forward(self, x: torch.Tensor, act=None) -> torch.Tensor:
        """The single concatenated output (every part joined: one group)."""
        y = self._outputs(x, act)[0]
        if self.lora or self.stacks:
            deltas = [self._delta(x, i) for i in range(len(self.splits[0]))]
            if any(d is not None for d in deltas):
                y = y + torch.cat([y.new_zeros(*y.shape[:-1], w) if d is None else d
                                   for d, w in zip(deltas, self.splits[0])], -1)
        return y

    def rope_forward(self, x: torch.Tensor, act, rope) -> torch.Tensor | None:
        """q (..., H·D) rotated, k and v stored into the caches, by the GEMVs themselves (a layer type's
        `rope_joined`: QuantLinear's, gemv_int8.RopeOut) for x already in int8 (`act`); None where they cannot
        (or a LoRA sits beside them), nothing computed."""
        joined = getattr(type(self.groups[0]), "rope_joined", None)
        if act is None or self.lora or self.stacks or joined is None:
            return None
        return joined(list(self.groups), x, act, rope)

    def native_parts(self) -> list | None:
        """Every group's `native_parts` in output order (ops.cpu.layer_plan), or None: a group without them, or
        a LoRA beside the joined matmul."""
        from kiln.ops.cpu import join_parts
        return None if self.lora or self.stacks else join_parts(self.groups)

    def int8_input(self, x: torch.Tensor):
        """An empty int8 buffer for x (gemv_int8.QuantAct) when every group's GEMV reads x in int8, for the
        kernel that produces x to fill (one quantization for all groups, inside a launch made anyway)."""
        if all(getattr(g, "takes_int8", None) is not None and g.takes_int8(x) for g in self.groups):
            return self.groups[0].int8_input(x)
        return None

    def _outputs(self, x: torch.Tensor, act) -> list[torch.Tensor]:
        if act is not None and len(self.groups) == 2 and hasattr(self.groups[0], "paired"):
            both = self.groups[0].paired(self.groups[1], x, act)  # two formats, one launch (QuantLinear.paired)
            if both is not None:
                return list(both)
        return [g(x) for g in self.groups] if act is None else [g(x, act=act) for g in self.groups]


def joinable(a: nn.Module, b: nn.Module) -> bool:
    """Do a and b stack into one layer? One type, input size and bias layout, and the type's own rule
    (`a.joins(b)` where it has one; nn.Linear: one dtype); types without a `cat` never join."""
    if type(a) is not type(b) or a.in_features != b.in_features or (a.bias is None) != (b.bias is None):
        return False
    if isinstance(a, nn.Linear):  # not while its weight is unread (meta): the loader assigns it by its own name
        return a.weight.dtype == b.weight.dtype and not a.weight.is_meta and not b.weight.is_meta
    return hasattr(type(a), "cat") and (not hasattr(a, "joins") or a.joins(b))


def cat(layers: list[nn.Module]) -> nn.Module:
    """One layer computing `layers` (joinable neighbours) side by side: their rows stacked."""
    if len(layers) == 1:
        return layers[0]
    if isinstance(layers[0], nn.Linear):
        return _cat_linear(layers)
    return type(layers[0]).cat(layers)


def _cat_linear(layers: list[nn.Linear]) -> nn.Linear:
    bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
    out = type(layers[0])(layers[0].in_features, sum(layer.out_features for layer in layers), bias=bias is not None,
                          device="meta")  # models.base.Linear stays itself
    out.weight = nn.Parameter(torch.cat([layer.weight for layer in layers]), requires_grad=False)
    if bias is not None:
        out.bias = nn.Parameter(bias, requires_grad=False)
    return out


def join_projections(model: nn.Module) -> nn.Module:
    """In place: every module with q_proj/k_proj/v_proj gets `qkv`, every one with gate_proj/up_proj gets
    `gate_up` (a Joined) where some of them join; the separate layers are dropped so the weights are held
    once (the walk lists only the modules holding parts: a list of every module would keep each dropped layer
    alive to the end, every joined weight held twice at the peak)."""
    holders = [mod for mod in model.modules() if any(hasattr(mod, parts[0]) for parts in JOINS.values())]
    for mod in holders:
        for name, parts in JOINS.items():
            layers = [getattr(mod, p, None) for p in parts]
            if not all(isinstance(layer, nn.Module) for layer in layers):
                continue
            joined = Joined(layers)
            if len(joined.groups) == len(parts):
                continue  # nothing joins: keep the layers as they are
            setattr(mod, name, joined)
            for p in parts:
                delattr(mod, p)
    return model
