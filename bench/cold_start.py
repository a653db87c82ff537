"""Cold start, stage by stage, in fresh processes: `import kiln`, reading a GGUF header, building its tokenizer
(no cache; from a warm tokenizer cache where the checkout has one), `kiln.load`, and a whole
`kiln generate --max-tokens 1` (wall time of the process). One or more checkouts are timed side by side, their
runs alternating, so the noise of a shared machine falls on each alike.

Prints one JSON line per (checkout, model, stage): min, median and every run, in seconds; a stage a checkout
cannot run (no tokenizer cache before it existed) is left out. `load` uses kiln's own cache folder
($KILN_HOME: built kernels, tokenizer merges), warmed by an untimed first run, as a user's second start would.

Usage (repo root): python bench/cold_start.py --model FILE.gguf [--model F2] [--checkout DIR ...] [--runs 5]
                   [--device cpu]
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

CHILD = r"""
import json, sys, time
from pathlib import Path
T = time.perf_counter
t = T(); import kiln; out = {"import": T() - t}
from kiln.formats.gguf import read_gguf
from kiln.tokenizer import Tokenizer
path, device, cache = sys.argv[1], sys.argv[2], sys.argv[3]
t = T(); g = read_gguf(path); out["read_gguf"] = T() - t
if cache == "-":
    t = T(); Tokenizer.from_gguf(g.meta); out["tokenizer"] = T() - t
    t = T(); kiln.load(path, device=device); out["load"] = T() - t
else:
    try:
        t = T(); Tokenizer.from_gguf(g.meta, Path(cache)); out["tokenizer_cached"] = T() - t
    except TypeError:  # a checkout without the cache
        pass
print(json.dumps(out))
"""


def _env(checkout: Path) -> dict:
    """The environment with `checkout` first on PYTHONPATH, before what the caller has there (carried wheels)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(checkout), os.environ.get("PYTHONPATH")) if p))


def child(checkout: Path, model: str, device: str, cache: str) -> dict:
    env = _env(checkout)
    r = subprocess.run([sys.executable, "-c", CHILD, model, device, cache], cwd=checkout, env=env,
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def generate(checkout: Path, model: str, device: str) -> float:
    env = _env(checkout)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kiln.cli", "generate", "-m", model, "-p", "hi", "--max-tokens", "1",
                    "--device", device], cwd=checkout, env=env, capture_output=True, check=True)
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", action="append", required=True)
    p.add_argument("--checkout", action="append", type=Path, help="default: this checkout")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    checkouts = [c.resolve() for c in a.checkout or [Path(__file__).resolve().parent.parent]]
    with tempfile.TemporaryDirectory() as tmp:
        times: dict[tuple, list[float]] = {}
        for model in a.model:
            for c in checkouts:  # untimed: the tokenizer cache, built kernels and the page cache warmed
                child(c, model, a.device, "-")
                child(c, model, a.device, tmp)
            for _ in range(a.runs):
                for c in checkouts:
                    for mode in ("-", tmp):
                        for stage, s in child(c, model, a.device, mode).items():
                            times.setdefault((str(c), model, stage), []).append(s)
                    times.setdefault((str(c), model, "generate_wall"), []).append(generate(c, model, a.device))
    for (c, model, stage), runs in times.items():
        print(json.dumps({"checkout": c, "model": Path(model).name, "stage": stage, "min": round(min(runs), 3),
                          "median": round(statistics.median(runs), 3), "runs": [round(r, 3) for r in runs]}))


if __name__ == "__main__":
    main()
