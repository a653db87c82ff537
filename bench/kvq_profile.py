"""Where a decode step over a block-quantized KV cache spends GPU time: the kernel table (torch.profiler, CUDA
activity; name, launches and µs per step) of the CUDA-graph form of a one-token step (Step.graph, run eagerly so
every launch is seen) for each cache type, and the captured step's ms per token (decoder.Decoder).

Usage (GPU machine): python bench/kvq_profile.py --model /tmp/g/qwen3-0.6b-Q4_K_M.gguf [--types none,q8_0]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import kiln  # noqa: E402
from gpu_profile import kernel_table, print_table  # noqa: E402
from kiln.cache import KVCache, Step  # noqa: E402
from kiln.decoder import Decoder  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--types", default="none,q8_0")
    ap.add_argument("--depth", type=int, default=512)
    a = ap.parse_args()
    model, _ = kiln.load(a.model, device="cuda")
    ids = torch.randint(100, 30000, (1, a.depth), device="cuda")
    tok = torch.tensor([[5]], device="cuda")
    for kind in a.types.split(","):
        t = None if kind == "none" else kind
        cache = KVCache.for_model(model, max_len=a.depth + 256, type_k=t, type_v=t)
        model(ids, Step.prefill(cache, 0), last_only=True)
        pos = torch.tensor(a.depth, device="cuda")
        step = lambda: model(tok, Step.graph(cache, pos))  # noqa: E731
        for _ in range(3):
            step()
        rows = kernel_table(step, 10)
        print_table(f"{kind}: one-token step in its graph form, run eagerly", rows, top=30)
        dec = Decoder(model, cache)
        dec.step(tok[0], a.depth)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(100):
            dec.step(tok[0], a.depth + i % 100)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / 100 * 1e3
        print(json.dumps({"cache": kind, "graph_step_ms": round(ms, 3), "launches": sum(r["per_call"] for r in rows),
                          "kernel_us": round(sum(r["us_per_call"] for r in rows), 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
