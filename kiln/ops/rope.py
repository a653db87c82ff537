"""Rotary position embedding for q and k in one kernel, with the optional per-head q/k RMSNorm before it and the
step's KV-cache write in the same launch.

Owns: `rope_qk` (Triton: cos/sin from device positions in-kernel, so no table per step; graph-capturable) and
`rope_qk_ref` (plain torch: models/base.py's RoPE and Qwen3 / Gemma 3 q/k norms); `rope_qk_write_kv` (the key
programs store rotated keys and copy values straight into a static cache) and `rope_qk_write_kv_ref`
(`rope_qk_ref`, then `write_kv_ref`, the KV write's reference); the rotation's arithmetic as Triton helpers
(`cos_sin`, `head_rstd`, `rotate_halves`), which the decode kernel's fused form (attention.rope_decode_attention)
and the int8 q/k/v GEMV's epilogue (quant/gemv_int8.py) call too, so all round alike; `RopeOut`, what that
epilogue needs.
Convention: Hugging Face rotate-half — pairs (i, i + R/2) in the first R = rot_dim dims; dims past R are kept.
cos and sin are multiplied by attn_factor (longrope / YaRN). Positions are (T,) for every batch row or (B, T),
one row each (then `rows` (B,) may name each batch row's cache row).
Not: building inv_freq (models/base.py), the cache object (cache.py), a KV write without RoPE (cache.py).

Shape alphabet: B batch, T new tokens, H query heads, K kv heads, D head dim, R rotary dims (R <= D),
S cache positions, N cache rows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kiln.ops import pdl
from kiln.ops.dispatch import jit, tl, triton, use_triton
from kiln.ops.norm import rms_norm_ref
from kiln.policy import DEFAULT, Policy

_BLOCK_H = 4  # heads per program: q and k of one token spread over a handful of programs


class RopeOut(NamedTuple):
    """Where a one-token decode step's q/k/v projection puts its rows when it rotates them itself (the int8
    GEMV's epilogue, quant/gemv_int8.py `_rope_store`): the joined q | k | v output's q rows rotated into its
    output, its k rows rotated and its v rows as they are stored into the layer's caches at the step's position
    — what `rope_qk_write_kv` does after the GEMV, without its launch."""
    pos: torch.Tensor  # (1,) int64: the token's position (device: a graph replays it)
    inv_freq: torch.Tensor  # (D/2,) float32: every dim rotated, Hugging Face rotate-half pairs
    attn_factor: float
    k_cache: torch.Tensor  # (1, K, S, D) the layer's keys, in the model's dtype
    v_cache: torch.Tensor  # the same shape and strides: values
    n_q: int  # H·D: q rows, then K·D k rows, then v

    def fits(self, config, n: int) -> bool:
        """Can a GEMV launch of `config` (rows per program: block_n) over n joined rows store through it?
        Programs of whole rotation pairs of one head."""
        d = self.k_cache.shape[-1]
        return config.block_n % 2 == 0 and d % config.block_n == 0 and n % d == 0


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


def write_kv_ref(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 pos: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """k_cache, v_cache (B, K, S, D) <- k, v (B, T, K, D) at positions pos (T,) int64. In place.

    With per-row positions pos (B, T) and/or rows (B,): k_cache, v_cache are (N, K, S, D) and batch row b
    writes cache row rows[b] (default b) at positions pos[b]."""
    write_rows_ref(k_cache, k, pos, rows)
    write_rows_ref(v_cache, v, pos, rows)


def write_rows_ref(cache: torch.Tensor, x: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """One tensor of `write_kv_ref`: cache (B or N, K, S, W) <- x (B, T, K, W), converted to its dtype."""
    if pos.ndim == 1 and rows is None:
        cache.index_copy_(2, pos, x.transpose(1, 2).to(cache.dtype))  # (B, K, T, W) into (B, K, S, W)
        return
    b, t = x.shape[:2]
    r = (rows if rows is not None else torch.arange(b, device=x.device))[:, None]  # (B, 1)
    cache[r, :, pos.expand(b, t)] = x.to(cache.dtype)  # indexed (B, T, K, W)


def rope_qk_write_kv_ref(q, k, v, k_cache, v_cache, pos, inv_freq, attn_factor: float = 1.0, q_norm_w=None,
                         k_norm_w=None, eps: float = 1e-6, norm_offset: float = 0.0, rot_dim: int | None = None,
                         rows: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
    """`rope_qk_ref`, then `write_kv_ref(k_cache, v_cache, rotated k, v, slots, rows)` → rotated q (B, T, H, D);
    slots (pos's shape): where each token is written (None: at pos; a ring layer's: cache.Ring.slot(pos)).

    v (B, T, K, D); k_cache, v_cache (B, K, S, D), or (N, K, S, D) with rows (B,), written in place; the
    rotated keys are rounded to k's dtype before they are converted to the cache's, as the two ops do."""
    q, k = rope_qk_ref(q, k, pos, inv_freq, attn_factor, q_norm_w, k_norm_w, eps, norm_offset, rot_dim)
    write_kv_ref(k_cache, v_cache, k, v, pos if slots is None else slots, rows)
    return q


def rope_qk(q, k, pos, inv_freq, attn_factor: float = 1.0, q_norm_w=None, k_norm_w=None,
            eps: float = 1e-6, norm_offset: float = 0.0, rot_dim: int | None = None, policy: Policy = DEFAULT):
    """Same contract as `rope_qk_ref`; one kernel launch for q and k together. Returns new tensors."""
    if not use_triton(q, policy):
        return rope_qk_ref(q, k, pos, inv_freq, attn_factor, q_norm_w, k_norm_w, eps, norm_offset, rot_dim)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)  # (B, T, K, D)
    qo = _launch(q, k, pos, inv_freq, attn_factor, q_norm_w, k_norm_w, eps, norm_offset, rot_dim, ko, None, policy)
    return qo, ko


def rope_qk_write_kv(q, k, v, k_cache, v_cache, pos, inv_freq, attn_factor: float = 1.0, q_norm_w=None,
                     k_norm_w=None, eps: float = 1e-6, norm_offset: float = 0.0, rot_dim: int | None = None,
                     rows: torch.Tensor | None = None, slots: torch.Tensor | None = None,
                     policy: Policy = DEFAULT) -> torch.Tensor:
    """Same contract as `rope_qk_write_kv_ref`; one kernel launch for q, k, v and both caches."""
    if not use_triton(q, policy):
        return rope_qk_write_kv_ref(q, k, v, k_cache, v_cache, pos, inv_freq, attn_factor, q_norm_w, k_norm_w,
                                    eps, norm_offset, rot_dim, rows, slots)
    assert slots is None or (slots.shape == pos.shape and slots.stride() == pos.stride())
    assert k_cache.stride(-1) == v_cache.stride(-1) == 1 and k_cache.stride() == v_cache.stride()
    assert v.shape == k.shape, "one value per key"
    return _launch(q, k, pos, inv_freq, attn_factor, q_norm_w, k_norm_w, eps, norm_offset, rot_dim, None,
                   (_unit_last(v), k_cache, v_cache, rows, slots), policy)


def _launch(q, k, pos, inv_freq, attn_factor, q_norm_w, k_norm_w, eps, norm_offset, rot_dim, ko, kv, policy):
    """One `_rope_qk_kernel` launch → rotated q; the keys go to `ko` (B, T, K, D), or with kv = (v, k_cache,
    v_cache, rows, slots) into the caches, with the values beside them."""
    b, t, h, d = q.shape
    kh = k.shape[2]
    half = inv_freq.shape[0] if rot_dim is None else rot_dim // 2
    assert 2 * half <= d and inv_freq.shape[0] == half, "inv_freq must hold rot_dim / 2 frequencies"
    assert (q_norm_w is None) == (k_norm_w is None), "q and k norms come together"
    q, k = _unit_last(q), _unit_last(k)
    qo = torch.empty((b, t, h, d), dtype=q.dtype, device=q.device)  # (B, T, H, D)
    has_norm, write_kv = q_norm_w is not None, kv is not None
    v, kc, vc, rows, slots = kv if write_kv else (k, ko, ko, None, None)  # stand-ins without the cache write
    # Where keys go, as (row, position, head) strides: ko (B, T, K, D), or the cache (B or N, K, S, D).
    so = (kc.stride(0), kc.stride(2), kc.stride(1)) if write_kv else (t * kh * d, kh * d, d)
    nqb, nkb = triton.cdiv(h, _BLOCK_H), triton.cdiv(kh, _BLOCK_H)
    _rope_qk_kernel[(b * t, nqb + nkb)](
        q, k, v, qo, kc, vc, q_norm_w if has_norm else q, k_norm_w if has_norm else k, pos,
        rows if rows is not None else pos, slots if slots is not None else pos, inv_freq, t, h, kh, nqb,
        pos.stride(0) if pos.ndim == 2 else 0,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *so,
        float(attn_factor), float(eps), float(norm_offset),
        D=d, HALF=half, HAS_NORM=has_norm, HAS_OFFSET=bool(norm_offset), HAS_TAIL=2 * half < d,
        WRITE_KV=write_kv, HAS_ROWS=rows is not None, HAS_SLOTS=slots is not None, BLOCK_H=_BLOCK_H,
        BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_TAIL=triton.next_power_of_2(max(d - 2 * half, 1)), BLOCK_D=triton.next_power_of_2(d), num_warps=4,
        **pdl.launch_kw(q, policy))
    return qo


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@jit
def _rope_qk_kernel(q_ptr, k_ptr, v_ptr, qo_ptr, ko_ptr, vo_ptr, qw_ptr, kw_ptr, pos_ptr, rows_ptr, slots_ptr,
                    inv_ptr, T, H, KH, NQB, spb, sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh,
                    attn_factor, eps, offset,
                    D: tl.constexpr, HALF: tl.constexpr, HAS_NORM: tl.constexpr, HAS_OFFSET: tl.constexpr,
                    HAS_TAIL: tl.constexpr, WRITE_KV: tl.constexpr, HAS_ROWS: tl.constexpr,
                    HAS_SLOTS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                    BLOCK_TAIL: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    """Program (token bt, head block hb). Keys go to ko at (row, position, head) strides (sob, sot, soh):
    ko itself (row b, position t) or, with WRITE_KV, the key cache (row rows[b] or b, position pos, or the
    token's slot in `slots`), where the values of the same heads are copied too (vo: the value cache, same
    strides)."""
    pdl.start(PDL)
    pdl.wait(PDL)
    bt = tl.program_id(0)
    hb = tl.program_id(1)
    b = (bt // T).to(tl.int64)
    t = bt % T
    p = tl.load(pos_ptr + b * spb + t)  # spb = 0: positions shared by every row
    cos, sin = cos_sin(p, inv_ptr, attn_factor, HALF, BLOCK_HALF)
    if hb < NQB:  # this program's heads are query heads
        _rope_heads(q_ptr + b * sqb + t * sqt, qo_ptr + bt.to(tl.int64) * H * D, qw_ptr, cos, sin,
                    hb * BLOCK_H, H, sqh, D, eps, offset, D, HALF, HAS_NORM, HAS_OFFSET, HAS_TAIL,
                    BLOCK_H, BLOCK_HALF, BLOCK_TAIL)
    else:
        h0 = (hb - NQB) * BLOCK_H
        ob = b * sob + t * sot  # ko's row of this token
        if WRITE_KV:  # the cache row (a server's slot) and position of this token
            cb = b
            if HAS_ROWS:
                cb = tl.load(rows_ptr + b).to(tl.int64)
            at = p
            if HAS_SLOTS:
                at = tl.load(slots_ptr + b * spb + t)
            ob = cb * sob + at * sot
            _copy_heads(v_ptr + b * svb + t * svt, vo_ptr + ob, h0, KH, svh, soh, D, BLOCK_H, BLOCK_D)
        _rope_heads(k_ptr + b * skb + t * skt, ko_ptr + ob, kw_ptr, cos, sin,
                    h0, KH, skh, soh, eps, offset, D, HALF, HAS_NORM, HAS_OFFSET, HAS_TAIL,
                    BLOCK_H, BLOCK_HALF, BLOCK_TAIL)


@jit
def _rope_heads(x_ptr, o_ptr, w_ptr, cos, sin, h0, n_heads, stride_h, out_stride_h, eps, offset,
                D: tl.constexpr, HALF: tl.constexpr, HAS_NORM: tl.constexpr, HAS_OFFSET: tl.constexpr,
                HAS_TAIL: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                BLOCK_TAIL: tl.constexpr):
    """Heads h0..h0+BLOCK_H of one token: x at x_ptr + head * stride_h, out at o_ptr + head * out_stride_h.
    Results are rounded to x's dtype, then converted to the output's (a cache may hold another dtype)."""
    heads = h0 + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    m1 = (heads[:, None] < n_heads) & (i[None, :] < HALF)  # (BLOCK_H, R/2)
    xp = x_ptr + heads[:, None] * stride_h
    op = o_ptr + heads[:, None] * out_stride_h
    x1 = tl.load(xp + i[None, :], mask=m1, other=0.0)  # first halves of the rotated dims
    x2 = tl.load(xp + HALF + i[None, :], mask=m1, other=0.0)  # second halves
    if HAS_TAIL:
        j = 2 * HALF + tl.arange(0, BLOCK_TAIL)
        mt = (heads[:, None] < n_heads) & (j[None, :] < D)  # (BLOCK_H, D - R)
        xt = tl.load(xp + j[None, :], mask=mt, other=0.0)
    ss = tl.zeros([BLOCK_H], dtype=tl.float32)
    if HAS_TAIL and HAS_NORM:  # the kept dims count in the head's norm
        ss = tl.sum(xt.to(tl.float32) * xt.to(tl.float32), axis=1)
    rstd = head_rstd(x1, x2, ss, eps, D, HAS_NORM)
    o1, o2 = rotate_halves(x1, x2, rstd, w_ptr, cos, sin, offset, HALF, HAS_NORM, HAS_OFFSET, BLOCK_HALF)
    odt = o_ptr.dtype.element_ty
    tl.store(op + i[None, :], o1.to(odt), mask=m1)
    tl.store(op + HALF + i[None, :], o2.to(odt), mask=m1)
    if HAS_TAIL:
        if HAS_NORM:
            xt = _scale(xt, rstd, tl.load(w_ptr + j, mask=j < D, other=0.0), offset, HAS_OFFSET)
        tl.store(op + j[None, :], xt.to(odt), mask=mt)


@jit
def cos_sin(p, inv_ptr, attn_factor, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """cos and sin (R/2,) of position p: the float32 product p * inv_freq, as the reference forms it, times
    attn_factor."""
    i = tl.arange(0, BLOCK_HALF)
    f = p.to(tl.float32) * tl.load(inv_ptr + i, mask=i < HALF, other=0.0)  # (R/2,)
    return tl.cos(f) * attn_factor, tl.sin(f) * attn_factor


@jit
def head_rstd(x1, x2, ss, eps, D: tl.constexpr, HAS_NORM: tl.constexpr):
    """Each row's 1 / RMS over all D dims (ss: the sum of squares of the dims past the halves), (rows, 1);
    ones without the norm."""
    if HAS_NORM:
        t = tl.sum(x1.to(tl.float32) * x1.to(tl.float32), axis=1)
        t += tl.sum(x2.to(tl.float32) * x2.to(tl.float32), axis=1)
        r = tl.rsqrt((t + ss) / D + eps)[:, None]
    else:
        r = (ss + 1.0)[:, None]
    return r


@jit
def rotate_halves(x1, x2, rstd, w_ptr, cos, sin, offset, HALF: tl.constexpr, HAS_NORM: tl.constexpr,
                  HAS_OFFSET: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rows of a head's rotated dims as halves x1, x2 (rows, R/2) in x's dtype -> the rotated halves, rounded to
    x's dtype: per-head RMSNorm first (rstd from `head_rstd`, weights w at w_ptr), rounded to the dtype before
    rotating, as the model does. rope's kernel stores them; decode attention's fused form keeps them."""
    if HAS_NORM:
        i = tl.arange(0, BLOCK_HALF)
        x1 = _scale(x1, rstd, tl.load(w_ptr + i, mask=i < HALF, other=0.0), offset, HAS_OFFSET)
        x2 = _scale(x2, rstd, tl.load(w_ptr + HALF + i, mask=i < HALF, other=0.0), offset, HAS_OFFSET)
    a = x1.to(tl.float32)
    c = x2.to(tl.float32)
    xdt = x1.dtype
    return (a * cos[None, :] - c * sin[None, :]).to(xdt), (c * cos[None, :] + a * sin[None, :]).to(xdt)


@jit
def _copy_heads(x_ptr, o_ptr, h0, n_heads, stride_h, out_stride_h, D: tl.constexpr, BLOCK_H: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """Heads h0..h0+BLOCK_H of one token copied (converted to the output's dtype), as write_kv_ref writes
    values."""
    heads = (h0 + tl.arange(0, BLOCK_H))[:, None]  # (BLOCK_H, 1)
    d = tl.arange(0, BLOCK_D)[None, :]  # (1, D)
    mask = (heads < n_heads) & (d < D)
    x = tl.load(x_ptr + heads * stride_h + d, mask=mask)
    tl.store(o_ptr + heads * out_stride_h + d, x.to(o_ptr.dtype.element_ty), mask=mask)


@jit
def _scale(x, rstd, w, offset, HAS_OFFSET: tl.constexpr):
    """x (BLOCK_H, n) normalized by rstd and weighted by w (n,), in norm.py's two conventions."""
    xn = x.to(tl.float32) * rstd
    if HAS_OFFSET:
        y = xn * (offset + w.to(tl.float32)[None, :])
    else:
        y = w.to(tl.float32)[None, :] * xn.to(x.dtype).to(tl.float32)
    return y.to(x.dtype)
