"""GGUF files: header, metadata, tensor map, GGUF→Hugging Face names, q/k un-permute.

Owns: parsing a GGUF v2/v3 file into (metadata dict, tensor infos over an mmap), turning the metadata
into a Hugging Face style config dict, and naming every tensor by its Hugging Face name, with the
per-architecture fix-ups llama.cpp's converter applied undone (q/k row permutation for llama, +1 on
Gemma norm weights).
Not: dequantization (quant/), building the model (load.py), the vocabulary (tokenizer.py reads `meta`).

The header is parsed here rather than with `gguf.GGUFReader` because the reader builds a numpy view per
array element and takes ~20 s to open a 262k-token vocabulary; the numbering of value and tensor types
comes from the `gguf` package.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from kiln.errors import KilnError

MAGIC = b"GGUF"
_SCALARS = {  # value type -> (struct format, numpy dtype)
    GGUFValueType.UINT8: ("<B", np.uint8), GGUFValueType.INT8: ("<b", np.int8),
    GGUFValueType.UINT16: ("<H", np.uint16), GGUFValueType.INT16: ("<h", np.int16),
    GGUFValueType.UINT32: ("<I", np.uint32), GGUFValueType.INT32: ("<i", np.int32),
    GGUFValueType.FLOAT32: ("<f", np.float32), GGUFValueType.BOOL: ("<?", np.bool_),
    GGUFValueType.UINT64: ("<Q", np.uint64), GGUFValueType.INT64: ("<q", np.int64),
    GGUFValueType.FLOAT64: ("<d", np.float64),
}


@dataclass
class GGUFTensor:
    """One tensor's raw bytes in the file and how to read them."""

    name: str
    shape: tuple[int, ...]  # torch order: (rows, row_length)
    qtype: int
    data: torch.Tensor  # uint8 view of the file's bytes, never written
    row_perm: torch.Tensor | None = None  # rows to gather (un-permute q/k) before use
    add: float = 0.0  # constant added after dequantization (Gemma norms are stored as 1 + w)

    @property
    def type_name(self) -> str:
        from kiln.quant import type_name
        return type_name(self.qtype)

    def raw_rows(self) -> torch.Tensor:
        """The packed bytes as (rows, row_bytes), with the row permutation applied."""
        rows = self.data.view(-1, self.data.numel() // max(1, _rows(self.shape)))
        return rows if self.row_perm is None else rows[self.row_perm]

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        from kiln.quant import dequantize
        w = dequantize(self.raw_rows().reshape(-1), self.qtype, self.shape, dtype=dtype)
        return w + self.add if self.add else w


def _rows(shape: tuple[int, ...]) -> int:
    return math.prod(shape[:-1])


@dataclass
class GGUFFile:
    path: str
    version: int
    meta: dict = field(repr=False)
    tensors: dict[str, GGUFTensor] = field(repr=False)

    @property
    def arch(self) -> str:
        return self.meta.get("general.architecture", "?")


class _Cursor:
    """Little-endian reader over a bytes-like buffer that turns running off the end into a KilnError."""

    def __init__(self, buf, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise KilnError(f"{self.path}: GGUF header is truncated or corrupt (read past end of file "
                            f"at byte {self.pos}); re-download the file")
        out = memoryview(self.buf)[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        return bytes(self.take(n)).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if etype in _SCALARS:
                dt = np.dtype(_SCALARS[etype][1]).newbyteorder("<")
                return np.frombuffer(self.take(count * dt.itemsize), dtype=dt).tolist()
            return [self.value(etype) for _ in range(count)]
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype][0])
        raise KilnError(f"{self.path}: unknown GGUF metadata value type {vtype}; the file is corrupt")


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse the header of a GGUF file and map its tensors without reading them."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise KilnError(f"cannot open {path}: {e}") from None
    cur = _Cursor(buf, path)
    if len(buf) < 4 or bytes(buf[:4]) != MAGIC:
        raise KilnError(f"{path} is not a GGUF file (magic {bytes(buf[:4])!r}, expected {MAGIC!r})")
    cur.take(4)
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise KilnError(f"{path}: GGUF version {version} is not supported (kiln reads v2 and v3)")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    meta = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.scalar("<I"))
    infos = [_tensor_info(cur) for _ in range(n_tensors)]
    align = int(meta.get("general.alignment", 32))
    start = (cur.pos + align - 1) // align * align
    return GGUFFile(path, version, meta, _map_tensors(path, infos, start, len(buf)))


