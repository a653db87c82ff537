"""The CPU backend of the ops: kiln's native C kernels (native.py) where they serve, torch's otherwise.

Owns: the rule for when a native kernel serves a tensor (`serves`: one float32 row on the CPU, nothing
to differentiate, the policy's `native` on and the library built), and the CPU entry points the rest of
kiln calls: `rms_norm` (ops.rms_norm's native half), `int8_linear` (the int8-row product of
quant/cpu.Int8Linear: the native GEMV for one row, torch's `_weight_int8pack_mm` with bf16 activations
otherwise), `linear` (a float layer's product, models.base.Linear: `sgemm` for a prompt), `block_linear`
(quant/cpu.BlockLinear's product: native for a few rows, a GEMM over the dequantized weight for a prompt:
bfloat16 through AMX's tiles where `bf16_tiles` says so, else `sgemm` in fp32; `block_rows` the layout it reads,
`legacy_blocks_run` whether the legacy types may take it),
`decode_attention` with `attention_fits` (one token's whole attention — q/k norms, RoPE, the cache write and
softmax attention — in one call: the CPU decode step of models/base.attention),
and `decode_layers` with `layer_plan` (one token through every block of the Llama layout or Gemma 3's in one
call, when all their projections are file blocks or int8 rows: models/base.run_blocks decides).
Not: the kernels (native.c, built and loaded by native.py), the GPU kernels (the other ops files), which
kind of step takes the single-token attention (models/base.attention decides that).

Each entry point's torch twin: ops.rms_norm_ref; int8_weight_ref(q, scale) @ x (Int8Linear.dequantize);
native.gemv_k_ref / gemv_lq_ref; ops.rope_qk_ref, then the
cache write and base.attend; decode_layers: the same step block by block (Policy.native_step off).
tests/test_native.py compares them.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch

from kiln import native
from kiln.policy import DEFAULT, Policy


PACK = 1024  # rows of a group-scaled int8 weight dequantized at a time for a many-row product
TILE_PACK = 2048  # the same through AMX's tiles (bf16): the real 1.5B's 128-token prefill ~15% faster than at 1024
NATIVE_ROWS = native.MAX_ROWS  # up to this many rows of x a group-scaled int8 product stays native: 4864x896 on two
# threads, 16 rows 1.2 ms native vs 5.0 ms dequantized + sgemm (64 rows: 4.2 vs 8.4; the crossover ~128)


def serves(x: torch.Tensor, policy: Policy = DEFAULT) -> bool:
    """Does a native kernel take x? One float32 row (a batch-1 decode step) that `_native` allows."""
    return x.numel() == x.shape[-1] and _native(x, policy)


def _native(x: torch.Tensor, policy: Policy) -> bool:
    """float32 on the CPU, nothing to differentiate, native kernels on in the policy and built here."""
    return (policy.native and x.dtype == torch.float32 and not x.is_cuda and not x.requires_grad
            and native.available())


def rms_norm(x, weight, eps: float, offset: float = 0.0, residual=None):
    """ops.rms_norm_ref's contract for one float32 row that `serves` (float32 weight and residual)."""
    return native.rms_norm(x, weight, eps, offset, residual)


