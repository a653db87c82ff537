"""Gated MLP activations on a fused gate/up projection: act(gate) * up in one kernel.

Owns: `silu_mul` (SwiGLU) and `gelu_tanh_mul` (GeGLU, tanh approximation: Gemma), each with its `_ref` twin;
the input holds gate first, then up (one matmul). Not: the matmuls.

Shape alphabet: N rows (leading dims flattened), F intermediate size; gate_up is (..., 2F).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.ops import pdl
from kiln.ops.dispatch import jit, tl, use_triton
from kiln.ops.q8 import store_q8
from kiln.policy import DEFAULT, Policy

_BLOCK = 1024


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """(..., 2F) → (..., F): silu(gate) * up, rounding where the unfused model rounds."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """(..., 2F) → (..., F): gelu_tanh(gate) * up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def silu_mul(gate_up: torch.Tensor, q8: tuple | None = None, policy: Policy = DEFAULT) -> torch.Tensor:
    """With `q8` (a kiln.quant.gemv_int8.QuantAct's buffers, one row, F a multiple of 32) the same launch also
    stores the output quantized to int8 for the int8 GEMV (q8.store_q8)."""
    return _gated(gate_up, False, q8, policy)


def gelu_tanh_mul(gate_up: torch.Tensor, q8: tuple | None = None, policy: Policy = DEFAULT) -> torch.Tensor:
    return _gated(gate_up, True, q8, policy)


def _gated(gate_up: torch.Tensor, gelu: bool, q8: tuple | None, policy: Policy) -> torch.Tensor:
    if not use_triton(gate_up, policy):
        assert q8 is None, "q8 output needs the Triton kernel"
        return (gelu_tanh_mul_ref if gelu else silu_mul_ref)(gate_up)
    f = gate_up.shape[-1] // 2
    x = gate_up.reshape(-1, 2 * f)  # (N, 2F)
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((x.shape[0], f), dtype=gate_up.dtype, device=gate_up.device)  # (N, F)
    if q8 is not None:
        assert x.shape[0] == 1 and f % 32 == 0, "q8 output takes one row of a multiple of 32 values"
    xq, xd, xs = q8 if q8 is not None else (out, out, out)
    grid = (x.shape[0], (f + _BLOCK - 1) // _BLOCK)
    _gated_act_kernel[grid](x, out, xq, xd, xs, f, x.stride(0), GELU=gelu, Q8=q8 is not None, BLOCK=_BLOCK,
                            num_warps=4, **pdl.launch_kw(x, policy))
    return out.view(*gate_up.shape[:-1], f)


@jit
def _gated_act_kernel(x_ptr, out_ptr, xq_ptr, xd_ptr, xs_ptr, n_f, stride_x, GELU: tl.constexpr,
                      Q8: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.start(PDL)
    pdl.wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_f
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + n_f + cols, mask=mask, other=0.0)
    if GELU:
        # 0.5·g·(1 + tanh(z)) == g·sigmoid(2z): the same function without the cancellation near g ≪ 0.
        # 0.7978845608028654 = sqrt(2/pi) (a literal: kernels may not read non-constexpr globals).
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = g * tl.sigmoid(2.0 * z)
    else:
        a = g * tl.sigmoid(g)
    # torch rounds the activation to the input dtype before the multiply; so do we.
    y = a.to(u.dtype).to(tl.float32) * u.to(tl.float32)
    yc = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * n_f + cols, yc, mask=mask)
    if Q8:  # the int8 GEMV's input, quantized per 32 (BLOCK is a multiple of 32)
        store_q8(yc.to(tl.float32), tl.program_id(1) * (BLOCK // 32), n_f // 32, xq_ptr, xd_ptr, xs_ptr, BLOCK // 32)
