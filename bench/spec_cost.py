"""Speculative decoding's costs on the GPU: a verify forward of K + 1 positions against one decode step.

For an 8B-shape target and a 0.6B-shape draft (make_gguf files, one vocabulary): the target's decode step
(the captured graph generate replays), its verify forward over K + 1 positions as kiln/speculative.py runs
it (Decoder.verify: a CUDA graph per K + 1, all rows' logits; `_eager_ms`: the eager forward it replaced),
and the draft's decode step and 2-row verify (its catch-up), at a context depth, medians of repeated timings.
With --accept (bench/spec_accept.py's JSON: tokens per target forward measured with real weights on CPU),
the predicted speed-up of each (drafter, K): tokens per round / (time per round / decode step time), the
round being the draft's catch-up and K - 1 draft steps (none for prompt lookup), then one verify. Prints one
JSON object.

Usage: python bench/spec_cost.py /tmp/g/qwen3-8b-Q4_K_M.gguf /tmp/g/qwen3-0.6b-Q4_K_M.gguf \
           [--accept bench/results/DIR/spec_accept_cpu.json] [--depth 512]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import kiln
from kiln.cache import Step
from kiln.decoder import DecoderPool


def timed(fn, n: int) -> float:
    """Median seconds of fn() over n runs, synchronized."""
    out = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def step_costs(path: str, depth: int, ks: list[int], n: int) -> dict:
    model, _ = kiln.load(path)
    dec = DecoderPool(model, keep=1).get(depth + max(ks) + 2)
    ids = torch.randint(0, model.args.vocab_size, (1, depth + max(ks) + 1), device="cuda")
    dec.prefill(ids[:, :depth], 0)
    tok = ids[0, depth:depth + 1]
    dec.step(tok, depth)  # captures
    out = {"decode_step_ms": 1e3 * timed(lambda: dec.step(tok, depth), n)}
    with torch.inference_mode():
        for k in ks:
            rows = ids[:, depth:depth + k + 1]
            eager = lambda: model(rows, Step.prefill(dec.cache, depth))  # noqa: E731 (before Decoder.verify)
            eager()
            out[f"verify_k{k}_eager_ms"] = 1e3 * timed(eager, n)
            verify = lambda: dec.verify(rows, depth)  # noqa: E731 (speculative_step's verify: a graph per K + 1)
            verify(), verify()  # the second use captures
            out[f"verify_k{k}_ms"] = 1e3 * timed(verify, n)
            out[f"verify_k{k}_over_step"] = out[f"verify_k{k}_ms"] / out["decode_step_ms"]
    del model, dec
    torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("target")
    p.add_argument("draft")
    p.add_argument("--accept", default=None)
    p.add_argument("--depth", type=int, default=512)
    p.add_argument("-k", default="4,8,16")
    p.add_argument("-n", type=int, default=30, help="timed runs per figure")
    a = p.parse_args(argv)
    ks = [int(x) for x in a.k.split(",")]
    out = {"device": torch.cuda.get_device_name(), "depth": a.depth, "target": step_costs(a.target, a.depth, ks, a.n),
           "draft": step_costs(a.draft, a.depth, [1], a.n)}
    if a.accept:
        t, d = out["target"], out["draft"]["decode_step_ms"]
        out["predicted"] = []
        for run in json.load(open(a.accept))["runs"]:
            k = run["k"]
            if f"verify_k{k}_ms" not in t:
                continue
            # a draft model's round: its catch-up (the bonus token and accepted drafts, a 2-row verify graph's
            # cost taken for it), k - 1 more steps, then the target's verify of k + 1 rows
            draft = out["draft"]["verify_k1_ms"] + (k - 1) * d if run["drafter"] == "draft model" else 0.0
            round_ms = t[f"verify_k{k}_ms"] + draft
            tokens = run["tokens_per_round"]
            out["predicted"].append({"drafter": run["drafter"], "k": k, "tokens_per_round": tokens,
                                     "round_ms": round_ms, "speedup": tokens * t["decode_step_ms"] / round_ms})
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
