"""The fit planner: how many blocks go to the GPU, decided before anything is loaded.

Owns: `model_sizes` (each block's, the embedding's and the output head's bytes on the CPU — kiln's compact
CPU layers, or float32 — and on the GPU, from the file's header: no weight is read), `plan` (the most blocks
whose weights, KV cache and compute buffers fit the GPU budget while the rest fits the host's; nothing fits: a
KilnError naming the smallest configuration that would), `plan_for` and `kiln fit`.
Not: building or placing the model (split.py, load.py), the KV cache itself (cache.py).

Byte rules (they mirror what load builds; tests/test_fit.py checks them against a loaded model):
CPU, compact: Q4_0 / Q4_1 / Q4_K linear weights in whole 64-row tiles → int4 (K/2 + K/8 bytes per row),
Q8_0 / Q5_0 / Q6_K → their int8 codes and an f16 scale per 32 / 16 (K + K/16 or K/8), other linear weights →
int8 rows (K + 2), a quantized output head → its int4 screen plus the file's rows
(memory-mapped), a quantized embedding → the file's rows; everything else float32. CPU, float: float32.
GPU: quantized weights keep their GGUF blocks, everything else bfloat16. The KV cache: 2 · kv_heads ·
head_dim · ctx_size elements per block (a sliding-window block: window + 1 positions where that is fewer,
cache.Ring), in `cache_type` on the GPU and float32 on the CPU.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.errors import KilnError

GiB = 1 << 30
KV_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}  # per element
CHUNK = 512  # prompt tokens per forward that the compute buffers are sized for (llama.cpp's ubatch)


@dataclass
class ModelSizes:
    n_layers: int
    layer_cpu: list[int]  # bytes of block i on the CPU
    layer_gpu: list[int]  # bytes of block i on the GPU
    embed_cpu: int
    embed_gpu: int
    head_cpu: int  # final norm + output head
    head_gpu: int
    kv_elems: int  # K and V elements per block per position: 2 * kv_heads * head_dim
    compute_elems: int  # activation elements per prompt token of one forward
    max_ctx: int
    vocab: int = 0  # one row of logits (prefill keeps only the last row's)
    heads: int = 0  # attention scores per token and key on the CPU (SDPA's math path)
    windows: list | None = None  # per block: its sliding window (None: global), kept as a ring of window + 1


def kv_positions(s: ModelSizes, ctx: int) -> list[int]:
    """Cache positions of each block at context ctx (generate's default: sliding-window blocks keep theirs)."""
    from kiln.cache import plan_rings
    rings = plan_rings(s.windows or [None] * s.n_layers, ctx) or [None] * s.n_layers
    return [ctx if r is None else r.slots + 1 for r in rings]


@dataclass
class Plan:
    n_gpu_layers: int
    n_layers: int
    ctx_size: int
    cache_type: str
    gpu_bytes: int  # weights + KV + compute on the GPU
    host_bytes: int
    gpu_kv_bytes: int
    host_kv_bytes: int
    gpu_budget: int
    host_budget: int

    def describe(self) -> str:
        g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
        return (f"fit: {self.n_gpu_layers}/{self.n_layers} layers on the GPU (-ngl {self.n_gpu_layers}), "
                f"ctx {self.ctx_size}, KV {self.cache_type}\n"
                f"  gpu:  {g(self.gpu_bytes)} of {g(self.gpu_budget)} (KV {g(self.gpu_kv_bytes)})\n"
                f"  host: {g(self.host_bytes)} of {g(self.host_budget)} (KV {g(self.host_kv_bytes)})")


def _int4(n: int, k: int) -> int:
    return n * k // 2 + n * k // 8  # packed codes + a bf16 (scale, zero) per 32 weights


def _cpu_linear(w, head: bool, compact: bool, shared: bool) -> int:
    from kiln.quant.cpu import INT4_EXACT, INT8_EXACT, SCREEN_MIN_ROWS, BlockLinear
    from kiln.quant.swap import quantized
    n, k = (int(s) for s in w.shape)
    if not compact:
        return 4 * n * k
    q = int(w.qtype) if quantized(w) else None
    if BlockLinear.takes(q, k) and not getattr(w, "add", 0):
        return _raw(w)  # the file's blocks (BlockLinear)
    if head and q is not None and n >= SCREEN_MIN_ROWS and n % 64 == 0:
        return _int4(n, k) + (0 if shared else _raw(w))
    if q in INT4_EXACT and n % 64 == 0 and not getattr(w, "add", 0):
        return _int4(n, k)
    if q in INT8_EXACT and not getattr(w, "add", 0):
        return n * k + 2 * n * k // INT8_EXACT[q][1]  # the file's int8 codes, an f16 scale per block
    return n * k + 2 * n


def _raw(w) -> int:
    return int(w.data.numel()) if hasattr(w, "data") and hasattr(w, "qtype") else int(w.numel() * 4)


def _gpu(w) -> int:
    from kiln.quant.swap import quantized
    return _raw(w) if quantized(w) else 2 * _numel(w)


def _numel(w) -> int:
    return math.prod(int(s) for s in w.shape)


def model_sizes(path, compact: bool = True, model=None) -> ModelSizes:
    """Byte sizes of a model file's parts from its header (see the module docstring for the rules);
    `model`: its (config, weights) when the caller has read them already."""
    from torch import nn

    from kiln.cache import layer_windows
    from kiln.reader import meta_model, read_weights
    from kiln.quant.swap import quantized, weight_of
    config, weights = read_weights(Path(path)) if model is None else model
    model, args = meta_model(config, weights)
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    n_layers = args.num_hidden_layers
    cpu, gpu = [0] * n_layers, [0] * n_layers
    parts = {"embed": [0, 0], "head": [0, 0]}
    emb = weights["model.embed_tokens.weight"]
    for name, p in model.named_parameters():
        w = weight_of(weights, name)
        if name == "model.embed_tokens.weight":
            c = _raw(w) if compact and quantized(w) else 4 * _numel(w)
            parts["embed"] = [c, _gpu(w)]
            continue
        head = name == "lm_head.weight"
        c = _cpu_linear(w, head, compact, shared=w is emb) if name in linear else 4 * _numel(w)
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m:
            cpu[int(m[1])] += c
            gpu[int(m[1])] += _gpu(w)
        else:  # the final norm and the head
            parts["head"][0] += c
            parts["head"][1] += _gpu(w)
    compute = 3 * args.intermediate_size + 6 * args.hidden_size
    return ModelSizes(n_layers, cpu, gpu, *parts["embed"], *parts["head"],
                      2 * args.num_key_value_heads * args.head_dim, compute, args.max_position_embeddings,
                      args.vocab_size, args.num_attention_heads, layer_windows(model))


def needs(s: ModelSizes, n_gpu: int, ctx: int, cache_type: str = "bf16") -> tuple[int, int, int, int]:
    """(gpu bytes, host bytes, gpu KV bytes, host KV bytes) with the last `n_gpu` blocks on the GPU."""
    n_cpu = s.n_layers - n_gpu
    pos = kv_positions(s, ctx)
    kv_gpu = sum(int(s.kv_elems * n * KV_BYTES[cache_type]) for n in pos[n_cpu:])
    kv_host = sum(s.kv_elems * n * 4 for n in pos[:n_cpu])
    compute = (min(ctx, CHUNK) * s.compute_elems + s.vocab) * 4
    gpu = host = 0
    if n_gpu:
        gpu = sum(s.layer_gpu[n_cpu:]) + s.head_gpu + kv_gpu + compute
        gpu += s.embed_gpu if n_cpu == 0 else 0  # all on the GPU: the embedding too (no split)
    if n_cpu or not n_gpu:
        scores = min(ctx, CHUNK) * ctx * s.heads * 4 if n_cpu else 0
        host = sum(s.layer_cpu[:n_cpu]) + s.embed_cpu + (0 if n_gpu else s.head_cpu) + kv_host + compute + scores
    return gpu, host, kv_gpu, kv_host


def plan(s: ModelSizes, gpu_free: int, host_free: int, ctx_size: int | None = None,
         cache_type: str = "bf16") -> Plan:
    """The most blocks on the GPU whose bytes fit `gpu_free` while the rest fits `host_free`."""
    if cache_type not in KV_BYTES:
        raise KilnError(f"cache type {cache_type!r} is not supported (use one of {', '.join(KV_BYTES)})")
    ctx = int(ctx_size or min(s.max_ctx, 4096))
    if ctx < 1:
        raise KilnError(f"ctx_size must be at least 1, got {ctx}")
    for n in range(s.n_layers, -1, -1):
        gpu, host, kv_g, kv_h = needs(s, n, ctx, cache_type)
        if gpu <= gpu_free and host <= host_free:
            return Plan(n, s.n_layers, ctx, cache_type, gpu, host, kv_g, kv_h, gpu_free, host_free)
    raise KilnError(_nothing_fits(s, gpu_free, host_free, ctx, cache_type))


def _nothing_fits(s: ModelSizes, gpu_free: int, host_free: int, ctx: int, cache_type: str) -> str:
    """The message when no split fits: the smallest context that would, else the memory that would."""
    c = ctx
    while c > 256:
        c //= 2
        if any(g <= gpu_free and h <= host_free for g, h, *_ in (needs(s, n, c, cache_type)
                                                                   for n in range(s.n_layers + 1))):
            return (f"the model does not fit at ctx {ctx} ({gpu_free / GiB:.2f} GiB GPU, {host_free / GiB:.2f} "
                    f"GiB host free); the smallest configuration that fits: --ctx-size {c}")
    short = lambda n: sum(max(0, need - free) for need, free in  # noqa: E731
                          zip(needs(s, n, 256, "q4_0")[:2], (gpu_free, host_free)))
    best = min(range(s.n_layers + 1) if gpu_free else [0], key=short)  # the least memory missing
    gpu, host = needs(s, best, 256, "q4_0")[:2]
    return (f"the model does not fit ({gpu_free / GiB:.2f} GiB GPU, {host_free / GiB:.2f} GiB host free) at any "
            f"context; the smallest configuration (-ngl {best}, --ctx-size 256, --cache-type-k q4_0) needs "
            f"{gpu / GiB:.2f} GiB GPU and {host / GiB:.2f} GiB host")


def free_memory(device=None) -> tuple[int, int]:
    """(free bytes on the CUDA device, 0 without one; available host bytes from /proc/meminfo)."""
    gpu = 0
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        gpu = torch.cuda.mem_get_info(torch.device(device or "cuda"))[0]
    host = 0
    try:
        with open("/proc/meminfo") as f:
            host = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return gpu, host


def plan_for(path, ctx_size=None, device=None, cache_type: str = "bf16", gpu_memory=None,
             host_memory=None, compact: bool = True, model=None) -> Plan:
    """`plan` for the model file at `path` (`model`: its (config, weights), already read) and this machine's
    free memory (or the budgets given)."""
    gpu, host = free_memory(device)
    return plan(model_sizes(path, compact, model), gpu if gpu_memory is None else gpu_memory,
                host if host_memory is None else host_memory, ctx_size, cache_type)


def parse_bytes(text: str) -> int:
    """'3221225472', '3G', '3GiB', '512M' → bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r} (e.g. 3221225472, 3G, 512MiB)")
    return int(float(m[1]) * 1024 ** (("KMGT".index(m[2].upper()) + 1) if m[2] else 0))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="kiln fit", description="Plan where a model's layers go (GPU / CPU) "
                                "without loading it: layers on the GPU, bytes per device, KV cache size.")
    p.add_argument("model", help="built-in name, .gguf path or Hugging Face folder")
    p.add_argument("--ctx-size", type=int, default=None, help="context length (default: min(model's, 4096))")
    p.add_argument("--cache-type-k", default="bf16", choices=list(KV_BYTES), help="KV cache type on the GPU")
    p.add_argument("--gpu-memory", type=parse_bytes, default=None, help="GPU budget (default: free memory)")
    p.add_argument("--host-memory", type=parse_bytes, default=None, help="host budget (default: available)")
    a = p.parse_args(argv)
    from kiln.hub import resolve
    path = resolve(a.model, progress=True)
    print(plan_for(path, a.ctx_size, None, a.cache_type_k, a.gpu_memory, a.host_memory).describe())
    return 0
