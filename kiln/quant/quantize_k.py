"""K-quant quantizers (256-weight super-blocks): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, with and without an
importance matrix, following llama.cpp's ggml-quants.c block for block.

Owns: each type's block math and byte layout over super-blocks x (N, 256) float32, and `qw` (N, 256), the
importance weights of x's columns (an imatrix row, tiled) or None. Without `qw` these are llama.cpp's
`quantize_row_qX_K_ref`; with it its `quantize_row_qX_K_impl`, as `ggml_quantize_chunk` picks them.
Not: the scale searches (qmath.py), the type registry and chunking (quantize.py), reading blocks (kquants.py).
"""

import torch

from kiln.quant.qmath import (GROUP_MAX_EPS, absmax_signed, div, make_q3_quants, make_qkx2_quants,
                              make_qp_quants, make_qx_quants, nearest_int, pack_crumbs, pack_nibbles, positive,
                              rdiv, seqsum, sqrt32)

_F16 = torch.float16


def _imatrix_weights(x: torch.Tensor, qw: torch.Tensor, group: int, sigma_num: float) -> torch.Tensor:
    """qw * sqrt(sigma2 + x^2), sigma2 = sigma_num * sum(x^2) / 256 over the super-block: (N * 256/group, group)."""
    sigma2 = sigma_num * seqsum(x * x) / 256
    return (qw * sqrt32(sigma2 + x * x)).reshape(-1, group)


def _f16(v: torch.Tensor) -> torch.Tensor:
    return v.to(_F16)


def _h_bytes(h: torch.Tensor) -> torch.Tensor:
    return h.view(torch.uint8).reshape(h.shape[0], 2)


# ---- Q2_K: 16 runs of 16, 2-bit codes, 4-bit scale and min per run ------------------------------------

def _q2_scales_ref(x: torch.Tensor):
    n = x.shape[0]
    xs = x.reshape(n * 16, 16)
    scales, mins, L = make_qkx2_quants(xs, xs.abs(), 3, -0.5, 0.1, 15, mad=True)
    scales, mins = scales.reshape(n, 16), mins.reshape(n, 16)
    max_scale = positive(scales.amax(-1, keepdim=True))
    max_min = positive(mins.amax(-1, keepdim=True))
    ps, pm = max_scale > 0, max_min > 0
    ls = torch.where(ps, nearest_int(rdiv(15, torch.where(ps, max_scale, 1)) * scales), 0)
    lm = torch.where(pm, nearest_int(rdiv(15, torch.where(pm, max_min, 1)) * mins), 0)
    d16 = _f16(torch.where(ps, div(max_scale, 15), 0))
    dmin16 = _f16(torch.where(pm, div(max_min, 15), 0))
    return ((ls | (lm << 4)) & 0xFF), d16, dmin16, L


def _q2_scales_imatrix(x: torch.Tensor, qw: torch.Tensor):
    n = x.shape[0]
    xs = x.reshape(n * 16, 16)
    w = _imatrix_weights(x, qw, 16, 1)
    sw = seqsum(w).reshape(n, 16)
    scales, mins, L = make_qkx2_quants(xs, w, 3, -0.9, 0.05, 36)
    dm, Ls = make_qp_quants(scales.reshape(n, 16), 15, sw)
    mm, Lm = make_qp_quants(mins.reshape(n, 16), 15, sw)
    return ((Ls | (Lm << 4)) & 0xFF), _f16(dm), _f16(mm), L


def quantize_q2_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    n = x.shape[0]
    sc, d16, dmin16, L = _q2_scales_ref(x) if qw is None else _q2_scales_imatrix(x, qw)
    d = d16.float() * (sc & 0xF).float()                                 # (N, 16)
    dm = dmin16.float() * (sc >> 4).float()
    ds = torch.where(d == 0, torch.ones_like(d), d)
    requant = nearest_int((x.reshape(n, 16, 16) + dm[..., None]) / ds[..., None]).clamp(0, 3)
    L = torch.where((d != 0)[..., None], requant, L.reshape(n, 16, 16)).reshape(n, 256)
    return torch.cat([sc.to(torch.uint8), pack_crumbs(L), _h_bytes(d16), _h_bytes(dmin16)], -1)


