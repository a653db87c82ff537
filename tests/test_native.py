"""kiln/native.py and native.c: each native CPU kernel against its torch twin, and decode steps of every
architecture with the kernels on and off.

The twins: `Int8Linear.dequantize() @ x` for the GEMV, `native.gemv_i8g_ref` for its group-scaled form,
`native.gemv_k_ref` / `native.gemv_lq_ref` and gguf-py's dequantization for Q4_K / Q6_K and legacy blocks,
`ops.rms_norm_ref` for the norm, and
`ops.rope_qk_ref` + a cache write + `base.attend` for one token's attention (norms, RoPE, window, GQA).
"""

import pytest
import torch

from kiln import native, ops
from kiln.cache import layer_windows, plan_rings
from kiln.models import base
from kiln.ops.cpu import int8_weight_ref
from kiln.ops import rms_norm_ref, rope_qk_ref
from kiln.policy import Policy

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler / OpenMP runtime for native.c")


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _on_one_thread(fn):
    """fn() with torch (and so native.c) on one thread: each output row is one thread's, so a GEMV gives the
    same bits on any thread count."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        return fn()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("n,k", [(1, 1), (7, 5), (64, 896), (33, 100), (40, 4864)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_i8_is_the_dequantized_product(n, k, bias):
    g = torch.Generator().manual_seed(n * k)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = (torch.rand(n, generator=g) + 0.5).to(torch.bfloat16)
    x = torch.randn(k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    ref = (q.double() * scale.double()[:, None]) @ x.double() + (0 if b is None else b.double())
    y = native.gemv_i8(x, q, scale, b)
    assert y.shape == (n,) and y.dtype == torch.float32
    assert _rel(y, ref) < 1e-5  # fp32 accumulation of exact products: no bf16 rounding of x
    assert torch.equal(_on_one_thread(lambda: native.gemv_i8(x, q, scale, b)), y)


@pytest.mark.parametrize("n,k,group", [(64, 896, 32), (40, 4864, 32), (33, 512, 16), (7, 96, 32), (5, 48, 16),
                                         (3, 64, 32)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_i8g_is_its_twin(n, k, group, bias):
    """Group-scaled int8 rows (GGUF's own codes) against native.gemv_i8g_ref: x rounded to int16 per group,
    exact integer dots. K a multiple of 64 takes the AVX-512 steps, the rest the scalar
    loop; codes cover the full int8 range (-128 too) and one group of x is all zeros."""
    g = torch.Generator().manual_seed(n * k + group)
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    scale = (torch.rand(n, k // group, generator=g) * 0.02 + 1e-3).half()
    x = torch.randn(k, generator=g)
    x[:group] = 0
    b = torch.randn(n, generator=g) if bias else None
    y = native.gemv_i8g(x, q, scale, b)
    assert y.shape == (n,) and y.dtype == torch.float32
    assert _rel(y, native.gemv_i8g_ref(x, q, scale, b)) < 1e-6  # the same integers, fp32 sums of them
    w = (q.double().view(n, -1, group) * scale.double()[:, :, None]).view(n, k)
    assert _rel(y, w @ x.double() + (0 if b is None else b.double())) < 1e-4  # x's 16-bit rounding, ~2e-5
    xs = torch.stack([x, torch.randn(k, generator=g), -x])  # a few rows at once: each one's own product
    ys = native.gemv_i8g(xs, q, scale, b)
    assert ys.shape == (3, n) and torch.equal(ys[0], y) and _rel(ys, native.gemv_i8g_ref(xs, q, scale, b)) < 1e-6
    assert torch.equal(_on_one_thread(lambda: native.gemv_i8g(x, q, scale, b)), y)


@pytest.mark.parametrize("group", [16, 32])
def test_dequant_i8g_is_the_scaled_codes(group):
    g = torch.Generator().manual_seed(group)
    q = torch.randint(-128, 128, (70, 4 * group), dtype=torch.int8, generator=g)
    scale = (torch.randn(70, 4, generator=g) * 0.01).half()
    want = (q.float().view(70, 4, group) * scale.float()[:, :, None]).view(70, -1)
    assert torch.equal(native.dequant_i8g(q, scale), want)
    assert torch.equal(native.dequant_i8g(q, scale, torch.bfloat16), want.bfloat16())  # a prompt's AMX weight
    assert torch.equal(int8_weight_ref(q, scale), want)  # the torch path int8_linear takes without native.c


def _kquant_blocks(qtype: int, n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Q4_K / Q6_K rows (N, K / 256 * B): random codes and scales (every value), finite f16 d (and dmin)."""
    size = native.KQUANT_BYTES[qtype]
    blocks = torch.randint(0, 256, (n * k // 256, size), dtype=torch.uint8, generator=g)
    at = (0, 4) if qtype == 12 else (208, 210)
    blocks[:, at[0]:at[1]] = (torch.rand(n * k // 256, (at[1] - at[0]) // 2, generator=g) * 0.01 + 1e-4).half().view(
        torch.uint8)
    return blocks.view(n, -1)


@pytest.mark.parametrize("qtype", [12, 14])  # Q4_K, Q6_K
@pytest.mark.parametrize("n,k", [(64, 256), (33, 512), (7, 2560)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_k_is_its_twin_and_the_files_weight(qtype, n, k, bias):
    """K-quant blocks as the file holds them against native.gemv_k_ref (x rounded per 256 to 16 bits, exact
    integer dots) and against gguf-py's own dequantization of the same bytes (the weight any reader sees)."""
    import gguf
    g = torch.Generator().manual_seed(n + k + qtype)
    blocks = _kquant_blocks(qtype, n, k, g)
    x = torch.randn(k, generator=g)
    x[256:512] = 0  # a block of x all zeros (where there is a second)
    b = torch.randn(n, generator=g) if bias else None
    y = native.gemv_k(x, blocks, qtype, b)
    assert y.shape == (n,) and y.dtype == torch.float32
    assert _rel(y, native.gemv_k_ref(x, blocks, qtype, b)) < 1e-6
    w = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType(qtype))).double()
    assert w.shape == (n, k)
    assert _rel(y, w @ x.double() + (0 if b is None else b.double())) < 1e-4  # x's 16-bit rounding
    assert torch.equal(native.dequant_k(blocks, qtype), ops.cpu.block_weight_ref(blocks, qtype))  # a prompt's
    assert _rel(native.dequant_k(blocks, qtype), w) < 1e-7
    assert torch.equal(native.dequant_k(blocks, qtype, torch.bfloat16), w.float().bfloat16())  # rounded as torch
    xs = torch.stack([x, torch.randn(k, generator=g), -x])  # a few rows at once: each one's own product
    ys = native.gemv_k(xs, blocks, qtype, b)
    assert torch.equal(ys[0], y) and _rel(ys, native.gemv_k_ref(xs, blocks, qtype, b)) < 1e-6
    assert torch.equal(_on_one_thread(lambda: native.gemv_k(x, blocks, qtype, b)), y)
    with pytest.raises(ValueError, match="at most 16 rows"):
        native.gemv_k(torch.randn(17, k), blocks, qtype, b)


@pytest.mark.parametrize("qtype", [2, 3, 6, 7, 8])  # Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
@pytest.mark.parametrize("n,k", [(64, 128), (33, 896), (7, 1024)])
def test_gemv_lq_is_its_twin_and_the_files_weight(qtype, n, k):
    """Legacy 32-weight blocks regrouped four at a time (native.regroup_lq: the same bytes, and back) against
    native.gemv_lq_ref on the file's blocks (x rounded per 32 to 16 bits, exact integer dots) and against
    gguf-py's dequantization of those blocks; random bytes: every code and fifth bit, finite f16 d and m."""
    import gguf
    g = torch.Generator().manual_seed(n + k + qtype)
    size = native.LEGACY_BYTES[qtype]
    raw = torch.randint(0, 256, (n * k // 32, size), dtype=torch.uint8, generator=g)
    ends = 4 if qtype in (3, 7) else 2  # d, and m for the _1 types
    raw[:, :ends] = ((torch.rand(n * k // 32, ends // 2, generator=g) - 0.5) * 0.02).half().view(torch.uint8)
    raw = raw.view(n, -1)
    rows = native.regroup_lq(raw, qtype)  # the native pass
    assert torch.equal(rows, native.regroup_lq_ref(raw, qtype))
    assert rows.shape == raw.shape and torch.equal(native.ungroup_lq(rows, qtype), raw)
    x = torch.randn(3, k, generator=g)
    x[0, 32:64] = 0  # a block of x all zeros
    x[1, 5] = 1e4  # one large value: the block's others round to few levels
    b = torch.randn(n, generator=g)
    y = native.gemv_lq(x, rows, qtype, b)
    assert y.shape == (3, n) and _rel(y, native.gemv_lq_ref(x, raw, qtype, b)) < 1e-6
    w = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType(qtype))).double()
    assert _rel(y, x.double() @ w.t() + b.double()) < 3e-4  # x's 16-bit rounding (the 1e4 row's block: coarse)
    assert torch.equal(native.dequant_lq(rows, qtype), w.float())  # a prompt's weight: gguf-py's own
    assert torch.equal(native.dequant_lq(rows, qtype, torch.bfloat16), w.float().bfloat16())  # rounded as torch
    assert torch.equal(native.gemv_lq(x[1], rows, qtype, b), y[1])  # a row's product: its own, batched or not
    assert torch.equal(_on_one_thread(lambda: native.gemv_lq(x, rows, qtype, b)), y)


@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_is_the_reference(offset, residual):
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(1, 1, 96, generator=g), torch.rand(96, generator=g)
    r = torch.randn(1, 1, 96, generator=g) if residual else None
    got, ref = native.rms_norm(x, w, 1e-6, offset, r), rms_norm_ref(x, w, 1e-6, offset, r)
    for a, b in zip(got if residual else [got], ref if residual else [ref]):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def _torch_attention(q, k, v, kc, vc, pos, inv, factor, norms, scale, window):
    """The torch path of base.attention for one token: rope_qk_ref, the cache write, masked SDPA."""
    qw, kw, eps, off = norms
    q, k = rope_qk_ref(q[None, None], k[None, None], torch.tensor([pos]), inv, factor, qw, kw, eps, off)
    kc[:, pos], vc[:, pos] = k[0, 0], v
    mask = base.causal_mask(torch.tensor([pos]), pos + 1, window, "cpu")  # (1, S)
    return base.attend(q.transpose(1, 2), kc[None, :, :pos + 1], vc[None, :, :pos + 1], mask, scale)[0, 0]


@pytest.mark.parametrize("case", ["plain", "gqa-norms", "gemma-norms", "partial-rotary", "window"])
@pytest.mark.parametrize("pos", [0, 1, 9])
def test_decode_attention_is_rope_cache_write_and_sdpa(case, pos):
    h, kv, d, s = {"plain": (4, 4, 16, 12), "gqa-norms": (6, 2, 32, 12), "gemma-norms": (4, 2, 32, 12),
                   "partial-rotary": (4, 2, 16, 12), "window": (4, 1, 16, 12)}[case]
    g = torch.Generator().manual_seed(pos)
    q, k, v = torch.randn(h, d, generator=g), torch.randn(kv, d, generator=g), torch.randn(kv, d, generator=g)
    half = d // 4 if case == "partial-rotary" else d // 2
    inv = 1.0 / (1e4 ** (torch.arange(half).float() / half))
    factor = 1.3 if case == "partial-rotary" else 1.0
    norms = (None, None, 1e-6, 0.0)
    if case in ("gqa-norms", "gemma-norms"):
        norms = (torch.rand(d, generator=g) + 0.5, torch.rand(d, generator=g) + 0.5, 1e-6,
                 1.0 if case == "gemma-norms" else 0.0)
    window = 3 if case == "window" else None
    kc, vc = torch.randn(kv, s, d, generator=g), torch.randn(kv, s, d, generator=g)  # stale slots: masked
    kc2, vc2 = kc.clone(), vc.clone()
    ref = _torch_attention(q, k, v, kc, vc, pos, inv, factor, norms, 0.3, window)
    assert native.attention_fits(q, kc2, inv)
    out = native.decode_attention(q, k, v, kc2, vc2, pos, inv, factor, *norms, 0.3, window)
    assert out.shape == (h * d,) and torch.allclose(out, ref.reshape(-1), rtol=1e-5, atol=1e-5)
    assert torch.allclose(kc2, kc, atol=1e-5) and torch.equal(vc2, vc)  # the same cache write


@pytest.mark.parametrize("name", ["llama", "llama3.1", "mistral", "qwen2", "qwen3", "gemma3", "phi3",
                                  "phi3-longrope"])
def test_decode_steps_with_native_kernels_equal_the_torch_path(name, monkeypatch):
    """Prefill then one token at a time through the KV cache, as generate's CPU decode does, with the
    native kernels on and off (the steps' policy): the same logits (gemma3's window of 5 is crossed)."""
    import test_models as tm
    cfg = tm.CONFIGS[name]
    km = tm._kiln_model(cfg, tm._hf_model(cfg)[0])
    ids = torch.randint(0, cfg["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(2))
    calls = []
    real = native.decode_attention
    monkeypatch.setattr(native, "decode_attention", lambda *a: calls.append(1) or real(*a))

    with_native = tm.decode_steps(km, ids, 12, policy=Policy(native=True))
    assert len(calls) == 8 * cfg["num_hidden_layers"]  # every decode step's layers, no prefill
    without = tm.decode_steps(km, ids, 12, policy=Policy(native=False))
    assert len(calls) == 8 * cfg["num_hidden_layers"]
    err = (with_native - without).abs().max().item()
    assert err <= 1e-4, f"{name}: native vs torch decode max |Δlogit| = {err}"


@pytest.mark.parametrize("name, types", [("llama", ("q8_0", "q8_0")), ("qwen2", ("q8_0", "q8_0")),
                                         ("gemma3", ("q8_0", "q8_0")), ("qwen2", ("q8_0", "q4_0")),
                                         ("qwen2", ("q4_0", "q4_0")), ("llama", ("f16", "f16")),
                                         ("qwen3", ("bf16", "q8_0")), ("gemma3", ("q4_0", "f16"))])
def test_decode_steps_over_a_typed_cache_with_native_kernels_equal_the_torch_path(name, types, monkeypatch):
    """The same over a KV cache of other types (q8_0 / q4_0 stored rotated, keys less the k bias: kv_types;
    f16 / bf16 as they are; the two sides mixed), which the native token writes and reads as stored: the logits
    of torch's path (kv_types' encode and decode, SDPA) within 3e-3 (the rotation's sums in another order can
    move a code by one, and the next layers see it)."""
    import test_models as tm
    cfg = dict(tm.CONFIGS[name], head_dim=64)
    km = tm._kiln_model(cfg, tm._hf_model(cfg)[0])
    ids = torch.randint(0, cfg["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(3))
    calls = []
    real = native.decode_attention
    monkeypatch.setattr(native, "decode_attention", lambda *a: calls.append(a[-1] is not None) or real(*a))
    with_native = tm.decode_steps(km, ids, 12, policy=Policy(native=True), types=types)
    assert calls == [True] * (8 * cfg["num_hidden_layers"])  # every decode step's layers, over the codes
    without = tm.decode_steps(km, ids, 12, policy=Policy(native=False), types=types)
    plain = tm.decode_steps(km, ids, 12, policy=Policy(native=False))
    err = (with_native - without).abs().max().item()
    assert err <= 3e-3, f"{name}: native vs torch decode over {types}, max |Δlogit| = {err}"
    assert (without - plain).abs().max() > 10 * err  # the type's own error: the cache type is in both paths


@pytest.mark.model
def test_a_bfloat16_model_decodes_over_its_bf16_cache(qwen_path, monkeypatch):
    """`--dtype bfloat16` on the CPU: the compact layers' float32 q against a KV cache in the model's bf16, which
    the native token reads and writes as bf16 (KVCache.native_kv; it asserted a float32 cache before): greedy
    tokens and logprobs (whole distributions within 0.1; measured 0.03) those of torch's path, native off."""
    import kiln
    from kiln.cache import KVCache
    model, tok = kiln.load(qwen_path, device="cpu", dtype=torch.bfloat16)
    assert KVCache.for_model(model, max_len=8).native_kv(0) == native.KVStore("bf16", "bf16")
    assert KVCache.for_model(model, max_len=8, dtype=torch.float32).native_kv(0) is None  # float32: as it comes
    prompt = tok.encode("def fibonacci(n):")
    calls, real = [], native.decode_attention
    monkeypatch.setattr(native, "decode_attention", lambda *a: calls.append(a[-1]) or real(*a))
    got = list(kiln.stream_generate(model, tok, prompt, max_tokens=8, ignore_eos=True))
    assert calls and all(store == ("bf16", "bf16") + (None,) * 5 for store in calls)  # every step's layers
    off, _ = kiln.load(qwen_path, device="cpu", dtype=torch.bfloat16, policy=Policy(native=False))
    want = list(kiln.stream_generate(off, tok, prompt, max_tokens=8, ignore_eos=True))
    assert [r.token for r in got] == [r.token for r in want]
    err = max((a.logprobs.float() - b.logprobs.float()).abs().max().item() for a, b in zip(got, want))
    assert err < 0.1, err


def test_unused_when_switched_off():
    """KILN_NATIVE=0 (Policy.native off): no native kernel serves, though the library is built."""
    x = torch.randn(1, 1, 96)
    assert native.available() and ops.cpu.serves(x, Policy(native=True))
    assert not ops.cpu.serves(x, Policy.from_env({"KILN_NATIVE": "0"}))
    assert not ops.cpu.serves(torch.randn(2, 96), Policy(native=True))  # one row only
    w = torch.rand(96)
    assert torch.equal(ops.rms_norm(x, w, 1e-6, policy=Policy(native=False)), rms_norm_ref(x, w, 1e-6))


# Each projection of a tiny model in its own GGUF block type (q/k/v three types: three parts of one matmul;
# gate/up two); phi3's fused qkv_proj and gate_up_proj one each. "-int8": rows of 160, which only int8 rows take
# (Q8_0 / Q5_0 codes with their block scales; Q5_K requantized with one scale a row).
STEP_TYPES = {"q_proj": 12, "k_proj": 7, "v_proj": 8, "o_proj": 6, "gate_proj": 3, "up_proj": 14, "down_proj": 12,
              "qkv_proj": 14, "gate_up_proj": 2, "lm_head": 8, "embed_tokens": 8}
INT8_TYPES = {"q_proj": 8, "k_proj": 6, "v_proj": 8, "o_proj": 6, "gate_proj": 8, "up_proj": 6, "down_proj": 13,
              "lm_head": 8, "embed_tokens": 8}


def _block_model(name: str, policy: Policy):
    """A tiny model of family `name` (test_models' configs, widened to whole blocks: E 256, I 512, D 64, 2 layers
    but gemma3's 4; "-int8": E 160, D 40) whose every projection is in GGUF blocks of STEP_TYPES (INT8_TYPES),
    loaded compact (as kiln.load on a CPU); "-window": a sliding window of 5."""
    import test_models as tm

    from kiln.formats.gguf import GGUFTensor
    from kiln.load import build_model
    from kiln.quant import cpu
    from kiln.quant.quantize import quantize
    family = name.split("-")[0] + ("-longrope" if "longrope" in name else "")
    cfg = dict(tm.CONFIGS[family], hidden_size=256, intermediate_size=512, head_dim=64)
    if "layer_types" not in cfg:  # gemma3 keeps its 4 layers, 3 of them sliding
        cfg["num_hidden_layers"] = 2
    if "longrope" in str(cfg.get("rope_scaling")):
        cfg["rope_scaling"] = dict(cfg["rope_scaling"], short_factor=[1.0 + 0.01 * i for i in range(32)],
                                   long_factor=[2.0 + 0.03 * i for i in range(32)])
    if name.endswith("-window"):
        cfg["sliding_window"] = 5
    types = STEP_TYPES
    if name.endswith("-int8"):
        cfg.update(hidden_size=160, head_dim=40)
        types = INT8_TYPES
    hf, _ = tm._hf_model(cfg)
    weights = {}
    for key, p in hf.state_dict().items():
        qtype = next((t for part, t in types.items() if part in key), None) if p.dim() == 2 else None
        weights[key] = p.detach().float() if qtype is None else GGUFTensor(
            key, tuple(p.shape), qtype, quantize(p.detach().float(), qtype).reshape(-1))
    conf = dict(cfg, model_type=cfg["model_type"].replace("gemma3_text", "gemma3"))
    return cfg, build_model(conf, weights, swap=cpu.compact_linears, policy=policy)


@pytest.mark.parametrize("name", ["llama", "llama3.1", "mistral", "mistral-window", "qwen2", "qwen3", "phi3",
                                  "phi3-longrope", "gemma3", "gemma3-rings", "llama-rotating", "qwen2-int8",
                                  "qwen2-q8kv", "gemma3-rings-q8kv", "llama-q8q4kv", "qwen2-q4kv",
                                  "gemma3-rings-f16kv", "qwen3-bf16q4kv"])
def test_one_native_call_for_every_block_equals_the_step_block_by_block(name, monkeypatch):
    """A CPU decode step of every block in one native call (native_step.c, through ops.cpu.decode_layers) gives
    the logits of the same kernels called block by block from Python, for every Llama-layout family and Gemma 3,
    with every block type in one model (and int8 rows of both kinds in another), over a plain cache and over
    rings (gemma3's sliding layers keeping their window of 5; every layer keeping 4 + the last 6, mlx-lm's
    rotating cache), over a q8_0 KV cache ("-q8kv": codes and scales in the rotated basis, qwen2's keys less
    its k bias; "-q8q4kv": q4_0 values; "-q4kv": q4_0 both) and f16 / bf16 ones, and serves every decode step
    (none of the prefill)."""
    import test_models as tm
    cfg, km = _block_model(name, Policy())
    kinds = {type(m).__name__ for m in km.model.layers.modules()}
    assert ("Int8Linear" if name.endswith("-int8") else "BlockLinear") in kinds
    assert not kinds & {"Linear", "Int4Linear"}
    if name.endswith("-int8"):  # both kinds of int8 rows
        assert {m.group for m in km.model.layers.modules() if type(m).__name__ == "Int8Linear"} == {None, 32}
    kv = {"-q8kv": ("q8_0", "q8_0"), "-q8q4kv": ("q8_0", "q4_0"), "-q4kv": ("q4_0", "q4_0"),  # KV cache types
          "-f16kv": ("f16", "f16"), "-bf16q4kv": ("bf16", "q4_0")}
    rings, types = None, kv.get(name[name.rfind("-"):], (None, None))
    if "-rings" in name or "-rotating" in name:
        rings = plan_rings(layer_windows(km), 32, 10 if name.endswith("-rotating") else None)
        assert rings is not None
    ids = torch.randint(0, cfg["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(2))
    calls, real = [], native.decode_layers
    monkeypatch.setattr(native, "decode_layers", lambda *a: calls.append(1) or real(*a))
    one_call = tm.decode_steps(km, ids, 12, policy=Policy(native_step=True), rings=rings, types=types)
    assert len(calls) == 8
    assert not Policy.from_env({"KILN_NATIVE_STEP": "0"}).native_step
    block_by_block = tm.decode_steps(km, ids, 12, policy=Policy(native_step=False), rings=rings, types=types)
    assert len(calls) == 8
    err = (one_call - block_by_block).abs().max().item() / block_by_block.abs().max().item()
    print(f"{name}: max |Δlogit| / max |logit| = {err:.2e}")
    assert err <= 1e-3  # silu / gelu in C (glibc's expf, tanhf) and torch's differ in the last bit; x rounds per
    # block to 2^-15


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3", "qwen2-int8", "qwen2-q8kv"])
def test_batched_rows_in_one_native_call_equal_the_rows_block_by_block(name, monkeypatch):
    """A server's batched decode step on the CPU (rows at different positions in non-consecutive slots, joining
    and leaving): its rows through every block in one native call together (models.base._native_steps; the
    GEMVs read each weight once for all rows) give each sequence's logits decoded alone through the batch-1
    native call (1e-4), and those of the batched step block by block (1e-3; 8e-3, two of bf16's relative steps,
    where torch's int8 matmul, which rounds x to bf16, serves several rows); also over a q8_0 slot cache ("-q8kv"; block by block, torch's
    attention over the dequantized rows: 5e-3)."""
    import test_models as tm
    cfg, km = _block_model(name, Policy())
    types = ("q8_0", "q8_0") if name.endswith("-q8kv") else (None, None)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, cfg["vocab_size"], (1, n), generator=g) for n in (12, 9, 14)]
    rows, real = [], native.decode_layers
    monkeypatch.setattr(native, "decode_layers", lambda *a: rows.append(1 if isinstance(a[3], int) else len(a[3]))
                        or real(*a))
    together = tm._rows_decode(km, seqs, slots=[2, 0, 3], prefill=[5, 3, 6], types=types)
    assert max(rows) == 3 and sum(rows) == 7 + 6 + 8  # every decode token, three rows in a call at most
    from kiln.cache import KVCache, Step
    for x, p, got in zip(seqs, [5, 3, 6], together):
        cache = KVCache.for_model(km, max_len=32, type_k=types[0], type_v=types[1])
        alone = [km(x[:, :p], Step.prefill(cache, 0))]
        alone += [km(x[:, t:t + 1], Step.prefill(cache, t)) for t in range(p, x.shape[1])]
        alone = torch.cat(alone, dim=1)
        assert (got - alone).abs().max().item() <= 1e-4 * alone.abs().max().item(), name
    km.policy = Policy(native_step=False)
    rows.clear()
    by_block = tm._rows_decode(km, seqs, slots=[2, 0, 3], prefill=[5, 3, 6], types=types)
    assert sum(rows) == 0
    for a, b in zip(together, by_block):
        err = (a - b).abs().max().item() / b.abs().max().item()
        assert err <= (8e-3 if name.endswith("-int8") else 5e-3 if name.endswith("-q8kv") else 1e-3), (name, err)
