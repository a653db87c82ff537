"""Mean KL of quantized KV caches against each runtime's own default cache, kiln's and llama.cpp's, on the
same GGUF file and the same token ids: the 128 tokens of tests/test_cache.py's real-model test (the refs
file's documents joined, cut at 128) and each of the refs file's four documents (prose, code, chat, mixed)
whole. Teacher-forced, every position scored, KL(default || quantized) over the full vocabulary.

kiln: the model dequantized to float32 on the CPU (as the test loads it), its default cache float32; each
type pair stored as kiln stores it (q8_0 / q4_0 rotated, keys less the k bias: kv_types.Basis) and, for
comparison, rotated without that offset ("rotated": "no offset", as llama.cpp rotates) and unrotated
(`rotate=False`: the layout before the rotation, llama.cpp's old one).
llama.cpp (llama-cpp-python, in its own process: llama_cpp is imported before torch): flash attention, its
default f16 cache as the reference; each pair with its rotation on (the default of recent llama.cpp for a
quantized cache) and off (LLAMA_ATTN_ROT_DISABLE=1).

Usage:
    python bench/kv_cache_kl.py [--model PATH.gguf] [--refs tests/data/refs_qwen2.5-coder-0.5b.npz]
Prints one JSON line per (runtime, K type, V type, rotation): the mean KL on each text.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = Path.home() / ".cache/kiln/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
PAIRS = [("q8_0", "q8_0"), ("q8_0", None), (None, "q4_0"), ("q8_0", "q4_0"), ("q4_0", "q4_0")]
GGML = {None: 1, "f16": 1, "q4_0": 2, "q8_0": 8}  # GGML_TYPE_*


def texts(refs: str) -> dict[str, list[int]]:
    sys.path.insert(0, str(ROOT))
    from tests.refs import load_refs
    docs = load_refs(refs)["docs"]
    out = {"test128": [int(t) for d in docs for t in d["tokens"]][:128]}
    out.update({d["name"]: [int(t) for t in d["tokens"]] for d in docs})
    return out


def kiln_rows(model_path: str, seqs: dict) -> list[dict]:
    import torch

    import kiln
    from kiln.cache import KVCache, Step
    model, _ = kiln.load(model_path, device="cpu", dtype=torch.float32, quantized=False)

    a = model.args

    def logprobs(ids, tk, tv, rotate):
        x = torch.tensor([ids])
        c = KVCache.for_model(model, max_len=len(ids), type_k=tk, type_v=tv, rotate=rotate) if rotate != "no offset" \
            else KVCache(a.num_hidden_layers, 1, a.num_key_value_heads, a.head_dim, len(ids), type_k=tk, type_v=tv)
        with torch.inference_mode():
            return model(x, Step.prefill(c, 0)).float().log_softmax(-1)[0]
    refs = {name: logprobs(ids, None, None, None) for name, ids in seqs.items()}
    rows = []
    for tk, tv in PAIRS:
        for rotate in (None, "no offset", False):
            kl = {name: (refs[name].exp() * (refs[name] - logprobs(ids, tk, tv, rotate))).sum(-1).mean().item()
                  for name, ids in seqs.items()}
            rows.append({"runtime": "kiln", "k": tk or "f32", "v": tv or "f32", "rotated": rotate or rotate is None,
                         "kl": kl})
    return rows


def llama_rows(model_path: str, seqs: dict) -> list[dict]:
    import llama_cpp  # noqa: F401  (first: the child process imports nothing else before it)
    import numpy as np

    def logprobs(ids, tk, tv, rotate):
        os.environ["LLAMA_ATTN_ROT_DISABLE"] = "0" if rotate else "1"  # read when a context's cache is made
        n = 1 << (len(ids) - 1).bit_length()
        llm = llama_cpp.Llama(model_path, n_ctx=n, n_batch=n, n_ubatch=n, type_k=GGML[tk], type_v=GGML[tv],
                              flash_attn=True, logits_all=True, n_threads=2, verbose=False)
        llm.eval(ids)
        z = np.asarray(llm.scores[:len(ids)], dtype=np.float64)
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))
    refs = {name: logprobs(ids, None, None, True) for name, ids in seqs.items()}
    rows = []
    for tk, tv in PAIRS:
        for rotate in (True, False):
            kl = {name: float((np.exp(refs[name]) * (refs[name] - logprobs(ids, tk, tv, rotate))).sum(-1).mean())
                  for name, ids in seqs.items()}
            rows.append({"runtime": "llama.cpp", "k": tk or "f16", "v": tv or "f16", "rotated": rotate, "kl": kl})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--refs", default=str(ROOT / "tests/data/refs_qwen2.5-coder-0.5b.npz"))
    p.add_argument("--llama-cpp-child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.llama_cpp_child:
        for row in llama_rows(a.model, json.loads(sys.stdin.read())):
            print(json.dumps(row), flush=True)
        return 0
    seqs = texts(a.refs)
    child = subprocess.run([sys.executable, __file__, "--model", a.model, "--llama-cpp-child"], input=json.dumps(seqs),
                           capture_output=True, text=True)
    for row in kiln_rows(a.model, seqs):
        print(json.dumps(row), flush=True)
    if child.returncode:
        print(f"llama.cpp run failed: {child.stderr[-2000:]}", file=sys.stderr)
        return 1
    print(child.stdout, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
