"""GPU check of the rotated q8_0 / q4_0 KV cache (kv_types.Basis) on a tiny random qwen2 (k bias: a key offset):
the batch-1 Decoder's captured CUDA-graph step against its eager step, the engine's captured batched steps
against solo runs, an f32 cache in the rotated basis against the plain one, and bench/kv_capacity.py's fill
of every slot in one KV budget (bf16 against q8_0). Prints one line per check; exits 1 if any disagrees.

Usage on the GPU machine, repo root: python bench/gpu_kv_rot_check.py
"""
import sys

import torch

sys.path.insert(0, ".")
from bench.kv_capacity import fill  # noqa: E402
from kiln.cache import KVCache, Step  # noqa: E402
from kiln.engine import Engine, EngineRequest  # noqa: E402
from kiln.decoder import Decoder  # noqa: E402
from kiln.generate import generate_step  # noqa: E402
from kiln.load import build_model  # noqa: E402
from kiln.sample import SamplingParams  # noqa: E402
from tests.test_bounded_cache import _weights  # noqa: E402

cfg = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=2, head_dim=64, max_position_embeddings=1024, rms_norm_eps=1e-6, model_type="qwen2",
           rope_theta=1e6, tie_word_embeddings=False)
weights = _weights(cfg)
bad = 0
prompts = [torch.randint(5, 1000, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (7, 30, 12, 50)]
for dtype in (torch.float32, torch.bfloat16):
    model = build_model(cfg, weights, device="cuda", dtype=dtype)
    for kind in ("q8_0", "q4_0"):
        def solo(p, graph, n=24):
            dec = Decoder.for_model(model, 128, kind, kind)
            dec.use_graph = graph
            out = [t for t, _ in zip((t for t, _ in generate_step(p, model, SamplingParams(), dec)), range(n))]
            return out, dec
        g, dec = solo(prompts[1], True)
        e, _ = solo(prompts[1], False)
        ok = dec.graph is not None and (g == e or dtype != torch.float32)
        print(dtype, kind, "decoder graph captured:", dec.graph is not None, "graph == eager:", g == e, flush=True)
        bad += not ok
        engine = Engine(model, None, n_slots=4, ctx_size=128, graphs=True, cache_type_k=kind, cache_type_v=kind)
        engine.start()
        try:
            hs = [engine.submit(EngineRequest(prompt=p, params=SamplingParams(), max_tokens=24)) for p in prompts]
            outs = [[o.token for o in h.sync() if o.token >= 0] for h in hs]
        finally:
            engine.stop()
        same = sum(o == solo(p, False)[0] for o, p in zip(outs, prompts))
        print(dtype, kind, f"engine (static, graphs) == solo eager: {same}/4", flush=True)
        bad += dtype == torch.float32 and same < 4
    ids = torch.tensor([prompts[3]], device="cuda")
    with torch.no_grad():
        lo = [model(ids, Step.prefill(KVCache.for_model(model, max_len=64, rotate=r), 0)).float() for r in (False, True)]
    err = (lo[0] - lo[1]).abs().max().item()
    print(dtype, f"rotated f32/model-dtype cache vs plain: max |dlogit| {err:.2e}", flush=True)
    bad += err > (1e-3 if dtype == torch.float32 else 0.25)
model = build_model(cfg, weights, device="cuda", dtype=torch.bfloat16)
rows = [fill(model, 4 * 2 ** 20, 4, kind) for kind in ("bf16", "q8_0")]
for r in rows:
    print(r, flush=True)
print("q8_0 / bf16 tokens held:", rows[1]["kv_tokens_held"] / rows[0]["kv_tokens_held"])
sys.exit(1 if bad else 0)
