"""The quantized matmul kernels (kiln.quant packed, gemv, gemv_int8, mma, dequant) and kiln.quant.linear:
quantized weights kept packed, against the torch dequantizers.

Owns: for every kernel format (Q4_0 … IQ4_XS), on random valid blocks: the repack round trip
(`dequantize_ref(repack(raw))` bit-identical to `kiln.quant.dequantize(raw)`, and within 1.05x of the
file's bytes), `dequantize_gpu` bit-identical in float32 and float16, the float `gemv` against `x @ W.T`
in float32 (M = 1, 3, 8; launch-config variants: split-K with bias, the tl.dot path, wide tiles, partial
row blocks and K steps) and in float16, the int8 kernels (`gemv_int8`, `gemm_int8`, `quantize_act`, the
norm / activation kernels' int8 stores), `gemm_mma` (9..32 rows on the tensor cores), QuantLinear running
the plan route.py makes (decode and prefill paths, the tensor-core route) and its CPU reference path,
swap_linears on a tiny model (tied head, permuted rows, a dense F16 weight left alone), and — on a GPU — a
CUDA-graph capture.
Not: the routing table itself (test_route.py), speed or real shapes (bench/gpu_quant_check.py), the GGUF
block formats themselves (test_quant.py).

Without a GPU the kernels run in Triton's interpreter: TRITON_INTERPRET must be set before triton is
imported (if another test module imported it first, this file re-runs itself in a fresh process), and
KILN_TRITON_CPU=1 routes CPU tensors to the kernels. The interpreter does not run bfloat16 faithfully, so
bfloat16 cases run on CUDA only.
"""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import kiln.quant as kq  # noqa: E402
from interpreter import late, rerun_in_fresh_process, triton_on_cpu  # noqa: E402,F401  (autouse fixture)
from kiln.errors import KilnError  # noqa: E402
from kiln.formats.gguf import GGUFTensor  # noqa: E402
from kiln.ops import use_triton  # noqa: E402
from kiln.policy import Policy  # noqa: E402
from kiln.quant import packed as K  # noqa: E402
from kiln.quant import route as R  # noqa: E402
from kiln.quant.dequant import dequantize_gpu  # noqa: E402
from kiln.quant.gemv import gemv  # noqa: E402
from kiln.quant.gemv_int8 import empty_act, gemm_int8, gemv_int8, quantize_act  # noqa: E402
from kiln.quant.linear import QuantEmbedding, QuantLinear, matmul, run, swap_linears  # noqa: E402
from kiln.quant.mma import gemm_mma  # noqa: E402
from kiln.quant.route import GemvConfig, MmaConfig, Plan  # noqa: E402
from kiln.quant.tiles import code_book  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
SMS = R.sm_count(torch.device(DEVICE))
LATE = late()
QTYPES = list(K.FORMATS)
IDS = [K.FORMATS[q].name for q in QTYPES]

# Byte offsets of the f16 scale fields in each block (as tests/test_quant.py): random bytes there could make
# inf/NaN scales.
F16_FIELDS = {K.Q4_0: [0], K.Q4_1: [0, 2], K.Q5_0: [0], K.Q5_1: [0, 2], K.Q8_0: [0], K.Q2_K: [80, 82],
              K.Q3_K: [108], K.Q4_K: [0, 2], K.Q5_K: [0, 2], K.Q6_K: [208], K.IQ4_NL: [0], K.IQ4_XS: [0]}


@pytest.mark.skipif(not LATE, reason="the interpreter is on in this process")
@pytest.mark.interpreted("file")
def test_in_a_fresh_process():
    rerun_in_fresh_process(__file__)


