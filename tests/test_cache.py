"""KV cache types (kiln/cache.py): q8_0 / q4_0 blocks against llama.cpp's formulas, every type through a
model against the default cache, the fused decode step reading a q8_0 cache as stored (interpreted kernels)
against the unfused one, and the real 0.5B model's logits over real text with a quantized cache."""

import pytest
import torch

from kiln.cache import KVCache, Step, layer_windows, plan_rings
from kiln.kv_types import dequantize_q4_0, dequantize_q8_0, hadamard, quantize_q4_0, quantize_q8_0
from kiln.errors import KilnError
from kiln.models.base import key_offsets


def test_q8_0_and_q4_0_blocks_match_llama_cpp_formulas():
    x = torch.randn(3, 64) * torch.logspace(-2, 2, 64)
    q, d = quantize_q8_0(x)
    assert q.dtype == torch.int8 and d.shape == (3, 2)
    ref_d = x.view(3, 2, 32).abs().amax(-1) / 127  # llama.cpp quantize_row_q8_0_ref
    assert torch.allclose(d.float(), ref_d.half().float())
    assert (dequantize_q8_0(q, d, torch.float32) - x).abs().le(d.float().repeat_interleave(32, -1) * 0.6).all()
    p, d4 = quantize_q4_0(x)
    assert p.shape == (3, 32) and p.dtype == torch.uint8
    xb = x.view(3, 2, 32)
    mx = xb.gather(-1, xb.abs().argmax(-1, keepdim=True)).squeeze(-1)
    assert torch.allclose(d4.float(), (mx / -8).half().float())
    # llama.cpp dequantize_row_q4_0: low nibble -> element j, high nibble -> element j + 16
    lo, hi = (p.view(3, 2, 16) & 15).float() - 8, (p.view(3, 2, 16) >> 4).float() - 8
    ref = (torch.cat([lo, hi], -1) * d4.float()[..., None]).view(3, 64)
    assert torch.equal(dequantize_q4_0(p, d4, torch.float32), ref)
    assert (ref - x).abs().le(d4.float().abs().repeat_interleave(32, -1) * 1.01).all()


def test_cache_types_bytes_and_errors():
    args = dict(n_layers=2, batch=1, n_kv_heads=2, head_dim=64, max_len=32)
    full = KVCache(**args, dtype=torch.bfloat16).nbytes
    assert KVCache(**args, type_k="q8_0", type_v="q8_0").nbytes / full == pytest.approx(34 / 64)
    assert KVCache(**args, type_k="q4_0", type_v="q4_0").nbytes / full == pytest.approx(18 / 64)
    assert KVCache(**args, type_k="fp8", type_v="f16").nbytes / full == pytest.approx(3 / 4)
    with pytest.raises(KilnError, match="unknown KV cache type 'q5_9'"):
        KVCache(**args, type_k="q5_9")
    with pytest.raises(KilnError, match="head dim divisible by 32"):
        KVCache(**{**args, "head_dim": 48}, type_v="q4_0")


