"""Rotary position embedding for q and k in one kernel, with the optional per-head q/k RMSNorm before it.

Owns: `rope_qk` (Triton: cos/sin computed in-kernel from device positions, so no table is built per step
and the call is CUDA-graph capturable) and `rope_qk_ref` (plain torch, the arithmetic of
models/base.py's RoPE + apply_rope, and of RMSNorm for Qwen3 / Gemma 3 q_norm and k_norm).
Convention: Hugging Face rotate-half — pairs (i, i + R/2) inside the first R = rot_dim dims; dims past R
are kept (partial rotary). cos and sin are multiplied by attn_factor (longrope / YaRN).
Positions are (T,), shared by every batch row, or (B, T), one row each (a server's batched step).
Not: building inv_freq (models/base.py's schedules; fold GGUF freq_factors in as inv_freq / factors),
writing the cache (kv.py).

Shape alphabet: B batch, T new tokens, H query heads, K kv heads, D head dim, R rotary dims (R <= D).
"""

from __future__ import annotations

import torch

from kiln.ops import jit, tl, triton, use_triton
from kiln.ops.norm import rms_norm_ref

_BLOCK_H = 4  # heads per program: q and k of one token spread over a handful of programs


def rope_qk_ref(q, k, pos, inv_freq, attn_factor: float = 1.0, q_norm_w=None, k_norm_w=None,
                eps: float = 1e-6, norm_offset: float = 0.0, rot_dim: int | None = None):
    """q (B, T, H, D), k (B, T, K, D), pos (T,) or (B, T) int64, inv_freq (R/2,) float32 → rotated (q, k)."""
    if q_norm_w is not None:
        q = rms_norm_ref(q, q_norm_w, eps, norm_offset)
    if k_norm_w is not None:
        k = rms_norm_ref(k, k_norm_w, eps, norm_offset)
    freqs = pos.float()[..., None] * inv_freq  # (T, R/2) or (B, T, R/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, R) or (B, T, R)
    cos = (emb.cos() * attn_factor)[..., None, :]  # (T, 1, R) or (B, T, 1, R): broadcasts over (B, T, heads, R)
    sin = (emb.sin() * attn_factor)[..., None, :]
    return _rotate_ref(q, cos, sin), _rotate_ref(k, cos, sin)


def _rotate_ref(x, cos, sin):
    rot = cos.shape[-1]
    xr, keep = x[..., :rot], x[..., rot:]
    x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
    out = (xr.float() * cos + torch.cat([-x2, x1], dim=-1).float() * sin).to(x.dtype)
    return torch.cat([out, keep], dim=-1)


