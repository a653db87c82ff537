"""IQ4_NL and IQ4_XS quantizers: 4-bit indices into llama.cpp's non-linear grid, with and without an
importance matrix, following `quantize_row_iq4_nl_impl` of ggml-quants.c (as `ggml_quantize_chunk` calls it:
ntry 7; weights x^2, or qw * sqrt(sigma2 + x^2) with an importance matrix).

Owns: the per-32 scale search (`_block_scales`), IQ4_NL blocks (32 weights: f16 scale, 16 bytes) and IQ4_XS
super-blocks (256 weights: f16 scale, 6-bit signed scale per run of 32 split in scales_h / scales_l).
Not: the grid lookup and shared arithmetic (qmath.py), reading blocks (iquants.py).
"""

import torch

from kiln.quant.qmath import (F32, GROUP_MAX_EPS, IQ4NL_VALUES, absmax_signed, best_index_iq4, colsum, f16_bytes,
                              nearest_int, pack_nibbles, rdiv, safe, seqsum, sqrt32)

_NTRY = 7


def _weights(x: torch.Tensor, qw, group: int) -> torch.Tensor:
    """x (N, S) super-blocks -> per-weight importance (N * S/group, group)."""
    if qw is None:
        return (x * x).reshape(-1, group)
    sigma2 = seqsum(x * x) * (2.0 / x.shape[-1])
    return (qw * sqrt32(sigma2 + x * x)).reshape(-1, group)


def _block_scales(xb: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The scale of each run xb (G, 32) that best fits the grid (weighted least squares over 15 tries): (G, 1).
    The runs are searched as columns (32, G), so that each sum over a run is 32 contiguous vector adds."""
    vals = torch.tensor(IQ4NL_VALUES, dtype=F32, device=xb.device)
    mx = absmax_signed(xb).reshape(1, -1)
    xb, w = xb.t().contiguous(), w.t().contiguous()
    zero = mx.abs() < GROUP_MAX_EPS
    mxs = torch.where(zero, torch.ones_like(mx), mx)

    def fit(inv):
        q = vals[best_index_iq4(inv * xb)]
        wq = w * q
        return colsum(torch.mul(wq, xb)), colsum(wq.mul_(q))

    sumqx, sumq2 = fit(rdiv(1, torch.div(-mxs, vals[0])))
    d = torch.where(sumq2 > 0, sumqx / safe(sumq2, sumq2 > 0), torch.zeros_like(sumq2))
    best = d * sumqx
    for itry in range(-_NTRY, _NTRY + 1):
        sumqx, sumq2 = fit(rdiv(float(itry + IQ4NL_VALUES[0]), mxs))
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        dn = sumqx / safe(sumq2, sumq2 > 0)
        d = torch.where(better, dn, d)
        best = torch.where(better, dn * sumqx, best)
    return torch.where(zero, torch.zeros_like(d), d).reshape(-1, 1)


def _inv(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d != 0, rdiv(1, safe(d, d != 0)), torch.zeros_like(d))


def quantize_iq4_nl(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    """Blocks x (N, 32) -> (N, 18): f16 d, then index j in the low nibble of byte j, j+16 in the high."""
    d = _block_scales(x, _weights(x, qw, 32))
    L = best_index_iq4(_inv(d) * x).to(torch.uint8)
    return torch.cat([f16_bytes(d), pack_nibbles(L)], -1)


def quantize_iq4_xs(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    """Super-blocks x (N, 256) -> (N, 136): f16 d, scales_h (uint16), scales_l (4), qs (128)."""
    n = x.shape[0]
    scales = _block_scales(x.reshape(n * 8, 32), _weights(x, qw, 32)).reshape(n, 8)
    d = -absmax_signed(scales) / 32                                      # (N, 1)
    ls = nearest_int(_inv(d) * scales).clamp(-32, 31)                    # (N, 8)
    idl = _inv(d * ls.to(F32))
    L = best_index_iq4(idl[..., None] * x.reshape(n, 8, 32)).to(torch.uint8)
    ls = ls + 32
    scales_l = ((ls[:, 0::2] & 0xF) | ((ls[:, 1::2] & 0xF) << 4)).to(torch.uint8)
    shifts = torch.arange(0, 16, 2, dtype=torch.int32, device=x.device)
    scales_h = ((ls >> 4) << shifts).sum(-1, keepdim=True, dtype=torch.int32)
    h_bytes = torch.cat([scales_h & 0xFF, scales_h >> 8], -1).to(torch.uint8)
    qs = pack_nibbles(L.reshape(n * 8, 32)).reshape(n, 128)
    return torch.cat([f16_bytes(d), h_bytes, scales_l, qs], -1)
