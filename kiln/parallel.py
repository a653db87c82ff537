"""Tensor parallelism: one model's weights cut across the ranks of a torch.distributed group (Megatron-style).

Owns: `Shard` (this process's rank, the world size, the process group) and what it does to a model before
and after it is built — `Shard.split(config, weights)` gives this rank's config (its heads, its slice of the
MLP and of the vocabulary) and a lazy view of its weights (`ShardedWeights`: every tensor sliced on read,
GGUF blocks cut along block boundaries), and `Shard.wrap(model)` puts the collectives around the built layers:

- column-parallel q/k/v, gate/up (and phi3's fused qkv_proj / gate_up_proj): this rank's output rows, whole
  heads (a KV head on several ranks where there are fewer than ranks), and the MLP's columns in whole
  blocks of down_proj (as even as those allow); no communication;
- row-parallel o_proj and down_proj: this rank's input columns, one all_reduce (sum) of the output each
  (`RowParallel`); a bias is held by rank 0 only;
- the token embedding vocabulary-parallel (`VocabEmbedding`: a rank looks up its own ids, zeros elsewhere,
  one all_reduce) and the output head likewise (`GatheredHead`: this rank's vocabulary rows, logits
  all-gathered, so every rank holds the whole (..., V) row);
- the KV cache follows by itself: the model a rank builds has only its KV heads (`model.args`), so
  cache.KVCache.for_model gives each rank its heads.

Weights are cut *before* the layers are built, so every layer type and path kiln has (fp32 on the CPU, the
compact CPU layers, QuantLinear on GPUs, joined projections) runs unchanged on a rank's shard. A column cut
takes whole rows of GGUF blocks (a row list: `row_perm`), a row cut a span of whole blocks of every row:
a cut inside a block is a KilnError. Without tensor parallelism none of this is imported or run.

The collectives are plain torch.distributed calls on tensors of fixed shape, so a decode step with them
inside can be captured in a CUDA graph on NCCL (every rank captures and replays its own graph in step).
Not: process groups and launching ranks (launch.py), who samples and who follows (launch.py), the layer split
between CPU and GPU (split.py; not combined with this).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn

from kiln.errors import KilnError
from kiln.quant.swap import dense


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of `world` ranks of the process group `group` (None: the default group)."""

    rank: int
    world: int
    group: object = None

    def split(self, config: dict, weights: Mapping) -> tuple[dict, ShardedWeights]:
        """(this rank's config, a view of its weights) of a model checked whole (load.check_model)."""
        sizes = Sizes.of(config, self.world, mlp_block(weights))
        a, b = sizes.vocab_rows(self.rank)
        m, n = sizes.mlp_cols(self.rank)
        local = dict(config, num_attention_heads=sizes.heads // self.world,
                     num_key_value_heads=sizes.local_kv_heads, head_dim=sizes.head_dim,
                     intermediate_size=n - m, vocab_size=b - a)
        return local, ShardedWeights(weights, sizes, self.rank)

    def wrap(self, model: nn.Module, config: dict) -> nn.Module:
        """In place, on a model built from `split`'s output: the collectives around its layers (see the
        module docstring); model.args.vocab_size becomes the whole vocabulary (the logits' width)."""
        sizes = Sizes.of(config, self.world)
        body = model.model
        for block in body.layers:
            block.self_attn.o_proj = RowParallel(block.self_attn.o_proj, self.group)
            block.mlp.down_proj = RowParallel(block.mlp.down_proj, self.group)
        body.embed_tokens = VocabEmbedding(body.embed_tokens, sizes.vocab_rows(self.rank)[0], self.group)
        model.lm_head = GatheredHead(model.lm_head, [b - a for a, b in map(sizes.vocab_rows, range(self.world))],
                                     self.group)
        model.args = replace(model.args, vocab_size=sizes.vocab)
        model.shard = self
        return model


