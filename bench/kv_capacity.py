"""How much concurrent context a server's slot cache holds in one KV memory budget, per cache type (issue 12:
"a long-running server with q8_0 KV holds twice the concurrent context of bf16 in the same memory").

For each type (bf16 and q8_0 by default) the slots' context is what fits in the budget
(`engine.fit_context`, what `kiln serve --kv-budget` does), an Engine is started with it, and every slot gets
a request at once whose prompt fills it to 8 positions short of its context and which generates 4 tokens.
Reported per type: ctx per slot, the cache's bytes (`cache.nbytes`), the KV tokens the slots hold at the end
(engine stats' kv_tokens_used: every slot's prompt and output), the peak of concurrent requests, and the
process's memory (RSS growth on the CPU; torch.cuda.max_memory_allocated on a GPU). q8_0 stores 34 bytes per
32 values against bf16's 64: 1.88x the tokens, not 2x.

Usage:
    python bench/kv_capacity.py --model FILE.gguf --budget 2GiB [--parallel 4] [--types bf16,q8_0]
        [--device cuda] [--dtype bfloat16]
On the GPU, a real-config random-weight file: python bench/make_gguf.py --model qwen3-0.6b --type Q4_K_M --out DIR.
Prints one JSON line per type and the ratio of held tokens to the first type's.
"""

import argparse
import json
import time

import torch

from kiln.engine import Engine, EngineRequest, fit_context
from kiln.sample import SamplingParams


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def fill(model, budget: int, n_slots: int, kind: str | None, gen: int = 4, seed: int = 0) -> dict:
    """Start an Engine of `kind` KV in `budget` bytes, fill every slot at once, report what it holds."""
    cuda = next(model.parameters()).device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else rss()
    ctx = fit_context(model, budget, n_slots, kind, kind)
    engine = Engine(model, None, n_slots=n_slots, ctx_size=ctx, cache_type_k=kind, cache_type_v=kind)
    engine.start()
    g = torch.Generator().manual_seed(seed)
    t0, peak = time.perf_counter(), 0
    try:
        handles = [engine.submit(EngineRequest(prompt=torch.randint(0, model.args.vocab_size, (ctx - 8,), generator=g)
                                               .tolist(), params=SamplingParams(temperature=0.0), max_tokens=gen))
                   for _ in range(n_slots)]
        while any(h.finish_reason is None for h in handles):
            peak = max(peak, engine.stats()["active"])
            time.sleep(0.005)
        for h in handles:
            list(h.sync())
        stats = engine.stats()
    finally:
        engine.stop()
    grown = (torch.cuda.max_memory_allocated() if cuda else rss()) - before
    return {"type": kind or "model dtype", "budget": budget, "n_slots": n_slots, "ctx_per_slot": ctx,
            "cache_nbytes": engine.cache.nbytes, "kv_tokens_held": stats["kv_tokens_used"],
            "peak_concurrent": peak, "memory_growth" + ("_cuda_max_allocated" if cuda else "_rss"): grown,
            "seconds": time.perf_counter() - t0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--budget", default="256MiB", help="KV bytes (e.g. 2GiB, 500MB)")
    p.add_argument("--parallel", "-np", type=int, default=4)
    p.add_argument("--types", default="bf16,q8_0")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    a = p.parse_args()
    import kiln
    from kiln.serve import parse_size
    model, _ = kiln.load(a.model, device=a.device, dtype=a.dtype)
    base = None
    for kind in a.types.split(","):
        row = fill(model, parse_size(a.budget), a.parallel, kind)
        base = base or row["kv_tokens_held"]
        row["held_vs_first"] = row["kv_tokens_held"] / base
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
