"""Writing new keys and values into a static KV cache at device-side positions.

Owns: `write_kv` (one Triton launch for both caches: a torch index_copy_ per cache would be two kernels,
and kernels are what a small model's decode step pays for) and `write_kv_ref` (torch `index_copy_`).
Both are in place and graph-safe: positions are a device tensor, nothing waits on the host.
For a server's batched step over a slot cache, positions may be per row (B, T) and `rows` (B,) names the
cache row (slot) each batch row writes to. `write_kv_ref` is also half of the reference for the models'
decode step, which does this write inside the RoPE kernel (rope.py's `rope_qk_write_kv`, same semantics).
Not: the cache object and its bounds checks (cache.py), reading the cache (attention.py), the KV write
fused with RoPE (rope.py).

Shape alphabet: B batch, T new tokens, K kv heads, S cache positions (S_max), D head dim, N cache rows.
"""

from __future__ import annotations

import torch

from kiln.ops import jit, pdl, tl, triton, use_triton


def write_kv_ref(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 pos: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """k_cache, v_cache (B, K, S, D) ← k, v (B, T, K, D) at positions pos (T,) int64. In place.

    With per-row positions pos (B, T) and/or rows (B,): k_cache, v_cache are (N, K, S, D) and batch row b
    writes cache row rows[b] (default b) at positions pos[b]."""
    if pos.ndim == 1 and rows is None:
        k_cache.index_copy_(2, pos, k.transpose(1, 2).to(k_cache.dtype))  # (B, K, T, D) into (B, K, S, D)
        v_cache.index_copy_(2, pos, v.transpose(1, 2).to(v_cache.dtype))
        return
    b, t = k.shape[:2]
    r = (rows if rows is not None else torch.arange(b, device=k.device))[:, None]  # (B, 1)
    p = pos.expand(b, t)  # (B, T)
    k_cache[r, :, p] = k.to(k_cache.dtype)  # indexed (B, T, K, D)
    v_cache[r, :, p] = v.to(v_cache.dtype)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             pos: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """Same contract as `write_kv_ref`; one kernel for keys and values together."""
    if not use_triton(k):
        return write_kv_ref(k_cache, v_cache, k, v, pos, rows)
    b, t, kh, d = k.shape
    assert k_cache.stride(-1) == v_cache.stride(-1) == 1 and k_cache.stride() == v_cache.stride()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    _write_kv_kernel[(b * t,)](
        k, v, k_cache, v_cache, pos, rows if rows is not None else pos, pos.stride(0) if pos.ndim == 2 else 0,
        t, kh, *k.stride()[:3], *v.stride()[:3], *k_cache.stride()[:3], D=d, HAS_ROWS=rows is not None, BLOCK_K=triton.next_power_of_2(kh), BLOCK_D=triton.next_power_of_2(d), num_warps=4,
        **pdl.launch_kw(k))


@jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, pos_ptr, rows_ptr, spb, T, KH, skb, skt, skh, svb, svt, svh,
                     scb, sch, scs, D: tl.constexpr, HAS_ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    pdl.start(PDL)
    pdl.wait(PDL)
    bt = tl.program_id(0)
    b = (bt // T).to(tl.int64)
    t = bt % T
    s = tl.load(pos_ptr + b * spb + t)  # the cache position of this token (spb = 0: shared by every row)
    cb = b
    if HAS_ROWS:
        cb = tl.load(rows_ptr + b).to(tl.int64)  # the cache row (slot) of this batch row
    h = tl.arange(0, BLOCK_K)[:, None]  # (K, 1)
    d = tl.arange(0, BLOCK_D)[None, :]  # (1, D)
    mask = (h < KH) & (d < D)
    dst = cb * scb + h * sch + s * scs + d  # (K, D) offsets into both caches (same strides)
    kx = tl.load(k_ptr + b * skb + t * skt + h * skh + d, mask=mask)
    tl.store(kc_ptr + dst, kx.to(kc_ptr.dtype.element_ty), mask=mask)
    vx = tl.load(v_ptr + b * svb + t * svt + h * svh + d, mask=mask)
    tl.store(vc_ptr + dst, vx.to(vc_ptr.dtype.element_ty), mask=mask)
