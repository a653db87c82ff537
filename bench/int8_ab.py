"""The int8-activation GEMV (kiln.quant.gemv_int8) against the float path, on the GPU.

1. `check`: every INT8 format at real shapes — the int8 GEMV against dequantized W times the dequantized
   int8 x (float64), and against the float path (bf16 x).
2. `micro`: in-graph µs per call over rotating weight copies (no L2 reuse) for the shapes of Qwen3-0.6B,
   Llama-3.2-1B and Qwen3-8B: the float path with its table config (+ split-K sum), the int8 GEMV with
   the table config and a grid of (block_n, block_k, warps), and quantize_act alone.
3. `rowgrid`: 2..8 rows through the int8 kernel, a grid of its configs against the table's, one row's
   GEMV and dequantize + cuBLAS (--rows, --models).
4. `model`: `kiln.bench` decode/prefill of each GGUF file with KILN_INT8=0, then on (one process each).
Usage (GPU machine): python bench/int8_ab.py --out DIR [--steps check,micro,model] [--files a.gguf,b.gguf]
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_quant_check as G  # noqa: E402  (random_rows, graph_us, n_copies, kiln import fallbacks)

import torch  # noqa: E402

from kiln.policy import Policy  # noqa: E402
from kiln.quant import gemv as gemv_mod  # noqa: E402
from kiln.quant import packed as K  # noqa: E402
from kiln.quant import route as R  # noqa: E402
from kiln.quant.dequant import dequantize_gpu  # noqa: E402
from kiln.quant.gemv import gemv  # noqa: E402
from kiln.quant.gemv_int8 import gemm_int8, gemv_int8, quantize_act  # noqa: E402
from kiln.quant.linear import matmul  # noqa: E402
from kiln.quant.mma import gemm_mma  # noqa: E402

FLOAT = Policy(int8=False)  # the float GEMV where the int8 one would run

SHAPES = {  # (format, N, K): the decode GEMVs of each model (q+k joined; v apart where it is Q6_K)
    "qwen3-0.6b": [(K.Q4_K, 3072, 1024), (K.Q6_K, 1024, 1024), (K.Q4_K, 1024, 2048), (K.Q4_K, 6144, 1024),
                   (K.Q6_K, 1024, 3072), (K.Q4_K, 1024, 3072), (K.Q6_K, 151936, 1024), (K.Q8_0, 4096, 1024),
                   (K.Q8_0, 1024, 3072)],
    "llama-3.2-1b": [(K.Q4_K, 2560, 2048), (K.Q4_K, 2048, 2048), (K.Q4_K, 16384, 2048), (K.Q6_K, 2048, 8192),
                     (K.Q6_K, 128256, 2048)],
    "llama-3.1-8b": [(K.Q4_K, 5120, 4096), (K.Q6_K, 1024, 4096), (K.Q4_K, 4096, 4096), (K.Q4_K, 28672, 4096),
                     (K.Q6_K, 4096, 14336), (K.Q4_K, 4096, 14336), (K.Q6_K, 128256, 4096)],
    "qwen3-8b": [(K.Q4_K, 5120, 4096), (K.Q6_K, 1024, 4096), (K.Q4_K, 4096, 4096), (K.Q4_K, 24576, 4096),
                 (K.Q6_K, 4096, 12288), (K.Q4_K, 4096, 12288), (K.Q6_K, 151936, 4096)],
}
GRID = [(bn, bk, w) for bn in (2, 4, 8, 16) for bk in (2048, 4096, 16384) for w in (4, 8)]  # route.q8_config's
GRID_8B = [(bn, bk, w) for bn in (1, 2, 4, 8) for bk in (4096, 8192, 16384) for w in (4, 8)]


def sms() -> int:
    return R.sm_count(torch.device("cuda"))


def packed(qtype, n, k, seed=0):
    return K.repack(G.random_rows(qtype, n, k, seed), qtype, (n, k))


def rotating(qtype, n, k) -> list:
    """Distinct random weights of one shape, enough of them (gpu_quant_check.n_copies) that in-graph calls
    rotating over them stream from HBM rather than the L2."""
    w0 = packed(qtype, n, k)
    return [w0] + [packed(qtype, n, k, seed=i) for i in range(1, G.n_copies(w0.nbytes))]


def check(out):
    rows = []
    for qtype in sorted(R.INT8_FORMATS):
        for n, k in ((4096, 4096), (1024, 3072)):
            w = packed(qtype, n, k)
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            a = quantize_act(x)
            q = a.xq.view(torch.int8).reshape(-1, 4, 4).transpose(1, 2).reshape(-1).double()
            xq = q * a.xd.double().repeat_interleave(32)
            wd = K.dequantize_ref(w).double()
            ref = xq @ wd.T
            y = matmul(x, w)
            yf = matmul(x, w, policy=FLOAT)
            exact = x.double() @ wd.T
            r = {"format": K.FORMATS[qtype].name, "n": n, "k": k, "err_vs_int8_ref": G.rel(y, ref.float()),
                 "err_vs_exact": G.rel(y, exact.float()), "float_path_err_vs_exact": G.rel(yf, exact.float())}
            r["ok"] = r["err_vs_int8_ref"] < 1e-2
            rows.append(r)
            print(json.dumps(r), flush=True)
    out["check"] = rows


def micro(out, deadline, models=None):
    rows = []
    for model, shapes in SHAPES.items():
        if models and model not in models:
            continue
        grid_cfgs = GRID_8B if "8b" in model else GRID
        for qtype, n, k in shapes:
            if time.time() > deadline:
                print("micro: out of time", flush=True)
                out["micro"] = rows
                return
            ws = rotating(qtype, n, k)
            w0, copies = ws[0], len(ws)
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            act = quantize_act(x)
            r = {"model": model, "format": K.FORMATS[qtype].name, "n": n, "k": k, "mb": w0.nbytes / 1e6}
            r["float_us"] = G.graph_us(lambda i: (lambda: matmul(x, ws[i], policy=FLOAT)), copies)
            r["quantize_us"] = G.graph_us(lambda i: (lambda: quantize_act(x)), 4)
            r["int8_us"] = G.graph_us(lambda i: (lambda: matmul(x, ws[i], act=act)), copies)
            grid = {}
            for bn, bk, nw in grid_cfgs:
                if time.time() > deadline:
                    break
                key = f"bn{bn}_bk{bk}_w{nw}"
                cfg = R.q8_config(qtype, n, k, sms(), block_n=bn, block_k=bk, num_warps=nw)
                try:
                    grid[key] = round(G.graph_us(lambda i: (lambda: gemv_int8(act, ws[i], None, cfg)), copies), 2)
                except Exception as e:  # noqa: BLE001
                    grid[key] = f"error {type(e).__name__}: {e}"[:120]
            ok = {c: v for c, v in grid.items() if isinstance(v, float)}
            r["best"] = min(ok, key=ok.get) if ok else None
            r["best_us"] = ok.get(r["best"])
            r["float_tb_s"] = w0.nbytes / r["float_us"] / 1e6
            r["int8_tb_s"] = w0.nbytes / r["int8_us"] / 1e6
            r["grid"] = grid
            print(json.dumps({k_: v for k_, v in r.items() if k_ != "grid"}), flush=True)
            rows.append(r)
            del ws
            torch.cuda.empty_cache()
    out["micro"] = rows


def batch(out, deadline):
    """Batched decode rows (a server's step): in-graph µs of M rows through the int8 kernel (the table),
    the tl.dot tiles, and the prefill path (dequantize + cuBLAS), at the Llama-3.2-1B shapes."""
    import torch.nn.functional as F
    rows = []
    dot = R.GemvConfig(block_n=32, block_k=256, dot=True, split_k=0)
    for qtype, n, k in SHAPES["llama-3.2-1b"][:4]:
        ws = rotating(qtype, n, k)
        copies = len(ws)
        for m in (2, 4, 8, 16, 32):
            if time.time() > deadline:
                out["batch"] = rows
                return
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            r = {"format": K.FORMATS[qtype].name, "n": n, "k": k, "m": m,
                 "int8_us": G.graph_us(lambda i: (lambda: gemm_int8(quantize_act(x), ws[i], None,
                                                                    R.q8_rows_config(qtype, k, m))), copies),
                 "dequant_us": G.graph_us(lambda i: (lambda: F.linear(x, dequantize_gpu(ws[i], x.dtype))), copies)}
            if m <= R.MAX_GEMV_M:
                cfg = R.float_config(dot, qtype, n, k, m, sms())
                r["dot_us"] = G.graph_us(lambda i: (lambda: gemv(x, ws[i], None, cfg)), copies)
            print(json.dumps(r), flush=True)
            rows.append(r)
        del ws
        torch.cuda.empty_cache()
    out["batch"] = rows


ROW_GRID = [(bn, w, nw) for bn in (2, 4, 8) for w in (128, 256, 512) for nw in (4, 8)]


def rowgrid(out, deadline, ms=(2, 5, 8), models=("qwen3-8b",)):
    """A few rows of x (a speculative verify, a small server batch) through the int8 kernel: in-graph µs of
    the table's config (route.q8_rows_config) and a grid of (block_n, words, warps), beside one row's GEMV
    (the decode step) and dequantize + cuBLAS, at each model's shapes."""
    import torch.nn.functional as F
    rows = []
    for model in models:
        for qtype, n, k in SHAPES[model]:
            if n > 65536 or (qtype, n, k) == (K.Q6_K, 1024, 4096):  # the head (dequant, mma) and v: left out
                continue
            ws = rotating(qtype, n, k)
            copies = len(ws)
            x1 = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            a1 = quantize_act(x1)
            one = G.graph_us(lambda i: (lambda: matmul(x1, ws[i], act=a1)), copies)
            for m in ms:
                if time.time() > deadline:
                    out["rowgrid"] = rows
                    return
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                act = quantize_act(x)
                r = {"model": model, "format": K.FORMATS[qtype].name, "n": n, "k": k, "m": m, "gemv_m1_us": one,
                     "table_us": G.graph_us(lambda i: (lambda: gemm_int8(act, ws[i], None,
                                                                         R.q8_rows_config(qtype, k, m))), copies),
                     "dequant_us": G.graph_us(lambda i: (lambda: F.linear(x, dequantize_gpu(ws[i], x.dtype))),
                                              copies)}
                grid = {}
                for bn, w, nw in ROW_GRID:
                    if time.time() > deadline:
                        break
                    cfg = R.Q8Config(block_n=bn, words=w, num_warps=nw)
                    try:
                        grid[f"bn{bn}_w{w}_nw{nw}"] = round(
                            G.graph_us(lambda i: (lambda: gemm_int8(act, ws[i], None, cfg)), copies), 2)
                    except Exception as e:  # noqa: BLE001
                        grid[f"bn{bn}_w{w}_nw{nw}"] = f"error {type(e).__name__}"
                ok = {c: v for c, v in grid.items() if isinstance(v, float)}
                r["best"] = min(ok, key=ok.get) if ok else None
                r["best_us"] = ok.get(r["best"])
                r["grid"] = grid
                print(json.dumps({k_: v for k_, v in r.items() if k_ != "grid"}), flush=True)
                rows.append(r)
            del ws
            torch.cuda.empty_cache()
    out["rowgrid"] = rows


DOT_GRID = [R.GemvConfig(block_n=bn, block_k=bk, num_warps=w, dot=True, num_stages=st, split_k=1)
            for bn in (32, 64, 128) for bk in (128, 256, 512) for w in (4, 8) for st in (2, 4)]


def dotgrid(out, deadline, ms=(16, 32)):
    """Server-step rows beyond the int8 kernel's 8: in-graph µs of the tl.dot tiles (a grid of configs, no
    split-K) against dequantize + cuBLAS, at the Llama-3.2-1B shapes (the output head included)."""
    import torch.nn.functional as F
    rows = []
    gemv_mod.MAX_M = max(ms)  # the bound gemv checks; the tiles themselves take any M
    for qtype, n, k in SHAPES["llama-3.2-1b"]:
        ws = rotating(qtype, n, k)
        w0, copies = ws[0], len(ws)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), dequantize_gpu(w0, torch.float32))
            r = {"format": K.FORMATS[qtype].name, "n": n, "k": k, "m": m,
                 "dequant_us": G.graph_us(lambda i: (lambda: F.linear(x, dequantize_gpu(ws[i], x.dtype))), copies),
                 "dot": {}}
            for grid_cfg in DOT_GRID:
                if time.time() > deadline:
                    break
                name = f"bn{grid_cfg.block_n}_bk{grid_cfg.block_k}_w{grid_cfg.num_warps}_s{grid_cfg.num_stages}"
                cfg = R.float_config(grid_cfg, qtype, n, k, m, sms())  # 8 warps for 32-row tiles
                try:
                    err = G.rel(gemv(x, w0, None, cfg), ref)
                    r["dot"][name] = [round(G.graph_us(lambda i: (lambda: gemv(x, ws[i], None, cfg)), copies), 2),
                                      err]
                except Exception as e:  # noqa: BLE001  (out of shared memory / registers: skip that config)
                    r["dot"][name] = str(e)[:80]
            best = min(((v[0], kname) for kname, v in r["dot"].items() if isinstance(v, list)), default=None)
            r["best"] = best
            print(json.dumps({kk: v for kk, v in r.items() if kk != "dot"}), flush=True)
            rows.append(r)
        del ws
        torch.cuda.empty_cache()
    gemv_mod.MAX_M = R.MAX_GEMV_M
    out["dotgrid"] = rows


