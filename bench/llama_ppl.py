"""llama.cpp's perplexity of GGUF files (llama-perplexity's rule, through llama-cpp-python): the text cut into
chunks of --ctx-size tokens, each evaluated alone, the negative log-likelihood of the second half of each
chunk's tokens (every token after the first half predicts the next), PPL = exp(mean).

Usage (own process: llama_cpp is imported before numpy):
    python bench/llama_ppl.py A.gguf [B.gguf ...] --text tests/data/ppl_text.txt [--ctx-size 512] [--threads 2]
Prints one JSON line per file: chunks, scored tokens, PPL, and the ratio to the first file's PPL.
"""
import llama_cpp  # noqa: I001

import argparse
import json
import math
import time

import numpy as np


def ppl(path: str, text: str, n_ctx: int, threads: int) -> dict:
    llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=threads, verbose=False)
    tokens = llm.tokenize(text.encode(), add_bos=False, special=False)
    nll, count, t0 = 0.0, 0, time.perf_counter()
    for start in range(0, len(tokens) - n_ctx + 1, n_ctx):
        chunk = tokens[start:start + n_ctx]
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[:n_ctx], dtype=np.float64)  # (n_ctx, V)
        first = n_ctx // 2
        z = logits[first - 1:n_ctx - 1]
        lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
        nll += float((lse - z[np.arange(len(z)), chunk[first:]]).sum())
        count += len(z)
    return {"file": path, "chunks": len(tokens) // n_ctx, "scored": count, "ppl": math.exp(nll / count),
            "seconds": time.perf_counter() - t0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--text", required=True)
    p.add_argument("--ctx-size", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    text = open(a.text, encoding="utf-8").read()
    base = None
    for f in a.files:
        r = ppl(f, text, a.ctx_size, a.threads)
        base = base or r["ppl"]
        r["ratio_to_first"] = r["ppl"] / base
        print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
