"""Time `kiln.load` of a GGUF file on the GPU in a fresh process, from the checkout at --root (an A/B of two
commits: run it once per side, alternating). Prints one JSON line: torch import, CUDA start-up, the header +
tokenizer read (`read_model`, timed in a first load's place by a separate call after the timed load), and
the whole load (synchronized), then a second load in the same process.

Usage (GPU machine): python bench/load_ab.py --root DIR FILE.gguf [--side NAME]
"""
import argparse
import json
import sys
import time

t0 = time.perf_counter()
import torch  # noqa: E402

imports = time.perf_counter() - t0
ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--root", default=".")
ap.add_argument("--side", default="")
a = ap.parse_args()
sys.path.insert(0, a.root)
import kiln  # noqa: E402
from kiln.reader import read_model  # noqa: E402

t = time.perf_counter()
torch.zeros(1, device="cuda")
torch.cuda.synchronize()
cuda_init = time.perf_counter() - t
t = time.perf_counter()
model, tok = kiln.load(a.model)
torch.cuda.synchronize()
load = time.perf_counter() - t
del model
torch.cuda.empty_cache()
t = time.perf_counter()
read_model(__import__("pathlib").Path(a.model))
header_tokenizer = time.perf_counter() - t
t = time.perf_counter()
model, tok = kiln.load(a.model)
torch.cuda.synchronize()
load2 = time.perf_counter() - t
print(json.dumps({"side": a.side, "root": a.root, "model": a.model, "kiln_file": kiln.__file__,
                  "torch_import_s": round(imports, 3), "cuda_init_s": round(cuda_init, 3), "load_s": round(load, 3),
                  "header_tokenizer_s": round(header_tokenizer, 3), "second_load_s": round(load2, 3)}))
