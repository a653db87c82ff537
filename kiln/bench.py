"""`kiln bench`: prefill, decode and effective speed of one model file, optionally beside llama.cpp.

Owns: the measurement protocol (fixed random prompt ids, warm-up, medians of repeats, device-side
timing with one synchronization per measured region), the bandwidth roofline (weight bytes read per
decode step over the copy bandwidth measured in the same run), and the llama.cpp comparison through
llama-cpp-python in a child process (it must not share a process with torch: loading it after torch
crashes on the GPU machine).
Not: kernels or graphs (generate.py, quant/, ops/), result archiving (bench/ scripts write JSON there).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import torch

from kiln.errors import KilnError


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Bytes per second of a large device copy, counting read + write (NOTES.md's convention)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(5):
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times)


def weight_bytes_per_token(model) -> int:
    """Bytes of every matrix a decode step reads: all linear layers including the output head."""
    total = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(getattr(m, "nbytes", None), int):  # QuantLinear: packed bytes
            total += m.nbytes
    return total


def prompt_ids(vocab: int, n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    hi = min(vocab, 32000)  # ordinary tokens of every vocabulary; avoids special ids at the top
    return torch.randint(100, hi, (n,), generator=g).tolist()


@torch.inference_mode()
def run_kiln(model, p: int, g: int, repeats: int) -> dict:
    from kiln.generate import DecoderPool, prefill_chunk
    device = next(model.parameters()).device
    vocab = model.args.vocab_size
    ids = torch.tensor([prompt_ids(vocab, p)], device=device)
    dec = DecoderPool(model).get(p + g + 1)  # the cache size kiln.generate would use
    t0 = time.perf_counter()
    dec.step(ids[:, :1].reshape(1), 0)  # first call captures the decode graph (or just runs on CPU)
    _sync(device)
    capture_s = time.perf_counter() - t0

    def prefill():
        return prefill_chunk(model, ids, dec.cache, 0)

    def decode(start, n):
        tok = ids[0, :1]
        for i in range(n):
            tok = dec.step(tok, start + i).argmax(-1)
        return tok

    prefill()
    decode(1, 4)
    _sync(device)
    pre, dts, eff, ttft = [], [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        prefill().argmax(-1)  # the first token is part of the time to it
        _sync(device)
        pre.append(time.perf_counter() - t)
        ttft.append(pre[-1])
        t = time.perf_counter()
        decode(1, g)  # tg: decode steps after a 1-token context, like llama-bench's tg
        _sync(device)
        dts.append(time.perf_counter() - t)
        t = time.perf_counter()
        prefill()
        decode(p, g)
        _sync(device)
        eff.append(time.perf_counter() - t)
    return {
        "prefill_tok_s": p / statistics.median(pre), "decode_tok_s": g / statistics.median(dts),
        "effective_tok_s": g / statistics.median(eff), "ttft_ms": 1e3 * statistics.median(ttft),
        "ms_per_token": 1e3 * statistics.median(dts) / g, "capture_s": capture_s,
        "prompt_logits_top1": _prompt_top1(model, ids),
    }


def _prompt_top1(model, ids) -> list[int]:
    logits = model(ids)[0]  # (T, V)
    return logits.argmax(-1).tolist()


_LLAMA_WORKER = r"""
import json, sys, time, statistics
import llama_cpp
cfg = json.loads(sys.argv[1])
llm = llama_cpp.Llama(cfg["path"], n_gpu_layers=-1, flash_attn=True, n_ctx=cfg["p"] + cfg["g"] + 16,
                      n_batch=cfg["p"], n_ubatch=cfg["p"], logits_all=True, verbose=False, n_threads=cfg["threads"])
ids, g, reps = cfg["ids"], cfg["g"], cfg["repeats"]
import numpy as np
def prefill():
    llm.reset(); llm.eval(ids)
def decode(n):
    for i in range(n):
        llm.eval([ids[i % len(ids)]])
t0 = time.perf_counter(); prefill(); first = time.perf_counter() - t0
top1 = np.asarray(llm.scores[:len(ids)]).argmax(-1).tolist()
pre, dts, eff = [], [], []
for _ in range(reps):
    t = time.perf_counter(); prefill(); pre.append(time.perf_counter() - t)
    llm.reset(); llm.eval(ids[:1]); t = time.perf_counter(); decode(g); dts.append(time.perf_counter() - t)
    t = time.perf_counter(); prefill(); decode(g); eff.append(time.perf_counter() - t)
print(json.dumps({"prefill_tok_s": len(ids) / statistics.median(pre), "decode_tok_s": g / statistics.median(dts),
                  "effective_tok_s": g / statistics.median(eff), "ttft_ms": 1e3 * statistics.median(pre),
                  "ms_per_token": 1e3 * statistics.median(dts) / g, "prompt_logits_top1": top1,
                  "version": llama_cpp.__version__}))
