"""Where a prefill's time goes: wall time of warm prefills, the CUDA kernels of one, the host's functions.

Usage (on the GPU machine, from a checkout):
    python bench/prefill_profile.py --model a.gguf,b.gguf -p 128,512,4096 -n 20 --cprofile 512 \
        --variants base,graph --json out.json
For each model, prompt length and variant: the median / min wall time per prefill (host included,
synchronized once per prefill), the GPU kernel time and kernel count of one prefill (torch.profiler, kernel
events only), so host overhead (wall minus kernel time) is visible; with --cprofile P, the host functions
that take the most time over 10 prefills of P tokens (cProfile, own time). Variants:
  base   the checkout as it is;
  mask   attention as before the causal-square change (an explicit (T, S) mask, repeated KV heads);
  graph  the same prefill captured once in a CUDA graph and replayed (the floor for host overhead).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import time

import torch


def _old_attend(q, k, v, mask, scale):
    import torch.nn.functional as F
    b, h, t, _ = q.shape
    if mask is None:
        s = k.shape[2]
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    if k.shape[1] != h:
        k = k.repeat_interleave(h // k.shape[1], dim=1)
        v = v.repeat_interleave(h // v.shape[1], dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(b, t, -1)


def _variant(name, model, ids, cache):
    from kiln.decoder import prefill_chunk
    from kiln.models import base
    base.attend = _old_attend if name == "mask" else _ATTEND
    fn = lambda: prefill_chunk(model, ids, cache, 0)  # noqa: E731
    if name != "graph":
        return fn
    from kiln.ops.graph import capture_graph
    graph, out = capture_graph(fn)
    return lambda: (graph.replay(), out)[1]


def _kernels(fn):
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn().argmax(-1)
        torch.cuda.synchronize()
    rows = [(e.self_device_time_total, e.count, e.key) for e in prof.key_averages()
            if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
    rows.sort(reverse=True)
    return sum(r[0] for r in rows) / 1e3, sum(r[1] for r in rows), rows


def _wall(fn, n):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    walls = []
    for _ in range(n):
        t = time.perf_counter()
        fn().argmax(-1)
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t)
    return walls


def _host(fn, top):
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    prof.disable()
    st = pstats.Stats(prof)
    rows = sorted(((v[2] / 10, v[1] / 10, f"{k[0].split('/')[-1]}:{k[1]}:{k[2]}") for k, v in st.stats.items()),
                  reverse=True)
    return {"total_ms": 1e3 * st.total_tt / 10,
            "top": [{"ms": round(1e3 * t, 3), "calls": round(c, 1), "fn": name} for t, c, name in rows[:top]]}


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="comma-separated GGUF paths")
    ap.add_argument("-p", default="512", help="comma-separated prompt lengths")
    ap.add_argument("-n", type=int, default=20)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--cprofile", type=int, default=0, help="prompt length to profile the host at (0: none)")
    ap.add_argument("--variants", default="base")
    ap.add_argument("--json")
    a = ap.parse_args()
    import kiln
    from kiln.decoder import DecoderPool
    from kiln.models import base
    global _ATTEND
    _ATTEND = base.attend
    results = []
    for path in a.model.split(","):
        model, _ = kiln.load(path, device="cuda")
        lengths = [int(x) for x in a.p.split(",")]
        cache = DecoderPool(model).get(max(lengths) + 8).cache
        for p in lengths:
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(100, min(model.args.vocab_size, 32000), (1, p), generator=g).cuda()
            for v in a.variants.split(","):
                try:
                    fn = _variant(v, model, ids, cache)
                    walls = _wall(fn, a.n)
                    kms, count, rows = _kernels(fn)
                except Exception as e:  # noqa: BLE001 - a variant that cannot run is a result too
                    print(f"{path} p={p} {v}: failed: {type(e).__name__}: {e}")
                    results.append({"model": path, "p": p, "variant": v, "error": f"{type(e).__name__}: {e}"})
                    continue
                r = {"model": path, "p": p, "variant": v, "wall_ms_median": 1e3 * statistics.median(walls),
                     "wall_ms_min": 1e3 * min(walls), "kernel_ms": kms, "kernels": count,
                     "prefill_tok_s": p / statistics.median(walls),
                     "top": [{"us": round(d, 1), "count": c, "name": k[:90]} for d, c, k in rows[:a.top]]}
                if p == a.cprofile and v == "base":
                    r["host"] = _host(fn, 30)
                print(f"{path.split('/')[-1]} p={p} {v}: wall {r['wall_ms_median']:.2f} ms (min "
                      f"{r['wall_ms_min']:.2f}), kernels {kms:.2f} ms in {count}, {r['prefill_tok_s']:.0f} tok/s",
                      flush=True)
                results.append(r)
        base.attend = _ATTEND
        del model, cache
        torch.cuda.empty_cache()
    if a.json:
        json.dump(results, open(a.json, "w"), indent=1)


_ATTEND = None

if __name__ == "__main__":
    main()
