"""Continuous-batching throughput: aggregate decode tok/s of kiln's batched engine (kiln/engine.py) at 1 and N streams.

Owns: the protocol — load one model file, warm the engine up at both batch sizes, run 1 stream, then
N concurrent streams from distinct random prompts, every stream generating G tokens (EOS ignored), read
outputs on an asyncio event loop as the server does and timestamp each token on arrival — and the JSON
it writes (device, torch version, git commit, decode tok/s at 1 and N streams and their ratio, time to
first token under load).
Not: HTTP (the server's own tests), kernels, the comparison with llama.cpp (`kiln bench --compare`).

Decode tok/s at N streams is the steady state: tokens that arrived while all N streams were decoding
(from the last stream's first token to the first stream's last) over that window. At 1 stream it is
(G - 1) / (last token - first token). TTFT is submit → first token, for each of the N streams submitted
at once (so it includes waiting for the other prompts' prefills).

Usage: python bench/engine_bench.py --model FILE.gguf [--streams 32] [--tokens 128] [--prompt-len 64] [--look-ahead both]
                                    [--device cuda] [--out results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import kiln  # noqa: E402
from kiln.bench import prompt_ids  # noqa: E402
from kiln.sample import SamplingParams  # noqa: E402
from kiln.engine import Engine, EngineRequest  # noqa: E402


def run_streams(engine: Engine, prompts: list[list[int] | EngineRequest], tokens: int) -> list[dict]:
    """Submit every prompt (or request: `tokens` long, EOS ignored) at once; per stream: submit time and each
    token's arrival time."""

    async def one(prompt):
        t0 = time.perf_counter()
        req = prompt if isinstance(prompt, EngineRequest) else EngineRequest(prompt, SamplingParams(), tokens,
                                                                              ignore_eos=True)
        handle = engine.submit(req)
        times = [time.perf_counter() async for out in handle if out.token >= 0]
        if handle.finish_reason != "length" or len(times) != tokens:
            raise RuntimeError(f"a stream ended with {handle.finish_reason!r} ({handle.error}) "
                               f"after {len(times)} of {tokens} tokens")
        return {"submit": t0, "times": times}

    async def main():
        return await asyncio.gather(*(one(p) for p in prompts))
    return asyncio.run(main())


def summarize(streams: list[dict]) -> dict:
    ttft = sorted(s["times"][0] - s["submit"] for s in streams)
    if len(streams) == 1:
        t = streams[0]["times"]
        decode = (len(t) - 1) / (t[-1] - t[0])
    else:  # steady state: every stream decoding
        start = max(s["times"][0] for s in streams)
        end = min(s["times"][-1] for s in streams)
        n = sum(1 for s in streams for t in s["times"] if start < t <= end)
        decode = n / (end - start) if end > start else float("nan")
    total = sum(len(s["times"]) for s in streams)
    wall = max(s["times"][-1] for s in streams) - min(s["submit"] for s in streams)
    return {"streams": len(streams), "decode_tok_s": decode, "effective_tok_s": total / wall,
            "ttft_median_s": statistics.median(ttft), "ttft_p90_s": ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))],
            "wall_s": wall}


def mma_on() -> bool | None:
    """Is kiln's tensor-core kernel for 9..32-row steps on (KILN_MMA)? None without Triton."""
    from kiln.ops import HAVE_TRITON
    from kiln.policy import DEFAULT
    return DEFAULT.mma if HAVE_TRITON else None


def git_commit() -> str | None:
    """HEAD of the checkout this script belongs to; None when it is not a checkout's root (a `git archive`
    copy inside another repository would otherwise report that repository's HEAD)."""
    root = Path(__file__).resolve().parent.parent
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True,  # noqa: E731
                                        check=True).stdout.strip()
        return run("rev-parse", "HEAD") if Path(run("rev-parse", "--show-toplevel")).resolve() == root else None
    except (OSError, subprocess.CalledProcessError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a GGUF file (e.g. from bench/make_gguf.py) or a known name")
    ap.add_argument("--streams", type=int, default=32, help="concurrent streams of the loaded run")
    ap.add_argument("--tokens", type=int, default=128, help="tokens each stream generates (EOS ignored)")
    ap.add_argument("--prompt-len", type=int, default=64, help="tokens of each stream's random prompt")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ctx-size", type=int, default=None, help="positions per slot (default: prompt + tokens)")
    ap.add_argument("--graphs", choices=["auto", "on", "off"], default="auto",
                    help="CUDA graphs of the batched decode step (auto: on CUDA)")
    ap.add_argument("--look-ahead", choices=["on", "off", "both"], default="both",
                    help="launch each decode step before the host reads the last one's tokens (Engine's "
                         "look_ahead); both: measure off, then on, on the same engine")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON results here")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    t = time.perf_counter()
    model, _ = kiln.load(a.model, device=device)
    load_s = time.perf_counter() - t
    ctx = a.ctx_size or -(-(a.prompt_len + a.tokens + 1) // 256) * 256
    engine = Engine(model, None, n_slots=a.streams, ctx_size=ctx, max_queue=a.streams,
                    graphs=None if a.graphs == "auto" else a.graphs == "on")
    t = time.perf_counter()
    engine.warm_up()  # CUDA graphs of the batched step, one per batch-size bucket
    capture_s = time.perf_counter() - t
    engine.start()
    try:
        vocab = model.args.vocab_size
        prompt = lambda i: prompt_ids(vocab, a.prompt_len, seed=1000 + i)  # noqa: E731
        # Warm-up at both batch sizes: Triton compiles, cuBLAS heuristics, the allocator's pools.
        run_streams(engine, [prompt(10_000 + i) for i in range(a.streams)], min(a.tokens, 8))
        run_streams(engine, [prompt(20_000)], min(a.tokens, 8))
        runs = {}
        for mode in (["off", "on"] if a.look_ahead == "both" else [a.look_ahead]):
            engine.look_ahead = mode == "on"
            one = summarize(run_streams(engine, [prompt(0)], a.tokens))
            many = summarize(run_streams(engine, [prompt(1 + i) for i in range(a.streams)], a.tokens))
            runs[mode] = {"one_stream": one, "n_streams": many,
                          "decode_ratio": many["decode_tok_s"] / one["decode_tok_s"]}
            print(f"look-ahead {mode}: 1 stream {one['decode_tok_s']:.1f} tok/s, {a.streams} streams "
                  f"{many['decode_tok_s']:.1f} tok/s, ratio {runs[mode]['decode_ratio']:.2f}", flush=True)
        stats = engine.stats()
    finally:
        engine.stop()
    result = {
        "bench": "engine", "model": str(a.model), "device": device_name(device), "torch": torch.__version__,
        "git_commit": git_commit(), "dtype": str(next(model.parameters()).dtype), "load_s": load_s,
        "graphs": engine._step.use_graphs, "capture_s": capture_s, "mma": mma_on(),
        "prompt_len": a.prompt_len, "tokens": a.tokens, "ctx_size": ctx, "n_slots": a.streams,
        "look_ahead": mode == "on", **runs[mode],  # the last mode run ("on" with both)
        "look_ahead_runs": runs,
        "engine_stats": stats,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
