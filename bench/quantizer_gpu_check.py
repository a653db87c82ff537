"""kiln's quantizers (kiln/quant/quantize.py) on the GPU: byte identity with llama.cpp's stored outputs
(tests/data/quant_refs.npz, the random input) and time per type on a 4096 x 4096 weight.

Run on the GPU machine (not part of the test run):  python bench/quantizer_gpu_check.py [--size 4096]
(--device cpu runs the same check on the CPU.)
Prints one line per type and case and a JSON summary; exit code 1 when a type is not byte-identical.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kiln.quant.quantize import quantize  # noqa: E402
from tests.data.make_quant_refs import LEGACY_IMATRIX_TYPES, TYPES, importance, random_input  # noqa: E402

T = gguf.GGMLQuantizationType


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    dev = torch.device(a.device)
    refs = np.load(Path(__file__).resolve().parents[1] / "tests" / "data" / "quant_refs.npz")
    x = torch.from_numpy(random_input()).to(dev)
    imx = torch.from_numpy(importance(x.shape[1])).to(dev)
    big = torch.randn(a.size, a.size, device=dev) * 0.02
    big_imx = torch.rand(a.size, device=dev) ** 3
    out, bad = {}, 0
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    cases = [(t, False) for t in TYPES] + [(t, True) for t in TYPES + LEGACY_IMATRIX_TYPES]
    for name, with_imx in cases:
        key = f"random_{name}" + ("_imatrix" if with_imx else "")
        ours = quantize(x, T[name], imx if with_imx else None).cpu().numpy()
        size = gguf.GGML_QUANT_SIZES[T[name]][1]
        same = (ours.reshape(-1, size) == refs[key].reshape(-1, size)).all(1)
        sync()
        t0 = time.perf_counter()
        quantize(big, T[name], big_imx if with_imx else None)
        sync()
        dt = time.perf_counter() - t0
        out[key] = {"identical": float(same.mean()), "seconds": dt,
                    "mweights_per_s": big.numel() / dt / 1e6}
        bad += not same.all()
        print(f"{key:24s} identical {same.mean():.4f}  {dt:7.3f} s for {a.size}x{a.size}", flush=True)
    print(json.dumps({"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "size": a.size, "results": out}))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
