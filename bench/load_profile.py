"""Where `kiln.load` spends its time on a GPU: CUDA's start-up timed apart, then one cProfile'd load of a
GGUF file; prints the top functions by cumulative and by own time and writes them with the totals as JSON.

Usage (GPU machine, repo root): python bench/load_profile.py FILE.gguf [--out load_profile.json]
"""
import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

t0 = time.perf_counter()
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import kiln  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--out", type=Path)
a = ap.parse_args()
imports = time.perf_counter() - t0
t = time.perf_counter()
torch.zeros(1, device="cuda")
torch.cuda.synchronize()
cuda_init = time.perf_counter() - t
prof = cProfile.Profile()
t = time.perf_counter()
prof.enable()
model, tok = kiln.load(a.model)
torch.cuda.synchronize()
prof.disable()
load = time.perf_counter() - t
t = time.perf_counter()
model2, _ = kiln.load(a.model)
torch.cuda.synchronize()
load2 = time.perf_counter() - t
res = {"imports_s": imports, "cuda_init_s": cuda_init, "load_s": load, "second_load_s": load2}
for key in ("cumulative", "tottime"):
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats(key).print_stats(35)
    res[key] = s.getvalue()
print(json.dumps({k: v for k, v in res.items() if k.endswith("_s")}))
print(res["cumulative"][-6000:])
print(res["tottime"][-4000:])
if a.out:
    a.out.write_text(json.dumps(res, indent=1))
