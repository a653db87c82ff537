"""Where a speculative verify forward (Decoder.verify: K + 1 rows over the static cache) spends GPU time,
beside a decode step: the kernels of one eager forward of each (torch.profiler, CUDA kernel events; the
graph replays the same kernels without the host's launches).

Usage (GPU machine):  python bench/verify_profile.py /tmp/g/qwen3-8b-Q4_K_M.gguf [-k 1,4] [--depth 512]
Prints one JSON object: per row count T (1 = the decode step), the kernel time of one forward and its
kernels (name, launches, µs), the most expensive first.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import kiln
from kiln.cache import Step
from kiln.decoder import DecoderPool


def kernels(fn) -> dict:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    table = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            row = table[e.name[:90]]
            row[0] += 1
            row[1] += e.device_time
    rows = sorted(table.items(), key=lambda kv: -kv[1][1])
    return {"kernel_us": sum(v[1] for _, v in rows), "launches": sum(v[0] for _, v in rows),
            "top": [{"name": n, "launches": c, "us": round(t, 1)} for n, (c, t) in rows[:25]]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("-k", default="1,4")
    p.add_argument("--depth", type=int, default=512)
    a = p.parse_args(argv)
    ks = [int(x) for x in a.k.split(",")]
    model, _ = kiln.load(a.model)
    dec = DecoderPool(model, keep=1).get(a.depth + max(ks) + 2)
    ids = torch.randint(0, model.args.vocab_size, (1, a.depth + max(ks) + 1), device="cuda")
    dec.prefill(ids[:, :a.depth], 0)
    pos = torch.tensor(a.depth, device="cuda")
    out = {"device": torch.cuda.get_device_name(), "model": a.model}
    with torch.inference_mode():
        for t in [1] + [k + 1 for k in ks]:
            rows = ids[:, a.depth:a.depth + t]
            out[f"T{t}"] = kernels(lambda: model(rows, Step.graph(dec.cache, pos)))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
