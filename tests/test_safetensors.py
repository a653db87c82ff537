"""Hugging Face folders: sharded safetensors with an index, half-precision checkpoints, bad folders."""

import json

import pytest
import torch

from kiln.errors import KilnError
from kiln.formats.safetensors import read_folder
from kiln.load import build_model

transformers = pytest.importorskip("transformers")


def _tiny_llama(tmp_path, dtype=torch.float32, shard="40KB"):
    import test_models as tm
    cfg = tm.CONFIGS["llama"]
    hf, _ = tm._hf_model(cfg)
    hf = hf.to(dtype)
    hf.save_pretrained(tmp_path, max_shard_size=shard, safe_serialization=True)
    return hf, cfg


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sharded_folder_loads_and_matches(tmp_path, dtype):
    _, cfg = _tiny_llama(tmp_path, dtype)
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    config, weights = read_folder(tmp_path)
    model = build_model(config, weights, dtype=torch.float32)
    ids = torch.randint(0, cfg["vocab_size"], (1, 10), generator=torch.Generator().manual_seed(0))
    # reference: transformers reading the same folder in fp32 (a fresh model, so its RoPE buffers are
    # fp32 rather than the half-precision copies `hf.to(dtype)` made)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        err = (model(ids) - ref_model(ids).logits).abs().max().item()
    assert err <= 1e-4, err  # the half-precision weights are read exactly, then computed in fp32


def test_missing_shard_and_pickles_are_refused(tmp_path):
    _tiny_llama(tmp_path)
    first = sorted(tmp_path.glob("model-*.safetensors"))[0]
    first.unlink()
    with pytest.raises(KilnError, match="missing weight shards"):
        read_folder(tmp_path)
    pick = tmp_path / "pickled"
    pick.mkdir()
    (pick / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (pick / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(KilnError, match="never reads pickled"):
        read_folder(pick)


def test_folder_without_config(tmp_path):
    with pytest.raises(KilnError, match="no config.json"):
        read_folder(tmp_path)


def test_tied_head_folder_loads_and_matches(tmp_path):
    """A tied model's folder holds no lm_head.weight (transformers does not save it); the head reads the
    embedding through the lazy shard mapping."""
    import test_models as tm
    cfg = tm.CONFIGS["qwen2"]
    hf, _ = tm._hf_model(cfg)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    config, weights = read_folder(tmp_path)
    assert "lm_head.weight" not in weights and config["tie_word_embeddings"]
    model = build_model(config, weights, dtype=torch.float32)
    ids = torch.randint(0, cfg["vocab_size"], (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = (model(ids) - hf(ids).logits).abs().max().item()
    assert err <= 1e-4, err
