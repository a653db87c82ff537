"""GPU check of generation's CUDA graphs: the batch-1 Decoder's captured step against the eager step, and the
engine's captured batched steps (with and without the look-ahead; the prompts prefilled together) against solo runs, greedy and sampled,
fp32 and bf16, on a tiny random qwen2. Prints one line per check and exits 1 if any disagrees.

Usage on the GPU machine, repo root: python bench/gpu_engine_check.py
"""
import sys
import torch
sys.path.insert(0, ".")
from transformers import AutoConfig, AutoModelForCausalLM
from kiln.load import build_model
from kiln.decoder import Decoder, DecoderPool
from kiln.generate import generate_step
from kiln.sample import SamplingParams
from kiln.engine import Engine, EngineRequest

cfg = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
           num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6, model_type="qwen2",
           rope_theta=1e6, tie_word_embeddings=True)
conf = AutoConfig.for_model("qwen2", **{k: v for k, v in cfg.items() if k != "model_type"})
torch.manual_seed(0)
hf = AutoModelForCausalLM.from_config(conf, dtype=torch.float32).eval()
with torch.no_grad():
    for n, p in hf.named_parameters():
        p.uniform_(0.5, 1.5) if "norm" in n else p.normal_(0, 0.15)
bad = 0
for dtype in (torch.float32, torch.bfloat16):
    model = build_model(cfg, hf.state_dict(), device="cuda", dtype=dtype)
    prompts = [torch.randint(5, 1000, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (7, 30, 12, 50)]
    def solo(p, graph, n=24, **kw):
        dec = DecoderPool(model).get(len(p) + n) if graph else Decoder.for_model(model, 256)
        if not graph: dec.use_graph = False
        out = []
        for t, _ in generate_step(p, model, SamplingParams(**kw), dec):
            out.append(t)
            if len(out) == n: break
        return out, dec
    g, dec = solo(prompts[0], True)
    e, _ = solo(prompts[0], False)
    print(dtype, "decoder graph captured:", dec.graph is not None, "graph == eager:", g == e, flush=True)
    bad += dec.graph is None or (dtype == torch.float32 and g != e)
    refs = [solo(p, True)[0] for p in prompts]
    for look in (True, False):
        eng = Engine(model, None, n_slots=4, ctx_size=256, graphs=True, look_ahead=look)
        # queued before the loop starts: the four prompts are prefilled together, in one forward of padded rows
        hs = [eng.submit(EngineRequest(p, SamplingParams(), 24, ignore_eos=True)) for p in prompts]
        eng.start()
        try:
            got = [[o.token for o in h.sync()] for h in hs]
            hs2 = [eng.submit(EngineRequest(prompts[1], SamplingParams(temperature=0.8, seed=3, repetition_penalty=1.2), 16, ignore_eos=True))]
            s2 = [o.token for o in hs2[0].sync()]
            r2, _ = solo(prompts[1], True, n=16, temperature=0.8, seed=3, repetition_penalty=1.2)
        finally:
            eng.stop()
        print(dtype, "look_ahead", look, "graphs", sorted(eng._step.graphs), "engine == solo:",
              [a == b for a, b in zip(got, refs)], "first-diff", [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(got, refs)],
              "sampled == solo:", s2 == r2, "prefill forwards", eng.stats()["prefill_forwards"], flush=True)
        bad += dtype == torch.float32 and (not all(a == b for a, b in zip(got, refs)) or s2 != r2)  # bf16: reported
    # speculative decoding on the GPU (verify graphs per row count beside the decode graph): greedy equals plain
    from kiln.speculative import ModelDrafter, NgramDrafter, speculative_step
    rep = prompts[1][:12] * 3  # repeats, so prompt lookup finds drafts
    plain = solo(rep, True, n=24)[0]
    for drafter in (NgramDrafter(3), ModelDrafter(model, 256)):
        stats = {}
        got = [t for t, _ in speculative_step(rep, model, SamplingParams(), DecoderPool(model).get(len(rep) + 24),
                                              drafter, 4, max_tokens=24, stats=stats)]
        print(dtype, type(drafter).__name__, "speculative == plain:", got == plain, stats, flush=True)
        bad += dtype == torch.float32 and got != plain
    # the engine's speculative rows (a check of K + 1 tokens a row through the fused kernels, a graph per
    # (bucket, K + 1)): greedy equals each request's plain solo run
    for kw in (dict(prompt_lookup=3, num_draft_tokens=4), dict(draft_model=model, num_draft_tokens=4)):
        eng = Engine(model, None, n_slots=4, ctx_size=256, graphs=True, **kw)
        hs = [eng.submit(EngineRequest(p, SamplingParams(), 24, ignore_eos=True)) for p in [rep] + prompts[:3]]
        eng.start()
        try:
            got = [[o.token for o in h.sync()] for h in hs]
        finally:
            eng.stop()
        want = [plain] + refs[:3]
        st = eng.stats()
        print(dtype, "engine speculative", list(kw)[0], "== solo:", [a == b for a, b in zip(got, want)],
              "check graphs", sorted(k for k in eng._step.graphs if isinstance(k, tuple)),
              "drafted", st["drafted"], "accepted", st["accepted"], flush=True)
        bad += dtype == torch.float32 and (got != want or ("draft_model" in kw and st["accepted"] != st["drafted"]))
print("FAILED" if bad else "all agree")
sys.exit(1 if bad else 0)
