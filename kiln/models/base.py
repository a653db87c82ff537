"""Pieces every model family shares: args parsing, RMSNorm, rotary embeddings, masks, attention core.

Owns: `BaseArgs.from_dict` (config.json spelling, unknown keys dropped), RoPE frequency schedules
(default, linear, llama3, longrope, GGUF per-frequency factors), the causal / sliding-window mask, and
the attention core of every family — RoPE (after the optional per-head q/k norms), the cache write, and
scaled-dot-product attention over grouped KV heads — including which ops serve a fused decode step.

`pos` — what a model's forward gets besides ids — takes three forms: an int (all rows at the same
position; prefill and the batch-1 decode), a 0-dim device tensor (the same, inside a CUDA graph), and a
(B,) tensor of per-row positions with a `cache.RowsView` (a server's batched step: row b at pos[b] in
its own slot). With the last, positions are (B, T) and the mask is (B, 1, T, S), one per row.
Not: any family's block layout (one file per family), caches (cache.py), quantization (quant/).

Shape alphabet: B batch, T new tokens, S keys (cached + new), H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kiln import native
from kiln.errors import KilnError
from kiln.ops import decode_attention, rms_norm, rope_qk, rope_qk_write_kv, use_triton


@dataclass
class BaseArgs:
    @classmethod
    def from_dict(cls, cfg: dict):
        cfg = _flatten_rope_parameters(cfg)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in names})


def _flatten_rope_parameters(cfg: dict) -> dict:
    """transformers 5 writes `rope_parameters` where older configs had rope_theta / rope_scaling."""
    rp = cfg.get("rope_parameters")
    if not isinstance(rp, dict):
        return cfg
    cfg = dict(cfg)
    if "full_attention" in rp:  # per layer type (gemma3): global and local schedules
        local = rp.get("sliding_attention", {})
        if "rope_theta" in local:
            cfg.setdefault("rope_local_base_freq", local["rope_theta"])
        rp = rp["full_attention"]
    if "rope_theta" in rp:
        cfg.setdefault("rope_theta", rp["rope_theta"])
    if rp.get("rope_type", "default") != "default" and not cfg.get("rope_scaling"):
        cfg["rope_scaling"] = rp
    return cfg


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.offset = eps, offset  # Gemma scales by (1 + w): offset 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.offset)  # one kernel on GPUs; ops/norm.py


# ---------------------------------------------------------------- rotary embeddings

def rope_inv_freq(dim: int, base: float, scaling: dict | None, max_pos: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (float32, CPU) and the attention factor cos/sin are multiplied by."""
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv / float(scaling["factor"]), 1.0
    if kind == "llama3":
        return _llama3(inv, scaling), 1.0
    raise KilnError(f"rope scaling type {kind!r} is not supported (kiln supports default, linear, llama3, "
                    f"longrope)")


def _llama3(inv: torch.Tensor, s: dict) -> torch.Tensor:
    factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    return torch.where(medium, smoothed, scaled)


class RoPE(nn.Module):
    """cos/sin for absolute positions; rotate-half convention (Hugging Face layout)."""

    def __init__(self, dim: int, base: float, scaling: dict | None = None, max_pos: int = 4096,
                 original_max_pos: int | None = None):
        super().__init__()
        self.dim = dim
        if (scaling or {}).get("rope_type", (scaling or {}).get("type")) == "longrope":
            self._init_longrope(dim, base, scaling, max_pos, original_max_pos or max_pos)
        else:
            inv, self.attn_factor = rope_inv_freq(dim, base, scaling, max_pos)
            self.register_buffer("inv_freq", inv, persistent=False)
            self.long_inv_freq, self.original_max_pos = None, None
        # GGUF llama 3.1 files carry per-frequency divisors instead of rope_scaling; load.py sets them.
        self.register_buffer("freq_factors", torch.ones(dim // 2, device="cpu"), persistent=False)

    def _init_longrope(self, dim, base, s, max_pos, orig):
        inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
        self.register_buffer("inv_freq", inv / torch.tensor(s["short_factor"], dtype=torch.float32, device="cpu"),
                             persistent=False)
        self.register_buffer("long_inv_freq", inv / torch.tensor(s["long_factor"], dtype=torch.float32, device="cpu"),
                             persistent=False)
        self.original_max_pos = orig
        factor = s.get("factor") or max_pos / orig
        self.attn_factor = s.get("attention_factor") or (
            1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig)))

    def forward(self, pos: torch.Tensor, total_len: int) -> RopeAt:
        """The rotation for positions `pos` (T,); `total_len` picks longrope's long or short factors."""
        inv = self.inv_freq
        if self.long_inv_freq is not None and total_len > self.original_max_pos:
            inv = self.long_inv_freq
        return RopeAt(pos, inv / self.freq_factors, self.attn_factor, self.dim)


