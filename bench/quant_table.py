"""Bits per weight against KL divergence for every `kiln convert --to gguf` type, kiln's quantizer beside
llama.cpp's (the llama-quantize binary), with and without an importance matrix: the README's table.

For each (type, quantizer, imatrix) of the plan, in order: quantize the F16 file, measure bits per weight
(all tensors' bytes * 8 / all weights, as llama-quantize reports BPW), hash every tensor (type and bytes, so
that kiln's file is compared tensor by tensor with llama.cpp's even when they were made in different runs),
score it with `kiln perplexity --kl-divergence BASE --quantized off` (the exact float32 weights: mean KL, same
top-1, PPL), append one JSON line to --results, delete the file. A (type, quantizer, imatrix) already in
--results is skipped, so a stopped run resumes where it stopped. Every child runs on one thread.

Usage:
    nice -n 10 python bench/quant_table.py --f16 F16.gguf --base BASE.kld --text TEXT --chunks 3 \\
        --imatrix IMATRIX.gguf --llama-quantize PATH/llama-quantize --results R.jsonl [--only kiln:q8_0,...]
    python bench/quant_table.py --results R.jsonl --table      # the markdown table of the measured rows
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TYPES = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m",
         "q5_k_s", "q5_k_m", "q6_k", "iq4_nl", "iq4_xs"]
# kiln's quantizers by cost on CPU: the legacy types without an importance matrix are absmax rules (seconds),
# the searches (K-quants, IQ4, legacy with imatrix) take minutes for the 1.5B.
KILN_CHEAP = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]
KILN_SEARCH = ["q4_k_m", "q6_k", "iq4_xs", "q3_k_s", "q5_k_m", "iq4_nl", "q4_k_s", "q5_k_s", "q3_k_m", "q3_k_l",
               "q2_k"]


def plan() -> list[tuple[str, str, bool]]:
    """llama.cpp's plain rows (a minute or three each), kiln's cheap rows, llama.cpp's imatrix rows with kiln's
    beside them for the issue's two imatrix types (q3_k_s, iq4_xs) early, then kiln's searches."""
    jobs = [("llama", t, False) for t in TYPES] + [("kiln", t, False) for t in KILN_CHEAP]
    jobs += [("llama", t, True) for t in TYPES[:6]]
    jobs += [(q, t, True) for t in ("q3_k_s", "iq4_xs") for q in ("llama", "kiln")]
    jobs += [("llama", t, True) for t in TYPES] + [("kiln", t, False) for t in KILN_SEARCH]
    jobs += [("kiln", t, True) for t in KILN_CHEAP + KILN_SEARCH]
    return list(dict.fromkeys(jobs))


def key(quantizer: str, qtype: str, imatrix: bool) -> str:
    return f"{quantizer}:{qtype}" + ("+imatrix" if imatrix else "")


def run(cmd: list[str], log) -> float:
    """Run a child on one thread, its output to the log; seconds taken, or SystemExit with its tail."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    print("$", " ".join(cmd), file=log, flush=True)
    t = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log.write(r.stdout[-4000:])
    log.flush()
    if r.returncode:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-2000:]}")
    return time.perf_counter() - t


def quantize(a, quantizer: str, qtype: str, imatrix: bool, out: Path, log) -> float:
    if quantizer == "llama":
        cmd = [a.llama_quantize] + (["--imatrix", a.imatrix] if imatrix else []) + [a.f16, str(out), qtype.upper(), "1"]
    else:
        cmd = [sys.executable, "-m", "kiln.cli", "convert", a.f16, str(out), "--to", "gguf", "--type", qtype]
        cmd += ["--imatrix", a.imatrix] if imatrix else []
    return run(cmd, log)


def tensors(path: Path) -> tuple[dict, float]:
    """{name: [ggml type, sha1 of the bytes]} and bits per weight over all tensors."""
    from gguf import GGUFReader
    r = GGUFReader(str(path))
    out, nbytes, nweights = {}, 0, 0
    for t in r.tensors:
        out[t.name] = [t.tensor_type.name, hashlib.sha1(t.data.tobytes()).hexdigest()[:16]]
        nbytes += int(t.n_bytes)
        nweights += int(t.n_elements)
    return out, nbytes * 8 / nweights


