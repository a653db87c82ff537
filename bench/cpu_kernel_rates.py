"""The native CPU kernels' rates on this machine (the GPU host's cores run a split's CPU layers): one decode
row through each GEMV kind on 8B-shape matrices (4096 x 12288 and back), streamed from memory (several
copies, more bytes than the last-level cache), at 1 thread and at every power of two up to the cores.
Prints one JSON object: {"native": bool, "avx512": [...], "rates": {kind: {threads: GB/s}}}.

Usage: python bench/cpu_kernel_rates.py
"""

import json
import os
import sys
import time

import torch

sys.path.insert(0, ".")
from kiln import native  # noqa: E402
from kiln.ops import cpu as ops_cpu  # noqa: E402


def _blocks(qtype: int, n: int, k: int) -> torch.Tensor:
    size, weights = native.BLOCK_WEIGHTS[qtype]
    raw = torch.randint(0, 256, (n * k // weights, size), dtype=torch.uint8)
    raw[:, 0:2] = torch.full((n * k // weights, 1), 0.01).half().view(torch.uint8)  # finite d
    return ops_cpu.block_rows(raw.view(n, -1), qtype)


def main():
    flags = open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0].split()
    out = {"native": native.available(), "avx512": sorted(f for f in flags if f.startswith("avx512")), "rates": {}}
    if not out["native"]:
        print(json.dumps(out))
        return
    n, k, copies = 12288, 4096, 8  # 8 x 12288 x 4096 weights: 230-400 MB a kind
    x = torch.randn(k)
    threads = [t for t in (1, 2, 4, 8, 16, 32, 64) if t <= (os.cpu_count() or 1)]
    for name, qtype in (("Q4_K", 12), ("Q6_K", 14), ("Q5_0", 6)):
        ws = [_blocks(qtype, n, k) for _ in range(copies)]
        rates = {}
        for t in threads:
            torch.set_num_threads(t)
            for w in ws:
                native.gemv_block(x, w, qtype, None)
            start = time.perf_counter()
            for _ in range(3):
                for w in ws:
                    native.gemv_block(x, w, qtype, None)
            rates[t] = round(3 * sum(w.numel() for w in ws) / (time.perf_counter() - start) / 1e9, 1)
        out["rates"][name] = rates
        print(name, rates, file=sys.stderr, flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
