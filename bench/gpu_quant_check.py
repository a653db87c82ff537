"""Check kiln.quant's kernels on the GPU at real shapes against the torch reference, and time it.

Run on the GPU machine (not part of the test run):

    python bench/gpu_quant_check.py                  # everything; prints a table, writes $OUT/quant_check.json
    python bench/gpu_quant_check.py --quick          # 4096x4096 only, no config sweep (a minute or two)
    python bench/gpu_quant_check.py --formats Q4_K Q6_K --shapes 4096x4096 --no-sweep
    python bench/gpu_quant_check.py --no-sweep; python bench/gpu_quant_check.py --sweep-only   # two commands

Most of a first run is Triton compiling (about a second per kernel variant and K); the full run compiles
a few hundred variants, so where one command is limited to 10 minutes, split it as in the last line.

Per format (Q4_0 … IQ4_XS) and weight shape (N, K) — random valid GGUF blocks, repacked on the GPU:
- `twin`: packed.dequantize_ref (torch, on the GPU) equals kiln.quant.dequantize (the gguf-py-exact
  reference, on the CPU) on the first rows — when gguf is importable; every other check uses the twin;
- `deq_exact`: dequantize_gpu in float32 and bfloat16 is bit-identical to the twin;
- `err_m{M}`: the relative error ‖y − y_ref‖ / ‖y_ref‖ of the kernel route.plan picks (`cfg_m{M}`)
  against float32 x @ W.T (cuBLAS, TF32 off) — M = 1 in float32 (tolerance 1e-4) and M = 1, 4, 8 in
  bfloat16 (tolerance 1e-2: bf16 output and int8 activations; tl.dot and cuBLAS round the weights to bf16);
- timings (triton.testing.do_bench medians; the L2 is flushed before every call): the plan at M = 1, 4, 8 in
  bf16, with achieved GB/s = packed weight bytes / time and the fraction of 3.0 TB/s; `graph_m1` replays
  a CUDA graph of back-to-back M = 1 calls over several distinct weight copies (together > 150 MB, so
  they come from HBM, not the 50 MB L2) — what a decode step pays per matrix; cuBLAS bf16 GEMV of the
  same (dense) matrix as a yardstick; dequantize_gpu to bf16; the prefill path (M = 512: dequantize_gpu
  + cuBLAS) beside cuBLAS on a ready bf16 weight.
Config sweep (Q4_K, Q6_K, Q8_0; K = 4096 and 14336; M = 1 and M = 8): the float GEMV's block_n / block_k /
num_warps / split-K / tl.dot variants, so that one run picks route.py's float table entries.
Order: every format at the first shape, then the next shape, ..., then the sweep; JSON is rewritten after
every step, so a run cut short by a time limit still leaves the most useful results. Exit code 1 when any
correctness check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout



def _fake_package(name: str) -> None:
    """Make `name` an empty package over its folder, so its submodules import without its __init__."""
    mod = types.ModuleType(name)
    mod.__path__ = [str(ROOT / name.replace(".", "/"))]
    sys.modules[name] = mod


try:
    import gguf  # noqa: F401  (kiln.quant's reference needs it; the GPU machine may not have it installed)
except ImportError:
    sys.path += [str(ROOT / ".gpu_site"), str(ROOT / "build" / "quant_bench")]  # copies carried there, if any
try:
    import kiln  # noqa: F401
except ImportError:  # kiln/__init__ pulls in tokenizers, jinja2, ...: kiln.quant needs none of them
    _fake_package("kiln")
try:
    import kiln.quant as kq  # the gguf-py-exact reference
except ImportError:
    kq = None
    _fake_package("kiln.quant")

from triton.testing import do_bench  # noqa: E402

from kiln.quant import packed as K  # noqa: E402
from kiln.quant import route as R  # noqa: E402
from kiln.quant.dequant import dequantize_gpu  # noqa: E402
from kiln.quant.gemv import gemv  # noqa: E402
from kiln.quant.linear import matmul  # noqa: E402

DEV = "cuda"
PEAK = 3.0e12  # bytes/s: the H100's measured copy bandwidth (NOTES.md)
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 3072), (151936, 1024)]
SWEEP_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]
F16_FIELDS = {K.Q4_0: [0], K.Q4_1: [0, 2], K.Q5_0: [0], K.Q5_1: [0, 2], K.Q8_0: [0], K.Q2_K: [80, 82],
              K.Q3_K: [108], K.Q4_K: [0, 2], K.Q5_K: [0, 2], K.Q6_K: [208], K.IQ4_NL: [0], K.IQ4_XS: [0]}
RESULTS: dict = {"rows": [], "sweep": []}


def random_rows(qtype: int, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Random raw GGUF bytes of an (n, k) tensor on the GPU, f16 scales of magnitude 1e-4..1."""
    fmt = K.FORMATS[qtype]
    g = torch.Generator(device=DEV).manual_seed(seed)
    nb = n * k // fmt.block
    blocks = torch.randint(0, 256, (nb, fmt.type_size), generator=g, device=DEV, dtype=torch.uint8)
    for off in F16_FIELDS[qtype]:
        mag = 10.0 ** (-4 * torch.rand(nb, generator=g, device=DEV))
        scale = (torch.randn(nb, generator=g, device=DEV) * mag).half()
        blocks[:, off:off + 2] = scale.view(torch.uint8).view(nb, 2)
    return blocks.view(n, -1)


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def us(fn) -> float:
    return 1e3 * do_bench(fn, warmup=5, rep=40, return_mode="median")


