"""The training loop: LoRA / QLoRA with AdamW on the adapters only.

Owns: `load_base` (a model for training: quantized GGUF linears stay in their blocks as DequantLinear, the
rest dequantized; no joined projections), `loss_of` (masked next-token cross-entropy), `evaluate`, `train`
(progress with loss, tokens/s and memory; validation every N steps; checkpoints; Ctrl-C saves and stops;
`resume` continues from the adapter folder) and `TrainArgs` (the CLI's and `kiln.finetune`'s knobs).
Not: the layers (layers.py), reading data (data.py).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from kiln.errors import KilnError
from kiln.finetune import data as D
from kiln.finetune import layers as L


@dataclass
class TrainArgs:
    iters: int = 1000
    batch_size: int = 4
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    num_layers: int = -1
    target_modules: tuple = L.DEFAULT_TARGETS
    learning_rate: float = 1e-4
    grad_checkpoint: bool = False
    mask_prompt: bool = False
    adapter_path: str = "adapters"
    resume: bool = False
    val_batches: int = 25
    steps_per_eval: int = 200
    save_every: int = 100
    test: bool = False
    seed: int = 0
    max_seq_length: int = 2048
    steps_per_report: int = 10
    extra: dict = field(default_factory=dict)

    def check(self):
        for name in ("iters", "batch_size", "lora_rank", "steps_per_eval", "save_every", "max_seq_length"):
            if getattr(self, name) < 1:
                raise KilnError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if not self.learning_rate > 0:
            raise KilnError(f"--learning-rate {self.learning_rate}: must be positive")
        if not 0 <= self.lora_dropout < 1:
            raise KilnError(f"--lora-dropout {self.lora_dropout}: must be in [0, 1)")


def load_base(path_or_name, device="cpu", dtype=torch.float32, progress: bool = False):
    """(model, tokenizer) for training: each quantized GGUF linear a frozen DequantLinear over its blocks."""
    from kiln.hub import resolve
    from kiln.reader import read_model
    path = resolve(str(path_or_name), progress=progress)
    config, weights, tok = read_model(Path(path))
    model = build_base(config, weights, device=device, dtype=dtype, progress=progress)
    model.source = str(path)
    return model, tok


def build_base(config: dict, weights, device="cpu", dtype=torch.float32, progress: bool = False):
    """load.build_model with the QLoRA swap: quantized linears (not the head) stay in their GGUF blocks."""
    from kiln.finetune.layers import DequantLinear
    from kiln.formats.gguf import GGUFTensor
    from kiln.load import build_model
    from kiln.quant.swap import swap_layers

    def linear(name, w, b):
        if not isinstance(w, GGUFTensor) or int(w.qtype) <= 1 or getattr(w, "add", 0) or name == "lm_head":
            return None  # float weights, and the head (frozen, no adapter), load dense
        bias = None if b is None else (b.dequantize() if isinstance(b, GGUFTensor) else b).float()
        return DequantLinear(w.raw_rows(), int(w.qtype), tuple(w.shape), bias)

    def swap(model, weights, policy=None):
        return swap_layers(model, weights, linear=linear)

    return build_model(config, weights, device=device, dtype=dtype, progress=progress, swap=swap)


def loss_of(model, ids, tgt):
    """(sum of token losses, token count) of next-token prediction where tgt != -100."""
    logits = model(ids)[:, :-1]  # (B, T-1, V)
    n = int((tgt != -100).sum())
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100,
                           reduction="sum")
    return loss, n


@torch.no_grad()
def evaluate(model, data, batch_size: int, num_batches: int = -1) -> float:
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i, (ids, tgt) in enumerate(D.batches(data, batch_size, 0, loop=False)):
        if 0 <= num_batches <= i:
            break
        loss, n = loss_of(model, ids.to(_device(model)), tgt.to(_device(model)))
        total, count = total + float(loss), count + n
    model.train(was)
    return total / max(count, 1)


def _device(model):
    return model.lm_head.weight.device if hasattr(model.lm_head, "weight") else torch.device("cpu")


def checkpoint_blocks(model):
    """--grad-checkpoint: each block's activations are recomputed in backward (names stay as they are)."""
    from torch.utils.checkpoint import checkpoint
    for block in model.model.layers:
        block.forward = lambda *a, _f=block.forward: checkpoint(_f, *a, use_reentrant=False)


def _memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux
    except ImportError:
        return float("nan")


def prepare(model, args: TrainArgs) -> dict:
    """Adapters on the model (fresh, or read back from args.adapter_path with --resume); its PEFT config."""
    layers = L.layer_indices(model, args.num_layers)
    L.apply_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, tuple(args.target_modules), layers)
    if args.grad_checkpoint:
        checkpoint_blocks(model)
    cfg = L.peft_config(args.lora_rank, args.lora_alpha, args.lora_dropout, args.target_modules, layers,
                        len(model.model.layers), getattr(model, "source", ""))
    if args.resume:
        _resume(model, args.adapter_path)
    return cfg


