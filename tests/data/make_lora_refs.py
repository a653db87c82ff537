"""llama.cpp's top-1 over a text with a GGUF LoRA that kiln exported, for tests/test_export_adapter.py.

Builds the test's seeded adapter over the real Qwen2.5-Coder-0.5B, exports it with kiln
(`kiln.finetune.export.to_gguf`), runs llama-cpp-python with and without it (`lora_path`, every row's
logits) over the first tokens of tests/data/ppl_text.txt, and writes lora_refs.json beside this script: the
tokens, both argmax rows and a hash of the exported tensors. Run by hand (needs llama-cpp-python); commit the
JSON; CI reads it and never builds llama.cpp.

Usage: python tests/data/make_lora_refs.py [--model PATH] [--tokens 192]
"""
import llama_cpp  # noqa: I001  (before numpy and torch)

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
ap = argparse.ArgumentParser()
ap.add_argument("--model", default=os.path.expanduser("~/.cache/kiln/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"))
ap.add_argument("--tokens", type=int, default=192)
a = ap.parse_args()

import torch  # noqa: E402

import kiln  # noqa: E402
from kiln.finetune.export import to_gguf  # noqa: E402
from refs import sha256_file  # noqa: E402  (tests/ is on sys.path)
from test_export_adapter import gguf_tensor_hash, seeded_adapter  # noqa: E402

tmp = Path(tempfile.mkdtemp())
model, tok = kiln.load(a.model, device="cpu", dtype=torch.float32, quantized=False)
lora = to_gguf(seeded_adapter(model, tmp / "peft"), a.model, tmp / "lora.gguf")
text = open(os.path.join(HERE, "ppl_text.txt"), encoding="utf-8").read()


def argmax(**kw):
    llm = llama_cpp.Llama(a.model, n_ctx=512, n_batch=512, logits_all=True, verbose=False, **kw)
    tokens = llm.tokenize(text.encode(), add_bos=True, special=False)[:a.tokens]
    llm.eval(tokens)
    scores = np.sort(np.asarray(llm.scores[:len(tokens)]), -1)
    return tokens, np.asarray(llm.scores[:len(tokens)]).argmax(-1).tolist(), (scores[:, -1] - scores[:, -2]).tolist()


tokens, base, base_margin = argmax()
_, with_lora, margin = argmax(lora_path=str(lora))
with torch.inference_mode():
    ours = model(torch.tensor([tokens]))[0].argmax(-1).tolist()
print(f"llama.cpp base vs lora differ at {np.mean(np.array(base) != np.array(with_lora)):.3f}; kiln+lora vs "
      f"llama.cpp+lora agree at {np.mean(np.array(ours) == np.array(with_lora)):.4f}", file=sys.stderr)
json.dump({"model_sha256": sha256_file(a.model), "tokens": tokens, "argmax_base": base,
           "margin_base": base_margin, "argmax_lora": with_lora, "margin_lora": margin,
           "tensor_sha256": gguf_tensor_hash(lora)},
          open(os.path.join(HERE, "lora_refs.json"), "w"))
