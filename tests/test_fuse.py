"""kiln.fuse: concatenated projections compute what the separate layers compute."""

import torch
from torch import nn

from interpreter import run_interpreted
from kiln.fuse import FusedLinear, fuse_projections
from kiln.quant import packed
from kiln.quant.linear import QuantLinear
from test_quant_kernels import random_rows  # noqa: E402  (random valid GGUF blocks)


def _quant(qtype, n, k, seed):
    raw = random_rows(qtype, n, k, seed=seed)
    return QuantLinear(k, n, qtype, packed=packed.repack(raw, qtype, (n, k)))


def test_quant_groups_join_by_type():
    """Q4_K q and k join into one packed matrix; a Q6_K v stays apart (a Q4_K_M file's mix)."""
    q, k, v = _quant(packed.Q4_K, 64, 256, 0), _quant(packed.Q4_K, 32, 256, 1), _quant(packed.Q6_K, 32, 256, 2)
    f = FusedLinear([q, k, v])
    assert [g.out_features for g in f.groups] == [96, 32] and f.wide is None
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
        fuse_projections(km)
        got = km(ids)
    attn = km.model.layers[0].self_attn
    assert attn.qkv is not None and attn.qkv.wide is not None and not hasattr(attn, "q_proj")
    assert km.model.layers[0].mlp.gate_up.wide is not None
    assert (got - ref).abs().max().item() <= 1e-5


def test_mixed_storage_never_joins():
    a = nn.Linear(8, 4)
    b = nn.Linear(8, 4).to(torch.float64)
    assert len(FusedLinear([a, b]).groups) == 2


_QUANT_STEP = """
import collections, os, torch, test_models as tm
import kiln.fuse
import kiln.quant.linear
from kiln.fuse import fuse_projections
from kiln.policy import Policy
from kiln.quant import packed as K
from kiln.quant.linear import QuantLinear

def q8_0(w):  # (N, K) float -> GGUF Q8_0 rows (N, K/32*34) uint8: d = max|w|/127 per 32, q = round(w/d)
    b = w.reshape(-1, 32)
    d = (b.abs().amax(1, keepdim=True) / 127).half()
    q = torch.round(b / d.float().clamp_min(1e-12)).clamp(-127, 127).to(torch.int8)
    return torch.cat([d.view(torch.uint8), q.view(torch.uint8)], 1).reshape(w.shape[0], -1)

def quantize(model):
    for parent in list(model.modules()):
        for name, c in list(parent.named_children()):
            if isinstance(c, torch.nn.Linear):
                n, k = c.weight.shape
                packed = K.repack(q8_0(c.weight.detach()), K.Q8_0, (n, k))
                setattr(parent, name, QuantLinear(k, n, K.Q8_0, packed=packed, bias=c.bias))

def steps(km, ids):  # a 6-token prefill, then 4 CUDA-graph-style decode steps: all logits (1, 10, V)
    return tm.decode_steps(km, ids, 6, max_len=16, graph=True)

calls = collections.Counter()
gemv = kiln.quant.linear.gemv
def counting(*a, **kw):
    calls["gemv"] += 1
    return gemv(*a, **kw)
kiln.quant.linear.gemv = counting
for name in ("qwen3", "gemma3"):
    cfg = tm.CONFIGS[name]
    hf, _ = tm._hf_model(cfg)
    km = tm._kiln_model(cfg, hf)
    quantize(km)
    ids = torch.randint(0, cfg["vocab_size"], (1, 10), generator=torch.Generator().manual_seed(3))
    os.environ.pop("KILN_TRITON_CPU")
    with torch.no_grad():
        ref = km(ids)  # torch references: dequantized weights, separate projections and norms
    os.environ["KILN_TRITON_CPU"] = "1"
    fuse_projections(km)
    calls.clear()
    err = (steps(km, ids) - ref).abs().max().item()
    layers = cfg["num_hidden_layers"]
    assert calls["gemv"] >= 5 * 4 * layers, calls  # float32: every step's projections through the float GEMV
    assert err <= 1e-4, (name, err)
    print(name, err, dict(calls))
"""


_INT8_STEP = _QUANT_STEP.split("calls = collections.Counter()\ngemv")[0] + """
calls = collections.Counter()
L = kiln.quant.linear
quantize_act, gemv_int8, gemm_int8 = L.quantize_act, L.gemv_int8, L.gemm_int8
def count(name, fn):
    def wrapped(*a, **kw):
        calls[name] += 1
        return fn(*a, **kw)
    return wrapped
L.quantize_act, L.gemv_int8 = count("quantize", quantize_act), count("int8", gemv_int8)
L.gemm_int8 = count("rows", gemm_int8)  # the 6-token prefill: int8 rows, each quantizing its own x
kiln.fuse.quantize_act = L.quantize_act
for name in ("qwen3", "gemma3"):
    cfg = tm.CONFIGS[name]
    hf, _ = tm._hf_model(cfg)
    km = tm._kiln_model(cfg, hf)
    quantize(km)
    fuse_projections(km)
    km.half()
    ids = torch.randint(0, cfg["vocab_size"], (1, 10), generator=torch.Generator().manual_seed(3))
    logits = {}
    for on in (False, True):
        for m in km.modules():  # the layers' policy: int8 GEMVs off, then on
            if isinstance(m, QuantLinear):
                m.policy = Policy(int8=on)
        calls.clear()
        logits[on] = steps(km, ids).float()
    layers = cfg["num_hidden_layers"]
    # per decode step and layer at least q/k/v, o, gate/up and down run int8; the inputs of q/k/v and of
    # the joined gate/up's down projection are quantized by the norm / activation kernels themselves, so
    # fewer standalone quantizations than int8 GEMVs remain (o's input, the head's, unjoined layers')
    assert calls["int8"] >= 4 * 4 * layers and calls["quantize"] - calls["rows"] <= calls["int8"] // 2, dict(calls)
    ref, got = logits[False], logits[True]
    err = ((got - ref).norm() / ref.norm()).item()
    assert err < 2e-2, (name, err)
    print(name, err, dict(calls))
"""


def test_int8_decode_step_quantizes_inside_the_norm_and_activation_kernels():
    """The same tiny quantized qwen3 / gemma3 in float16: decode through the int8-activation GEMVs (x
    quantized by the RMSNorm and gated-activation kernels that produce it) against the float GEMV path."""
    assert run_interpreted(_INT8_STEP, timeout=900).count("\n") == 2


def test_quantized_decode_step_matches_reference():
    """A tiny qwen3 and gemma3 with Q8_0 QuantLinears and fused projections, float32 through the float GEMV
    under Triton's interpreter: the decode steps equal the plain torch model's logits."""
    assert run_interpreted(_QUANT_STEP, timeout=900).count("\n") == 2
