"""`kiln export-adapter`: a PEFT LoRA adapter for llama.cpp (a GGUF LoRA, `llama-cli --lora`) or mlx-lm (an
adapter folder, `mlx_lm.generate --adapter-path`).

Owns: `to_gguf(adapter, base, out)` (llama.cpp's adapter file: general.type "adapter", adapter.type "lora",
adapter.lora.alpha, and per adapted weight `<gguf name>.lora_a` (r, in) and `.lora_b` (out, r), B's rows in
the base file's order: llama's q/k permuted as its converter permutes them), `to_mlx(adapter, base, out)`
(mlx-lm's adapters.safetensors with lora_a (in, r), lora_b (r, out) and adapter_config.json whose scale is
PEFT's alpha / r) and `main(argv)`.
Not: reading the PEFT folder (layers.read_adapter), training, merging (fuse.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kiln.errors import KilnError


def _base_config(base) -> dict:
    from kiln.hub import resolve
    from kiln.reader import read_weights
    return read_weights(Path(resolve(str(base), progress=True)))[0]


def gguf_pairs(config: dict, pairs: dict):
    """(GGUF tensor name, A (r, in), B (out, r) with its rows in the file's order — llama's q/k permuted as its
    converter permutes them) for each adapted module of a PEFT adapter over `config`'s architecture."""
    from kiln.formats.gguf import gguf_name, permute_rows
    arch = config["model_type"]
    for name, (a, b) in pairs.items():
        g = gguf_name(arch, name + ".weight")
        if g is None:
            raise KilnError(f"the adapter adapts {name}, which has no GGUF name for architecture {arch!r}")
        yield g, a.float(), permute_rows(config, name + ".weight", b.float())


def to_gguf(adapter, base, out) -> Path:
    """Write the PEFT adapter at `adapter` (trained on `base`: a name, GGUF file or HF folder) as a GGUF LoRA."""
    import gguf

    from kiln.finetune.layers import read_adapter
    from kiln.formats.gguf import write_file
    cfg, pairs = read_adapter(adapter)
    config = _base_config(base)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), config["model_type"])
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(cfg.get("lora_alpha", cfg.get("r", 8))))
    for g, a, b in gguf_pairs(config, pairs):
        w.add_tensor(g + ".lora_a", a.contiguous().numpy())
        w.add_tensor(g + ".lora_b", b.contiguous().numpy())
    write_file(w, tmp, out)
    return out


def to_mlx(adapter, base, out) -> Path:
    """Write the PEFT adapter as an mlx-lm adapter folder (adapters.safetensors, adapter_config.json)."""
    from safetensors.torch import save_file

    from kiln.finetune.layers import read_adapter
    cfg, pairs = read_adapter(adapter)
    config = _base_config(base)
    n_layers = int(config["num_hidden_layers"])
    r, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    layers, keys, state = set(), set(), {}
    for name, (a, b) in pairs.items():
        parts = name.split(".")
        if parts[:2] != ["model", "layers"] or len(parts) < 4 or not parts[2].isdigit():
            raise KilnError(f"the adapter adapts {name}; mlx-lm adapters hold only layers of the blocks")
        layers.add(int(parts[2]))
        keys.add(".".join(parts[3:]))
        state[f"{name}.lora_a"] = a.float().t().contiguous()  # (in, r)
        state[f"{name}.lora_b"] = b.float().t().contiguous()  # (r, out)
    # mlx-lm adapts `keys` in each of the last num_layers blocks; where this adapter has no weights, mlx-lm's
    # own initial lora_b (zeros) stays: no change, as here
    num_layers = n_layers - min(layers)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "adapters.safetensors.tmp"))
    os.replace(out / "adapters.safetensors.tmp", out / "adapters.safetensors")
    mcfg = {"fine_tune_type": "lora", "num_layers": num_layers,
            "lora_parameters": {"rank": r, "scale": alpha / r, "dropout": 0.0, "keys": sorted(keys)}}
    (out / "adapter_config.json").write_text(json.dumps(mcfg, indent=2))
    return out


def main(argv: list[str]) -> int:
    from kiln.commands import _Parser
    p = _Parser(prog="kiln export-adapter", description="Write a PEFT LoRA adapter (kiln finetune's output) for "
                "llama.cpp (a GGUF LoRA for --lora) or mlx-lm (an adapter folder for --adapter-path).")
    p.add_argument("adapter", help="PEFT adapter folder")
    p.add_argument("out", help="output: a .gguf file (--to gguf) or a folder (--to mlx)")
    p.add_argument("--to", choices=["gguf", "mlx"], default="gguf", help="target format (default gguf)")
    p.add_argument("--model", required=True, help="the base the adapter was trained on (name, GGUF or HF folder)")
    a = p.parse_args(argv)
    print((to_gguf if a.to == "gguf" else to_mlx)(a.adapter, a.model, a.out))
    return 0
