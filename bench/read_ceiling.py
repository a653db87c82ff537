"""How fast can a decode step's attention bytes be read at all? Decode attention against plain streaming reads of
the same bytes, each layer its own buffers (as in a model: nothing left in the L2 from the layer before), timed
as one CUDA graph over the layers.

At depth 16384 the split kernel reads Qwen3-8B's 67 MB a layer at ~2.4 TB/s in the model and Llama-3.2-1B's 33.5 MB
at ~2.2 (bench/results/2026-12-06-h100-d). If a plain sum of the same bytes, at its best grid and tile, reads them
no faster, the attention is at the memory's ceiling for that size; if it reads them much faster, the kernel has
room. Prints one JSON line per (shape, kernel): µs a layer and TB/s.

Usage (GPU machine): python bench/read_ceiling.py [--shapes qwen3-8b,llama-3.2-1b] [--depth 16384] [--layers 16]
       [--launches 64:4:2:1,64:4:2:2] [--no-reads]  (split-kernel settings timed beside the default)
       [--merges 128:1048576,32:4096]  (each launch with each merge form: ops.attention's MERGE_COLS:MERGE_ELEMS;
       128:1048576 is one program a row holding every split, the form before column programs)
       [--kv-layouts separate,interleaved]  (separate: a key and a value tensor (1, K, S, D) a layer, as KVCache
       stores them; interleaved: one (1, K, S, 2, D) tensor whose [..., 0, :] and [..., 1, :] views are the keys and
       values, so a tile's keys and values are one run of memory, not two runs megabytes apart)
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

sys.path.insert(0, ".")
from kiln.ops import attention  # noqa: E402
from kiln.ops.attention import Launch, decode_attention, decode_attention_ref  # noqa: E402

SHAPES = {"qwen3-0.6b": (16, 8, 128), "llama-3.2-1b": (32, 8, 64), "qwen3-8b": (32, 8, 128)}
# (elements a load, loads a program, warps, stages)
READS = [(4096, 1, 4, 1), (8192, 1, 8, 1), (4096, 4, 4, 3), (4096, 8, 8, 3), (8192, 8, 8, 3), (2048, 16, 4, 4),
         (8192, 32, 8, 4), (16384, 16, 16, 3)]


@triton.jit
def _read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr, STRIDED: tl.constexpr):
    """Each program ITERS loads of BLOCK elements: one run (STRIDED False) or every grid-th block from its own
    (all programs reading near one another at any moment)."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    pid = tl.program_id(0).to(tl.int64)
    for i in range(ITERS):
        if STRIDED:
            off = (pid + i * tl.num_programs(0)) * BLOCK + tl.arange(0, BLOCK)
        else:
            off = (pid * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + off, mask=off < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def _caches(layout: str, n: int, kh: int, s_max: int, d: int, gen) -> tuple[list, list]:
    """n layers' keys and values (1, K, S, D) bf16: separate tensors, or views of one (1, K, S, 2, D) tensor."""
    if layout == "separate":
        return ([torch.randn(1, kh, s_max, d, device="cuda", generator=gen).bfloat16() for _ in range(n)],
                [torch.randn(1, kh, s_max, d, device="cuda", generator=gen).bfloat16() for _ in range(n)])
    assert layout == "interleaved", f"--kv-layouts: {layout!r} is neither separate nor interleaved"
    kv = [torch.randn(1, kh, s_max, 2, d, device="cuda", generator=gen).bfloat16() for _ in range(n)]
    return [x[:, :, :, 0] for x in kv], [x[:, :, :, 1] for x in kv]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="qwen3-8b,llama-3.2-1b")
    p.add_argument("--depth", type=int, default=16384)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--launches", default="", help="split-kernel settings to time beside the default, comma-separated "
                   "block_n:warps:stages:tiles_per_split[:runtime_loop:interleave] (ops.attention.Launch's fields "
                   "in order, as integers)")
    p.add_argument("--no-reads", action="store_true", help="time the attention settings only")
    p.add_argument("--kv-layouts", default="separate", help="separate and / or interleaved, comma-separated: how a "
                   "layer's keys and values lie in memory (see the module's doc)")
    p.add_argument("--merges", default="", help="merge forms cols:elems (ops.attention.MERGE_COLS, MERGE_ELEMS), "
                   "comma-separated; each launch is timed with each (default: the module's)")
    a = p.parse_args()
    launches = [None] + [Launch(*(int(v) for v in x.split(":"))) for x in a.launches.split(",") if x]
    merges = [tuple(int(v) for v in x.split(":")) for x in a.merges.split(",") if x] or [
        (attention.MERGE_COLS, attention.MERGE_ELEMS)]
    dev = torch.cuda.get_device_name()
    for name in a.shapes.split(","):
        h, kh, d = SHAPES[name]
        s_max, n = a.depth + 136, a.layers
        gen = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, 1, h, d, device="cuda", generator=gen).bfloat16()
        pos = torch.tensor([a.depth - 1], device="cuda")
        nbytes = 2 * kh * a.depth * d * 2  # keys and values read a layer
        for layout in a.kv_layouts.split(","):
            kcs, vcs = _caches(layout, n, kh, s_max, d, gen)
            ref = decode_attention_ref(q, kcs[0].contiguous(), vcs[0].contiguous(), pos, d ** -0.5).float()
            for launch, (attention.MERGE_COLS, attention.MERGE_ELEMS) in itertools.product(launches, merges):
                try:
                    err = (decode_attention(q, kcs[0], vcs[0], pos, d ** -0.5, launch=launch).float()
                           - ref).abs().max().item()

                    def attn():
                        for kc, vc in zip(kcs, vcs):
                            decode_attention(q, kc, vc, pos, d ** -0.5, launch=launch)
                    us = 1e3 * do_bench_cudagraph(attn, return_mode="median") / n
                except Exception as e:  # a setting that does not compile (registers, shared memory)
                    print(json.dumps({"shape": name, "launch": launch and launch._asdict(), "kv": layout,
                                      "merge": [attention.MERGE_COLS, attention.MERGE_ELEMS], "error": str(e)[:200]}))
                    continue
                print(json.dumps({"device": dev, "shape": name, "kernel": "decode_attention", "depth": a.depth,
                                  "kv": layout, "launch": launch and launch._asdict(),
                                  "merge": [attention.MERGE_COLS, attention.MERGE_ELEMS], "us_layer": round(us, 2),
                                  "tb_s": round(nbytes / us / 1e6, 3), "max_err": err}), flush=True)
            kcs = vcs = attn = None
            torch.cuda.empty_cache()
        if a.no_reads:
            continue
        bufs = [torch.randn(nbytes // 2, device="cuda", generator=gen).bfloat16() for _ in range(n)]
        for (block, iters, warps, stages), strided in itertools.product(READS, (False, True)):
            if strided and iters == 1:
                continue
            grid = triton.cdiv(bufs[0].numel(), block * iters)
            out = torch.empty(grid, device="cuda")

            def read():
                for b in bufs:
                    _read_kernel[(grid,)](b, out, b.numel(), BLOCK=block, ITERS=iters, STRIDED=strided,
                                          num_warps=warps, num_stages=stages)
            read()
            ok = abs(out.sum().item() - bufs[-1].float().sum().item()) < 1e-2 * bufs[-1].numel() ** 0.5
            us = 1e3 * do_bench_cudagraph(read, return_mode="median") / n
            kernel = f"read {block}x{iters} w{warps} s{stages}" + " strided" * strided
            print(json.dumps({"device": dev, "shape": name, "kernel": kernel,
                              "programs": grid, "us_layer": round(us, 2), "tb_s": round(nbytes / us / 1e6, 3),
                              "sum_ok": ok}), flush=True)
        bufs = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
