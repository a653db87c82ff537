"""Read the llama.cpp reference files written by tests/data/make_llamacpp_refs.py.

Owns: turning one `refs_<key>.npz` back into plain Python/numpy structures, and `sha256_file` (is the
model the one the references were made from?). numpy only, so tests that
compare against llama.cpp never import llama_cpp (CI does not build it). Does not compare anything.

Layout of the file: `meta` is a JSON string (model key, GGUF file name and sha256, llama-cpp-python
version, top_k, the documents' names/texts/offsets, and the greedy prompts with their ids, generated ids,
text, per-step top-1 margins, batch_agree and the generated ids under llama.cpp's other settings); the `tf_*` arrays hold every document's positions concatenated:
tokens (N,), topk_ids (N, K), topk_logprobs (N, K), rest_logprob (N,) = log of the probability mass
outside the top-K, argmax (N,), and argmax_<variant> (N,) for each of llama.cpp's own other settings named
in meta["variants"] (one token per eval, flash attention, an f32 KV cache).
"""

import hashlib
import json

import numpy as np

_FIELDS = ("tokens", "topk_ids", "topk_logprobs", "rest_logprob", "argmax")


def load_refs(path) -> dict:
    """Return {"meta": dict, "docs": [dict per document with its slice of each tf_ array], "greedy": list}."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        fields = _FIELDS + tuple(f"argmax_{v}" for v in meta.get("variants", {}))
        arrays = {f: z["tf_" + f] for f in fields}
    docs = []
    for d in meta["docs"]:
        part = slice(d["offset"], d["offset"] + d["n"])
        docs.append({"name": d["name"], "text": d["text"], **{f: a[part] for f, a in arrays.items()}})
    return {"meta": meta, "docs": docs, "greedy": meta["greedy"]}


def sha256_file(path) -> str:
    """The sha256 of a file (the model a reference file was made from)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