def _tensor_info(cur: _Cursor):
    name = cur.string()
    dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
    return name, tuple(reversed(dims)), cur.scalar("<I"), cur.scalar("<Q")


def _map_tensors(path: str, infos, start: int, size: int) -> dict[str, GGUFTensor]:
    arr = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: writable view, file never changes
    base = torch.from_numpy(arr)
    out = {}
    for name, shape, qtype, offset in infos:
        n = _nbytes(path, name, qtype, shape)
        lo = start + offset
        if lo + n > size:
            raise KilnError(f"{path} is truncated: tensor {name} needs bytes {lo}..{lo + n} but the file "
                            f"has {size}; re-download the file")
        out[name] = GGUFTensor(name, shape, qtype, base[lo:lo + n])
    return out


def _nbytes(path: str, name: str, qtype: int, shape: tuple[int, ...]) -> int:
    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    except (ValueError, KeyError):
        raise KilnError(f"{path}: tensor {name} has unknown tensor type id {qtype}; this file needs a "
                        f"newer kiln or is corrupt") from None
    n = math.prod(shape)
    if shape and shape[-1] % block:
        raise KilnError(f"{path}: tensor {name} row length {shape[-1]} is not a multiple of its "
                        f"block size {block}; the file is corrupt")
    return n // block * size


# ---------------------------------------------------------------- metadata → Hugging Face config

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gemma3", "phi3")