class RopeAt(NamedTuple):
    pos: torch.Tensor  # (T,) absolute positions, or (B, T) per row
    inv_freq: torch.Tensor  # (R/2,) float32
    attn_factor: float
    rot_dim: int

    def apply(self, q, k, q_norm=None, k_norm=None):
        """q (B, T, H, D), k (B, T, K, D) → rotated (and per-head normed) q, k; one kernel on GPUs."""
        return rope_qk(q, k, self.pos, self.inv_freq, self.attn_factor, *_norm_args(q_norm, k_norm),
                       self.rot_dim)

    def apply_write(self, q, k, v, k_cache, v_cache, rows=None, q_norm=None, k_norm=None):
        """`apply`, with the rotated k and v written into the static cache at these positions (cache row
        rows[b] for batch row b, if given) in the same kernel → rotated q (B, T, H, D)."""
        return rope_qk_write_kv(q, k, v, k_cache, v_cache, self.pos, self.inv_freq, self.attn_factor,
                                *_norm_args(q_norm, k_norm), self.rot_dim, rows)


def _norm_args(q_norm, k_norm) -> tuple:
    """(q weight, k weight, eps, offset) of the optional per-head norms, as the rope ops take them."""
    if q_norm is None:
        return None, None, 1e-6, 0.0
    return q_norm.weight, k_norm.weight, q_norm.eps, q_norm.offset


# ---------------------------------------------------------------- attention

def graph_step(pos, x: torch.Tensor) -> bool:
    """Is this a decode step served by the fused RoPE + KV write and decode attention (a CUDA-graph step,
    or a batched step with per-row positions on a Triton device)? Those read positions directly, so such
    a step builds no mask."""
    return isinstance(pos, torch.Tensor) and use_triton(x)


def row_step(pos) -> bool:
    """Per-row positions (B,): a batched step over a slot cache's `RowsView`."""
    return isinstance(pos, torch.Tensor) and pos.ndim == 1


def causal_mask(q_pos: torch.Tensor, s: int, window: int | None, device) -> torch.Tensor:
    """Boolean (T, S): query at absolute position p sees keys 0..p, and only the last `window` of them.
    With per-row positions q_pos (B, T): (B, 1, T, S), broadcasting over heads."""
    k_pos = torch.arange(s, device=device)
    q = q_pos[..., None]  # (T, 1) or (B, T, 1)
    mask = k_pos <= q
    if window:
        mask &= (q - k_pos) < window
    return mask if q_pos.ndim == 1 else mask[:, None]


