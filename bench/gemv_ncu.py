"""The one-row int8 GEMV (kiln.quant.gemv_int8) of one shape for Nsight Compute, and its in-graph time.

  ncu --set full --clock-control none -k regex:_gemv_q8_kernel --launch-skip 3 --launch-count 1 -o rep \
      python bench/gemv_ncu.py --format Q4_K --n 16384 --k 2048 [--block-n 4 --warps 4]

Random GGUF blocks of the shape (bench/int8_ab.py's `packed`), x quantized once, the GEMV called `--calls`
times on one weight (the first compiles). `--time` instead prints the in-graph µs per call over rotating
copies (int8_ab.py's `rotating`: HBM, not the L2) and TB/s, as int8_ab.py's micro step, for the table config and
each `--configs` block_n:warps (route.Q8Config's fields)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gpu_quant_check as G  # noqa: E402
from int8_ab import packed, rotating, sms  # noqa: E402

from kiln.quant import packed as K  # noqa: E402
from kiln.quant import route as R  # noqa: E402
from kiln.quant.gemv_int8 import gemv_int8, quantize_act  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--format", default="Q4_K")
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--k", type=int, default=2048)
    p.add_argument("--block-n", type=int, default=0, help="rows a program (0: route.q8_table's)")
    p.add_argument("--warps", type=int, default=0, help="warps a program (0: route.q8_table's)")
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--time", action="store_true")
    p.add_argument("--configs", default="", help="block_n:warps timed beside the table's, comma-separated")
    a = p.parse_args()
    qt = getattr(K, a.format)
    x = torch.randn(1, a.k, device="cuda", dtype=torch.bfloat16)
    act = quantize_act(x)

    def cfg(bn, warps):
        rows, table_warps = R.q8_table(qt, a.n, a.k)
        return R.q8_config(qt, a.n, a.k, sms(), block_n=bn or rows, num_warps=warps or table_warps)

    if not a.time:
        w = packed(qt, a.n, a.k)
        c = cfg(a.block_n, a.warps)
        for _ in range(a.calls):
            gemv_int8(act, w, None, c)
        torch.cuda.synchronize()
        return
    ws = rotating(qt, a.n, a.k)
    pairs = [(a.block_n, a.warps)] + [tuple(int(v) for v in s.split(":")) for s in a.configs.split(",") if s]
    for fields in pairs:
        c = cfg(*fields)
        us = G.graph_us(lambda i: (lambda: gemv_int8(act, ws[i], None, c)), len(ws))
        print(json.dumps({"device": torch.cuda.get_device_name(), "format": a.format, "n": a.n, "k": a.k,
                          "config": dataclasses.asdict(c), "mb": round(ws[0].nbytes / 1e6, 2),
                          "us": round(us, 2), "tb_s": round(ws[0].nbytes / us / 1e6, 3)}), flush=True)


if __name__ == "__main__":
    main()
