"""The assembly line: sniff format → read → ModelArgs → Model on meta → assign weights → place.

Owns: `load(path_or_name, device, dtype) -> (model, tokenizer)`, `build_model(config, weights, ...)`,
`read_model(path) -> (config, weights, tokenizer)`, `meta_model` (the model on the meta device once
config and weights are checked against each other: formats/checks.py),
the choice of default device and dtype, and the check that every weight the model needs was found.
Not: file formats (formats/), names and downloads (hub.py), dequantization (quant/), tokenization.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from kiln.errors import KilnError
from kiln.formats.checks import check_config, check_weights, shapes_of
from kiln.formats.gguf import GGUFTensor, hf_tensors, read_gguf, to_config
from kiln.models import get_model


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device) -> torch.dtype:
    # On CPU float32 matrix-vector products run twice as fast as bfloat16 (NOTES.md); on GPUs bf16.
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def load(path_or_name: str | os.PathLike, device=None, dtype=None, progress: bool = False,
         quantized: bool | None = None):
    """Load a model and its tokenizer from a GGUF file, a Hugging Face folder, or a known name.

    `quantized` keeps weights compact: on CUDA the GGUF blocks stay packed (QuantLinear, the default
    there); on CPU each tensor is repacked at load into torch's packed CPU matmuls with bf16 activations
    (quant/cpu.py: Q4 types as exact int4, others as int8 rows, a screened output head, the embedding
    left in its blocks; several times faster decode, near-lossless, opt-in). The default on CPU is exact fp32.
    """
    from kiln.hub import resolve

    path = Path(resolve(str(path_or_name), progress=progress))
    device = torch.device(device or default_device())
    dtype = _dtype(dtype) or default_dtype(device)
    config, weights, tokenizer = read_model(path)
    quantized = device.type == "cuda" if quantized is None else quantized
    on_gpu = device.type == "cuda"
    swap = None
    if quantized and not on_gpu:
        from kiln.quant.cpu import compact_linears as swap
    model = build_model(config, weights, device=device, dtype=dtype, progress=progress,
                        quantized=quantized and on_gpu, swap=swap)
    if on_gpu:  # fewer, wider matmuls: a small model's decode step is bound by kernel launches
        from kiln.fuse import fuse_projections
        fuse_projections(model)
    model.source = str(path)
    return model, tokenizer


def read_model(path: Path):
    """(config, weights, tokenizer) of a GGUF file or a Hugging Face folder; weights are read lazily."""
    from kiln.tokenizer import Tokenizer
    if path.is_dir():
        from kiln.formats.safetensors import read_folder
        config, weights = read_folder(path)
        return config, weights, Tokenizer.from_folder(path)
    g = read_gguf(path)
    config = to_config(g)
    return config, hf_tensors(g, config), Tokenizer.from_gguf(g.meta)


def _dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise KilnError(f"dtype {dtype!r} is not supported (use one of {', '.join(table)})")
    return table[dtype]


def build_model(config: dict, weights: Mapping, device="cpu", dtype=torch.float32, progress: bool = False,
                quantized: bool = False, swap=None):
    """A model of `config` with `weights` ({HF name: tensor or GGUFTensor}) assigned on `device`.

    With `quantized`, linear layers whose GGUF weight is quantized become QuantLinear (the blocks stay
    packed on the device); everything else is dequantized to `dtype`. `swap(model, weights) -> names`,
    when given, replaces layers of the meta model first (the CPU compact path) and returns the parameter
    names it took.
    """
    model, args = meta_model(config, weights)
    taken = set()
    if quantized:
        from kiln.quant.linear import swap_linears
        taken = set(swap_linears(model, weights, device, dtype))
    elif swap is not None:
        taken = set(swap(model, weights))
    wanted = {n: p for n, p in model.named_parameters() if n not in taken}
    state = {}
    for name in _progress(list(wanted), progress, "loading weights"):
        src = name if name in weights else "model.embed_tokens.weight"  # tied output
        state[name] = _materialize(weights[src], name, tuple(wanted[name].shape), device, dtype)
    model.load_state_dict(state, strict=False, assign=True)  # QuantLinear layers hold their own data
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t is not None and t.is_meta]
    if left:
        raise KilnError(f"internal: tensors left unassigned after loading: {left[:3]}")
    if getattr(args, "tie_word_embeddings", False) and "lm_head.weight" not in weights \
            and "lm_head.weight" not in taken:
        model.lm_head.weight = model.model.embed_tokens.weight
    if "model.rope_freqs" in weights:
        model.model.rotary.freq_factors = _materialize(weights["model.rope_freqs"], "rope_freqs",
                                                       None, "cpu", torch.float32)
    return model.to(device).eval().requires_grad_(False)


def meta_model(config: dict, weights: Mapping):
    """(model on the meta device, its args), once config and weights are checked to agree; nothing is read.

    Model files are untrusted: the checks come before the model is built (an absurd size or layer count
    would otherwise allocate or loop) and before any weight is read (a wrong shape fails in milliseconds).
    """
    model_cls, args_cls = get_model(config["model_type"])
    shapes = shapes_of(weights)
    check_config(args_cls, config, shapes)
    args = args_cls.from_dict(config)
    with torch.device("meta"):
        model = model_cls(args)
    check_weights(model, weights, shapes)
    return model, args


def _materialize(w, name: str, shape, device, dtype) -> torch.Tensor:
    t = w.dequantize(torch.float32) if isinstance(w, GGUFTensor) else w
    if shape is not None and tuple(t.shape) != shape:
        raise KilnError(f"tensor {name} has shape {tuple(t.shape)} but the config needs {shape}; "
                        f"config and weights disagree")
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from kiln.progress import bar  # a tqdm bar on a terminal, plain lines in a log
    return bar(items, desc=desc, unit="tensor", leave=False)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise KilnError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KilnError(f"{path} is not valid JSON: {e}") from None
