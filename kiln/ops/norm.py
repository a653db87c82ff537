"""RMSNorm, optionally fused with the residual add before it, as one kernel per call.

Owns: `rms_norm` (Triton, one program per row; else the native C norm for one float32 CPU row, else the
reference) and `rms_norm_ref`, in Llama's convention `w * xn.to(dtype)` and Gemma's `(xn * (1 + w)).to(dtype)`
(`offset=1.0`), with the fused `h = x + residual; y = norm(h)`.
Not: per-head q/k norms (rope.py), the nn.Module wrappers (models/base.py).

Shape alphabet: N rows (every leading dim flattened), E normalized (hidden) dim.
"""

from __future__ import annotations

import torch

from kiln.ops import cpu, pdl
from kiln.ops.dispatch import jit, tl, triton, use_triton
from kiln.ops.q8 import store_q8
from kiln.policy import DEFAULT, Policy

_MAX_E = 32768  # one row per program, held in registers; no model comes near this


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                 residual: torch.Tensor | None = None):
    """x (..., E) → y (..., E) in x.dtype; with residual, (y, h) where h = x + residual, y = norm(h)."""
    if residual is None:
        return _norm_ref(x, weight, eps, offset)
    h = x + residual  # rounded to the model's dtype before it is normalized, as the unfused model does
    return _norm_ref(h, weight, eps, offset).to(x.dtype), h


def _norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    xf = x.float()
    xn = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:  # Gemma: multiply in float32, then cast
        return (xn * (offset + weight.float())).to(x.dtype)
    return (weight * xn.to(x.dtype)).to(x.dtype)  # Llama: cast, then multiply


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
             residual: torch.Tensor | None = None, q8: tuple | None = None, policy: Policy = DEFAULT):
    """Same contract as `rms_norm_ref`; one kernel launch (the residual add included). With `q8` — the
    (codes, scales, run sums) buffers of a kiln.quant.gemv_int8.QuantAct, one row of E values, E a multiple
    of 32 — the same launch also stores y quantized to int8 (q8.store_q8) for the int8 GEMV."""
    e = x.shape[-1]
    if not use_triton(x, policy) or e > _MAX_E:
        assert q8 is None, "q8 output needs the Triton kernel"
        if cpu.serves(x, policy) and weight.dtype == torch.float32 and (
                residual is None or residual.dtype == torch.float32):
            return cpu.rms_norm(x, weight, eps, offset, residual)  # one native call for one CPU row
        return rms_norm_ref(x, weight, eps, offset, residual)
    x2 = _rows(x)  # (N, E)
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)  # (N, E)
    if residual is not None:
        r2 = _rows(residual)  # (N, E)
        h = torch.empty(x2.shape, dtype=torch.result_type(x, residual), device=x.device)  # (N, E)
    else:
        r2 = h = x2  # unused by the kernel (HAS_RES is off)
    block = max(32, triton.next_power_of_2(e))
    if q8 is not None:
        assert x2.shape[0] == 1 and e % 32 == 0, "q8 output takes one row of a multiple of 32 values"
    xq, xd, xs = q8 if q8 is not None else (y, y, y)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight, y, h, xq, xd, xs, e, x2.stride(0), r2.stride(0), eps, float(offset),
        HAS_RES=residual is not None, HAS_OFFSET=bool(offset), Q8=q8 is not None, BLOCK_E=block, **pdl.launch_kw(x2, policy),
        num_warps=4 if block <= 2048 else 8 if block <= 8192 else 16)
    if residual is None:
        return y.view(x.shape)
    return y.view(x.shape), h.view(x.shape)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(..., E) → (N, E) with unit stride along E (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


@jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, xq_ptr, xd_ptr, xs_ptr, E, stride_x, stride_r, eps, offset,
                     HAS_RES: tl.constexpr, HAS_OFFSET: tl.constexpr, Q8: tl.constexpr, BLOCK_E: tl.constexpr,
                     PDL: tl.constexpr):
    pdl.start(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    mask = cols < E
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # a weight: no earlier kernel writes it
    pdl.wait(PDL)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # Round the sum to the residual stream's dtype and normalize *that*, exactly as the unfused model.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * E + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / E + eps)
    if HAS_OFFSET:
        y = xf * rstd * (offset + w)
    else:
        y = w * (xf * rstd).to(x.dtype).to(tl.float32)  # the cast before the weight is Llama's rounding
    yc = y.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * E + cols, yc, mask=mask)
    if Q8:  # the int8 GEMV's input: y as rounded to the model's dtype, quantized per 32
        store_q8(yc.to(tl.float32), 0, E // 32, xq_ptr, xd_ptr, xs_ptr, BLOCK_E // 32)