def random_rows(qtype: int, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Random raw bytes of an (n, k) tensor with finite f16 scales: (n, row_bytes) uint8."""
    fmt = K.FORMATS[qtype]
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (n * k // fmt.block, fmt.type_size), generator=g, dtype=torch.uint8)
    for off in F16_FIELDS[qtype]:
        # Magnitudes 1e-4..1, both signs, like real scales (and far from f16 overflow).
        mag = 10.0 ** (-4 * torch.rand(len(blocks), generator=g))
        scale = (torch.randn(len(blocks), generator=g) * mag).half()
        blocks[:, off:off + 2] = scale.view(torch.uint8).view(-1, 2)
    return blocks.view(n, -1)


def make(qtype: int, n: int, k: int, seed: int = 0):
    """(raw rows, PackedWeight on DEVICE, float32 reference weight on DEVICE) of a random (n, k) tensor."""
    raw = random_rows(qtype, n, k, seed)
    ref = kq.dequantize(raw.reshape(-1), qtype, (n, k))
    return raw, K.repack(raw.to(DEVICE), qtype, (n, k)), ref.to(DEVICE)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def k_for(qtype: int, tail: bool = False) -> int:
    """A row length: 512, or one that leaves a partial last K step (not a multiple of 256 / 512 weights)."""
    if not tail:
        return 512
    return 768 if K.FORMATS[qtype].block == 256 else 352


# ---------------------------------------------------------------- repack (plain torch)

@pytest.mark.parametrize("qtype", QTYPES, ids=IDS)
def test_repack_round_trip_is_bit_exact_and_small(qtype, monkeypatch):
    monkeypatch.setattr(K, "_REPACK_WEIGHTS", 3 * 512)  # rows repacked 3 at a time: the concat is tested too
    n, k = 7, 512
    raw = random_rows(qtype, n, k, seed=1)
    packed = K.repack(raw, qtype, (n, k))
    assert torch.equal(K.dequantize_ref(packed), kq.dequantize(raw.reshape(-1), qtype, (n, k)))
    assert packed.nbytes <= 1.05 * raw.numel()
    assert packed.nbytes == n * K.FORMATS[qtype].packed_bytes(k)
    assert all(t.dtype != torch.float16 for t in packed.planes().values())  # model.to(dtype) cannot touch them


def test_repack_rejects_bad_input():
    with pytest.raises(KilnError, match="no quantized GPU kernel"):
        K.repack(torch.zeros(2, 64, dtype=torch.uint8), 1, (2, 32))  # F16 stays dense
    with pytest.raises(KilnError, match="not a multiple of its block size 256"):
        K.repack(torch.zeros(2 * 144, dtype=torch.uint8), K.Q4_K, (2, 128))
    with pytest.raises(KilnError, match="needs 288 bytes"):
        K.repack(torch.zeros(287, dtype=torch.uint8), K.Q4_K, (2, 256))


# ---------------------------------------------------------------- kernels

@pytest.mark.parametrize("qtype", QTYPES, ids=IDS)
def test_dequantize_gpu_is_bit_exact(qtype):
    n, k = 20, k_for(qtype, tail=True)  # 20 rows: a partial row block; a partial K step
    raw, packed, ref = make(qtype, n, k, seed=2)
    assert torch.equal(dequantize_gpu(packed, torch.float32), ref)
    assert torch.equal(dequantize_gpu(packed, torch.float16), ref.half())


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("qtype", QTYPES, ids=IDS)
def test_gemv_matches_dequantized_matmul(qtype, m):
    n, k = 40, k_for(qtype)
    _, packed, ref = make(qtype, n, k, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEVICE)
    assert R.plan(qtype, m, n, k, x.dtype, sms=SMS).kind == "gemv"  # float32 x: the float GEMV's table
    y = matmul(x, packed)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert rel_err(y, x @ ref.T) < 1e-5


CONFIGS = {  # split_k 0: picked by route.float_config, as for the table's configs
    "split-k": GemvConfig(block_n=8, block_k=256, split_k=2),
    "split-k-4-bias": GemvConfig(block_n=4, block_k=128, split_k=4),
    "dot": GemvConfig(block_n=16, block_k=512, dot=True, split_k=0),
    "bn32": GemvConfig(block_n=32, block_k=512, split_k=0),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("qtype", [K.Q4_0, K.Q5_1, K.Q8_0, K.Q3_K, K.Q4_K, K.Q6_K, K.IQ4_XS],
                         ids=lambda q: K.FORMATS[q].name)
def test_gemv_config_variants(qtype, name):
    cfg = CONFIGS[name]
    n, k = 20, k_for(qtype, tail=True)
    _, packed, ref = make(qtype, n, k, seed=5)
    bias = torch.randn(n).to(DEVICE) if "bias" in name or name == "dot" else None
    for m in (1, 5):
        x = torch.randn(m, k).to(DEVICE)
        expected = x @ ref.T + (0 if bias is None else bias)
        assert rel_err(gemv(x, packed, bias, R.float_config(cfg, qtype, n, k, m, SMS)), expected) < 1e-5


def codes_times_scales(act) -> torch.Tensor:
    """A QuantAct's rows as the int8 GEMVs multiply them: codes x scales, (M, K) float64 on the CPU."""
    q = act.xq.cpu().view(torch.int8).reshape(act.m, -1, 4, 4).transpose(2, 3).reshape(act.m, -1).double()
    return q * act.xd.cpu().double().reshape(act.m, -1).repeat_interleave(32, dim=1)


@pytest.mark.parametrize("m", [2, 5, 16, 32])
@pytest.mark.parametrize("qtype", [K.Q4_K, K.Q6_K, K.Q8_0, K.Q5_0, K.Q3_K], ids=lambda q: K.FORMATS[q].name)
def test_batched_rows_int8_and_tensor_core_tiles(qtype, m):
    """A server's batched decode step, 2..32 rows of 16-bit x (not the prefill path's dequantized copy):
    the int8 kernel (the plan's up to 8 rows, Q6_K aside) — every row quantized, dp4a per row — exact on the
    quantized rows; the tl.dot tile path against x @ W.T. Partial row blocks included."""
    n, k = 40, k_for(qtype, tail=True)
    _, packed, ref = make(qtype, n, k, seed=m)
    bias = torch.randn(n).to(DEVICE)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEVICE, torch.float16)
    act = quantize_act(x)
    assert act.m == m and act.k == k
    y = gemm_int8(act, packed, bias, R.q8_rows_config(qtype, k, m))
    assert y.shape == (m, n) and y.dtype == torch.float16
    exact_q = (codes_times_scales(act) @ ref.double().cpu().T + bias.double().cpu()).to(DEVICE)
    assert rel_err(y, exact_q) < 1e-3
    plan = R.plan(qtype, m, n, k, x.dtype, sms=SMS)
    assert (plan.kind == "gemm_int8") == (m <= R.MAX_INT8_M and qtype != K.Q6_K)
    if plan.kind == "gemm_int8":
        assert torch.equal(run(plan, x, packed, bias), y)
    if m <= R.MAX_GEMV_M:
        cfg = R.float_config(GemvConfig(block_n=32, block_k=256, dot=True, split_k=0), qtype, n, k, m, SMS)
        assert rel_err(gemv(x, packed, bias, cfg), x.float() @ ref.T + bias) < 2e-3


