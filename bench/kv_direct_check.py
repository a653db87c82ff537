"""GPU check of decode attention reading a q8_0 / q4_0 KV cache as stored (codes + float16 scales dequantized in
the split kernel's registers) against the bf16 cache it replaces. Three parts, each printing JSON lines (an
error is printed as {"part": ..., "error": ...} and the next part runs):

(a) accuracy: decode_attention over q8_0 / q4_0 K/V against decode_attention_ref over the same codes
    dequantized (float32), head dims 64 / 128, T 1 and 4, bf16 queries; the bf16 cache's own kernel error beside
    it; and with the output rotated back in the kernel (out_rot, a Hadamard matrix);
(b) speed: microseconds per call inside a CUDA graph (triton.testing.do_bench_cudagraph) at 4096 and 16384
    keys, batch 1, one token, for the shapes of bench/attn_sweep.py: the bf16 cache, the q8_0 and q4_0 caches
    read directly (q8_0 also with the output rotation), and the q8_0 cache dequantized whole first (what a step
    did before: the cost it no longer pays);
(c) the whole model: decode tok/s after a 16384-token context (default 16384: --depth) with the default cache
    and with the other types (-ctk/-ctv q8_0/q8_0, q8_0/q4_0, q4_0/q4_0, fp8/fp8), through kiln's Decoder
    (DecoderPool.get, prefill, the CUDA-graph step), and whether the captured step called the decode kernel
    over the keys as stored (the fused path) in every layer.

Usage (GPU machine, repo root): python bench/kv_direct_check.py [model.gguf] [--depth 16384] [--gen 64]
Without a model path part (c) is skipped. About 1-3 minutes on an H100 (most of it the model load and prefill).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import triton.testing

sys.path.insert(0, ".")
from kiln.kv_types import dequantize_q8_0, encode, hadamard, quantize_q8_0  # noqa: E402
from kiln.ops.attention import decode_attention, decode_attention_ref  # noqa: E402

SHAPES = {"qwen3-0.6b": (16, 8, 128), "llama-3.2-1b": (32, 8, 64), "qwen3-8b": (32, 8, 128)}  # (H, K, D)


def _emit(**row):
    print(json.dumps(row), flush=True)


def _caches(kh: int, s: int, d: int, seed: int = 0):
    """bf16 k, v (1, K, S, D) and their q8_0 parts ((codes, scales) each)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    k = torch.randn(1, kh, s, d, device="cuda", generator=g).bfloat16()
    v = torch.randn(1, kh, s, d, device="cuda", generator=g).bfloat16()
    return k, v, quantize_q8_0(k), quantize_q8_0(v)


def accuracy():
    for d in (64, 128):
        for t in (1, 4):
            h, kh, s = 32, 8, 3000
            k, v, (kq, ks), (vq, vs) = _caches(kh, s, d)
            q = torch.randn(2, t, h, d, device="cuda").bfloat16()
            k, v = (x.expand(2, -1, -1, -1).contiguous() for x in (k, v))
            kq, ks, vq, vs = (x.expand(2, -1, -1, -1).contiguous() for x in (kq, ks, vq, vs))
            pos = torch.arange(s - t - 100, s - 100, device="cuda")
            ref = decode_attention_ref(q.float(), dequantize_q8_0(kq, ks, torch.float32),
                                       dequantize_q8_0(vq, vs, torch.float32), pos, d ** -0.5)
            row = {"part": "accuracy", "d": d, "t": t}
            for splits in (1, None):
                out = decode_attention(q, kq, vq, pos, d ** -0.5, k_scale=ks, v_scale=vs, splits=splits)
                row[f"q8_max_err_splits_{splits or 'auto'}"] = (out.float() - ref).abs().max().item()
            dense = decode_attention(q, k, v, pos, d ** -0.5)  # the bf16 kernel against its own reference
            dense_ref = decode_attention_ref(q, k, v, pos, d ** -0.5).float()
            row["bf16_max_err"] = (dense.float() - dense_ref).abs().max().item()
            (k4, k4s), (v4, v4s) = encode("q4_0", k.float()), encode("q4_0", v.float())
            ref4 = decode_attention_ref(q.float(), k4, v4, pos, d ** -0.5, k_scale=k4s, v_scale=v4s)
            out4 = decode_attention(q, k4, v4, pos, d ** -0.5, k_scale=k4s, v_scale=v4s)
            row["q4_max_err"] = (out4.float() - ref4).abs().max().item()
            rot = hadamard(d).cuda()
            out_r = decode_attention(q, kq, vq, pos, d ** -0.5, k_scale=ks, v_scale=vs, out_rot=rot)
            row["q8_rot_max_err"] = (out_r.float() - ref @ rot).abs().max().item()
            row["ok"] = max(val for key, val in row.items() if key.startswith(("q8_", "q4_"))) < 2e-2
            _emit(**row)