MMA_GRID = [R.MmaConfig(block_n=bn, words=wd, num_warps=w, num_stages=st)
            for bn in (32, 64, 128) for wd in (32, 64) for w in (4, 8) for st in (3, 4)]


MMA_TABLE = [R.MmaConfig(block_n=64, words=32, num_warps=4, num_stages=3),
             R.MmaConfig(block_n=128, words=32, num_warps=4, num_stages=3),  # route.mma_config: gate/up
             R.MmaConfig(block_n=32, words=32, num_warps=4, num_stages=3),
             R.MmaConfig(block_n=32, words=32, num_warps=4, num_stages=3, natural=True),  # heads, > 16 rows
             R.MmaConfig(block_n=32, words=16, num_warps=4, num_stages=3, natural=True)]  # heads, <= 16


MMA_NATURAL = [R.MmaConfig(block_n=bn, words=wd, num_warps=w, num_stages=st, natural=True)
               for bn in (32, 64, 128) for wd in (16, 32) for w in (4, 8) for st in (2, 3)] + MMA_TABLE


def mma(out, deadline, ms=(32, 16), models=("llama-3.2-1b",), grid=None, n_min=0):
    """Server-step rows (9..32): in-graph µs of mma.gemm_mma (a grid of MmaConfig, split-K from the
    grid size: route.mma_launch) against dequantize + cuBLAS, and its error against the float64 product."""
    import torch.nn.functional as F
    rows = []
    for model_name in models:
        for qtype, n, k in SHAPES[model_name]:
            if n < n_min:
                continue
            ws = rotating(qtype, n, k)
            w0, copies = ws[0], len(ws)
            wd = dequantize_gpu(w0, torch.float32)
            for m in ms:
                if time.time() > deadline:
                    break
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ref = F.linear(x.double(), wd.double())
                r = {"model": model_name, "format": K.FORMATS[qtype].name, "n": n, "k": k, "m": m,
                     "dequant_us": G.graph_us(lambda i: (lambda: F.linear(x, dequantize_gpu(ws[i], x.dtype))),
                                              copies),
                     "dequant_err": G.rel(F.linear(x, dequantize_gpu(w0, x.dtype)), ref.float()), "mma": {}}
                for grid_cfg in grid or MMA_GRID:
                    if time.time() > deadline:
                        break
                    name = f"bn{grid_cfg.block_n}_w{grid_cfg.words}_nw{grid_cfg.num_warps}_s{grid_cfg.num_stages}" + \
                        ("_nat" if grid_cfg.natural else "")
                    cfg = R.mma_launch(grid_cfg, qtype, n, k, sms())
                    try:
                        err = G.rel(gemm_mma(x, w0, None, cfg), ref.float())
                        r["mma"][name] = [round(G.graph_us(lambda i: (lambda: gemm_mma(x, ws[i], None, cfg)),
                                                           copies), 2), err]
                    except Exception as e:  # noqa: BLE001  (out of shared memory / registers: skip)
                        r["mma"][name] = str(e)[:80]
                ok = [(v[0], kname, v[1]) for kname, v in r["mma"].items() if isinstance(v, list)]
                r["best"] = min(ok, default=None)
                print(json.dumps({kk: v for kk, v in r.items() if kk != "mma"}), flush=True)
                rows.append(r)
            del ws, wd
            torch.cuda.empty_cache()
    out["mma"] = rows