MMA_TYPES = sorted(R.MMA_FORMATS)


@pytest.mark.parametrize("m", [9, 32])
@pytest.mark.parametrize("qtype", MMA_TYPES, ids=[K.FORMATS[q].name for q in MMA_TYPES])
def test_gemm_mma_matches_dequantized_matmul(qtype, m):
    """The tensor-core kernel for 9..32 rows against x @ W.T, per field and in weight order (`natural`):
    partial row blocks, a partial last K step, bias, with and without split-K (float16 here; bfloat16 on
    CUDA)."""
    n, k = 40, k_for(qtype, tail=True)
    _, packed, ref = make(qtype, n, k, seed=m)
    bias = torch.randn(n).to(DEVICE)
    for dtype in [torch.float16] + ([torch.bfloat16] if CUDA else []):
        x = (0.1 * torch.randn(m, k, generator=torch.Generator().manual_seed(m))).to(DEVICE, dtype)
        want = x.double() @ ref.double().T + bias.double()
        for cfg in (MmaConfig(block_n=16, words=16, split_k=1), MmaConfig(block_n=32, words=32, split_k=2),
                    MmaConfig(block_n=16, words=16, split_k=2, natural=True)):
            y = gemm_mma(x, packed, bias.to(dtype), cfg)
            assert y.shape == (m, n) and y.dtype == dtype
            assert rel_err(y, want) < (2e-3 if dtype == torch.float16 else 1e-2), (cfg, dtype)


def test_gemm_mma_rejects_what_it_cannot_take():
    _, packed, _ = make(K.Q4_K, 16, 256)
    cfg = MmaConfig(split_k=1)
    for x in (torch.randn(9, 256), torch.randn(33, 256).half(), torch.randn(9, 512).half()):
        with pytest.raises(ValueError, match="gemm_mma takes"):
            gemm_mma(x.to(DEVICE), packed, None, cfg)
    _, iq4, _ = make(K.IQ4_NL, 16, 256)
    with pytest.raises(ValueError, match="gemm_mma takes"):
        gemm_mma(torch.randn(9, 256).half().to(DEVICE), iq4, None, cfg)