"""


def run_llamacpp(path: str, ids: list[int], g: int, repeats: int, threads: int) -> dict:
    cfg = json.dumps({"path": path, "ids": ids, "p": len(ids), "g": g, "repeats": repeats, "threads": threads})
    r = subprocess.run([sys.executable, "-c", _LLAMA_WORKER, cfg], capture_output=True, text=True)
    if r.returncode:
        raise KilnError(f"llama.cpp comparison failed (is llama-cpp-python installed?): "
                        f"{r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    from kiln.commands import _Parser, _model_args
    p = _Parser(prog="kiln bench", description="Measure prefill, decode and effective tok/s of a model.")
    _model_args(p)
    p.add_argument("-p", "--prompt-tokens", type=int, default=512, help="prompt length in tokens (default 512)")
    p.add_argument("-g", "--gen-tokens", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument("-r", "--repeats", type=int, default=5, help="timed runs; the report takes the median "
                                                                 "(default 5)")
    p.add_argument("--compare", choices=["llama.cpp"], default=None, help="also run llama.cpp on the same file")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp CPU threads")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--quantized", choices=["auto", "on", "off"], default="auto",
                   help="keep weights compact (GPU default: GGUF blocks; CPU 'on': int4 / int8 rows, kiln/quant/cpu.py)")
    a = p.parse_args(argv)
    q = {"auto": None, "on": True, "off": False}[a.quantized]
    report = bench(a.model, a.prompt_tokens, a.gen_tokens, a.repeats, a.device, a.dtype, a.compare, a.threads,
                   quantized=q)
    print(json.dumps(report, indent=1) if a.json else format_report(report))
    return 0


def bench(model_name, p, g, repeats, device=None, dtype=None, compare=None, threads=2, quantized=None) -> dict:
    from kiln.generate import peak_memory_gb
    from kiln.load import load
    if p < 1 or g < 1 or repeats < 1:
        raise KilnError("--prompt-tokens, --gen-tokens and --repeats must be >= 1")
    t = time.perf_counter()
    model, _ = load(model_name, device=device, dtype=dtype, quantized=quantized)
    load_s = time.perf_counter() - t
    dev = next(model.parameters()).device
    out = {"model": getattr(model, "source", str(model_name)), "device": _device_name(dev),
           "torch": torch.__version__, "p": p, "g": g, "repeats": repeats, "load_s": load_s}
    if dev.type == "cpu":  # the batch-1 decode step's kernels (kiln/native.py) or torch's alone
        from kiln import native
        out["native_cpu_kernels"] = model.policy.native and native.available()
    if dev.type == "cuda":  # GPU memory the loaded model holds, beside the file it came from
        out["memory_after_load_gb"] = torch.cuda.memory_allocated(dev) / 1e9
        if os.path.isfile(out["model"]):
            out["file_gb"] = os.path.getsize(out["model"]) / 1e9
            out["memory_over_file"] = out["memory_after_load_gb"] / out["file_gb"]
    k = run_kiln(model, p, g, repeats)
    wb, bw = weight_bytes_per_token(model), copy_bandwidth(dev)
    k.update(peak_memory_gb=peak_memory_gb(dev), weight_bytes_per_token=wb, copy_bw_gb_s=bw / 1e9,
             achieved_gb_s=wb * k["decode_tok_s"] / 1e9, roofline_share=wb * k["decode_tok_s"] / bw)
    out["kiln"] = k
    if compare == "llama.cpp":
        ids = prompt_ids(model.args.vocab_size, p)
        lc = run_llamacpp(out["model"], ids, g, repeats, threads)
        agree = sum(x == y for x, y in zip(k["prompt_logits_top1"], lc["prompt_logits_top1"])) / p
        out["llama.cpp"] = lc
        out["prompt_top1_agreement"] = agree
        out["ratio"] = {m: k[m] / lc[m] for m in ("prefill_tok_s", "decode_tok_s", "effective_tok_s")}
    for side in ("kiln", "llama.cpp"):
        out.get(side, {}).pop("prompt_logits_top1", None)
    return out


def _device_name(dev) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({torch.get_num_threads()} threads)"


def format_report(r: dict) -> str:
    k = r["kiln"]
    native = {True: ", native decode kernels", False: ", no native kernels"}.get(r.get("native_cpu_kernels"), "")
    lines = [f"model   {r['model']}", f"device  {r['device']}{native}  (torch {r['torch']})",
             f"load {r['load_s']:.1f} s, graph capture {k['capture_s']:.2f} s; p={r['p']} g={r['g']}, "
             f"median of {r['repeats']}", "",
             f"{'':22}{'kiln':>12}" + (f"{'llama.cpp':>12}{'ratio':>8}" if "ratio" in r else "")]
    for key, label in [("prefill_tok_s", "prefill tok/s"), ("decode_tok_s", "decode tok/s"),
                       ("effective_tok_s", "effective tok/s"), ("ttft_ms", "time to first token ms"),
                       ("ms_per_token", "ms per token")]:
        row = f"{label:<22}{k[key]:>12.1f}"
        if "ratio" in r:
            row += f"{r['llama.cpp'][key]:>12.1f}" + (f"{r['ratio'][key]:>8.2f}" if key in r["ratio"] else "")
        lines.append(row)
    if "memory_over_file" in r:
        lines += ["", f"GPU memory after load {r['memory_after_load_gb']:.3f} GB = "
                      f"{r['memory_over_file']:.2f} x the file ({r['file_gb']:.3f} GB)"]
    lines += ["", f"peak memory {k['peak_memory_gb']:.2f} GB; weights read per token "
                  f"{k['weight_bytes_per_token'] / 1e6:.1f} MB; {k['achieved_gb_s']:.0f} GB/s of "
                  f"{k['copy_bw_gb_s']:.0f} GB/s copy bandwidth ({100 * k['roofline_share']:.0f}% of roofline)"]
    if "prompt_top1_agreement" in r:
        lines.append(f"prompt logits top-1 agreement with llama.cpp: {100 * r['prompt_top1_agreement']:.1f}%")
    return "\n".join(lines)