def _resume(model, path):
    from safetensors.torch import load_file
    f = Path(path) / "adapter_model.safetensors"
    if not f.is_file():
        raise KilnError(f"--resume: no adapter to resume in {path}")
    state = load_file(str(f))
    mods = L.lora_modules(model)
    for name, m in mods.items():
        for part in ("lora_A", "lora_B"):
            key = f"{L.PREFIX}{name}.{part}.weight"
            if key not in state or state[key].shape != getattr(m, part).weight.shape:
                raise KilnError(f"--resume: {f} does not match these LoRA settings ({key})")
            with torch.no_grad():
                getattr(m, part).weight.copy_(state[key])


def train(model, tok, data_dir, args: TrainArgs, progress: bool = True, log=print) -> dict:
    """Train adapters on `model` in place; returns {"train_loss", "val_loss" (first, last), "test_loss",
    "tokens_per_sec", "iters", "adapter_path"}."""
    from kiln.progress import bar
    args.check()
    torch.manual_seed(args.seed)
    train_set = D.dataset(D.read_split(data_dir, "train"), tok, args.mask_prompt, args.max_seq_length)
    valid_set = D.dataset(D.read_split(data_dir, "valid"), tok, args.mask_prompt, args.max_seq_length)
    test_recs = D.read_split(data_dir, "test", required=args.test)  # checked before any training
    cfg = prepare(model, args)
    params = L.lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=args.learning_rate)
    opt_path = Path(args.adapter_path) / "optimizer.pt"
    if args.resume and opt_path.is_file():
        opt.load_state_dict(torch.load(opt_path, weights_only=True))
    n_train = sum(p.numel() for p in params)
    log(f"trainable parameters: {n_train / 1e6:.3f}M in {len(params) // 2} LoRA layers")
    dev = _device(model)
    result = {"val_loss": [], "train_loss": [], "adapter_path": str(args.adapter_path)}
    result["val_loss"].append((0, evaluate(model, valid_set, args.batch_size, args.val_batches)))
    log(f"iter 0: val loss {result['val_loss'][-1][1]:.3f}")
    save = lambda: _save(model, opt, cfg, args.adapter_path)  # noqa: E731
    it, tokens, t0, window = 0, 0, time.perf_counter(), []
    model.train()
    pb = bar(total=args.iters, desc="finetune", unit="it", enabled=progress)
    try:
        for it, (ids, tgt) in enumerate(D.batches(train_set, args.batch_size, args.seed), 1):
            loss, n = loss_of(model, ids.to(dev), tgt.to(dev))
            opt.zero_grad(set_to_none=True)
            (loss / max(n, 1)).backward()
            opt.step()
            tokens += int(ids.numel())
            window.append(loss.item() / max(n, 1))
            tps = tokens / (time.perf_counter() - t0)
            if hasattr(pb, "set_postfix"):
                pb.set_postfix(loss=f"{window[-1]:.3f}", tok_s=f"{tps:.0f}", mem=f"{_memory_gb():.2f}GB")
            pb.update(1)
            if it % args.steps_per_report == 0 or it == args.iters:
                result["train_loss"].append((it, sum(window) / len(window)))
                log(f"iter {it}: train loss {result['train_loss'][-1][1]:.3f}, {tps:.0f} tok/s, "
                    f"peak mem {_memory_gb():.2f} GB")
                window = []
            if it % args.steps_per_eval == 0 or it == args.iters:
                result["val_loss"].append((it, evaluate(model, valid_set, args.batch_size, args.val_batches)))
                log(f"iter {it}: val loss {result['val_loss'][-1][1]:.3f}")
            if it % args.save_every == 0:
                save()
            if it >= args.iters:
                break
    except KeyboardInterrupt:
        log(f"interrupted at iter {it}: saving the adapter to {args.adapter_path}")
        save()
        pb.close()
        result.update(iters=it, interrupted=True)
        return result
    pb.close()
    save()
    result.update(iters=it, tokens_per_sec=tokens / (time.perf_counter() - t0))
    if args.test:
        test_set = D.dataset(test_recs, tok, args.mask_prompt, args.max_seq_length)
        result["test_loss"] = evaluate(model, test_set, args.batch_size)
        log(f"test loss {result['test_loss']:.3f}, test ppl {math.exp(min(result['test_loss'], 50)):.3f}")
    model.eval()
    return result


def _save(model, opt, cfg, path):
    L.save_adapter(model, path, cfg)
    tmp = Path(path) / "optimizer.pt.tmp"
    torch.save(opt.state_dict(), tmp)
    os.replace(tmp, Path(path) / "optimizer.pt")
