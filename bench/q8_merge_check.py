"""The attention merge's int8 output (ops/attention.MERGE_Q8) on a GPU, whole model: greedy decode of a
make_gguf file through generate's Decoder (CUDA graphs) with the merge storing o_proj's int8 input and without;
the logits of every step must be equal bit for bit (the same int8 codes reach the same GEMV). Prints one JSON.

Usage (GPU machine): python bench/q8_merge_check.py /tmp/g/qwen3-0.6b-Q4_K_M.gguf [-n 48]
"""

import argparse
import json
import sys

import torch

sys.path.insert(0, ".")
import kiln  # noqa: E402
from kiln.decoder import Decoder  # noqa: E402
from kiln.ops import attention  # noqa: E402


def run(model, ids, n):
    dec = Decoder.for_model(model, 2048)  # 2048 positions: 32 tiles, several splits
    logits = dec.prefill(torch.tensor([ids], device="cuda"), 0)  # (1, V)
    out = []
    for i in range(n):
        tok = logits[0].argmax()
        out.append(logits[0].float().cpu().clone())
        logits = dec.step(tok, len(ids) + i)
    return torch.stack(out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("-n", type=int, default=48)
    a = p.parse_args()
    model, tok = kiln.load(a.model, device="cuda")
    ids = tok.encode("The history of the printing press begins")
    res = {}
    for on in (True, False):
        attention.MERGE_Q8 = on
        res[on] = run(model, ids, a.n)
    attention.MERGE_Q8 = True
    print(json.dumps({"model": a.model, "steps": a.n, "equal": bool(torch.equal(res[True], res[False])),
                      "max_abs_diff": float((res[True] - res[False]).abs().max()),
                      "argmax_equal": bool(torch.equal(res[True].argmax(-1), res[False].argmax(-1)))}))


if __name__ == "__main__":
    main()
