"""Several adapters over one GPU load (finetune/bank.py: q/k/v and gate/up joined, GGUF blocks, bf16, the engine's
CUDA graphs): agreement and the cost of serving them.

Usage (GPU machine):  python bench/gpu_bank_check.py /tmp/g/qwen3-0.6b-Q4_K_M.gguf [--streams 16] [--tokens 64]
Prints one JSON object:
- rows: one forward of 3 rows [base, a, b] through the bank against each adapter alone over its own GPU load
  (layers.load_adapter, the batch-1 path) and against the float32 CPU model with the layers apart
  (LoRALinear: the reference): max |Δ logit| and top-1 agreement per row;
- engine: N concurrent greedy streams spread over base, a and b through the engine (graphs on), each against
  kiln.stream_generate over its adapter's own load (the Decoder's graphs): streams with equal tokens, first
  differences (bf16: the two paths' kernels differ, so a near-tie may part them on random weights);
- speed: the engine's steady decode tok/s at N streams (engine_bench.py's protocol), the model without a bank,
  with the bank and every row on the base, and with the rows spread over the adapters.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import kiln  # noqa: E402
from engine_bench import device_name, run_streams, summarize  # noqa: E402
from kiln.bench import prompt_ids  # noqa: E402
from kiln.engine import Engine, EngineRequest  # noqa: E402
from kiln.finetune import layers as L  # noqa: E402
from kiln.finetune.bank import AdapterBank  # noqa: E402
from kiln.sample import SamplingParams  # noqa: E402


def make_adapters(path, root: Path) -> tuple[dict, dict]:
    """Two random adapters (rank 8 on every projection, rank 16 on q/v/down) saved from the float32 CPU model;
    ({name: folder}, {name: CPU logits of the probe ids}) and the base's under 'base'."""
    cpu, _ = kiln.load(path, device="cpu", dtype=torch.float32, quantized=False)
    ids = probe(cpu.args.vocab_size)
    n = len(cpu.model.layers)
    folders, logits = {}, {}
    with torch.no_grad():
        logits["base"] = cpu(ids)[0].float()
    for name, r, targets, seed in (("a", 8, L.DEFAULT_TARGETS, 1), ("b", 16, ("q_proj", "v_proj", "down_proj"), 2)):
        m, _ = kiln.load(path, device="cpu", dtype=torch.float32, quantized=False)
        torch.manual_seed(seed)
        L.apply_lora(m, r, 2.0 * r, 0.0, targets)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for mod in L.lora_modules(m).values():
                mod.lora_B.weight.copy_(torch.randn(mod.lora_B.weight.shape, generator=g) * 0.02)
            logits[name] = m(ids)[0].float()
        folders[name] = L.save_adapter(m, root / name, L.peft_config(r, 2.0 * r, 0.0, targets, range(n), n)).parent
    return folders, logits


def probe(vocab: int) -> torch.Tensor:
    return torch.randint(100, min(vocab, 20000), (1, 48), generator=torch.Generator().manual_seed(0))


def compare(got: torch.Tensor, want: torch.Tensor) -> dict:
    return {"max": float((got - want).abs().max()), "top1": float((got.argmax(-1) == want.argmax(-1)).float().mean())}


def speed(model, streams: int, tokens: int, spread: int) -> dict:
    """Steady decode tok/s of `streams` greedy streams, stream i under adapter i % (spread + 1) (0: base)."""
    e = Engine(model, None, n_slots=streams, ctx_size=256, max_queue=streams)
    e.start()
    try:
        vocab = model.args.vocab_size
        prompts = [prompt_ids(vocab, 64, seed=1000 + i) for i in range(streams)]
        reqs = lambda n: [EngineRequest(p, SamplingParams(), n, ignore_eos=True, adapter=i % (spread + 1))  # noqa: E731
                          for i, p in enumerate(prompts)]
        run_streams(e, reqs(8), 8)  # warm-up: compiles, graphs at this bucket
        return summarize(run_streams(e, reqs(tokens), tokens))
    finally:
        e.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    a = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: a smoke run
    out = {"device": device_name(dev), "model": a.model}
    with tempfile.TemporaryDirectory() as tmp:
        folders, cpu_logits = make_adapters(a.model, Path(tmp))
        tok = kiln.load(a.model, device="cpu")[1]
        ids = probe(tok.vocab_size).to(dev)
        solo = {"base": kiln.load(a.model)[0]}
        for name, folder in folders.items():
            solo[name] = kiln.load(a.model)[0]
            L.load_adapter(solo[name], folder)
        banked = kiln.load(a.model)[0]
        AdapterBank.load(banked, list(folders.items()))
        with torch.no_grad():
            with banked.adapter_bank.select(torch.tensor([0, 1, 2], device=dev), torch.ones(3, device=dev)):
                rows = banked(ids.repeat(3, 1)).float().cpu()
            out["rows"] = {}
            for b, name in enumerate(("base", "a", "b")):
                out["rows"][name] = {"vs_solo_gpu": compare(rows[b], solo[name](ids)[0].float().cpu()),
                                     "vs_cpu_fp32": compare(rows[b], cpu_logits[name])}
        # engine: streams spread over the adapters, each against its adapter's own batch-1 generation
        n_tok, streams = (24, 6) if dev.type == "cuda" else (4, 3)
        prompts = [prompt_ids(tok.vocab_size, 32, seed=50 + i) for i in range(streams)]
        e = Engine(banked, tok, n_slots=streams, ctx_size=128)
        e.start()
        try:
            hs = [e.submit(EngineRequest(q, SamplingParams(), n_tok, ignore_eos=True, adapter=i % 3))
                  for i, q in enumerate(prompts)]
            got = [[o.token for o in h.sync()] for h in hs]
        finally:
            e.stop()
        names = ("base", "a", "b")
        want = [[r.token for r in kiln.stream_generate(solo[names[i % 3]], tok, q, max_tokens=n_tok, ignore_eos=True,
                                                        logprobs=False)] for i, q in enumerate(prompts)]
        out["engine"] = {"streams": streams, "equal": sum(g == w for g, w in zip(got, want)),
                         "first_diff": [next((j for j, (x, y) in enumerate(zip(g, w)) if x != y), None)
                                        for g, w in zip(got, want)]}
        del solo
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        plain = kiln.load(a.model)[0]
        out["speed"] = {"no_bank": speed(plain, a.streams, a.tokens, 0),
                        "bank_all_base": speed(banked, a.streams, a.tokens, 0),
                        "bank_spread": speed(banked, a.streams, a.tokens, 2)}
        out["speed"]["spread_over_no_bank"] = (out["speed"]["bank_spread"]["decode_tok_s"]
                                               / out["speed"]["no_bank"]["decode_tok_s"])
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
