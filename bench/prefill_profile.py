"""Where a prefill's time goes: wall time of many warm prefills and the CUDA kernels of one.

Usage (on the GPU machine, from a checkout; works on checkouts before and after Step existed):
    python bench/prefill_profile.py --model /tmp/g/qwen3-8b-Q4_K_M.gguf -p 512 -n 20 --top 15 --json out.json
Prints the median/min wall time per prefill (host included, synchronized once per prefill) and the GPU
kernel time of one prefill from torch.profiler, so host overhead (wall minus kernel time) and the kernel
mix are visible side by side for an A/B (bench/ab_commits.sh runs `kiln bench` only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _prefill_fn(model, ids, cache):
    try:
        from kiln.generate import prefill_chunk
        return lambda: prefill_chunk(model, ids, cache, 0)
    except ImportError:  # before Step: the model takes cache= and pos=
        return lambda: model(ids, cache=cache, pos=0, last_only=True)[:, -1].float()


def _cache(model, size):
    try:
        from kiln.generate import DecoderPool
        return DecoderPool(model).get(size).cache
    except ImportError:
        from kiln.generate import decoder_for
        return decoder_for(model, size).cache


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=20)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--json")
    a = ap.parse_args()
    import kiln
    model, _ = kiln.load(a.model, device="cuda")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, min(model.args.vocab_size, 32000), (1, a.p), generator=g).cuda()
    prefill = _prefill_fn(model, ids, _cache(model, a.p + 8))
    for _ in range(3):
        prefill()
    torch.cuda.synchronize()
    walls = []
    for _ in range(a.n):
        t = time.perf_counter()
        prefill().argmax(-1)
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        prefill().argmax(-1)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        dev = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if dev > 0:
            rows.append((dev, e.count, e.key))
    rows.sort(reverse=True)
    kernel_ms = sum(r[0] for r in rows) / 1e3
    out = {"model": a.model, "p": a.p, "wall_ms_median": 1e3 * statistics.median(walls),
           "wall_ms_min": 1e3 * min(walls), "kernel_ms": kernel_ms,
           "prefill_tok_s": a.p / statistics.median(walls),
           "top": [{"us": round(d, 1), "count": c, "name": k[:90]} for d, c, k in rows[:a.top]]}
    print(f"wall median {out['wall_ms_median']:.2f} ms  min {out['wall_ms_min']:.2f} ms  "
          f"kernels {kernel_ms:.2f} ms  ({out['prefill_tok_s']:.0f} tok/s)")
    for r in out["top"]:
        print(f"  {r['us']:10.1f} us  x{r['count']:<4} {r['name']}")
    if a.json:
        json.dump(out, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