def _bench_with(path: str, env: dict) -> dict:
    """`kiln.bench.bench`'s kiln half for one file in a fresh process under env (the policy is read at import)."""
    code = f"import json; from kiln.bench import bench; print(json.dumps(bench({path!r}, 512, 128, 3)['kiln']))"
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                       check=True, cwd=Path(__file__).resolve().parent.parent)
    return json.loads(r.stdout.strip().splitlines()[-1])


def model(out, files, deadline):
    rows = []
    for f in files:
        for on in (False, True):
            if time.time() > deadline:
                print("model: out of time", flush=True)
                out["model"] = rows
                return
            k = _bench_with(f, {"KILN_INT8": "1" if on else "0"})
            row = {"file": Path(f).name, "int8": on, "decode_tok_s": round(k["decode_tok_s"], 1),
                   "prefill_tok_s": round(k["prefill_tok_s"]), "ms_per_token": round(k["ms_per_token"], 3),
                   "roofline_share": round(k.get("roofline_share", 0), 3), "capture_s": k.get("capture_s")}
            print(json.dumps(row), flush=True)
            rows.append(row)
    out["model"] = rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", default="check,micro,model")
    ap.add_argument("--files", default="")
    ap.add_argument("--budget", type=float, default=400)
    ap.add_argument("--models", default="", help="micro: only these SHAPES keys (comma-separated)")
    ap.add_argument("--rows", default="16,32", help="dotgrid, mma: activation rows (comma-separated)")
    ap.add_argument("--n-min", type=int, default=0, help="mma: only shapes with at least this many rows")
    ap.add_argument("--mma-grid", choices=["full", "table", "natural"], default="full",
                    help="mma: the full config grid, the configs route.mma_config uses, or the "
                         "weight-order variant's grid (with the table's configs)")
    a = ap.parse_args()
    t0 = time.time()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    steps = a.steps.split(",")
    try:
        if "check" in steps:
            check(out)
        if "mma" in steps:
            mma(out, t0 + a.budget, tuple(int(m) for m in a.rows.split(",")),
                tuple(m for m in a.models.split(",") if m) or ("llama-3.2-1b",),
                {"table": MMA_TABLE, "natural": MMA_NATURAL}.get(a.mma_grid, MMA_GRID), a.n_min)
        if "dotgrid" in steps:
            dotgrid(out, t0 + a.budget, tuple(int(m) for m in a.rows.split(",")))
        if "model" in steps and a.files:
            model(out, a.files.split(","), t0 + a.budget * 0.55)
        if "batch" in steps:
            batch(out, t0 + a.budget)
        if "rowgrid" in steps:
            rowgrid(out, t0 + a.budget, tuple(int(m) for m in a.rows.split(",")),
                    tuple(m for m in a.models.split(",") if m) or ("qwen3-8b",))
        if "micro" in steps:
            micro(out, t0 + a.budget, [m for m in a.models.split(",") if m])
    finally:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "int8_ab.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
