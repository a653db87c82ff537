"""Time ops/kv_write.encode_kv alone on a GPU (one token, batch 1) for the cache sides a decode step writes:
rotated q8_0 / q4_0 keys and values (kv_types.Basis) at the head shapes of the benchmark models, for each
(dot precision, warps) variant; then each compiled variant's registers and spills.
Prints one JSON line per case: µs per call in a CUDA graph and as eager launches."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kiln.kv_types import Basis, layout  # noqa: E402
from kiln.ops.kv_write import Side, encode_kv  # noqa: E402


def side(kind, kh, s, d, basis):
    parts = tuple(torch.zeros(1, kh, s, w, dtype=dt if kind in ("q8_0", "q4_0", "fp8") else torch.bfloat16,
                              device="cuda") for w, dt in layout(kind, d))
    return Side(kind, parts, basis, 0)


import kiln.ops.kv_write as KW  # noqa: E402

VARIANTS = [("ieee", None), ("ieee", 4), ("ieee", 8)]  # None: encode_warps(d)
default_warps = KW.encode_warps
SHAPES = ((16, 8, 128), (32, 8, 64), (4, 1, 256))  # Qwen3-0.6B / 8B-like, Llama-3.2-1B, Gemma-3-1B
for (prec, warps), (h, kh, d) in ((v, s) for v in VARIANTS for s in SHAPES):
    KW.ROT_PREC = prec
    KW.encode_warps = default_warps if warps is None else (lambda _d, w=warps: w)
    q = torch.randn(1, 1, h, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 1, kh, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    pos = torch.tensor([100], device="cuda")
    for kind, rot in (("q8_0", True), ("q4_0", True)):
        bk = Basis(d, "cuda") if rot else None
        bv = Basis(d, "cuda") if rot else None
        ks, vs = side(kind, kh, 1024, d, bk), side(kind, kh, 1024, d, bv)
        fn = lambda: encode_kv(q, k, v, ks, vs, pos)  # noqa: E731
        fn()
        eager = triton.testing.do_bench(fn, warmup=20, rep=200) * 1e3
        graph = triton.testing.do_bench_cudagraph(fn, rep=200) * 1e3
        print(json.dumps({"prec": prec, "warps": warps or default_warps(d), "h": h, "kh": kh, "d": d, "kind": kind,
                          "rotated": rot, "eager_us": round(eager, 2), "graph_us": round(graph, 2)}), flush=True)

try:  # registers and spills of each compiled variant (Triton's per-device cache of compiled kernels)
    from kiln.ops.kv_write import _encode_kernel
    for dev, caches in _encode_kernel.device_caches.items():
        for key, kern in caches[0].items():
            print(json.dumps({"n_regs": getattr(kern, "n_regs", None), "n_spills": getattr(kern, "n_spills", None),
                              "shared": getattr(kern.metadata, "shared", None), "key": str(key)[-160:]}))
except Exception as e:  # noqa: BLE001
    print("no kernel metadata:", repr(e))
