"""Which kernel multiplies activations by a quantized weight, and how it launches: every routing decision.

Owns: the kernels' launch configs (`GemvConfig`, `Q8Config`, `MmaConfig`, `DequantConfig`), `Plan`, and
`plan(qtype, rows, n, k, dtype, policy)`, which picks one from shapes alone, with every threshold and measured
table behind the choice (benchmarks launch other configs through the same functions).
Not: the kernels (gemv.py, gemv_int8.py, mma.py, dequant.py launch exactly the config given), running a plan
(linear.run), the switches (kiln/policy.py), attention and CPU kernels (ops/, quant/cpu.py).

The kinds, for x (M, K) times a packed (N, K) weight on a device the Triton kernels serve:
  gemv_int8  M = 1, 16-bit x, INT8_FORMATS, policy.int8: x quantized to int8 per 32, dp4a (decode);
  gemm_int8  2 <= M <= gemv_max_rows likewise (a server's batched decode step; Q6_K: dequant from 2 rows);
  gemv       M <= gemv_max_rows otherwise: the float GEMV (float32 x, IQ4, int8 off; tl.dot tiles for
             M >= 2 in 16-bit x);
  mma        9..32 rows where the tensor-core table measured it faster (output heads, wide matrices);
  dequant    anything else: dequantize into an x.dtype scratch, then cuBLAS (prefill);
  reference  where the kernels do not serve x's device: the plain torch dequantization, then a matmul.
A plan depends on shapes, dtype, policy and SM count only — never on data — so a decode step can be captured
in a CUDA graph; `plan` is cached (the eager batched step and prefill ask per layer and call).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from kiln.policy import DEFAULT, Policy
from kiln.quant.packed import (FORMATS, IQ4_NL, IQ4_XS, Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K,
                               Q8_0, V)


# ---------------------------------------------------------------- launch configs (what each kernel is told)

@dataclass(frozen=True)
class GemvConfig:
    """The float GEMV (gemv.py): rows per program, weights per row per K step, warps, K splits, tl.dot."""

    block_n: int = 32
    block_k: int = 256       # a multiple of the format's V*G (32; 64 for Q2_K/Q3_K; 16 for Q8_0)
    num_warps: int = 4
    split_k: int = 1         # >= 1 at launch; 0 only in a partial config, for `float_config` to pick
    dot: bool = False        # dense tiles in x's dtype through tl.dot (x padded to 16 rows)
    num_stages: int | None = None   # None: Triton's default

    def __post_init__(self):
        for name in ("block_n", "block_k"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"GemvConfig.{name} must be a power of two, got {v}")


@dataclass(frozen=True)
class Q8Config:
    """The int8-activation kernels (gemv_int8.py): weight rows per program, packed words per row per K step
    (the whole row when it fits), warps; no split-K."""

    block_n: int = 4
    words: int = 2048
    num_warps: int = 4
    num_stages: int | None = None


@dataclass(frozen=True)
class MmaConfig:
    """The tensor-core kernel (mma.py): weight rows per program, words per K step, warps, pipeline stages,
    K splits (0 only in a partial config: `mma_launch` picks)."""

    block_n: int = 64
    words: int = 32
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 0
    natural: bool = False    # all fields of a step permuted back to weight order, one product per step


@dataclass(frozen=True)
class DequantConfig:
    """The dequantization kernel (dequant.py): rows and weights per program, warps."""

    block_n: int = 16
    block_k: int = 256
    num_warps: int = 4


@dataclass(frozen=True)
class Plan:
    """One matmul's route: `kind` (gemv_int8, gemm_int8, gemv, mma, dequant or reference) and the config its
    kernel launches with (None for reference)."""

    kind: str
    config: GemvConfig | Q8Config | MmaConfig | DequantConfig | None = None


# ---------------------------------------------------------------- thresholds and tables

# Activation rows the GEMVs take; more go through dequantize + cuBLAS (or the tensor-core tiles). Measured
# in-graph on the H100 at Llama-3.2-1B's shapes (bench/results/2026-11-26-h100/int8_ab_batch.json): up to 8
# rows the int8 kernel beats dequantize + cuBLAS on Q4_K (16384x2048: 16.5 / 23.5 / 42.6 µs at 2 / 4 / 8 rows
# vs 62; the tl.dot tiles 43 / 47 / 57), from 16 rows dequantize + cuBLAS wins (62 vs 100); on Q6_K it wins
# from 2 rows (2048x8192: 31 µs vs 44 int8, 33 tl.dot) — `gemv_max_rows`.
MAX_GEMV_M = 8
MAX_INT8_M = 8   # rows the int8 route takes (its kernel takes up to 32)
MAX_MMA_M = 32   # rows the tensor-core kernel takes

# Formats the int8-activation GEMV takes (the code-book IQ4 formats would need a table lookup per weight).
INT8_FORMATS = frozenset({Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K})
# Formats the tensor-core kernel takes (codes of 4 + 0/1/2 bits or 8 bits, one scale per 16 or more).
MMA_FORMATS = frozenset({Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K})

# The float GEMV's table, chosen from instruction and register counts of the compiled sm_90 code (timings:
# bench/gpu_quant_check.py). One row: 64 rows per program gives each thread 4 rows that share its
# activation loads; Q8_0 (more registers per row) and the code-book formats (a gather per weight) get
# fewer. 2..8 rows: tl.dot tiles in x's dtype (the FMA form costs M FMAs per weight); float32 x has no
# tensor-core form (input_precision="ieee" spills registers), so it keeps the FMA form at 16 rows.
_M1_WIDE = GemvConfig(block_n=64, block_k=256, num_warps=4, split_k=0)
_M1_NARROW = GemvConfig(block_n=32, block_k=256, num_warps=4, split_k=0)
_MX = GemvConfig(block_n=32, block_k=256, num_warps=4, split_k=0, dot=True)
_MX_F32 = GemvConfig(block_n=16, block_k=256, num_warps=4, split_k=0)
_NARROW_FORMATS = frozenset({Q8_0, IQ4_NL, IQ4_XS})

# The int8 GEMV: the most weights per row per step. Measured in-graph on an H200 (bench/int8_ab.py,
# bench/results/2026-11-26-h200/): 4 rows per program and whole rows up to 16384 weights per step were
# within ~5% of the best of a 24-config grid at every decode shape of Qwen3-0.6B, Llama-3.2-1B and Qwen3-8B
# but two (8B's Q6_K down projection: 18.5 vs 15.7 µs; 0.6B's gate/up: 3.8 vs 3.5 µs); `q8_table`
# refines the rows per program and warps by shape.
_Q8_BLOCK_K = 16384

_TARGET_PROGRAMS_PER_SM = 4  # split-K and `float_config`'s shrinking aim for at least this many programs per SM


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_at_least(v: int) -> int:
    return 1 << max(0, v - 1).bit_length()


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 4 for the Triton interpreter (any small number)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def gemv_max_rows(qtype: int, dtype: torch.dtype) -> int:
    """The most activation rows a GEMV takes rather than the tensor-core tiles or dequantize + cuBLAS
    (measurements at MAX_GEMV_M): 1 for Q6_K with 16-bit x, MAX_GEMV_M otherwise."""
    return 1 if qtype == Q6_K and dtype != torch.float32 else MAX_GEMV_M


def auto_split_k(n_programs: int, n_steps: int, sms: int) -> int:
    """Double split-K while the grid is short of the target and each split keeps >= 2 K steps."""
    s = 1
    while n_programs * s < _TARGET_PROGRAMS_PER_SM * sms and n_steps >= 4 * s:
        s *= 2
    return s


def _splits(split_k: int, grid_n: int, n_steps: int, sms: int) -> int:
    """K splits of a launch: the config's (0: `auto_split_k`), at most one per K step."""
    return max(1, min(split_k or auto_split_k(grid_n, n_steps, sms), n_steps))


