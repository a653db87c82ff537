"""Greedy picks: the argmax of each row of logits, in two short launches.

Owns: `argmax` (Triton on a GPU: every row cut into parts, one program a part finds its part's maximum and where it
first occurs, then one program a row picks the part with the largest, the first such) and `argmax_ref` (torch's).
Both return the first index of the maximum, as torch does. Not: sampling (kiln/sample.py).

Why: a decode step's greedy token is one argmax over the vocabulary (128k-152k logits), after every step; spread
over ~40 programs it is two short launches.

Shape alphabet: B rows, V vocabulary, P parts of a row.
"""

from __future__ import annotations

import torch

from kiln.ops import pdl
from kiln.ops.dispatch import jit, tl, triton, use_triton
from kiln.policy import DEFAULT, Policy

_PART = 4096  # logits a program reads


def argmax_ref(logits: torch.Tensor) -> torch.Tensor:
    """logits (..., V) -> (...,) int64: the first index of each row's maximum."""
    return logits.argmax(-1)


def argmax(logits: torch.Tensor, policy: Policy = DEFAULT) -> torch.Tensor:
    """Same contract as `argmax_ref` (rows with a NaN: some index, not necessarily torch's)."""
    v = logits.shape[-1]
    if not use_triton(logits, policy) or v < 2 * _PART or logits.numel() == 0:
        return argmax_ref(logits)
    x2 = logits.reshape(-1, v)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    b, parts = x2.shape[0], triton.cdiv(v, _PART)
    vals = torch.empty((b, parts), dtype=torch.float32, device=x2.device)  # (B, P)
    idx = torch.empty((b, parts), dtype=torch.int64, device=x2.device)  # (B, P)
    out = torch.empty(b, dtype=torch.int64, device=x2.device)  # (B,)
    kw = pdl.launch_kw(x2, policy)
    _part_kernel[(b, parts)](x2, vals, idx, v, x2.stride(0), parts, BLOCK=_PART, num_warps=8, **kw)
    _pick_kernel[(b,)](vals, idx, out, parts, BLOCK_P=triton.next_power_of_2(parts), num_warps=1, **kw)
    return out.view(logits.shape[:-1])


@jit
def _part_kernel(x_ptr, val_ptr, idx_ptr, V, stride, P, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.start(PDL)
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    cols = part * BLOCK + tl.arange(0, BLOCK)
    pdl.wait(PDL)
    x = tl.load(x_ptr + row * stride + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    best, at = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(val_ptr + row * P + part, best)
    tl.store(idx_ptr + row * P + part, (part * BLOCK + at).to(tl.int64))


@jit
def _pick_kernel(val_ptr, idx_ptr, out_ptr, P, BLOCK_P: tl.constexpr, PDL: tl.constexpr):
    pdl.start(PDL)
    row = tl.program_id(0).to(tl.int64)
    p = tl.arange(0, BLOCK_P)
    pdl.wait(PDL)
    v = tl.load(val_ptr + row * P + p, mask=p < P, other=float("-inf"))
    _, j = tl.max(v, axis=0, return_indices=True, return_indices_tie_break_left=True)  # the first part: lowest index
    tl.store(out_ptr + row, tl.load(idx_ptr + row * P + j))
