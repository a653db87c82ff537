"""Llama 2 / 3 / 3.1 / 3.2 (and Mistral, through models.ALIASES): the reference decoder-only block.

Owns: the Llama block layout (pre-norm attention with GQA + SwiGLU MLP, in the residual-stream form),
llama3 RoPE scaling through RoPE, optional q/k/v biases and per-head q/k norms so that qwen2.py and
qwen3.py are just argument defaults on top of this file; a one-token GPU step without q/k norms rotates q and k
and writes the cache in the q/k/v GEMVs themselves where they can (`_rope_projection`), else in `attention`.
Not: caching and the step (cache.py), which kernels run (models/base.py, kiln.ops), quantization and
joined projections (quant/: QuantLinear replaces nn.Linear, and `qkv` / `gate_up` join at load).

Shape alphabet: B batch, T new tokens, S keys, E hidden, H query heads, K kv heads, D head dim, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kiln.models.base import (BaseArgs, CausalLM, Linear, RMSNorm, RoPE, Step, attention, embedding, gated,
                              int8_buffer, logit_rows, native_projections, prepare, project, run_blocks)
from kiln.ops import decode_attention, silu_mul
from kiln.ops.attention import launch_for
from kiln.ops.rope import RopeOut


@dataclass
class ModelArgs(BaseArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    use_sliding_window: bool = True

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if not self.use_sliding_window:
            self.sliding_window = None


def _rope_projection(attn: nn.Module, x: torch.Tensor, step: Step, q8) -> torch.Tensor | None:
    """q (B, T, H, D) rotated, with k and v already written into the layer's cache, from the q/k/v GEMVs'
    own epilogue (`attn.qkv.rope_forward` with an ops.rope.RopeOut: no rope kernel between them and the
    attention) — where the fused step's RoPE would run in a kernel of its own: one token of one row over the
    layer's direct cache, no ring, no q/k norms, every dim rotated, a head dim whose split kernel does not rotate
    (attention.launch_for(d).rope), x already quantized for int8 GEMVs (`q8`); policy.gemv_rope
    (KILN_GEMV_ROPE=0: off). None elsewhere, nothing computed (then `attention` rotates). Llama-3.2-1B on the
    H100: tg128 +2.8% at depth 0, +1.5% at 16384 (bench/results/2026-12-07-h100-c/)."""
    b, t, _ = x.shape
    qkv, layer, d = getattr(attn, "qkv", None), attn.layer, attn.d
    if (qkv is None or q8 is None or b * t != 1 or not step.fused or not step.policy.gemv_rope
            or getattr(attn, "qk_norm", True) or step.ring(layer) is not None or not step.cache.direct
            or launch_for(d).rope or not hasattr(qkv, "rope_forward")):
        return None
    r = step.rope["global"]
    kc, vc, rows = step.static_kv(layer)
    if (rows is not None or kc.shape[0] != 1 or kc.dtype != x.dtype or vc.dtype != x.dtype
            or 2 * r.inv_freq.shape[0] != d or r.rot_dim != d or kc.stride() != vc.stride()):
        return None
    q = qkv.rope_forward(x, q8, RopeOut(r.pos, r.inv_freq, r.attn_factor, kc, vc, attn.h * d))
    return None if q is None else q.view(b, t, attn.h, d)


def _rotated_attention(q: torch.Tensor, step: Step, layer: int, scale: float, window: int | None = None,
                       q8=None) -> torch.Tensor:
    """`attention` for a q that `_rope_projection` rotated (its k and v already in the cache): split-KV decode
    attention over the layer's cache → (B, T, H*D)."""
    kc, vc, _ = step.static_kv(layer)
    out = decode_attention(q, kc, vc, step.rope["global"].pos, scale, window, policy=step.policy, q8=q8)
    return out.reshape(q.shape[0], q.shape[1], -1)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.h, self.kv, self.d = layer, a.num_attention_heads, a.num_key_value_heads, a.head_dim
        self.q_proj = Linear(a.hidden_size, self.h * self.d, bias=a.attention_bias)
        self.k_proj = Linear(a.hidden_size, self.kv * self.d, bias=a.attention_bias)
        self.v_proj = Linear(a.hidden_size, self.kv * self.d, bias=a.attention_bias)
        self.o_proj = Linear(self.h * self.d, a.hidden_size, bias=False)
        if a.qk_norm:
            self.q_norm = RMSNorm(self.d, a.rms_norm_eps)
            self.k_norm = RMSNorm(self.d, a.rms_norm_eps)
        self.qk_norm, self.window = a.qk_norm, a.sliding_window
        self.qkv = None  # q/k/v as one matmul (joined at load on GPUs and on the compact CPU path)

    def int8_input(self, x):
        """The int8 buffer the q/k/v GEMVs read this input from (base.int8_buffer), or None."""
        return int8_buffer(self.qkv, x)

    def forward(self, x, step: Step, q8=None):
        b, t, _ = x.shape
        q = _rope_projection(self, x, step, q8)  # rotated, k and v in the cache: the GEMVs' epilogue, where it can
        rotated = q is not None
        if not rotated:
            q, k, v = project(self, x, "qkv", ("q_proj", "k_proj", "v_proj"), q8)
            q = q.view(b, t, self.h, self.d)  # (B, T, H, D)
            k = k.view(b, t, self.kv, self.d)  # (B, T, K, D)
            v = v.view(b, t, self.kv, self.d)  # (B, T, K, D)
        o8 = int8_buffer(self.o_proj, q.reshape(b, t, -1))  # o_proj's int8 input, if the attention fills it
        if rotated:
            out = _rotated_attention(q, step, self.layer, self.d ** -0.5, self.window, q8=o8)
        else:
            norms = (self.q_norm, self.k_norm) if self.qk_norm else ()  # applied with RoPE, inside attention
            out = attention(q, k, v, step, self.layer, self.d ** -0.5, self.window, norms, q8=o8)
        return self.o_proj(out, act=o8) if o8 is not None and o8.filled else self.o_proj(out)  # (B, T, E)


class MLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gate_proj = Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.up_proj = Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.down_proj = Linear(a.intermediate_size, a.hidden_size, bias=a.mlp_bias)
        self.gate_up = None  # gate and up as one matmul (joined at load on GPUs and on the compact CPU path)

    def int8_input(self, x):
        """The int8 buffer the joined gate/up GEMV reads this input from (base.int8_buffer), or None."""
        return int8_buffer(self.gate_up, x)

    def forward(self, x, step: Step, q8=None):
        if self.gate_up is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        # one wide matmul [gate | up], then silu(gate) * up in one kernel
        return gated(self.down_proj, self.gate_up.wide_forward(x, q8), silu_mul, step)


class Block(nn.Module):
    JOINED = ("qkv", "gate_up")  # the attention's q/k/v and the MLP's gate/up as one layer each (phi3: its own)

    def __init__(self, a: ModelArgs, layer: int):
        super().__init__()
        self.self_attn = Attention(a, layer)
        self.mlp = MLP(a)
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)

    def forward(self, x, residual, step: Step):
        """h = x + attn(norm(x)); out = h + mlp(norm(h)) in the residual-stream form: takes the previous
        block's (mlp output, residual stream) and returns its own, each add done inside the next norm's
        kernel (the last one by the next block's). q8: where the next matmul reads its input in int8, the
        norm's kernel also writes it so (base.int8_buffer)."""
        q8 = self.self_attn.int8_input(x)
        x, residual = self.input_layernorm(x, residual, step, q8)
        x = self.self_attn(x, step, q8)
        q8 = self.mlp.int8_input(x)
        x, residual = self.post_attention_layernorm(x, residual, step, q8)
        return self.mlp(x, step, q8), residual

    def native_layer(self) -> dict | None:
        """This block as the native CPU decode step takes it (ops.cpu.layer_plan: one C call runs `forward` for
        every block of a token), or None where a projection has no native form (base.native_projections)."""
        a, m, n1, n2 = self.self_attn, self.mlp, self.input_layernorm, self.post_attention_layernorm
        parts = native_projections(a, m, self.JOINED)
        if parts is None or n1.offset != n2.offset or n1.eps != n2.eps:
            return None
        qk = (a.q_norm.weight, a.k_norm.weight, a.q_norm.eps, a.q_norm.offset) if getattr(a, "qk_norm", False) else None
        return {"norms": (n1.weight, n2.weight, n1.eps, n1.offset), "post_norms": None, "qk_norms": qk,
                "heads": (a.h, a.kv, a.d), "scale": a.d ** -0.5, "window": a.window, "rope": "global", "act": "silu",
                **parts}


class Body(nn.Module):
    """Hugging Face's `model.` prefix: embeddings, blocks, final norm."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.embed_tokens = embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(Block(a, i) for i in range(a.num_hidden_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.rotary = RoPE(a.head_dim, a.rope_theta, a.rope_scaling, a.max_position_embeddings)


class Model(CausalLM):
    body = Body

    def forward(self, ids: torch.Tensor, step: Step | None = None, last_only: bool | torch.Tensor = False):
        """ids (B, T) → logits (B, T, V) (or (B, 1, V) of one row: the last with last_only=True, row i with
        last_only=tensor([i]), row i[b] of row b with a (B,) tensor); `step` (cache.Step) says where the tokens
        go; None: a whole sequence from position 0, no cache."""
        m = self.model
        step = prepare(step, ids, self.policy, {"global": m.rotary}, {self.args.sliding_window})
        x, residual = m.embed_tokens(ids), None  # (B, T, E); the stream starts at the first norm
        x, residual = run_blocks(m.layers, x, residual, step)  # crossing devices where a split model's do
        x, residual = logit_rows(last_only, x, residual)
        return self.logits(x, residual, step)  # (B, T, V)