def test_quant_linear_runs_the_tensor_core_plan(monkeypatch):
    """QuantLinear runs what route.plan says: given a tensor-core plan (the table picks it only at output
    heads' and wide matrices' sizes, too big for the interpreter: test_route.py), it takes it instead of
    dequantize + cuBLAS (which is made to fail here, so the route is certain)."""
    half = torch.float16
    n, k = 48, 512
    raw = random_rows(K.Q6_K, n, k, seed=3)
    lin = QuantLinear.from_gguf(raw, K.Q6_K, (n, k), bias=torch.randn(n), device=DEVICE)
    w = kq.dequantize(raw.reshape(-1), K.Q6_K, (n, k)).to(DEVICE)
    x = (0.1 * torch.randn(2, 6, k)).to(DEVICE, half)
    mma = Plan("mma", R.mma_launch(MmaConfig(block_n=16, words=32), K.Q6_K, n, k, SMS))
    monkeypatch.setattr(R, "plan", lambda *a, **kw: mma)

    def no_dequantize(*a, **kw):
        raise AssertionError("took dequantize + cuBLAS")
    monkeypatch.setattr("kiln.quant.linear.dequantize_gpu", no_dequantize)
    y = lin(x)
    assert y.shape == (2, 6, n) and y.dtype == half
    assert rel_err(y, F.linear(x.double(), w.double(), lin.bias.double())) < 2e-3


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if CUDA else []))
def test_gemv_half_precision_activations(dtype):
    _, packed, ref = make(K.Q4_K, 24, 512, seed=6)
    x = torch.randn(2, 512).to(DEVICE, dtype)
    cfg = R.float_config(R.float_table(K.Q4_K, 2, dtype), K.Q4_K, 24, 512, 2, SMS)  # tl.dot tiles (the plan's: int8)
    assert cfg.dot
    y = gemv(x, packed, None, cfg)
    assert y.dtype == dtype
    assert rel_err(y, x.float() @ ref.T) < (2e-3 if dtype == torch.float16 else 1e-2)