def attention(q, k, v, rope: RopeAt, mask, scale: float, cache=None, layer: int = 0, pos=0,
              window: int | None = None, norms: tuple = ()) -> torch.Tensor:
    """q (B, T, H, D), k/v (B, T, K, D), before RoPE → (B, T, H*D): q and k normed per head (norms =
    (q_norm, k_norm), or none) and rotated, k/v written into the cache, then attention.

    A CUDA-graph decode step (tensor `pos`) and a batched step over slots (per-row `pos`, a RowsView
    cache) on a Triton device take two launches per layer or three: RoPE with the KV write of the static
    cache in one kernel, then split-KV decode attention over that cache (one kernel with one split, else
    split + merge). Everything else (CPU, prefill) rotates, then goes through the cache's slice (or the
    rows' gather) and SDPA.
    """
    b, t = q.shape[:2]
    if _native_step(cache, layer, pos, q, rope):  # a CPU decode step: norms, RoPE, KV write and attention in one call
        return _native_attention(q, k, v, rope, scale, cache, layer, pos, window, norms)
    static = _static_kv(cache, layer, pos, q)
    if static is not None:
        kc, vc, rows = static  # (B or N, K, S, D) each, rows (B,) or None
        q = rope.apply_write(q, k, v, kc, vc, rows, *norms)  # (B, T, H, D)
        return decode_attention(q, kc, vc, rope.pos, scale, window, rows=rows).reshape(b, t, -1)
    q, k = rope.apply(q, k, *norms)
    if row_step(pos):
        pos = rope.pos  # (B, T): RowsView.update writes each row at its own positions
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
    if cache is not None:
        k, v = cache.update(layer, pos, k, v)  # (B, K, S, D)
    return attend(q, k, v, mask, scale)


def _native_step(cache, layer: int, pos, q: torch.Tensor, rope: RopeAt) -> bool:
    """One float32 token on the CPU at an int position inside a batch-1 cache, nothing to differentiate,
    with the native kernels built and shapes they take."""
    return (cache is not None and isinstance(pos, int) and q.shape[0] == q.shape[1] == 1 and not q.is_cuda
            and q.dtype == torch.float32 and not q.requires_grad and cache.k.shape[1] == 1
            and pos < cache.max_len and native.available()
            and native.attention_fits(q[0, 0], cache.k[layer][0], rope.inv_freq))


def _native_attention(q, k, v, rope: RopeAt, scale: float, cache, layer: int, pos: int, window, norms):
    """`attention` for one token in one native call (native.decode_attention; its torch twin is the
    path through rope.apply, cache.update and attend)."""
    qw, kw, eps, offset = _norm_args(*norms) if norms else _norm_args(None, None)
    out = native.decode_attention(q[0, 0], k[0, 0], v[0, 0], cache.k[layer][0], cache.v[layer][0], pos,
                                  rope.inv_freq, rope.attn_factor, qw, kw, eps, offset, scale, window)
    return out.view(1, 1, -1)  # (B, T, H*D)


def _static_kv(cache, layer: int, pos, x: torch.Tensor):
    """(k_cache, v_cache, rows) that a fused decode step writes and reads — every slot of a layer with the
    rows' slot index for a batched step, the layer's (B, K, S, D) with rows None for a CUDA-graph step —
    or None when this step is not served by the fused ops."""
    if cache is None or not graph_step(pos, x):
        return None
    if row_step(pos):
        return (*cache.layer_kv(layer), cache.slot_index)
    return cache.k[layer], cache.v[layer], None


def attend(q, k, v, mask, scale: float) -> torch.Tensor:
    """q (B, H, T, D), k/v (B, K, S, D), mask (T, S) or (B, 1, T, S) → (B, T, H*D)."""
    b, h, t, _ = q.shape
    if k.shape[1] != h:
        k = k.repeat_interleave(h // k.shape[1], dim=1)  # (B, H, S, D)
        v = v.repeat_interleave(h // v.shape[1], dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # (B, H, T, D)
    return out.transpose(1, 2).reshape(b, t, -1)


def positions(pos, t: int, cache, device) -> tuple[torch.Tensor, int]:
    """(absolute positions (T,), number of keys S) for T new tokens after `pos` cached ones.

    `pos` is an int, or a 0-dim device tensor when the step is captured in a CUDA graph: then the keys
    are the whole static cache (S = its length) and the mask hides the slots not yet written. With
    per-row positions pos (B,) the positions are (B, T) and S is the RowsView's `n_keys`.
    """
    if row_step(pos):
        return pos[:, None] + torch.arange(t, device=device), cache.n_keys  # (B, T)
    if isinstance(pos, torch.Tensor):
        return pos + torch.arange(t, device=device), cache.max_len
    return torch.arange(pos, pos + t, device=device), (pos + t if cache is not None else t)
