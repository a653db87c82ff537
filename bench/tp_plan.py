"""Measurements for a `-tp 2` plan on one GPU (issue 15): what a rank computes, and what NCCL costs it.

On one GPU, for a GGUF file (e.g. make_gguf's Qwen3-8B Q4_K_M):
- the whole model's decode step (the captured graph generate replays), ms;
- rank 0's share at `-tp 2` (its heads, its half of the MLP and of the vocabulary: kiln/parallel.py's cut),
  built without its collectives, decode step ms: what each of two GPUs computes per token;
- NCCL on this GPU (a group of world size 1, the only one a single GPU allows): one all_reduce of one decode
  step's activation row (hidden size, bf16) and the all_gather of the logits, eager and inside a captured
  graph of as many calls as a step makes (2 per layer + the embedding's): the launch and kernel cost a step
  pays for its collectives before any byte crosses a link.
Prints one JSON object; the plan (bench/results/.../README.md) adds the link's latency per call.

Usage: python bench/tp_plan.py /tmp/g/qwen3-8b-Q4_K_M.gguf [--depth 512] [-n 200]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, ".")
import kiln  # noqa: E402
from bench.spec_cost import timed  # noqa: E402
from kiln.decoder import DecoderPool  # noqa: E402
from kiln.parallel import Shard  # noqa: E402


class Unwrapped(Shard):
    """Rank `rank`'s share of the weights, built without the collectives around its layers."""

    def wrap(self, model, config):
        return model


def decode_step_ms(model, depth: int, n: int) -> float:
    dec = DecoderPool(model, keep=1).get(depth + 2)
    ids = torch.randint(0, model.args.vocab_size, (1, depth + 1), device="cuda")
    dec.prefill(ids[:, :depth], 0)
    tok = ids[0, depth:depth + 1]
    dec.step(tok, depth)  # captures
    return 1e3 * timed(lambda: dec.step(tok, depth), n)


def nccl_costs(hidden: int, vocab_half: int, calls: int, n: int) -> dict:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    x = torch.randn(1, 1, hidden, dtype=torch.bfloat16, device="cuda")
    part = torch.randn(1, vocab_half, dtype=torch.bfloat16, device="cuda")
    parts = [torch.empty_like(part)]
    out = {"all_reduce_eager_us": 1e6 * timed(lambda: dist.all_reduce(x), n),
           "all_gather_logits_eager_us": 1e6 * timed(lambda: dist.all_gather(parts, part), n)}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        dist.all_reduce(x)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            dist.all_reduce(x)
    out[f"graph_of_{calls}_all_reduces_us"] = 1e6 * timed(g.replay, n)
    out["all_reduce_in_graph_us"] = out[f"graph_of_{calls}_all_reduces_us"] / calls
    dist.destroy_process_group()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--depth", type=int, default=512)
    p.add_argument("-n", type=int, default=200)
    a = p.parse_args(argv)
    out = {"device": torch.cuda.get_device_name(), "depth": a.depth}
    full, _ = kiln.load(a.model)
    args = full.args
    out["decode_step_ms_tp1"] = decode_step_ms(full, a.depth, a.n)
    del full
    torch.cuda.empty_cache()
    share, _ = kiln.load(a.model, shard=Unwrapped(0, 2))
    out["decode_step_ms_rank0_of_2"] = decode_step_ms(share, a.depth, a.n)
    out["rank0_vocab"] = share.args.vocab_size
    del share
    torch.cuda.empty_cache()
    calls = 2 * args.num_hidden_layers + 1
    out["collectives_per_step"] = {"all_reduce": calls, "all_gather": 1,
                                   "all_reduce_bytes": 2 * args.hidden_size}
    out["nccl_world_1"] = nccl_costs(args.hidden_size, out["rank0_vocab"], calls, a.n)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