def test_hadamard_blocks_are_the_largest_power_of_two_and_orthonormal():
    """Against the closed form of Sylvester's matrix, H[i, j] = (-1)^popcount(i & j) / sqrt(n), in blocks of
    the largest power of two dividing D (every head dim a block type allows: a multiple of 32)."""
    for d, n in ((32, 32), (64, 64), (96, 32), (128, 128), (160, 32), (192, 64), (256, 256), (512, 512)):
        h = hadamard(d)
        i = torch.arange(n)
        block = torch.tensor([[(-1) ** bin(a & b).count("1") for b in i.tolist()] for a in i.tolist()]) / n ** 0.5
        assert torch.allclose(h, torch.block_diag(*[block.float()] * (d // n))), d
        assert torch.equal(h, h.T) and torch.allclose(h @ h, torch.eye(d), atol=1e-6)


def _tiny_pair(cfg, rings: bool, max_len: int, batch: int = 1):
    """A tiny model of cfg and two f32 caches: plain, and stored in the basis of the block types (rotate)."""
    from tests.test_bounded_cache import _tiny
    km = _tiny(cfg)
    r = plan_rings(layer_windows(km), max_len) if rings else None
    return km, [KVCache.for_model(km, batch=batch, max_len=max_len, rings=r, rotate=rot) for rot in (False, True)]


@pytest.mark.parametrize("head_dim", [32, 64, 96])
def test_a_cache_in_the_rotated_basis_attends_as_the_plain_one(head_dim):
    """An f32 cache stored as the block types store (keys less the k bias, then H; values H), without their
    rounding, gives the plain cache's logits in float (q·H(k - c) = q·k - q·c, the same shift for every key
    of a query; (Σ p H v) Hᵀ = Σ p v): a prompt chunk, eager steps, the CUDA-graph form, a batched rows step;
    Gemma's sliding-window rings too. D = 96: H in three blocks of 32."""
    from tests.test_bounded_cache import GEMMA, LLAMA
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    for cfg, rings in ((dict(LLAMA, model_type="qwen2", head_dim=head_dim), False), (dict(GEMMA, head_dim=head_dim), True)):
        km, caches = _tiny_pair(cfg, rings, 16, batch=2)
        assert (key_offsets(km) is not None) == (cfg["model_type"] == "qwen2")  # q/k/v biases: an offset
        outs = []
        with torch.no_grad():
            for c in caches:
                one = c.slot(0)
                out = [km(ids[:1, :6], Step.prefill(one, 0))]
                out += [km(ids[:1, t:t + 1], Step.prefill(one, t)) for t in (6, 7)]
                out += [km(ids[:1, t:t + 1], Step.graph(one, torch.tensor(t))) for t in (8, 9)]
                if not rings:  # two rows at different depths of the slot cache
                    km(ids[1:, :4], Step.prefill(c.slot(1), 0))
                    pos = torch.tensor([10, 4])
                    out.append(km(torch.stack([ids[0, 10:11], ids[1, 4:5]]), Step.rows(c.rows([0, 1], 11), pos)))
                outs.append(torch.cat([o.flatten() for o in out]))
        assert (caches[0].k[0] - caches[1].k[0]).abs().max() > 0.1  # really stored in another basis
        assert (outs[0] - outs[1]).abs().max() <= 1e-4, (cfg["model_type"], (outs[0] - outs[1]).abs().max())


@pytest.mark.parametrize("kind", ["f16", "q8_0", "q4_0", "fp8"])
def test_decode_with_a_typed_cache_tracks_the_uncached_model(kind):
    """Prefill, eager steps and the CUDA-graph form of the step (the whole static cache read back) through a
    cache of each type: logits near the uncached model's, and the two step forms identical."""
    from tests.test_models import CONFIGS, _hf_model, _kiln_model
    cfg = dict(CONFIGS["qwen2"], head_dim=32)
    km = _kiln_model(cfg, _hf_model(cfg)[0])
    ids = torch.randint(0, cfg["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(3))
    outs = []
    with torch.no_grad():
        full = km(ids)
        for graph in (False, True):
            c = KVCache.for_model(km, max_len=24, type_k=kind, type_v=kind)
            out = [km(ids[:, :8], Step.prefill(c, 0))]
            out += [km(ids[:, t:t + 1], Step.graph(c, torch.tensor(t)) if graph else Step.prefill(c, t))
                    for t in range(8, 16)]
            outs.append(torch.cat(out, 1))
    tol = {"f16": 0.01, "q8_0": 0.15, "q4_0": 2.5, "fp8": 2.5}[kind]
    assert (outs[0] - full).abs().max() <= tol
    assert (outs[0] - full).abs().max() > 1e-5  # the cache type is really in the path
    assert (outs[0] - outs[1]).abs().max() <= 1e-3, (outs[0] - outs[1]).abs().max()


@pytest.mark.model
def test_quantized_kv_cache_kl_on_the_real_model(qwen):
    """Teacher-forced logits over 128 tokens of real text through a cache stored as q8_0 (K and V) and q8_0 K /
    q4_0 V, against the default (f32) cache: mean KL (issue 12: <= 0.005 for q8_0 at about half the bytes of
    bf16, <= 0.02 for q4_0), with the bytes against a bf16 cache. q8_0 / q4_0 store keys and values rotated by
    H, keys less the k bias (kv_types.Basis); unrotated (`rotate=False`, printed beside) these were 0.0100 and
    0.0167. llama.cpp on the same file and tokens (bench/kv_cache_kl.py, its f16 cache the reference): 0.0063
    and 0.0097 with its rotation (the default), 0.0181 and 0.0222 without. q4_0 keys stay unusable on this
    model either way (kiln 0.67 rotated, 0.70 not; llama.cpp 0.73 / 0.70): the q4_0 combination asserted is
    q8_0 keys with q4_0 values (26/64 of bf16's bytes)."""
    from tests.refs import load_refs
    model, _ = qwen
    docs = load_refs("tests/data/refs_qwen2.5-coder-0.5b.npz")["docs"]
    ids = torch.tensor([[int(t) for d in docs for t in d["tokens"]][:128]])

    def logprobs(tk, tv, rotate=None):
        c = KVCache.for_model(model, max_len=ids.shape[1], type_k=tk, type_v=tv, rotate=rotate)
        with torch.inference_mode():
            return model(ids, Step.prefill(c, 0)).float().log_softmax(-1)[0], c.nbytes
    ref, _ = logprobs(None, None)
    kl = lambda lp: (ref.exp() * (ref - lp)).sum(-1).mean().item()  # noqa: E731
    bf16 = KVCache.for_model(model, max_len=ids.shape[1], dtype=torch.bfloat16).nbytes
    for tk, tv, bound, ratio in (("q8_0", "q8_0", 0.005, 34 / 64), ("q8_0", "q4_0", 0.02, 26 / 64)):
        (lp, nbytes), (plain, _) = logprobs(tk, tv), logprobs(tk, tv, rotate=False)
        print(f"KV {tk}/{tv}: mean KL {kl(lp):.5f} (unrotated {kl(plain):.5f}), {nbytes} bytes = "
              f"{nbytes / bf16:.3f} of bf16")
        assert kl(lp) <= bound and nbytes / bf16 == pytest.approx(ratio)
        assert kl(lp) < kl(plain) / 3  # the rotation is what brings it there


def test_cli_rejects_an_unknown_cache_type_before_loading():
    import subprocess
    import sys
    for cmd in (["generate", "--prompt", "hi", "-ctk", "q9_9"], ["bench", "--cache-type-v", "q9_9"],
                ["cache-prompt", "-p", "hi", "-o", "x.kpc", "-ctv", "q9_9"]):
        r = subprocess.run([sys.executable, "-m", "kiln.cli", *cmd], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "unknown KV cache type 'q9_9'" in r.stderr and "Traceback" not in r.stderr


def test_a_q8_0_slot_cache_in_batched_rows_equals_each_sequence_alone():
    """The engine's batched step (Step.rows over a q8_0 slot cache, slots not consecutive, rows at different
    depths) gives each sequence the logits of its own batch-1 q8_0 decode."""
    from tests.test_models import CONFIGS, _hf_model, _kiln_model
    cfg = dict(CONFIGS["qwen2"], head_dim=32)
    km = _kiln_model(cfg, _hf_model(cfg)[0])
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, cfg["vocab_size"], (1, n), generator=g) for n in (10, 7)]
    slots, prefill = [2, 0], [6, 3]
    with torch.no_grad():
        cache = KVCache.for_model(km, batch=3, max_len=16, type_k="q8_0", type_v="q8_0")
        outs = [[km(x[:, :n], Step.prefill(cache.slot(s), 0))] for x, n, s in zip(seqs, prefill, slots)]
        for t in range(4):
            pos = torch.tensor([prefill[0] + t, prefill[1] + t])
            ids = torch.cat([x[:, p:p + 1] for x, p in zip(seqs, pos.tolist())])  # (B, 1)
            logits = km(ids, Step.rows(cache.rows(slots, int(pos.max()) + 1), pos))
            for b in range(2):
                outs[b].append(logits[b:b + 1])
        for x, n, out in zip(seqs, prefill, outs):
            alone = KVCache.for_model(km, max_len=16, type_k="q8_0", type_v="q8_0")
            ref = [km(x[:, :n], Step.prefill(alone, 0))]
            ref += [km(x[:, p:p + 1], Step.prefill(alone, p)) for p in range(n, n + 4)]
            assert (torch.cat(out, 1) - torch.cat(ref, 1)).abs().max() <= 1e-4


_FUSED_Q8 = """
import torch, test_models as tm
from kiln.cache import KVCache, Step
from kiln.models import base
from kiln.policy import Policy

on, off = Policy(triton_cpu=True), Policy()  # the kernels (interpreted); torch (the prompts)
read = []
kernel = base.decode_attention
stored = (torch.int8, torch.uint8, torch.float8_e4m3fn, torch.float16)  # keys read as stored: codes, fp8, f16
base.decode_attention = lambda *a, **kw: read.append(a[1].dtype in stored) or kernel(*a, **kw)
g = torch.Generator().manual_seed(6)
for name in ("qwen2", "gemma3"):  # the k bias (a key offset); sliding windows, q/k norms
    cfg = dict(tm.CONFIGS[name], head_dim=64)
    km = tm._kiln_model(cfg, tm._hf_model(cfg)[0])
    ids = torch.randint(0, cfg["vocab_size"], (2, 12), generator=g)
    exact = None  # the unfused steps over a float cache: what each type's own rounding is measured against
    for tk, tv in ((None, None), ("q8_0", "q8_0"), ("q8_0", "q4_0"), ("fp8", "fp8"), ("f16", "q8_0")):
        outs = []
        for base.FUSED_MAX_T in (16, 0):  # the fused step (kv_write's kernel, the decode kernel over the codes);
            #                               torch's write, attention over the whole cache dequantized
            if tk is None and base.FUSED_MAX_T:
                continue
            c = KVCache.for_model(km, batch=3, max_len=16, type_k=tk, type_v=tv)
            one = c.slot(1)
            with torch.no_grad():
                out = [km(ids[:1, :6], Step.prefill(one, 0, off))]
                out += [km(ids[:1, t:t + 1], Step.graph(one, torch.tensor(t), on)) for t in (6, 7)]
                out.append(km(ids[:1, 8:11], Step.graph(one, torch.tensor(8), on)))  # 3 tokens (a draft check)
                km(ids[1:, :4], Step.prefill(c.slot(2), 0, off))
                pos = torch.tensor([11, 4])  # two rows at different depths of slots 1 and 2
                out.append(km(torch.stack([ids[0, 11:12], ids[1, 4:5]]), Step.rows(c.rows([1, 2], 12), pos, on)))
            outs.append(torch.cat([o.flatten() for o in out]))
        base.FUSED_MAX_T = 16
        if tk is None:
            exact = outs[0]
            read.clear()
            continue
        assert base.prepare(Step.graph(one, torch.tensor(9), on), ids[:, :1], off, {}, set()).fused
        # The two paths' float sums differ in their last bits, and a later layer's key or value can then round
        # to the neighbouring code (one q8_0 step: ~0.005 here); a wrong read (scales, basis, offset, slots)
        # costs as much as the type's whole rounding (0.05 for q8_0, 0.2 for fp8, 0.6 for q4_0 values here).
        err, rounding = (outs[0] - outs[1]).abs().max().item(), (outs[1] - exact).abs().max().item()
        ok = err <= max(1e-3, 0.25 * rounding)
        assert ok and all(read) and len(read) == 4 * cfg["num_hidden_layers"], (name, tk, tv, err, rounding, read)
        read.clear()
        print(name, tk, tv, err, rounding)
"""


@pytest.mark.interpreted("_FUSED_Q8")
def test_a_fused_step_reads_a_q8_0_cache_as_stored():
    """A CUDA-graph step (1 and 3 tokens) and a batched-rows step over a q8_0 / q4_0 / fp8 cache through the
    fused kernels (Triton's interpreter): kv_write's encoder, the decode kernel reading the codes and scales
    as stored, the query and output rotated in them: the logits of the unfused step (SDPA over the dequantized
    cache) within a quarter of what the type's own rounding costs (against a float cache), for qwen2 (keys less
    the k bias) and gemma3 (sliding windows, q/k norms), q8_0 values and q4_0 values; an fp8 cache; float16 keys
    (another float type than the model's) beside rotated q8_0 values."""
    from interpreter import run_interpreted
    assert run_interpreted(_FUSED_Q8, timeout=900).count("\n") == 8


def test_key_offsets_are_the_k_bias_also_in_a_joined_qkv():
    """models/base.key_offsets: each layer's k_proj bias as (L, K, D), the same once q/k/v are joined into one
    layer (a GPU load); None for a model without biases."""
    from kiln.quant.swap import join_projections
    from tests.test_bounded_cache import LLAMA, _tiny
    model = _tiny(dict(LLAMA, model_type="qwen2", head_dim=32))
    want = torch.stack([b.self_attn.k_proj.bias.detach().view(2, 32) for b in model.model.layers])
    assert torch.equal(key_offsets(model), want)
    join_projections(model)
    assert not hasattr(model.model.layers[0].self_attn, "k_proj") and torch.equal(key_offsets(model), want)
    assert key_offsets(_tiny(LLAMA)) is None
