"""Check kiln.ops kernels against their torch references at real model shapes on the GPU, and time them.

Run on the GPU machine (not part of the test run):

    python bench/gpu_ops_check.py            # prints a table; writes $OUT/ops_check.json when OUT is set

For each model shape (Qwen3-0.6B, Gemma 3 1B, Llama-3.1-8B) and each op, in bfloat16 at batch 1:
- `max_abs_err` / `ok`: Triton vs the `_ref` twin (inputs identical; tolerance = bf16 rounding, twice
  that for attention, whose probabilities enter P·V in bf16);
- `triton_us` / `ref_us`: triton.testing.do_bench medians (eager launches, L2 flushed between calls);
- `triton_graph_us` / `ref_graph_us`: medians of the same call replayed inside a CUDA graph — the number
  a decode step pays, launch overhead excluded;
decode_attention runs at depths 512 and 4096 of a 4096-slot cache (T = 1, and T = 4), with sliding
windows where the model has them, beside torch's SDPA on the visible slice as a peer, each also with one
split (one launch, no merge: the A/B for the split count, `KILN_ATTN_SPLITS`); "layer" times the
non-matmul ops of one decoder layer as the decode step launches them (norm+residual, RoPE+q/k norm with
the KV write, attention, norm+residual, gated activation) captured together in one graph, with the
default split count and with one split. Float32 runs of RoPE (large positions) and attention
check the tight tolerances on real hardware. Exit code 1 when any check fails.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout

from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

try:
    from kiln import ops  # noqa: E402
except ImportError:  # kiln/__init__ pulls in gguf, absent on the GPU machine; kiln.ops needs none of it
    import types
    sys.modules["kiln"] = types.ModuleType("kiln")
    sys.modules["kiln"].__path__ = [str(ROOT / "kiln")]
    from kiln import ops  # noqa: E402

MODELS = {
    "qwen3-0.6b": dict(e=1024, h=16, k=8, d=128, f=3072, offset=0.0, act="silu", theta=1e6, window=None),
    "gemma3-1b": dict(e=1152, h=4, k=1, d=256, f=6912, offset=1.0, act="gelu", theta=1e4, window=512),
    "llama-3.1-8b": dict(e=4096, h=32, k=8, d=128, f=14336, offset=None, act="silu", theta=5e5, window=None),
}
S_MAX, DEPTHS, DT, DEV = 4096, (512, 4096), torch.bfloat16, "cuda"
RESULTS: list[dict] = []


def rand(*shape, dtype=DT, scale=1.0):
    return (torch.randn(*shape, device=DEV) * scale).to(dtype)


def err(out, ref, tol: float) -> dict:
    out, ref = [o if isinstance(o, tuple) else (o,) for o in (out, ref)]
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(out, ref))
    ok = all(torch.allclose(a.float(), b.float(), rtol=tol, atol=tol) for a, b in zip(out, ref))
    return dict(max_abs_err=diff, ok=bool(ok))


def us(fn, graph: bool) -> float:
    if graph:
        return 1e3 * do_bench_cudagraph(fn, rep=50, return_mode="median")
    return 1e3 * do_bench(fn, warmup=10, rep=50, return_mode="median")


def record(model, op, fast, ref, tol=1.6e-2, **extra):
    row = dict(model=model, op=op, **extra, **err(fast(), ref(), tol))
    row.update(triton_us=us(fast, False), ref_us=us(ref, False),
               triton_graph_us=us(fast, True), ref_graph_us=us(ref, True))
    RESULTS.append(row)
    print(f"{model:13s} {op:34s} err {row['max_abs_err']:9.2e} {'ok ' if row['ok'] else 'BAD'}  "
          f"triton {row['triton_us']:7.1f} µs (graph {row['triton_graph_us']:6.1f})  "
          f"torch {row['ref_us']:7.1f} µs (graph {row['ref_graph_us']:6.1f})"
          + "".join(f"  {k} {v:.1f}" for k, v in extra.items() if isinstance(v, float)), flush=True)
    return row


def inv_freq(d, theta):
    return 1.0 / theta ** (torch.arange(0, d, 2, device=DEV).float() / d)


def check_model(name: str, m: dict):
    e, h, k, d, f = m["e"], m["h"], m["k"], m["d"], m["f"]
    off = m["offset"] or 0.0
    x, r, w = rand(1, 1, e), rand(1, 1, e), rand(e, scale=0.1) + (0 if m["offset"] else 1)
    record(name, "rms_norm", lambda: ops.rms_norm(x, w, 1e-6, off), lambda: ops.rms_norm_ref(x, w, 1e-6, off))
    record(name, "rms_norm+residual", lambda: ops.rms_norm(x, w, 1e-6, off, r),
           lambda: ops.rms_norm_ref(x, w, 1e-6, off, r))

    qkv, pos, inv = rand(1, 1, (h + 2 * k) * d), torch.tensor([S_MAX - 1], device=DEV), inv_freq(d, m["theta"])
    q, kk, v = (qkv[..., : h * d].view(1, 1, h, d), qkv[..., h * d: (h + k) * d].view(1, 1, k, d),
                qkv[..., (h + k) * d:].view(1, 1, k, d))
    norms = {} if m["offset"] is None else dict(q_norm_w=rand(d, scale=0.1) + (0 if off else 1),
                                                 k_norm_w=rand(d, scale=0.1) + (0 if off else 1), norm_offset=off)
    record(name, "rope_qk" + ("+qk_norm" if norms else ""), lambda: ops.rope_qk(q, kk, pos, inv, **norms),
           lambda: ops.rope_qk_ref(q, kk, pos, inv, **norms))

    gu = rand(1, 1, 2 * f, scale=2.0)
    act, act_ref = (ops.silu_mul, ops.silu_mul_ref) if m["act"] == "silu" else (ops.gelu_tanh_mul, ops.gelu_tanh_mul_ref)
    record(name, f"{m['act']}_mul", lambda: act(gu), lambda: act_ref(gu))

    kc, vc = rand(1, k, S_MAX, d), rand(1, k, S_MAX, d)
    ops.write_kv_ref(kc, vc, kk, v, pos)
    kc3, vc3, kc4, vc4 = kc.clone(), vc.clone(), kc.clone(), vc.clone()  # pos is the last slot: [:, :, -1]
    record(name, "rope_qk_write_kv" + ("+qk_norm" if norms else ""),
           lambda: (ops.rope_qk_write_kv(q, kk, v, kc3, vc3, pos, inv, **norms), kc3[:, :, -1], vc3[:, :, -1]),
           lambda: (ops.rope_qk_write_kv_ref(q, kk, v, kc4, vc4, pos, inv, **norms), kc4[:, :, -1], vc4[:, :, -1]))
    check_attention(name, m, kc, vc)
    check_layer(name, m, x, r, w, off, q, kk, v, pos, inv, norms, kc, vc, gu, act)


def check_attention(name, m, kc, vc):
    h, k, d = m["h"], m["k"], m["d"]
    windows = [None] + ([m["window"]] if m["window"] else [])
    for depth in DEPTHS:
        for t in (1, 4):
            for win in windows:
                q = rand(1, t, h, d)
                pos = torch.arange(depth - t, depth, device=DEV)
                ref = lambda: ops.decode_attention_ref(q, kc, vc, pos, d ** -0.5, win)  # noqa: E731
                lo = max(0, depth - (win or depth))
                for splits in (None, 1):  # the default split count (split + merge), and one launch
                    fast = lambda: ops.decode_attention(q, kc, vc, pos, d ** -0.5, win,  # noqa: E731
                                                        splits=splits)
                    op = (f"decode_attention d={depth} T={t}" + (f" win={win}" if win else "")
                          + (" 1 split" if splits else ""))
                    row = record(name, op, fast, ref, tol=3.2e-2, depth=depth, t=t)
                    row["triton_graph_GBps"] = 2 * k * (depth - lo) * d * 2 / (row["triton_graph_us"] * 1e3)
                if t == 1 and win is None:  # peer: torch SDPA on the visible slice (host-side length)
                    ks, vs = kc[:, :, :depth], vc[:, :, :depth]
                    sd = lambda: F.scaled_dot_product_attention(q.transpose(1, 2), ks, vs, scale=d ** -0.5,  # noqa: E731
                                                                enable_gqa=True)
                    row["sdpa_us"], row["sdpa_graph_us"] = us(sd, False), us(sd, True)
                    print(f"{'':13s} {'  torch sdpa (bf16, sliced)':34s} {row['sdpa_us']:7.1f} µs "
                          f"(graph {row['sdpa_graph_us']:6.1f})", flush=True)


def check_layer(name, m, x, r, w, off, q, kk, v, pos, inv, norms, kc, vc, gu, act):
    """The non-matmul half of one decoder layer, as a decode step launches it (6 kernels; 5 with one split)."""
    def layer(splits):
        y, h1 = ops.rms_norm(x, w, 1e-6, off, r)
        qr = ops.rope_qk_write_kv(q, kk, v, kc, vc, pos, inv, **norms)
        a = ops.decode_attention(qr, kc, vc, pos, m["d"] ** -0.5, m["window"], splits=splits)
        y2, _ = ops.rms_norm(x, w, 1e-6, off, h1)
        return a, y2, act(gu)
    for splits, launches in ((None, 6), (1, 5)):
        t = us(lambda: layer(splits), True)
        RESULTS.append(dict(model=name, op=f"layer ({launches} launches) depth {S_MAX}", triton_graph_us=t,
                            ok=True))
        label = "layer non-matmul ops, one graph" + (", 1 split" if splits else "")
        print(f"{name:13s} {label:34s} {t:7.1f} µs per layer at depth {S_MAX}", flush=True)


def check_float32():
    """Tight tolerances on hardware: RoPE at large positions, attention with ieee dots."""
    q, k = rand(1, 2, 16, 128, dtype=torch.float32), rand(1, 2, 8, 128, dtype=torch.float32)
    pos, inv = torch.tensor([30000, 131071], device=DEV), inv_freq(128, 1e6)
    RESULTS.append(dict(model="float32", op="rope_qk large positions",
                        **err(ops.rope_qk(q, k, pos, inv), ops.rope_qk_ref(q, k, pos, inv), 2e-5)))
    qa = rand(1, 4, 16, 128, dtype=torch.float32)
    kc, vc = rand(1, 8, S_MAX, 128, dtype=torch.float32), rand(1, 8, S_MAX, 128, dtype=torch.float32)
    pos = torch.arange(3000, 3004, device=DEV)
    for win in (None, 1000):
        RESULTS.append(dict(model="float32", op=f"decode_attention win={win}",
                            **err(ops.decode_attention(qa, kc, vc, pos, 128 ** -0.5, win),
                                  ops.decode_attention_ref(qa, kc, vc, pos, 128 ** -0.5, win), 1e-5)))
    for row in RESULTS[-3:]:
        print(f"{'float32':13s} {row['op']:34s} err {row['max_abs_err']:9.2e} {'ok' if row['ok'] else 'BAD'}")


def main() -> int:
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    for name, m in MODELS.items():
        check_model(name, m)
    check_float32()
    bad = [f"{r['model']} {r['op']}" for r in RESULTS if not r["ok"]]
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "ops_check.json"
        path.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                        results=RESULTS, failed=bad), indent=1))
        print("wrote", path)
    print("FAILED: " + ", ".join(bad) if bad else "all checks passed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