def act_ref(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's q8_1 rule in plain torch: per 32 values dx = max|x| / 127, q = round(x / dx) half away
    from zero -> (q, dx per value), both float64, (K,)."""
    xb = x.double().reshape(-1, 32)
    dx = xb.abs().amax(dim=1, keepdim=True) / 127
    q = torch.where(dx > 0, xb / torch.where(dx > 0, dx, 1), 0)
    q = torch.sign(q) * torch.floor(q.abs() + 0.5)
    return q.reshape(-1), dx.expand(-1, 32).reshape(-1)


def test_quantize_act_codes_scales_and_order():
    k = 256
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.float16)
    x[0, 32:64] = 0  # an all-zero block: scale 0, codes 0
    a = quantize_act(x)
    q, dx = act_ref(x.float().cpu())
    # word 4r + j of run r holds values 16r + j + 4t in its bytes t (the weights' byte lanes)
    got = a.xq.cpu().view(torch.int8).reshape(-1, 4, 4).transpose(1, 2).reshape(-1).double()
    assert torch.equal(got, q)
    assert torch.allclose(a.xd.cpu().double(), dx[::32], rtol=1e-6, atol=0)
    assert torch.equal(a.xs.cpu().double(), q.reshape(-1, 16).sum(1))
    assert a.dtype == torch.float16 and a.k == k


@pytest.mark.parametrize("op", ["norm", "norm-residual", "norm-offset", "silu", "gelu"])
def test_producer_kernels_store_the_same_int8_codes(op):
    """RMSNorm and the gated activations, given a QuantAct's buffers, store exactly what quantize_act makes
    of their output (one launch instead of two in a decode step)."""
    from kiln.ops import gelu_tanh_mul, rms_norm, silu_mul
    g = torch.Generator().manual_seed(4)
    e = 1056  # > the activation kernel's 1024-wide programs, a multiple of 32
    x = torch.randn(1, e, generator=g).to(DEVICE, torch.float16)
    a = empty_act(e, x.dtype, x.device)
    if op.startswith("norm"):
        w, r = torch.randn(e, generator=g).to(DEVICE), torch.randn(1, e, generator=g).to(DEVICE, torch.float16)
        args = dict(offset=1.0 if op == "norm-offset" else 0.0, residual=r if op == "norm-residual" else None)
        y = rms_norm(x, w, 1e-6, q8=a.buffers, **args)
        y = y[0] if isinstance(y, tuple) else y
        assert torch.equal(y, rms_norm(x, w, 1e-6, **args)[0] if args["residual"] is not None
                           else rms_norm(x, w, 1e-6, **args))
    else:
        gu = torch.randn(1, 2 * e, generator=g).to(DEVICE, torch.float16)
        fn = silu_mul if op == "silu" else gelu_tanh_mul
        y = fn(gu, q8=a.buffers)
        assert torch.equal(y, fn(gu))
    b = quantize_act(y)
    assert torch.equal(a.xq, b.xq) and torch.equal(a.xd, b.xd) and torch.equal(a.xs, b.xs)


INT8_QTYPES = sorted(R.INT8_FORMATS)


@pytest.mark.parametrize("qtype", INT8_QTYPES, ids=lambda q: K.FORMATS[q].name)
def test_int8_gemv_is_exact_on_the_quantized_activations(qtype):
    """The dp4a GEMV computes dequantized W times dequantized (int8) x exactly but for float32 sums and
    the float16 output rounding; against the unquantized x it is within llama.cpp's MMVQ error."""
    n, k = 20, k_for(qtype, tail=True)
    _, packed, ref = make(qtype, n, k, seed=11)
    bias = torch.randn(n).to(DEVICE)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(11)).to(DEVICE, torch.float16)
    act = quantize_act(x)  # its codes (checked against llama.cpp's rule above; a GPU's fused multiply-add
    # may round a value lying on a .5 boundary the other way) times its scales: what the GEMV multiplies
    q = act.xq.cpu().view(torch.int8).reshape(-1, 4, 4).transpose(1, 2).reshape(-1).double()
    dx = act.xd.cpu().double().repeat_interleave(32)
    exact_q = ((q * dx) @ ref.double().cpu().T + bias.double().cpu()).to(DEVICE)
    assert R.plan(qtype, 1, n, k, x.dtype, sms=SMS).kind == "gemv_int8"
    for y in (matmul(x, packed, bias),  # the plan's config, then two others
              gemv_int8(act, packed, bias, R.q8_config(qtype, n, k, SMS, block_n=8, block_k=128)),
              gemv_int8(act, packed, bias, R.q8_config(qtype, n, k, SMS, block_n=1, block_k=256))):
        assert y.dtype == torch.float16 and y.shape == (1, n)
        assert rel_err(y, exact_q) < 1e-3
    # random blocks carry large per-block offsets (mins) that cancel in the sum: int8 x errors show more
    # than on real weights (llama.cpp references: tests/test_generate.py and friends)
    assert rel_err(y, x.float() @ ref.T + bias) < 5e-2
    assert torch.equal(matmul(x, packed, bias, act=act), matmul(x, packed, bias))


@pytest.mark.parametrize("pair", [(K.Q4_K, K.Q6_K), (K.Q5_0, K.Q8_0)], ids=["Q4_K+Q6_K", "Q5_0+Q8_0"])
def test_int8_pair_computes_each_weight_as_its_own_gemv(pair):
    """gemv_int8_pair (two weights of one x, one launch: a joined q/k/v of two formats) stores each weight's
    rows bit for bit as gemv_int8 does with that weight's config — rows per program and K steps unlike, a
    bias on one side, partial row blocks — and QuantLinear.paired / Joined take it for one int8 row."""
    from kiln.quant.gemv_int8 import gemv_int8_pair
    from kiln.quant.swap import Joined
    (qa, qb), k = pair, 768 if K.FORMATS[pair[0]].block == 256 else 352
    (_, wa, _), (_, wb, _) = make(qa, 20, k, seed=5), make(qb, 12, k, seed=6)
    bias = torch.randn(12).to(DEVICE)
    act = quantize_act(torch.randn(1, k, generator=torch.Generator().manual_seed(5)).to(DEVICE, torch.float16))
    ca, cb = R.q8_config(qa, 20, k, SMS, block_n=8, block_k=256), R.q8_config(qb, 12, k, SMS, block_n=1)
    y = gemv_int8_pair(act, wa, wb, None, bias, ca, cb)
    assert y.shape == (1, 32) and y.dtype == torch.float16
    assert torch.equal(y[:, :20], gemv_int8(act, wa, None, ca)) and torch.equal(y[:, 20:], gemv_int8(act, wb, bias, cb))
    with pytest.raises(ValueError, match="one num_warps"):
        gemv_int8_pair(act, wa, wb, None, None, ca, R.q8_config(qb, 12, k, SMS, block_n=1, num_warps=8))
    a, b = QuantLinear(k, 20, qa, packed=wa), QuantLinear(k, 12, qb, packed=wb, bias=bias)
    x = torch.randn(1, 1, k, generator=torch.Generator().manual_seed(5)).to(DEVICE, torch.float16)
    joined = Joined([a, b])
    act = joined.int8_input(x)
    assert act is not None and len(joined.groups) == 2
    act = quantize_act(x)  # filled as the norm kernel would
    got = joined(x, act)
    assert got[0].data_ptr() + 20 * 2 == got[1].data_ptr()  # one output buffer: one launch
    assert torch.equal(got[0], a(x, act=act)) and torch.equal(got[1], b(x, act=act))
    a.policy = a.policy.replace(pair_gemv=False)
    assert a.paired(b, x, act) is None