def shrink(cfg: GemvConfig, n: int, k: int, sms: int) -> GemvConfig:
    """A table config with fewer rows per program for small matrices, so that they still fill the SMs where
    split-K alone cannot (it keeps >= 2 K steps per split)."""
    bn, most_splits = cfg.block_n, max(1, _cdiv(k, cfg.block_k) // 2)
    while bn > 16 and _cdiv(n, bn) * most_splits < _TARGET_PROGRAMS_PER_SM * sms:
        bn //= 2
    return cfg if bn == cfg.block_n else replace(cfg, block_n=bn)


def float_config(cfg: GemvConfig, qtype: int, n: int, k: int, rows: int, sms: int) -> GemvConfig:
    """A (possibly partial) float GEMV config made launchable for rows x an (n, k) weight: tl.dot only for
    2+ rows, split-K picked where it is 0, 8 warps for 32-row tl.dot tiles (they keep Q6_K / Q8_0 under
    ~100 registers; ~170 with 4, ptxas)."""
    fmt = FORMATS[qtype]
    n_steps = _cdiv(k // fmt.g, cfg.block_k // fmt.g)
    dot = cfg.dot and rows > 1
    mx = max(16, _pow2_at_least(rows)) if dot else _pow2_at_least(rows)
    warps = max(cfg.num_warps, 8) if dot and mx >= 32 else cfg.num_warps
    return replace(cfg, dot=dot, num_warps=warps, split_k=_splits(cfg.split_k, _cdiv(n, cfg.block_n), n_steps, sms))


def float_table(qtype: int, rows: int, dtype: torch.dtype) -> GemvConfig:
    """The float GEMV's table entry (split_k 0: a partial config) before `float_config` and shrinking."""
    if rows == 1:
        return _M1_NARROW if qtype in _NARROW_FORMATS else _M1_WIDE
    return _MX_F32 if dtype == torch.float32 else _MX


def q8_table(qtype: int, n: int, k: int) -> tuple[int, int]:
    """(rows per program, warps) of the one-row int8 GEMV by shape, from in-graph sweeps (bench/gemv_ncu.py,
    bench/int8_ab.py; rotating weights, PDL on; H100). At K <= 2048 a Q4_K / Q6_K program of 4 warps spends more
    on its cross-warp sums than on its few weights: one warp of 4 rows at K <= 1024 up to 8192 rows, of 2 rows at
    K <= 2048 below 6144 rows (0.6B q+k 3072 x 1024: 1.35 vs 2.12 µs at 4 rows / 4 warps, its o 1024 x 2048 1.42
    vs 2.07, 1B q+k 2560 x 2048 1.95 vs 3.27, 1B o 2048 x 2048 1.63 vs 2.93; 2026-12-07-h100-f/sweep_small/),
    8 rows of 2 warps above (1B gate/up 16384 x 2048 7.02 vs 8.51, 1B output head 72.5 vs 90.9, 0.6B output head
    43.1 vs 49.2; 2026-12-07-h100-e/call3/). Q6_K's extra high-bit work favours one row per program at n <= 1024
    from K 3072 (0.6B down 1024 x 3072 2.14 vs 2.50, 8B v 2.23 vs 2.66) and at K >= 12288 (8B down 15.2 vs
    18.9), four rows below 8k rows otherwise (1B down 2048 x 8192: 5.92 vs 6.94), 8 for an output head of K >=
    4096 (2026-11-26-h100/int8_ab_8b.json: 170 vs 195 µs). Q4_K favours 8 rows from 5120 rows of K 4096..8192
    (4.4 vs 4.8 µs, 20.3 vs 20.6). Everything else: 4 rows, 4 warps."""
    if qtype in (Q4_K, Q6_K) and k <= 2048:
        if n > 8192 or (k > 1024 and n >= 6144):
            return 8, 2
        return (4 if k <= 1024 else 2), 1
    if qtype == Q6_K and k >= 3072 and n <= 1024:
        return 1, 4
    if qtype == Q6_K and k >= 4096:
        return 1 if n <= 8192 and k >= 12288 else 8 if n > 65536 else 4, 4
    if qtype == Q4_K and n >= 5120 and 4096 <= k <= 8192:
        return 8, 4
    return 4, 4


def q8_config(qtype: int, n: int, k: int, sms: int, block_n: int, block_k: int = _Q8_BLOCK_K,
              num_warps: int = 4, num_stages: int | None = None) -> Q8Config:
    """The one-row int8 GEMV's launch for an (n, k) weight: at most block_n rows per program (fewer while
    the grid is short of 2 programs per SM: there is no split-K), the whole row in one step when it fits
    block_k weights."""
    fmt = FORMATS[qtype]
    words = min(_pow2_at_least(k // fmt.g), max(V, block_k // fmt.g))
    bn = block_n
    while bn > 1 and _cdiv(n, bn) < 2 * sms:
        bn //= 2
    return Q8Config(block_n=bn, words=words, num_warps=num_warps, num_stages=num_stages)


def q8_rows_config(qtype: int, k: int, rows: int) -> Q8Config:
    """The int8 kernel for 2..32 rows: 8 weight rows per program, 64 words per K step (32 from 16 activation
    rows, which also take 8 warps, to bound the (rows, activation rows, groups, V) tiles in registers); 2 rows
    take 256 words (H200, Qwen3-8B shapes, bench/results/2026-12-04-h200-c/int8_ab.json: Q4_K 4096x4096 7.1 µs
    vs 17.9 at 64, 4096x12288 19.5 vs 50.4, 5120x4096 10.9 vs 18.2, 24576x4096 39.6 vs 45.1; within 17% of
    the best of the grid on each; at 5 rows no config of the grid came near one row's cost)."""
    mx = _pow2_at_least(rows)
    words = min(_pow2_at_least(k // FORMATS[qtype].g), 256 if mx <= 2 else 64 if mx <= 8 else 32)
    return Q8Config(block_n=8, words=words, num_warps=4 if mx <= 8 else 8)


def mma_config(qtype: int, n: int, k: int, rows: int, dtype: torch.dtype,
               policy: Policy = DEFAULT) -> MmaConfig | None:
    """The tensor-core kernel's table entry for an (n, k) weight and rows of x, where it beat dequantize +
    cuBLAS in-graph on the H100 (bench/int8_ab.py mma step, bench/results/2026-11-26-h100-b/): on output
    heads in weight order (`natural`; Q6_K 128256x2048: 369 µs vs 500 at 32 rows, 357 vs 501 at 16) and on
    Llama-3.2-1B's gate/up up to 16 rows, per field (Q4_K 16384x2048: 47 µs vs 62; Llama-3.1-8B's
    28672x4096 was slower, 249 vs 215, hence k <= 2048). Elsewhere dequantize + cuBLAS was as fast or
    faster (Q4_K 2048x2048: 11.8 µs vs 10.6; Q6_K 2048x8192: 40 vs 32 at 32 rows); None there, and under
    policy.mma off. split_k is 0 (picked by `mma_launch`)."""
    if not policy.mma or qtype not in MMA_FORMATS or dtype not in (torch.float16, torch.bfloat16) \
            or not MAX_GEMV_M < rows <= MAX_MMA_M:
        return None
    if n >= 65536:
        return MmaConfig(block_n=32, words=32 if rows > 16 else 16, num_warps=4, num_stages=3, natural=True)
    if 16384 <= n < 65536 and k <= 2048 and rows <= 16:
        return MmaConfig(block_n=128, words=32, num_warps=4, num_stages=3)
    return None


def mma_launch(cfg: MmaConfig, qtype: int, n: int, k: int, sms: int) -> MmaConfig:
    """A tensor-core config with its K splits picked (split_k 0: `auto_split_k`), at most one per K step."""
    n_steps = _cdiv(k // FORMATS[qtype].g, cfg.words)
    return replace(cfg, split_k=_splits(cfg.split_k, _cdiv(n, cfg.block_n), n_steps, sms))


# ---------------------------------------------------------------- the decision

@functools.lru_cache(maxsize=4096)
def plan(qtype: int, rows: int, n: int, k: int, dtype: torch.dtype, policy: Policy = DEFAULT, *,
         sms: int = 4, triton: bool = True) -> Plan:
    """The kernel and launch config for x (rows, k) in dtype times a packed (n, k) weight of GGUF type
    qtype, on a device with `sms` SMs; `triton`: do the kernels serve that device (else the reference)."""
    if not triton:
        return Plan("reference")
    int8 = qtype in INT8_FORMATS and policy.int8 and dtype != torch.float32  # float32 x stays exact
    if 1 <= rows <= gemv_max_rows(qtype, dtype):
        if int8 and rows == 1:
            rows_per, warps = q8_table(qtype, n, k)
            return Plan("gemv_int8", q8_config(qtype, n, k, sms, rows_per, num_warps=warps))
        if int8 and rows <= MAX_INT8_M:
            return Plan("gemm_int8", q8_rows_config(qtype, k, rows))
        table = shrink(float_table(qtype, rows, dtype), n, k, sms)
        return Plan("gemv", float_config(table, qtype, n, k, rows, sms))
    mma = mma_config(qtype, n, k, rows, dtype, policy)
    if mma is not None:
        return Plan("mma", mma_launch(mma, qtype, n, k, sms))
    return Plan("dequant", DequantConfig())
