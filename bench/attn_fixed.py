"""Decode attention's cost that does not scale with the keys read: one token of batch 1 against a bf16 cache,
timed in a CUDA graph (as a decode step replays it) at a short and a long depth, in a short and a long cache,
at the default split count and at forced ones. A decode step at depth 0 in a 16.6k-token cache ran 0.29 ms
slower than in a 640-token one (Qwen3-8B, H100: 442 against 507 tok/s); this says how much of that is the
attention call's.

Prints one JSON line per (shape, cache, depth, splits): microseconds per call (split + merge kernels).
Usage (GPU machine): python bench/attn_fixed.py [--shapes qwen3-8b,qwen3-0.6b] > attn_fixed.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import triton.testing

sys.path.insert(0, ".")
from kiln.ops.attention import decode_attention, decode_attention_ref  # noqa: E402

SHAPES = {"qwen3-0.6b": (16, 8, 128), "llama-3.2-1b": (32, 8, 64), "qwen3-8b": (32, 8, 128)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="qwen3-8b,qwen3-0.6b,llama-3.2-1b")
    p.add_argument("--caches", default="640,16640")
    p.add_argument("--splits", default="0,1,4,10")
    a = p.parse_args()
    for name in a.shapes.split(","):
        h, kh, d = SHAPES[name]
        for s_max in (int(x) for x in a.caches.split(",")):
            g = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(1, 1, h, d, device="cuda", generator=g).bfloat16()
            kc = torch.randn(1, kh, s_max, d, device="cuda", generator=g).bfloat16()
            vc = torch.randn(1, kh, s_max, d, device="cuda", generator=g).bfloat16()
            for depth in sorted({64, s_max - 256}):
                pos = torch.tensor([depth - 1], device="cuda")
                ref = decode_attention_ref(q, kc, vc, pos, d ** -0.5).float()
                for ns in (int(x) for x in a.splits.split(",")):
                    out = decode_attention(q, kc, vc, pos, d ** -0.5, splits=ns or None)
                    err = (out.float() - ref).abs().max().item()
                    us = 1e3 * triton.testing.do_bench_cudagraph(
                        lambda: decode_attention(q, kc, vc, pos, d ** -0.5, splits=ns or None), rep=40)
                    print(json.dumps({"shape": name, "cache": s_max, "depth": depth,
                                      "splits": ns, "us": round(us, 2),
                                      "gb_s": round(2 * kh * depth * d * 2 / us / 1e3, 1), "max_err": err}), flush=True)


if __name__ == "__main__":
    main()