@pytest.mark.parametrize("case", ["Q4_K q+k, Q6_K v (one launch)", "Q4_K q+k, Q6_K v (two launches)",
                                  "Q8_0 q+k+v with bias", "Q4_K q+k, Q6_K v of K 4096 (route: one v row a program)"])
def test_int8_gemv_rope_epilogue_is_the_rope_kernel(case):
    """The q/k/v GEMVs' epilogue (gemv_int8.RopeOut through Joined.rope_forward) gives what the GEMVs and then
    ops.rope_qk_write_kv give: the rotated q, and the rotated k and the v in the caches at the position (bit
    for bit in the interpreter; the dtype's rounding on a GPU), other cache slots untouched."""
    from kiln.ops.rope import rope_qk_write_kv
    from kiln.ops.rope import RopeOut
    from kiln.quant.swap import Joined
    h, kh, d, k = 4, 2, 64, 4096 if "4096" in case else 256
    fmts = (K.Q8_0,) * 3 if "Q8_0" in case else (K.Q4_K, K.Q4_K, K.Q6_K)
    g = torch.Generator().manual_seed(7)
    layers = [QuantLinear(k, n, q, packed=make(q, n, k, seed=20 + i)[1],
                          bias=torch.randn(n, generator=g).to(DEVICE) if "bias" in case else None)
              for i, (q, n) in enumerate(zip(fmts, (h * d, kh * d, kh * d)))]
    if "two launches" in case:
        layers[0].policy = layers[0].policy.replace(pair_gemv=False)
    joined = Joined(layers)
    x = (torch.randn(1, 1, k, generator=g) / 16).to(DEVICE, torch.float16)  # q, k, v within float16's range
    act = quantize_act(x)
    if "4096" in case:  # the epilogue takes two rows a program there (a rotation pair's halves)
        assert layers[2].plan(x[0]).config.block_n == 1
    pos = torch.tensor([37], device=DEVICE)
    inv = (1e4 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)).to(DEVICE)
    caches = [torch.randn(1, kh, 64, d, generator=g).to(DEVICE, torch.float16) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    q, kk, v = joined(x, act)
    want = rope_qk_write_kv(q.view(1, 1, h, d), kk.view(1, 1, kh, d), v.view(1, 1, kh, d), *ref_caches, pos, inv,
                            0.9)
    got = joined.rope_forward(x, act, RopeOut(pos, inv, 0.9, *caches, h * d))
    assert got is not None and got.shape == (1, 1, h * d) and torch.isfinite(got).all()
    exact = not CUDA
    for a, b in ((got.view(1, 1, h, d), want), *zip(caches, ref_caches)):
        assert torch.equal(a, b) if exact else torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-2)
    layers[0].policy = layers[0].policy.replace(pair_gemv=True)
    joined.add_lora(0, torch.zeros(2, k), torch.zeros(h * d, 2), 1.0)
    assert joined.rope_forward(x, act, RopeOut(pos, inv, 0.9, *caches, h * d)) is None  # a LoRA beside: no epilogue


