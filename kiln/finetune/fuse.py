"""`kiln fuse`: a base model with a PEFT LoRA adapter merged in, written as a Hugging Face folder or a GGUF file.

Owns: `fuse(model, adapter, out, scale, dtype)` (W + scale * alpha/r * B @ A on the float32 dequantized base,
then the chosen dtype), `fuse_gguf(model, adapter, out, scale, ftype)` (a GGUF base: the same sums in the
file's row order, every tensor then written as `kiln convert --to gguf --type` writes it) and `main(argv)`.
Not: the adapter format (layers.py), the folder's files (formats/safetensors.write_folder), the quantizers and
file types (kiln/quantize.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from kiln.errors import KilnError


def fuse(model, adapter, out_dir, scale: float = 1.0, dtype=torch.float32, progress: bool = False) -> Path:
    from kiln.formats.safetensors import hf_config, write_folder
    from kiln.finetune.layers import load_adapter, merge
    from kiln.hub import resolve
    from kiln.load import build_model
    from kiln.reader import read_model

    config, weights, tok = read_model(Path(resolve(str(model), progress=progress)))
    m = build_model(config, weights, device="cpu", dtype=torch.float32, progress=progress)
    load_adapter(m, adapter, scale)
    merge(m)
    tied = config.get("tie_word_embeddings") and "lm_head.weight" not in weights
    state = {n: t.detach().to(dtype).contiguous() for n, t in m.state_dict().items()
             if n in weights and not (tied and n == "lm_head.weight")}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_folder(out, state, hf_config(config, dtype), tok)
    return out


def fuse_gguf(model, adapter, out, scale: float = 1.0, ftype: str = "f16", progress: bool = False) -> Path:
    """The GGUF base `model` (name or file) with the adapter merged, re-quantized to `ftype` (quantize.FILE_TYPES)
    at `out`: metadata, tokenizer and chat template carried over from the base."""
    from kiln.finetune.export import gguf_pairs
    from kiln.finetune.layers import read_adapter
    from kiln.hub import resolve
    from kiln.reader import read_weights
    from kiln.quantize import convert_gguf
    path = Path(resolve(str(model), progress=progress))
    if path.is_dir() or path.suffix != ".gguf":
        raise KilnError(f"--to gguf needs a GGUF base; {path} is not one (fuse it into a folder: --to hf)")
    config = read_weights(path)[0]
    cfg, pairs = read_adapter(adapter)
    factor = scale * float(cfg.get("lora_alpha", 8)) / int(cfg.get("r", 8))
    deltas = {g: (b @ a) * factor for g, a, b in gguf_pairs(config, pairs)}  # rows in the file's order
    return convert_gguf(path, out, ftype, progress=progress, deltas=deltas)


def main(argv: list[str]) -> int:
    from kiln.commands import _check_adapter, _Parser
    from kiln.reader import dtype_named
    from kiln.quantize import FILE_TYPES
    p = _Parser(prog="kiln fuse", description="Merge a PEFT LoRA adapter into its base model and write a "
                                              "Hugging Face safetensors folder or (--to gguf) a GGUF file.")
    p.add_argument("--model", default="qwen2.5-coder-0.5b", help="the base: built-in name, GGUF file or HF folder")
    p.add_argument("--adapter", required=True, help="PEFT adapter folder (kiln finetune's --adapter-path)")
    p.add_argument("--adapter-scale", type=float, default=1.0, help="multiplies the adapter (default 1)")
    p.add_argument("-o", "--out", required=True, help="output folder (--to hf) or file (--to gguf)")
    p.add_argument("--to", choices=("hf", "gguf"), default="hf", help="what to write (default hf)")
    p.add_argument("--dtype", default="float32", help="--to hf: float32, bfloat16 or float16 (default float32)")
    p.add_argument("--type", default="f16", choices=list(FILE_TYPES),
                   help="--to gguf (a GGUF base): the file type, as kiln convert --to gguf writes it (default f16)")
    a = p.parse_args(argv)
    _check_adapter(a)
    if a.to == "gguf":
        if Path(a.out).is_dir():
            raise KilnError(f"{a.out} is a folder; --to gguf writes a file")
        print(fuse_gguf(a.model, a.adapter, a.out, a.adapter_scale, a.type, progress=True))
        return 0
    dtype = dtype_named(a.dtype)
    if Path(a.out).exists() and not Path(a.out).is_dir():
        raise KilnError(f"{a.out} is a file; give a folder to write the model into")
    print(fuse(a.model, a.adapter, a.out, a.adapter_scale, dtype, progress=True))
    return 0