def speed():
    for depth in (4096, 16384):
        for name, (h, kh, d) in SHAPES.items():
            k, v, (kq, ks), (vq, vs) = _caches(kh, depth + 256, d)
            q = torch.randn(1, 1, h, d, device="cuda").bfloat16()
            pos = torch.tensor([depth - 1], device="cuda")
            scale = d ** -0.5
            (k4, k4s), (v4, v4s), rot = encode("q4_0", k), encode("q4_0", v), hadamard(d).cuda()
            runs = {"bf16": lambda: decode_attention(q, k, v, pos, scale),
                    "q8_0": lambda: decode_attention(q, kq, vq, pos, scale, k_scale=ks, v_scale=vs),
                    "q8_0_rot": lambda: decode_attention(q, kq, vq, pos, scale, k_scale=ks, v_scale=vs, out_rot=rot),
                    "q4_0": lambda: decode_attention(q, k4, v4, pos, scale, k_scale=k4s, v_scale=v4s),
                    "q8_0_dequant_whole": lambda: decode_attention(q, dequantize_q8_0(kq, ks, q.dtype),
                                                                   dequantize_q8_0(vq, vs, q.dtype), pos, scale)}
            row = {"part": "speed", "shape": name, "depth": depth}
            for key, fn in runs.items():
                fn()
                row[f"{key}_us"] = round(1e3 * triton.testing.do_bench_cudagraph(fn, rep=40), 2)
            row["q8_0_over_bf16"] = round(row["q8_0_us"] / row["bf16_us"], 3)
            bf16_bytes = 2 * kh * depth * d * 2
            row["bf16_gb_s"] = round(bf16_bytes / row["bf16_us"] / 1e3, 1)
            row["q8_0_gb_s"] = round(bf16_bytes * 34 / 64 / row["q8_0_us"] / 1e3, 1)
            _emit(**row)


def whole_model(path: str, depth: int, gen: int):
    from kiln.load import load
    from kiln.models import base
    model, _ = load(path, device="cuda", ctx_size=depth + gen + 64)
    ids = torch.randint(100, min(model.args.vocab_size, 32000), (1, depth), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))
    kernel, scaled = base.decode_attention, []  # which decode kernel calls read the keys as stored (not bf16)
    stored = (torch.int8, torch.uint8, torch.float8_e4m3fn)
    base.decode_attention = lambda *a, **kw: scaled.append(a[1].dtype in stored) or kernel(*a, **kw)
    try:
        for types in ((None, None), ("q8_0", "q8_0"), ("q8_0", "q4_0"), ("q4_0", "q4_0"), ("fp8", "fp8")):
            scaled.clear()
            row = _decode_rate(model, ids, types, gen)
            _emit(part="model", cache=types[0] or "default", depth=depth, **row, kernel_calls=len(scaled),
                  kernel_calls_read_stored=sum(scaled), layers=model.args.num_hidden_layers)
            torch.cuda.empty_cache()
    finally:
        base.decode_attention = kernel


def _decode_rate(model, ids: torch.Tensor, types: tuple, gen: int) -> dict:
    """Prefill `ids` into a fresh Decoder's cache of `types`, then decode `gen` tokens from the captured
    step (the device loop: nothing read back until the end); median tok/s of 3."""
    from kiln.decoder import DecoderPool
    depth = ids.shape[1]
    dec = DecoderPool(model, keep=1).get(depth + gen + 16, *types)
    first = dec.prefill(ids, 0).argmax(-1)

    def decode(n):
        tok = first
        for i in range(n):
            tok = dec.step(tok, depth + i).argmax(-1)
        return tok
    decode(4)  # the step's graph captured
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        decode(gen)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return dict(decode_tok_s=round(gen / statistics.median(times), 2), graph=getattr(dec, "graph", None) is not None,
                first_token=int(first), kv_gib=round(dec.cache.nbytes / 2 ** 30, 3))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?", help="a GGUF file for part (c)")
    p.add_argument("--depth", type=int, default=16384)
    p.add_argument("--gen", type=int, default=64)
    a = p.parse_args()
    parts = [("accuracy", accuracy), ("speed", speed)]
    if a.model:
        parts.append(("model", lambda: whole_model(a.model, a.depth, a.gen)))
    for name, fn in parts:
        try:
            fn()
        except Exception as e:  # report and go on: each part stands alone
            _emit(part=name, error=f"{type(e).__name__}: {str(e)[:300]}")


if __name__ == "__main__":
    main()
