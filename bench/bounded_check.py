"""Sliding-window rings on the real Gemma 3 270M: a prompt longer than its 512-token window, read and continued
greedily once through the default (ring) cache and once through a whole-context cache.

Prints one JSON object: prompt tokens, per cache (ring / full) its bytes, the seconds of prefill + decode of
two runs and the text; for ring run 1, ring run 2 and full run 2 against full run 1, whether the tokens agree
and the largest |Δ log-probability| over the steps. On a GPU the default
Decoder runs the prompt graph (padding to the ring's scratch slot) and the CUDA-graph decode step (fused
kernels for global layers, the unfused ring step for local ones): the check the CPU tests cannot make.

Usage: python bench/bounded_check.py [--device cuda] [--tokens 16] [--items 70]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import kiln
from kiln import hub
from kiln.decoder import DecoderPool
from kiln.generate import generate_step
from kiln.sample import SamplingParams


def run(model, ids, sliding: bool, n: int) -> dict:
    """Two generations through one Decoder: on a GPU the second runs the prompt graph (captured on a bucket's
    second use) and the decode graph; both must agree with the whole cache."""
    dec = DecoderPool(model).get(len(ids) + n + 1, sliding=sliding)
    runs, seconds = [], []
    for _ in range(2):
        tic = time.perf_counter()
        runs.append(list(generate_step(ids, model, SamplingParams(temperature=0.0), dec, max_tokens=n)))
        seconds.append(round(time.perf_counter() - tic, 2))
    return dict(rings=dec.cache.rings is not None, cache_bytes=dec.cache.nbytes, seconds=seconds, out=runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--items", type=int, default=70, help="lines of the prompt (about 13 tokens each)")
    a = p.parse_args()
    model, tok = kiln.load(hub.resolve("gemma3-270m", progress=False), device=a.device)
    text = " ".join(f"Item {i}: the {['red', 'blue', 'green'][i % 3]} box holds {i * 7 % 13} apples."
                    for i in range(a.items))
    ids = tok.encode(text + " Question: what does item 3 hold? Answer:")
    ring, full = run(model, ids, True, a.tokens), run(model, ids, False, a.tokens)
    ref = full["out"][0]
    diff = [max((x.float().cpu() - y.float().cpu()).abs().max().item() for (_, x), (_, y) in zip(r, ref))
            for r in ring["out"] + full["out"][1:]]
    same = [[t for t, _ in r] == [t for t, _ in ref] for r in ring["out"] + full["out"][1:]]
    for r in (ring, full):
        r["text"] = tok.decode([t for t, _ in r.pop("out")[0]])
    print(json.dumps(dict(prompt_tokens=len(ids), ring=ring, full=full, same_tokens=same,
                          max_abs_dlogprob=diff, device=str(next(model.parameters()).device)), indent=1))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
