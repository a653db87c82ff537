"""Does asking the L2 for a layer's keys and values early help decode at depth? (an experiment, not kiln code)

Decode attention at depth is the step's largest read (Llama-3.2-1B at 16384 keys: 33.5 MB a layer, read at ~2.2
TB/s), and the kernels before it in the layer (the input RMSNorm, the q/k/v GEMVs, RoPE: ~8 µs at 1B) leave the
memory mostly idle. A kernel of one warp a program that asks the copy engine to bring the layer's visible keys and
values into the L2 (`cp.async.bulk.prefetch.L2.global`, a hint) at the start of the layer could fill that idle
time, so the attention reads much of its bytes from the L2.

--probe: in a CUDA graph, [flush the L2] [prefetch or not] [torch.cuda._sleep] [read the buffer], timed against
[flush] [sleep] alone: does the prefetch land in the L2, and how fast is the read after it?
--model: tg128 at --depth with the prefetch launched at each block's start (`start`), capped per layer (`cap_mb`:
MB of keys + values), or for the next layer after this one's attention (`early`), each a fresh Decoder, twice.

Usage (GPU): python bench/kv_prefetch_ab.py --probe [--mb 33.5] | --model a.gguf --depth 16384 --variants ...
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

from kiln.ops import pdl
from triton.testing import do_bench_cudagraph

from decode_ab import _timed, device_loop  # bench/ is the script's directory

PIECE = 4096  # bytes one thread asks for


@triton.jit
def _prefetch(ptrs, nbytes):
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [ptrs, nbytes.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _flat_kernel(p, nbytes, PIECE: tl.constexpr):
    off = (tl.program_id(0) * 32 + tl.arange(0, 32)).to(tl.int64) * PIECE
    _prefetch(p + off, tl.minimum(tl.maximum(nbytes - off, 0), PIECE))


@triton.jit
def _kv_kernel(k_ptr, v_ptr, pos_ptr, skh, svh, T, S_MAX, CAP, ROW: tl.constexpr, PIECE: tl.constexpr,
               PDL: tl.constexpr):
    """grid (K, 2, C): kv head, keys or values, 32 pieces of PIECE bytes of its visible rows [0, hi) (at most CAP
    rows), asked for before the wait (the positions were written before the step's first PDL kernel)."""
    pdl.start(PDL)
    kh = tl.program_id(0)
    ts = tl.arange(0, 16)
    hi = tl.minimum(tl.max(tl.load(pos_ptr + ts, mask=ts < T, other=-1), axis=0) + 1, tl.minimum(S_MAX, CAP))
    nbytes = hi.to(tl.int64) * ROW
    off = (tl.program_id(2) * 32 + tl.arange(0, 32)).to(tl.int64) * PIECE
    n = tl.minimum(tl.maximum(nbytes - off, 0), PIECE)
    if tl.program_id(1) == 0:
        _prefetch(k_ptr.to(tl.pointer_type(tl.int8)) + kh * skh * 2 + off, n)
    else:
        _prefetch(v_ptr.to(tl.pointer_type(tl.int8)) + kh * svh * 2 + off, n)
    pdl.wait(PDL)


def prefetch_kv(kc, vc, positions, cap_keys: int, policy):
    """kc, vc (1, K, S, D) 16-bit: ask for each head's keys and values 0..min(max(positions), cap_keys - 1)."""
    _, kh, s, d = kc.shape
    assert kc.element_size() == vc.element_size() == 2 and kc.stride(2) == vc.stride(2) == d
    row = d * kc.element_size()
    chunks = triton.cdiv(min(s, cap_keys) * row, 32 * PIECE)
    _kv_kernel[(kh, 2, chunks)](kc, vc, positions, kc.stride(1), vc.stride(1), positions.numel(), s, cap_keys,
                                ROW=row, PIECE=PIECE, num_warps=1, **pdl.launch_kw(kc, policy))


def probe(mb: float, out: dict):
    n = int(mb * 2**20) // 2
    buf = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    flush = torch.empty(256 * 2**20, device="cuda", dtype=torch.uint8)
    res = torch.empty((), device="cuda", dtype=torch.bfloat16)
    nbytes = buf.numel() * 2

    def timed(pf: bool, sleep: int, read: bool) -> float:
        def step():
            flush.fill_(1)
            if pf:
                _flat_kernel[(triton.cdiv(nbytes, 32 * PIECE),)](buf, nbytes, PIECE=PIECE, num_warps=1)
            if sleep:
                torch.cuda._sleep(sleep)
            if read:
                res.copy_(buf.sum())
        return 1e3 * do_bench_cudagraph(step, rep=100, return_mode="median")

    for sleep in (0, 10000, 20000, 40000):
        base = timed(False, sleep, False)
        plain = timed(False, sleep, True)
        pre = timed(True, sleep, True)
        pre_only = timed(True, sleep, False)
        r = {"sleep_cycles": sleep, "flush_sleep_us": base, "read_us": plain - base, "read_after_prefetch_us": pre - base,
             "prefetch_alone_us": pre_only - base, "mb": mb}
        out.setdefault("probe", []).append(r)
        print(json.dumps(r), flush=True)


def variants_ab(path: str, depth: int, g: int, variants: list, out: dict):
    import kiln
    from kiln.decoder import Decoder
    from kiln.models import llama
    model, _ = kiln.load(path, device="cuda")
    ids = torch.randint(100, 30000, (1, depth), generator=torch.Generator().manual_seed(0)).cuda()
    orig_block, orig_attn = llama.Block.forward, llama.Attention.forward
    setting = {}

    def direct(step, layer):
        return (step.fused and step.cache is not None and step.cache.direct and step.ring(layer) is None
                and step.static_kv(layer)[2] is None)

    def go(step, layer):
        kc, vc, _ = step.static_kv(layer)
        _, kvh, _, d = kc.shape  # cap_mb: MB of keys + values a layer, 16-bit
        cap = int(setting["cap_mb"] * 2**20 / (2 * kvh * d * 2)) if setting.get("cap_mb") else 1 << 30
        prefetch_kv(kc, vc, step.positions, cap, step.policy)

    def block_forward(self, x, residual, step):
        if setting.get("where") == "start" or (setting.get("where") == "early" and self.self_attn.layer == 0):
            if direct(step, self.self_attn.layer):
                go(step, self.self_attn.layer)
        return orig_block(self, x, residual, step)

    def attn_forward(self, x, step, q8=None):
        y = orig_attn(self, x, step, q8)
        nxt = self.layer + 1
        if setting.get("where") == "early" and nxt < n_layers and direct(step, nxt):
            go(step, nxt)
        return y

    n_layers = sum(isinstance(m, llama.Attention) for m in model.modules())
    llama.Block.forward, llama.Attention.forward = block_forward, attn_forward

    for _ in range(2):
        for v in variants:
            setting.clear()
            setting.update(v)
            dec = Decoder.for_model(model, depth + g + 8)
            dec.prefill(ids, 0)
            device_loop(dec, depth, 4)
            tok_s = g / _timed(lambda: device_loop(dec, depth, g))
            key = json.dumps(v, separators=(",", ":"))
            out.setdefault(key, []).append(tok_s)
            print(f"tg{g}_at_{depth}", key, out[key], flush=True)
            dec = None
            torch.cuda.empty_cache()
    llama.Block.forward, llama.Attention.forward = orig_block, orig_attn


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--probe", action="store_true")
    ap.add_argument("--mb", type=float, default=33.5)
    ap.add_argument("--model")
    ap.add_argument("--depth", type=int, default=16384)
    ap.add_argument("-g", type=int, default=128)
    ap.add_argument("--variants", default='[{}, {"where": "start"}, {"where": "start", "cap_mb": 16}, {"where": "early"}]')
    ap.add_argument("--json")
    a = ap.parse_args()
    out = {"device": torch.cuda.get_device_name(), "model": a.model}
    if a.probe:
        probe(a.mb, out)
    if a.model:
        variants_ab(a.model, a.depth, a.g, json.loads(a.variants), out)
    if a.json:
        json.dump(out, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