@dataclass(frozen=True)
class Sizes:
    """The whole model's sizes that tensor parallelism cuts, checked to divide among `world` ranks."""

    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    world: int
    block: int = 1  # the MLP's cut points fall on multiples of this (down_proj's GGUF block size)

    @classmethod
    def of(cls, config: dict, world: int, block: int = 1) -> Sizes:
        from kiln.models import get_model
        a = get_model(config["model_type"])[1].from_dict(config)  # derived defaults (head_dim, kv heads)
        s = cls(a.num_attention_heads, a.num_key_value_heads, a.head_dim, a.intermediate_size, a.vocab_size, world,
                block)
        s.check()
        return s

    def check(self):
        if not isinstance(self.world, int) or self.world < 1:
            raise KilnError(f"tensor parallel size must be an integer >= 1, got {self.world!r}")
        if self.heads % self.world:
            raise KilnError(f"tensor parallelism over {self.world} ranks needs the model's attention heads "
                            f"({self.heads}) to divide among them; use a tensor parallel size that divides "
                            f"{self.heads}")
        if self.kv_heads % self.world and self.world % self.kv_heads:
            raise KilnError(f"tensor parallelism over {self.world} ranks needs the model's KV heads "
                            f"({self.kv_heads}) to divide among them, or to divide the ranks (each KV head then "
                            f"on several ranks); use a tensor parallel size that divides {self.kv_heads} or a "
                            f"multiple of it")
        if self.intermediate % self.block or self.intermediate // self.block < self.world:
            raise KilnError(f"the MLP's {self.intermediate} columns in blocks of {self.block} cannot be split "
                            f"among {self.world} ranks; use fewer ranks")
        if self.vocab_rows(self.world - 1)[0] >= self.vocab:  # spans of ceil(V / world) leave the last empty
            raise KilnError(f"a vocabulary of {self.vocab} tokens cannot be split among {self.world} ranks")

    @property
    def local_kv_heads(self) -> int:
        """KV heads a rank holds: its share, or one (replicated) where there are fewer KV heads than ranks."""
        return max(1, self.kv_heads // self.world)

    def kv_rows(self, rank: int) -> tuple[int, int]:
        """Rows [a, b) of k_proj / v_proj on `rank`: its share of the KV heads, or, with fewer KV heads than
        ranks, the one KV head its query heads read (rank r's queries are heads of one group)."""
        d = self.head_dim
        if self.kv_heads >= self.world:
            return rank * self.kv_heads // self.world * d, (rank + 1) * self.kv_heads // self.world * d
        j = rank * self.kv_heads // self.world
        return j * d, (j + 1) * d

    def mlp_cols(self, rank: int) -> tuple[int, int]:
        """Columns [a, b) of the MLP (gate/up rows, down columns) on `rank`: as even as whole blocks of down_proj
        allow (a K-quant's 256: Qwen2.5-0.5B's 4864 = 19 blocks go 10 + 9 on two ranks). Exact however
        uneven: the MLP is a sum over its columns."""
        n = self.intermediate // self.block
        return rank * n // self.world * self.block, (rank + 1) * n // self.world * self.block

    def vocab_rows(self, rank: int) -> tuple[int, int]:
        """Rows [a, b) of the embedding and output head on `rank`: equal spans of ceil(V / world), the last
        one shorter."""
        per = -(-self.vocab // self.world)
        return min(rank * per, self.vocab), min((rank + 1) * per, self.vocab)


def mlp_block(weights: Mapping) -> int:
    """The largest GGUF block of any down_proj (1 for float weights): where the MLP may be cut."""
    from kiln.quant import _sizes
    if hasattr(weights, "shapes"):  # a Hugging Face folder's lazy shards: float tensors (and none read here)
        return 1
    blocks = [_sizes(w.qtype)[0] for n, w in weights.items() if n.endswith("mlp.down_proj.weight") and
              getattr(w, "qtype", None) is not None]
    return max(blocks, default=1)


def check_file(path, world: int) -> None:
    """KilnError unless the model at `path` (a GGUF file or a Hugging Face folder) divides among `world` ranks,
    read from its config and tensor headers alone: a launcher checks this before it starts any rank."""
    from pathlib import Path

    from kiln.reader import check_model, read_weights
    config, weights = read_weights(Path(path))
    check_model(config, weights)  # a malformed config: one KilnError naming the field, before any rank starts
    Sizes.of(config, world, mlp_block(weights))  # KilnError where the model does not divide


# ---------------------------------------------------------------- the weights' cuts

def cut(name: str, s: Sizes, rank: int):
    """How tensor `name` (a Hugging Face name) is cut for `rank`: ("rows", [(a, b), ...]) keeps those row
    spans (in order), ("cols", (a, b)) those columns of every row, ("bias0",) a row-parallel layer's bias
    (rank 0's own, zeros elsewhere), None the whole tensor."""
    w = s.world
    q, kv, i = s.heads * s.head_dim, s.kv_heads * s.head_dim, s.intermediate
    mine = lambda n, off=0: (off + rank * n // w, off + (rank + 1) * n // w)  # noqa: E731  (rank's span of n)
    m, k = s.mlp_cols(rank), s.kv_rows(rank)
    kind = name.rsplit(".", 1)[-1]
    base = name.rsplit(".", 1)[0]
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return "rows", [s.vocab_rows(rank)]
    table = {
        "self_attn.q_proj": ("rows", [mine(q)]),
        "self_attn.k_proj": ("rows", [k]),
        "self_attn.v_proj": ("rows", [k]),
        "self_attn.qkv_proj": ("rows", [mine(q), (q + k[0], q + k[1]), (q + kv + k[0], q + kv + k[1])]),
        "mlp.gate_proj": ("rows", [m]),
        "mlp.up_proj": ("rows", [m]),
        "mlp.gate_up_proj": ("rows", [m, (i + m[0], i + m[1])]),
        "self_attn.o_proj": ("cols", mine(q)),
        "mlp.down_proj": ("cols", m),
    }
    for suffix, how in table.items():
        if base.endswith("." + suffix):
            if how[0] == "cols" and kind == "bias":
                return ("bias0",)
            return how  # a column-parallel bias is cut as its weight's rows
    return None


class ShardedWeights(Mapping):
    """{HF name: this rank's part of the tensor}, cut when read (a lazy view: nothing is read up front);
    `shapes()` says the parts' shapes without reading (formats/checks.shapes_of)."""

    def __init__(self, weights: Mapping, sizes: Sizes, rank: int):
        self.base, self.sizes, self.rank = weights, sizes, rank
        self._embedding = None  # its cut, made once: see __getitem__

    def __iter__(self):
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)

    def __contains__(self, name) -> bool:
        return name in self.base

    def __getitem__(self, name):
        if name == "model.embed_tokens.weight":  # a tied head must get the very object its embedding got:
            if self._embedding is None:          # quant/linear.swap_linears shares their planes by identity
                self._embedding = self._cut(name)
            return self._embedding
        return self._cut(name)

    def _cut(self, name: str):
        how = cut(name, self.sizes, self.rank)
        w = self.base[name]
        return w if how is None else _cut(w, name, how, self.rank)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        from kiln.formats.checks import shapes_of
        return {n: _cut_shape(tuple(shape), cut(n, self.sizes, self.rank))
                for n, shape in shapes_of(self.base).items()}


def _cut_shape(shape: tuple[int, ...], how) -> tuple[int, ...]:
    if how is None or how[0] == "bias0":
        return shape
    if how[0] == "rows":
        return (sum(b - a for a, b in how[1]), *shape[1:])
    a, b = how[1]
    return (*shape[:-1], b - a)


def _cut(w, name: str, how, rank: int):
    from kiln.formats.gguf import GGUFTensor
    if how[0] == "bias0":
        return w if rank == 0 else torch.zeros_like(dense(w))
    if isinstance(w, GGUFTensor):
        return _cut_rows_gguf(w, how[1]) if how[0] == "rows" else _cut_cols_gguf(w, name, *how[1])
    if how[0] == "rows":
        return torch.cat([w[a:b] for a, b in how[1]]).clone()  # a copy: the whole tensor is not kept alive
    a, b = how[1]
    return w[..., a:b].contiguous()


def _cut_rows_gguf(t, spans):
    """Whole rows of a GGUF tensor (of any type: a row is whole blocks). One span of the file's own rows is a
    view of its bytes (nothing copied, its pages still the file's); rows of several spans, or behind a row
    permutation (llama q/k), are gathered into a copy of this rank's rows only. A 1-D tensor (a bias) is
    dequantized and cut."""
    from kiln.formats.gguf import GGUFTensor
    if len(t.shape) == 1:
        return torch.cat([dense(t)[a:b] for a, b in spans])
    n = sum(b - a for a, b in spans)
    full = t.data.view(t.shape[0], -1)  # (rows, row bytes) in the file's order
    if t.row_perm is None and len(spans) == 1:
        a, b = spans[0]
        return GGUFTensor(t.name, (n, *t.shape[1:]), t.qtype, full[a:b].reshape(-1), add=t.add, mapped=t.mapped)
    rows = torch.cat([torch.arange(a, b) for a, b in spans])
    if t.row_perm is not None:
        rows = t.row_perm[rows]  # the file's rows behind the wanted (un-permuted) ones
    return GGUFTensor(t.name, (n, *t.shape[1:]), t.qtype, full[rows].reshape(-1), add=t.add)


def _cut_cols_gguf(t, name: str, a: int, b: int):
    """Columns a:b of every row of a GGUF tensor: whole blocks only (a row-parallel layer's input span)."""
    from kiln.formats.gguf import GGUFTensor
    from kiln.quant import _sizes, type_name
    block, size = _sizes(t.qtype)
    if a % block or b % block:
        raise KilnError(f"tensor {name} is stored as {type_name(t.qtype)} in blocks of {block} columns, and "
                        f"tensor parallelism would cut it at column {a if a % block else b}, inside a block; "
                        f"use a tensor parallel size that cuts it at a multiple of {block} (or a file quantized "
                        f"with smaller blocks)")
    raw = t.raw_rows()[:, a // block * size:b // block * size].contiguous()  # (rows, this rank's bytes)
    return GGUFTensor(t.name, (*t.shape[:-1], b - a), t.qtype, raw.reshape(-1), add=t.add)


# ---------------------------------------------------------------- the collectives around the layers

class RowParallel(nn.Module):
    """A row-parallel linear layer: `inner` holds this rank's input columns; its partial output is summed
    over the ranks (one all_reduce). Attributes the models read of a linear layer pass through."""

    def __init__(self, inner: nn.Module, group=None):
        super().__init__()
        self.inner, self.group = inner, group
        self.in_features, self.out_features = inner.in_features, inner.out_features

    def int8_input(self, x):
        ask = getattr(self.inner, "int8_input", None)  # the int8 hand-off (models/base.int8_buffer)
        return None if ask is None else ask(x)

    def forward(self, x: torch.Tensor, *args, **kw) -> torch.Tensor:
        y = self.inner(x, *args, **kw).contiguous()
        dist.all_reduce(y, group=self.group)
        return y


class VocabEmbedding(nn.Module):
    """A vocabulary-parallel embedding: `inner` holds rows [start, start + n) of the table; every rank looks
    up the ids it holds (zeros for the others) and one all_reduce adds the ranks' rows (exact: one non-zero
    term each)."""

    def __init__(self, inner: nn.Module, start: int, group=None):
        super().__init__()
        self.inner, self.start, self.group = inner, start, group
        self.num_embeddings, self.embedding_dim = inner.num_embeddings, inner.embedding_dim

    @property
    def weight(self):
        return self.inner.weight  # a tied head shares it (load.build_model ties before wrapping)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        inside = (local >= 0) & (local < self.num_embeddings)  # (B, T)
        x = self.inner(local.clamp(0, self.num_embeddings - 1))  # (B, T, E)
        x = x.masked_fill(~inside[..., None], 0).contiguous()
        dist.all_reduce(x, group=self.group)
        return x


class GatheredHead(nn.Module):
    """A vocabulary-parallel output head: `inner` gives this rank's logits (..., V_r); they are all-gathered
    (padded to the widest rank's width, so that every rank sends one shape) into the whole (..., V)."""

    def __init__(self, inner: nn.Module, widths: list[int], group=None):
        super().__init__()
        self.inner, self.widths, self.group = inner, widths, group
        self.in_features, self.out_features = inner.in_features, sum(widths)

    @property
    def weight(self):
        return self.inner.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)  # (..., V_r)
        wide = max(self.widths)
        if y.shape[-1] < wide:
            y = torch.nn.functional.pad(y, (0, wide - y.shape[-1]))
        y = y.contiguous()
        parts = [torch.empty_like(y) for _ in self.widths]
        dist.all_gather(parts, y, group=self.group)
        return torch.cat([p[..., :n] for p, n in zip(parts, self.widths)], dim=-1)  # (..., V)
