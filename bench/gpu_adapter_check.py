"""A LoRA adapter over a GPU load (q/k/v and gate/up joined, GGUF blocks, bf16, CUDA graphs) against the same
adapter over the float32 CPU model with every layer apart (LoRALinear: the reference path).

Usage (GPU machine):  python bench/gpu_adapter_check.py /tmp/g/qwen3-0.6b-Q4_K_M.gguf
Prints one JSON object: the adapter's own effect on the CPU logits (max |with - without|), the GPU's distance
from the CPU with and without the adapter (max |Δ logit|, top-1 agreement over the prompt's positions), and
whether greedy decoding through the Decoder's CUDA graphs gives the eager forward's tokens, without and with
the adapter (bf16: the two paths' kernels differ, so a near-tie may part them on random weights).
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

import kiln
from kiln.finetune import layers as L


def greedy(model, tok, ids, n: int = 24) -> dict:
    """Greedy tokens through generate (the Decoder's CUDA graphs) against eager full forwards: first difference."""
    graph = [r.token for r in kiln.stream_generate(model, tok, ids[0].tolist(), max_tokens=n, logprobs=False)]
    seq, eager = ids.cuda(), []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(seq)[0, -1].argmax())
            eager.append(t)
            seq = torch.cat([seq, torch.tensor([[t]], device="cuda")], 1)
    return {"equal": graph == eager, "first_diff": next((i for i, (x, y) in enumerate(zip(graph, eager)) if x != y),
                                                        None)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    a = p.parse_args(argv)
    cpu, tok = kiln.load(a.model, device="cpu", dtype=torch.float32, quantized=False)
    ids = torch.randint(100, 1000, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cpu_base = cpu(ids)[0].float()
    torch.manual_seed(0)
    L.apply_lora(cpu, 8, 16.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in L.lora_modules(cpu).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.02)
        cpu_lora = cpu(ids)[0].float()
    out = {"device": torch.cuda.get_device_name(), "adapter_effect_max": float((cpu_lora - cpu_base).abs().max())}
    with tempfile.TemporaryDirectory() as tmp:
        n = len(cpu.model.layers)
        L.save_adapter(cpu, tmp, L.peft_config(8, 16.0, 0.0, L.DEFAULT_TARGETS, list(range(n)), n))
        gpu, _ = kiln.load(a.model)
        with torch.no_grad():
            gpu_base = gpu(ids.cuda())[0].float().cpu()
        out["greedy_base"] = greedy(gpu, tok, ids)
        L.load_adapter(gpu, tmp)
    with torch.no_grad():
        gpu_lora = gpu(ids.cuda())[0].float().cpu()
    for name, got, want in (("base", gpu_base, cpu_base), ("adapter", gpu_lora, cpu_lora)):
        out[f"gpu_vs_cpu_{name}_max"] = float((got - want).abs().max())
        out[f"gpu_vs_cpu_{name}_top1"] = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    out["joined_layers"] = sum(type(m).__name__ == "Joined" for m in gpu.modules())
    out["greedy_adapter"] = greedy(gpu, tok, ids)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
