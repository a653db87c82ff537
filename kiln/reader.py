"""A model's files read without building anything: config, lazy weights, tokenizer; the model on meta.

Owns: `read_model` / `read_weights`, `check_model` / `meta_model` (config and weights checked against each
other first: formats/checks.py), `materialize` and `dtype_named`: what the loader (load.py), the planner
(fit.py), conversions and fine-tuning all read with.
Not: building or placing a model (load.py), file formats (formats/), names and downloads (hub.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from kiln.errors import KilnError
from kiln.formats.checks import check_config, check_weights, shapes_of
from kiln.formats.gguf import GGUFTensor, hf_tensors, read_gguf, to_config
from kiln.models import get_model


def read_model(path: Path):
    """(config, weights, tokenizer) of a GGUF file or a Hugging Face folder; weights are read lazily."""
    from kiln.tokenizer import Tokenizer
    if path.is_dir():
        return (*read_weights(path), Tokenizer.from_folder(path))
    from kiln.hub import cache_dir
    g = read_gguf(path)
    config = to_config(g)
    return config, hf_tensors(g, config), Tokenizer.from_gguf(g.meta, cache_dir() / "tokenizers")


def read_weights(path: Path):
    """(config, weights) of a GGUF file or a Hugging Face folder, without building the tokenizer."""
    if path.is_dir():
        from kiln.formats.safetensors import read_folder
        return read_folder(path)
    g = read_gguf(path)
    config = to_config(g)
    return config, hf_tensors(g, config)


def check_model(config: dict, weights: Mapping):
    """(model class, args class, weight shapes) once the config is one its model can be built from."""
    model_cls, args_cls = get_model(config["model_type"])
    shapes = shapes_of(weights)
    check_config(args_cls, config, shapes)
    return model_cls, args_cls, shapes


def meta_model(config: dict, weights: Mapping):
    """(model on the meta device, its args), once config and weights are checked to agree; nothing is read.

    Model files are untrusted: the checks come before the model is built (an absurd size or layer count
    would otherwise allocate or loop) and before any weight is read (a wrong shape fails in milliseconds).
    """
    model_cls, args_cls, shapes = check_model(config, weights)
    args = args_cls.from_dict(config)
    with torch.device("meta"):
        model = model_cls(args)
    check_weights(model, weights, shapes)
    return model, args


def materialize(w, name: str, shape, device, dtype) -> torch.Tensor:
    """A weight (a tensor or a GGUFTensor, dequantized) as a tensor of `shape` (None: any) on `device`; floats in
    `dtype`."""
    t = w.dequantize(torch.float32) if isinstance(w, GGUFTensor) else w
    if shape is not None and tuple(t.shape) != shape:
        raise KilnError(f"tensor {name} has shape {tuple(t.shape)} but the config needs {shape}; "
                        f"config and weights disagree")
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)


def dtype_named(dtype):
    """A torch dtype from a torch dtype, None or a name ("bf16", "float32", ...)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise KilnError(f"dtype {dtype!r} is not supported (use one of {', '.join(table)})")
    return table[dtype]