# ---- Q3_K: 16 runs of 16, 3-bit codes (2 low bits + a high-bit mask), 6-bit signed scale per run ----------

def _q3_scales_ref(x: torch.Tensor):
    n = x.shape[0]
    scales, L = make_q3_quants(x.reshape(n * 16, 16), 4)
    scales = scales.reshape(n, 16)
    max_scale = absmax_signed(scales)
    nz = max_scale != 0
    iscale = rdiv(-32, torch.where(nz, max_scale, 1))
    ls = torch.where(nz, nearest_int(iscale * scales).clamp(-32, 31) + 32, 0)
    return ls, _f16(torch.where(nz, rdiv(1, iscale), 0)), L


def _q3_scales_imatrix(x: torch.Tensor, qw: torch.Tensor):
    n = x.shape[0]
    w = _imatrix_weights(x, qw, 16, 2)
    sw = seqsum(w).reshape(n, 16)
    scales, L = make_qx_quants(x.reshape(n * 16, 16), 4, w)
    d_block, Ls = make_qx_quants(scales.reshape(n, 16), 32, sw)
    return Ls, _f16(d_block), L


def _q3_scale_bytes(ls: torch.Tensor) -> torch.Tensor:
    """6-bit scales (N, 16) 0..63 -> 12 bytes: low nibbles of runs j and j+8 in byte j, the high 2 bits of
    run j in byte 8 + j%4 at bit 2*(j//4)."""
    lo = ls & 0xF
    hi = (ls >> 4).reshape(-1, 4, 4)                                      # (N, j//4, j%4)
    shifts = torch.arange(0, 8, 2, dtype=torch.int32, device=ls.device)[:, None]
    return torch.cat([lo[:, :8] | (lo[:, 8:] << 4), (hi << shifts).sum(1)], -1).to(torch.uint8)


def quantize_q3_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    n = x.shape[0]
    ls, d16, L = _q3_scales_ref(x) if qw is None else _q3_scales_imatrix(x, qw)
    d = d16.float() * (ls - 32).float()                                  # (N, 16)
    ds = torch.where(d == 0, torch.ones_like(d), d)
    requant = nearest_int(x.reshape(n, 16, 16) / ds[..., None]).clamp(-4, 3) + 4
    L = torch.where((d != 0)[..., None], requant, L.reshape(n, 16, 16)).reshape(n, 256)
    high = (L > 3).to(torch.uint8).reshape(n, 8, 32)                      # bit b of hmask[m]: code 32b + m
    hmask = (high << torch.arange(8, dtype=torch.uint8, device=x.device)[:, None]).sum(1, dtype=torch.uint8)
    L = torch.where(L > 3, L - 4, L)
    return torch.cat([hmask, pack_crumbs(L), _q3_scale_bytes(ls), _h_bytes(d16)], -1)


# ---- Q4_K / Q5_K: 8 runs of 32, a 6-bit scale and min per run ------------------------------------------

def _k4_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """6-bit scales and mins (N, 8) uint8 -> the 12 packed bytes of Q4_K / Q5_K (get_scale_min_k4's inverse)."""
    lo = (ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6))
    hi = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return torch.cat([lo[0], lo[1], hi], -1)


