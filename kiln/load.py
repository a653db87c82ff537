"""The assembly line: sniff format → read → ModelArgs → Model on meta → assign weights → place.

Owns: `load(path_or_name, device, dtype, policy) -> (model, tokenizer)`, `build_model(config, weights, ...)`,
`read_model(path) -> (config, weights, tokenizer)`, `read_weights(path)` (the same without the tokenizer),
`meta_model` (the model on the meta device once config and weights are checked against each other:
formats/checks.py), the choice of default device and
dtype, and the wiring of the layers above the models: compact layers swapped in (quant/linear.swap_linears
on GPUs, quant/cpu.compact_linears on the CPU), projections joined (quant/swap.join_projections), and the
kernel policy handed to the model (its steps' default) and to the swapped layers.
Not: file formats (formats/), names and downloads (hub.py), dequantization (quant/), tokenization.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from kiln.errors import KilnError
from kiln.formats.checks import check_config, check_weights, shapes_of
from kiln.formats.gguf import GGUFTensor, hf_tensors, read_gguf, to_config
from kiln.models import get_model
from kiln.policy import DEFAULT, Policy


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device) -> torch.dtype:
    # On CPU float32 matrix-vector products run twice as fast as bfloat16 (NOTES.md); on GPUs bf16.
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def load(path_or_name: str | os.PathLike, device=None, dtype=None, progress: bool = False,
         quantized: bool | None = None, policy: Policy | None = None, n_gpu_layers=None, places=None,
         ctx_size: int | None = None, verbose: bool = False, shard=None):
    """Load a model and its tokenizer from a GGUF file, a Hugging Face folder, or a known name.

    `quantized` keeps weights compact: on CUDA the GGUF blocks stay packed (QuantLinear, the default
    there); on CPU each quantized tensor stays compact (quant/cpu.py: Q4_K / Q6_K as the file's blocks, Q8_0 /
    Q5_0 as their own int8 codes, Q4_0 / Q4_1 as int4, others as int8 rows, the embedding left in its blocks:
    about a quarter of fp32's memory, faster decode, the file's exact weights where kept as blocks). None (the
    default): so on both, float weights staying float32 on CPU; True on CPU: float weights become int8 rows
    too; False: everything dequantized to `dtype` (exact fp32 on CPU).
    `policy` (kiln/policy.py; default: the environment's KILN_* switches) picks the kernels the model runs.
    `n_gpu_layers` (None / "auto": as many as fit.plan finds room for at `ctx_size`; "all"; an int N): the last
    N blocks and the output head on the GPU, the embedding and the other blocks on the CPU (kiln/split.py);
    `places` (one split.Place per block) gives that map directly. `verbose` prints the plan before loading.
    """
    from kiln.hub import resolve

    path = Path(resolve(str(path_or_name), progress=progress))
    device = torch.device(device or default_device())
    dtype = _dtype(dtype) or default_dtype(device)
    config, weights, tokenizer = read_model(path)
    check_model(config, weights)  # before the placement reads the config: the file is untrusted
    full = config
    if shard is not None:
        if places is not None or n_gpu_layers not in (None, "auto", "all"):
            raise KilnError("tensor parallelism and a CPU+GPU layer split (n_gpu_layers) do not combine yet: "
                            "give one or the other")
        config, weights = shard.split(config, weights)  # every layer on `device`: this rank's share of each
    if places is None and shard is None:
        places = _gpu_places(path, (config, weights), device, n_gpu_layers, quantized, ctx_size, verbose)
    if places is not None:
        from kiln.split import build_split
        model = build_split(config, weights, places, places[-1], policy or DEFAULT, progress)
        model.source = str(path)
        return model, tokenizer
    on_gpu = device.type == "cuda"
    swap = None
    if quantized is not False and not on_gpu:  # None: what the file quantized stays compact, floats stay fp32
        from functools import partial

        from kiln.quant.cpu import compact_linears
        swap = partial(compact_linears, floats=bool(quantized))  # joins its projections itself
    quantized = on_gpu if quantized is None else quantized
    model = build_model(config, weights, device=device, dtype=dtype, progress=progress,
                        quantized=quantized and on_gpu, swap=swap, policy=policy)
    if on_gpu:  # fewer, wider matmuls: a small model's decode step is bound by kernel launches
        from kiln.quant.swap import join_projections
        join_projections(model)
    if shard is not None:
        shard.wrap(model, full)
    model.source = str(path)
    return model, tokenizer


def _gpu_places(path, model, device, n_gpu_layers, quantized, ctx_size, verbose):
    """The per-block placement n_gpu_layers asks for on a CUDA device, or None where the model runs whole
    on `device` (every block fits, or no GPU is involved); `model`: (config, weights), already read."""
    n_layers = int(model[0]["num_hidden_layers"])
    if n_gpu_layers in (None, "auto", "all") and device.type != "cuda":
        return None
    if device.type != "cuda":
        if n_gpu_layers == 0:
            return None
        raise KilnError(f"n_gpu_layers={n_gpu_layers!r} needs a CUDA device, and the model loads on {device}")
    if n_gpu_layers in (None, "auto"):
        from kiln.fit import plan_for
        p = plan_for(path, ctx_size=ctx_size, device=device, model=model)
        if verbose:
            print(p.describe(), flush=True)
        n_gpu_layers = p.n_gpu_layers
    elif n_gpu_layers == "all":
        n_gpu_layers = n_layers
    if not isinstance(n_gpu_layers, int) or isinstance(n_gpu_layers, bool):
        raise KilnError(f"n_gpu_layers must be an int, 'all' or 'auto', got {n_gpu_layers!r}")
    if n_gpu_layers >= n_layers:
        return None
    from kiln.split import layer_places
    return layer_places(n_layers, n_gpu_layers, str(device), cpu_compact=quantized is not False)


def read_model(path: Path):
    """(config, weights, tokenizer) of a GGUF file or a Hugging Face folder; weights are read lazily."""
    from kiln.tokenizer import Tokenizer
    if path.is_dir():
        from kiln.formats.safetensors import read_folder
        config, weights = read_folder(path)
        return config, weights, Tokenizer.from_folder(path)
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


def _dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise KilnError(f"dtype {dtype!r} is not supported (use one of {', '.join(table)})")
    return table[dtype]


def build_model(config: dict, weights: Mapping, device="cpu", dtype=torch.float32, progress: bool = False,
                quantized: bool = False, swap=None, policy: Policy | None = None):
    """A model of `config` with `weights` ({HF name: tensor or GGUFTensor}) assigned on `device`.

    With `quantized`, linear layers whose GGUF weight is quantized become QuantLinear (the blocks stay
    packed on the device); everything else is dequantized to `dtype`. `swap(model, weights, policy) ->
    names`, when given, replaces layers of the meta model first (the CPU compact path) and returns the
    parameter names it took. `policy` (default: policy.DEFAULT) goes to the model and the swapped layers.
    """
    from kiln.quant.swap import weight_of
    policy = policy or DEFAULT
    model, args = meta_model(config, weights)
    model.policy = policy  # the kernels of its steps (a step may name its own)
    taken = set()
    if quantized:
        from kiln.quant.linear import swap_linears
        taken = set(swap_linears(model, weights, device, dtype, policy=policy))
    elif swap is not None:
        taken = set(swap(model, weights, policy=policy))
    wanted = {n: p for n, p in model.named_parameters() if n not in taken}
    state = {}
    for name in _progress(list(wanted), progress, "loading weights"):
        state[name] = _materialize(weight_of(weights, name), name, tuple(wanted[name].shape), device, dtype)
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
