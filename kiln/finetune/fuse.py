"""`kiln fuse`: a base model with a PEFT LoRA adapter merged in, written as a Hugging Face folder.

Owns: `fuse(model, adapter, out, scale, dtype)` (W + scale * alpha/r * B @ A on the float32 dequantized base,
then the chosen dtype) and its `main(argv)`.
Not: re-quantizing or GGUF output (not yet written), the adapter format (layers.py), tokenizer files
(convert.py's writer).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import torch

from kiln.errors import KilnError


def fuse(model, adapter, out_dir, scale: float = 1.0, dtype=torch.float32, progress: bool = False) -> Path:
    from safetensors.torch import save_file

    from kiln.convert import _write_tokenizer
    from kiln.finetune.layers import load_adapter, merge
    from kiln.hub import resolve
    from kiln.load import build_model, read_model

    config, weights, tok = read_model(Path(resolve(str(model), progress=progress)))
    m = build_model(config, weights, device="cpu", dtype=torch.float32, progress=progress)
    load_adapter(m, adapter, scale)
    merge(m)
    tied = config.get("tie_word_embeddings") and "lm_head.weight" not in weights
    state = {n: t.detach().to(dtype).contiguous() for n, t in m.state_dict().items()
             if n in weights and not (tied and n == "lm_head.weight")}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = {k: v for k, v in config.items() if v is not None}
    cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    os.chmod(out / "model.safetensors", stat.S_IMODE((out / "config.json").stat().st_mode))
    _write_tokenizer(tok, out)
    return out


def main(argv: list[str]) -> int:
    from kiln.commands import _Parser
    from kiln.load import _dtype
    p = _Parser(prog="kiln fuse", description="Merge a PEFT LoRA adapter into its base model and write a "
                                              "Hugging Face safetensors folder.")
    p.add_argument("--model", default="qwen2.5-coder-0.5b", help="the base: built-in name, GGUF file or HF folder")
    p.add_argument("--adapter", required=True, help="PEFT adapter folder (kiln finetune's --adapter-path)")
    p.add_argument("--adapter-scale", type=float, default=1.0, help="multiplies the adapter (default 1)")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default float32)")
    a = p.parse_args(argv)
    dtype = _dtype(a.dtype)
    if Path(a.out).exists() and not Path(a.out).is_dir():
        raise KilnError(f"{a.out} is a file; give a folder to write the model into")
    if not (Path(a.adapter) / "adapter_config.json").is_file():
        raise KilnError(f"{a.adapter} is not a PEFT adapter folder (no adapter_config.json)")
    print(fuse(a.model, a.adapter, a.out, a.adapter_scale, dtype, progress=True))
    return 0