def int8_weight_ref(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The weight (N, K) float32 of int8 rows q (N, K) and their scales: (N,) one per row or (N, K / G) one per
    G weights (Int8Linear.dequantize; native.dequant_i8g computes the second form's same bits)."""
    n, k = q.shape
    if scale.dim() == 1:
        return q.float() * scale.float()[:, None]
    return (q.float().view(n, scale.shape[1], -1) * scale.float()[:, :, None]).view(n, k)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                policy: Policy = DEFAULT) -> torch.Tensor:
    """x (..., K) @ W.T (+ bias) -> (..., N) in x.dtype: W = q (N, K) int8 rows times scale, (N,) bf16 (one per
    row) or (N, K / G) float16 (one per G weights: a GGUF file's own codes), bias (N,) float32. Native GEMVs
    where `_native` allows: per-row scales for one row (x kept in fp32, about twice the speed of torch's
    kernel at batch 1); group scales for up to NATIVE_ROWS rows (a decode step, a batch of them, a draft's
    verify: x rounded to int16 per group, integer products, the weight read once for all
    rows). Anything else runs torch's `_weight_int8pack_mm` (it vectorizes bf16 only), or for group scales a
    matmul over W dequantized PACK rows at a time (a prompt's prefill: `_dequantized_product`, exact in float32 or
    bfloat16 through AMX's tiles; native.c dequantizes where built)."""
    n = q.shape[0]
    grouped = scale.dim() == 2
    if grouped and x.numel() <= NATIVE_ROWS * x.shape[-1] and _native(x, policy):
        return native.gemv_i8g(x, q, scale, bias)
    if not grouped and serves(x, policy):
        return native.gemv_i8(x.reshape(-1), q, scale, bias).view(*x.shape[:-1], n)
    if grouped:  # the weight dequantized by native.c where built (exact either way)
        dequant = native.dequant_i8g if policy.native and native.available() else _ref_rows(int8_weight_ref)
        return _dequantized_product(x, n, lambda a, b, dt: dequant(q[a:b], scale[a:b], dt), bias, policy)
    y = torch._weight_int8pack_mm(x.reshape(-1, q.shape[1]).to(torch.bfloat16), q, scale).to(x.dtype)  # (M, N)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.view(*x.shape[:-1], n)


def _dequantized_product(x: torch.Tensor, n: int, rows, bias: torch.Tensor | None, policy: Policy) -> torch.Tensor:
    """x (..., K) @ W.T (+ bias) -> (..., N) in x's dtype, W (N, K) dequantized PACK (TILE_PACK) rows at a time:
    rows(a, b, dtype) -> W[a:b] in float32 (exact) or bfloat16 (those rounded). float32 x: `sgemm` over the exact
    weight, or where `bf16_tiles` allows, x and W rounded to bfloat16 and multiplied through oneDNN's AMX tiles,
    each output rounded to bfloat16 too (its products summed in float32). Two Xeon cores
    (bench/results/2026-12-08-cpu/): the real Qwen2.5-Coder-0.5B's pp512 2.6x and the 1.5B's 2.8x float32's; top-1
    against llama.cpp's references unchanged, mean KL 0.00115 against 0.00091.
    bfloat16 x (a model loaded in bfloat16) takes the weight dequantized straight to bfloat16."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (M, K)
    y = torch.empty(x2.shape[0], n, dtype=x.dtype)
    tiles = bf16_tiles(x2, policy)
    xm = x2.to(torch.bfloat16) if tiles else x2
    w_dtype = torch.bfloat16 if xm.dtype == torch.bfloat16 else torch.float32  # what the dequantizers write
    pack = TILE_PACK if tiles else PACK
    for a in range(0, n, pack):
        w = rows(a, a + pack, w_dtype).to(xm.dtype)
        y[:, a:a + pack] = _onednn(xm, w) if tiles else sgemm(xm, w)  # (M, pack)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.view(*x.shape[:-1], n)


def bf16_tiles(x: torch.Tensor, policy: Policy = DEFAULT) -> bool:
    """Does a prompt's product x (M, K) @ W.T over a dequantized weight run in bfloat16 through AMX? float32 x of
    more than NATIVE_ROWS rows on the CPU, no gradient asked, where `amx` allows."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and x.shape[0] > NATIVE_ROWS
            and not (torch.is_grad_enabled() and x.requires_grad) and amx(policy))


def amx(policy: Policy = DEFAULT) -> bool:
    """May prompts go through AMX's bf16 tiles? The policy's `amx` on and a CPU that has them (oneDNN's GEMM takes
    them there: ~2 TFLOPS on two Xeon cores against ~0.3 for float32)."""
    return policy.amx and has_amx()


def _ref_rows(ref):
    """A torch dequantizer ref(*args) -> float32 weight as a `rows` source that also gives bfloat16 (rounded)."""
    return lambda *args: ref(*args[:-1]).to(args[-1])


def _onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ w (N, K).T through oneDNN's linear (bfloat16 in and out here)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [None], "")


