"""Packed weights back to dense matrices on the GPU: prefill's dequantize-then-cuBLAS, quantized embeddings.

Owns: `dequantize_gpu` and its kernel (float32 bit-identical to packed.dequantize_ref, no FMA contraction), which
can also dequantize chosen rows only (`rows`: an embedding lookup reads its token ids' rows straight from the
planes, one launch, no gathered copy of each plane first).
Not: when it runs (route.py, linear.QuantEmbedding), the matmul after it, tiles.py, packed.py.
"""

from __future__ import annotations

import torch

from kiln.ops.dispatch import jit, tl, triton
from kiln.quant.packed import V, PackedWeight
from kiln.quant.route import DequantConfig
from kiln.quant.tiles import const, dense_tile, geometry, plane_args


_V = const(V)


@jit
def _dequant_kernel(out_ptr, qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, tab_ptr, ids_ptr, N, N_W,
                    KW: tl.constexpr, SUBS: tl.constexpr, FMT: tl.constexpr, G: tl.constexpr, WPB: tl.constexpr,
                    GPS: tl.constexpr, SPG: tl.constexpr, HAS_QH: tl.constexpr, HAS_DM: tl.constexpr,
                    HAS_MIN: tl.constexpr, HAS_IDS: tl.constexpr, BN: tl.constexpr, W: tl.constexpr):
    """out (N, K) = the dense weight, BN rows x W words per program; HAS_IDS: out row i is weight row ids[i]
    (clamped to the N_W rows there are: memory outside the planes is never read). Launched without FMA
    contraction, so `dl * q - ml` rounds twice, exactly as gguf-py does."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    src = rows.to(tl.int64)
    if HAS_IDS:
        src = tl.minimum(tl.maximum(tl.load(ids_ptr + rows, mask=rows < N, other=0).to(tl.int64), 0), N_W - 1)
    r = src[:, None, None, None]                                       # (BN, 1, 1, 1) the weight rows read
    ng = tl.program_id(1) * (W // _V) + tl.arange(0, W // _V)          # (NG,)
    w, _ = dense_tile(qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, tab_ptr, r,
                      (rows < N)[:, None, None, None], ng, KW, SUBS, FMT, G, WPB, GPS, SPG, HAS_QH, HAS_DM,
                      HAS_MIN)
    # Back to weight order in registers (field f = m*L + l of word j is weight l*4V + m*V + j of its group), so
    # that each row's stores are contiguous: (BN, NG, 4, L, V) -> (BN, NG, L, 4, V) -> (BN, W*G).
    L: tl.constexpr = G // 4
    wn = tl.reshape(tl.permute(tl.reshape(w.to(out_ptr.dtype.element_ty), (BN, W // _V, 4, L, _V)),
                               (0, 1, 3, 2, 4)), (BN, W * G))
    cols = tl.program_id(1) * (W * G) + tl.arange(0, W * G)           # (W*G,) weight index in the row
    rr = rows.to(tl.int64)[:, None]
    tl.store(out_ptr + rr * (KW * G) + cols[None, :], wn, mask=(rows < N)[:, None] & (cols < KW * G)[None, :])


def dequantize_gpu(w: PackedWeight, dtype: torch.dtype = torch.bfloat16,
                   config: DequantConfig = DequantConfig(), rows: torch.Tensor | None = None) -> torch.Tensor:
    """PackedWeight -> dense (N, K) in dtype on w's device: float32 bit-identical to `dequantize_ref`, any
    other dtype that result rounded once. `rows` (R,) integer indices on w's device: only those rows, (R, K)
    (an embedding lookup; callers check the ids, the kernel only clamps them into the table)."""
    fmt, (n, k) = w.fmt, w.shape
    n_w = n
    if rows is not None:
        rows = rows.reshape(-1)
        n = rows.numel()
    geo = geometry(fmt, k, config.block_k)
    out = torch.empty((n, k), dtype=dtype, device=w.device)
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(geo["KW"], geo["W"]))
    _dequant_kernel[grid](out, *plane_args(w), rows if rows is not None else out, n, n_w, FMT=w.qtype,
                          HAS_IDS=rows is not None, BN=config.block_n, num_warps=config.num_warps,
                          enable_fp_fusion=False, **geo)
    return out
