"""Model families, one file per Hugging Face `model_type`, and the aliases between them.

Owns: `get_model(model_type) -> (Model class, ModelArgs class)`, the alias table.
Not: reading files or weights (load.py).
"""

from __future__ import annotations

import importlib

from kiln.errors import KilnError

FAMILIES = ("llama", "qwen2", "qwen3", "gemma3", "phi3")
ALIASES = {"mistral": "llama", "gemma3_text": "gemma3"}


def get_model(model_type: str):
    name = ALIASES.get(model_type, model_type)
    if name not in FAMILIES:
        raise KilnError(f"model type {model_type!r} is not supported (kiln runs: "
                        f"{', '.join(FAMILIES + tuple(ALIASES))})")
    mod = importlib.import_module(f"kiln.models.{name}")
    return mod.Model, mod.ModelArgs
