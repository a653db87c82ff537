"""The float arithmetic shared by kiln's quantizers, in llama.cpp's operation order.

Owns: exact helpers (`rdiv`, `div`, `nearest_int`, `seqsum`, `sqrt32`, byte packing) and the per-group scale searches of
ggml-quants.c, each vectorized over groups (rows of a (G, n) tensor): `make_qkx2_quants` (also serves as
make_qkx3_quants, the same search with other constants), `make_qx_quants` (rmse_type 1), `make_q3_quants`,
`make_qp_quants`, and `best_index_iq4` (best_index_int8 on the IQ4_NL grid).
Not: block layouts (quantize_k.py, quantize_iq4.py, quantize.py) or the choice of type.

Byte identity needs llama.cpp's float operations in its order, in float32: every sum over a group runs
sequentially (`seqsum`, one vectorized add per position, as the C loop adds), products are rounded before
they are added (no fused multiply-add: the ggml library llama-cpp-python ships has none), `a * b * c` is
`(a * b) * c`, and `nearest_int` is ggml's (add 1.5 * 2^23, keep the mantissa bits: round half to even).
The coordinate descents of make_q3_quants / make_qp_quants visit positions in order, so they loop over
positions (16 or 8 vectorized steps per round); a group that stopped changing stays unchanged, so running
every round for every group gives the C loop's result.
"""

import torch

F32 = torch.float32
_MAGIC = 12582912.0  # 1.5 * 2^23
GROUP_MAX_EPS = 1e-15


def f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=F32)


def rdiv(a: float, t: torch.Tensor) -> torch.Tensor:
    """a / t rounded once (torch's `a / t` is `a * (1 / t)`, rounded twice)."""
    return torch.div(torch.tensor(a, dtype=F32, device=t.device), t)


def div(t: torch.Tensor, v: float) -> torch.Tensor:
    """t / v rounded once on every device: CUDA computes `t / python_number` as t * (1 / v), rounded twice."""
    return torch.div(t, torch.tensor(v, dtype=t.dtype, device=t.device))


def safe(t: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """t where ok, else 1: a denominator that never divides by zero where the result is thrown away."""
    return torch.where(ok, t, torch.ones_like(t))


def positive(t: torch.Tensor) -> torch.Tensor:
    """t where t > 0, else +0 (a C running maximum started at 0: never -0)."""
    return torch.where(t > 0, t, torch.zeros_like(t))


def f16_bytes(v: torch.Tensor) -> torch.Tensor:
    """float32 (N, 1) rounded to f16 (round to nearest even, as GGML_FP32_TO_FP16) as (N, 2) uint8."""
    return v.to(torch.float16).view(torch.uint8).reshape(v.shape[0], 2)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, 2k) values 0..15 -> (N, k) bytes: weight j in the low nibble of byte j, weight j+k in the high."""
    k = q.shape[-1] // 2
    return q[..., :k] | (q[..., k:] << 4)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(N, 8m) values 0/1 -> (N, m) bytes, bit i of byte b = value 8b + i (little bit order)."""
    b = bits.reshape(bits.shape[0], -1, 8).to(torch.uint8)
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return (b << shifts).sum(-1, dtype=torch.uint8)


def pack_crumbs(L: torch.Tensor) -> torch.Tensor:
    """Q2_K / Q3_K 2-bit codes (N, 256) -> qs (N, 64): byte l of half h holds L[128h + 32k + l] at bit 2k."""
    q = L.to(torch.uint8).reshape(L.shape[0], 2, 4, 32)
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=L.device)[:, None]
    return (q << shifts).sum(2, dtype=torch.uint8).reshape(L.shape[0], 64)


