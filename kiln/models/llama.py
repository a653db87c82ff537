"""Llama 2 / 3 / 3.1 / 3.2 (and Mistral, through models.ALIASES): the reference decoder-only block.

Owns: the Llama block layout (pre-norm attention with GQA + SwiGLU MLP), llama3 RoPE scaling through
RoPE, optional q/k/v biases and per-head q/k norms so that qwen2.py and qwen3.py are just argument
defaults on top of this file.
Not: caching (cache.py), sampling, quantization (QuantLinear replaces nn.Linear at load time).

Shape alphabet: B batch, T new tokens, S keys, E hidden, H query heads, K kv heads, D head dim, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kiln.models.base import BaseArgs, RMSNorm, RoPE, attention, causal_mask, graph_step, positions
from kiln.fuse import Normed, gated, project, value
from kiln.ops import rms_norm


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


class Attention(nn.Module):
    def __init__(self, a: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.h, self.kv, self.d = layer, a.num_attention_heads, a.num_key_value_heads, a.head_dim
        self.q_proj = nn.Linear(a.hidden_size, self.h * self.d, bias=a.attention_bias)
        self.k_proj = nn.Linear(a.hidden_size, self.kv * self.d, bias=a.attention_bias)
        self.v_proj = nn.Linear(a.hidden_size, self.kv * self.d, bias=a.attention_bias)
        self.o_proj = nn.Linear(self.h * self.d, a.hidden_size, bias=False)
        if a.qk_norm:
            self.q_norm = RMSNorm(self.d, a.rms_norm_eps)
            self.k_norm = RMSNorm(self.d, a.rms_norm_eps)
        self.qk_norm, self.window = a.qk_norm, a.sliding_window
        self.qkv = None  # kiln.fuse: q/k/v as one matmul (set at load on GPUs)

    def forward(self, x, rope, mask, cache=None, pos=0):
        b, t, _ = x.shape
        q, k, v = project(self, x, "qkv", ("q_proj", "k_proj", "v_proj"))  # x may be a kiln.fuse.Normed
        q = q.view(b, t, self.h, self.d)  # (B, T, H, D)
        k = k.view(b, t, self.kv, self.d)  # (B, T, K, D)
        v = v.view(b, t, self.kv, self.d)  # (B, T, K, D)
        norms = (self.q_norm, self.k_norm) if self.qk_norm else ()  # applied with RoPE, inside attention
        out = attention(q, k, v, rope, mask, self.d ** -0.5, cache, self.layer, pos, self.window, norms)
        return self.o_proj(out)  # (B, T, E)


class MLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=a.mlp_bias)
        self.gate_up = None  # kiln.fuse: gate and up as one matmul (set at load on GPUs)

    def forward(self, x):
        if self.gate_up is not None:  # one wide matmul; silu(gate) * up inside the down GEMV where it can be
            return gated(self.down_proj, self.gate_up, x, "silu")
        x = value(x)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def add_norm(norm: RMSNorm, x, residual=None):
    """(norm(residual + x), residual + x), the add fused into the norm's kernel; no add without residual."""
    if residual is None:
        return norm(x), x
    return rms_norm(x, norm.weight, norm.eps, norm.offset, residual)


class Block(nn.Module):
    def __init__(self, a: ModelArgs, layer: int):
        super().__init__()
        self.self_attn = Attention(a, layer)
        self.mlp = MLP(a)
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)

    def forward(self, x, rope, mask, cache=None, pos=0, residual=None):
        """h = x + attn(norm(x)); out = h + mlp(norm(h)) — each residual add done inside the norm after it,
        and each norm inside the matmul after it where the GEMV can (kiln.fuse.Normed): takes the previous
        block's (mlp output, residual stream) and returns its own, the last add left to the next block."""
        p = Normed(x, residual, self.input_layernorm)  # p.h: the residual stream x + residual
        a = self.self_attn(p, rope, mask, cache, pos)
        p = Normed(a, p.h, self.post_attention_layernorm)
        return self.mlp(p), p.h


class Body(nn.Module):
    """Hugging Face's `model.` prefix: embeddings, blocks, final norm."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(Block(a, i) for i in range(a.num_hidden_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.rotary = RoPE(a.head_dim, a.rope_theta, a.rope_scaling, a.max_position_embeddings)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Body(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def forward(self, ids: torch.Tensor, cache=None, pos=0, last_only: bool = False):
        """ids (B, T) → logits (B, T, V) (or (B, 1, V) with last_only); pos = tokens already cached."""
        m, t = self.model, ids.shape[1]
        x = m.embed_tokens(ids)  # (B, T, E)
        p, s = positions(pos, t, cache, ids.device)  # (T,), keys
        rope = m.rotary(p, s)
        mask = None if graph_step(pos, ids) else causal_mask(p, s, self.args.sliding_window, ids.device)
        r = None  # the residual stream; x is the last block's output not yet added to it
        for layer in m.layers:
            x, r = layer(x, rope, mask, cache, pos, r)
        if last_only:
            x, r = x[:, -1:], r[:, -1:]
        return self.lm_head(add_norm(m.norm, x, r)[0])  # (B, T, V)