def _q45_scales_ref(x: torch.Tensor, nmax: int, rmin: float, nstep: int):
    n = x.shape[0]
    xs = x.reshape(n * 8, 32)
    w = sqrt32(seqsum(xs * xs) / 32) + xs.abs()
    scales, mins, L = make_qkx2_quants(xs, w, nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale = positive(scales.amax(-1, keepdim=True))
    max_min = positive(mins.amax(-1, keepdim=True))
    inv_scale = torch.where(max_scale > 0, rdiv(63, max_scale), torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, rdiv(63, max_min), torch.zeros_like(max_min))
    ls = (nearest_int(inv_scale * scales) & 0xFF).clamp(max=63)          # uint8_t, then MIN(63)
    lm = (nearest_int(inv_min * mins) & 0xFF).clamp(max=63)
    return ls, lm, _f16(div(max_scale, 63)), _f16(div(max_min, 63)), L


def _q45_scales_imatrix(x: torch.Tensor, qw: torch.Tensor, nmax: int):
    n = x.shape[0]
    w = _imatrix_weights(x, qw, 32, 2)
    sw = seqsum(w).reshape(n, 8)
    scales, mins, L = make_qkx2_quants(x.reshape(n * 8, 32), w, nmax, -0.9, 0.05, 36)
    d, ls = make_qp_quants(scales.reshape(n, 8), 63, sw)
    m, lm = make_qp_quants(mins.reshape(n, 8), 63, sw)
    return (ls & 0xFF).clamp(max=63), (lm & 0xFF).clamp(max=63), _f16(d), _f16(m), L


def _q45_codes(x: torch.Tensor, nmax: int, qw, rmin: float, nstep: int):
    """The shared part of Q4_K / Q5_K: the 16-byte head (d, dmin, packed scales) and codes L (N, 256)."""
    n = x.shape[0]
    ls, lm, d16, dmin16, L = (_q45_scales_ref(x, nmax, rmin, nstep) if qw is None
                              else _q45_scales_imatrix(x, qw, nmax))
    ls, lm = ls.to(torch.uint8), lm.to(torch.uint8)
    d = d16.float() * ls.float()                                          # (N, 8)
    dm = dmin16.float() * lm.float()
    ds = torch.where(d == 0, torch.ones_like(d), d)
    requant = nearest_int((x.reshape(n, 8, 32) + dm[..., None]) / ds[..., None]).clamp(0, nmax)
    L = torch.where((d != 0)[..., None], requant, L.reshape(n, 8, 32)).reshape(n, 256)
    return torch.cat([_h_bytes(d16), _h_bytes(dmin16), _k4_scales(ls, lm)], -1), L


def quantize_q4_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    head, L = _q45_codes(x, 15, qw, -1.0, 20)
    qs = pack_nibbles(L.to(torch.uint8).reshape(-1, 4, 64)).reshape(x.shape[0], 128)
    return torch.cat([head, qs], -1)


def quantize_q5_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    head, L = _q45_codes(x, 31, qw, -0.5, 15)
    L = L.to(torch.uint8).reshape(-1, 4, 64)                           # (N, pair of 32-runs, 64)
    qs = pack_nibbles(L & 0xF).reshape(x.shape[0], 128)
    hb = (L >> 4).reshape(-1, 8, 32)                                   # run r = 2*pair + half, bit r of qh[j]
    qh = (hb << torch.arange(8, dtype=torch.uint8, device=x.device)[:, None]).sum(1, dtype=torch.uint8)
    return torch.cat([head, qh, qs], -1)


# ---- Q6_K: 16 runs of 16, 6-bit codes, an 8-bit signed scale per run ------------------------------------

def quantize_q6_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    n = x.shape[0]
    scales, L = make_qx_quants(x.reshape(n * 16, 16), 32, None if qw is None else qw.reshape(n * 16, 16))
    scales, L = scales.reshape(n, 16), L.reshape(n, 16, 16)
    max_scale = absmax_signed(scales)
    empty = max_scale.abs() < GROUP_MAX_EPS
    iscale = rdiv(-128, torch.where(empty, torch.ones_like(max_scale), max_scale))
    d16 = (1 / iscale).to(_F16)
    sc = nearest_int(iscale * scales).clamp(max=127).to(torch.int8)               # (N, 16)
    d = d16.float() * sc.float()
    ds = torch.where(d == 0, torch.ones_like(d), d)
    requant = nearest_int(x.reshape(n, 16, 16) / ds[..., None]).clamp(-32, 31) + 32
    L = torch.where((d != 0)[..., None], requant, L).reshape(n, 2, 4, 32).to(torch.uint8)
    lo, hi = L & 0xF, L >> 4                                           # (N, half, run, 32)
    ql = torch.cat([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], -1)  # (N, 2, 64)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)          # (N, 2, 32)
    out = torch.cat([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(torch.uint8), _h_bytes(d16)], -1)
    return torch.where(empty, torch.zeros_like(out), out)

