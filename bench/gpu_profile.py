"""Where a decode step and a prefill spend GPU time, and which GEMV launch config is fastest at a model's
own shapes. Run on the GPU machine (not part of the test run):

    python bench/gpu_profile.py --model /tmp/g/qwen3-0.6b-Q4_K_M.gguf --out $OUT/profile.json [--no-sweep]

Writes JSON and prints: GPU memory after load against the file size; the kernel table (name, launches and
µs per step) of eager decode steps and of a 512-token prefill (torch.profiler, CUDA activity); the
CUDA-graph decode step's ms per token; and, for every distinct (format, N, K) of the model's QuantLinears,
the in-graph µs per call of a grid of GemvConfigs (several weight copies so that they stream from HBM, as
in a decode step) next to the table's current choice.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_quant_check import graph_us, n_copies  # noqa: E402

import kiln  # noqa: E402
from kiln.cache import KVCache, Step  # noqa: E402
from kiln.decoder import Decoder  # noqa: E402
from kiln.quant import packed as K  # noqa: E402
from kiln.quant import route as R  # noqa: E402
from kiln.quant.gemv import gemv  # noqa: E402
from kiln.quant.linear import QuantLinear, matmul  # noqa: E402


def kernel_table(fn, steps: int) -> list[dict]:
    """[(kernel name, launches per call, µs per call)] of `fn` over `steps` calls, slowest first."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    agg = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type.name == "CUDA":
            a = agg[e.name[:90]]
            a[0] += 1
            a[1] += e.device_time
    rows = [{"kernel": k, "per_call": v[0] / steps, "us_per_call": v[1] / steps} for k, v in agg.items()]
    return sorted(rows, key=lambda r: -r["us_per_call"])


def print_table(title: str, rows: list[dict], top: int = 25) -> None:
    total = sum(r["us_per_call"] for r in rows)
    launches = sum(r["per_call"] for r in rows)
    print(f"\n== {title}: {total:.1f} µs of kernels, {launches:.0f} launches per call")
    for r in rows[:top]:
        print(f"{r['us_per_call']:9.1f} µs {r['per_call']:6.1f}x  {r['kernel']}")


def weight_copies(w0) -> list:
    """w0 and clones of it: together large enough to stream from HBM rather than the L2 in graph_us."""
    return [w0] + [K.PackedWeight(w0.qtype, w0.shape, **{p: t.clone() for p, t in w0.planes().items()})
                   for _ in range(n_copies(w0.nbytes) - 1)]


def time_configs(w0, grid, deadline: float | None = None) -> dict:
    """In-graph µs per M = 1 call of weight w0 by its plan ("table") and through the float GEMV with each
    config of `grid` its format can take ("configs", an error string where one fails; split_k 0:
    route.float_config picks), until time.time() passes `deadline`; "best" names the fastest of the grid."""
    ws = weight_copies(w0)
    x = torch.randn(1, w0.shape[1], device="cuda", dtype=torch.bfloat16)
    row = {"configs": {}}
    try:
        row["table"] = graph_us(lambda i: (lambda: matmul(x, ws[i])), len(ws))
    except Exception as e:  # noqa: BLE001
        row["table"] = f"error {e}"[:200]
    for cfg in grid:
        if deadline is not None and time.time() > deadline:
            break
        if cfg.block_k % (4 * w0.fmt.g):
            continue
        key = f"bn{cfg.block_n}_bk{cfg.block_k}_w{cfg.num_warps}_s{cfg.split_k}"
        launch = R.float_config(cfg, w0.qtype, w0.shape[0], w0.shape[1], 1, R.sm_count(x.device))
        try:
            row["configs"][key] = graph_us(lambda i: (lambda: gemv(x, ws[i], None, launch)), len(ws))
        except Exception as e:  # noqa: BLE001
            row["configs"][key] = f"error {type(e).__name__}"
    ok = {c: v for c, v in row["configs"].items() if isinstance(v, float)}
    row["best"] = min(ok, key=ok.get) if ok else None
    del ws
    torch.cuda.empty_cache()
    return row


