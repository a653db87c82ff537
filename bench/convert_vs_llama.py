"""`kiln convert --to gguf` against llama-quantize on a real file: each tensor's type and bytes.

Usage (own process: llama_cpp is imported before numpy or torch):
    python bench/convert_vs_llama.py SRC.gguf OUT_DIR q3_k_s [iq4_xs ...] [--threads 1]

For each type: llama_model_quantize (allow_requantize, so a quantized SRC works as llama-quantize
--allow-requantize does: both dequantize it to float32 first) writes OUT_DIR/llama-<type>.gguf, `kiln convert`
(a child process, OMP_NUM_THREADS=--threads) writes OUT_DIR/kiln-<type>.gguf; prints the tensors whose type
or bytes differ, the times, and a JSON line. Exit code 1 when any tensor differs.
"""
import llama_cpp  # noqa: I001

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time

import gguf
import numpy as np

FTYPES = {"q2_k": 10, "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16,
          "q5_k_m": 17, "q6_k": 18, "iq4_nl": 25, "iq4_xs": 30, "q4_0": 2, "q8_0": 7}


def llama_quantize(src: str, out: str, ftype: int) -> float:
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.nthread, p.allow_requantize = ftype, 1, True
    t0 = time.perf_counter()
    if llama_cpp.llama_model_quantize(src.encode(), out.encode(), ctypes.byref(p)) != 0:
        raise SystemExit(f"llama_model_quantize failed for {out}")
    return time.perf_counter() - t0


def differences(ours: str, theirs: str) -> list[str]:
    tb = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    out = []
    for t in gguf.GGUFReader(ours).tensors:
        u = tb[t.name]
        if t.tensor_type != u.tensor_type:
            out.append(f"{t.name}: type {t.tensor_type.name} vs llama.cpp's {u.tensor_type.name}")
        elif not np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(u.data).view(np.uint8)):
            out.append(f"{t.name}: {t.tensor_type.name} bytes differ")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("out_dir")
    ap.add_argument("types", nargs="+", choices=sorted(FTYPES))
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    os.makedirs(a.out_dir, exist_ok=True)
    results, bad = {}, 0
    for t in a.types:
        theirs, ours = (os.path.join(a.out_dir, f"{who}-{t}.gguf") for who in ("llama", "kiln"))
        t_llama = llama_quantize(a.src, theirs, FTYPES[t])
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "kiln.cli", "convert", a.src, ours, "--to", "gguf", "--type", t],
                       check=True, env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
        t_kiln = time.perf_counter() - t0
        diff = differences(ours, theirs)
        bad += bool(diff)
        print(f"{t}: {len(diff)} tensors differ; llama.cpp {t_llama:.1f} s (1 thread), kiln {t_kiln:.1f} s "
              f"({a.threads} threads)", *diff[:10], sep="\n  ", flush=True)
        results[t] = {"differing": diff, "llama_s": t_llama, "kiln_s": t_kiln}
    print(json.dumps({"src": a.src, "results": results}))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
