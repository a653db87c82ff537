"""`kiln export-adapter`: kiln's LoRA adapters as llama.cpp and mlx-lm take them.

GGUF: a seeded random adapter over the real Qwen2.5-Coder-0.5B, exported by kiln, was run by llama.cpp
(`lora_path`) over a text by tests/data/make_lora_refs.py. Its top-1 must agree with kiln's (base + adapter,
fp32) on >= 98% of the positions where llama.cpp's top-1/top-2 margin is decisive (as test_real_models
counts it), and every disagreement must be a near-tie in llama.cpp (that text has near-ties where two
correct implementations differ: kiln's and llama.cpp's bases agree on 97.4% of it). The adapter must change
llama.cpp's own top-1 enough that the comparison means something, and the export must hold the very tensors
llama.cpp ran (a hash).
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import kiln
from kiln.finetune import layers as L

REFS = Path(__file__).parent / "data" / "lora_refs.json"
RANK, ALPHA, SEED, STD = 8, 16.0, 7, 0.008
DECISIVE, NEAR_TIE = 0.5, 0.25  # test_real_models' top-1/top-2 logit margins


def seeded_adapter(model, out: Path) -> Path:
    """A rank-8 adapter on every projection of every block of `model` (modified in place), B drawn from a
    seeded normal (A keeps LoRALinear's seeded init), saved in PEFT's format in `out`."""
    torch.manual_seed(SEED)
    names = L.apply_lora(model, RANK, ALPHA, 0.0)
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for m in L.lora_modules(model).values():
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) / m.in_features ** 0.5)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * STD)
    n = len(model.model.layers)
    L.save_adapter(model, out, L.peft_config(RANK, ALPHA, 0.0, L.DEFAULT_TARGETS, range(n), n))
    assert names
    return out


def gguf_tensor_hash(path) -> str:
    """sha256 of every tensor's name, shape and bytes in a GGUF file, in file order."""
    import gguf
    h = hashlib.sha256()
    for t in gguf.GGUFReader(str(path)).tensors:
        h.update(t.name.encode() + str(list(t.shape)).encode() + np.ascontiguousarray(t.data).tobytes())
    return h.hexdigest()


@pytest.mark.model
def test_gguf_lora_agrees_with_llama_cpp(qwen_path, tmp_path):
    from kiln.finetune.export import to_gguf
    refs = json.loads(REFS.read_text())
    model, _ = kiln.load(qwen_path, device="cpu", dtype=torch.float32, quantized=False)
    peft = seeded_adapter(model, tmp_path / "peft")
    out = to_gguf(peft, qwen_path, tmp_path / "lora.gguf")
    assert gguf_tensor_hash(out) == refs["tensor_sha256"], "the export differs from the file llama.cpp ran"
    with torch.inference_mode():
        top1 = model(torch.tensor([refs["tokens"]]))[0].argmax(-1).numpy()
    lora, base, margin = (np.array(refs[k]) for k in ("argmax_lora", "argmax_base", "margin_lora"))
    assert (lora != base).mean() >= 0.1, "the adapter hardly changes llama.cpp's output: a weak test"
    same = top1 == lora
    assert same[margin >= DECISIVE].mean() >= 0.98, f"decisive top-1 agreement {same[margin >= DECISIVE].mean():.4f}"
    assert (margin[~same] < NEAR_TIE).all(), f"kiln and llama.cpp + LoRA differ where llama.cpp's margin is " \
        f"{margin[~same].max():.3f} (agreement {same.mean():.4f})"


def test_export_errors(tmp_path):
    from kiln.cli import main
    assert main(["export-adapter", str(tmp_path), str(tmp_path / "x.gguf"), "--model", "qwen2.5-coder-0.5b"]) == 2


def _tiny_folder(out: Path, qwen_path, name: str) -> Path:
    """A tiny random HF folder of architecture `name` with the real Qwen tokenizer files."""
    import test_models as tm

    from kiln.formats.gguf import read_gguf
    from kiln.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(read_gguf(qwen_path).meta)
    cfg = dict(tm.CONFIGS[name], vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=3)
    hf, _ = tm._hf_model(cfg)
    hf.save_pretrained(out)
    tok.save_folder(out)
    return out


@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_mlx_adapter_in_mlx_lm_gives_kilns_logits(tmp_path, qwen_path, name):
    """mlx-lm (CPU) loads the exported folder over the same base (`mlx_lm.load(..., adapter_path=)`): its
    logits equal kiln's with the PEFT adapter (fp32), including a block the adapter skips."""
    mlx_lm = pytest.importorskip("mlx_lm")
    import mlx.core as mx

    from kiln.finetune.export import to_mlx
    folder = _tiny_folder(tmp_path / "base", qwen_path, name)
    model, _ = kiln.load(folder, device="cpu", dtype=torch.float32)
    targets = ("q_proj", "v_proj", "down_proj")
    L.apply_lora(model, 4, 8.0, 0.0, targets, [0, 2])  # block 1 skipped: mlx-lm adapts the last 3
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in L.lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.2)
    L.save_adapter(model, tmp_path / "peft", L.peft_config(4, 8.0, 0.0, targets, [0, 2], 3))
    out = to_mlx(tmp_path / "peft", folder, tmp_path / "mlx")
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = model(ids)[0]
    mlx_model, _ = mlx_lm.load(str(folder))
    plain = torch.from_numpy(np.array(mlx_model(mx.array(ids.numpy()))[0]))
    mlx_model, _ = mlx_lm.load(str(folder), adapter_path=str(out))
    theirs = torch.from_numpy(np.array(mlx_model(mx.array(ids.numpy()))[0]))
    assert (ours - plain).abs().max() > 0.05  # the adapter changes something
    assert (ours - theirs).abs().max() <= 1e-3


def test_gguf_lora_rows_follow_llamas_permuted_q_and_k():
    """llama.cpp adds B @ A to the weight as its file stores it; for llama's q/k (rows permuted by its
    converter, undone by kiln's reader) the exported B must be permuted the same way."""
    from kiln.formats.gguf import GGUFTensor, _fix_up, permute_rows
    cfg = {"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2}
    for name, rows in (("model.layers.0.self_attn.q_proj.weight", 32), ("model.layers.0.self_attn.k_proj.weight", 16)):
        w_file = torch.randn(rows, 8)  # the weight in the file's row order
        perm = _fix_up(cfg, name, GGUFTensor("t", (rows, 8), 0, None)).row_perm
        w_hf = w_file[perm]  # what kiln's reader gives, the order the adapter was trained in
        b, a = torch.randn(rows, 2), torch.randn(2, 8)
        merged_file = w_file + permute_rows(cfg, name, b) @ a  # what llama.cpp computes
        assert not torch.equal(perm, torch.arange(rows))
        assert torch.allclose(merged_file[perm], w_hf + b @ a, atol=1e-5)
    v = torch.randn(16, 2)
    assert torch.equal(permute_rows(cfg, "model.layers.0.self_attn.v_proj.weight", v), v)
