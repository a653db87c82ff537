"""The assembly line: read → ModelArgs → Model on meta → swap compact layers → assign weights → place.

Owns: `load`, `build_model` (a model on one device), `build_split` (blocks built and placed per split.Place:
GPU blocks as QuantLinear, CPU blocks compact or float32), the choice of default device and dtype and of the
placement n_gpu_layers asks for (fit.plan_for under "auto"), and the wiring of the layers above the models:
compact layers swapped in (quant/linear.swap_linears on GPUs, quant/cpu.compact_linears on the CPU),
projections joined (quant/swap.join_projections), and the kernel policy handed to the model (its steps'
default) and to the swapped layers.
Not: reading files and checking them against the model (reader.py, formats/), names and downloads (hub.py),
dequantization (quant/), running a split model (split.py), tokenization.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from kiln import startup
from kiln.errors import KilnError
from kiln.policy import DEFAULT, Policy
from kiln.reader import check_model, dtype_named, materialize, meta_model, read_model
from kiln.split import Place, layer_places


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
    startup.settle(device)  # a GPU's context and Triton's key begun while the file is read (kiln/startup.py)
    dtype = dtype_named(dtype) or default_dtype(device)
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
    return layer_places(n_layers, n_gpu_layers, str(device), cpu_compact=quantized is not False)


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
        state[name] = materialize(weight_of(weights, name), name, tuple(wanted[name].shape), device, dtype)
    model.load_state_dict(state, strict=False, assign=True)  # QuantLinear layers hold their own data
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t is not None and t.is_meta]
    if left:
        raise KilnError(f"internal: tensors left unassigned after loading: {left[:3]}")
    if getattr(args, "tie_word_embeddings", False) and "lm_head.weight" not in weights \
            and "lm_head.weight" not in taken:
        model.lm_head.weight = model.model.embed_tokens.weight
    if "model.rope_freqs" in weights:
        model.model.rotary.freq_factors = materialize(weights["model.rope_freqs"], "rope_freqs",
                                                       None, "cpu", torch.float32)
    return model.to(device).eval().requires_grad_(False)


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from kiln.progress import bar  # a tqdm bar on a terminal, plain lines in a log
    return bar(items, desc=desc, unit="tensor", leave=False)


class _Prefixed(Mapping):
    """weights seen from inside one module: m["self_attn.q_proj.weight"] is weights[prefix + that]."""

    def __init__(self, weights: Mapping, prefix: str):
        self.weights, self.prefix = weights, prefix

    def __getitem__(self, k):
        return self.weights[self.prefix + k]

    def __contains__(self, k):
        return self.prefix + k in self.weights

    def __iter__(self):
        n = len(self.prefix)
        return (k[n:] for k in self.weights if k.startswith(self.prefix))

    def __len__(self):
        return sum(1 for _ in self)


def _swap(module: nn.Module, weights: Mapping, place: Place, policy) -> list[str]:
    """Replace module's layers as `place` calls for (names relative to module); the names taken."""
    if not place.compact:
        return []
    if torch.device(place.device).type == "cuda":
        from kiln.quant.linear import swap_linears
        from kiln.quant.swap import join_projections
        taken = swap_linears(module, weights, place.device, place.dtype, policy=policy)
        join_projections(module)
        return taken
    from kiln.quant.cpu import compact_linears
    return compact_linears(module, weights, policy=policy)


def build_split(config: dict, weights: Mapping, places: list[Place], head: Place, policy, progress=False):
    """A model of `config` whose block i is made and placed as places[i]; the final norm and output head as
    `head`, the embedding on the CPU (compact when the first place is). Tensors are read one at a time."""
    from kiln.quant.swap import weight_of
    model, args = meta_model(config, weights)
    if len(places) != args.num_hidden_layers:
        raise KilnError(f"a placement of {len(places)} layers for a model of {args.num_hidden_layers}")
    model.policy = policy
    body = model.model
    taken = set()
    for i, (block, place) in enumerate(zip(body.layers, places)):
        prefix = f"model.layers.{i}."
        taken |= {prefix + n for n in _swap(block, _Prefixed(weights, prefix), place, policy)}
    holder = nn.Module()  # the head alone, so its swap sees the name "lm_head" and joins nothing else
    holder.lm_head = model.lm_head
    head_w = {"lm_head.weight": weight_of(weights, "lm_head.weight")}
    taken |= set(_swap(holder, head_w, head, policy))
    model.lm_head = holder.lm_head
    embed = nn.Module()
    embed.embed_tokens = body.embed_tokens
    emb_place = Place("cpu", places[0].compact if places else head.compact)
    if emb_place.compact:
        from kiln.quant.cpu import compact_linears
        taken |= {"model." + n for n in compact_linears(embed, _Prefixed(weights, "model."), policy=policy)}
    body.embed_tokens = embed.embed_tokens
    where = {f"model.layers.{i}.": p for i, p in enumerate(places)}
    state = {}
    wanted = [(n, p) for n, p in model.named_parameters() if n not in taken]
    for name, p in _progress(wanted, progress, "loading weights"):
        place = _place_of(name, where, head, emb_place)
        state[name] = materialize(weight_of(weights, name), name, tuple(p.shape), place.device, place.dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(args, "tie_word_embeddings", False) and "lm_head.weight" not in weights \
            and "lm_head.weight" not in taken and head.device == "cpu" and not head.compact:
        model.lm_head.weight = body.embed_tokens.weight
    if "model.rope_freqs" in weights:
        body.rotary.freq_factors = materialize(weights["model.rope_freqs"], "rope_freqs", None, "cpu", torch.float32)
    for block, place in zip(body.layers, places):
        block.to(place.device)
        block.place = place
    body.norm.to(head.device)
    model.lm_head.to(head.device)
    model.layer_devices = [torch.device(p.device) for p in places]
    model.places = places
    return model.eval().requires_grad_(False)


def _place_of(name: str, where: dict, head: Place, emb: Place) -> Place:
    if name.startswith("model.layers."):
        prefix = ".".join(name.split(".")[:3]) + "."
        return where[prefix]
    if name.startswith(("lm_head.", "model.norm.")):
        return head
    return emb
