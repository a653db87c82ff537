"""llama.cpp's perplexity of the real Qwen2.5-Coder-0.5B on tests/data/ppl_text.txt, for tests/test_eval.py.

The text is CPython 3.11's LICENSE file (natural English of ~3,000 tokens that anyone may copy).

Computes what llama-perplexity computes (tools/perplexity: chunks of n_ctx tokens, the first set to BOS
where the model adds one, the second half of each chunk scored) through llama-cpp-python's batched eval
with every row's logits, and writes ppl_refs.json beside this script. Run by hand (needs llama-cpp-python);
commit the JSON; CI reads it and never builds llama.cpp.

Usage: python tests/data/make_ppl_refs.py [--model PATH]
"""
import llama_cpp  # noqa: I001  (before numpy)

import argparse
import json
import math
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
N_CTX, N_CHUNKS = 128, 16

ap = argparse.ArgumentParser()
ap.add_argument("--model", default=os.path.expanduser("~/.cache/kiln/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"))
ap.add_argument("--text", default=os.path.join(HERE, "ppl_text.txt"))
ap.add_argument("--chunks", type=int, default=N_CHUNKS)
ap.add_argument("--out", default=os.path.join(HERE, "ppl_refs.json"))
a = ap.parse_args()
N_CHUNKS = a.chunks
llm = llama_cpp.Llama(a.model, n_ctx=N_CTX, n_batch=N_CTX, logits_all=True, verbose=False)
text = open(a.text, encoding="utf-8").read()
tokens = llm.tokenize(text.encode(), add_bos=True, special=False)  # llama-perplexity: add_special, no parse_special
add_bos = llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model))
nll = nll2 = 0.0
count, running = 0, []
for i in range(min(len(tokens) // N_CTX, N_CHUNKS)):
    chunk = tokens[i * N_CTX:(i + 1) * N_CTX]
    if add_bos:
        chunk = [llm.token_bos()] + chunk[1:]
    llm.reset()
    llm.eval(chunk)
    logits = np.asarray(llm.scores[:N_CTX], dtype=np.float64)
    first = N_CTX // 2
    lp = logits[first:N_CTX - 1]
    lp = lp - lp.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    picked = lp[np.arange(lp.shape[0]), chunk[first + 1:]]
    nll -= picked.sum()
    nll2 += (picked ** 2).sum()
    count += picked.shape[0]
    running.append(math.exp(nll / count))
mean = nll / count
var = nll2 / count - mean * mean
ppl = math.exp(mean)
out = {"model": os.path.basename(a.model), "n_ctx": N_CTX, "chunks": len(running), "tokens": tokens,
       "add_bos": bool(add_bos), "ppl": ppl, "ppl_error": ppl * math.sqrt(var / (count - 1)), "count": count,
       "running": running, "llama_cpp_python": llama_cpp.__version__}
json.dump(out, open(a.out, "w"))
print({k: v for k, v in out.items() if k != "tokens"}, len(tokens))