def absmax_signed(b: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude in each group (the first of equals): (N, 1)."""
    return b.gather(-1, b.abs().argmax(-1, keepdim=True))


def nearest_int(f: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: round half to even through the float32 mantissa, as int32."""
    return ((f + _MAGIC).view(torch.int32) & 0x007FFFFF) - 0x00400000


def sqrt32(t: torch.Tensor) -> torch.Tensor:
    """sqrtf, correctly rounded: torch's float32 sqrt on CPU is not (an approximation off by an ulp at times,
    which was the cause of Q4_K's 1% of differing blocks); the float64 root rounded to float32 is."""
    return torch.sqrt(t.double()).to(F32)


def seqsum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim in index order, one rounding per add, as a C loop sums: (..., 1)."""
    return colsum(t.movedim(-1, 0).contiguous()).squeeze(0).unsqueeze(-1)


def colsum(t: torch.Tensor) -> torch.Tensor:
    """seqsum of a group stored as a column: t (n, G) -> (1, G), rows added in order."""
    acc = t[0].clone()
    for i in range(1, t.shape[0]):
        acc += t[i]
    return acc.unsqueeze(0)


def _cols(t: torch.Tensor) -> torch.Tensor:
    """(G, n) -> (n, G) contiguous: the searches below keep each group in a column, so that a sum over a
    group is n contiguous vector adds instead of a transposed copy per sum."""
    return t.t().contiguous()


def _nearest_clamped(f: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """nearest_int(f).clamp(lo, hi), with in-place steps on one temporary."""
    n = (f + _MAGIC).view(torch.int32)
    return n.bitwise_and_(0x007FFFFF).sub_(0x00400000).clamp_(lo, hi)


def _weighted_error_cols(w, scale, lf, mn, x, mad: bool):
    """seqsum(w * |d| or d * d) for d = scale * lf + mn - x, groups in columns, one temporary."""
    d = torch.mul(scale, lf).add_(mn).sub_(x)
    d = d.abs_() if mad else d.mul_(d)
    return colsum(d.mul_(w))


def make_qkx2_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                     nstep: int, mad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_qkx2_quants (and make_qkx3_quants with weights) on every row of x (G, n):
    (scale (G,1), -min (G,1), L (G,n) int32)."""
    x, w = _cols(x), _cols(w)                                 # (n, G)
    mn = x.amin(0, keepdim=True).clamp(max=0)
    mx = x.amax(0, keepdim=True)
    sum_w = colsum(w)
    sum_x = colsum(w * x)
    flat = mx == mn
    rng = torch.where(flat, torch.ones_like(mx), mx - mn)
    iscale = rdiv(nmax, rng)
    scale = 1 / iscale
    L = _nearest_clamped(iscale * (x - mn), 0, nmax)
    best = _weighted_error_cols(w, scale, L.to(F32), mn, x, mad)
    wl = torch.empty_like(x)
    for step in range(nstep + 1):
        # min is the best fit so far: the range moves with it, as in llama.cpp
        iscale = (f32(rmin) + f32(rdelta) * step + nmax) / torch.where(flat, rng, mx - mn)
        la = _nearest_clamped(torch.sub(x, mn).mul_(iscale), 0, nmax)
        lf = la.to(F32)
        torch.mul(w, lf, out=wl)
        sum_l = colsum(wl)
        sum_l2 = colsum(torch.mul(wl, lf))
        sum_xl = colsum(wl.mul_(x))
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = safe(D, ok)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        err = _weighted_error_cols(w, this_scale, lf, this_min, x, mad)
        better = ok & (err < best)
        L = torch.where(better, la, L)
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    L = torch.where(flat, torch.zeros_like(L), L)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale.reshape(-1, 1), (-mn).reshape(-1, 1), L.t().contiguous()


def make_qx_quants(x: torch.Tensor, nmax: int, w: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants(rmse_type=1) on every row of x (G, n), weights w or x*x: (scale (G,1), L (G,n) int32)."""
    mx = absmax_signed(x).reshape(1, -1)
    x = _cols(x)                                              # (n, G)
    zero = mx.abs() < GROUP_MAX_EPS
    mxs = torch.where(zero, torch.ones_like(mx), mx)
    w = x * x if w is None else _cols(w)
    wx = w * x
    wl = torch.empty_like(x)

    def attempt(iscale):
        l = _nearest_clamped(iscale * x, -nmax, nmax - 1)
        lf = l.to(F32)
        sumlx = colsum(torch.mul(wx, lf, out=wl))
        return l, sumlx, colsum(torch.mul(w, lf, out=wl).mul_(lf))

    l, sumlx, suml2 = attempt(rdiv(-nmax, mxs))
    L = l + nmax
    scale = torch.where(suml2 != 0, sumlx / safe(suml2, suml2 != 0), torch.zeros_like(suml2))
    best = scale * sumlx
    for step in [s for s in range(-9, 10) if s]:
        l, sumlx, suml2 = attempt(-(nmax + f32(0.1) * step) / mxs)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new_scale = sumlx / safe(suml2, suml2 > 0)
        L = torch.where(better, l + nmax, L)
        scale = torch.where(better, new_scale, scale)
        best = torch.where(better, new_scale * sumlx, best)
    scale = torch.where(zero, torch.zeros_like(scale), scale).reshape(-1, 1)
    return scale, torch.where(zero, torch.zeros_like(L), L).t().contiguous()


def _descend(x, w, L, sumlx, suml2, lo: int, hi: int, need_sl2: bool):
    """The 5 rounds of coordinate descent of make_q3_quants (need_sl2 False) and make_qp_quants (True):
    each position in turn takes the code that best fits the others' scale, if that lowers the error."""
    wx = w * x
    for _ in range(5):
        for i in range(x.shape[-1]):
            wi, xi, wxi = w[:, i:i + 1], x[:, i:i + 1], wx[:, i:i + 1]
            li = L[:, i:i + 1]
            lf = li.to(F32)
            slx = sumlx - wxi * lf
            sl2 = suml2 - wi * lf * lf
            go = (slx > 0) & (sl2 > 0) if need_sl2 else slx > 0
            new = nearest_int(xi * sl2 / safe(slx, go)).clamp(lo, hi)
            nf = new.to(F32)
            slx = slx + wxi * nf
            sl2 = sl2 + wi * nf * nf
            take = go & (new != li) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            if not need_sl2:
                take = take & (sl2 > 0)
            L[:, i:i + 1] = torch.where(take, new, li)
            sumlx = torch.where(take, slx, sumlx)
            suml2 = torch.where(take, sl2, suml2)
    return L, sumlx, suml2


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_q3_quants(do_rmse=true) on every row of x (G, n): (scale (G,1), L (G,n) int32, offset by nmax)."""
    mx = absmax_signed(x)
    zero = mx.abs() < GROUP_MAX_EPS
    iscale = rdiv(-nmax, torch.where(zero, torch.ones_like(mx), mx))
    L = nearest_int(iscale * x).clamp(-nmax, nmax - 1)
    w = x * x
    lf = L.to(F32)
    sumlx, suml2 = seqsum(w * x * lf), seqsum(w * lf * lf)
    L, sumlx, suml2 = _descend(x, w, L, sumlx, suml2, -nmax, nmax - 1, need_sl2=False)
    scale = torch.where(suml2 > 0, sumlx / safe(suml2, suml2 > 0), torch.zeros_like(suml2))
    return (torch.where(zero, torch.zeros_like(scale), scale),
            torch.where(zero, torch.zeros_like(L), L + nmax))


def make_qp_quants(x: torch.Tensor, nmax: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qp_quants on every row of x (G, n) >= 0 with weights w: (scale (G,1), L (G,n) int32)."""
    mx = positive(x.amax(-1, keepdim=True))
    zero = mx < GROUP_MAX_EPS
    mxs = torch.where(zero, torch.ones_like(mx), mx)
    iscale = rdiv(nmax, mxs)
    scale = 1 / iscale
    d = x - scale * nearest_int(iscale * x).to(F32)
    best = seqsum(w * d * d)
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        iscale_is = (f32(0.1) * step + nmax) / mxs
        scale_is = 1 / iscale_is
        d = x - scale_is * nearest_int(iscale_is * x).clamp(max=nmax).to(F32)
        mse = seqsum(w * d * d)
        better = mse < best
        best = torch.where(better, mse, best)
        iscale = torch.where(better, iscale_is, iscale)
    L = nearest_int(iscale * x).clamp(max=nmax)
    lf = L.to(F32)
    sumlx, suml2 = seqsum(w * x * lf), seqsum(w * lf * lf)
    L, sumlx, suml2 = _descend(x, w, L, sumlx, suml2, -(1 << 30), nmax, need_sl2=True)
    scale = torch.where(suml2 > 0, sumlx / safe(suml2, suml2 > 0), torch.zeros_like(suml2))
    return torch.where(zero, torch.zeros_like(scale), scale), torch.where(zero, torch.zeros_like(L), L)


IQ4NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def best_index_iq4(v: torch.Tensor) -> torch.Tensor:
    """best_index_int8(16, kvalues_iq4nl, v): the index of the grid value nearest v, the upper on a tie.

    That is the number of midpoints between neighbours at or below v: near a midpoint both of the C
    code's differences (v - lower, upper - v) are exact in float32 (they lie in the binade of v or below),
    so its float comparison is the exact one, which the (exact, half-integer) midpoints make. Twice each
    midpoint is an integer, so that count is a table lookup at floor(2v) (`best_index_iq4_ref`: the search)."""
    k = torch.nan_to_num(v * 2, nan=512.0).floor_().clamp_(-256, 255).to(torch.int64).add_(256)
    return _iq4_counts(v.device)[k]


def _iq4_counts(device) -> torch.Tensor:
    """(512,) int64: entry k + 256 = the number of IQ4_NL midpoints m with 2m <= k."""
    vals = torch.tensor(IQ4NL_VALUES, dtype=F32)
    twice = vals[:-1] + vals[1:]                                     # 2 * midpoints, exact integers
    return (twice[None, :] <= torch.arange(-256, 256, dtype=F32)[:, None]).sum(-1).to(device)


def best_index_iq4_ref(v: torch.Tensor) -> torch.Tensor:
    """best_index_iq4 as a binary search over the midpoints (its slow twin)."""
    vals = torch.tensor(IQ4NL_VALUES, dtype=F32, device=v.device)
    return torch.searchsorted((vals[:-1] + vals[1:]) / 2, v.contiguous(), right=True)