def to_config(g: GGUFFile) -> dict:
    """A Hugging Face config.json-style dict from GGUF metadata."""
    arch = g.arch
    if arch not in SUPPORTED_ARCHS:
        raise KilnError(f"{g.path}: architecture {arch!r} is not supported "
                        f"(kiln runs: {', '.join(SUPPORTED_ARCHS)})")
    m = lambda k, d=None: g.meta.get(f"{arch}.{k}", d)  # noqa: E731
    n_heads = int(m("attention.head_count"))
    hidden = int(m("embedding_length"))
    head_dim = int(m("attention.key_length", hidden // n_heads))
    vocab = len(g.meta.get("tokenizer.ggml.tokens", [])) or g.tensors["token_embd.weight"].shape[0]
    cfg = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": int(m("block_count")),
        "intermediate_size": int(m("feed_forward_length")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(m("attention.head_count_kv", n_heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(m("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(m("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(m("context_length", 4096)),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "bos_token_id": g.meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": g.meta.get("tokenizer.ggml.eos_token_id"),
    }
    scaling = _rope_scaling(m)
    if scaling:
        cfg["rope_scaling"] = scaling
    _ARCH_CONFIG.get(arch, lambda c, m, g: None)(cfg, m, g)
    return cfg


def _rope_scaling(m) -> dict | None:
    kind = m("rope.scaling.type")
    if kind in (None, "none"):
        return None
    out = {"rope_type": kind, "factor": float(m("rope.scaling.factor", 1.0))}
    if m("rope.scaling.original_context_length"):
        out["original_max_position_embeddings"] = int(m("rope.scaling.original_context_length"))
    return out


def _qwen2_config(cfg, m, g):
    cfg["attention_bias"] = "blk.0.attn_q.bias" in g.tensors


def _gemma3_config(cfg, m, g):
    # llama.cpp hard-codes these for gemma3 (llama-model.cpp); the GGUF carries only the window size.
    cfg["sliding_window"] = int(m("attention.sliding_window", 4096))
    cfg["sliding_window_pattern"] = 6
    cfg["rope_local_base_freq"] = 10000.0
    big = cfg["num_hidden_layers"] == 62  # 27B scales queries by hidden/heads, the others by head_dim
    cfg["query_pre_attn_scalar"] = cfg["hidden_size"] // cfg["num_attention_heads"] if big else cfg["head_dim"]
    cfg["hidden_activation"] = "gelu_pytorch_tanh"
    cfg["tie_word_embeddings"] = True


def _phi3_config(cfg, m, g):
    rot = m("rope.dimension_count")
    if rot:
        cfg["partial_rotary_factor"] = int(rot) / cfg["head_dim"]
    if m("attention.sliding_window"):
        cfg["sliding_window"] = int(m("attention.sliding_window"))
    if "rope_factors_long.weight" in g.tensors:
        cfg["rope_scaling"] = {
            "rope_type": "longrope",
            "long_factor": g.tensors["rope_factors_long.weight"].dequantize().tolist(),
            "short_factor": g.tensors["rope_factors_short.weight"].dequantize().tolist(),
        }
        cfg["original_max_position_embeddings"] = int(m("rope.scaling.original_context_length", 4096))


_ARCH_CONFIG = {"qwen2": _qwen2_config, "gemma3": _gemma3_config, "phi3": _phi3_config}


# ---------------------------------------------------------------- tensor names

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "model.rope_freqs",  # llama 3.1 rope scaling, stored as per-frequency divisors
}
_BLOCK_NAMES = {  # blk.N.<key> -> model.layers.N.<value>
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_ARCH_BLOCK_NAMES = {
    "gemma3": {"ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"},
    "phi3": {"ffn_up": "mlp.gate_up_proj"},  # phi3 stores gate and up as one tensor, gate first
}
_SKIP = {"rope_factors_long.weight", "rope_factors_short.weight"}  # consumed by to_config


def hf_name(arch: str, name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for tensors kiln does not load."""
    if name in _SKIP:
        return None
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4:
        table = {**_BLOCK_NAMES, **_ARCH_BLOCK_NAMES.get(arch, {})}
        if parts[2] in table:
            return f"model.layers.{parts[1]}.{table[parts[2]]}.{parts[3]}"
    return None


def hf_tensors(g: GGUFFile, cfg: dict) -> dict[str, GGUFTensor]:
    """Every loadable tensor under its Hugging Face name, with converter fix-ups undone (lazily)."""
    out = {}
    for name, t in g.tensors.items():
        hf = hf_name(cfg["model_type"], name)
        if hf is None:
            if name not in _SKIP:
                raise KilnError(f"{g.path}: tensor {name!r} is not known for architecture "
                                f"{cfg['model_type']!r}; the file may be for a different model")
            continue
        out[hf] = _fix_up(cfg, hf, t)
    return out


def _fix_up(cfg: dict, hf: str, t: GGUFTensor) -> GGUFTensor:
    arch = cfg["model_type"]
    if arch == "llama" and (".q_proj." in hf or ".k_proj." in hf):
        heads = cfg["num_attention_heads"] if ".q_proj." in hf else cfg["num_key_value_heads"]
        t = GGUFTensor(t.name, t.shape, t.qtype, t.data, row_perm=_unpermute_rows(t.shape[0], heads))
    if arch == "gemma3" and hf.endswith("norm.weight"):
        t = GGUFTensor(t.name, t.shape, t.qtype, t.data, add=-1.0)
    return t


def _unpermute_rows(n_rows: int, n_heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation (HF's rotate-half → GGML's interleaved pairs).

    The converter did w.reshape(H, 2, D/2, ...).swapaxes(1, 2): GGUF row (h, i, j) holds HF row (h, j, i).
    """
    half = n_rows // n_heads // 2
    gguf_rows = torch.arange(n_rows).view(n_heads, half, 2)  # GGUF row index laid out as (h, i, j)
    return gguf_rows.transpose(1, 2).reshape(-1)  # HF row (h, j, i) ← GGUF row (h, i, j)
