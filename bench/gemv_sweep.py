"""In-graph time of float GEMV configs (M = 1; split_k 0: route.float_config picks) at 8B decode shapes, random packed weights; JSON lines
to stdout. Usage (GPU machine): python bench/gemv_sweep.py [--budget-s 170]"""

import argparse
import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_profile import time_configs  # noqa: E402
from gpu_quant_check import random_rows  # noqa: E402

from kiln.quant import packed as K  # noqa: E402
from kiln.quant.route import GemvConfig  # noqa: E402

SHAPES = [(K.Q4_K, 4096, 4096), (K.Q4_K, 24576, 4096), (K.Q4_K, 4096, 12288), (K.Q6_K, 4096, 12288),
          (K.Q4_K, 6144, 4096)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=170)
    a = ap.parse_args()
    t0 = time.time()
    grid = [GemvConfig(block_n=bn, block_k=bk, num_warps=w, split_k=s)
            for bk in (256, 512) for bn in (16, 32, 64) for w in (4, 8) for s in (1, 0)]
    for qtype, n, k in SHAPES:
        w0 = K.repack(random_rows(qtype, n, k), qtype, (n, k))
        row = {"format": K.FORMATS[qtype].name, "n": n, "k": k, "mb": w0.nbytes / 1e6,
               **time_configs(w0, grid, deadline=t0 + a.budget_s)}
        if row["best"] is not None:
            row["best_gb_s"] = w0.nbytes / row["configs"][row["best"]] / 1e3
        if isinstance(row["table"], float):
            row["table_gb_s"] = w0.nbytes / row["table"] / 1e3
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
