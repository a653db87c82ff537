"""Gemma 3 (text): interleaved sliding-window and global layers, q/k norms, sandwich norms, scaled embeddings.

Owns: the Gemma 3 block (norms before *and* after attention and MLP, (1 + w) RMSNorm, GELU-tanh gated
MLP), the layer pattern (five local layers with their own RoPE base, then one global), query scaling by
query_pre_attn_scalar, embeddings scaled by sqrt(hidden), tied output.
Not: vision towers (multimodal checkpoints load their text_config only; load.py strips the prefix), what
the Llama block already shows (models/llama.py: the residual-stream form, the int8 hand-off).

Shape alphabet: B batch, T new tokens, S keys, E hidden, H query heads, K kv heads, D head dim, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kiln.models.base import (BaseArgs, CausalLM, Linear, RMSNorm, RoPE, Step, attention, embedding, gated, int8_buffer,
                              logit_rows, native_projections, prepare, project, run_blocks)
from kiln.ops import gelu_tanh_mul


@dataclass
class ModelArgs(BaseArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 32768
    sliding_window: int = 512
    sliding_window_pattern: int = 6
    layer_types: list | None = None
    query_pre_attn_scalar: float | None = None
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    sliding: list = field(default_factory=list)  # derived: is layer i local?

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.query_pre_attn_scalar = self.query_pre_attn_scalar or self.head_dim
        if self.layer_types:
            self.sliding = [t == "sliding_attention" for t in self.layer_types]
        else:
            self.sliding = [(i + 1) % self.sliding_window_pattern != 0 for i in range(self.num_hidden_layers)]


class Attention(nn.Module):
    def __init__(self, a: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.h, self.kv, self.d = layer, a.num_attention_heads, a.num_key_value_heads, a.head_dim
        self.q_proj = Linear(a.hidden_size, self.h * self.d, bias=a.attention_bias)
        self.k_proj = Linear(a.hidden_size, self.kv * self.d, bias=a.attention_bias)
        self.v_proj = Linear(a.hidden_size, self.kv * self.d, bias=a.attention_bias)
        self.o_proj = Linear(self.h * self.d, a.hidden_size, bias=a.attention_bias)
        self.q_norm = RMSNorm(self.d, a.rms_norm_eps, offset=1.0)
        self.k_norm = RMSNorm(self.d, a.rms_norm_eps, offset=1.0)
        self.scale = a.query_pre_attn_scalar ** -0.5
        self.window = a.sliding_window if a.sliding[layer] else None
        self.rope = "local" if a.sliding[layer] else "global"
        self.qkv = None  # q/k/v as one matmul (joined at load on GPUs and on the compact CPU path)

    def int8_input(self, x):
        return int8_buffer(self.qkv, x)

    def forward(self, x, step: Step, q8=None):
        b, t, _ = x.shape
        q, k, v = project(self, x, "qkv", ("q_proj", "k_proj", "v_proj"), q8)
        q = q.view(b, t, self.h, self.d)  # (B, T, H, D)
        k = k.view(b, t, self.kv, self.d)  # (B, T, K, D)
        v = v.view(b, t, self.kv, self.d)  # (B, T, K, D)
        norms = (self.q_norm, self.k_norm)  # applied with RoPE, inside attention
        o8 = int8_buffer(self.o_proj, q.reshape(b, t, -1))  # o_proj's int8 input, if the attention fills it
        out = attention(q, k, v, step, self.layer, self.scale, self.window, norms, self.rope, q8=o8)
        return self.o_proj(out, act=o8) if o8 is not None and o8.filled else self.o_proj(out)  # (B, T, E)


class MLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gate_proj = Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.up_proj = Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.down_proj = Linear(a.intermediate_size, a.hidden_size, bias=False)
        self.gate_up = None  # gate and up as one matmul (joined at load on GPUs and on the compact CPU path)

    def int8_input(self, x):
        return int8_buffer(self.gate_up, x)

    def forward(self, x, step: Step, q8=None):
        if self.gate_up is None:
            return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))
        return gated(self.down_proj, self.gate_up.wide_forward(x, q8), gelu_tanh_mul, step)


class Block(nn.Module):
    def __init__(self, a: ModelArgs, layer: int):
        super().__init__()
        self.self_attn = Attention(a, layer)
        self.mlp = MLP(a)
        norm = lambda: RMSNorm(a.hidden_size, a.rms_norm_eps, offset=1.0)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()

    def forward(self, x, residual, step: Step):
        """h = x + post_norm(attn(norm(x))); out = h + post_ff_norm(mlp(pre_ff_norm(h))) in the residual-
        stream form (llama.Block): returns (post_ff_norm(mlp(...)), h), the add left to the next norm."""
        q8 = self.self_attn.int8_input(x)
        x, residual = self.input_layernorm(x, residual, step, q8)
        x = self.post_attention_layernorm.plain(self.self_attn(x, step, q8), step)
        q8 = self.mlp.int8_input(x)
        x, residual = self.pre_feedforward_layernorm(x, residual, step, q8)
        return self.post_feedforward_layernorm.plain(self.mlp(x, step, q8), step), residual

    def native_layer(self) -> dict | None:
        """This block as the native CPU decode step takes it (ops.cpu.layer_plan; llama.Block.native_layer),
        or None where a projection has no native form."""
        a, parts = self.self_attn, native_projections(self.self_attn, self.mlp)
        norms = (self.input_layernorm, self.pre_feedforward_layernorm, self.post_attention_layernorm,
                 self.post_feedforward_layernorm)
        if parts is None or len({(n.eps, n.offset) for n in norms}) > 1:
            return None
        return {"norms": (norms[0].weight, norms[1].weight, norms[0].eps, norms[0].offset),
                "post_norms": (norms[2].weight, norms[3].weight),
                "qk_norms": (a.q_norm.weight, a.k_norm.weight, a.q_norm.eps, a.q_norm.offset),
                "heads": (a.h, a.kv, a.d), "scale": a.scale, "window": a.window, "rope": a.rope,
                "act": "gelu_tanh", **parts}


class Body(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.embed_tokens = embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(Block(a, i) for i in range(a.num_hidden_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps, offset=1.0)
        self.rotary = RoPE(a.head_dim, a.rope_theta, a.rope_scaling, a.max_position_embeddings)
        self.rotary_local = RoPE(a.head_dim, a.rope_local_base_freq, None, a.max_position_embeddings)


class Model(CausalLM):
    body = Body

    def forward(self, ids: torch.Tensor, step: Step | None = None, last_only: bool | torch.Tensor = False):
        """ids (B, T) → logits (B, T, V) (or (B, 1, V) with last_only); `step` as in llama.Model."""
        m, a = self.model, self.args
        step = prepare(step, ids, self.policy, {"global": m.rotary, "local": m.rotary_local},
                       {None, a.sliding_window})
        x = m.embed_tokens(ids)  # (B, T, E)
        x = x * float(torch.tensor(a.hidden_size ** 0.5, dtype=x.dtype))  # the scale rounded to the model's dtype
        # (a Python number: a CUDA graph cannot capture a host-to-device copy)
        residual = None  # the stream starts at the first norm
        x, residual = run_blocks(m.layers, x, residual, step)  # crossing devices where a split model's do
        x, residual = logit_rows(last_only, x, residual)
        logits = self.logits(x, residual, step)  # (B, T, V)
        if a.final_logit_softcapping:
            logits = torch.tanh(logits / a.final_logit_softcapping) * a.final_logit_softcapping
        return logits
