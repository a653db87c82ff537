"""The tensor-core kernel for 9..32 rows of 16-bit x: weights dequantized in registers, one tl.dot per field.

Owns: `gemm_mma` and its kernel. Not: where it runs and its split-K (route.py: `mma_config`, `mma_launch`),
tiles.py, packed.py.
"""

from __future__ import annotations

import torch

from kiln.ops.dispatch import jit, tl, triton
from kiln.quant.packed import FORMATS, V, PackedWeight
from kiln.quant.route import MAX_MMA_M, MMA_FORMATS, MmaConfig
from kiln.quant.tiles import block_scales, codes, const, plane_args, scales, store_rows, sum_splits
from kiln.quant.tiles import field_offset_c as _fo


_V = const(V)


@jit
def _mma_kernel(x_ptr, y_ptr, b_ptr, qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, N, M, stride_x,
                KW: tl.constexpr, SUBS: tl.constexpr, G: tl.constexpr, WPB: tl.constexpr, SUB: tl.constexpr,
                FMT: tl.constexpr, HAS_QH: tl.constexpr, HAS_DM: tl.constexpr, HAS_MIN: tl.constexpr,
                HAS_BIAS: tl.constexpr, BN: tl.constexpr, W: tl.constexpr, MX: tl.constexpr,
                SPLIT_K: tl.constexpr, NIT: tl.constexpr, NATURAL: tl.constexpr = False):
    """y (M, N) = x (M, K) @ w.T for 9..32 rows of x (a server's batched decode step): per K step of W
    words, one (MX, W) x (W, BN) tensor-core product per field f of the words, with the weights of that
    field dequantized in registers ((BN, W): one code per word) and the activations they multiply gathered
    in the same order (weight field_offset(f) + j of each four-word group): nothing is permuted. NATURAL:
    all fields of the step at once, permuted back to weight order in registers (as `_dequant_kernel`
    stores them), one (MX, W*G) x (W*G, BN) product with a contiguous x tile. SPLIT_K > 1: float32
    partials (SPLIT_K, M, N), summed by _split_k_sum_kernel."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BN + tl.arange(0, BN)
    r = rows.to(tl.int64)[:, None]                                     # (BN, 1)
    rmask = (rows < N)[:, None]
    mi = tl.arange(0, MX)
    xmask = (mi < M)[:, None]
    L: tl.constexpr = G // 4                                           # fields per byte of a word
    SPG: tl.constexpr = (_V * G) // SUB if SUB < _V * G else 1        # sub-blocks per four-word group
    acc = tl.zeros((MX, BN), dtype=tl.float32)
    for it in range(0, NIT):
        kw = (pid_k + it * SPLIT_K) * W + tl.arange(0, W)              # (W,) word index
        wmask = rmask & (kw < KW)[None, :]                             # (BN, W)
        words = tl.load(qs_ptr + r * KW + kw[None, :], mask=wmask, other=0)
        hi = words
        if HAS_QH:
            hi = tl.load(qh_ptr + r * KW + kw[None, :], mask=wmask, other=0).to(tl.int32)
        d, dmn = block_scales(d_ptr, dm_ptr, r, (kw // _V)[None, :], wmask, KW, WPB, HAS_DM)   # (BN, W)
        # Weights as dequantize_gpu builds them (`codes`, `scales`: (q - offset) * dl [- ml]), in x's dtype.
        if SUB >= _V * G:  # a sub-block (or block) spans whole groups
            dl0, ml0 = scales(sc_ptr, mn_ptr, r * SUBS + (kw // (SUB // G))[None, :], wmask, d, dmn, FMT)
            dl1, ml1 = dl0, ml0
        else:  # two sub-blocks of 16 per group (Q6_K): fields f % L == 0 and 1
            sidx = r * SUBS + (kw // _V * SPG)[None, :]
            dl0, ml0 = scales(sc_ptr, mn_ptr, sidx, wmask, d, dmn, FMT)
            dl1, ml1 = scales(sc_ptr, mn_ptr, sidx + 1, wmask, d, dmn, FMT)
        if NATURAL:  # all fields at once, back to weight order in registers, one product per step
            fi = tl.arange(0, G)[None, None, :]                        # (1, 1, G)
            if SPG == 2:
                dl3 = tl.where(fi % L == 1, dl1[:, :, None], dl0[:, :, None])
                ml3 = tl.where(fi % L == 1, ml1[:, :, None], ml0[:, :, None])
            else:
                dl3 = dl0[:, :, None]
                ml3 = ml0[:, :, None]
            w3 = codes(words[:, :, None], hi[:, :, None], qs_ptr, fi, FMT) * dl3
            if HAS_MIN:
                w3 = w3 - ml3
            w3 = w3.to(x_ptr.dtype.element_ty)                         # (BN, W, G)
            # [n, word, f]: word = 4*g + j, f = m*L + l -> weight g*4G + l*16 + m*4 + j of the step
            wn = tl.reshape(tl.permute(tl.reshape(w3, (BN, W // _V, _V, 4, L)), (0, 1, 4, 3, 2)), (BN, W * G))
            kx = (pid_k + it * SPLIT_K) * (W * G) + tl.arange(0, W * G)
            xt = tl.load(x_ptr + mi[:, None] * stride_x + kx[None, :], mask=xmask & (kx < KW * G)[None, :],
                         other=0.0)                                    # (MX, W*G)
            acc = tl.dot(xt, tl.trans(wn), acc)
        xbase = (kw // _V) * (_V * G) + kw % _V                        # (W,) weight under field 0
        for f in tl.static_range(0 if NATURAL else G):
            if SPG == 2 and f % L == 1:
                dl, ml = dl1, ml1
            else:
                dl, ml = dl0, ml0
            wt = codes(words, hi, qs_ptr, f, FMT) * dl
            if HAS_MIN:
                wt = wt - ml
            wt = wt.to(x_ptr.dtype.element_ty)                         # (BN, W)
            xt = tl.load(x_ptr + mi[:, None] * stride_x + (xbase + _fo(f, G))[None, :],
                         mask=xmask & (kw < KW)[None, :], other=0.0)  # (MX, W)
            acc = tl.dot(xt, tl.trans(wt), acc)                        # (MX, BN)
    y = tl.trans(acc)                                                  # (BN, MX)
    store_rows(y, y_ptr, b_ptr, rows, rmask, mi, M, N, pid_k, SPLIT_K, HAS_BIAS)


def gemm_mma(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None, config: MmaConfig) -> torch.Tensor:
    """x (M, K) with 1 <= M <= 32 rows, 16-bit -> y = x @ W.T (+ bias): (M, N) in x.dtype, on the tensor cores
    with the weights dequantized in registers (`_mma_kernel`; float32 accumulation of weights rounded once
    to x's dtype), launched as `config` says (route.mma_launch picks its splits). For MMA_FORMATS only;
    graph-capturable like the GEMVs."""
    fmt, (n, k) = w.fmt, w.shape
    m = x.shape[0]
    if w.qtype not in MMA_FORMATS or x.dim() != 2 or x.shape[1] != k or not 1 <= m <= MAX_MMA_M \
            or x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"gemm_mma takes 16-bit x of shape (M <= {MAX_MMA_M}, {k}) and a weight in "
                         f"{sorted(FORMATS[q].name for q in MMA_FORMATS)}, got {tuple(x.shape)} {x.dtype} "
                         f"and {fmt.name}")
    if config.split_k < 1:
        raise ValueError(f"gemm_mma needs a launchable config (split_k >= 1; route.mma_launch), got {config}")
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg, split = config, config.split_k
    kw_total = k // fmt.g
    n_steps = triton.cdiv(kw_total, cfg.words)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    out = y if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    _mma_kernel[(triton.cdiv(n, cfg.block_n), split)](
        x, out, bias if bias is not None else y, *plane_args(w)[:6], n, m, x.stride(0),
        KW=kw_total, SUBS=k // fmt.sub, G=fmt.g, WPB=fmt.block // fmt.g, SUB=fmt.sub, FMT=w.qtype,
        HAS_QH=fmt.qh is not None, HAS_DM=fmt.dm, HAS_MIN=fmt.has_min,
        HAS_BIAS=bias is not None and split == 1, BN=cfg.block_n, W=cfg.words, MX=max(16, triton.next_power_of_2(m)),
        SPLIT_K=split, NIT=triton.cdiv(n_steps, split), NATURAL=cfg.natural, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return sum_splits(out, y, bias, split)
