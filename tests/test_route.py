"""kiln.quant.route: the one place that decides which matmul kernel runs, against its documented rules.

Owns: for a grid of formats, row counts, shapes, dtypes, policies and SM counts, `plan`'s kind against the
rules as route.py's docstrings state them (written out again here, independently of the code), every plan's
config checked launchable and within its table (split-K picked and at most one split per K step, tl.dot
only for 2+ rows of 16-bit x, the int8 GEMV's rows per program halved only while the grid is short), the
measured table entries (tensor-core heads and gate/up, the int8 GEMV's rows by shape, the rows each path
takes), split-K and shrinking, the policy's switches, and that plans are cached.
Not: the kernels' arithmetic or QuantLinear running a plan (test_quant_kernels.py), speed (bench/).
Plain Python: no Triton here.
"""

import itertools

import pytest
import torch

from kiln.policy import Policy
from kiln.quant import packed as P
from kiln.quant import route as R
from kiln.quant.route import DequantConfig, GemvConfig, MmaConfig, Plan

HALF, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
POLICIES = [Policy(int8=i, mma=m) for i, m in itertools.product((True, False), repeat=2)]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2(v: int) -> int:
    p = 1
    while p < v:
        p *= 2
    return p


def expected_kind(qtype: int, rows: int, n: int, k: int, dtype: torch.dtype, policy: Policy) -> str:
    """The routing rules as documented (route.py, README's GPU section)."""
    sixteen = dtype in (HALF, BF16)
    gemv_rows = 1 if qtype == P.Q6_K and sixteen else 8
    int8 = policy.int8 and sixteen and qtype not in (P.IQ4_NL, P.IQ4_XS)
    if 1 <= rows <= gemv_rows:
        return ("gemv_int8" if rows == 1 else "gemm_int8") if int8 else "gemv"
    mma_formats = {P.Q4_0, P.Q4_1, P.Q5_0, P.Q5_1, P.Q8_0, P.Q4_K, P.Q5_K, P.Q6_K}
    if policy.mma and sixteen and qtype in mma_formats and 8 < rows <= 32:
        head = n >= 65536
        gate_up = 16384 <= n < 65536 and k <= 2048 and rows <= 16
        if head or gate_up:
            return "mma"
    return "dequant"


def q8_table(qtype: int, n: int, k: int) -> tuple[int, int]:
    """The int8 GEMV's measured rows per program and warps (route.q8_table's docstring)."""
    if qtype in (P.Q4_K, P.Q6_K) and k <= 2048:
        small = n <= 8192 if k <= 1024 else n < 6144
        return (4 if k <= 1024 else 2, 1) if small else (8, 2)
    if qtype == P.Q6_K and n <= 1024 and k >= 3072:
        return 1, 4
    if qtype == P.Q6_K and k >= 4096:
        return (1 if n <= 8192 and k >= 12288 else 8 if n > 65536 else 4), 4
    return (8 if qtype == P.Q4_K and n >= 5120 and 4096 <= k <= 8192 else 4), 4


