"""The dispatch rule every op shares, and the optional Triton import (the ops' lowest module: it imports no op).

Owns: `use_triton(x, policy)` (Triton when the tensor lives on CUDA, or on CPU when the policy's `triton_cpu` is
on — the tests, with `TRITON_INTERPRET=1`), `interpreted()`, `jit`, and `triton` / `tl` / `HAVE_TRITON` (a
torch-only install has none: the references serve, no kernel is launched).
Not: any kernel (the op modules beside this one), the public names (ops/__init__.py re-exports them).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

from kiln.policy import DEFAULT, Policy

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # torch-only installs (CPU wheels, macOS): the references serve, no kernel is launched
    triton, tl, HAVE_TRITON = None, SimpleNamespace(constexpr=None), False


def jit(fn):
    """`triton.jit` when Triton is installed; the bare function (never launched) otherwise."""
    return triton.jit(fn) if HAVE_TRITON else fn


def interpreted() -> bool:
    """Do Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1, the tests)? Read at each launch, as
    the tests set it after import. The interpreter lacks inline assembly, PDL and loops bounded at run time."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(x: torch.Tensor, policy: Policy = DEFAULT) -> bool:
    """Run the Triton kernel for this tensor? Not where autograd must go through it (training: x requires
    grad): the kernels have no backward, their torch references do."""
    if not HAVE_TRITON or (x.requires_grad and torch.is_grad_enabled()):
        return False
    return x.is_cuda or policy.triton_cpu
