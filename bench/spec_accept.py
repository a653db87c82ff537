"""Acceptance of speculative drafts with real weights, on CPU: Qwen2.5-Coder-1.5B-Instruct (target) drafted
by the 0.5B (draft model) and by prompt lookup, greedy, on a code-editing prompt, for each K.

Prints one JSON object: per drafter and K, the rounds, drafts proposed and kept, tokens generated, and the
mean tokens per target forward ((accepted + rounds) / rounds) that bench/spec_cost.py turns into a predicted
GPU speed-up with its measured step costs. The greedy tokens are checked equal to plain greedy's.

Usage: python bench/spec_accept.py [--tokens 64] [--k 4,8,16] > bench/results/<dir>/spec_accept_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import kiln

CODE = '''def load_users(path):
    users = []
    with open(path) as f:
        for line in f:
            name, age = line.strip().split(",")
            users.append({"name": name, "age": int(age)})
    return users


def oldest(users):
    best = None
    for user in users:
        if best is None or user["age"] > best["age"]:
            best = user
    return best
'''
EDIT = [{"role": "user", "content": "Rename `users` to `people` and `user` to `person` everywhere in this code; "
         f"answer with the whole code only.\n\n```python\n{CODE}```"}]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--k", default="4,8,16")
    a = p.parse_args(argv)
    target, tok = kiln.load("qwen2.5-coder-1.5b", quantized=False)
    draft, _ = kiln.load("qwen2.5-coder-0.5b", quantized=False)
    t = time.perf_counter()
    plain = [r.token for r in kiln.stream_generate(target, tok, EDIT, max_tokens=a.tokens, logprobs=False)]
    out = {"target": "qwen2.5-coder-1.5b Q4_K_M", "draft": "qwen2.5-coder-0.5b Q4_K_M", "prompt": EDIT,
           "tokens": len(plain), "plain_s": time.perf_counter() - t, "runs": []}
    for k in (int(x) for x in a.k.split(",")):
        for name, kw in (("draft model", dict(draft_model=draft)), ("prompt lookup 3", dict(prompt_lookup=3))):
            t = time.perf_counter()
            rs = list(kiln.stream_generate(target, tok, EDIT, max_tokens=a.tokens, logprobs=False,
                                           num_draft_tokens=k, **kw))
            last = rs[-1]
            rounds = len(rs) - 1 - last.accepted  # every round yields its kept drafts and one token more
            out["runs"].append({"drafter": name, "k": k, "rounds": rounds, "drafted": last.drafted,
                                "accepted": last.accepted, "tokens": len(rs), "seconds": time.perf_counter() - t,
                                "tokens_per_round": (len(rs) - 1) / max(rounds, 1),
                                "equal_to_plain": [r.token for r in rs] == plain})
            print(json.dumps(out["runs"][-1]), flush=True, file=__import__("sys").stderr)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    raise SystemExit(main())
