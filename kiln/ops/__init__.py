"""Fused kernels for the non-matmul parts of a decoder layer, each beside its plain-torch twin.

Owns: the public names (the dispatch rule every op shares, `use_triton`, and the optional Triton import live in
ops/dispatch.py, which imports no op). Each op decides its own kernel from its tensors and a `policy`
(kiln/policy.py): Triton, else kiln's native C kernels where they serve (ops/cpu.py, the CPU backend), else the
reference. Not: matmuls or quantized GEMVs (quant/), model code (models/), the cache layout (cache.py).

Every op `name(...)` has `name_ref(...)`: plain torch, obviously correct, the thing tests compare with.
Every Triton entry point is CUDA-graph capturable: no host sync, no `.item()`, shapes depend only on the
arguments' shapes, positions arrive as a device tensor.
"""

from __future__ import annotations

from kiln.ops.dispatch import HAVE_TRITON, use_triton
from kiln.ops.act import gelu_tanh_mul, gelu_tanh_mul_ref, silu_mul, silu_mul_ref
from kiln.ops.attention import (decode_attention, decode_attention_ref, rope_decode_attention,
                                rope_decode_attention_ref)
from kiln.ops.norm import rms_norm, rms_norm_ref
from kiln.ops.pick import argmax, argmax_ref
from kiln.ops.rope import rope_qk, rope_qk_ref, rope_qk_write_kv, rope_qk_write_kv_ref, write_kv_ref

__all__ = [
    "rms_norm", "rms_norm_ref", "rope_qk", "rope_qk_ref", "silu_mul", "silu_mul_ref", "gelu_tanh_mul",
    "gelu_tanh_mul_ref", "decode_attention", "decode_attention_ref", "write_kv_ref",
    "rope_qk_write_kv", "rope_qk_write_kv_ref", "rope_decode_attention", "rope_decode_attention_ref", "argmax",
    "argmax_ref", "use_triton", "HAVE_TRITON",
]
