"""Fused kernels for the non-matmul parts of a decoder layer, each beside its plain-torch twin.

Owns: the dispatch rule shared by every op (`use_triton`: Triton when the tensor lives on CUDA, or on CPU
when the policy's `triton_cpu` is on — the tests, with `TRITON_INTERPRET=1`), the optional Triton import,
and the public names. Each op decides its own kernel from its tensors and a `policy` (kiln/policy.py):
Triton, else kiln's native C kernels where they serve (ops/cpu.py, the CPU backend), else the reference.
Not: matmuls or quantized GEMVs (quant/), model code (models/), the cache layout (cache.py).

Every op `name(...)` has `name_ref(...)`: plain torch, obviously correct, the thing tests compare with.
Every Triton entry point is CUDA-graph capturable: no host sync, no `.item()`, shapes depend only on the
arguments' shapes, positions arrive as a device tensor.
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


# The helpers above must exist before the submodules import them (they do `from kiln.ops import …`).
from kiln.ops.act import gelu_tanh_mul, gelu_tanh_mul_ref, silu_mul, silu_mul_ref  # noqa: E402
from kiln.ops.attention import decode_attention, decode_attention_ref  # noqa: E402
from kiln.ops.norm import rms_norm, rms_norm_ref  # noqa: E402
from kiln.ops.rope import rope_qk, rope_qk_ref, rope_qk_write_kv, rope_qk_write_kv_ref, write_kv_ref  # noqa: E402

__all__ = [
    "rms_norm", "rms_norm_ref", "rope_qk", "rope_qk_ref", "silu_mul", "silu_mul_ref", "gelu_tanh_mul",
    "gelu_tanh_mul_ref", "decode_attention", "decode_attention_ref", "write_kv_ref",
    "rope_qk_write_kv", "rope_qk_write_kv_ref", "use_triton", "HAVE_TRITON",
]