def test_int8_kernels_reject_what_they_cannot_take():
    _, iq, _ = make(K.IQ4_XS, 8, 256)
    act = quantize_act(torch.randn(1, 256).to(DEVICE, torch.float16))
    with pytest.raises(ValueError, match="int8 kernels take"):
        gemv_int8(act, iq, None, R.q8_config(K.IQ4_XS, 8, 256, SMS, block_n=4))  # code book: float path only
    _, packed, _ = make(K.Q4_K, 8, 512)
    with pytest.raises(ValueError, match="int8 kernels take"):
        gemv_int8(act, packed, None, R.q8_config(K.Q4_K, 8, 512, SMS, block_n=4))  # K 256 against 512


def test_gemv_rejects_too_many_rows_and_wrong_k():
    _, packed, _ = make(K.Q8_0, 8, 64)
    cfg = GemvConfig(block_k=64)
    with pytest.raises(ValueError, match="M <= 8"):
        gemv(torch.zeros(9, 64, device=DEVICE), packed, None, cfg)
    with pytest.raises(ValueError, match="M <= 8"):
        gemv(torch.zeros(1, 32, device=DEVICE), packed, None, cfg)
    with pytest.raises(ValueError, match="launchable config"):
        gemv(torch.zeros(1, 64, device=DEVICE), packed, None, GemvConfig(block_k=64, split_k=0))


# ---------------------------------------------------------------- QuantLinear

@pytest.mark.parametrize("qtype", QTYPES, ids=IDS)
def test_quant_linear_decode_and_prefill_paths(qtype):
    n, k = 24, k_for(qtype)
    raw = random_rows(qtype, n, k, seed=7)
    bias = torch.randn(n)
    lin = QuantLinear.from_gguf(raw, qtype, (n, k), bias=bias, device=DEVICE)
    assert lin.packed is not None and lin.nbytes == lin.packed.nbytes
    w = kq.dequantize(raw.reshape(-1), qtype, (n, k)).to(DEVICE)
    assert torch.equal(lin.dequantize(), w)
    for shape in [(1, 1, k), (2, 10, k)]:  # M = 1: gemv; M = 20: dequantize_gpu + matmul
        x = torch.randn(*shape).to(DEVICE)
        y = lin(x)
        assert y.shape == (*shape[:-1], n)
        assert rel_err(y, F.linear(x, w, bias.to(DEVICE))) < 1e-5


def test_quant_linear_reference_path_keeps_the_gguf_rows():
    raw = random_rows(K.Q5_K, 6, 256, seed=8)
    lin = QuantLinear.from_gguf(raw, K.Q5_K, (6, 256), policy=Policy())  # CPU, kernels off: the reference
    assert lin.raw is not None and lin.qs is None and lin.nbytes == raw.numel()
    assert "qtype=Q5_K" in repr(lin) and "storage=gguf rows" in repr(lin)
    x = torch.randn(3, 256)
    assert torch.equal(lin(x), F.linear(x, kq.dequantize(raw.reshape(-1), K.Q5_K, (6, 256))))
    assert lin.state_dict() == {}  # the quantized bytes never enter a state dict


def test_quant_linear_rejects_dense_types_and_bad_rows():
    with pytest.raises(KilnError, match="keep it as a dense nn.Linear"):
        QuantLinear.from_gguf(torch.zeros(2, 64, dtype=torch.uint8), 1, (2, 32))
    with pytest.raises(KilnError, match="needs 2 rows of 144 bytes"):
        QuantLinear.from_gguf(torch.zeros(2, 143, dtype=torch.uint8), K.Q4_K, (2, 256))


class Tiny(nn.Module):
    def __init__(self, e=256, v=48):
        super().__init__()
        self.model = nn.ModuleDict({"embed_tokens": nn.Embedding(v, e)})  # Hugging Face names
        self.q_proj = nn.Linear(e, 64, bias=True)
        self.mlp = nn.Sequential(nn.Linear(e, 512, bias=False), nn.SiLU(), nn.Linear(512, e, bias=False))
        self.o_proj = nn.Linear(e, e, bias=False)
        self.lm_head = nn.Linear(e, v, bias=False)

    def forward(self, x):
        h = self.o_proj(self.mlp(x)) + x
        return self.lm_head(h), self.q_proj(h)


def _gguf(name: str, qtype: int, shape, data: torch.Tensor) -> GGUFTensor:
    return GGUFTensor(name, tuple(shape), qtype, data.reshape(-1).contiguous())


