"""Hugging Face / mlx-community folders: config.json plus one or sharded safetensors files.

Owns: reading config.json (multimodal checkpoints give their text_config), finding the shards (through
model.safetensors.index.json when present), and naming tensors by their Hugging Face text-model names.
Not: tokenizer files (tokenizer.py), pickled weights (never read: a pickle can run code).
"""

from __future__ import annotations

import json
from pathlib import Path

from kiln.errors import KilnError

# Multimodal checkpoints (Gemma 3 4B+, …) keep the text model under these prefixes.
_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.")


class _LazyShards(dict):
    """{name: tensor}, each tensor read from its shard on first access (safetensors mmaps the file)."""

    def __init__(self, where: dict[str, tuple[Path, str]]):
        super().__init__({k: None for k in where})
        self._where, self._handles = where, {}

    def __getitem__(self, name):
        from safetensors import safe_open
        path, stored = self._where[name]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path].get_tensor(stored)


def read_folder(path: Path) -> tuple[dict, dict]:
    config = _config(path)
    files = _shards(path)
    where = {}
    for f in files:
        for stored in _names(f):
            name = _text_name(stored)
            if name is not None:
                where[name] = (f, stored)
    return config, _LazyShards(where)


def _config(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise KilnError(f"{path} has no config.json; a Hugging Face model folder needs one")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KilnError(f"{cfg_path} is not valid JSON: {e}") from None
    if "quantization" in cfg or "quantization_config" in cfg:
        q = cfg.get("quantization") or cfg.get("quantization_config")
        raise KilnError(f"{path} holds quantized safetensors ({q}); kiln reads these only as GGUF for now")
    if "text_config" in cfg:  # multimodal wrapper: run the text model
        text = dict(cfg["text_config"])
        text.setdefault("model_type", cfg.get("model_type", "").replace("_vl", ""))
        for k in ("eos_token_id", "bos_token_id", "tie_word_embeddings"):
            if k in cfg:
                text.setdefault(k, cfg[k])
        cfg = text
    if "model_type" not in cfg:
        raise KilnError(f"{cfg_path} has no model_type; kiln cannot tell the architecture")
    return cfg


def _shards(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise KilnError(f"{index} is not a valid safetensors index: {e}") from None
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in path.iterdir())[:8]
        raise KilnError(f"{path} has no .safetensors weights (found {found}); kiln never reads pickled "
                        f".bin/.pt weights, convert them to safetensors first")
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise KilnError(f"{path} is missing weight shards {missing}; the download is incomplete")
    return files


def _names(f: Path) -> list[str]:
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(f), framework="pt") as h:
            return list(h.keys())
    except (SafetensorError, OSError) as e:
        raise KilnError(f"{f} is not a readable safetensors file ({e}); re-download it") from None


def _text_name(stored: str) -> str | None:
    if stored.endswith("rotary_emb.inv_freq"):  # old checkpoints saved this derived buffer
        return None
    if stored.startswith(("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                          "model.multi_modal_projector.")):
        return None
    for p in _TEXT_PREFIXES:
        if stored.startswith(p):
            rest = stored[len(p):]
            return rest if rest.startswith("lm_head.") else "model." + rest
    return stored
