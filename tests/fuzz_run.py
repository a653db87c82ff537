"""Running fuzz cases for tests/test_fuzz_formats.py, in a child process of the test or by hand.

Owns: writing a case's file (`write_file`), running one case and judging it (`run_case`: accepted, or one
KilnError with a short message, within a CPU-time budget; anything else is a finding), the tally, and the
command line a child runs:
    PYTHONPATH=. python tests/fuzz_run.py gguf --model FILE.gguf --cases 2000 --seed 1 [--shard K/N]
    PYTHONPATH=. python tests/fuzz_run.py gguf --model FILE.gguf --seed SEED --case INDEX   # reproduce one
    PYTHONPATH=. python tests/fuzz_run.py safetensors --cases 600 --seed 1
It prints each failure as it happens (with the line that reproduces it) and a JSON summary at the end;
exit status 1 when anything failed.
Not: the mutations (fuzz_gguf.py, fuzz_safetensors.py), the tests and their thresholds.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

CASE_SECONDS = 5.0  # a case that takes more CPU time than this is a hang
RSS_GROWTH_MB = 1024  # peak memory a whole run may add over the unmutated base's load
PROGRESS: Path | None = None  # where the child notes the case it is running (set by main)


def write_file(path: Path, header: bytes, size: int) -> None:
    """The header, then zeros up to `size` as a hole (the data section costs no disk)."""
    path.unlink(missing_ok=True)  # a fresh inode: an earlier case's mmap never sees this one
    with open(path, "wb") as f:
        f.write(header[:size])
        f.truncate(size)


@dataclass
class Tally:
    accepted: int = 0
    rejected: int = 0
    failures: list = field(default_factory=list)
    slowest: tuple = (0.0, "")
    rss_base: float = 0.0  # peak RSS (MB) once the unmutated base has loaded
    rss_jump: tuple = (0.0, "")  # the largest rise of the peak in one case, and that case
    messages: dict = field(default_factory=dict)  # first words of each error, counted


def run_case(tally: Tally, load, path: Path, what: str, repro: str) -> None:
    from kiln.errors import KilnError
    if PROGRESS is not None:
        PROGRESS.write_text(f"{what}\n  reproduce: {repro}\n")
    t0, rss = time.process_time(), _rss_mb()  # CPU time: a starved process is not a hung one
    problem = None
    try:
        load(path)
        tally.accepted += 1
    except KilnError as e:
        tally.rejected += 1
        msg = str(e)
        if not msg or len(msg) > 1000:
            problem = f"KilnError message of {len(msg)} characters: {msg[:300]!r}"
        key = " ".join(msg.replace(str(path), "FILE").split()[:6])
        tally.messages[key] = tally.messages.get(key, 0) + 1
    except Exception as e:  # the finding: anything but KilnError
        problem = "".join(traceback.format_exception(e)[-6:])
    dt = time.process_time() - t0
    if _rss_mb() - rss > tally.rss_jump[0]:
        tally.rss_jump = (_rss_mb() - rss, what)
    if dt > tally.slowest[0]:
        tally.slowest = (dt, what)
    if dt > CASE_SECONDS:
        problem = (problem or "") + f"took {dt:.1f} s of CPU (budget {CASE_SECONDS} s)"
    if problem:
        tally.failures.append(f"{what}\n  reproduce: {repro}\n  {problem}")
        print("FAIL", tally.failures[-1], flush=True)  # at once: a long run shows what it finds as it goes


def repro(kind: str, model: Path | None, seed: int, case: int) -> str:
    where = f" --model {model}" if model else ""
    return f"PYTHONPATH=. python tests/fuzz_run.py {kind}{where} --seed {seed} --case {case}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="fuzz kiln's model-file readers")
    ap.add_argument("kind", choices=["gguf", "safetensors"])
    ap.add_argument("--model", type=Path, help="the real Qwen2.5-Coder-0.5B GGUF (gguf only)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--case", type=int, help="run only this case (to reproduce one)")
    ap.add_argument("--shard", default="0/1", help="K/N: run cases K, K+N, K+2N... (N processes in parallel)")
    ap.add_argument("--progress", type=Path, help="file to hold the case being run (names a hang)")
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args(argv)
    import logging
    import tempfile
    logging.disable(logging.WARNING)  # unknown pre-tokenizers etc. warn; the cases are about errors
    k, n = map(int, args.shard.split("/"))
    cases = range(args.case, args.case + 1) if args.case is not None else range(k, args.cases, n)
    global PROGRESS
    PROGRESS = args.progress
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        t0 = time.perf_counter()
        if args.kind == "gguf":
            from fuzz_gguf import fuzz_gguf
            tally = fuzz_gguf(args.model, Path(work), args.seed, cases)
        else:
            from fuzz_safetensors import fuzz_safetensors
            tally = fuzz_safetensors(Path(work), args.seed, cases)
        growth = _rss_mb() - tally.rss_base
    if growth > RSS_GROWTH_MB:
        tally.failures.append(f"peak memory grew by {growth:.0f} MB")
    summary = dict(kind=args.kind, seed=args.seed, cases=len(cases), accepted=tally.accepted,
                   rejected=tally.rejected, failures=len(tally.failures), seconds=round(time.perf_counter() - t0, 1),
                   cpu_seconds=round(time.process_time(), 1),
                   slowest_case_cpu_s=[round(tally.slowest[0], 3), tally.slowest[1]], peak_rss_growth_mb=round(growth),
                   largest_rss_jump=[round(tally.rss_jump[0]), tally.rss_jump[1]],
                   errors=dict(sorted(tally.messages.items(), key=lambda kv: -kv[1])[:40]))
    print(json.dumps(summary, indent=1), flush=True)
    return 1 if tally.failures else 0


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":  # run as the module fuzz_gguf.py imports, so PROGRESS is the one run_case reads
    import fuzz_run
    sys.exit(fuzz_run.main())