@functools.cache
def has_amx() -> bool:
    """AMX's bf16 tiles on this CPU (Linux's flags) and oneDNN's bf16 linear in this torch (asked once)."""
    try:
        flags = re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
        if not flags or "amx_bf16" not in flags.group(1).split() or not torch.backends.mkldnn.is_available():
            return False
        one = torch.ones(32, 32, dtype=torch.bfloat16)
        return _onednn(one, one).float().sum().item() == 32 ** 3
    except (OSError, RuntimeError, AttributeError):
        return False


def sgemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ w (N, K).T in float32 through oneDNN's GEMM where torch has it, else torch's matmul (MKL's
    sgemm; and where x needs a gradient: oneDNN's op has none). Same precision (float32 products and sums; the
    order differs), measured on the AMD EPYC of bench/results/2026-12-06-cpu (one thread, 512 x 896 @ 896 x 4864):
    oneDNN 20.0 ms, MKL 44.2 ms: MKL keeps AVX-512 for Intel's CPUs."""
    global _ONEDNN
    if _ONEDNN and x.dtype == w.dtype == torch.float32 and not x.requires_grad:
        try:
            return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [None], "")
        except (AttributeError, RuntimeError):  # a torch built without oneDNN
            _ONEDNN = False
    return x @ w.t()


_ONEDNN = torch.backends.mkldnn.is_available()


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, w, bias) for a float layer (models.base.Linear): a float32 product of many rows on the CPU (a
    prompt: more than NATIVE_ROWS rows, no gradient asked) through `sgemm`, F.linear otherwise (a decode row, the
    GPU, other dtypes, and whatever needs a gradient: of x, or of w in full fine-tuning). The 0.5B in float32, a
    512-token forward on two AMD EPYC cores: 165-188 -> 300-327 tok/s, logits within 7.5e-5."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32
            or x.numel() <= NATIVE_ROWS * w.shape[1]
            or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
        return torch.nn.functional.linear(x, w, bias)
    y = sgemm(x.reshape(-1, w.shape[1]), w)  # (M, N)
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], w.shape[0])


def block_linear(x: torch.Tensor, blocks: torch.Tensor, qtype: int, bias: torch.Tensor | None,
                 policy: Policy = DEFAULT) -> torch.Tensor:
    """x (..., K) @ W.T (+ bias) -> (..., N) in x.dtype, W a tensor's rows in its file's blocks (blocks (N, K / W
    * B) uint8 of a native.BLOCK_WEIGHTS type: Q4_K and Q6_K as the file holds them, Q4_0 ... Q8_0
    regrouped by native.regroup_lq). Up to NATIVE_ROWS rows of x where `_native` allows: native.gemv_block (x
    rounded to 16 bits per block, integer products, each block unpacked once for all rows); otherwise a
    matmul over W dequantized PACK rows at a time (`_dequantized_product`; native.c dequantizes where built)."""
    n, k = blocks.shape[0], native.in_features(blocks, qtype)
    if x.numel() <= NATIVE_ROWS * k and _native(x, policy):
        return native.gemv_block(x, blocks, qtype, bias)
    dequant = native.dequant_block if policy.native and native.available() else _ref_rows(block_weight_ref)
    return _dequantized_product(x, n, lambda a, b, dt: dequant(blocks[a:b], qtype, dt), bias, policy)


def legacy_blocks_run() -> bool:
    """Do the legacy block types run here in their regrouped blocks (native.c built)? Without it quant/cpu.py
    keeps them as int8 codes / torch's int4 (torch has kernels for those; a regrouped block would be dequantized
    whole on every call)."""
    return native.available()


def block_rows(raw: torch.Tensor, qtype: int) -> torch.Tensor:
    """A tensor's rows as the file holds them, raw (N, row_bytes) uint8, -> what block_linear reads: a copy (so
    the file's pages can go) for the K-quants, native.regroup_lq's regrouping for the legacy types."""
    return raw.contiguous().clone() if qtype in native.KQUANT_BYTES else native.regroup_lq(raw, qtype)


