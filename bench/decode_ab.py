"""Decode as a user gets it, and at depth: where the host's time goes, and split-KV attention's split count.

Usage (on the GPU machine): python bench/decode_ab.py --model a.gguf [--depth 16384] [--splits 0,66,132]
    [--user] [--json out.json]
--user: tok/s of the device loop (no token read back), of generate_step with and without log-probabilities
(the host reads every token), and of stream_generate (text too), then the host functions of
stream_generate by own time (cProfile). --depth/--splits: tg after a depth-token context with the decode
attention's split count forced (0: the default rule) and each --launches setting of its kernel, each a
fresh Decoder in the same process, each pair timed twice (interleaved).
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import json
import pstats
import statistics
import time

import torch


def _timed(fn, reps=3):
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def device_loop(dec, start, g):
    from kiln.ops import argmax
    tok = torch.zeros(1, dtype=torch.long, device="cuda")
    for i in range(g):
        tok = argmax(dec.step(tok, start + i))


def user(model, tok, g, out):
    from kiln.decoder import DecoderPool
    from kiln.generate import generate_step, stream_generate
    from kiln.sample import SamplingParams
    pool = DecoderPool(model, keep=1)
    prompt = list(range(100, 228))
    dec = pool.get(len(prompt) + g + 8)
    dec.step(torch.zeros(1, dtype=torch.long, device="cuda"), 0)
    device_loop(dec, 1, 8)
    out["device_tok_s"] = g / _timed(lambda: device_loop(dec, 1, g))
    for lp in (True, False):
        def run():
            for n, _ in enumerate(generate_step(prompt, model, SamplingParams(temperature=0.0), dec, logprobs=lp)):
                if n == 0:
                    t[0] = time.perf_counter()
                if n == g:
                    break
        t = [0.0]
        run()
        times = []
        for _ in range(3):
            run()
            times.append(time.perf_counter() - t[0])
        out[f"generate_step_logprobs_{lp}_tok_s"] = g / statistics.median(times)

    def stream():
        for r in stream_generate(model, tok, prompt, g + 1, ignore_eos=True, decoders=pool):
            if r.generation_tokens == 1:
                t[0] = time.perf_counter()
    stream()
    times = []
    for _ in range(3):
        stream()
        times.append(time.perf_counter() - t[0])
    out["stream_generate_tok_s"] = g / statistics.median(times)
    prof = cProfile.Profile()
    prof.enable()
    stream()
    prof.disable()
    st = pstats.Stats(prof)
    rows = sorted(((v[2] / g, v[1] / g, f"{k[0].split('/')[-1]}:{k[1]}:{k[2]}") for k, v in st.stats.items()),
                  reverse=True)
    out["host_us_per_token"] = 1e6 * st.total_tt / g
    out["host_top"] = [{"us": round(1e6 * a, 2), "calls": round(c, 2), "fn": n} for a, c, n in rows[:25]]


def depth(model, d, g, splits, launches, out):
    from kiln.decoder import Decoder
    from kiln.ops import attention
    base, base_launch, base_launches = model.policy, attention._LAUNCH, attention._LAUNCHES
    switches = {k: v for k, v in vars(attention).items()  # its module switches as they stand (MERGE_COLS, ...)
                if k.isupper() and not k.startswith("_") and isinstance(v, (bool, int, float))}
    ids = torch.randint(100, 30000, (1, d), generator=torch.Generator().manual_seed(0)).cuda()
    for _, (ns, launch) in itertools.product(range(2), list(itertools.product(splits, launches))):  # twice
        model.policy = base.replace(attn_splits=ns)
        fields = {k: v for k, v in launch.items() if k.upper() not in switches}
        unknown = [k for k in launch if k.isupper() and k not in switches]
        assert not unknown, f"ops.attention has no switch {unknown}"
        for k, v in switches.items():  # a launch names one as merge_cols or MERGE_COLS (read at capture)
            setattr(attention, k, launch.get(k, launch.get(k.lower(), v)))
        attention._LAUNCH = attention.Launch(**fields)  # read when the decode graph is captured
        attention._LAUNCHES = {} if fields else base_launches  # {}: the defaults, by head dim
        dec = Decoder.for_model(model, d + g + 8)
        dec.prefill(ids, 0)
        device_loop(dec, d, 4)
        key = f"tg{g}_at_{d}_splits_{ns}" + (f"_{json.dumps(launch, separators=(',', ':'))}" if launch else "")
        out.setdefault(key, []).append(g / _timed(lambda: device_loop(dec, d, g)))
        print(key, out[key], flush=True)
        dec = None
        torch.cuda.empty_cache()
    model.policy, attention._LAUNCH, attention._LAUNCHES = base, base_launch, base_launches
    for k, v in switches.items():
        setattr(attention, k, v)


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("-g", type=int, default=128)
    ap.add_argument("--depth", type=int, default=0)
    ap.add_argument("--splits", default="0")
    ap.add_argument("--launches", default="[{}]", help="JSON list of ops.attention.Launch fields to time at depth "
                    "(and ops.attention's module switches by name, or in lower case: merge_cols or MERGE_COLS, "
                    "merge_elems, merge_warps, MERGE_Q8)")
    ap.add_argument("--user", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    import kiln
    model, tok = kiln.load(a.model, device="cuda")
    out = {"model": a.model}
    if a.user:
        user(model, tok, a.g, out)
    if a.depth:
        depth(model, a.depth, a.g, [int(s) for s in a.splits.split(",")], json.loads(a.launches), out)
    print(json.dumps({k: v for k, v in out.items() if k != "host_top"}, indent=1))
    for r in out.get("host_top", [])[:15]:
        print(f"  {r['us']:8.2f} us x{r['calls']:<5} {r['fn']}")
    if a.json:
        json.dump(out, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
