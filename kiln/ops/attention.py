"""Decode attention: a few new query tokens against a static KV cache, as split-KV flash-decoding.

Owns: `decode_attention` (a split kernel and a log-sum-exp merge; one launch when one split serves),
`decode_attention_ref` (masked float32 softmax attention in torch), and `rope_decode_attention` (with its `_ref`):
the same kernels with RoPE, the q/k norms and the new token's KV write done in the split kernel (`rope_fuses`).
Causal + optional sliding window (query t sees keys j with j <= pos[t] and pos[t] - j < window) and optional
logit soft-capping.
Positions are (T,), shared by every batch row, or (B, T) per row with `rows` (B,) naming the cache row
(a server's slot) each batch row reads: a batched decode step over sequences at different depths.
Keys and values may each be stored in another float type than q's (fp8: converted tile by tile), or as
q8_0 / q4_0 (codes and a float16 scale per 32 values along D: `k_scale`, `v_scale`, kv_types' layouts; int8
codes are q8_0's, uint8 q4_0's) and are then dequantized tile by tile in registers, so a quantized cache is
read at its own size; the reference dequantizes the whole cache first. Values stored in a rotated basis
(kv_types.Basis) are rotated back in the kernel: `out_rot`, the output's matrix, applied before it is stored.
Not: prefill over long prompts (T is small here: 1..16 draft/verify tokens), writing or encoding the cache
(rope.py, kv_write.py, cache.py; the fused form's one row a step excepted), rotating the query into the keys'
basis (kv_write.py), RoPE's arithmetic (rope.py's helpers, which the fused form calls), paging.

How the split kernel works, and why:
- One program per (batch, kv head, split). It handles the G = H / K query heads that share the kv head,
  for all T tokens at once — G·T rows of one small matrix — so each K/V tile is read from memory once.
- The grid is fixed by S_max (graph capture needs that) but positions live on the device, so each
  program reads `pos` and derives the visible key range [lo, hi) itself: hi = max(pos) + 1, lo = 0 or
  min(pos) - window + 1. That range — not the whole cache — is cut into NS equal runs of tiles, one per
  split. A short context still spreads over many programs; a program whose run starts past `hi` skips
  every tile and only stores "-inf: nothing here", which the merge ignores. `Launch.interleave` deals the
  tiles out instead (split s takes tiles s, s + NS, ...), so that at any moment the programs read one
  region of the cache, not NS regions far apart (plain reads of few programs: 2.5 TB/s that way against 1.2
  in runs, bench/results/2026-12-06-h100-g/).
- A program walks only its own share of tiles: on a GPU the loop's trip count is the split's tile count,
  read at run time, so a short context in a long cache costs a short walk (a loop of the grid's worst-case
  length with masked tiles cost the 8B ~0.7 ms a token at depth 1 of a 16k cache: every masked tile still
  waits on its loads and does its dots). Triton pipelines the loads of either loop. The interpreter used by
  the CPU tests cannot run a loop bounded at run time: there the bound is the worst case and tiles past the
  split's keys are masked off (`Launch.runtime_loop` False on a GPU times the same form).
- Scores live in the log2 domain (exp2 is the fast instruction); the merge weights every split's
  partial output by 2^(lse_split - lse_max).
- A tile's keys lie across the program's warps, so a per-key reduction crosses them through shared memory and
  barriers. Only the row max needs one every tile; the weights' row sum is kept per key column (M, N) and summed
  once after the loop. With positions as int32 too (32-bit key indices, masks and addresses), a tile at head dim
  128 compiles (sm_90) to 263 instructions and 6 barriers against 330 and 9. H100: the 0.6B's split kernel alone
  27.9 µs a layer at 16384 keys against 29.5 without the late sum, level in the model (2026-12-07-h100-g).
- The merge: one program per (output row, 32 columns), reading the splits a chunk at a time with a running
  maximum, so a program holds at most MERGE_ELEMS partial values whatever NS is. One program a row holding all
  NS x D of them spilled its registers once NS reached the hundreds (a long cache, or few tiles a split): at 260
  splits one layer's attention took 133-148 µs against 31-32 at head dim 128 (H100, bench/results/2026-12-07-h100/);
  at the default split count the two forms are level at depth 16384 (16.7-28.3 against 17.1-28.6 µs), and at 131072
  keys (257 splits) the column form takes 194 µs against 292 (Qwen3-8B's shape).
- RoPE in the split kernel (`rope_decode_attention`, one token a row into a float cache of q's dtype): every
  program rotates (and norms) its G query heads from the projection's raw output, and the last split of each
  kv head also the new key, which it stores with the value at the token's slot. No program loads that slot: the
  visible range stops before it: the last split starts its running softmax from the new key's term (score
  from registers, weight 1) before its loop, and only that program rotates the key and reads the new value.
  The last split, because it walks the fewest tiles (none at a short depth; one less than the first where the
  tiles do not divide evenly), so the extra work lengthens no program that already takes the longest.
  The rope kernel's launch and its wait go; the arithmetic is the same (rope.py's `rotate_halves`: bit for bit
  in the interpreter; compiled, the two kernels may fuse a multiply-add or order a sum differently, float32 keys
  1 ulp apart here and there on the H100). Every program asks for the raw q (and the last one the raw k and v)
  right after its PDL wait, before the positions and the cos / sin arithmetic, so their trips overlap: with the
  loads after cos / sin the fused form was 3-4% slower than the two launches on Qwen3-0.6B; the first tile's keys
  and values also asked for before the rotation took 128 registers a thread and lost 5-8% (H100,
  bench/results/2026-12-07-h100-b/). Where it pays is the head dim's `Launch.rope` (`_LAUNCHES`).
- With one split (NS = 1) there is nothing to merge: the split kernel stores the final normalized output
  in q's dtype and layout (B, T, H, D) itself, and the merge kernel is not launched.
- With one output row (B·T = 1) the merge kernel also stores it quantized for the output projection's int8
  GEMV (`q8`, ops/q8.store_q8: each program its columns' 32-blocks), one launch less a layer; the codes are
  quantize_act's, so logits do not change (H100: +1.2-2.7% decode tok/s, bench/results/2026-12-06-h100-c/).
- The number of splits: the `splits` argument, else the policy's `attn_splits` (`KILN_ATTN_SPLITS`, for
  A/B runs on a GPU; a CUDA graph keeps the value it was captured with), else enough programs to fill the
  device about twice over; always at most one split per key tile.

Shape alphabet: B batch, T query tokens, H query heads, K kv heads, G = H / K, S cache positions (S_max),
D head dim, NS splits, N cache rows.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from kiln.kv_types import dequantize_q4_0, dequantize_q8_0
from kiln.ops import pdl
from kiln.ops.dispatch import interpreted, jit, tl, triton, use_triton
from kiln.ops.q8 import store_q8
from kiln.ops.rope import cos_sin, head_rstd, rope_qk_write_kv, rope_qk_write_kv_ref, rotate_halves
from kiln.policy import DEFAULT, Policy

_BLOCK_N = 64  # keys per tile


class Launch(NamedTuple):
    """How the split kernel is launched (bench/attn_sweep.py times the alternatives on a GPU).

    block_n keys per tile; warps, stages as Triton's; tiles_per_split: no split of a full cache walks
    more tiles than this one after another; runtime_loop: each program's loop runs its own split's tile
    count (else the grid's worst case, tiles past the split's keys masked off: the interpreter's form);
    interleave: the splits deal the visible tiles out one by one instead of each taking one run of them;
    rope: `rope_decode_attention` fuses RoPE and the KV write into the kernel where it can (else two launches)."""
    block_n: int = _BLOCK_N
    warps: int = 0  # 0: 4, or 8 where D > 128
    stages: int = 2
    tiles_per_split: int = 4
    runtime_loop: bool = True
    interleave: bool = False  # split s takes tiles s, s + NS, s + 2·NS, ... (else one run of whole tiles)
    rope: bool = False  # RoPE, the q/k norms and the KV write in the split kernel (rope_decode_attention)


_LAUNCH = Launch()
# Head dim 128 (Qwen3, Llama 3 8B): 8 warps, 8 tiles a split: 10% less time at 16384 keys, 3% at 4096 in a
# CUDA graph on the H100, 4.4% more whole-model tokens/s for the 8B at depth 16384 (bench/results/2026-12-05-h100/,
# then with masked tiles in place of a runtime `if`); head dim 64 measured slower with it.
# Head dim 256 (Gemma 3) keeps the default: 32-key tiles with 8 warps and 8 a split decoded Gemma-3-1B slower, tg128
# 1,043 / 992 tok/s at depth 0 / 4096 against 1,144 / 1,110 (H100, same call, bench/results/2026-12-06-h100-b/
# ring_ab.jsonl). (They were tried for the 5,388 bytes of spills ptxas showed in the 64-key float-cache form compiled
# without alignment hints; as the JIT compiles it, aligned, it spills none: tests/test_kernels_aot.py.)
# Interleaved splits at head dim 128: Qwen3-0.6B tg128 at depth 16384 780.0 / 777.6 -> 795.4 / 792.3 tok/s (H100, same
# call, bench/results/2026-12-06-h100-g/); Llama-3.2-1B's head dim 64 measured level with it (1,245 / 1,230 -> 1,248 /
# 1,235), its attention alone 3.6% slower, so it keeps one run a split.
# RoPE in the kernel at head dim 128 only: tg128 @ 0 / @ 16384 on the H100, alternating with KILN_ROPE_ATTN=0 in one
# call (bench/results/2026-12-07-h100-b/): Qwen3-0.6B 1,635 / 798.0 and 1,641 / 800.3 against 1,624 / 796.8 and
# 1,619 / 797.2, Qwen3-8B 461.1 / 338.6 (twice) against 457.6 / 337.3 and 458.5 / 337.4; Llama-3.2-1B's head dim 64
# lost at depth (1,230 / 1,229 against 1,237 / 1,235 at 16384, 126 registers a thread against 96 unfused).
_LAUNCHES = {128: Launch(warps=8, tiles_per_split=8, interleave=True, rope=True)}


def launch_for(d: int, launch: Launch | None = None) -> Launch:
    """The split kernel's launch at head dim d: `launch` if given, else `_LAUNCHES`' for d, else `_LAUNCH`."""
    return launch or _LAUNCHES.get(d, _LAUNCH)


MERGE_Q8 = True  # the merge kernel may store the output in int8 for the next projection (False: for A/B runs)
MERGE_COLS = 32  # output columns a merge program combines (a multiple of 32: the int8 blocks it stores)
MERGE_ELEMS = 4096  # partial values a merge program holds at once (BLOCK_S x BLOCK_C)
MERGE_WARPS = 4  # a merge program's warps


def decode_attention_ref(q, k_cache, v_cache, pos, scale: float, window: int | None = None,
                         softcap: float | None = None, rows: torch.Tensor | None = None,
                         k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                         out_rot: torch.Tensor | None = None, last: int | None = None) -> torch.Tensor:
    """q (B, T, H, D); k_cache, v_cache (B, K, S, D); pos (T,) int64 → (B, T, H, D) in q.dtype.
    A query at pos sees slots 0..min(pos, last) (last None: S - 1) within `window` of pos: a ring layer's
    slots (cache.Ring, one token a row) are all visible once written, last its final slot and no window.

    Per row: pos (B, T), and rows (B,) picks cache row rows[b] of k_cache, v_cache (N, K, S, D).
    q8_0 / q4_0: k_scale (B or N, K, S, D/32) float16 makes k_cache codes (int8 (.., D): q8_0; uint8
    (.., D/2): q4_0), v_scale likewise for v_cache. out_rot (D, D) float32: the output (float32) times it."""
    if rows is not None:
        k_cache, v_cache = k_cache[rows], v_cache[rows]  # (B, K, S, D)
        k_scale, v_scale = (None if x is None else x[rows] for x in (k_scale, v_scale))
    h, kh, s = q.shape[2], k_cache.shape[1], k_cache.shape[2]
    qf = q.float().transpose(1, 2)  # (B, H, T, D)
    k = _values(k_cache, k_scale).repeat_interleave(h // kh, dim=1)  # (B, H, S, D): head i uses kv head i // G
    v = _values(v_cache, v_scale).repeat_interleave(h // kh, dim=1)
    scores = qf @ k.transpose(-1, -2) * scale  # (B, H, T, S)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    j = torch.arange(s, device=q.device)
    p = (pos if last is None else pos.clamp(max=last))[..., None]  # (T, 1) or (B, T, 1)
    mask = j <= p  # (T, S) or (B, T, S)
    if window:
        mask &= (p - j) < window
    if pos.ndim == 2:
        mask = mask[:, None]  # (B, 1, T, S)
    out = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v  # (B, H, T, D)
    out = out if out_rot is None else out @ out_rot
    return out.transpose(1, 2).to(q.dtype)  # (B, T, H, D)


def _values(cache: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """A cache (..., D) in float32: as stored, or q8_0 / q4_0 codes times their block's scale (..., D/32)."""
    if scales is None:
        return cache.float()
    return (dequantize_q8_0 if cache.dtype == torch.int8 else dequantize_q4_0)(cache, scales, torch.float32)


def decode_attention(q, k_cache, v_cache, pos, scale: float, window: int | None = None,
                     softcap: float | None = None, rows: torch.Tensor | None = None,
                     k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                     out_rot: torch.Tensor | None = None, last: int | None = None, *, splits: int | None = None,
                     policy: Policy = DEFAULT, launch: Launch | None = None, q8=None) -> torch.Tensor:
    """Same contract as `decode_attention_ref`. `splits` (else the policy's `attn_splits`) sets the number
    of key-range splits; with one, a single launch. `launch`: the kernel's tile and pipeline settings
    (default: `_LAUNCHES` by head dim, else `_LAUNCH`; bench/decode_ab.py replaces both to time others).
    `q8`: an empty gemv_int8.QuantAct for the output's one row (B·T = 1), which the merge kernel fills with the
    output quantized as the next projection reads it (what quantize_act would store), saving that launch;
    `q8.filled` says whether it did (not with one split, or a head dim not a power of two of 32 or more)."""
    if not use_triton(q, policy):
        return decode_attention_ref(q, k_cache, v_cache, pos, scale, window, softcap, rows, k_scale, v_scale,
                                    out_rot, last)
    return _attend(q, k_cache, v_cache, pos, scale, window, softcap, rows, k_scale, v_scale, out_rot, last, splits,
                   policy, launch, q8, None)


def rope_fuses(q, k, v, k_cache, v_cache, inv_freq, rot_dim: int | None = None) -> bool:
    """Can `rope_decode_attention` rotate in the split kernel itself? One token a row (q (B, 1, H, D)), every
    dim rotated, D a power of two of 16 or more, a float cache in q's dtype, unit-stride heads."""
    d = q.shape[-1]
    return (q.shape[1] == 1 and d >= 16 and d == triton.next_power_of_2(d) and 2 * inv_freq.shape[0] == d
            and (rot_dim is None or rot_dim == d) and k_cache.dtype == v_cache.dtype == q.dtype
            and k.shape == v.shape and all(x.stride(-1) == 1 for x in (q, k, v, k_cache, v_cache)))


def rope_decode_attention_ref(q, k, v, k_cache, v_cache, pos, inv_freq, scale: float, attn_factor: float = 1.0,
                              q_norm_w=None, k_norm_w=None, eps: float = 1e-6, norm_offset: float = 0.0,
                              rot_dim: int | None = None, window: int | None = None, softcap: float | None = None,
                              rows: torch.Tensor | None = None, slots: torch.Tensor | None = None,
                              last: int | None = None) -> torch.Tensor:
    """`rope.rope_qk_write_kv_ref` (the caches written in place, at `slots` if given), then `decode_attention_ref`
    over them (up to `last`)."""
    qr = rope_qk_write_kv_ref(q, k, v, k_cache, v_cache, pos, inv_freq, attn_factor, q_norm_w, k_norm_w, eps,
                              norm_offset, rot_dim, rows, slots)
    return decode_attention_ref(qr, k_cache, v_cache, pos, scale, window, softcap, rows, last=last)


def rope_decode_attention(q, k, v, k_cache, v_cache, pos, inv_freq, scale: float, attn_factor: float = 1.0,
                          q_norm_w=None, k_norm_w=None, eps: float = 1e-6, norm_offset: float = 0.0,
                          rot_dim: int | None = None, window: int | None = None, softcap: float | None = None,
                          rows: torch.Tensor | None = None, slots: torch.Tensor | None = None,
                          last: int | None = None, *, splits: int | None = None, policy: Policy = DEFAULT,
                          launch: Launch | None = None, q8=None) -> torch.Tensor:
    """`rope.rope_qk_write_kv` (q and k normed per head and rotated, k and v written into the caches at pos, or
    at a ring layer's `slots`), then `decode_attention` of the rotated q over the caches (a ring's up to `last`)
    — in the split kernel itself where `rope_fuses` and there is no ring: each program rotates its query heads
    from the projection's raw q, the last split of each kv head also the new key, which it writes into the
    cache beside the value; no program reads that slot back: the loop stops before it and the last split starts
    its softmax from the new key's term, in registers. One launch less a layer, the rotation in rope.py's
    arithmetic, where the head dim's launch says so (`Launch.rope`). Else (or with the policy's `rope_attn` off,
    KILN_ROPE_ATTN=0) the two ops.
    Arguments as theirs; q (B, T, H, D), k, v (B, T, K, D) before RoPE → (B, T, H, D)."""
    if (not use_triton(q, policy) or not policy.rope_attn or slots is not None or last is not None
            or not launch_for(q.shape[-1], launch).rope
            or not rope_fuses(q, k, v, k_cache, v_cache, inv_freq, rot_dim)):
        qr = rope_qk_write_kv(q, k, v, k_cache, v_cache, pos, inv_freq, attn_factor, q_norm_w, k_norm_w, eps,
                              norm_offset, rot_dim, rows, slots, policy=policy)
        return decode_attention(qr, k_cache, v_cache, pos, scale, window, softcap, rows, last=last, splits=splits,
                                policy=policy, launch=launch, q8=q8)
    assert (q_norm_w is None) == (k_norm_w is None), "q and k norms come together"
    rope = (k, v, q_norm_w if q_norm_w is not None else q, k_norm_w if k_norm_w is not None else q, inv_freq,
            float(attn_factor), float(eps), float(norm_offset), q_norm_w is not None)
    return _attend(q, k_cache, v_cache, pos, scale, window, softcap, rows, None, None, None, None, splits, policy,
                   launch, q8, rope)


def _attend(q, k_cache, v_cache, pos, scale, window, softcap, rows, k_scale, v_scale, out_rot, last, splits,
            policy, launch, q8, rope):
    """The split kernel (and the merge) for `decode_attention`, or with `rope` (k, v, q and k norm weights,
    inv_freq, attn_factor, eps, norm offset, has norm) for `rope_decode_attention`'s fused form."""
    b, t, h, d = q.shape
    kh, s_max = k_cache.shape[1], k_cache.shape[2]
    k_kind, v_kind = _kind(k_cache, k_scale), _kind(v_cache, v_scale)
    assert h % kh == 0 and k_cache.stride(-1) == v_cache.stride(-1) == 1
    assert k_cache.shape[-1] == (d // 2 if k_kind == 2 else d) and v_cache.shape[-1] == (d // 2 if v_kind == 2 else d)
    assert all(x is None or x.stride(-1) == 1 for x in (k_scale, v_scale, out_rot))
    g = h // kh
    q = q if q.stride(-1) == 1 else q.contiguous()
    launch = launch_for(d, launch)
    n_tiles = triton.cdiv(s_max, launch.block_n)
    ns = max(1, min(splits or policy.attn_splits
                    or _default_splits(q.device, b * kh, n_tiles, launch.tiles_per_split), n_tiles))
    out = torch.empty((b, t, h, d), dtype=q.dtype, device=q.device)  # (B, T, H, D)
    if ns == 1:  # the split kernel writes `out` itself
        mid_o, mid_lse = out, out
    else:
        mid_o = torch.empty((b * t * h, ns, d), dtype=torch.float32, device=q.device)  # (B·T·H, NS, D)
        mid_lse = torch.empty((b * t * h, ns), dtype=torch.float32, device=q.device)  # (B·T·H, NS)
    # float32 inputs use "ieee" dots: the GPU's default tf32 would miss the reference by ~1e-3.
    # D = 256 takes 8 warps: with 4, sm_90 needs ~248 registers a thread (158 with 8; ptxas, Triton 3.6).
    _split_kernel[(b * kh, ns)](
        q, k_cache, v_cache, pos, rows if rows is not None else pos, mid_o, mid_lse, *q.stride()[:3],
        *k_cache.stride()[:3], *v_cache.stride()[:3], pos.stride(0) if pos.ndim == 2 else 0, s_max, ns,
        s_max - 1 if last is None else int(last), float(scale), float(softcap or 1.0), int(window or 0),
        *_scale_args(k_scale, k_cache), *_scale_args(v_scale, v_cache), out_rot if out_rot is not None else q,
        *_rope_args(rope, q),
        T=t, G=g, H=h, D=d, HAS_WINDOW=bool(window), HAS_SOFTCAP=bool(softcap), HAS_ROWS=rows is not None,
        K_KIND=k_kind, V_KIND=v_kind, OUT_ROT=out_rot is not None, ROPE=rope is not None,
        HAS_NORM=rope is not None and rope[-1], HAS_OFFSET=rope is not None and bool(rope[-2]),
        FINAL=ns == 1, MAX_TILES=triton.cdiv(n_tiles, ns), BLOCK_M=max(16, triton.next_power_of_2(g * t)),
        BLOCK_N=launch.block_n, BLOCK_D=triton.next_power_of_2(d), BLOCK_T=max(2, triton.next_power_of_2(t)),
        RUNTIME_LOOP=launch.runtime_loop and not interpreted(), INTERLEAVE=launch.interleave,
        DOT_PREC="ieee" if q.dtype == torch.float32 else None,
        num_warps=launch.warps or (8 if d > 128 else 4), num_stages=launch.stages,
        **pdl.launch_kw(q, policy))
    if ns == 1:
        return out
    fill = MERGE_Q8 and q8 is not None and b * t == 1 and d % 32 == 0 and d == triton.next_power_of_2(d)
    cols = min(MERGE_COLS, triton.next_power_of_2(d))
    block_s = min(max(2, triton.next_power_of_2(ns)), max(2, MERGE_ELEMS // cols))
    _merge_kernel[(b * t * h, triton.cdiv(d, cols))](
        mid_o, mid_lse, out, *(q8.buffers if fill else (out, out, out)), ns, D=d, BLOCK_S=block_s,
        CHUNKS=triton.cdiv(ns, block_s), BLOCK_C=cols, Q8=fill, num_warps=MERGE_WARPS, **pdl.launch_kw(q, policy))
    if fill:
        q8.filled = True
    return out


def _rope_args(rope, q: torch.Tensor) -> tuple:
    """The split kernel's fused-RoPE arguments: raw k and v with their (row, head) strides, the q and k norm
    weights, inv_freq, attn_factor, eps, norm offset; q and zeros without `rope` (never read then)."""
    if rope is None:
        return (q, q, 0, 0, 0, 0, q, q, q, 1.0, 1e-6, 0.0)
    k, v, qw, kw, inv, factor, eps, offset, _ = rope
    return (k, v, k.stride(0), k.stride(2), v.stride(0), v.stride(2), qw, kw, inv, factor, eps, offset)


def _kind(cache: torch.Tensor, scales: torch.Tensor | None) -> int:
    """The kernel's code for how a cache is stored: 0 floats, 1 q8_0 (int8 codes), 2 q4_0 (uint8, two a byte)."""
    return 0 if scales is None else 1 if cache.dtype == torch.int8 else 2


def _scale_args(scales: torch.Tensor | None, cache: torch.Tensor) -> tuple:
    """(pointer, row, head and position strides) of a block cache's scales; the cache itself and zeros where
    it has none (its kernel branch never reads them)."""
    return (cache, 0, 0, 0) if scales is None else (scales, *scales.stride()[:3])


def _default_splits(device: torch.device, programs: int, n_tiles: int, tiles_per_split: int) -> int:
    """Splits so that (B·K) × NS programs fill the device about twice over, and no split of a full cache
    walks more than `tiles_per_split` tiles one after another (a long context is latency-bound otherwise)."""
    return max(1, math.ceil(2 * _sm_count(device) / programs), math.ceil(n_tiles / tiles_per_split))


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the CPU interpreter: few programs keep the tests fast


@jit
def _split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, rows_ptr, o_ptr, lse_ptr,
                  sqb, sqt, sqh, skb, skh, sks, svb, svh, svs, spb, S_MAX, NS, LAST, scale, softcap, window,
                  ks_ptr, sksb, sksh, skss, vs_ptr, svsb, svsh, svss, rot_ptr,
                  kn_ptr, vn_ptr, sknb, sknh, svnb, svnh, qw_ptr, kw_ptr, inv_ptr, attn_factor, eps, offset,
                  T: tl.constexpr, G: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
                  HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ROWS: tl.constexpr,
                  K_KIND: tl.constexpr, V_KIND: tl.constexpr, OUT_ROT: tl.constexpr,
                  ROPE: tl.constexpr, HAS_NORM: tl.constexpr, HAS_OFFSET: tl.constexpr,
                  FINAL: tl.constexpr, MAX_TILES: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
                  RUNTIME_LOOP: tl.constexpr, INTERLEAVE: tl.constexpr, DOT_PREC: tl.constexpr,
                  PDL: tl.constexpr):
    pdl.start(PDL)
    pdl.wait(PDL)
    bk = tl.program_id(0)
    split = tl.program_id(1)
    b = (bk // (H // G)).to(tl.int64)
    kh = bk % (H // G)
    cb = b  # the cache row this batch row reads (a server's slot), and where its positions start
    if HAS_ROWS:
        cb = tl.load(rows_ptr + b).to(tl.int64)
    pos_ptr = pos_ptr + b * spb  # spb = 0: positions shared by every row
    m = tl.arange(0, BLOCK_M)  # rows of the score matrix: row m is token m // G of query head kh·G + m % G
    tm = m // G
    head = kh * G + m % G
    row_ok = m < T * G
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    if ROPE:  # T = 1, D = BLOCK_D: the projection's raw heads, asked for first (the positions' loads and the
        # cos / sin arithmetic after them overlap their trip); the new key and value in the last split only
        i = tl.arange(0, BLOCK_D // 2)
        qp = q_ptr + b * sqb + head[:, None] * sqh
        x1 = tl.load(qp + i[None, :], mask=row_ok[:, None], other=0.0)  # (M, D/2)
        x2 = tl.load(qp + BLOCK_D // 2 + i[None, :], mask=row_ok[:, None], other=0.0)
        is_last = split == NS - 1
        kp = kn_ptr + b * sknb + kh * sknh
        k1 = tl.load(kp + i, mask=is_last, other=0.0)[None, :]  # (1, D/2)
        k2 = tl.load(kp + BLOCK_D // 2 + i, mask=is_last, other=0.0)[None, :]
        v_new = tl.load(vn_ptr + b * svnb + kh * svnh + d, mask=is_last, other=0.0)  # (D,)

    # The key range any of the T queries can see, from device positions, then this split's share of it.
    ts = tl.arange(0, BLOCK_T)
    # Positions as int32 (the cache's slots fit): the tiles' key indices, masks and addresses in 32-bit arithmetic
    pt = tl.minimum(tl.load(pos_ptr + ts, mask=ts < T, other=-1).to(tl.int32), LAST)  # (T,) a ring sees every slot
    if ROPE:  # the new key's slot is not read: the last split's softmax starts from its term in registers
        hi = tl.minimum(tl.max(pt, axis=0), S_MAX)
    else:
        hi = tl.minimum(tl.max(pt, axis=0) + 1, S_MAX)
    lo = hi * 0
    if HAS_WINDOW:
        lo = tl.maximum(tl.min(tl.where(ts < T, pt, S_MAX), axis=0) - window + 1, 0)
    n_t = tl.cdiv(hi - lo, BLOCK_N)  # tiles of visible keys
    if INTERLEAVE:  # tiles split, split + NS, ...: all programs read near one another at any moment
        start = lo + split * BLOCK_N
        step = NS * BLOCK_N
        end = hi
        count = tl.cdiv(tl.maximum(n_t - split, 0), NS)
    else:
        per = tl.cdiv(n_t, NS) * BLOCK_N  # keys per split, whole tiles
        start = lo + split * per
        step = BLOCK_N
        end = tl.minimum(start + per, hi)
        count = tl.cdiv(tl.maximum(end - start, 0), BLOCK_N)

    pm = tl.minimum(tl.load(pos_ptr + tm, mask=row_ok, other=-1).to(tl.int32), LAST)  # (M,) padded rows see nothing
    k_base = k_ptr + cb * skb + kh * skh
    v_base = v_ptr + cb * svb + kh * svh
    if ROPE:  # q's heads and the new key rotated here
        p0 = tl.max(pt, axis=0)
        cos, sin = cos_sin(p0, inv_ptr, attn_factor, BLOCK_D // 2, BLOCK_D // 2)
        r1, r2 = rotate_halves(x1, x2, head_rstd(x1, x2, tl.zeros([BLOCK_M], dtype=tl.float32), eps, D, HAS_NORM),
                               qw_ptr, cos, sin, offset, BLOCK_D // 2, HAS_NORM, HAS_OFFSET, BLOCK_D // 2)
        q = tl.reshape(tl.permute(tl.join(r1, r2), (0, 2, 1)), (BLOCK_M, BLOCK_D))  # (M, D)
    else:
        q = tl.load(q_ptr + b * sqb + tm[:, None] * sqt + head[:, None] * sqh + d[None, :],
                    mask=row_ok[:, None] & dm[None, :], other=0.0)  # (M, D)
    ks_base = ks_ptr + cb * sksb + kh * sksh  # this kv head's block scales (S, D/32)
    vs_base = vs_ptr + cb * svsb + kh * svsh

    # Finite start for the running max: a row with nothing visible yet never computes inf - inf.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_t = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # the weights by key column, summed after the loop
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if ROPE:
        if is_last:  # the new key (the split with the fewest tiles): rotated, cached, the softmax's first term
            n1, n2 = rotate_halves(k1, k2, head_rstd(k1, k2, tl.zeros([1], dtype=tl.float32), eps, D, HAS_NORM),
                                   kw_ptr, cos, sin, offset, BLOCK_D // 2, HAS_NORM, HAS_OFFSET, BLOCK_D // 2)
            k_new = tl.reshape(tl.permute(tl.join(n1, n2), (0, 2, 1)), (BLOCK_D,))  # (D,) in q's dtype
            tl.store(k_base + p0 * sks + d, k_new)  # the cache's copy, for the steps after this one
            tl.store(v_base + p0 * svs + d, v_new)
            s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * scale  # (M,)
            if HAS_SOFTCAP:
                s_new = softcap * (2.0 * tl.sigmoid(2.0 * s_new / softcap) - 1.0)
            # every query row sees it (its own position): the running max starts at its score, with weight 1
            # (in the first key column's sum, scaled by each tile's alpha as the tiles' weights are)
            m_i = tl.where(row_ok, s_new * 1.4426950408889634, m_i)
            l_t = tl.where(row_ok[:, None] & (tl.arange(0, BLOCK_N) == 0)[None, :], 1.0, l_t)
            acc = tl.where(row_ok[:, None], v_new.to(tl.float32)[None, :], acc)
    if RUNTIME_LOOP:  # this split's own tiles
        for i in range(count):
            m_i, l_t, acc = _tile(q, k_base, v_base, sks, svs, ks_base, vs_base, skss, svss, start + i * step, end,
                                  d, dm, pm, m_i, l_t, acc, scale, softcap, window, HAS_WINDOW, HAS_SOFTCAP, K_KIND,
                                  V_KIND, D, BLOCK_N, BLOCK_D, DOT_PREC)
    else:  # the interpreter's bound: the worst case, tiles past `end` masked (their loads read no memory)
        for i in range(MAX_TILES):
            m_i, l_t, acc = _tile(q, k_base, v_base, sks, svs, ks_base, vs_base, skss, svss, start + i * step, end,
                                  d, dm, pm, m_i, l_t, acc, scale, softcap, window, HAS_WINDOW, HAS_SOFTCAP, K_KIND,
                                  V_KIND, D, BLOCK_N, BLOCK_D, DOT_PREC)

    row = (b * T + tm) * H + head  # (M,) rows of (B·T·H)
    l_i = tl.sum(l_t, axis=1)
    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    if FINAL:  # the only split: o is the answer; o_ptr is the output (B, T, H, D) in q's dtype
        _store_out(o, o_ptr + row[:, None] * D, row_ok[:, None], rot_ptr, d, dm, D, BLOCK_D, OUT_ROT, DOT_PREC)
    else:  # partial result of this split: normalized output and its log2-sum-exp; "-inf": no visible key
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + row * NS + split, lse, mask=row_ok)
        _store_out(o, o_ptr + (row * NS + split)[:, None] * D, (row_ok & seen)[:, None], rot_ptr, d, dm, D, BLOCK_D,
                   OUT_ROT, DOT_PREC)


@jit
def _store_out(o, at, rows_ok, rot_ptr, d, dm, D: tl.constexpr, BLOCK_D: tl.constexpr, OUT_ROT: tl.constexpr,
               DOT_PREC: tl.constexpr):
    """o (M, D) float32 stored at `at` (M, 1) + column, in at's dtype; OUT_ROT: values stored rotated, so the
    output goes back to the model's basis first, o @ R (linear: before the merge as well as after), 32 columns
    of R a dot (a whole (D, D) one would not fit beside the tiles at D = 256)."""
    if OUT_ROT:
        for c in tl.static_range((BLOCK_D + 31) // 32):
            cols = c * 32 + tl.arange(0, 32)
            r = tl.load(rot_ptr + d[:, None] * D + cols[None, :], mask=dm[:, None] & (cols[None, :] < D), other=0.0)
            tl.store(at + cols[None, :], tl.dot(o, r, input_precision=DOT_PREC).to(at.dtype.element_ty),
                     mask=rows_ok & (cols[None, :] < D))
    else:
        tl.store(at + d[None, :], o.to(at.dtype.element_ty), mask=rows_ok & dm[None, :])


@jit
def _tile(q, k_base, v_base, sks, svs, ks_base, vs_base, skss, svss, j0, end, d, dm, pm, m_i, l_t, acc, scale,
          softcap, window, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, K_KIND: tl.constexpr,
          V_KIND: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
          DOT_PREC: tl.constexpr):
    """One tile of keys j0..j0+BLOCK_N-1 (those < end) into the running max m_i, the weights by key column l_t
    and the output acc."""
    j = j0 + tl.arange(0, BLOCK_N)  # (N,) key slots
    jm = j < end
    kt = _load(k_base, ks_base, j, jm, sks, skss, d, dm, K_KIND, D, BLOCK_N, BLOCK_D).to(q.dtype)  # (N, D)
    vt = _load(v_base, vs_base, j, jm, svs, svss, d, dm, V_KIND, D, BLOCK_N, BLOCK_D).to(q.dtype)
    s = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * scale  # (M, N) float32
    if HAS_SOFTCAP:
        s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)  # softcap · tanh(s / softcap)
    vis = (j[None, :] <= pm[:, None]) & jm[None, :]
    if HAS_WINDOW:
        vis = vis & ((pm[:, None] - j[None, :]) < window)
    s = tl.where(vis, s * 1.4426950408889634, float("-inf"))  # log2 domain
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])  # (M, N)
    l_t = l_t * alpha[:, None] + p  # summed over keys after the loop: no reduction across warps a tile
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PREC)
    return m_new, l_t, acc


@jit
def _load(base, s_base, j, jm, stride, s_stride, d, dm, KIND: tl.constexpr, D: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The (N, D) tile of keys or values at slots j as stored: floats as they are; q8_0 / q4_0 codes times
    their block's scale in float32, in registers, so the cache is read at its own size. (One return: the
    compiler visits what follows a return in a static branch too, and its returns must agree in type.)"""
    mask = jm[:, None] & dm[None, :]
    if KIND == 2:  # q4_0: element e of a block in byte e % 16, low nibble for e < 16, high for e >= 16
        byte = tl.load(base + j[:, None] * stride + ((d // 32) * 16 + d % 16)[None, :], mask=mask, other=0)
        codes = (byte.to(tl.int32) >> ((d // 16) % 2 * 4)[None, :]) & 15
        x = _scaled((codes - 8).to(tl.float32), s_base + j[:, None] * s_stride, jm, D, BLOCK_N, BLOCK_D)
    elif KIND == 1:
        x = tl.load(base + j[:, None] * stride + d[None, :], mask=mask, other=0)
        x = _scaled(x.to(tl.float32), s_base + j[:, None] * s_stride, jm, D, BLOCK_N, BLOCK_D)
    else:
        x = tl.load(base + j[:, None] * stride + d[None, :], mask=mask, other=0.0)
    return x


@jit
def _scaled(codes, rows, jm, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """A tile of codes (N, D) float32 times their block's scale; rows (N, 1): each key's scales (D/32 of them).
    The scales load as (N, D/32), one address each (an (N, D) gather of them cost as much as the codes), and
    multiply the codes viewed as (N, D/32, 32)."""
    nb = tl.arange(0, BLOCK_D // 32)
    sc = tl.load(rows + nb[None, :], mask=jm[:, None] & (nb[None, :] < D // 32), other=0.0)  # (N, D/32)
    x = tl.reshape(codes, [BLOCK_N, BLOCK_D // 32, 32]) * sc.to(tl.float32)[:, :, None]
    return tl.reshape(x, [BLOCK_N, BLOCK_D])


@jit
def _merge_kernel(o_ptr, lse_ptr, out_ptr, xq_ptr, xd_ptr, xs_ptr, NS, D: tl.constexpr, BLOCK_S: tl.constexpr,
                  CHUNKS: tl.constexpr, BLOCK_C: tl.constexpr, Q8: tl.constexpr, PDL: tl.constexpr):
    """Program (row, c): columns c·BLOCK_C.. of one output row, from every split's partial, BLOCK_S splits at a
    time (CHUNKS of them) with a running maximum of their lse: one pass over the partials, whatever NS."""
    pdl.start(PDL)
    pdl.wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = tl.arange(0, BLOCK_S)
    m = tl.full([1], -1.0e30, dtype=tl.float32)  # finite: a chunk of empty splits never computes inf - inf
    wsum = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(CHUNKS):
        s0 = i * BLOCK_S
        sm = s0 + s < NS
        lse = tl.load(lse_ptr + row * NS + s0 + s, mask=sm, other=float("-inf"))  # (S,)
        # Loaded beside lse, not masked by it (one round trip to memory, not two); an empty split's rows were
        # never written, so whatever they hold is replaced by 0 below.
        o = tl.load(o_ptr + (row * NS + s0 + s)[:, None] * D + c[None, :], mask=sm[:, None] & (c < D)[None, :],
                    other=0.0)  # (S, C)
        m_new = tl.maximum(m, tl.max(lse, axis=0))
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)  # (S,) 0 for empty splits
        o = tl.where((lse > float("-inf"))[:, None], o, 0.0)
        acc = acc * alpha + tl.sum(w[:, None] * o, axis=0)
        wsum = wsum * alpha + tl.sum(w, axis=0)
        m = m_new
    # Every row sees at least its own key, so some split has a finite lse and wsum > 0.
    out = acc / wsum
    tl.store(out_ptr + row * D + c, out.to(out_ptr.dtype.element_ty), mask=c < D)
    if Q8:  # one output row: these columns' 32-blocks, as quantize_act stores the values out_ptr now holds
        blk = row * (D // 32) + tl.program_id(1) * (BLOCK_C // 32)
        store_q8(out.to(out_ptr.dtype.element_ty).to(tl.float32), blk, (row + 1) * (D // 32), xq_ptr, xd_ptr,
                 xs_ptr, BLOCK_C // 32)
