"""Decode attention at depth for Nsight Compute: one token of a shape against `--depth` keys in a bf16 cache,
the split kernel and merge run `--calls` times (the first compiles). For `ncu` to profile one launch:

  ncu --set full --clock-control none -k regex:_split_kernel --launch-skip 3 --launch-count 1 -o rep \
      python bench/attn_ncu.py --shape llama-3.2-1b [--launch 64:4:2:4]

(bench/read_ceiling.py's shapes and `--launches` format: ops.attention.Launch's fields as integers.)"""

from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, ".")
from bench.read_ceiling import SHAPES  # noqa: E402
from kiln.ops.attention import Launch, decode_attention  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    p.add_argument("--depth", type=int, default=16384)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--launch", default="", help="block_n:warps:stages:tiles_per_split[:runtime_loop:interleave]")
    a = p.parse_args()
    h, kh, d = SHAPES[a.shape]
    launch = Launch(*(int(v) for v in a.launch.split(":"))) if a.launch else None
    gen = torch.Generator(device="cuda").manual_seed(0)
    s_max = a.depth + 136
    q = torch.randn(1, 1, h, d, device="cuda", generator=gen).bfloat16()
    kc = torch.randn(1, kh, s_max, d, device="cuda", generator=gen).bfloat16()
    vc = torch.randn(1, kh, s_max, d, device="cuda", generator=gen).bfloat16()
    pos = torch.tensor([a.depth - 1], device="cuda")
    for _ in range(a.calls):
        decode_attention(q, kc, vc, pos, d ** -0.5, launch=launch)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
