"""Quantize a GGUF file with llama.cpp's own quantizer (llama_model_quantize through llama-cpp-python), to
benchmark kiln on files llama.cpp made rather than on bench/make_gguf.py's random blocks.

Usage (own process: llama_cpp is imported before numpy or torch):
    python bench/llama_quantize.py SRC_F16.gguf OUT.gguf Q4_K_M|Q8_0|Q6_K|Q5_K_M|Q4_0 [--threads N]
"""
import argparse
import os
import sys
import time

import llama_cpp

FTYPES = {"Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}  # llama.h's LLAMA_FTYPE_MOSTLY_*

ap = argparse.ArgumentParser()
ap.add_argument("src")
ap.add_argument("out")
ap.add_argument("type", choices=sorted(FTYPES))
ap.add_argument("--threads", type=int, default=os.cpu_count())
a = ap.parse_args()
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = FTYPES[a.type]
params.nthread = a.threads
t = time.perf_counter()
rc = llama_cpp.llama_model_quantize(a.src.encode(), a.out.encode(), params)
print(f"llama_model_quantize {a.type}: rc {rc}, {time.perf_counter() - t:.1f} s, {os.path.getsize(a.out) / 2**20:.0f} MiB"
      if rc == 0 else f"llama_model_quantize failed: rc {rc}", file=sys.stderr)
sys.exit(rc != 0)