def rope_qk(q, k, pos, inv_freq, attn_factor: float = 1.0, q_norm_w=None, k_norm_w=None,
            eps: float = 1e-6, norm_offset: float = 0.0, rot_dim: int | None = None):
    """Same contract as `rope_qk_ref`; one kernel launch for q and k together. Returns new tensors."""
    if not use_triton(q):
        return rope_qk_ref(q, k, pos, inv_freq, attn_factor, q_norm_w, k_norm_w, eps, norm_offset, rot_dim)
    b, t, h, d = q.shape
    kh = k.shape[2]
    half = inv_freq.shape[0] if rot_dim is None else rot_dim // 2
    assert 2 * half <= d and inv_freq.shape[0] == half, "inv_freq must hold rot_dim / 2 frequencies"
    assert (q_norm_w is None) == (k_norm_w is None), "q and k norms come together"
    q, k = _unit_last(q), _unit_last(k)
    qo = torch.empty((b, t, h, d), dtype=q.dtype, device=q.device)  # (B, T, H, D)
    ko = torch.empty((b, t, kh, d), dtype=k.dtype, device=k.device)  # (B, T, K, D)
    has_norm = q_norm_w is not None
    nqb, nkb = triton.cdiv(h, _BLOCK_H), triton.cdiv(kh, _BLOCK_H)
    _rope_qk_kernel[(b * t, nqb + nkb)](
        q, k, qo, ko, q_norm_w if has_norm else q, k_norm_w if has_norm else k, pos, inv_freq,
        t, h, kh, nqb, pos.stride(0) if pos.ndim == 2 else 0, *q.stride()[:3], *k.stride()[:3],
        float(attn_factor), float(eps), float(norm_offset),
        D=d, HALF=half, HAS_NORM=has_norm, HAS_OFFSET=bool(norm_offset), HAS_TAIL=2 * half < d,
        BLOCK_H=_BLOCK_H, BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_TAIL=triton.next_power_of_2(max(d - 2 * half, 1)), num_warps=4)
    return qo, ko


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@jit
def _rope_qk_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, qw_ptr, kw_ptr, pos_ptr, inv_ptr,
                    T, H, KH, NQB, spb, sqb, sqt, sqh, skb, skt, skh, attn_factor, eps, offset,
                    D: tl.constexpr, HALF: tl.constexpr, HAS_NORM: tl.constexpr, HAS_OFFSET: tl.constexpr,
                    HAS_TAIL: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                    BLOCK_TAIL: tl.constexpr):
    bt = tl.program_id(0)
    hb = tl.program_id(1)
    b = (bt // T).to(tl.int64)
    t = bt % T
    # cos/sin from the absolute position: the float32 product pos * inv_freq, as the reference forms it.
    i = tl.arange(0, BLOCK_HALF)
    p = tl.load(pos_ptr + b * spb + t).to(tl.float32)  # spb = 0: positions shared by every row
    f = p * tl.load(inv_ptr + i, mask=i < HALF, other=0.0)  # (R/2,)
    cos = tl.cos(f) * attn_factor
    sin = tl.sin(f) * attn_factor
    if hb < NQB:  # this program's heads are query heads
        _rope_heads(q_ptr + b * sqb + t * sqt, qo_ptr + bt.to(tl.int64) * H * D, qw_ptr, cos, sin,
                    hb * BLOCK_H, H, sqh, eps, offset, D, HALF, HAS_NORM, HAS_OFFSET, HAS_TAIL,
                    BLOCK_H, BLOCK_HALF, BLOCK_TAIL)
    else:
        _rope_heads(k_ptr + b * skb + t * skt, ko_ptr + bt.to(tl.int64) * KH * D, kw_ptr, cos, sin,
                    (hb - NQB) * BLOCK_H, KH, skh, eps, offset, D, HALF, HAS_NORM, HAS_OFFSET, HAS_TAIL,
                    BLOCK_H, BLOCK_HALF, BLOCK_TAIL)


@jit
def _rope_heads(x_ptr, o_ptr, w_ptr, cos, sin, h0, n_heads, stride_h, eps, offset,
                D: tl.constexpr, HALF: tl.constexpr, HAS_NORM: tl.constexpr, HAS_OFFSET: tl.constexpr,
                HAS_TAIL: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                BLOCK_TAIL: tl.constexpr):
    """Heads h0..h0+BLOCK_H of one token: x at x_ptr + head * stride_h, output rows contiguous (D)."""
    heads = h0 + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    m1 = (heads[:, None] < n_heads) & (i[None, :] < HALF)  # (BLOCK_H, R/2)
    xp = x_ptr + heads[:, None] * stride_h
    op = o_ptr + heads[:, None] * D
    x1 = tl.load(xp + i[None, :], mask=m1, other=0.0)  # first halves of the rotated dims
    x2 = tl.load(xp + HALF + i[None, :], mask=m1, other=0.0)  # second halves
    if HAS_TAIL:
        j = 2 * HALF + tl.arange(0, BLOCK_TAIL)
        mt = (heads[:, None] < n_heads) & (j[None, :] < D)  # (BLOCK_H, D - R)
        xt = tl.load(xp + j[None, :], mask=mt, other=0.0)
    if HAS_NORM:  # per-head RMSNorm over all D dims, rounded to the dtype before rotating (as the model)
        ss = tl.sum(x1.to(tl.float32) * x1.to(tl.float32), axis=1)
        ss += tl.sum(x2.to(tl.float32) * x2.to(tl.float32), axis=1)
        if HAS_TAIL:
            ss += tl.sum(xt.to(tl.float32) * xt.to(tl.float32), axis=1)
        rstd = tl.rsqrt(ss / D + eps)[:, None]  # (BLOCK_H, 1)
        x1 = _scale(x1, rstd, tl.load(w_ptr + i, mask=i < HALF, other=0.0), offset, HAS_OFFSET)
        x2 = _scale(x2, rstd, tl.load(w_ptr + HALF + i, mask=i < HALF, other=0.0), offset, HAS_OFFSET)
        if HAS_TAIL:
            xt = _scale(xt, rstd, tl.load(w_ptr + j, mask=j < D, other=0.0), offset, HAS_OFFSET)
    a = x1.to(tl.float32)
    c = x2.to(tl.float32)
    tl.store(op + i[None, :], (a * cos[None, :] - c * sin[None, :]).to(o_ptr.dtype.element_ty), mask=m1)
    tl.store(op + HALF + i[None, :], (c * cos[None, :] + a * sin[None, :]).to(o_ptr.dtype.element_ty), mask=m1)
    if HAS_TAIL:
        tl.store(op + j[None, :], xt.to(o_ptr.dtype.element_ty), mask=mt)


@jit
def _scale(x, rstd, w, offset, HAS_OFFSET: tl.constexpr):
    """x (BLOCK_H, n) normalized by rstd and weighted by w (n,), in norm.py's two conventions."""
    xn = x.to(tl.float32) * rstd
    if HAS_OFFSET:
        y = xn * (offset + w.to(tl.float32)[None, :])
    else:
        y = w.to(tl.float32)[None, :] * xn.to(x.dtype).to(tl.float32)
    return y.to(x.dtype)
