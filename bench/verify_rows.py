"""What a speculative verify of T tokens costs against one decode step, on any device (CPU too): the
generate path's Decoder.step for one token and Decoder.verify for T = 2, 3, 5, 9 after a prompt, medians of
repeated timings. On CPU this is the price of speculative decoding's check: a few-row GEMV that is
compute-bound costs nearly a pass per row.

Usage: python bench/verify_rows.py [--model qwen2.5-coder-1.5b] [--device cpu] [--rows 2,3,5,9] [--depth 256]
Prints one JSON object: ms per call by rows, and each as a multiple of the one-token step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

sys.path.insert(0, ".")
import kiln  # noqa: E402
from kiln.decoder import Decoder  # noqa: E402


def timed(fn, device: str, n: int = 5) -> float:
    times = []
    for _ in range(n):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


@torch.inference_mode()
def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", default="2,3,5,9")
    p.add_argument("--depth", type=int, default=256)
    a = p.parse_args()
    model, _ = kiln.load(a.model, device=a.device)
    rows = [int(r) for r in a.rows.split(",")]
    dec = Decoder.for_model(model, a.depth + max(rows) + 8)
    dev = dec.cache.k.device
    dec.prefill(torch.randint(100, 1000, (1, a.depth), device=dev), 0)
    one = torch.randint(100, 1000, (1,), device=dev)
    out = {"model": a.model, "device": a.device, "threads": torch.get_num_threads(), "depth": a.depth, "ms": {}}
    for _ in range(2):
        dec.step(one, a.depth)
    out["ms"][1] = timed(lambda: dec.step(one, a.depth), a.device)
    for t in rows:
        ids = torch.randint(100, 1000, (1, t), device=dev)
        for _ in range(2):
            dec.verify(ids, a.depth)
        out["ms"][t] = timed(lambda: dec.verify(ids, a.depth), a.device)
    out["steps"] = {t: round(ms / out["ms"][1], 2) for t, ms in out["ms"].items()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