def kl(a, path: Path, log) -> dict:
    cmd = [sys.executable, "-m", "kiln.cli", "perplexity", "--model", str(path), "--device", "cpu",
           "--quantized", "off", "--file", a.text, "--ctx-size", "512", "--chunks", str(a.chunks),
           "--kl-divergence", a.base, "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    log.write(r.stderr[-2000:])
    if r.returncode:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return dict(json.loads(r.stdout.strip().splitlines()[-1]), kl_seconds=time.perf_counter() - t)


def compare(mine: dict, other: dict) -> dict:
    same = sum(1 for n, v in mine.items() if other.get(n) == v)
    types = sum(1 for n, v in mine.items() if n in other and other[n][0] != v[0])
    return {"identical_tensors": same, "tensors": len(mine), "tensors_of_other_type": types}


def read_rows(path: Path) -> list[dict]:
    return [json.loads(s) for s in path.read_text().splitlines() if s.strip()] if path.exists() else []


def measure(a, job, rows: list[dict], log) -> dict:
    quantizer, qtype, imatrix = job
    out = Path(a.work) / f"{quantizer}-{qtype}{'-imatrix' if imatrix else ''}.gguf"
    out.unlink(missing_ok=True)
    try:
        seconds = quantize(a, quantizer, qtype, imatrix, out, log)
        hashes, bpw = tensors(out)
        row = {"key": key(*job), "quantizer": quantizer, "type": qtype, "imatrix": imatrix,
               "bpw": bpw, "file_bytes": out.stat().st_size, "quantize_seconds": seconds}
        row.update(kl(a, out, log))
    finally:
        out.unlink(missing_ok=True)
    other = next((r for r in rows if r["type"] == qtype and r["imatrix"] == imatrix
                  and r["quantizer"] != quantizer), None)
    if other is not None:
        row["vs_other"] = compare(hashes, other["tensor_hashes"])
    row["tensor_hashes"] = hashes
    return row


def table(rows: list[dict]) -> str:
    """Markdown: one line per (type, imatrix): BPW, then llama.cpp's and kiln's mean KL, same top-1 and PPL,
    and how many of kiln's tensors equal llama.cpp's; a side not in `rows` says so."""
    by = {r["key"]: r for r in rows}

    def pair(t, im, fmt):
        cells = []
        for q in ("llama", "kiln"):
            r = by.get(key(q, t, im))
            cells.append(fmt(r) if r else "not measured yet")
        return cells

    def bpw(t, im):
        v = sorted({f"{r['bpw']:.3f}" for q in ("llama", "kiln") if (r := by.get(key(q, t, im)))})
        return " / ".join(v) or "not measured yet"

    def same(t, im):
        v = (by.get(key("kiln", t, im)) or by.get(key("llama", t, im)) or {}).get("vs_other")
        return f"{v['identical_tensors']}/{v['tensors']}" if v else "-"

    out = ["| --type | imatrix | BPW | mean KL llama.cpp | mean KL kiln | same top-1 llama.cpp | same top-1 kiln "
           "| PPL llama.cpp | PPL kiln | kiln's tensors = llama.cpp's |", "|" + " --- |" * 10]
    for im in (False, True):
        for t in TYPES:
            kl = pair(t, im, lambda r: f"{r['mean_kl']:.5f} ± {r['mean_kl_error']:.5f}")
            top = pair(t, im, lambda r: f"{100 * r['same_top1']:.1f}%")
            ppl = pair(t, im, lambda r: f"{r['ppl']:.3f}")
            out.append(f"| {t} | {'yes' if im else 'no'} | {bpw(t, im)} | {' | '.join(kl)} | {' | '.join(top)} "
                       f"| {' | '.join(ppl)} | {same(t, im)} |")
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, required=True, help="the JSONL of measured rows (appended to)")
    p.add_argument("--table", action="store_true", help="print the markdown table of --results and stop")
    p.add_argument("--f16")
    p.add_argument("--base", help="kiln perplexity --kl-divergence-base of the F16 file on --text")
    p.add_argument("--text")
    p.add_argument("--chunks", type=int, default=3)
    p.add_argument("--imatrix", help="one importance matrix for both quantizers (kiln imatrix's GGUF)")
    p.add_argument("--llama-quantize", help="llama.cpp's llama-quantize binary")
    p.add_argument("--work", default="/tmp/qt/work", help="folder for the quantized files (deleted when scored)")
    p.add_argument("--only", help="comma-separated keys (llama:q4_k_m, kiln:q2_k+imatrix) to run, in plan order")
    a = p.parse_args()
    if a.table:
        print(table(read_rows(a.results)), end="")
        return 0
    Path(a.work).mkdir(parents=True, exist_ok=True)
    a.results.parent.mkdir(parents=True, exist_ok=True)
    only = set(a.only.split(",")) if a.only else None
    with open(Path(a.work) / "quant_table.log", "a") as log:
        for job in plan():
            rows = read_rows(a.results)
            if key(*job) in {r["key"] for r in rows} or (only and key(*job) not in only):
                continue
            print(time.strftime("%H:%M:%S"), "start", key(*job), flush=True)
            row = measure(a, job, rows, log)
            with open(a.results, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(time.strftime("%H:%M:%S"), key(*job), {k: row[k] for k in ("bpw", "mean_kl", "same_top1", "ppl",
                  "quantize_seconds", "kl_seconds")}, row.get("vs_other", ""), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
