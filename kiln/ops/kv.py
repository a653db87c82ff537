"""Writing new keys and values into a static KV cache at device-side positions.

Owns: `write_kv` (one Triton launch for both caches: a torch index_copy_ per cache would be two kernels,
and kernels are what a small model's decode step pays for) and `write_kv_ref` (torch `index_copy_`).
Both are in place and graph-safe: positions are a device tensor, nothing waits on the host.
Not: the cache object and its bounds checks (cache.py), reading the cache (attention.py).

Shape alphabet: B batch, T new tokens, K kv heads, S cache slots (S_max), D head dim.
"""

from __future__ import annotations

import torch

from kiln.ops import jit, tl, triton, use_triton


def write_kv_ref(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 pos: torch.Tensor) -> None:
    """k_cache, v_cache (B, K, S, D) ← k, v (B, T, K, D) at slots pos (T,) int64. In place."""
    k_cache.index_copy_(2, pos, k.transpose(1, 2).to(k_cache.dtype))  # (B, K, T, D) into (B, K, S, D)
    v_cache.index_copy_(2, pos, v.transpose(1, 2).to(v_cache.dtype))


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             pos: torch.Tensor) -> None:
    """Same contract as `write_kv_ref`; one kernel for keys and values together."""
    if not use_triton(k):
        return write_kv_ref(k_cache, v_cache, k, v, pos)
    b, t, kh, d = k.shape
    assert k_cache.stride(-1) == v_cache.stride(-1) == 1 and k_cache.stride() == v_cache.stride()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    _write_kv_kernel[(b * t,)](
        k, v, k_cache, v_cache, pos, t, kh, *k.stride()[:3], *v.stride()[:3], *k_cache.stride()[:3],
        D=d, BLOCK_K=triton.next_power_of_2(kh), BLOCK_D=triton.next_power_of_2(d), num_warps=4)


@jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, pos_ptr, T, KH, skb, skt, skh, svb, svt, svh,
                     scb, sch, scs, D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    bt = tl.program_id(0)
    b = (bt // T).to(tl.int64)
    t = bt % T
    s = tl.load(pos_ptr + t)  # the cache slot of this token
    h = tl.arange(0, BLOCK_K)[:, None]  # (K, 1)
    d = tl.arange(0, BLOCK_D)[None, :]  # (1, D)
    mask = (h < KH) & (d < D)
    dst = b * scb + h * sch + s * scs + d  # (K, D) offsets into both caches (same strides)
    kx = tl.load(k_ptr + b * skb + t * skt + h * skh + d, mask=mask)
    tl.store(kc_ptr + dst, kx.to(kc_ptr.dtype.element_ty), mask=mask)
    vx = tl.load(v_ptr + b * svb + t * svt + h * svh + d, mask=mask)
    tl.store(vc_ptr + dst, vx.to(vc_ptr.dtype.element_ty), mask=mask)
