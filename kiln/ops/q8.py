"""Activations quantized to int8 per 32 values, stored by the kernel that produces them.

Owns: `store_q8`, which quantizes a run of values into the layout the int8 GEMV reads (gemv_int8.QuantAct): per
32 values dx = max|v| / 127 and q = round(v / dx) half away from zero (llama.cpp's q8_1); codes four to an int32
(word 4r + j of 16-run r holds values 16r + j + 4t in byte t: a packed weight word's byte lanes), scales and
sum(q) per 16-run. RMSNorm and the gated activations call it, so a decode step quantizes without a launch.
Not: the GEMV, gemv_int8.quantize_act (which calls this too).
"""

from __future__ import annotations

from kiln.ops.dispatch import jit, tl


@jit
def store_q8(v, blk0, nblk, xq_ptr, xd_ptr, xs_ptr, NB: tl.constexpr):
    """v (NB * 32,) float32: the values of 32-blocks blk0 .. blk0 + NB - 1 in order; blocks >= nblk are not
    stored (their values must be finite; masked loads give 0)."""
    x = tl.reshape(v, (NB, 2, 4, 4))                                   # [block, run, t, j]: value 32b + 16r + 4t + j
    amax = tl.max(tl.max(tl.max(tl.abs(x), axis=3), axis=2), axis=1)   # (NB,)
    inv = tl.where(amax > 0.0, 127.0 / tl.where(amax > 0.0, amax, 1.0), 0.0)
    xs = x * inv[:, None, None, None]
    q = (xs + tl.where(xs >= 0.0, 0.5, -0.5)).to(tl.int32)            # round half away from zero
    t = tl.arange(0, 4)
    words = tl.sum((q & 0xFF) << (8 * t)[None, None, :, None], axis=2)  # (NB, 2, 4): byte t of word j
    blk = blk0 + tl.arange(0, NB)
    ok = blk < nblk
    run = tl.arange(0, 2)
    j = tl.arange(0, 4)
    tl.store(xq_ptr + (blk[:, None, None] * 2 + run[None, :, None]) * 4 + j[None, None, :], words,
             mask=ok[:, None, None])
    tl.store(xd_ptr + blk, amax / 127.0, mask=ok)
    tl.store(xs_ptr + blk[:, None] * 2 + run[None, :], tl.sum(tl.sum(q, axis=3), axis=2), mask=ok[:, None])
