"""In-graph time of GemvConfig variants (M = 1) at 8B decode shapes, random packed weights; JSON lines
to stdout. Usage (GPU machine): python bench/gemv_sweep.py [--budget-s 170]"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_profile import weight_copies  # noqa: E402
from gpu_quant_check import graph_us, random_rows  # noqa: E402

from kiln.quant import kernels as K  # noqa: E402

SHAPES = [(K.Q4_K, 4096, 4096), (K.Q4_K, 24576, 4096), (K.Q4_K, 4096, 12288), (K.Q6_K, 4096, 12288),
          (K.Q4_K, 6144, 4096)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=170)
    a = ap.parse_args()
    t0 = time.time()
    grid = [K.GemvConfig(block_n=bn, block_k=bk, num_warps=w, split_k=s)
            for bk in (256, 512) for bn in (16, 32, 64) for w in (4, 8) for s in (1, 0)]
    for qtype, n, k in SHAPES:
        w0 = K.repack(random_rows(qtype, n, k), qtype, (n, k))
        ws = weight_copies(w0)
        copies = len(ws)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        row = {"format": K.FORMATS[qtype].name, "n": n, "k": k, "mb": w0.nbytes / 1e6,
               "table": graph_us(lambda i: (lambda: K.gemv(x, ws[i])), copies), "configs": {}}
        for cfg in grid:
            if time.time() - t0 > a.budget_s:
                break
            key = f"bn{cfg.block_n}_bk{cfg.block_k}_w{cfg.num_warps}_s{cfg.split_k}"
            try:
                row["configs"][key] = graph_us(lambda i: (lambda: K.gemv(x, ws[i], config=cfg)), copies)
            except Exception as e:  # noqa: BLE001
                row["configs"][key] = f"error {type(e).__name__}"
        ok = {c: v for c, v in row["configs"].items() if isinstance(v, float)}
        row["best"] = min(ok, key=ok.get) if ok else None
        row["best_gb_s"] = w0.nbytes / ok[row["best"]] / 1e3 if ok else None
        row["table_gb_s"] = w0.nbytes / row["table"] / 1e3
        print(json.dumps(row), flush=True)
        del ws
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