def sweep(model, out: dict) -> None:
    shapes = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) and m.qs is not None:
            shapes.setdefault((m.qtype, m.out_features, m.in_features), (name, m))
    grid = [R.GemvConfig(block_n=bn, block_k=bk, num_warps=w, split_k=s)
            for bn in (8, 16, 32, 64) for s in (1, 2, 4) for bk in (256,) for w in (4,)]
    grid += [R.GemvConfig(block_n=bn, block_k=512, num_warps=w, split_k=1) for bn in (8, 16) for w in (4, 8)]
    grid += [R.GemvConfig(block_n=bn, block_k=256, num_warps=2, split_k=1) for bn in (8, 16)]
    out["sweep"] = []
    for (qtype, n, k), (name, m) in sorted(shapes.items(), key=lambda kv: kv[0][1] * kv[0][2]):
        w0 = m.packed
        row = {"format": K.FORMATS[qtype].name, "n": n, "k": k, "layer": name, **time_configs(w0, grid)}
        best, ok = row["best"], {c: v for c, v in row["configs"].items() if isinstance(v, float)}
        table = row["table"] if isinstance(row["table"], str) else f"{row['table']:.2f}"
        print(f"{row['format']:5} {n:7}x{k:<6} table {table} µs  best {best} {ok.get(best, float('nan')):.2f} µs"
              f"  ({w0.nbytes / 1e6:.2f} MB)")
        out["sweep"].append(row)


@torch.inference_mode()
def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-sweep", action="store_true")
    a = ap.parse_args()
    out: dict = {"model": a.model, "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    t = time.perf_counter()
    model, _ = kiln.load(a.model, device="cuda")
    torch.cuda.synchronize()
    out["load_s"] = time.perf_counter() - t
    out["memory_after_load_gb"] = torch.cuda.memory_allocated() / 1e9
    out["file_gb"] = os.path.getsize(a.model) / 1e9
    print(f"load {out['load_s']:.1f} s; GPU memory {out['memory_after_load_gb']:.3f} GB, "
          f"file {out['file_gb']:.3f} GB ({out['memory_after_load_gb'] / out['file_gb']:.2f}x)")
    cache = KVCache.for_model(model, max_len=1024)
    ids = torch.randint(100, 30000, (1, 512), device="cuda")

    def prefill():
        model(ids, Step.prefill(cache, 0), last_only=True)
    for _ in range(2):
        prefill()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        prefill()
    torch.cuda.synchronize()
    out["prefill_ms"] = (time.perf_counter() - t) / 5 * 1e3
    out["prefill_kernels"] = kernel_table(prefill, 3)
    import cProfile
    import io
    import pstats
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(3):
        prefill()
    torch.cuda.synchronize()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(22)
    out["prefill_host_profile"] = buf.getvalue()[-6000:]
    print(out["prefill_host_profile"])
    print(f"prefill 512: {out['prefill_ms']:.2f} ms wall")
    print_table("prefill 512", out["prefill_kernels"])

    eager = Decoder(model, cache, use_graph=False)
    tok = torch.tensor([5], device="cuda")
    step = lambda: eager.step(tok, 600)  # noqa: E731
    for _ in range(3):
        step()
    out["decode_eager_kernels"] = kernel_table(step, 10)
    print_table("decode step (eager kernels)", out["decode_eager_kernels"], top=40)

    graph = Decoder(model, cache)
    graph.step(tok, 600)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(200):
        graph.step(tok, 600 + i % 100)
    torch.cuda.synchronize()
    out["decode_graph_ms"] = (time.perf_counter() - t) / 200 * 1e3
    print(f"\ndecode step (CUDA graph): {out['decode_graph_ms']:.3f} ms")
    Path(a.out).write_text(json.dumps(out, indent=1))
    if not a.no_sweep:
        sweep(model, out)
        Path(a.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