def graph_us(make_call, copies: int, reps: int = 4) -> float:
    """Median µs per call of `reps` passes over `copies` distinct weights, captured as one CUDA graph."""
    calls = [make_call(i) for i in range(copies)]
    for c in calls:  # compile and warm up outside the capture
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for c in calls:
                c()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (reps * copies))
    del graph
    return sorted(times)[len(times) // 2]


def n_copies(nbytes: int) -> int:
    return max(1, min(16, math.ceil(150e6 / nbytes)))


def effective_config(packed, m: int) -> str:
    """The plan route.py makes for m rows of bf16 x against this weight: its kernel and config."""
    (n, k) = packed.shape
    plan = R.plan(packed.qtype, m, n, k, torch.bfloat16, sms=R.sm_count(torch.device(DEV)))
    return f"{plan.kind} {plan.config}"


def effective_config_of(qtype: int, m: int) -> str:
    plan = R.plan(qtype, m, 4096, 4096, torch.bfloat16, sms=R.sm_count(torch.device(DEV)))
    return f"{plan.kind} {plan.config}"


def check_twin(raw: torch.Tensor, packed, qtype: int, n: int, k: int) -> bool | None:
    if kq is None:
        return None
    rows = min(n, 8)
    ref = kq.dequantize(raw[:rows].cpu().reshape(-1), qtype, (rows, k))
    sub = K.repack(raw[:rows].contiguous(), qtype, (rows, k))
    return bool(torch.equal(K.dequantize_ref(sub).cpu(), ref))


def check_format(qtype: int, n: int, k: int) -> None:
    try:
        check_shape(qtype, n, k)
    except Exception as e:  # report and go on: one broken variant must not hide the others' results
        name = K.FORMATS[qtype].name
        print(f"{name:6s} {n:6d}x{k:<5d} BAD {type(e).__name__}: {str(e)[:400]}", flush=True)
        RESULTS["rows"].append(dict(format=name, n=n, k=k, ok=False, error=f"{type(e).__name__}: {e}"[:2000]))
    torch.cuda.empty_cache()


def check_shape(qtype: int, n: int, k: int) -> None:
    name = K.FORMATS[qtype].name
    t0 = time.time()
    raw = random_rows(qtype, n, k, seed=n + k)
    packed = K.repack(raw, qtype, (n, k))
    w_ref = K.dequantize_ref(packed)                               # (N, K) float32
    row = dict(format=name, n=n, k=k, packed_bytes=packed.nbytes, file_bytes=raw.numel(),
               twin=check_twin(raw, packed, qtype, n, k), cfg_m1=effective_config(packed, 1),
               cfg_m8=effective_config(packed, 8))
    del raw
    row["deq_exact"] = bool(torch.equal(dequantize_gpu(packed, torch.float32), w_ref)
                            and torch.equal(dequantize_gpu(packed, torch.bfloat16), w_ref.bfloat16()))
    x32 = torch.randn(1, k, device=DEV)
    row["err_m1_fp32"] = rel(matmul(x32, packed), x32 @ w_ref.T)
    ok = row["deq_exact"] and row["twin"] is not False and row["err_m1_fp32"] < 1e-4
    for m in (1, 4, 8):
        x = torch.randn(m, k, device=DEV).bfloat16()
        row[f"err_m{m}"] = rel(matmul(x, packed), x.float() @ w_ref.T)
        ok &= row[f"err_m{m}"] < 1e-2
        row[f"us_m{m}"] = us(lambda: matmul(x, packed))
    row["ok"] = bool(ok)
    row["gbps_m1"] = packed.nbytes / row["us_m1"] / 1e3
    row["frac_m1"] = row["gbps_m1"] * 1e9 / PEAK
    copies = [packed] + [K.repack(random_rows(qtype, n, k, seed=i), qtype, (n, k))
                         for i in range(1, n_copies(packed.nbytes))]
    x1 = torch.randn(1, k, device=DEV).bfloat16()
    row["graph_m1"] = graph_us(lambda i: (lambda: matmul(x1, copies[i])), len(copies))
    row["graph_frac_m1"] = packed.nbytes / row["graph_m1"] / 1e6 / PEAK
    del copies[1:]
    w_bf = w_ref.bfloat16()
    del w_ref
    row["cublas_us_m1"] = us(lambda: F.linear(x1, w_bf))
    row["cublas_frac_m1"] = w_bf.numel() * 2 / row["cublas_us_m1"] / 1e6 / PEAK
    x8 = torch.randn(8, k, device=DEV).bfloat16()
    row["cublas_us_m8"] = us(lambda: F.linear(x8, w_bf))
    row["deq_us"] = us(lambda: dequantize_gpu(packed, torch.bfloat16))
    row["deq_gbps"] = (packed.nbytes + w_bf.numel() * 2) / row["deq_us"] / 1e3
    xp = torch.randn(512, k, device=DEV).bfloat16()
    row["prefill_us"] = us(lambda: F.linear(xp, dequantize_gpu(packed, torch.bfloat16)))
    row["prefill_cublas_us"] = us(lambda: F.linear(xp, w_bf))
    row["prefill_tflops"] = 2 * 512 * n * k / row["prefill_us"] / 1e6
    del w_bf, xp
    row["check_s"] = time.time() - t0
    RESULTS["rows"].append(row)
    print(f"{name:6s} {n:6d}x{k:<5d} {'ok ' if row['ok'] else 'BAD'} err {row['err_m1_fp32']:.1e}/"
          f"{row['err_m1']:.1e}/{row['err_m8']:.1e} exact {int(row['deq_exact'])} twin {row['twin']}  "
          f"M=1 {row['us_m1']:7.1f}us {row['gbps_m1']:6.0f}GB/s ({100 * row['frac_m1']:3.0f}%) "
          f"graph {row['graph_m1']:7.1f}us ({100 * row['graph_frac_m1']:3.0f}%)  "
          f"cuBLAS bf16 {row['cublas_us_m1']:7.1f}us ({100 * row['cublas_frac_m1']:3.0f}%)  "
          f"M=4 {row['us_m4']:7.1f} M=8 {row['us_m8']:7.1f} (cuBLAS {row['cublas_us_m8']:7.1f})  "
          f"deq {row['deq_us']:7.1f}us  prefill512 {row['prefill_us']:8.1f}us "
          f"({row['prefill_tflops']:4.0f} TFLOP/s; cuBLAS alone {row['prefill_cublas_us']:8.1f})  "
          f"[M=1: {row['cfg_m1']}; M=8: {row['cfg_m8']}]", flush=True)
    del packed


def _sweep_list(qtype: int) -> list[tuple[int, R.GemvConfig]]:
    C = R.GemvConfig  # split_k 0: route.float_config picks
    m1 = [C(block_n=bn, block_k=bk, num_warps=nw, split_k=sk)
          for bn, bk, nw, sk in [(16, 256, 4, 0), (32, 256, 4, 0), (64, 256, 4, 0), (128, 256, 8, 0),
                                 (64, 256, 4, 1), (64, 256, 4, 2), (32, 256, 4, 1), (32, 512, 4, 0),
                                 (64, 512, 8, 0), (64, 128, 4, 0), (64, 256, 8, 0), (32, 256, 2, 0)]]
    m1 += [C(block_n=64, block_k=256, num_stages=3, split_k=0), C(block_n=64, block_k=256, num_stages=1, split_k=0)]
    m8 = [C(block_n=bn, block_k=bk, num_warps=nw, dot=dot, split_k=0)
          for bn, bk, nw, dot in [(16, 256, 4, False), (32, 256, 4, False), (16, 256, 4, True), (32, 256, 4, True),
                                  (64, 256, 4, True), (32, 512, 8, True), (64, 256, 8, True), (128, 256, 8, True)]]
    return [(1, c) for c in m1] + [(8, c) for c in m8] + [(4, c) for c in m8 if c.dot]


def sweep_configs(qtype: int) -> None:
    name = K.FORMATS[qtype].name
    for n, k in SWEEP_SHAPES:
        packed = K.repack(random_rows(qtype, n, k, seed=7), qtype, (n, k))
        w_ref = K.dequantize_ref(packed)
        xs = {m: torch.randn(m, k, device=DEV).bfloat16() for m in (1, 4, 8)}
        refs = {m: xs[m].float() @ w_ref.T for m in xs}
        del w_ref
        for m, grid_cfg in _sweep_list(qtype):
            cfg = R.float_config(grid_cfg, qtype, n, k, m, R.sm_count(torch.device(DEV)))
            try:
                err = rel(gemv(xs[m], packed, None, cfg), refs[m])
                t = us(lambda: gemv(xs[m], packed, None, cfg))
            except Exception as e:  # a variant that does not compile or run is reported, not fatal
                print(f"  sweep {name} {n}x{k} M={m} {cfg}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                RESULTS["sweep"].append(dict(format=name, n=n, k=k, m=m, config=repr(cfg), error=str(e)[:500]))
                continue
            frac = packed.nbytes / t / 1e6 / PEAK
            RESULTS["sweep"].append(dict(format=name, n=n, k=k, m=m, config=repr(cfg), us=t, frac=frac, err=err,
                                         ok=err < 1e-2))
            print(f"  sweep {name:5s} {n:5d}x{k:<5d} M={m} bn={cfg.block_n:3d} bk={cfg.block_k:3d} "
                  f"w={cfg.num_warps} split={cfg.split_k} dot={int(cfg.dot)} "
                  f"stages={cfg.num_stages}: {t:7.1f}us {100 * frac:3.0f}% err {err:.1e}", flush=True)
        del packed
        torch.cuda.empty_cache()
    best = {}
    for r in RESULTS["sweep"]:
        if r["format"] == name and r.get("ok"):
            key = (r["m"], r["n"], r["k"])
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
    for (m, n, k), r in sorted(best.items()):
        print(f"  best {name} M={m} {n}x{k}: {r['config']} {r['us']:.1f}us ({100 * r['frac']:.0f}%)", flush=True)


def write_json() -> None:
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "quant_check.json"
        path.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                        plans_4096x4096={K.FORMATS[q].name: [effective_config_of(q, m) for m in
                                                                             (1, 4, 8)] for q in K.FORMATS},
                                        **RESULTS), indent=1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", nargs="*", default=["Q4_K", "Q6_K", "Q8_0", "Q5_0", "Q4_0", "Q5_K", "Q3_K",
                                                         "Q2_K", "Q4_1", "Q5_1", "IQ4_XS", "IQ4_NL"])
    ap.add_argument("--shapes", nargs="*", default=[f"{n}x{k}" for n, k in SHAPES])
    ap.add_argument("--no-sweep", action="store_true", help="skip the config sweep")
    ap.add_argument("--quick", action="store_true", help="4096x4096 only, no sweep")
    ap.add_argument("--sweep-only", action="store_true", help="only the config sweep (Q4_K, Q6_K, Q8_0)")
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    shapes = [(4096, 4096)] if args.quick else [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    by_name = {f.name: q for q, f in K.FORMATS.items()}
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "| reference:",
          "kiln.quant.dequantize (gguf-py exact) + twin" if kq else "twin only (gguf not importable)", flush=True)
    # Most valuable first, so that a run cut short by a time limit still answers the main questions:
    # every format at the first shape, then the other shapes, then the config sweep.
    if not args.sweep_only:
        for n, k in shapes:
            for fname in args.formats:
                check_format(by_name[fname], n, k)
                write_json()
    if args.sweep_only or not (args.no_sweep or args.quick):
        for fname in args.formats:
            if by_name[fname] in (K.Q4_K, K.Q6_K, K.Q8_0):
                sweep_configs(by_name[fname])
                write_json()
    bad = [f"{r['format']} {r['n']}x{r['k']}" for r in RESULTS["rows"] if not r["ok"]]
    RESULTS["failed"] = bad
    write_json()
    if os.environ.get("OUT"):
        print("wrote", Path(os.environ["OUT"]) / "quant_check.json")
    print("FAILED: " + ", ".join(bad) if bad else "all checks passed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
