"""QLoRA training speed on the GPU: kiln beside transformers + peft, same model, data, batches and GPU.

kiln: the GGUF's quantized linears stay in their blocks (finetune.layers.DequantLinear: dequantized per layer
on the fly by the Triton kernel, in forward and again in backward), LoRA rank 8 / alpha 16 on every
projection, bf16. transformers + peft: the same GGUF dequantized into a bf16 Hugging Face model (kiln
convert), the same LoRA (peft.LoraConfig) — the dense base QLoRA saves memory against. Both take the batches
kiln's trainer makes from tests/data/finetune (the GGUF's tokenizer, --mask-prompt, seed 0), AdamW lr 1e-4;
tokens/s counts every token of each batch (kiln's trainer's count), after --warmup steps; peak memory is
torch.cuda.max_memory_allocated of each side.

Usage (GPU machine):  python bench/finetune_gpu.py /tmp/g/llama-3.2-1b-Q4_K_M.gguf [--iters 30] [--batch-size 4]
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kiln.finetune import data as D
from kiln.finetune import layers as L
from kiln.finetune.trainer import TrainArgs, load_base, loss_of, prepare

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "finetune"


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else float("nan")


def run(model, step_loss, params, batches, warmup: int, iters: int, device) -> dict:
    opt = torch.optim.AdamW(params, lr=1e-4)
    tokens, t0, losses = 0, None, []
    for i, (ids, tgt) in enumerate(batches):
        if i == warmup:
            _sync()
            t0, tokens = time.perf_counter(), 0
        loss, n = step_loss(ids.to(device), tgt.to(device))
        opt.zero_grad(set_to_none=True)
        (loss / max(n, 1)).backward()
        opt.step()
        tokens += ids.numel()
        losses.append(float(loss) / max(n, 1))
        if i + 1 == warmup + iters:
            break
    _sync()
    return {"tokens_per_s": tokens / (time.perf_counter() - t0), "first_loss": losses[0], "last_loss": losses[-1],
            "peak_gb": _peak_gb()}


def _plain(rec: dict) -> dict:
    """A chat record as prompt / completion text, for a file without a chat template (make_gguf's)."""
    turns = rec["messages"]
    return {"prompt": "\n".join(m["content"] for m in turns[:-1]) + "\n", "completion": turns[-1]["content"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cuda", help="cuda (default); cpu for a smoke run with --dtype float32")
    p.add_argument("--dtype", default="bfloat16")
    a = p.parse_args(argv)
    dev, dtype = torch.device(a.device), getattr(torch, a.dtype)
    reset = torch.cuda.reset_peak_memory_stats if dev.type == "cuda" else (lambda: None)
    out = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "dtype": a.dtype,
           "model": a.model, "batch_size": a.batch_size, "iters": a.iters}
    model, tok = load_base(a.model, device=dev, dtype=dtype)
    recs = [r if "messages" not in r or tok.chat_template else _plain(r) for r in D.read_split(DATA, "train")]
    train = D.dataset(recs, tok, True, 2048)
    batches = lambda: D.batches(train, a.batch_size, 0)  # noqa: E731 (the same sequence for both sides)
    prepare(model, TrainArgs(lora_rank=8, lora_alpha=16.0))
    reset()
    out["kiln"] = run(model, lambda ids, tgt: loss_of(model, ids, tgt), L.lora_parameters(model), batches(),
                      a.warmup, a.iters, dev)
    print(json.dumps(out["kiln"]), flush=True)
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from kiln.convert import main as convert
    with tempfile.TemporaryDirectory() as tmp:
        convert([a.model, f"{tmp}/hf"])
        hf = AutoModelForCausalLM.from_pretrained(f"{tmp}/hf", dtype=dtype).to(dev)
    hf = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(L.DEFAULT_TARGETS)))
    reset()

    def hf_loss(ids, tgt):
        logits = hf(input_ids=ids).logits[:, :-1]
        n = int((tgt != -100).sum())
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100,
                               reduction="sum"), n
    out["peft"] = run(hf, hf_loss, [q for q in hf.parameters() if q.requires_grad], batches(), a.warmup, a.iters,
                      dev)
    print(json.dumps(out["peft"]), flush=True)
    out["kiln_over_peft_tokens_per_s"] = out["kiln"]["tokens_per_s"] / out["peft"]["tokens_per_s"]
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