def test_swap_linears_on_a_tiny_model():
    e, v = 256, 48
    q = lambda name, qtype, n, k, seed: _gguf(name, qtype, (n, k), random_rows(qtype, n, k, seed))  # noqa: E731
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    weights = {
        "q_proj.weight": GGUFTensor("q", (64, e), K.Q4_K, random_rows(K.Q4_K, 64, e, 1).reshape(-1), row_perm=perm),
        "q_proj.bias": _gguf("qb", 0, (64,), torch.randn(64).view(torch.uint8)),           # F32
        "mlp.0.weight": q("up", K.Q5_0, 512, e, 2),
        "mlp.2.weight": q("down", K.Q6_K, e, 512, 3),
        "o_proj.weight": _gguf("o", 1, (e, e), torch.randn(e, e).half().view(torch.uint8)),  # F16: stays dense
        "model.embed_tokens.weight": q("emb", K.Q8_0, v, e, 4),
    }
    dense = Tiny(e, v)
    with torch.no_grad():
        for name, p in dense.named_parameters():
            src = weights.get(name, weights["model.embed_tokens.weight"])  # lm_head tied to the embedding
            p.copy_(src.dequantize(torch.float32))
    model = Tiny(e, v)
    model.load_state_dict(dense.state_dict())
    taken = swap_linears(model, weights, device=DEVICE)
    packed = use_triton(torch.empty(0, device=DEVICE))  # kernels serve: embeddings stay packed too
    want = ["lm_head.weight", "mlp.0.weight", "mlp.2.weight"] + ["model.embed_tokens.weight"] * packed
    assert sorted(taken) == sorted(want + ["q_proj.bias", "q_proj.weight"])
    assert isinstance(model.o_proj, nn.Linear)
    if packed:  # the tied head reads the embedding's planes: held once
        assert isinstance(model.model.embed_tokens, QuantEmbedding)
        assert model.lm_head.qs.data_ptr() == model.model.embed_tokens.qs.data_ptr()
    else:
        assert isinstance(model.model.embed_tokens, nn.Embedding)
    assert [type(m) for m in (model.q_proj, model.mlp[0], model.mlp[2], model.lm_head)] == [QuantLinear] * 4
    model.to(DEVICE)
    for t in (1, 12):  # decode and prefill paths
        x = torch.randn(1, t, e)
        got, want = model(x.to(DEVICE)), dense(x)
        for a, b in zip(got, want):
            assert rel_err(a.cpu(), b) < 1e-5


# ---------------------------------------------------------------- GPU only

def test_code_book_is_made_once_per_device():
    """The IQ4 code book the kernels read is created on its first use and then reused: a CUDA-graph
    capture cannot copy it from the host."""
    assert code_book(torch.device(DEVICE)) is code_book(torch.device(DEVICE))


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("qtype", [K.Q4_K, K.Q6_K, K.Q8_0, K.IQ4_XS], ids=lambda q: K.FORMATS[q].name)
def test_decode_path_captures_in_a_cuda_graph(qtype):
    n, k = 1024, 1024
    raw = random_rows(qtype, n, k, seed=9)
    lin = QuantLinear.from_gguf(raw, qtype, (n, k), bias=torch.randn(n), device="cuda")
    x = torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16)
    lin(x)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = lin(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    expected = F.linear(x.float(), lin.dequantize(), lin.bias.float())
    assert rel_err(y, expected) < 1e-2


def test_quant_embedding_dequantizes_the_rows_it_reads():
    from kiln.quant.linear import QuantEmbedding
    for qtype in (K.Q4_K, K.Q6_K, K.Q8_0):
        packed = K.repack(random_rows(qtype, 16, 256, seed=qtype).to(DEVICE), qtype, (16, 256))
        ids = torch.tensor([[3, 0, 15], [3, 3, 7]], device=DEVICE)
        got = QuantEmbedding(packed, torch.float32)(ids)
        assert got.shape == (2, 3, 256)
        assert torch.equal(got, K.dequantize_ref(packed)[ids])
        many = torch.randint(0, 16, (1, 37), generator=torch.Generator().manual_seed(qtype)).to(DEVICE)
        assert torch.equal(QuantEmbedding(packed, torch.float32)(many), K.dequantize_ref(packed)[many])
