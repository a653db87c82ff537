"""Where a CUDA-graph decode step's time goes, kernel by kernel, at a given depth (GPU machine only).

    python bench/graph_timeline.py MODEL.gguf [--depth 16384] [--steps 20] [--read-ceiling] > timeline.json

Captures the Decoder's one-token graph after a `depth`-token prefill, replays it under torch.profiler (CUPTI
records the kernels inside a graph) and splits the kernel records into steps. With programmatic dependent launch
a kernel starts before its predecessor ends and its duration includes the wait, so each kernel is charged its
*exclusive* time: end - max(start, the previous kernel's end), the time it adds to the step's critical path. Prints
one JSON object: the step's span, the sum of exclusive times by kernel name (per step), per-layer figures and the
gap between steps, and the step with an argmax after it (torch's, then kiln.ops.argmax), as kiln bench's decode
loop runs it, in µs a token. --read-ceiling adds what a plain read of one layer's KV bytes costs in a graph (torch's
sum over as many distinct tensors as the model has layers, so they stream from HBM, not the L2): the attention's
floor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def kernel_records(fn, steps: int) -> list[tuple[str, float, float]]:
    """(name, start µs, end µs) of every GPU kernel `steps` calls of fn ran, in start order."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    recs = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
            if e.device_type.name == "CUDA" and "Memcpy" not in e.name and "Memset" not in e.name]
    return sorted(recs, key=lambda r: r[1])


def timeline(recs, steps: int) -> dict:
    n = len(recs) // steps
    per = [recs[i * n:(i + 1) * n] for i in range(steps)]
    spans, gaps, by_name, by_index = [], [], defaultdict(list), defaultdict(list)
    for s, step in enumerate(per):
        spans.append(step[-1][2] - step[0][1])
        if s:
            gaps.append(step[0][1] - per[s - 1][-1][2])
        prev_end = step[0][1]
        acc = defaultdict(float)
        for i, (name, start, end) in enumerate(step):
            excl = end - max(start, prev_end)
            acc[name[:70]] += excl
            by_index[i].append((name[:70], excl, end - start))
            prev_end = max(prev_end, end)
        for k, v in acc.items():
            by_name[k].append(v)
    names = sorted(by_name, key=lambda k: -statistics.median(by_name[k]))
    return {"kernels_per_step": n, "span_us": statistics.median(spans), "gap_us": statistics.median(gaps or [0]),
            "exclusive_us_by_name": {k: round(statistics.median(by_name[k]), 2) for k in names},
            "launches_by_name": {k: sum(1 for r in per[0] if r[0][:70] == k) for k in names},
            "first_layer": [{"kernel": v[0][0], "excl_us": round(statistics.median(x[1] for x in v), 2),
                             "dur_us": round(statistics.median(x[2] for x in v), 2)}
                            for i, v in sorted(by_index.items())][:40]}


def read_ceiling(layers: int, nbytes: int) -> dict:
    """µs per torch.sum of one of `layers` distinct bf16 tensors of nbytes, in a CUDA graph."""
    xs = [torch.randn(nbytes // 2, device="cuda").bfloat16() for _ in range(layers)]
    out = torch.empty(layers, device="cuda")
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for i, x in enumerate(xs):
            out[i] = x.sum(dtype=torch.float32)
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        for i, x in enumerate(xs):
            out[i] = x.sum(dtype=torch.float32)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        g.replay()
    torch.cuda.synchronize()
    us = (time.perf_counter() - t) / 20 / layers * 1e6
    return {"bytes": nbytes, "us_per_read": round(us, 2), "gb_s": round(nbytes / us / 1e3, 1)}


@torch.inference_mode()
def main(tags: dict | None = None) -> int:
    """`tags`: fields added to the printed record (bench/fusion_bound.py's "skip")."""
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--depth", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--read-ceiling", action="store_true")
    a = ap.parse_args()
    import kiln
    from kiln.decoder import Decoder
    model, _ = kiln.load(a.model, device="cuda")
    cfg = model.args
    dec = Decoder.for_model(model, a.depth + 256)
    if a.depth:
        dec.prefill(torch.randint(100, 30000, (1, a.depth), generator=torch.Generator().manual_seed(0)).cuda(), 0)
    tok = torch.zeros(1, dtype=torch.long, device="cuda")
    for i in range(5):
        dec.step(tok, a.depth + i)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(50):
        dec.step(tok, a.depth + 5)
    torch.cuda.synchronize()
    out = {"model": Path(a.model).name, "device": torch.cuda.get_device_name(), "depth": a.depth,
           "step_ms_wall": round((time.perf_counter() - t) / 50 * 1e3, 4)}
    out.update(timeline(kernel_records(lambda: dec.step(tok, a.depth + 5), a.steps), a.steps))
    from kiln.ops import argmax
    for name, pick in (("torch", lambda x: x.argmax(-1)), ("kiln", argmax)):  # kiln bench's decode loop
        t = torch.zeros(1, dtype=torch.long, device="cuda")
        for i in range(5):
            t = pick(dec.step(t, a.depth + 5))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(100):
            t = pick(dec.step(t, a.depth + 5))
        torch.cuda.synchronize()
        out[f"loop_us_{name}_argmax"] = round((time.perf_counter() - t0) / 100 * 1e6, 2)
    layers = cfg.num_hidden_layers
    out["layers"] = layers
    if a.read_ceiling and a.depth:
        kv = 2 * cfg.num_key_value_heads * cfg.head_dim * 2 * a.depth
        out["read_ceiling"] = read_ceiling(layers, kv)
    print(json.dumps({**out, **(tags or {})}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
