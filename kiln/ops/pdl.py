"""Programmatic dependent launch (PDL): a decode step's next kernel starts while this one finishes.

Owns: the switch (`enabled(x, policy)`: CUDA tensors on sm_90+, where the policy allows it — KILN_PDL=0 turns
it off — and not under Triton's interpreter), the launch keyword (`launch_kw(x, policy)`), and the two
in-kernel calls: `start(PDL)` — let the next kernel launch now — and `wait(PDL)` — block until the previous
kernel has finished and its writes are visible.
Not: which kernels use it (each kernel's own file), the switch's source (kiln/policy.py).

Why: at batch 1 a small model's decode step is a chain of a few hundred short kernels in one CUDA graph,
and each pays a launch gap and a cold start (NOTES.md). With PDL a kernel's programs are scheduled while
its predecessor runs and do their independent work first — address arithmetic, and for the GEMV the
weight loads, which depend on no earlier kernel — then `wait`. The rule every PDL kernel keeps: call
`wait` on every path before reading anything an earlier kernel wrote and before writing anything (an
earlier kernel may still read it); a kernel that ends without `wait` would let its successor overtake
its predecessor.
"""

from __future__ import annotations

import functools
import os

import torch

from kiln.ops import HAVE_TRITON, jit, tl
from kiln.policy import DEFAULT, Policy

if HAVE_TRITON:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
else:  # pragma: no cover - torch-only installs never launch kernels
    gdc_launch_dependents = gdc_wait = None


@functools.lru_cache(maxsize=None)
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def enabled(x: torch.Tensor, policy: Policy = DEFAULT) -> bool:
    """Launch kernels on x's device with PDL? (policy.pdl off, from KILN_PDL=0: no, for A/B runs.)"""
    return (x.is_cuda and policy.pdl and os.environ.get("TRITON_INTERPRET") != "1"
            and _capable(x.device.index if x.device.index is not None else torch.cuda.current_device()))


def launch_kw(x: torch.Tensor, policy: Policy = DEFAULT) -> dict:
    """Keyword arguments for `kernel[grid](...)`: the PDL constexpr and, when on, Triton's launch flag."""
    on = enabled(x, policy)
    return dict(PDL=True, launch_pdl=True) if on else dict(PDL=False)


@jit
def start(PDL: tl.constexpr):
    """Let the next kernel's programs launch (a hint; they still `wait` for this kernel to finish)."""
    if PDL:
        gdc_launch_dependents()


@jit
def wait(PDL: tl.constexpr):
    """Block until the previous kernel has completed and its memory is visible."""
    if PDL:
        gdc_wait()
