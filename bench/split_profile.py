"""Where a CPU + GPU split's decode step spends its time (the GPU machine's cores run the CPU blocks):
tok/s at a few torch thread counts, then cProfile's top functions over 16 steps at the best count.

Usage: python bench/split_profile.py FILE.gguf [--gpu-memory 3G] [--threads 8,16]
"""

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
from bench.split_check import decode_tps  # noqa: E402
from kiln import native  # noqa: E402
from kiln.fit import parse_bytes, plan_for  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--gpu-memory", default="3G")
    p.add_argument("--threads", default="4,8,16")
    a = p.parse_args()
    plan = plan_for(a.model, ctx_size=4096, gpu_memory=parse_bytes(a.gpu_memory))
    model, _ = kiln.load(a.model, device="cuda", n_gpu_layers=plan.n_gpu_layers, ctx_size=4096)
    ids = list(range(1000, 1256))
    out = {"n_gpu_layers": plan.n_gpu_layers, "native": native.available(), "tok_s": {}}
    for t in (int(x) for x in a.threads.split(",")):
        torch.set_num_threads(t)
        out["tok_s"][t] = decode_tps(model, ids, 16)
    best = max(out["tok_s"], key=out["tok_s"].get)
    torch.set_num_threads(best)
    prof = cProfile.Profile()
    prof.enable()
    t = time.perf_counter()
    decode_tps(model, ids, 16)
    out["profiled_s"] = time.perf_counter() - t
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
    print(json.dumps(out))
    print(s.getvalue()[-6000:])


if __name__ == "__main__":
    main()
