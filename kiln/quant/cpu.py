"""A compact CPU linear: weights repacked to int8 per output row, activations in bfloat16.

Owns: `Int8Linear` (the repack from a dense weight, and `forward` through torch's
`_weight_int8pack_mm`, which streams int8 weights ~4x faster per weight than an fp32 GEMV on two cores)
and `int8_linears(model)`, which swaps every nn.Linear of a loaded model.
Not: exactness. A per-row int8 grid is finer than the GGUF block grids it re-quantizes (the error is a
small fraction of the file's own quantization error), but it is a second rounding, and activations are
rounded to bfloat16; the exact fp32 path stays the default (kiln.load(..., quantized=False)).
"""

from __future__ import annotations

import torch
from torch import nn


class Int8Linear(nn.Module):
    """y = x @ W.T (+ bias) with W held as int8 rows and one bf16 scale per row."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        w = weight.detach().float()  # (N, K)
        # The kernel applies bf16 scales, so quantize on that grid; nudging up by 2^-8 before rounding
        # to bf16 keeps every |w| / scale <= 127 (bf16 rounds by at most 2^-9).
        scale = ((w.abs().amax(1) / 127).clamp_min(1e-12) * (1 + 2 ** -8)).to(torch.bfloat16)  # (N,)
        self.register_buffer("q", torch.round(w / scale.float()[:, None]).to(torch.int8))  # (N, K)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self.out_features, self.in_features = w.shape

    @property
    def nbytes(self) -> int:
        return self.q.numel() + 2 * self.scale.numel()

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return (self.q.float() * self.scale.float()[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (M, K)
        y = torch._weight_int8pack_mm(x2, self.q, self.scale).to(x.dtype)  # (M, N)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 rows, bf16 x"


def int8_linears(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of `model` (CPU, dense weights) by an Int8Linear, in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child.weight, child.bias))
    return model
