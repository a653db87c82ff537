"""Joined projections (kiln/quant/swap.py) compute what the separate layers compute, and a GPU decode step
over them — the int8 hand-off from the norm and activation kernels included — what the torch model does."""

import pytest
import torch
from torch import nn

from interpreter import run_interpreted
from kiln.quant import packed
from kiln.quant.linear import QuantLinear
from kiln.quant.swap import Joined, join_projections
from test_quant_kernels import random_rows  # noqa: E402  (random valid GGUF blocks)


def _quant(qtype, n, k, seed):
    raw = random_rows(qtype, n, k, seed=seed)
    return QuantLinear(k, n, qtype, packed=packed.repack(raw, qtype, (n, k)))


def test_quant_groups_join_by_type():
    """Q4_K q and k join into one packed matrix; a Q6_K v stays apart (a Q4_K_M file's mix)."""
    q, k, v = _quant(packed.Q4_K, 64, 256, 0), _quant(packed.Q4_K, 32, 256, 1), _quant(packed.Q6_K, 32, 256, 2)
    f = Joined([q, k, v])
    assert [g.out_features for g in f.groups] == [96, 32]
    x = torch.randn(3, 256)
    for got, lin in zip(f(x), (q, k, v)):
        assert torch.equal(got, lin(x))
    assert torch.equal(f.groups[0].dequantize(), torch.cat([q.dequantize(), k.dequantize()]))


