"""Programmatic dependent launch (PDL): a decode step's next kernel starts while this one finishes.

Owns: the switch (`enabled`: CUDA on sm_90+, policy.pdl, not under the interpreter), the launch keywords
(`launch_kw`), and the in-kernel `start(PDL)` (let the next kernel launch) and `wait(PDL)` (block until the
previous kernel's writes are visible). Not: which kernels use it, the switch's source (kiln/policy.py).

Why: a batch-1 decode step is a few hundred short kernels in one CUDA graph, each paying a launch gap. With
PDL a kernel's programs start while their predecessor runs and do independent work first (addresses, the
GEMV's weight loads). The rule: `wait` on every path before reading what an earlier kernel wrote and before
writing anything; a kernel that ends without `wait` would let its successor overtake its predecessor.
"""

from __future__ import annotations

import functools

import torch

from kiln.ops.dispatch import HAVE_TRITON, interpreted, jit, tl
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
    return (x.is_cuda and policy.pdl and not interpreted()
            and _capable(x.device.index if x.device.index is not None else torch.cuda.current_device()))


def launch_kw(x: torch.Tensor, policy: Policy = DEFAULT) -> dict:
    """Keyword arguments for `kernel[grid](...)`: the PDL constexpr and, when on, Triton's launch flag."""
    return dict(PDL=True, launch_pdl=True) if enabled(x, policy) else dict(PDL=False)


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
