"""LoRA / QLoRA fine-tuning: `kiln.finetune(...)` and `kiln finetune`.

Owns: the front door (argument parsing and `finetune`, which loads the base for training and runs the
trainer). Layers and the PEFT format are in layers.py, data in data.py, the loop in trainer.py, merging
into a Hugging Face folder in fuse.py, GGUF-LoRA and mlx-lm adapter export in export.py.
Several adapters over one served model, one per batch row, are in bank.py.
"""

from __future__ import annotations

import torch

from kiln.errors import KilnError
from kiln.finetune.layers import DEFAULT_TARGETS, load_adapter  # noqa: F401
from kiln.finetune.trainer import TrainArgs, load_base, train

__all__ = ["finetune", "TrainArgs", "load_adapter", "main"]


def finetune(model: str, data: str, progress: bool = True, device=None, dtype=None, **kwargs) -> dict:
    """Train a LoRA adapter on `model` (a name, GGUF file or HF folder; quantized GGUF weights stay in their
    blocks: QLoRA) with the data folder `data`; keyword arguments are TrainArgs' fields (iters, batch_size,
    lora_rank, …, adapter_path). `dtype`: what the base computes in (default float32 on CPU, bfloat16 on
    CUDA; the adapters' own weights and optimizer state stay float32). Returns the trainer's result (losses,
    tokens/s, where the adapter is)."""
    unknown = set(kwargs) - set(TrainArgs.__dataclass_fields__)
    if unknown:
        raise KilnError(f"finetune: unknown argument(s) {', '.join(sorted(unknown))}")
    args = TrainArgs(**kwargs)
    args.check()
    device = torch.device(device or "cpu")
    if isinstance(dtype, str):
        if dtype not in ("float32", "bfloat16", "float16"):
            raise KilnError(f"--dtype {dtype}: float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    m, tok = load_base(model, device=device, dtype=dtype, progress=progress)
    return train(m, tok, data, args, progress=progress)


def parser():
    from kiln.commands import _Parser
    d = TrainArgs()
    p = _Parser(prog="kiln finetune", description="Train a LoRA adapter (QLoRA on quantized GGUF weights) on a "
                "folder of train.jsonl / valid.jsonl / test.jsonl; the adapter is saved in PEFT's format.")
    p.add_argument("--model", default="qwen2.5-coder-0.5b", help="built-in name, GGUF file or HF folder")
    p.add_argument("--data", required=True, help="folder with train.jsonl and valid.jsonl (test.jsonl for --test)"
                   "; records {\"messages\": [...]}, {\"prompt\", \"completion\"} or {\"text\"}")
    p.add_argument("--iters", type=int, default=d.iters, help=f"training steps (default {d.iters})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank, help=f"default {d.lora_rank}")
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help=f"default {d.lora_alpha:g}")
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help=f"default {d.lora_dropout:g}")
    p.add_argument("--num-layers", type=int, default=d.num_layers,
                   help="adapt the last N blocks (default -1: all)")
    p.add_argument("--target-modules", nargs="+", default=list(DEFAULT_TARGETS),
                   help=f"linear layers to adapt (default {' '.join(DEFAULT_TARGETS)})")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate,
                   help=f"AdamW's (default {d.learning_rate:g})")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute activations in backward (less memory)")
    p.add_argument("--mask-prompt", action="store_true", help="train on the completion / last assistant turn only")
    p.add_argument("--adapter-path", default=d.adapter_path, help=f"where the adapter goes (default {d.adapter_path})")
    p.add_argument("--resume", action="store_true", help="continue from the adapter (and optimizer) in --adapter-path")
    p.add_argument("--val-batches", type=int, default=d.val_batches,
                   help=f"validation batches per evaluation (-1: all; default {d.val_batches})")
    p.add_argument("--steps-per-eval", type=int, default=d.steps_per_eval, help=f"default {d.steps_per_eval}")
    p.add_argument("--save-every", type=int, default=d.save_every,
                   help=f"checkpoint every N steps (default {d.save_every})")
    p.add_argument("--max-seq-length", type=int, default=d.max_seq_length, help=f"default {d.max_seq_length}")
    p.add_argument("--test", action="store_true", help="report the loss on test.jsonl after training")
    p.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--dtype", default=None, help="what the base computes in: float32, bfloat16 or float16 (default "
                                                 "float32 on CPU, bfloat16 on CUDA; adapters train in float32)")
    return p


def main(argv: list[str]) -> int:
    a = vars(parser().parse_args(argv))
    model, data, device, dtype = a.pop("model"), a.pop("data"), a.pop("device"), a.pop("dtype")
    a["target_modules"] = tuple(a["target_modules"])
    res = finetune(model, data, device=device, dtype=dtype, **a)
    print(f"adapter saved in {res['adapter_path']}")
    return 0