def test_dense_join_and_model_unchanged():
    import test_models as tm
    cfg = tm.CONFIGS["qwen3"]
    hf, _ = tm._hf_model(cfg)
    km = tm._kiln_model(cfg, hf)
    ids = torch.randint(0, cfg["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = km(ids)
        join_projections(km)
        got = km(ids)
    attn = km.model.layers[0].self_attn
    assert attn.qkv is not None and len(attn.qkv.groups) == 1 and not hasattr(attn, "q_proj")
    assert len(km.model.layers[0].mlp.gate_up.groups) == 1
    assert (got - ref).abs().max().item() <= 1e-5


def test_mixed_storage_never_joins():
    a = nn.Linear(8, 4)
    b = nn.Linear(8, 4).to(torch.float64)
    assert len(Joined([a, b]).groups) == 2


_SETUP = """
import collections, torch, test_models as tm
import kiln.quant.linear as L
from kiln.policy import DEFAULT, Policy
from kiln.quant import packed as K
from kiln.quant.linear import QuantLinear
from kiln.quant.swap import join_projections

def q8_0(w):  # (N, K) float -> GGUF Q8_0 rows (N, K/32*34) uint8: d = max|w|/127 per 32, q = round(w/d)
    b = w.reshape(-1, 32)
    d = (b.abs().amax(1, keepdim=True) / 127).half()
    q = torch.round(b / d.float().clamp_min(1e-12)).clamp(-127, 127).to(torch.int8)
    return torch.cat([d.view(torch.uint8), q.view(torch.uint8)], 1).reshape(w.shape[0], -1)

def quantize(model, dense_twin=False):  # each nn.Linear -> a Q8_0 QuantLinear, or its dequantized weight
    for parent in list(model.modules()):
        for name, c in list(parent.named_children()):
            if isinstance(c, torch.nn.Linear):
                n, k = c.weight.shape
                packed = K.repack(q8_0(c.weight.detach()), K.Q8_0, (n, k))
                lin = QuantLinear(k, n, K.Q8_0, packed=packed, bias=c.bias)
                if dense_twin:
                    c.weight.data = lin.dequantize()
                else:
                    setattr(parent, name, lin)

def steps(km, ids):  # a 6-token prefill, then 4 CUDA-graph-style decode steps: all logits (1, 10, V)
    return tm.decode_steps(km, ids, 6, max_len=16, graph=True)

calls = collections.Counter()
def count(name, fn):  # fn, counting its calls (and those returning float32) in `calls`
    def wrapped(*a, **kw):
        calls[name] += 1
        out = fn(*a, **kw)
        calls[name + " float32"] += getattr(out, "dtype", None) == torch.float32
        return out
    return wrapped
"""

_QUANT_STEP = _SETUP + """
L.gemv = count("gemv", L.gemv)
for name in ("qwen3", "gemma3"):
    cfg = tm.CONFIGS[name]
    hf, _ = tm._hf_model(cfg)
    twin = tm._kiln_model(cfg, hf)
    quantize(twin, dense_twin=True)
    ids = torch.randint(0, cfg["vocab_size"], (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # torch references: the same (dequantized) weights, separate projections and norms
        ref = twin(ids, tm.Step.prefill(policy=Policy()))
    km = tm._kiln_model(cfg, hf)
    quantize(km)
    join_projections(km)
    calls.clear()
    err = (steps(km, ids) - ref).abs().max().item()
    layers = cfg["num_hidden_layers"]
    # one GEMV per joined q/k/v, o, joined gate/up, down, per layer, and the head; 5 calls: the prefill's 6 rows too
    assert calls["gemv"] == 5 * (4 * layers + 1), calls
    assert err <= 1e-4, (name, err)
    print(name, err, dict(calls))
"""


_INT8_STEP = _SETUP + """
quantize_act, gemv_int8, gemm_int8 = L.quantize_act, L.gemv_int8, L.gemm_int8
L.quantize_act, L.gemv_int8 = count("quantize", quantize_act), count("int8", gemv_int8)
L.gemm_int8 = count("rows", gemm_int8)  # the 6-token prefill: int8 rows, each quantizing its own x
for name in ("qwen3", "gemma3"):
    cfg = tm.CONFIGS[name]
    hf, _ = tm._hf_model(cfg)
    km = tm._kiln_model(cfg, hf)
    quantize(km)
    join_projections(km)
    km.half()
    ids = torch.randint(0, cfg["vocab_size"], (1, 10), generator=torch.Generator().manual_seed(3))
    twin = tm._kiln_model(cfg, hf)  # the reference: torch, float32, the same (dequantized) weights
    quantize(twin, dense_twin=True)
    with torch.no_grad():
        ref = twin(ids, tm.Step.prefill(policy=Policy())).float()
    for m in km.modules():  # the layers' policy (this process's, which runs the kernels): int8 on
        if isinstance(m, QuantLinear):
            m.policy = DEFAULT.replace(int8=True)
    calls.clear()
    ids, ref = ids[:, :6], ref[:, :6]  # a 3-token prefill (int8 rows), then 3 decode steps: the interpreter is slow
    got = tm.decode_steps(km, ids, 3, max_len=16, graph=True).float()
    layers = cfg["num_hidden_layers"]
    # per decode step and layer at least q/k/v, o, gate/up and down run int8; the inputs of q/k/v, of the
    # joined gate/up's down projection and of the head are quantized by the norm / activation kernels
    # themselves, so fewer standalone quantizations than int8 GEMVs remain (o's input, unjoined layers');
    # the head writes float32 logits, once a step, and nothing else does
    assert calls["int8"] >= 3 * 4 * layers and calls["quantize"] - calls["rows"] <= calls["int8"] // 2, dict(calls)
    assert calls["int8 float32"] == 3, dict(calls)
    err = ((got - ref).norm() / ref.norm()).item()
    assert err < 2e-2, (name, err)
    print(name, err, dict(calls))
"""


_ROPE_STEP = _SETUP + """
import kiln.models.base as base
base.rope_decode_attention = count("rope", base.rope_decode_attention)
cfg = tm.CONFIGS["llama"]
hf, _ = tm._hf_model(cfg)
km = tm._kiln_model(cfg, hf)
quantize(km)
join_projections(km)
km.half()
for m in km.modules():
    if isinstance(m, QuantLinear):
        m.policy = DEFAULT.replace(int8=True)
ids = torch.randint(0, cfg["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(4))
got = {}
for on in (True, False):
    calls.clear()
    got[on] = tm.decode_steps(km, ids, 3, max_len=16, graph=True, policy=DEFAULT.replace(gemv_rope=on)).float()
    # the 3-token prefill rotates in attention (SDPA path: not counted); each decode step's layers here
    assert calls["rope"] == (0 if on else 3 * cfg["num_hidden_layers"]), (on, dict(calls))
assert torch.equal(got[True], got[False]), (got[True] - got[False]).abs().max()
print("llama", dict(calls))
"""


@pytest.mark.interpreted("_ROPE_STEP")
def test_int8_decode_step_rotates_in_the_qkv_gemv():
    """A tiny quantized Llama (no q/k norms, head dim 16) in float16, one token a step through the int8 GEMVs:
    with the q/k/v GEMVs' RoPE epilogue (policy.gemv_rope, models/base.rope_projection) no rope launch runs
    in a decode step and the logits equal, bit for bit, those of the same steps with RoPE in its own kernel."""
    assert run_interpreted(_ROPE_STEP, timeout=900).count("\n") == 1


@pytest.mark.interpreted("_INT8_STEP")
def test_int8_decode_step_quantizes_inside_the_norm_and_activation_kernels():
    """The same tiny quantized qwen3 / gemma3 in float16: decode through the int8-activation GEMVs (x
    quantized by the RMSNorm and gated-activation kernels that produce it) against the torch model with the
    same dequantized weights in float32."""
    assert run_interpreted(_INT8_STEP, timeout=900).count("\n") == 2


@pytest.mark.interpreted("_QUANT_STEP")
def test_quantized_decode_step_matches_reference():
    """A tiny qwen3 and gemma3 with Q8_0 QuantLinears and joined projections, under Triton's interpreter
    (float32: the float GEMVs): the decode steps equal the torch model with the same dequantized weights."""
    assert run_interpreted(_QUANT_STEP, timeout=900).count("\n") == 2
