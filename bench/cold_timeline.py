"""Where a cold `kiln generate` spends its wall time: one timeline per fresh process, every mark in seconds since the
parent spawned it, on every thread (the early CUDA context and Triton's key run beside the main thread).

Each child runs the real entry point (`kiln.cli.run`, as `kiln generate ...` runs it: sys.orig_argv says `-m kiln`,
so kiln/startup.py begins the GPU's context during the import) with the stages wrapped where they are looked up:
interpreter up, `import kiln` done, the context thread, `kiln.load` and its parts (reading, tokenizer, the fit plan's
free memory, building), Triton's key and each kernel's first compile-or-load, prefill, the first token, and the quick
exit; the parent adds the process's end.

Prints one JSON line per run ({"wall": s, "marks": [[name, thread, start, end], ...]}) and, after the last, a table
of each mark's median start and end.
Usage (repo root): python bench/cold_timeline.py [--warm 1] [--runs 3] -- --model FILE.gguf --max-tokens 1 --prompt Hello
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cold_start import _env  # bench/ is the script's folder: the checkout first on PYTHONPATH

CHILD = r"""
import functools, importlib.util, json, os, sys, threading, time
T0 = float(sys.argv[1]); OUT = sys.argv[2]; ARGS = sys.argv[3:]
marks = []
def now(): return time.time() - T0
def point(name): marks.append([name, threading.current_thread().name, now(), None])
def wrapped(name, fn):
    @functools.wraps(fn)
    def w(*a, **k):
        m = [name, threading.current_thread().name, now(), None]; marks.append(m)
        try: return fn(*a, **k)
        finally: m[3] = now()
    return w
def replace(fn, new):
    # the function where it is defined and wherever it was imported by name
    for mod in list(sys.modules.values()):
        d = getattr(mod, "__dict__", None)
        if d is globals(): continue  # this script (also as __mp_main__)
        if d is not None:
            for k, v in list(d.items()):
                if v is fn: setattr(mod, k, new)
def patch(module, attr, name):
    fn = getattr(module, attr)
    replace(fn, wrapped(name, fn))
def dump():
    with open(OUT, "w") as f: json.dump(marks, f)
point("interpreter up")
sys.orig_argv = [sys.executable, "-m", "kiln"] + ARGS  # what kiln/startup.py reads: this is `kiln <command>`
sys.argv = ["kiln"] + ARGS
root = os.getcwd()
startup = None
if os.path.exists(os.path.join(root, "kiln", "startup.py")):  # a checkout from before it: no early context
    spec = importlib.util.spec_from_file_location("kiln.startup", os.path.join(root, "kiln", "startup.py"))
    startup = importlib.util.module_from_spec(spec); sys.modules["kiln.startup"] = startup
    spec.loader.exec_module(startup)
    startup._retain = wrapped("cuda context (thread)", startup._retain)
    if hasattr(startup, "_await_key"):  # Triton's key from a child: its thread waiting for the answer, the hand-over
        startup._await_key = wrapped("triton key's child (thread)", startup._await_key)
t = now(); import kiln; marks.append(["import kiln", "MainThread", t, now()])
import kiln.cli, kiln.reader, kiln.tokenizer, kiln.fit, kiln.decoder, torch
M = sys.modules
patch(M["kiln.load"], "load", "kiln.load")
patch(M["kiln.load"], "read_model", "read_model")
patch(kiln.reader, "read_gguf", "read_gguf")
kiln.tokenizer.Tokenizer.from_gguf = classmethod(wrapped("tokenizer", kiln.tokenizer.Tokenizer.from_gguf.__func__))
patch(kiln.fit, "free_memory", "fit.free_memory")
patch(M["kiln.load"], "build_model", "build_model")
patch(torch.cuda, "is_available", "torch.cuda.is_available")
patch(kiln.decoder, "prefill_chunk", "prefill")
try:
    import triton.runtime.cache as tc, triton.runtime.jit as tj
    # Still an lru_cache, everywhere Triton looks it up: startup._install hands over a child's key only in place of
    # Triton's own cached function (a plain wrapper would make it refuse, and the key be computed here after all).
    replace(tc.triton_key, functools.lru_cache()(wrapped("triton_key", tc.triton_key)))
    tj.JITFunction._do_compile = wrapped("triton kernel compile/load", tj.JITFunction._do_compile)
except Exception:
    pass
sg = M["kiln.generate"].stream_generate
def stream(*a, **k):
    m = ["stream_generate (to first token)", "MainThread", now(), None]; marks.append(m)
    for r in sg(*a, **k):
        if m[3] is None: m[3] = now()
        yield r
replace(sg, stream)
def finish(code):
    if "installed" in getattr(startup, "_begun", ()):
        point("triton key was handed over")  # whether, marked at the end; when: the child's thread's end
    point("quick exit"); dump(); startup.finish(code)
if startup is not None:
    kiln.cli.finish = finish
t = now()
try:
    kiln.cli.run() if hasattr(kiln.cli, "run") else sys.exit(kiln.cli.main())
finally:
    marks.append(["main (not quick-exited)", "MainThread", t, now()]); dump()
"""


def one(checkout: Path, args: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    env = _env(checkout)
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", CHILD, repr(t0), out] + args, cwd=checkout, env=env,
                       capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(f"kiln exited {r.returncode}:\n{r.stderr[-3000:]}")
    marks = json.loads(Path(out).read_text())
    os.unlink(out)
    return {"wall": round(wall, 4), "marks": [[n, th, round(s, 4), None if e is None else round(e, 4)]
                                                for n, th, s, e in marks]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warm", type=int, default=1, help="untimed runs first (bytecode, Triton's and kiln's caches)")
    ap.add_argument("--checkout", default=".")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="after --: the `kiln` command line (generate ...)")
    a = ap.parse_args()
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    args = ["generate"] + args if args[:1] != ["generate"] else args
    runs = [one(Path(a.checkout).resolve(), args) for _ in range(a.warm + a.runs)][a.warm:]
    for r in runs:
        print(json.dumps(r), flush=True)
    # the median of each mark's first occurrence (kernels: the first and the last), per thread
    rows: dict[tuple, list] = {}
    for r in runs:
        seen = {}
        for n, th, s, e in r["marks"]:
            key = (n, th)
            if key in seen and n != "triton kernel compile/load":
                continue
            seen[key] = True
            rows.setdefault(key, []).append((s, e))
    print(f"{'mark':42} {'thread':18} {'start':>7} {'end':>7}   (median of {len(runs)} runs; wall "
          f"{statistics.median(r['wall'] for r in runs):.3f} s)")
    for (n, th), v in sorted(rows.items(), key=lambda kv: statistics.median(s for s, _ in kv[1])):
        if n == "triton kernel compile/load":
            k = len(v) // len(runs)
            ends = [e for _, e in v if e is not None]
            print(f"{n + f' x{k}':42} {th:18} {min(s for s, _ in v):7.3f} {max(ends):7.3f}   "
                  f"(sum {sum(e - s for s, e in v if e is not None) / len(runs):.3f} s a run)")
            continue
        ends = [e for _, e in v if e is not None]
        print(f"{n:42} {th:18} {statistics.median(s for s, _ in v):7.3f} "
              f"{statistics.median(ends) if ends else float('nan'):7.3f}")


if __name__ == "__main__":
    main()
