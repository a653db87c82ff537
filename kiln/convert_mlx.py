"""`kiln convert SRC OUT --to mlx`: a GGUF file or a Hugging Face folder to the folder `mlx_lm.convert -q` writes.

Owns: choosing the layers mlx-lm quantizes (every Linear and Embedding whose input size is a multiple of the
group size: mlx-lm's `quantize_model` rule; norms, biases and other 1-D tensors stay in the model dtype; a tied
output head is not stored), quantizing them with mlx's affine rule (quant/mlx.quantize, byte-identical to
`mx.quantize`), and writing model.safetensors + its index, config.json with `quantization` and
`quantization_config`, and the tokenizer files `--to hf` writes — into a temporary folder renamed into place
at the end, so an interrupted run leaves no half-written model.
Not: the bit layout (quant/mlx.py), reading mlx folders (formats/mlx.py), mlx's mixed-precision recipes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from kiln.errors import KilnError


def to_mlx(src, out_dir, bits: int = 4, group_size: int = 64, dtype=torch.bfloat16,
           progress: bool = False) -> Path:
    """Write the model at `src` (GGUF file or Hugging Face folder) as an mlx-lm quantized folder `out_dir`."""
    from kiln.reader import dtype_named
    from kiln.quant.mlx import check
    check(bits, group_size, "--q-bits/--q-group-size: ")
    dtype = dtype_named(dtype) or torch.bfloat16  # a torch dtype or its name
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KilnError(f"{out} already exists and is not an empty folder; give a new folder to write into")
    if not out.resolve().parent.is_dir():
        raise KilnError(f"the folder of {out} does not exist")
    from kiln.reader import meta_model, read_model
    config, weights, tok = read_model(Path(src))
    model, _ = meta_model(config, weights)  # the checks, and the module types that say what mlx-lm quantizes
    tmp = out.resolve().parent / f".{out.name}.kiln-partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write(tmp, config, weights, tok, _quantizable(model, group_size), bits, group_size, dtype, progress)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _quantizable(model: nn.Module, group_size: int) -> set[str]:
    """Weight names of the layers mlx-lm's quantize_model quantizes: Linear and Embedding (its layers with
    `to_quantized`) whose last dimension is a multiple of the group size."""
    names = set()
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)) and mod.weight.shape[-1] % group_size == 0:
            names.add(f"{name}.weight")
    return names


def _write(tmp: Path, config, weights, tok, quantizable, bits, group_size, dtype, progress):
    from kiln.formats.safetensors import write_folder
    from kiln.reader import materialize
    from kiln.progress import bar
    from kiln.quant.mlx import quantize
    tied = bool(config.get("tie_word_embeddings")) or "lm_head.weight" not in weights
    state = {}
    names = [n for n in weights if not (tied and n == "lm_head.weight")]  # mlx-lm's sanitize drops a tied head
    for name in bar(names, desc=f"quantizing ({bits}-bit, groups of {group_size})", unit="tensor",
                    enabled=progress):
        w = materialize(weights[name], name, None, "cpu", dtype).contiguous()
        if name in quantizable:
            module = name.removesuffix(".weight")
            wq, scales, biases = quantize(w, bits, group_size)  # (R, K*bits/32) u32, (R, K/G) dtype x2
            state.update({f"{module}.weight": wq, f"{module}.scales": scales, f"{module}.biases": biases})
        else:
            state[name] = w
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": {k: "model.safetensors" for k in sorted(state)}}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    write_folder(tmp, state, _config(config, bits, group_size, dtype), tok, fmt="mlx", indent=4)


def _config(config: dict, bits: int, group_size: int, dtype) -> dict:
    from kiln.formats.safetensors import hf_config
    cfg = hf_config(config, dtype)
    q = {"group_size": group_size, "bits": bits, "mode": "affine"}  # mlx-lm's quantize_model writes both
    cfg["quantization"], cfg["quantization_config"] = q, dict(q)
    return dict(sorted(cfg.items()))