def check_config(plan: Plan, qtype: int, rows: int, n: int, k: int, dtype: torch.dtype, sms: int) -> None:
    """The plan's config is fully specified and follows its table."""
    fmt, cfg = P.FORMATS[qtype], plan.config
    kw = k // fmt.g
    if plan.kind == "gemv":
        assert cfg.block_k % (P.V * fmt.g) == 0 and cfg.num_warps == 4 and cfg.num_stages is None
        assert 1 <= cfg.split_k <= cdiv(k, cfg.block_k)
        assert cfg.dot == (rows >= 2 and dtype != F32)
        widest = 64 if rows == 1 and qtype not in (P.Q8_0, P.IQ4_NL, P.IQ4_XS) else 16 if rows > 1 and dtype == F32 \
            else 32
        assert cfg.block_n == widest or 16 <= cfg.block_n < widest  # shrunk only down to 16
    elif plan.kind == "gemv_int8":
        table, warps = q8_table(qtype, n, k)
        assert cfg.words == min(pow2(kw), 16384 // fmt.g) and cfg.num_warps == warps
        assert 1 <= cfg.block_n <= table and cfg.block_n & (cfg.block_n - 1) == 0
        if cfg.block_n < table:  # halved only while the grid was short of 2 programs per SM
            assert cdiv(n, 2 * cfg.block_n) < 2 * sms
        if cfg.block_n > 1:
            assert cdiv(n, cfg.block_n) >= 2 * sms
    elif plan.kind == "gemm_int8":
        assert cfg == R.Q8Config(block_n=8, words=min(pow2(kw), 256 if rows <= 2 else 64), num_warps=4)
    elif plan.kind == "mma":
        assert cfg.natural == (n >= 65536) and 1 <= cfg.split_k <= cdiv(kw, cfg.words)
        assert cfg.block_n == (32 if cfg.natural else 128)
    elif plan.kind == "dequant":
        assert cfg == DequantConfig()


GRID_ROWS = [1, 2, 3, 8, 9, 16, 17, 32, 33, 512]
GRID_N = [256, 1024, 2048, 8193, 16384, 28672, 65536, 128256]
GRID_K = [256, 896, 2048, 4096, 12288]


@pytest.mark.parametrize("qtype", list(P.FORMATS), ids=[f.name for f in P.FORMATS.values()])
def test_plan_follows_the_documented_rules(qtype):
    block = P.FORMATS[qtype].block
    for rows, n, k, dtype, policy, sms in itertools.product(GRID_ROWS, GRID_N, GRID_K, (F32, HALF, BF16),
                                                            POLICIES, (4, 132)):
        if k % block:
            continue
        plan = R.plan(qtype, rows, n, k, dtype, policy, sms=sms)
        assert plan.kind == expected_kind(qtype, rows, n, k, dtype, policy), (rows, n, k, dtype, policy)
        check_config(plan, qtype, rows, n, k, dtype, sms)


def test_plan_is_cached_and_reference_where_the_kernels_do_not_serve():
    args = (P.Q4_K, 1, 1024, 1024, BF16, Policy())
    assert R.plan(*args, sms=132) is R.plan(*args, sms=132)
    assert R.plan(*args, sms=132, triton=False) == Plan("reference")
    assert R.plan(*args, sms=132) != R.plan(*args, sms=4)  # the SM count shapes the launch


def test_int8_path_is_taken_only_for_16_bit_rows_of_its_formats():
    kind = lambda q, rows, dtype, policy=Policy(): R.plan(q, rows, 8, 256, dtype, policy, sms=132).kind  # noqa: E731
    assert kind(P.Q4_K, 1, BF16) == kind(P.Q4_K, 1, HALF) == "gemv_int8"
    assert kind(P.Q4_K, 1, F32) == "gemv"                      # float32 stays exact
    assert kind(P.Q4_K, 2, BF16) == kind(P.Q4_K, 8, BF16) == "gemm_int8"
    assert kind(P.Q4_K, 2, F32) == "gemv"
    assert kind(P.IQ4_XS, 1, BF16) == "gemv"                   # code-book format: float path
    assert kind(P.Q4_K, 1, BF16, Policy(int8=False)) == "gemv"  # KILN_INT8=0
    assert kind(P.Q6_K, 2, BF16) == "dequant" and kind(P.Q6_K, 2, F32) == "gemv"
    assert R.gemv_max_rows(P.Q6_K, BF16) == 1 and R.gemv_max_rows(P.Q4_K, BF16) == 8
    assert R.gemv_max_rows(P.Q6_K, F32) == 8


def test_int8_gemv_rows_per_program():
    assert R.q8_table(P.Q6_K, 4096, 12288) == (1, 4) and R.q8_table(P.Q6_K, 151936, 4096) == (8, 4)
    assert R.q8_table(P.Q6_K, 1024, 4096) == (1, 4) and R.q8_table(P.Q6_K, 2048, 8192) == (4, 4)
    assert R.q8_table(P.Q4_K, 24576, 4096) == (8, 4) and R.q8_table(P.Q4_K, 4096, 4096) == (4, 4)
    assert R.q8_table(P.Q4_K, 16384, 2048) == (8, 2) and R.q8_table(P.Q6_K, 128256, 2048) == (8, 2)
    assert R.q8_table(P.Q4_K, 2048, 2048) == (2, 1) and R.q8_table(P.Q8_0, 16384, 2048) == (4, 4)
    assert R.q8_table(P.Q4_K, 6144, 1024) == (4, 1) and R.q8_table(P.Q4_K, 6144, 2048) == (8, 2)
    assert R.q8_table(P.Q6_K, 1024, 3072) == (1, 4) and R.q8_table(P.Q4_K, 1024, 3072) == (4, 4)
    for q, n, k in itertools.product(sorted(R.INT8_FORMATS), GRID_N + [3072, 5120, 6144, 8192, 65537],
                                     GRID_K + [1024, 1536, 3072, 8192, 8448]):
        assert R.q8_table(q, n, k) == q8_table(q, n, k), (q, n, k)
    plan = R.plan(P.Q6_K, 1, 151936, 1024, BF16, sms=132)
    assert (plan.config.block_n, plan.config.num_warps) == (8, 2)  # a small model's output head
    cfg = R.q8_config(P.Q4_K, 1024, 1024, 132, block_n=8, block_k=4096)
    assert (cfg.block_n, cfg.words) == (2, 128)                # small N: fewer rows per program, no split-K
    assert R.plan(P.Q4_K, 1, 24576, 4096, BF16, sms=132).config == R.Q8Config(block_n=8, words=512)
    assert R.q8_rows_config(P.Q4_K, 2048, 16) == R.Q8Config(block_n=8, words=32, num_warps=8)


def test_tensor_core_table():
    """mma_config picks the tensor-core kernel only where it was measured faster (output heads, Llama-1B's
    gate/up up to 16 rows), for 16-bit x and its formats, and never under policy.mma off."""
    assert R.mma_config(P.Q6_K, 128256, 2048, 32, HALF).natural
    assert R.mma_config(P.Q6_K, 128256, 2048, 16, HALF).natural
    assert R.mma_config(P.Q4_K, 16384, 2048, 16, HALF) is not None
    assert R.mma_config(P.Q4_K, 2048, 2048, 32, HALF) is None
    assert R.mma_config(P.Q4_K, 28672, 4096, 16, HALF) is None
    assert R.mma_config(P.Q4_K, 16384, 2048, 16, F32) is None
    assert R.mma_config(P.Q4_K, 16384, 2048, 8, HALF) is None  # the GEMV's rows
    assert R.mma_config(P.IQ4_XS, 128256, 2048, 32, HALF) is None
    assert R.mma_config(P.Q6_K, 128256, 2048, 32, HALF, Policy(mma=False)) is None
    assert R.plan(P.Q6_K, 32, 128256, 2048, HALF, Policy(mma=False), sms=132).kind == "dequant"
    cfg = R.plan(P.Q6_K, 32, 128256, 2048, HALF, sms=132).config
    assert cfg == R.mma_launch(MmaConfig(block_n=32, words=32, natural=True), P.Q6_K, 128256, 2048, 132)


def test_float_table_and_shrinking():
    assert not R.float_table(P.Q4_K, 1, BF16).dot and R.float_table(P.Q4_K, 4, BF16).dot
    assert not R.float_table(P.Q4_K, 4, F32).dot  # no tensor-core form in float32
    assert R.shrink(GemvConfig(block_n=64), n=1024, k=3072, sms=132).block_n == 16   # small: more programs
    assert R.shrink(GemvConfig(block_n=64), n=14336, k=4096, sms=132).block_n == 64
    dot = R.float_config(GemvConfig(block_n=32, dot=True, split_k=3), P.Q4_K, 4096, 4096, 1, 132)
    assert not dot.dot and dot.split_k == 3        # one row: no tl.dot; an explicit split is kept
    assert R.float_config(GemvConfig(dot=True), P.Q6_K, 64, 256, 32, 4).num_warps == 8  # 32-row tiles


def test_auto_split_k_fills_the_machine_but_keeps_work_per_split():
    assert R.auto_split_k(n_programs=4096, n_steps=16, sms=132) == 1       # plenty of programs
    assert R.auto_split_k(n_programs=64, n_steps=12, sms=132) == 4         # 3 K steps per split
    assert R.auto_split_k(n_programs=64, n_steps=6, sms=132) == 2          # never under 2 per split
    assert R.auto_split_k(n_programs=256, n_steps=56, sms=132) == 4        # 4096 x 14336, block_n 16
    assert R.auto_split_k(n_programs=1, n_steps=1, sms=132) == 1
