"""What a model file's config and weights must satisfy before a model is built from them.

Owns: `check_config` (every declared field has its type, counts positive, floats finite, sizes no larger than the
weights and the layer count theirs, so an absurd value from an untrusted file is a KilnError before any model
is built) and `check_weights` (on the meta model: every parameter has a weight of its shape and a readable
type, before any weight is read). Not: reading files (gguf.py, safetensors.py), assigning weights (load.py).
"""

from __future__ import annotations

import dataclasses
import math
import re

from kiln.errors import KilnError, short
from kiln.formats.gguf import GGUFTensor
from kiln.quant import SUPPORTED, type_name

# Fields that size a tensor: none can exceed the largest dimension of any weight in the file.
_SIZES = ("hidden_size", "intermediate_size", "vocab_size", "head_dim", "num_attention_heads",
          "num_key_value_heads")
# Integer fields that must be at least 1 (the others may be 0).
_POSITIVE = (*_SIZES, "num_hidden_layers", "max_position_embeddings", "sliding_window_pattern")
_INT_MAX = 2**31 - 1
_LAYER = re.compile(r"model\.layers\.(\d{1,9})\.")


def shapes_of(weights) -> dict[str, tuple[int, ...]]:
    """{name: shape} without reading any weight (lazy shards say their shapes; tensors know theirs)."""
    if hasattr(weights, "shapes"):
        return weights.shapes()
    return {name: tuple(w.shape) for name, w in weights.items()}


def check_config(args_cls, config: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise KilnError unless `config` is something `args_cls.from_dict` can safely build a model from."""
    if not isinstance(config, dict):
        raise KilnError(f"the model config is a {type(config).__name__}, not a JSON object")
    for f in dataclasses.fields(args_cls):
        if f.name not in config:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise KilnError(f"the model config lacks {f.name!r}; the file is incomplete or not a "
                                f"{config.get('model_type')} model")
            continue
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))  # maybe postponed
        _check_value(f.name, kind, config[f.name])
    _check_rope(config)
    _check_sizes(config, shapes)


def _check_value(name: str, kind: str, v) -> None:
    optional = kind.endswith("| None")
    kind = kind.removesuffix("| None").strip()
    if v is None and optional:
        return
    ok = {
        "int": lambda: type(v) is int and (1 if name in _POSITIVE else 0) <= v <= _INT_MAX,
        "float": lambda: type(v) in (int, float) and math.isfinite(v),
        "bool": lambda: type(v) is bool or v in (0, 1),
        "str": lambda: isinstance(v, str),
        "dict": lambda: isinstance(v, dict),
        "list": lambda: isinstance(v, list),
    }.get(kind, lambda: True)()
    if ok and name == "partial_rotary_factor":
        ok = 0 < v <= 1
    if not ok:
        text = short(v)
        want = {"int": f"an integer from {1 if name in _POSITIVE else 0} to 2^31 - 1",
                "float": "a finite number"}.get(kind, f"a {kind}")
        raise KilnError(f"the model config's {name} is {text}, not {want}; the file is corrupt")


_ROPE_NEEDS = {"default": (), "linear": ("factor",), "longrope": ("short_factor", "long_factor"),
               "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def _check_rope(config: dict) -> None:
    """rope_scaling carries the numbers its type needs (other types are refused by the model, by name)."""
    s = config.get("rope_scaling")
    if s is None:
        return
    kind = s.get("rope_type", s.get("type", "default"))
    if not isinstance(kind, str) or kind not in _ROPE_NEEDS:
        return
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    part = config.get("partial_rotary_factor", 1.0)
    half = int((part if type(part) in (int, float) and 0 < part <= 1 else 1.0) * head_dim) // 2
    for key in _ROPE_NEEDS[kind]:
        v = s.get(key)
        if key.endswith("_factor") and kind == "longrope":
            ok = isinstance(v, list) and len(v) == half and all(type(x) in (int, float) and x > 0 for x in v)
        else:
            ok = type(v) in (int, float) and math.isfinite(v) and v > 0
        if not ok:
            raise KilnError(f"the model config's rope_scaling ({kind}) has {key} = {short(v)}, not "
                            f"{f'{half} positive numbers' if kind == 'longrope' else 'a positive number'}; "
                            f"the file is corrupt")


def _check_sizes(config: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    if not shapes:
        raise KilnError("the file holds no weights; it is incomplete or not a model")
    biggest = max((d for s in shapes.values() for d in s), default=0)
    for name in _SIZES:
        v = config.get(name)
        if v is not None and v > biggest:
            raise KilnError(f"the model config's {name} is {v}, but no weight has a dimension that large (the "
                            f"largest is {biggest}); config and weights disagree")
    layers = {int(m.group(1)) for n in shapes if (m := _LAYER.match(n))}
    n = config["num_hidden_layers"]
    if len(layers) != n or max(layers, default=-1) != n - 1:  # distinct indices from 0: exactly 0..n-1
        have = f"layers 0..{max(layers)}" if layers and max(layers) == len(layers) - 1 else \
            f"{len(layers)} layers" if layers else "no layers"
        raise KilnError(f"the model config has {n} layers but the weights hold {have}; the file is incomplete "
                        f"or corrupt")


def check_weights(model, weights, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every parameter of the (meta) model has a weight of its shape, every weight a parameter, in a type
    kiln can read (the tied output head may borrow the embedding; GGUF llama 3.1 adds its rope factors)."""
    kind = model.args.model_type if hasattr(model, "args") else type(model).__name__
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    if "lm_head.weight" in params and "lm_head.weight" not in shapes and "model.embed_tokens.weight" in shapes:
        params["model.embed_tokens.weight"] = params.pop("lm_head.weight")  # tied: the embedding is the head
    rotary = getattr(getattr(model, "model", None), "rotary", None)
    if rotary is not None and "model.rope_freqs" in shapes:  # per-frequency divisors
        params["model.rope_freqs"] = tuple(rotary.freq_factors.shape)
    missing = [n for n in params if n not in shapes]
    if missing:
        raise KilnError(f"the weights lack {len(missing)} tensors the {kind} model needs, e.g. "
                        f"{', '.join(map(short, missing[:3]))}; the file may be incomplete or for another architecture")
    unknown = [n for n in shapes if n not in params]
    if unknown:
        raise KilnError(f"the weights hold {len(unknown)} tensors the {kind} model does not have, e.g. "
                        f"{', '.join(map(short, unknown[:3]))}; the file may be for another architecture")
    for name, shape in params.items():
        if tuple(shapes[name]) != shape:
            raise KilnError(f"tensor {short(name)} has shape {tuple(shapes[name])} but the model needs {shape}; "
                            f"config and weights disagree")
    # A safetensors folder's lazy shards hold floats, or blocks of supported types kiln builds itself from an
    # mlx folder (`types_checked`): iterating them would read (and convert) every weight to look at its type.
    for name, w in (() if getattr(weights, "types_checked", False) else weights.items()):
        if isinstance(w, GGUFTensor) and w.qtype not in SUPPORTED:
            raise KilnError(f"tensor {short(name)} is stored as {type_name(w.qtype)}, which kiln cannot read yet "
                            f"(supported: {', '.join(sorted(type_name(t) for t in SUPPORTED))})")
