"""Phi-3 / Phi-3.5 / Phi-4-mini: the Llama block with fused qkv and gate_up projections.

Owns: splitting the fused projections, partial rotary embeddings, longrope (short / long factors chosen
by the total length, as Hugging Face does), the optional sliding window.
Not: anything the Llama block already does (models/llama.py provides MLP-free pieces and the body).

Shape alphabet: B batch, T new tokens, S keys, E hidden, H query heads, K kv heads, D head dim, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from kiln.models import llama
from kiln.models.base import Linear, RMSNorm, RoPE, Step, attention, embedding, int8_buffer
from kiln.ops import silu_mul


@dataclass
class ModelArgs(llama.ModelArgs):
    partial_rotary_factor: float = 1.0
    original_max_position_embeddings: int | None = None
    resid_pdrop: float = 0.0


class Attention(nn.Module):
    def __init__(self, a: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.h, self.kv, self.d = layer, a.num_attention_heads, a.num_key_value_heads, a.head_dim
        self.qkv_proj = Linear(a.hidden_size, (self.h + 2 * self.kv) * self.d, bias=a.attention_bias)
        self.o_proj = Linear(self.h * self.d, a.hidden_size, bias=False)
        self.window = a.sliding_window

    def int8_input(self, x):
        return None  # qkv_proj is one layer already: it quantizes its own input where it reads int8

    def forward(self, x, step: Step, q8=None):
        b, t, _ = x.shape
        qkv = self.qkv_proj(x).view(b, t, self.h + 2 * self.kv, self.d)  # (B, T, H+2K, D)
        q, k, v = qkv.split([self.h, self.kv, self.kv], dim=2)
        o8 = int8_buffer(self.o_proj, q.reshape(b, t, -1))  # o_proj's int8 input, if the attention fills it
        out = attention(q, k, v, step, self.layer, self.d ** -0.5, self.window, q8=o8)  # RoPE inside
        return self.o_proj(out, act=o8) if o8 is not None and o8.filled else self.o_proj(out)  # (B, T, E)


class MLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gate_up_proj = Linear(a.hidden_size, 2 * a.intermediate_size, bias=False)
        self.down_proj = Linear(a.intermediate_size, a.hidden_size, bias=False)

    def int8_input(self, x):
        return None  # gate_up_proj is one layer already

    def forward(self, x, step: Step, q8=None):
        # silu(gate) * up, one kernel on GPUs
        return self.down_proj(silu_mul(self.gate_up_proj(x), policy=step.policy))


class Block(llama.Block):
    JOINED = ("qkv_proj", "gate_up_proj")

    def __init__(self, a: ModelArgs, layer: int):
        nn.Module.__init__(self)
        self.self_attn = Attention(a, layer)
        self.mlp = MLP(a)
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)


class Body(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.embed_tokens = embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(Block(a, i) for i in range(a.num_hidden_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        rot = int(a.head_dim * a.partial_rotary_factor)
        self.rotary = RoPE(rot, a.rope_theta, a.rope_scaling, a.max_position_embeddings,
                           a.original_max_position_embeddings)


class Model(llama.Model):
    body = Body
