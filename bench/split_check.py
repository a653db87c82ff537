"""The CPU + GPU split on a real GPU: an 8B-shape Q4_K_M file under a GPU budget (issue 12's acceptance).

Prints one JSON object: the `kiln fit` plan for the budget (layers on the GPU, predicted GPU bytes), the
split model's logits against the all-GPU model's (mean KL over a prompt, top-1 agreement), the split's
decode tok/s (greedy, through generate's Decoder: its GPU blocks from a CUDA graph, and eagerly; and as
stream_generate reports it), and torch.cuda.max_memory_allocated of the split
load + prefill + decode next to the prediction. With --compare llama.cpp, llama-cpp-python's decode tok/s
with the same number of GPU layers on the same file (n_gpu_layers counts the output layer as llama.cpp does),
in a process of its own, with half and all of the machine's threads (the better one counts).

Usage: python bench/make_gguf.py --model llama-3.1-8b --type Q4_K_M --out /tmp/g
       python bench/split_check.py /tmp/g/llama-3.1-8b-Q4_K_M.gguf --gpu-memory 3G [--compare llama.cpp]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

if "--llama-decode" in sys.argv:  # the llama.cpp side, in a process of its own: nothing imports torch first
    torch = kiln = None
else:
    import torch

    import kiln
    from kiln.cache import KVCache, Step
    from kiln.fit import parse_bytes, plan_for


def input_device(model) -> torch.device:
    """Where the token ids go: a split model's first block's device (the CPU), else the model's."""
    devices = getattr(model, "layer_devices", None)
    return devices[0] if devices else next(model.parameters()).device


def logits_of(model, ids):
    with torch.inference_mode():
        return model(ids.to(input_device(model))).float().cpu()


def decode_tps(model, prompt_ids, n: int, graphs: bool = True, tokens: list | None = None) -> float:
    """Greedy decode tok/s of n steps after the prompt, through the Decoder that generate uses (a split's GPU
    blocks replay a CUDA graph: split.DeviceGraphs; graphs=False runs them eagerly), after two untimed
    steps (the first runs eagerly, the second captures); the tokens go to `tokens` if given."""
    from kiln.decoder import Decoder
    dec = Decoder.for_model(model, len(prompt_ids) + n + 4)
    if not graphs:
        dec.graphs = None
    dev = input_device(model)
    with torch.inference_mode():
        tok = dec.prefill(torch.tensor([prompt_ids], device=dev), 0).argmax(-1)
        pos = len(prompt_ids)
        for i in range(2):
            tok = dec.step(tok, pos + i).argmax(-1)
        pos += 2
        torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(n):
            tok = dec.step(tok, pos + i).argmax(-1)
            if tokens is not None:
                tokens.append(int(tok))
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def graph_vs_eager(model, prompt_ids, feed: list[int]) -> dict:
    """The split's decode logits from its GPU blocks' graph against the same steps run eagerly, both fed the
    same tokens (teacher-forced): mean KL and max |delta logit| over the steps."""
    from kiln.decoder import Decoder
    dev, out = input_device(model), {}
    for graphs in (True, False):
        dec = Decoder.for_model(model, len(prompt_ids) + len(feed) + 1)
        if not graphs:
            dec.graphs = None
        with torch.inference_mode():
            rows = [dec.prefill(torch.tensor([prompt_ids], device=dev), 0).float().cpu()]
            for i, t in enumerate(feed):
                rows.append(dec.step(torch.tensor([t], device=dev), len(prompt_ids) + i).float().cpu())
        out[graphs] = torch.cat(rows)
    p, q = out[False].log_softmax(-1), out[True].log_softmax(-1)
    return {"kl_graph_vs_eager": (p.exp() * (p - q)).sum(-1).mean().item(),
            "max_abs_logit_delta": (out[True] - out[False]).abs().max().item(),
            "top1_graph_vs_eager": (p.argmax(-1) == q.argmax(-1)).float().mean().item()}


