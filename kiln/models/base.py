"""Pieces every model family shares: args parsing, RMSNorm, rotary embeddings, the step, masks, the
projections' glue and the attention core.

Owns: `BaseArgs.from_dict` (config.json spelling, unknown keys dropped), `RMSNorm` in the residual-stream form
(`x, residual = norm(x, residual, step)`: the add inside the norm's kernel), RoPE frequency schedules (default,
linear, llama3, longrope, GGUF per-frequency factors), `prepare` (what one forward computes once from the
caller's `cache.Step`: positions, RoPE tables, the causal / sliding-window masks, whether the fused decode
kernels serve it; a ring layer's mask from the positions its slots hold: `ring_mask`), the re-rotation of cached
keys for a context shift (`key_rotation`), the key offset a block-quantized cache subtracts before rotating
(`key_offsets`: the k bias; `CausalLM`, every family's Model's base, asks it), the glue to layers joined at load
(`project`, `gated`, the int8 hand-off `int8_buffer`), and `attention`, the attention core of every family — RoPE
(after the optional per-head q/k norms), the cache write and attention over grouped KV heads — and the one place
that decides which attention kernels run for a step (fused Triton decode, one native CPU call, or torch's SDPA),
and `run_blocks`, the block loop of every family (a CPU decode token through every block in one native call where
each block offers its `native_layer`, else block by block).

Models import only this file and kiln.ops; the kernels they call pick their own backend (Triton, native C,
torch) from the tensors and the step's policy.
Not: any family's block layout (one file per family), caches and the step's kinds (cache.py), quantized
or joined layers (quant/; models only call them), which matmul kernel runs (quant/).

Shape alphabet: B batch, T new tokens, S keys (cached + new), H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kiln.cache import PREFILL, ROWS, Ring, Step
from kiln.errors import KilnError
from kiln.ops import cpu as ops_cpu
from kiln.ops import decode_attention, rms_norm, rope_decode_attention, rope_qk, rope_qk_ref, use_triton
from kiln.policy import DEFAULT, Policy
from kiln import split


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


def embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding without its random init: the loader assigns the weights, and torch's normal_ on the meta
    device (where kiln builds models) first imports torch._dynamo, about 1.5 s of every load."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


class Linear(nn.Linear):
    """nn.Linear whose product is ops.cpu.linear's (a float32 prompt on the CPU: oneDNN's GEMM)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops_cpu.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.offset = eps, offset  # Gemma scales by (1 + w): offset 1.0

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, step: Step, q8=None):
        """The residual-stream form: (norm(x + residual), x + residual), the add inside the norm's kernel; a
        residual of None (the first block) adds nothing: (norm(x), x). `q8`: the int8 buffer the next
        projection asked for (`int8_buffer`), which the same kernel fills with the normed output."""
        buffers, policy = None if q8 is None else q8.buffers, step.policy
        if residual is None:
            return rms_norm(x, self.weight, self.eps, self.offset, q8=buffers, policy=policy), x
        return rms_norm(x, self.weight, self.eps, self.offset, residual, q8=buffers, policy=policy)

    def plain(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        """norm(x) alone, outside the residual stream (Gemma's norms after attention and the MLP)."""
        return rms_norm(x, self.weight, self.eps, self.offset, policy=step.policy)


# ---------------------------------------------------------------- rotary embeddings

def rope_inv_freq(dim: int, base: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
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
            inv, self.attn_factor = rope_inv_freq(dim, base, scaling)
            self.register_buffer("inv_freq", inv, persistent=False)
            self.long_inv_freq, self.original_max_pos = None, None
        # GGUF llama 3.1 files carry per-frequency divisors instead of rope_scaling; load.py sets them.
        self.register_buffer("freq_factors", torch.ones(dim // 2, device="cpu"), persistent=False)

    def _init_longrope(self, dim, base, s, max_pos, orig):
        inv, _ = rope_inv_freq(dim, base, None)  # the default schedule, divided by each factor list below
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
        long = self.long_inv_freq is not None and total_len > self.original_max_pos
        inv = self.long_inv_freq if long else self.inv_freq
        return RopeAt(pos, inv / self.freq_factors, self.attn_factor, self.dim)


class RopeAt(NamedTuple):
    pos: torch.Tensor  # (T,) absolute positions, or (B, T) per row
    inv_freq: torch.Tensor  # (R/2,) float32
    attn_factor: float
    rot_dim: int

    def apply(self, q, k, norms: tuple = (), policy: Policy = DEFAULT):
        """q (B, T, H, D), k (B, T, K, D) → rotated (and per-head normed: norms = (q_norm, k_norm), or none)
        q, k; one kernel on GPUs."""
        return rope_qk(q, k, self.pos, self.inv_freq, self.attn_factor, *_norm_args(*norms), self.rot_dim,
                       policy=policy)


def _norm_args(q_norm=None, k_norm=None) -> tuple:
    """(q weight, k weight, eps, offset) of the optional per-head norms, as the rope ops take them."""
    return (None, None, 1e-6, 0.0) if q_norm is None else (q_norm.weight, k_norm.weight, q_norm.eps, q_norm.offset)


def key_rotation(model, total_len: int):
    """For a context shift (cache.KVCache.shift): rotate(layer, k (B, K, S, D), delta (S,)) → k with each key's
    RoPE moved by delta positions, in the layer's own schedule (Gemma: local or global). RoPE at p then at
    delta is RoPE at p + delta, so this is exact up to rounding (a pure rotation: attn_factor not applied)."""
    body = model.model
    ropes = {"global": body.rotary, "local": getattr(body, "rotary_local", None)}
    names = [getattr(block.self_attn, "rope", "global") for block in body.layers]

    def rotate(layer: int, k: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        kt, inv = k.transpose(1, 2), ropes[names[layer]](delta, total_len).inv_freq.to(k.device)  # (B, S, K, D)
        return rope_qk_ref(kt, kt, delta, inv)[1].transpose(1, 2)
    return rotate


def key_offsets(model) -> torch.Tensor | None:
    """(L, K, D) float32: the key each layer's projection gives a zero input before RoPE — its k bias (Qwen2's; a
    joined qkv's slice of it) —, what a block-quantized KV cache subtracts from the keys it stores (kv_types.Basis);
    None when no layer has one. Zero for a layer whose keys are normed per head (the norm comes after the bias)."""
    a = model.args
    rows = [_k_bias(block.self_attn, a.num_attention_heads, a.num_key_value_heads, a.head_dim)
            for block in model.model.layers]
    if all(r is None for r in rows):
        return None
    zero = torch.zeros(a.num_key_value_heads * a.head_dim)
    return torch.stack([zero if r is None else r.detach().float().cpu() for r in rows]).view(
        len(rows), a.num_key_value_heads, a.head_dim)


class CausalLM(nn.Module):
    """What every family's top-level Model shares: its parts (`model`, the family's `body`: Hugging Face's
    `model.` prefix; `lm_head`), the kernel policy of a step that names none (kiln.load sets the one it was
    given) and its key offsets, which KVCache.for_model asks the model for (cache.py imports no model code)."""

    policy = DEFAULT
    body: type

    def __init__(self, args):
        super().__init__()
        self.args = args
        self.model = self.body(args)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)

    def key_offsets(self) -> torch.Tensor | None:
        """(L, K, D): `key_offsets(self)`, what a block-quantized KV cache subtracts from the keys it stores."""
        return key_offsets(self)

    def logits(self, x: torch.Tensor, residual, step: Step) -> torch.Tensor:
        """Final norm, then the head (B, T, V); a decode row of an int8 head: the norm fills its input, float32 out."""
        q8 = int8_buffer(self.lm_head, x)
        y = self.model.norm(x, residual, step, q8)[0]
        return self.lm_head(y) if q8 is None else self.lm_head(y, act=replace(q8, dtype=torch.float32))


def _k_bias(attn: nn.Module, h: int, kv: int, d: int) -> torch.Tensor | None:
    """The k rows of a layer's projection bias: k_proj's, or those of a joined qkv (Joined) or a qkv_proj."""
    if hasattr(attn, "k_norm"):
        return None
    if getattr(attn, "k_proj", None) is not None:
        return getattr(attn.k_proj, "bias", None)
    joined = getattr(attn, "qkv", None) or getattr(attn, "qkv_proj", None)
    if joined is None:
        return None
    layers = [joined] if not hasattr(joined, "groups") else list(joined.groups)
    biases = [getattr(layer, "bias", None) for layer in layers]
    if any(b is None for b in biases):
        return None
    return torch.cat(biases)[h * d:(h + kv) * d]  # q rows, then k, then v


# ---------------------------------------------------------------- the step

FUSED_MAX_T = 16  # tokens a row that a CUDA-graph or batched step takes through the fused decode kernels


def prepare(step: Step | None, ids: torch.Tensor, policy: Policy, ropes: dict, windows) -> Step:
    """The caller's step (None: `model(ids)`, a whole sequence without a cache) with what every layer of
    this forward reads computed once: the policy (the step's, else the model's `policy`), the absolute
    positions, whether the fused decode kernels serve it, one RoPE table per entry of `ropes` (name →
    RoPE module) and one mask per sliding window in `windows` (None: no window)."""
    step = Step.prefill() if step is None else step
    policy = step.policy or policy
    t, device = ids.shape[1], ids.device
    positions, n_keys = step.keys(t, device)
    # A CUDA-graph step and a batched step on a Triton device take RoPE with the KV write, then split-KV
    # decode attention over the static cache: those read positions directly, so no mask is built. Up to
    # FUSED_MAX_T tokens a row (a speculative check of drafts): the decode kernel's query tile holds them all.
    # Every cache type: the decode kernel reads each as stored (q8_0 / q4_0 codes and scales, fp8, floats).
    # A cache with ring layers: every mask is built when a layer first asks (`layer_mask`), as the ring
    # layers' depend on their rings (the fused step's ring layers need none where `_ring_fuses`).
    fused = step.kind != PREFILL and t <= FUSED_MAX_T and use_triton(ids, policy)
    lazy = fused or getattr(step.cache, "rings", None) is not None
    masks = {} if lazy else {w: causal_mask(positions, n_keys, w, device) for w in windows}
    return replace(step, policy=policy, positions=positions, fused=fused, n_keys=n_keys,
                   rope={name: r(positions, n_keys) for name, r in ropes.items()}, mask=masks, slots={})


def logit_rows(last_only, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of x and residual (B, T, E) whose logits are wanted: all (False), the last (True), or row
    last_only[b] of batch row b (a (1,) or (B,) device index: padded prompts), or a slice of every row."""
    if last_only is False:
        return x, residual
    if last_only is True:
        return x[:, -1:], residual[:, -1:]
    if isinstance(last_only, slice):  # rows of every batch row (perplexity's scored half)
        return x[:, last_only], residual[:, last_only]
    idx = last_only.to(x.device).view(-1, 1, 1).expand(x.shape[0], 1, x.shape[2])  # split: ids' device → x's
    return x.gather(1, idx), residual.gather(1, idx)


# ---------------------------------------------------------------- the block loop

def run_blocks(layers, x: torch.Tensor, residual, step: Step):
    """x, residual through every block (the loop of every family) -> x, residual: split.run_blocks (which
    crosses a split model's devices), each run of blocks on one place first offered to `_native_run`."""
    return split.run_blocks(layers, x, residual, step, lambda a, b, *rest: _native_run(layers, a, b, *rest))


def _native_run(layers, a: int, b: int, x: torch.Tensor, residual, step: Step):
    """Blocks a..b-1 (all on one place) in one native call (ops.cpu.decode_layers) -> (x, residual), or None:
    block by block. It serves one token of a batch-1 step (`_native_found` says which), and a batched-rows
    step of one token a row (the engine's decode on the CPU) of up to ops.cpu.NATIVE_ROWS rows, each row on its
    slot's batch-1 view at its own position (its keys 0..pos, as the row's mask allows; the rows share each
    weight's read)."""
    rows = [step]
    if step.kind == ROWS:
        view = step.cache
        if (x.shape[1] != 1 or not 1 <= x.shape[0] <= ops_cpu.NATIVE_ROWS or x.is_cuda
                or not view.native_reads):
            return None
        rows = [replace(step, kind=PREFILL, cache=view.cache.slot(s), pos=p, graphs=None)
                for s, p in zip(view.slot_index.tolist(), step.pos.tolist())]
    found = [_native_found(layers, a, b, x[i:i + 1], row) for i, row in enumerate(rows)]
    if any(f is None for f in found):
        return None
    tables = {name: (r.inv_freq, r.attn_factor) for name, r in step.rope.items()}
    return ops_cpu.decode_layers(found[0][0], x, residual, [r.pos for r in rows],
                                 torch.stack([where for _, where in found]), tables)


def _native_found(layers, a: int, b: int, x: torch.Tensor, step: Step):
    """(the native plan of blocks a..b-1, where each layer's slots are) for one float32 token on the CPU
    (ops.cpu.serves) of a prefill-kind step, the policy's `native_step` on, a batch-1 cache in the model's
    dtype or q8_0, where every block has a native form (`native_plan`, built once per cache: KVCache.plans) and every
    layer's slots are ones the native attention takes (`_native_where`); else None."""
    c = step.cache
    if not (step.kind == PREFILL and step.policy.native_step and x.shape[:2] == (1, 1) and c is not None
            and getattr(c, "plans", None) is not None and c.native_reads
            and ops_cpu.serves(x, step.policy)):
        return None
    key = (id(layers), a, b)
    if key not in c.plans:
        c.plans[key] = native_plan(layers[a:b])
    stack = c.plans[key]
    where = None if stack is None else _native_where(step, stack, a)
    return None if where is None else (stack, where)


def native_plan(layers):
    """ops.cpu.layer_plan of these blocks (each block's `native_layer`), or None: a block without one, placed off
    the CPU, or with hooks (kiln imatrix's, which must see their own calls)."""
    hooked = any(m._forward_hooks or m._forward_pre_hooks for b in layers for m in b.modules())
    on_cpu = all(getattr(b, "place", None) is None or torch.device(b.place.device).type == "cpu" for b in layers)
    return ops_cpu.layer_plan([getattr(b, "native_layer", lambda: None)() if on_cpu and not hooked else None
                               for b in layers])


def _native_where(step: Step, stack, first: int = 0) -> torch.Tensor | None:
    """(L, 12) int64 for ops.cpu.decode_layers: for the plan's layers first, first + 1, ... the addresses of
    its k and v cache (K, S, ·), the head stride in elements, the slot this token is written to, the first slot it
    attends and how many (ops.cpu.attention_slots; `_native_ring` for a ring layer), then how the layer is stored
    (KVCache.native_kv's KVStore.ints(); zeros for float32); None where a layer's cache is not float32 or a
    type the native token stores, of the plan's K and D with rows one after another, or its token is not one
    the native attention takes."""
    c, p = step.cache, step.pos
    _, _, kv, d, _ = stack.dims
    rows = []
    for layer, window in enumerate(stack.windows, first):
        ring = _native_ring(step, layer, window)
        if ring is False:
            return None
        slot, lo, n_keys = ops_cpu.attention_slots(p, window, ring)
        k, v = c.k[layer], c.v[layer]  # (1, K, S, ·)
        store = c.native_kv(layer)
        if not (tuple(k.shape[:2]) == tuple(v.shape[:2]) == (1, kv)
                and ops_cpu.stored_fits(k[0], v[0], d, store)  # float32, or as the KVStore says
                and slot < k.shape[2] and lo + n_keys <= k.shape[2]):
            return None
        extra = (0,) * 6 if store is None else store.ints()
        rows.append((k.data_ptr(), v.data_ptr(), ops_cpu.head_stride(k[0], store), slot, lo, n_keys, *extra))
    return torch.tensor(rows, dtype=torch.int64)


def native_projections(attn: nn.Module, mlp: nn.Module, joined: tuple[str, str] = ("qkv", "gate_up")) -> dict | None:
    """A block's qkv, o, gate_up and down as the native decode step reads them (each the projections `project`
    computes: attn.<joined[0]>, else q/k/v_proj; mlp.<joined[1]>, else gate/up_proj; as native.Stack's parts:
    weight, qtype, bias, scale, group, in output order), or None where one has no native form (not in file
    blocks or int8 rows, a LoRA beside it, no layer)."""
    def parts(module, name, separate=()):
        layer = getattr(module, name, None)
        return ops_cpu.join_parts([layer] if layer is not None else [getattr(module, p, None) for p in separate])
    found = {"qkv": parts(attn, joined[0], ("q_proj", "k_proj", "v_proj")), "o": parts(attn, "o_proj"),
             "gate_up": parts(mlp, joined[1], ("gate_proj", "up_proj")), "down": parts(mlp, "down_proj")}
    return None if any(p is None for p in found.values()) else found


# ---------------------------------------------------------------- projections
# Layers joined at load (kiln.quant.swap.Joined: q/k/v, gate/up) replace several matmuls by one; models
# reach them through these helpers only. The int8 hand-off of a GPU decode step: a layer whose GEMV reads
# its input quantized to int8 asks for a buffer (`int8_input(x)`); the kernel producing that input (a norm,
# the gated activation) fills it in the same launch, and the layer is called with it (`act=`).

def int8_buffer(layer, x: torch.Tensor):
    """The int8 buffer `layer` reads x from at this step, for the kernel producing x to fill; None when the
    layer reads x as it is (no layer, or one without int8 GEMVs)."""
    ask = getattr(layer, "int8_input", None)
    return None if ask is None else ask(x)


def project(module: nn.Module, x: torch.Tensor, joined: str, parts: tuple[str, ...], q8=None) -> tuple:
    """The projections `parts` of x: through module.<joined> (one wider matmul, made at load) when there is
    one — `q8`, x already in int8, from `int8_buffer(module.<joined>, x)` — else each layer."""
    layer = getattr(module, joined, None)
    if layer is not None:
        return layer(x, q8)
    return tuple(getattr(module, p)(x) for p in parts)


def gated(down: nn.Module, gate_up: torch.Tensor, act, step: Step) -> torch.Tensor:
    """down(act(gate) * up) for gate_up (..., 2I) = [gate | up]: the product in one kernel (act: ops.silu_mul
    or gelu_tanh_mul), which also stores it in int8 when the down projection asks for that."""
    q8 = int8_buffer(down, gate_up[..., :down.in_features])
    y = act(gate_up, q8=None if q8 is None else q8.buffers, policy=step.policy)
    return down(y) if q8 is None else down(y, act=q8)


# ---------------------------------------------------------------- attention

def causal_mask(q_pos: torch.Tensor, s: int, window: int | None, device) -> torch.Tensor | None:
    """Boolean (T, S): query at absolute position p sees keys 0..p, and only the last `window` of them.
    With per-row positions q_pos (B, T): (B, 1, T, S), broadcasting over heads. None where that is the plain
    causal square (T == S: a prompt from position 0, no window shorter than it), which `attend` hands to SDPA
    as is_causal: its flash kernels, and no (T, S) mask in memory (512 MB at 16k tokens)."""
    if q_pos.ndim == 1 and q_pos.shape[0] == s and (not window or window >= s):
        return None
    k_pos = torch.arange(s, device=device)
    q = q_pos[..., None]  # (T, 1) or (B, T, 1)
    mask = k_pos <= q
    if window:
        mask &= (q - k_pos) < window
    return mask if q_pos.ndim == 1 else mask[:, None]


def ring_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, ring: Ring, window: int | None) -> torch.Tensor:
    """Boolean (T, S) for a ring layer (cache.Ring): query at p sees the key at absolute position j
    (k_pos: -1 for an empty slot) when 0 <= j <= p, j is in the ring's keep or within its span of p, and
    within the window of p. The keys may come in any order (attention does not care)."""
    q, j = q_pos[:, None], k_pos[None, :]  # (T, 1), (1, S)
    mask = (j >= 0) & (j <= q) & ((j < ring.keep) | (q - j < ring.span))
    if window:
        mask &= (q - j) < window
    return mask


def layer_mask(step: Step, layer: int, window: int | None, t: int, device) -> torch.Tensor | None:
    """The mask of this layer's keys at this step, built once per forward for each (window, ring)."""
    ring = step.ring(layer)
    key = window if ring is None else (window, ring)
    if key not in step.mask:
        step.mask[key] = (causal_mask(step.positions, step.n_keys, window, device) if ring is None
                          else _ring_layer_mask(step, ring, window, t, device))
    return step.mask[key]


def _ring_layer_mask(step: Step, ring: Ring, window: int | None, t: int, device) -> torch.Tensor | None:
    """A prompt from position 0 into a ring without `keep` (a sliding window's) attends as a plain window of
    the ring's span over its own keys: `causal_mask` (None, SDPA's causal kernel, when the span covers it)."""
    if step.kind == PREFILL and step.pos == 0 and t > 1 and not ring.keep:
        return causal_mask(step.positions, t, min(window or ring.span, ring.span), device)
    return ring_mask(step.positions, step.ring_keys(ring, t, device), ring, window)


def attention(q, k, v, step: Step, layer: int, scale: float, window: int | None = None, norms: tuple = (),
              rope: str = "global", q8=None) -> torch.Tensor:
    """q (B, T, H, D), k/v (B, T, K, D), before RoPE → (B, T, H*D): q and k normed per head (norms =
    (q_norm, k_norm), or none) and rotated (the step's `rope` table), k/v written into the cache, then attention
    over the keys the step's window mask lets each query see (the fused step may fill `q8`). It decides the kernels:

    - a step the fused kernels serve (`step.fused`: a CUDA-graph or batched-rows step on a Triton device),
      heads of 16 or more values: `ops.rope_decode_attention` — where it fuses, the split-KV decode kernel
      with RoPE, the q/k norms and the KV write in it, else RoPE with the KV write into the static cache in
      one kernel, then split-KV decode attention (one kernel with one split, else split + merge); a
      cache not stored in the model's dtype and basis (q8_0, ...: `_fused_stored`) takes RoPE, then
      ops.kv_write's one kernel that encodes the keys and values, around the same decode kernel. The kernel
      reads slot j as position j; a ring layer (cache.Ring) is written at its slots (`Step.ring_slots`) and
      read whole up to its last slot where every slot it holds is visible (`_ring_fuses`: one token a row),
      else it takes the path below, with a mask from `Step.ring_keys`;
    - one float32 token of a prefill-kind step on the CPU where the native kernels fit
      (ops.cpu.attention_fits): norms, RoPE, the KV write and attention in one native call (a ring layer's
      when every slot it holds is visible: `_native_ring`);
    - anything else (prefill, CPU): RoPE, the cache's write (`step.update`), then SDPA.
    """
    b, t = q.shape[:2]
    r, policy = step.rope[rope], step.policy
    ring = step.ring(layer)
    if step.fused and q.shape[-1] >= 16 and (ring is None or _ring_fuses(ring, window, t)):  # (dots of 16 a row)
        slots, last = None, None
        if ring is not None:  # every slot it holds is visible: the kernel reads them all, in any order
            slots, last, window = step.ring_slots(ring), ring.slots - 1, None
        if not step.cache.direct:
            return _fused_stored(q, k, v, r, step, layer, scale, window, norms, slots, last, q8)
        kc, vc, rows = step.static_kv(layer)  # (B or N, K, S, D) each, rows (B,) or None
        out = rope_decode_attention(q, k, v, kc, vc, r.pos, r.inv_freq, scale, r.attn_factor, *_norm_args(*norms),
                                    r.rot_dim, window, rows=rows, slots=slots, last=last, policy=policy, q8=q8)
        return out.reshape(b, t, -1)
    if _native_token(q, step, layer, r) and _native_ring(step, layer, window) is not False:
        return _native_attention(q, k, v, r, scale, step, layer, window, norms)
    q, k = r.apply(q, k, norms, policy)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
    if step.cache is None:
        return attend(q, k, v, layer_mask(step, layer, window, t, q.device), scale)
    k, v = step.update(layer, k, v)  # (B, K, S, D), in the cache's basis (a block type's: rotated)
    out = attend(step.cache.queries(q), k, v, layer_mask(step, layer, window, t, q.device), scale)
    return step.cache.outputs(out)  # (B, T, H*D)


def _ring_fuses(ring: Ring, window: int | None, t: int) -> bool:
    """Does a ring layer's fused step see every slot it holds, so the decode kernel may read them all as they
    lie (`last`: the ring's final slot, no window)? One token a row, and the window (if any) spans the ring
    with nothing kept before it (a rotating cache's first tokens may fall out of a window)."""
    return t == 1 and (window is None or (not ring.keep and ring.span <= window))


def _fused_stored(q, k, v, r: RopeAt, step: Step, layer: int, scale: float, window, norms, slots=None,
                  last=None, q8=None) -> torch.Tensor:
    """The fused step's attention over a cache stored in its own types and basis (not `direct`: q8_0, q4_0,
    fp8, another float type, rotated): RoPE, then one kernel that rotates the query into the keys' basis and encodes and
    writes the new keys and values (ops.kv_write; nothing read back), then the decode kernel over the stored
    parts (codes and scales), which rotates its output back — where `update_at` would dequantize the whole
    layer every step. A ring layer's keys go to `slots`, and it sees its slots up to `last`. → (B, T, H*D)."""
    b, t = q.shape[:2]
    c = step.cache
    q, k = r.apply(q, k, norms, step.policy)
    q = c.encode_at(layer, step.positions if slots is None else slots, q, k, v, step.policy)  # the keys' basis
    kc, vc, rows = step.static_kv(layer)  # (B or N, K, S, D or D/2): a block part's codes
    k_scale, v_scale = c.layer_scales(layer)  # (B or N, K, S, D/32) or None
    out = decode_attention(q, kc, vc, step.positions, scale, window, rows=rows, k_scale=k_scale, v_scale=v_scale,
                           out_rot=c.out_rotation(), last=last, policy=step.policy, q8=q8)  # (B, T, H, D)
    return out.reshape(b, t, -1)


def _native_token(q: torch.Tensor, step: Step, layer: int, rope: RopeAt) -> bool:
    """One token of a prefill-kind step inside a batch-1 cache, with room for it, that the native
    single-token attention takes (ops.cpu.attention_fits: float32 on the CPU, the policy's `native`)."""
    c = step.cache
    return (step.kind == PREFILL and c is not None and q.shape[0] == q.shape[1] == 1 and c.k[layer].shape[0] == 1
            and step.pos < c.max_len and c.native_reads
            and ops_cpu.attention_fits(q[0, 0], c.k[layer][0], rope.inv_freq, step.policy))


def _native_ring(step: Step, layer: int, window: int | None):
    """For the native call: None (a layer without a ring), a ring layer's (write slot, slots to attend:
    0..n-1), or False where some slot it holds is not visible to this token (torch's path then)."""
    ring = step.ring(layer)
    if ring is None:
        return None
    p = step.pos
    if window and (window < ring.span or (ring.keep and p >= window)):
        return False
    return ring.slot(p), min(p + 1, ring.slots)


def _native_attention(q, k, v, rope: RopeAt, scale: float, step: Step, layer: int, window, norms):
    """`attention` for one token in one native call (its torch twin: rope.apply, step.update, attend)."""
    c = step.cache
    out = ops_cpu.decode_attention(q[0, 0], k[0, 0], v[0, 0], c.k[layer][0], c.v[layer][0], step.pos,
                                   rope.inv_freq, rope.attn_factor, *_norm_args(*norms), scale, window,
                                   _native_ring(step, layer, window), c.native_kv(layer))
    return out.view(1, 1, -1)  # (B, T, H*D)


def attend(q, k, v, mask, scale: float) -> torch.Tensor:
    """q (B, H, T, D), k/v (B, K, S, D), mask (T, S), (B, 1, T, S) or None (causal, T == S) → (B, T, H*D).
    Grouped KV heads go to SDPA as they are (enable_gqa) on the causal square; a masked call gets them
    repeated, as the masked kernels (and torch before 2.5) do not all take groups."""
    b, h, t, _ = q.shape
    extra = {}
    if k.shape[1] != h and mask is None and _SDPA_GQA:
        extra["enable_gqa"] = True
    elif k.shape[1] != h:
        k = k.repeat_interleave(h // k.shape[1], dim=1)  # (B, H, S, D)
        v = v.repeat_interleave(h // v.shape[1], dim=1)
    with _masked_backends(q, mask):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                             **extra)  # (B, H, T, D)
    return out.transpose(1, 2).reshape(b, t, -1)


def _masked_backends(q: torch.Tensor, mask) -> contextlib.AbstractContextManager:
    """SDPA's kernels for a masked call on CUDA without cuDNN's: it builds a plan for every new key count (48-70
    ms a call on an H100, torch 2.11: bench/sdpa_shapes.py), and an eager step's key count is new each step;
    the memory-efficient kernel takes the mask at 0.2 ms."""
    if mask is None or not q.is_cuda or _SDPA_NO_CUDNN is None:
        return contextlib.nullcontext()
    return sdpa_kernel(_SDPA_NO_CUDNN)


_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)  # SDPA's enable_gqa
try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel
    _SDPA_NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
except ImportError:  # pragma: no cover
    sdpa_kernel, _SDPA_NO_CUDNN = None, None
