"""The Qwen GGUF converted to a Hugging Face folder loads through the safetensors path and agrees.

Two routes to the same weights: the GGUF path (dequantized at load) and the folder `kiln convert`
writes (dequantized once, saved as safetensors + tokenizer.json). Logits must agree to 1e-3 in fp32,
and transformers must read the folder too (an independent reader of what we wrote).
"""

import pytest
import torch

import kiln
from kiln.convert import gguf_to_hf
from kiln.tokenizer import Tokenizer

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def folder(qwen_path, tmp_path_factory):
    return gguf_to_hf(qwen_path, tmp_path_factory.mktemp("qwen-hf"))


def test_folder_matches_gguf(qwen_path, folder):
    text = "def quicksort(xs):\n    if len(xs) <= 1:\n        return xs\n"
    m1, t1 = kiln.load(qwen_path, device="cpu", dtype=torch.float32, quantized=False)
    ids = torch.tensor([t1.encode(text)])
    with torch.no_grad():
        ref = m1(ids)
    del m1
    m2, t2 = kiln.load(folder, device="cpu", dtype=torch.float32, quantized=False)
    assert t2.encode(text) == ids[0].tolist()
    assert t2.chat_template == t1.chat_template and t2.eos_token_ids == t1.eos_token_ids
    with torch.no_grad():
        out = m2(ids)
    err = (out - ref).abs().max().item()
    assert err <= 1e-3, f"max |Δlogit| {err}"


def test_transformers_reads_the_folder(folder):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    msgs = [{"role": "user", "content": "hi"}]
    ours = Tokenizer.from_folder(folder)
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        ours.apply_chat_template(msgs, add_generation_prompt=True)
    assert tok("print('hello')")["input_ids"] == ours.encode("print('hello')")