def gpu_bytes_by_module(model) -> dict[str, int]:
    """Bytes of the GPU tensors each kind of module holds directly (parameters and buffers), by class name."""
    seen, by = set(), {}
    for m in model.modules():
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            if t is not None and t.is_cuda and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                by[type(m).__name__] = by.get(type(m).__name__, 0) + t.numel() * t.element_size()
    return dict(sorted(by.items(), key=lambda kv: -kv[1]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--llama-decode", type=int, default=None, help=argparse.SUPPRESS)  # n_gpu_layers (subprocess)
    p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--gpu-memory", default="3G")
    p.add_argument("--ctx-size", type=int, default=4096)
    p.add_argument("-n", type=int, default=64, help="decode steps timed")
    p.add_argument("--compare", choices=["llama.cpp"], default=None)
    a = p.parse_args(argv)
    if a.llama_decode is not None:
        print(llama_decode(a.model, a.llama_decode, a.ctx_size, a.n, a.threads))
        return
    plan = plan_for(a.model, ctx_size=a.ctx_size, gpu_memory=parse_bytes(a.gpu_memory))
    out = {"plan": plan.describe(), "n_gpu_layers": plan.n_gpu_layers, "predicted_gpu_bytes": plan.gpu_bytes}
    ids = torch.tensor([list(range(1000, 1256))])  # 256 token ids (random-weight file: any ids do)
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    split, tok = kiln.load(a.model, device="cuda", n_gpu_layers=plan.n_gpu_layers, ctx_size=a.ctx_size)
    out["load_s"] = time.perf_counter() - t
    out["allocated_after_load"] = torch.cuda.memory_allocated()
    out["peak_of_load"] = torch.cuda.max_memory_allocated()
    out["gpu_bytes_by_module"] = gpu_bytes_by_module(split)
    torch.cuda.reset_peak_memory_stats()
    q = logits_of(split, ids)
    out["peak_of_prompt_forward"] = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    graphed, eager = [], []
    out["decode_tps_split"] = decode_tps(split, ids[0].tolist(), a.n, tokens=graphed)
    out["decode_tps_split_eager"] = decode_tps(split, ids[0].tolist(), a.n, graphs=False, tokens=eager)
    out["graph_tokens_equal_eager"] = graphed == eager
    out.update(graph_vs_eager(split, ids[0].tolist(), eager[:32]))
    t = time.perf_counter()
    last = None
    for last in kiln.stream_generate(split, tok, ids[0].tolist(), a.n, ignore_eos=True, logprobs=False):
        pass
    out["stream_generate_tps_split"] = last.generation_tps
    out["stream_generate_s"] = time.perf_counter() - t
    out["peak_of_decode"] = torch.cuda.max_memory_allocated()
    out["max_memory_allocated"] = max(out["peak_of_load"], out["peak_of_prompt_forward"], out["peak_of_decode"])
    out["predicted_over_measured"] = plan.gpu_bytes / out["max_memory_allocated"]
    del split
    torch.cuda.empty_cache()
    full, _ = kiln.load(a.model, device="cuda", n_gpu_layers="all")
    pl, ql = logits_of(full, ids).log_softmax(-1), q.log_softmax(-1)
    out["kl_split_vs_all_gpu"] = (pl.exp() * (pl - ql)).sum(-1).mean().item()
    out["top1_agree"] = (pl.argmax(-1) == ql.argmax(-1)).float().mean().item()
    del full
    torch.cuda.empty_cache()
    try:  # the floor: the all-GPU bf16 model's own distance from the same file run in float32
        full32, _ = kiln.load(a.model, device="cuda", n_gpu_layers="all", dtype=torch.float32)
        fl = logits_of(full32, ids).log_softmax(-1)
        out["kl_all_gpu_bf16_vs_f32"] = (fl.exp() * (fl - pl)).sum(-1).mean().item()
        out["kl_split_vs_all_gpu_f32"] = (fl.exp() * (fl - ql)).sum(-1).mean().item()
        del full32
    except Exception as e:  # noqa: BLE001 (a bench: report and go on)
        out["f32_error"] = repr(e)[:300]
    if a.compare:  # in its own process: llama_cpp must be imported before torch
        out["threads_kiln"] = torch.get_num_threads()
        runs = {}
        for threads in sorted({os.cpu_count() // 2, os.cpu_count()}):
            cmd = [sys.executable, __file__, a.model, "--llama-decode", str(plan.n_gpu_layers + 1),
                   "--ctx-size", str(a.ctx_size), "-n", str(a.n), "--threads", str(threads)]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            runs[threads] = float(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else r.stderr[-300:]
        out["decode_tps_llama_cpp_by_threads"] = runs
        best = max((v for v in runs.values() if isinstance(v, float)), default=None)
        out["decode_tps_llama_cpp"] = best
        out["ratio"] = best and out["decode_tps_split"] / best
    print(json.dumps(out, indent=1))


def llama_decode(path: str, n_gpu_layers: int, ctx_size: int, n: int, threads: int) -> float:
    """llama.cpp's greedy decode tok/s with n_gpu_layers (its count: the output layer is one of them) after
    the same 256-token prompt as main's (the token loop as llama-bench's tg: one token per eval)."""
    from llama_cpp import Llama
    llm = Llama(path, n_gpu_layers=n_gpu_layers, n_ctx=ctx_size, n_threads=threads, n_batch=512,
                flash_attn=True, verbose=False)
    ids = list(range(1000, 1256))
    llm.eval(ids)
    tok = ids[-1]
    t = time.perf_counter()
    for _ in range(n):
        llm.eval([tok])
        tok = int(llm.scores[llm.n_tokens - 1].argmax())
    return n / (time.perf_counter() - t)


if __name__ == "__main__":
    main()
