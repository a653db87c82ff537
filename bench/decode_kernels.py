"""The kernels of one captured decode step, for comparing two commits (bench/ab_commits.sh's sides): the
CUDA-graph step as generate replays it, timed (CUDA events over 200 replays) and profiled (torch.profiler
sees the kernels inside graph replays), µs per step per kernel name. Works with the Decoder of before
issue 10 (`generate.decoder_for`) and after (`generate.DecoderPool`).

Usage (GPU machine, the side's checkout on PYTHONPATH):  python bench/decode_kernels.py FILE.gguf [--pos 512]
Prints one JSON object: step_us, kernels [{name, per_step, us_per_step}], the most expensive first.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import kiln


def decoder(model, max_len: int):
    try:
        from kiln.decoder import DecoderPool
        return DecoderPool(model, keep=1).get(max_len)
    except ImportError:  # before issue 10
        from kiln.generate import decoder_for
        return decoder_for(model, max_len)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--pos", type=int, default=512)
    a = p.parse_args(argv)
    model, _ = kiln.load(a.model)
    dec = decoder(model, a.pos + 256)
    tok = torch.tensor([1], device="cuda")
    with torch.inference_mode():
        for _ in range(5):
            dec.step(tok, a.pos)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(200):
            dec.step(tok, a.pos)
        end.record()
        end.synchronize()
        steps = 20
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                dec.step(tok, a.pos)
            torch.cuda.synchronize()
    table = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            table[e.name[:90]][0] += 1
            table[e.name[:90]][1] += e.device_time
    rows = sorted(table.items(), key=lambda kv: -kv[1][1])
    print(json.dumps({"model": a.model, "step_us": start.elapsed_time(end) * 1e3 / 200,
                      "kernel_us_per_step": sum(v[1] for _, v in rows) / steps,
                      "kernels": [{"name": n, "per_step": c / steps, "us_per_step": round(t / steps, 2)}
                                  for n, (c, t) in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
