"""The engine (kiln serve's batched steps) on a CPU + GPU split on a real GPU: its decode steps with the GPU
blocks from a graph per row count (split.DeviceGraphs) against the same engine stepping them eagerly, and
where an eager split step's time goes.

Prints one JSON object: for graphs on and off, tokens per second of n_req concurrent greedy requests
(64-token prompts, `-n` tokens each) and their tokens; the share of tokens on which the two agree (bf16:
the fused decode kernels against SDPA, so a near-tie may flip on random weights); then cProfile's top
functions over a few eager batch-1 decode steps.

Usage: python bench/split_engine_check.py /tmp/g/qwen3-8b-Q4_K_M.gguf [--gpu-memory 3G] [-n 32] [--req 4]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time

import torch

sys.path.insert(0, ".")
import kiln  # noqa: E402
from kiln.engine import Engine, EngineRequest  # noqa: E402
from kiln.fit import parse_bytes, plan_for  # noqa: E402
from kiln.sample import SamplingParams  # noqa: E402


def serve(model, tok, prompts, n: int, graphs: bool) -> tuple[float, list]:
    e = Engine(model, tok, n_slots=len(prompts), ctx_size=512)
    if not graphs:
        e._step.split_graphs = None
    e.start()
    try:
        warm = e.submit(EngineRequest(prompt=prompts[0], params=SamplingParams(), max_tokens=4, ignore_eos=True))
        list(warm.sync())
        t = time.perf_counter()
        hs = [e.submit(EngineRequest(prompt=p, params=SamplingParams(), max_tokens=n, ignore_eos=True))
              for p in prompts]
        outs = [[o.token for o in h.sync()] for h in hs]
        return sum(map(len, outs)) / (time.perf_counter() - t), outs
    finally:
        e.stop()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--gpu-memory", default="3G")
    p.add_argument("-n", type=int, default=32)
    p.add_argument("--req", type=int, default=4)
    a = p.parse_args()
    plan = plan_for(a.model, ctx_size=4096, gpu_memory=parse_bytes(a.gpu_memory))
    model, tok = kiln.load(a.model, device="cuda", n_gpu_layers=plan.n_gpu_layers, ctx_size=4096)
    prompts = [list(range(1000 + 97 * i, 1064 + 97 * i)) for i in range(a.req)]
    out = {"n_gpu_layers": plan.n_gpu_layers, "requests": a.req, "tokens_each": a.n}
    on_tps, on = serve(model, tok, prompts, a.n, True)
    off_tps, off = serve(model, tok, prompts, a.n, False)
    out.update(graphs_tok_s=on_tps, eager_tok_s=off_tps)
    pairs = [(x, y) for r, s in zip(on, off) for x, y in zip(r, s)]
    out["agree"] = sum(x == y for x, y in pairs) / max(len(pairs), 1)
    out["first_tokens_equal"] = [r[0] == s[0] for r, s in zip(on, off)]
    from kiln.decoder import Decoder
    dec = Decoder.for_model(model, 128)
    dec.graphs = None
    with torch.inference_mode():
        tok_ = dec.prefill(torch.tensor([prompts[0]]), 0).argmax(-1)
        for i in range(2):
            tok_ = dec.step(tok_, 64 + i).argmax(-1)
        prof = cProfile.Profile()
        prof.enable()
        t = time.perf_counter()
        for i in range(4):
            tok_ = dec.step(tok_, 66 + i).argmax(-1)
        out["eager_step_ms"] = 1e3 * (time.perf_counter() - t) / 4
        prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(14)
    print(json.dumps(out))
    print(s.getvalue()[-3500:])


if __name__ == "__main__":
    main()