def block_weight_ref(blocks: torch.Tensor, qtype: int) -> torch.Tensor:
    """blocks (N, K / W * B) -> (N, K) float32 in torch (the formats' own dequantization; native.dequant_block's
    twin)."""
    from kiln.quant import dequantize
    raw = blocks if qtype in native.KQUANT_BYTES else native.ungroup_lq(blocks, qtype)
    return dequantize(raw.reshape(-1), qtype, (blocks.shape[0], native.in_features(blocks, qtype)))


attention_slots = native.attention_slots  # which cache slots decode_attention writes and reads (also decode_layers')


def attention_fits(q: torch.Tensor, k_cache: torch.Tensor, inv_freq: torch.Tensor, policy: Policy = DEFAULT) -> bool:
    """Does `decode_attention` take one token's q (H, D) against a layer's cache (K, S, D)?"""
    return _native(q, policy) and native.attention_fits(q, k_cache, inv_freq)


def decode_attention(q, k, v, k_cache, v_cache, pos: int, inv_freq, attn_factor: float, q_norm_w, k_norm_w,
                     eps: float, offset: float, scale: float, window: int | None,
                     ring: tuple[int, int] | None = None, store: native.KVStore | None = None) -> torch.Tensor:
    """native.decode_attention: one token where `attention_fits` -> (H * D,); k, v written at `pos` (a ring
    layer's: at slot ring[0], attending to slots 0..ring[1]-1); store: how the caches are stored where not
    float32 (KVCache.native_kv)."""
    return native.decode_attention(q, k, v, k_cache, v_cache, pos, inv_freq, attn_factor, q_norm_w, k_norm_w,
                                   eps, offset, scale, window, ring, store)


stored_fits, head_stride = native.stored_fits, native.head_stride  # the layout decode_layers' `where` rows take


def layer_plan(layers: list[dict | None]) -> native.Stack | None:
    """Blocks for `decode_layers`, one dict per block (models/llama.Block.native_layer, gemma3's): norms
    (the weights before attention and before the MLP, eps, offset), post_norms (Gemma's weights after
    attention and after the MLP, or None), qk_norms ((q weight, k weight, eps, offset) or None), heads (H, K,
    D), scale, window (None: none), rope (the name of its table in a step: "global", "local"), act ("silu",
    "gelu_tanh"), and the projections qkv, o, gate_up, down as lists of parts (native.Stack's (weight, qtype,
    bias, scale, group)) in output order. None where a block offers none (None) or native_step.c does not take
    it: every part in file blocks (native.BLOCK_WEIGHTS) or int8 rows, q/k/v in up to three parts and gate/up
    in up to two, one shape and one set of norm constants for every block, at most two RoPE tables, the head
    dim within native.c's buffers. The plan's `ropes`: the table names in the order the blocks index them;
    `windows`: each block's window."""
    if not layers or any(b is None for b in layers) or not native.available():
        return None
    first = layers[0]
    e = first["norms"][0].numel()
    (h, kv, d), inter = first["heads"], sum(p[0].shape[0] for p in first["gate_up"]) // 2
    constants = lambda b: (b["heads"], b["norms"][2:], b["qk_norms"] and b["qk_norms"][2:],  # noqa: E731
                           b["post_norms"] is None)
    ropes = list(dict.fromkeys(b["rope"] for b in layers))
    if h % kv or d > 1024 or d % 2 or len(ropes) > 2 or any(b["act"] not in native.ACTS for b in layers):
        return None
    for b in layers:
        if constants(b) != constants(first):
            return None
        parts = {"qkv": (b["qkv"], 3, e, (h + 2 * kv) * d), "o": (b["o"], 1, h * d, e),
                 "gate_up": (b["gate_up"], 2, e, 2 * inter), "down": (b["down"], 1, inter, e)}
        if not all(_parts_fit(*p) for p in parts.values()):
            return None
        vectors = ([(w, e) for w in b["norms"][:2] + (b["post_norms"] or ())]
                   + [(w, d) for w in (b["qk_norms"] or ())[:2]])
        if not all(w.dtype == torch.float32 and w.is_contiguous() and w.numel() == n for w, n in vectors):
            return None
    qk = first["qk_norms"]
    stack = native.Stack([{"norm_attn": b["norms"][0], "norm_mlp": b["norms"][1],
                           "post_attn": b["post_norms"] and b["post_norms"][0],
                           "post_mlp": b["post_norms"] and b["post_norms"][1],
                           "q_norm": qk and b["qk_norms"][0], "k_norm": qk and b["qk_norms"][1],
                           "rope": ropes.index(b["rope"]), "act": b["act"], "scale": b["scale"],
                           **{k: b[k] for k in ("qkv", "o", "gate_up", "down")}} for b in layers],
                          (e, h, kv, d, inter), first["norms"][2:], (1e-6, 0.0) if qk is None else qk[2:])
    stack.ropes, stack.windows = ropes, [b["window"] for b in layers]
    return stack


