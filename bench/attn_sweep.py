"""Decode attention at depth on a GPU: each launch setting of the split kernel (ops.attention.Launch) timed
inside a CUDA graph, as a decode step replays it, for one token of batch 1 against a deep bf16 cache.

Prints one JSON line per (shape, depth, setting): microseconds per call (split + merge), the cache bytes
it had to read over that time (GB/s), and max |out - reference| (float32 torch attention). The default
setting comes first in each group; the last line names the fastest setting per (shape, depth).

Usage (GPU machine): python bench/attn_sweep.py [--depths 4096,16384] [--budget 200] [--focus] [--splits 0,66]
       [--shapes qwen3-8b] > sweep.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import torch
import triton.testing

sys.path.insert(0, ".")
from kiln.ops.attention import Launch, decode_attention, decode_attention_ref  # noqa: E402

SHAPES = {  # name: (query heads, kv heads, head dim) of the models the issue names
    "qwen3-0.6b": (16, 8, 128), "llama-3.2-1b": (32, 8, 64), "qwen3-8b": (32, 8, 128)}


def settings(focus: bool = False):
    """The default first, then the grid (each loop form: runtime trip count or masked worst case); `focus`:
    64 keys a tile, 8 or 16 tiles a split (the corner the earlier grids' best settings sat in)."""
    yield Launch()
    grid = (((64,), (True, False), (2, 3), (8, 16), (4, 8)) if focus else
            ((64, 128), (True, False), (2, 3), (4, 8), (4, 8)))
    for bn, rt, stages, tiles, warps in itertools.product(*grid):
        s = Launch(block_n=bn, warps=warps, stages=stages, tiles_per_split=tiles, runtime_loop=rt)
        if s != Launch(warps=4):
            yield s


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--depths", default="16384,4096")
    p.add_argument("--budget", type=float, default=200.0, help="seconds; settings left untimed after it")
    p.add_argument("--focus", action="store_true", help="the focused grid (see settings)")
    p.add_argument("--splits", default="0", help="split counts to time each setting at (0: the default rule)")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names of SHAPES")
    a = p.parse_args()
    t_end = time.time() + a.budget
    best = {}
    for depth in (int(x) for x in a.depths.split(",")):
        for name, (h, kh, d) in ((n, SHAPES[n]) for n in a.shapes.split(",")):
            g = torch.Generator(device="cuda").manual_seed(0)
            s_max = depth + 256
            q = torch.randn(1, 1, h, d, device="cuda", generator=g).bfloat16()
            kc = torch.randn(1, kh, s_max, d, device="cuda", generator=g).bfloat16()
            vc = torch.randn(1, kh, s_max, d, device="cuda", generator=g).bfloat16()
            pos = torch.tensor([depth - 1], device="cuda")
            ref = decode_attention_ref(q, kc, vc, pos, d ** -0.5).float()
            nbytes = 2 * kh * depth * d * 2
            for s, ns in itertools.product(settings(a.focus), [int(x) for x in a.splits.split(",")]):
                if time.time() > t_end:
                    break
                try:
                    out = decode_attention(q, kc, vc, pos, d ** -0.5, launch=s, splits=ns or None)
                    err = (out.float() - ref).abs().max().item()
                    us = 1e3 * triton.testing.do_bench_cudagraph(
                        lambda: decode_attention(q, kc, vc, pos, d ** -0.5, launch=s, splits=ns or None), rep=40)
                except Exception as e:  # a setting that does not compile (registers, shared memory)
                    print(json.dumps({"shape": name, "depth": depth, "launch": s._asdict(), "error": str(e)[:200]}))
                    continue
                row = {"shape": name, "depth": depth, "launch": s._asdict(), "splits": ns, "us": round(us, 2),
                       "gb_s": round(nbytes / us / 1e3, 1), "max_err": err}
                print(json.dumps(row), flush=True)
                key = (name, depth)
                if err < 2e-2 and (key not in best or us < best[key]["us"]):
                    best[key] = row
    print(json.dumps({"best": [best[k] for k in sorted(best)]}))


if __name__ == "__main__":
    main()