def join_parts(layers) -> list | None:
    """The parts of layers computed one after another into consecutive outputs (each layer's `native_parts`,
    in order), or None where a layer has none (or there are no layers)."""
    found = [getattr(m, "native_parts", lambda: None)() for m in layers]
    return None if not found or any(f is None for f in found) else [part for f in found for part in f]


def block_part(blocks: torch.Tensor, qtype: int, bias: torch.Tensor | None) -> tuple:
    """A `block_linear` weight as one part of a projection in a `layer_plan`."""
    return blocks, qtype, bias, None, 0


def int8_part(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    """An `int8_linear` weight (scale (N,) bf16 per row, or (N, K / G) float16 per group) as one part of a
    projection in a `layer_plan`."""
    if scale.dim() == 1:
        return q, native.I8_ROWS, bias, scale, 0
    return q, native.I8_GROUPS, bias, scale, q.shape[1] // scale.shape[1]


def _parts_fit(parts: list, most: int, k: int, n: int) -> bool:
    """Do a projection's parts (native.Stack's five-tuples) read K inputs and give N outputs together, each in
    file blocks or int8 rows that a native GEMV takes?"""
    return 0 < len(parts) <= most and sum(p[0].shape[0] for p in parts) == n and all(_part_fits(p, k) for p in parts)


def _part_fits(part: tuple, k: int) -> bool:
    w, qtype, bias, scale, group = part
    if not (w.dim() == 2 and w.is_contiguous() and (bias is None or (bias.dtype == torch.float32
                                                                     and bias.numel() == w.shape[0]))):
        return False
    if qtype in native.BLOCK_WEIGHTS:
        return w.dtype == torch.uint8 and native.in_features(w, qtype) == k and scale is None
    if not (w.dtype == torch.int8 and w.shape[1] == k and scale is not None and scale.is_contiguous()):
        return False
    if qtype == native.I8_ROWS:
        return scale.dtype == torch.bfloat16 and scale.shape == w.shape[:1]
    return (qtype == native.I8_GROUPS and group > 0 and k % group == 0 and scale.dtype == torch.float16
            and tuple(scale.shape) == (w.shape[0], k // group))


def decode_layers(stack: native.Stack, x: torch.Tensor, residual: torch.Tensor | None, pos,
                  where: torch.Tensor, ropes: dict):
    """Tokens x (B, 1, E) float32, one a row, through every block of a `layer_plan` in one native call: pos the
    rows' positions (an int for one row), `where` (B, L, 12) or (L, 12) int64 each row's and block's cache
    (native.decode_layers; models/base.py finds it), `ropes` the step's tables (name -> (inv_freq,
    attn_factor)) -> (x, residual) as the block loop returns them, (B, 1, E) each; None where a table does not
    fit the head dim."""
    e, _, _, d, _ = stack.dims
    tables = [ropes[name] for name in stack.ropes]
    if x.shape[-1] != e or x.numel() != e * x.shape[0] or any(2 * inv.numel() > d for inv, _ in tables):
        return None
    out, res = native.decode_layers(stack, x, residual, pos, where, tables)
    return out.view(-1, 1, e), res.view(-1, 1, e)