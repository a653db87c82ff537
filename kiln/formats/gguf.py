"""GGUF files: header, metadata, tensor map, GGUF→Hugging Face names, q/k un-permute.

Owns: parsing a GGUF v2/v3 file into (metadata dict, tensor infos over an mmap), turning the metadata
into a Hugging Face style config dict, and naming every tensor by its Hugging Face name, with the
per-architecture fix-ups llama.cpp's converter applied undone (q/k row permutation for llama, +1 on
Gemma norm weights); `write_file`, the last step of every GGUF file kiln writes.
Not: dequantization (quant/), building the model (load.py), the vocabulary (tokenizer.py reads `meta`).

Model files are untrusted input: every count, length, shape, offset and the alignment declared in the
header is checked against the file before it is used, as strictly as llama.cpp checks them, and metadata
the config needs is checked for type and range; anything wrong is one KilnError that names it
(tests/test_fuzz_formats.py fuzzes this).

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

from kiln.errors import KilnError, short

MAGIC = b"GGUF"
_U64 = struct.Struct("<Q")
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
    mapped: bool = False  # data is a view of read_gguf's file mapping (release() may drop its pages)

    def raw_rows(self) -> torch.Tensor:
        """The packed bytes as (rows, row_bytes), with the row permutation applied."""
        rows = self.data.view(-1, self.data.numel() // max(1, math.prod(self.shape[:-1])))
        return rows if self.row_perm is None else rows[self.row_perm]

    def release(self) -> None:
        """Drop this tensor's pages of the file from memory once a copy of it is made (the compact CPU
        load): they are read from the file again if touched, and a load's peak RSS stays near the
        compact size instead of the compact size plus the whole file."""
        if self.mapped:
            release_pages(self.data)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        from kiln.quant import dequantize
        w = dequantize(self.raw_rows().reshape(-1), self.qtype, self.shape, dtype=dtype)
        return w + self.add if self.add else w


def release_pages(t: torch.Tensor) -> None:
    """madvise(DONTNEED) over the whole pages inside t, a view of the copy-on-write file mapping that
    nothing writes (so the pages come back from the file, unchanged, when read again), or memory that is
    never read again (anonymous pages come back as zeros: quant/cpu._to_huge_pages's moved tensors); a
    no-op where that is not Linux."""
    if not hasattr(mmap, "MADV_DONTNEED") or t.numel() == 0 or not os.uname().sysname == "Linux":
        return
    import ctypes
    page = mmap.PAGESIZE
    lo = -(-t.data_ptr() // page) * page  # inward: no byte outside t
    hi = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    if hi <= lo:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), ctypes.c_int(mmap.MADV_DONTNEED))


@dataclass
class GGUFFile:
    path: str
    version: int
    meta: dict = field(repr=False)
    tensors: dict[str, GGUFTensor] = field(repr=False)

    @property
    def arch(self) -> str:
        return self.meta.get("general.architecture", "?")


_MAX_DIMS = 4  # GGML_MAX_DIMS: llama.cpp refuses tensors with more
_MAX_KEY = 2**16 - 1  # the GGUF spec's longest metadata key
_MAX_NAME = 64  # the GGUF spec's longest tensor name (llama.cpp's GGML_MAX_NAME)
_INT64_MAX = 2**63 - 1
_MIN_KV_BYTES = 8 + 4 + 1  # the smallest metadata entry: empty key, type, one-byte value
_MIN_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # the smallest tensor info: empty name, one dimension, type, offset


class _Cursor:
    """Little-endian reader over the file's bytes.

    Every read is checked against the bytes left before anything is read or allocated, and every declared
    count is bounded by what the rest of the file could hold, so a corrupt file fails at once with a
    KilnError that says which field is wrong, never with a huge allocation or a long loop.
    """

    def __init__(self, buf, path: str):
        self.buf, self.view, self.pos, self.end, self.path = buf, memoryview(buf), 0, len(buf), path

    def corrupt(self, what: str) -> KilnError:
        return KilnError(f"{self.path}: {what}; the file is truncated or corrupt, re-download it")

    def take(self, n: int, what: str):
        if n > self.end - self.pos:
            raise self.corrupt(f"{what} needs {n} bytes at byte {self.pos} but the file ends at byte {self.end}")
        out = self.view[self.pos:self.pos + n]  # no copy: a long string is decoded straight from the file
        self.pos += n
        return out

    def scalar(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def count(self, what: str, item_bytes: int) -> int:
        """A declared number of items, refused when the bytes left cannot hold that many."""
        n = self.scalar("<Q", what)
        if n * item_bytes > self.end - self.pos:
            raise self.corrupt(f"{what} is {n}, more than the {self.end - self.pos} bytes left can hold")
        return n

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.scalar("<Q", f"the length of {what}")
        if limit is not None and n > limit:  # the GGUF spec's limits on keys and tensor names
            raise self.corrupt(f"{what} is {n} bytes long; GGUF allows at most {limit}")
        return str(self.take(n, what), "utf-8", "replace")

    def strings(self, n: int, what: str) -> list[str]:
        """`n` length-prefixed strings (a vocabulary: the hot loop of opening a file): in bulk where
        `bulk_strings` can, else one by one, which also names whatever is wrong."""
        found = bulk_strings(self.buf, self.pos, self.end, n)
        if found is None:
            return self.strings_one_by_one(n, what)
        out, self.pos = found
        return out

    def strings_one_by_one(self, n: int, what: str) -> list[str]:
        """The slow twin of `bulk_strings`: a Python step per string, each checked against the bytes left."""
        buf, pos, end, unpack = self.buf, self.pos, self.end, _U64.unpack_from
        out = []
        for i in range(n):
            if pos + 8 > end:
                break
            m = unpack(buf, pos)[0]
            pos += 8
            if m > end - pos:
                self.pos = pos - 8
                raise self.corrupt(f"string {i} of {what} is {m} bytes long but the file ends {end - pos} bytes "
                                   f"later")
            out.append(str(buf[pos:pos + m], "utf-8", "replace"))
            pos += m
        self.pos = pos
        if len(out) < n:
            raise self.corrupt(f"{what} declares {n} strings but the file ends after {len(out)}")
        return out

    def value(self, vtype: int, what: str):
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.ARRAY:
            etype = self.scalar("<I", f"the element type of {what}")
            if etype == GGUFValueType.ARRAY:  # llama.cpp refuses these too
                raise self.corrupt(f"{what} is an array of arrays, which GGUF readers do not accept")
            if etype == GGUFValueType.STRING:
                return self.strings(self.count(f"the length of {what}", 8), what)
            if etype not in _SCALARS:
                raise self.corrupt(f"{what} is an array of unknown value type {etype}")
            dt = np.dtype(_SCALARS[etype][1]).newbyteorder("<")
            n = self.count(f"the length of {what}", dt.itemsize)
            return np.frombuffer(self.take(n * dt.itemsize, what), dtype=dt).tolist()
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype][0], what)
        raise self.corrupt(f"{what} has unknown value type {vtype}")


_BULK_MIN = 256  # fewer strings than this are read one by one: numpy's fixed costs would not pay
_BULK_MAX_AVG = 256  # bytes a string on average past which bulk_strings gives up (its scan would be too big)
_BULK_MAX_BYTES = 1 << 25  # nor scans more bytes (a 262k-token vocabulary takes 4 MB), whatever a count declares


def bulk_strings(buf, pos: int, end: int, n: int) -> tuple[list[str], int] | None:
    """`n` GGUF strings (each a u64 byte length, then UTF-8 bytes) from `buf[pos:end]` with no Python step per
    string, and the position after them; None where the one-by-one reader must do it.

    Where each string starts is guessed from the bytes, then proven. A length below 2**32 ends in four zero
    bytes, and a string that neither is empty nor starts with a zero byte begins right after, so each length
    is the last position p whose bytes p+4..p+7 are zero. The guesses stand only if the first is at `pos` and
    each next one is its predecessor's start + 8 + length: that chain is exactly what the one-by-one reader
    walks. The lengths' bytes are then zeroed and everything decoded at once and split at each eight zeros.
    None when the chain breaks, a string holds a zero byte or invalid UTF-8 (the one-by-one reader's "replace"
    decides what those read as), or the strings do not fit the bytes (it names what is wrong).
    """
    if n < _BULK_MIN:
        return None
    limit = min(end - pos, 64 + _BULK_MAX_AVG * n, _BULK_MAX_BYTES)
    size = min(limit, 64 + 24 * n)
    while True:
        region = np.frombuffer(buf, np.uint8, size, pos)
        try:
            found = _string_starts(region, n)
            break
        except _Short:
            if size >= limit:
                return None
            size = min(limit, size * 4)
    if found is None:
        return None
    starts, stop = found
    body = region[:stop].copy()
    for k in range(8):
        body[starts + k] = 0
    try:
        text = str(body.data, "utf-8")
    except UnicodeDecodeError:
        return None
    if text.count("\0") != 8 * n:  # a string holds a zero byte
        return None
    return text.split("\0" * 8)[1:], pos + stop


class _Short(Exception):
    """The bytes looked at end before the strings do."""


def _string_starts(region: np.ndarray, n: int) -> tuple[np.ndarray, int] | None:
    """(where each of the first `n` strings in `region` starts, where the last ends) once proven; None when the
    guess fails; _Short when `region` ends too soon to tell."""
    if len(region) < 16:
        raise _Short
    zero = region == 0
    four = zero[4:-3] & zero[5:-2] & zero[6:-1] & zero[7:]  # four[p]: bytes p+4..p+7 are zero
    starts = np.flatnonzero(four[:-1] & ~four[1:])[:n]
    if len(starts) < n:
        raise _Short
    stops = starts + 8  # + each length, below 2**32: its top four bytes are zero
    for k in range(4):
        stops += region[starts + k].astype(np.int64) << (8 * k)
    if starts[0] != 0 or not np.array_equal(stops[:-1], starts[1:]):
        return None
    if stops[-1] > len(region):
        raise _Short
    return starts, int(stops[-1])


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse the header of a GGUF file and map its tensors without reading them (every declared count, length,
    shape, offset and the alignment checked first: see the module docstring)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise KilnError(f"cannot open {path}: {e}") from None
    if len(buf) < 4 or bytes(buf[:4]) != MAGIC:
        raise KilnError(f"{path} is not a GGUF file (magic {bytes(buf[:4])!r}, expected {MAGIC!r})")
    cur = _Cursor(buf, path)
    cur.take(4, "the magic")
    version = cur.scalar("<I", "the version")
    if version not in (2, 3):
        raise KilnError(f"{path}: GGUF version {version} is not supported (kiln reads v2 and v3)")
    n_tensors = cur.count("the number of tensors", _MIN_INFO_BYTES)
    n_kv = cur.count("the number of metadata entries", _MIN_KV_BYTES)
    meta = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key {i}", _MAX_KEY)
        label = short(key)
        if key in meta:
            raise cur.corrupt(f"metadata key {label} appears twice")
        meta[key] = cur.value(cur.scalar("<I", f"the type of metadata {label}"), f"metadata {label}")
    infos = [_tensor_info(cur, i) for i in range(n_tensors)]
    align = _alignment(cur, meta)
    start = (cur.pos + align - 1) // align * align
    return GGUFFile(path, version, meta, _map_tensors(cur, infos, start, align))


def _alignment(cur: _Cursor, meta: dict) -> int:
    align = meta.get("general.alignment", 32)
    if type(align) is not int or align <= 0 or align & (align - 1):
        raise cur.corrupt(f"general.alignment is {short(align)}, not a power of two")
    return align


def _tensor_info(cur: _Cursor, i: int):
    name = cur.string(f"the name of tensor {i}", _MAX_NAME)
    n_dims = struct.unpack("<I", cur.take(4, f"the tensor info of {short(name)}"))[0]
    if not 1 <= n_dims <= _MAX_DIMS:
        raise cur.corrupt(f"tensor {short(name)} has {n_dims} dimensions (GGUF allows 1 to {_MAX_DIMS})")
    *dims, qtype, offset = struct.unpack(f"<{n_dims}QIQ", cur.take(8 * n_dims + 12, f"the tensor info of {name}"))
    if not all(0 < d <= _INT64_MAX for d in dims) or math.prod(dims) > _INT64_MAX:
        raise cur.corrupt(f"tensor {short(name)} has shape {dims}: every dimension must be positive and their "
                          f"product fit in 64 bits")
    return name, tuple(reversed(dims)), qtype, offset


def _map_tensors(cur: _Cursor, infos, start: int, align: int) -> dict[str, GGUFTensor]:
    """Views of each tensor's bytes, once every tensor is known to lie inside the file, alone."""
    spans = {}
    for name, shape, qtype, offset in infos:
        label = short(name)
        if name in spans:
            raise cur.corrupt(f"tensor {label} appears twice")
        if offset % align:
            raise cur.corrupt(f"tensor {label} starts at offset {offset}, not a multiple of the alignment {align}")
        lo, n = start + offset, _nbytes(cur.path, label, qtype, shape)
        if lo + n > cur.end:
            raise cur.corrupt(f"tensor {label} needs bytes {lo}..{lo + n} but the file has {cur.end}")
        spans[name] = (lo, lo + n)
    ordered = sorted(spans.items(), key=lambda kv: kv[1])
    for (a, (_, a_hi)), (b, (b_lo, _)) in zip(ordered, ordered[1:]):
        if b_lo < a_hi:
            raise cur.corrupt(f"tensors {short(a)} and {short(b)} overlap in the file")
    base = torch.from_numpy(np.memmap(cur.path, dtype=np.uint8, mode="c")) if infos else None  # copy-on-write
    return {name: GGUFTensor(name, shape, qtype, base[slice(*spans[name])], mapped=True) for name, shape, qtype, _ in infos}


def _nbytes(path: str, label: str, qtype: int, shape: tuple[int, ...]) -> int:
    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    except (ValueError, KeyError):
        raise KilnError(f"{path}: tensor {label} has unknown tensor type id {qtype}; this file needs a "
                        f"newer kiln or is corrupt") from None
    if shape[-1] % block:
        raise KilnError(f"{path}: tensor {label} row length {shape[-1]} is not a multiple of its "
                        f"block size {block}; the file is corrupt")
    return math.prod(shape) // block * size


def write_file(writer, tmp, out) -> None:
    """Write what a gguf.GGUFWriter holds to its file `tmp` (a Path), then rename it `out`: an interrupted write
    leaves no half file under the real name (nor the temporary one)."""
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- metadata → Hugging Face config

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gemma3", "phi3")


def to_config(g: GGUFFile) -> dict:
    """A Hugging Face config.json-style dict from GGUF metadata, every value checked for type and range."""
    arch = g.arch
    if arch not in SUPPORTED_ARCHS:
        raise KilnError(f"{g.path}: architecture {short(arch)} is not supported "
                        f"(kiln runs: {', '.join(SUPPORTED_ARCHS)})")
    m = _Meta(g, arch)
    n_heads, hidden = m.int("attention.head_count"), m.int("embedding_length")
    cfg = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": m.int("block_count"),
        "intermediate_size": m.int("feed_forward_length"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": m.int("attention.head_count_kv", n_heads),
        "head_dim": m.int("attention.key_length", max(1, hidden // n_heads)),
        "rms_norm_eps": m.float("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": m.float("rope.freq_base", 10000.0),
        "max_position_embeddings": m.int("context_length", 4096),
        "vocab_size": _vocab_size(g),
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "bos_token_id": g.meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": g.meta.get("tokenizer.ggml.eos_token_id"),
    }
    scaling = _rope_scaling(m)
    if scaling:
        cfg["rope_scaling"] = scaling
    _ARCH_CONFIG.get(arch, lambda c, m, g: None)(cfg, m, g)
    return cfg


class _Meta:
    """`{arch}.*` metadata read as the type the config needs; a missing or mistyped value is a KilnError."""

    def __init__(self, g: GGUFFile, arch: str):
        self.g, self.arch = g, arch

    def get(self, key: str, default=None):
        return self.g.meta.get(f"{self.arch}.{key}", default)

    def int(self, key: str, default=None) -> int:
        v = self.get(key, default)
        if type(v) is not int or v <= 0:  # bool is not a count
            raise self._bad(key, v, "a positive integer")
        return v

    def float(self, key: str, default=None) -> float:
        v = self.get(key, default)
        if type(v) not in (int, float) or not math.isfinite(v) or v <= 0:
            raise self._bad(key, v, "a positive number")
        return float(v)

    def _bad(self, key: str, v, what: str) -> KilnError:
        if v is None:
            return KilnError(f"{self.g.path}: metadata {self.arch}.{key} is missing; the file is incomplete")
        return KilnError(f"{self.g.path}: metadata {self.arch}.{key} is {short(v)}, not {what}; the file is corrupt")


def _vocab_size(g: GGUFFile) -> int:
    tokens = g.meta.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and tokens:
        return len(tokens)
    if "token_embd.weight" not in g.tensors:
        raise KilnError(f"{g.path} has neither a vocabulary nor a token_embd.weight tensor; the file is incomplete")
    return g.tensors["token_embd.weight"].shape[0]


def _rope_scaling(m: _Meta) -> dict | None:
    kind = m.get("rope.scaling.type")
    if kind in (None, "none") or (kind == "longrope" and m.arch == "phi3"):  # phi3: from its factor tensors
        return None
    if kind != "linear":
        raise KilnError(f"{m.g.path}: rope scaling type {short(kind)} is not supported (kiln reads 'linear' "
                        f"from GGUF files)")
    out = {"rope_type": kind, "factor": m.float("rope.scaling.factor", 1.0)}
    if m.get("rope.scaling.original_context_length") is not None:
        out["original_max_position_embeddings"] = m.int("rope.scaling.original_context_length")
    return out


def _qwen2_config(cfg, m, g):
    cfg["attention_bias"] = "blk.0.attn_q.bias" in g.tensors


def _gemma3_config(cfg, m, g):
    # llama.cpp hard-codes these for gemma3 (llama-model.cpp); the GGUF carries only the window size.
    cfg["sliding_window"] = m.int("attention.sliding_window", 4096)
    cfg["sliding_window_pattern"] = 6
    cfg["rope_local_base_freq"] = 10000.0
    big = cfg["num_hidden_layers"] == 62  # 27B scales queries by hidden/heads, the others by head_dim
    cfg["query_pre_attn_scalar"] = cfg["hidden_size"] // cfg["num_attention_heads"] if big else cfg["head_dim"]
    cfg["hidden_activation"] = "gelu_pytorch_tanh"
    cfg["tie_word_embeddings"] = True


def _phi3_config(cfg, m, g):
    if m.get("rope.dimension_count") is not None:
        rot = m.int("rope.dimension_count")
        if rot > cfg["head_dim"] or rot % 2:
            raise KilnError(f"{g.path}: metadata phi3.rope.dimension_count is {rot}, not an even number up to the "
                            f"head size {cfg['head_dim']}; the file is corrupt")
        cfg["partial_rotary_factor"] = rot / cfg["head_dim"]
    if m.get("attention.sliding_window"):
        cfg["sliding_window"] = m.int("attention.sliding_window")
    if "rope_factors_long.weight" in g.tensors:
        rot = round(cfg.get("partial_rotary_factor", 1.0) * cfg["head_dim"])
        cfg["rope_scaling"] = {
            "rope_type": "longrope",
            "long_factor": _rope_factors(g, "rope_factors_long.weight", rot // 2),
            "short_factor": _rope_factors(g, "rope_factors_short.weight", rot // 2),
        }
        cfg["original_max_position_embeddings"] = m.int("rope.scaling.original_context_length", 4096)


def _rope_factors(g: GGUFFile, name: str, n: int) -> list[float]:
    t = g.tensors.get(name)
    if t is None or t.shape != (n,):
        raise KilnError(f"{g.path}: tensor {name} has shape {t and t.shape}, expected ({n},); the file is corrupt")
    return t.dequantize().tolist()


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


def gguf_name(arch: str, hf: str) -> str | None:
    """The GGUF name of a Hugging Face tensor name (hf_name's inverse), or None for names GGUF has not."""
    glob = {v: k for k, v in _GLOBAL_NAMES.items()}
    if hf in glob:
        return glob[hf]
    parts = hf.split(".")
    if len(parts) < 5 or parts[:2] != ["model", "layers"]:
        return None
    table = {v: k for k, v in {**_BLOCK_NAMES, **_ARCH_BLOCK_NAMES.get(arch, {})}.items()}
    key = table.get(".".join(parts[3:-1]))
    return None if key is None else f"blk.{parts[2]}.{key}.{parts[-1]}"


def permute_rows(cfg: dict, hf: str, t: torch.Tensor) -> torch.Tensor:
    """Rows of a Hugging Face q/k projection (or of anything added to one, such as a LoRA B) in the order
    llama.cpp's converter stores them for `cfg`'s architecture (_fix_up's inverse); other tensors as given."""
    if cfg["model_type"] != "llama" or not (".q_proj." in hf or ".k_proj." in hf):
        return t
    heads = cfg["num_attention_heads"] if ".q_proj." in hf else cfg["num_key_value_heads"]
    out = torch.empty_like(t)
    out[_unpermute_rows(t.shape[0], heads)] = t
    return out


def hf_tensors(g: GGUFFile, cfg: dict) -> dict[str, GGUFTensor]:
    """Every loadable tensor under its Hugging Face name, with converter fix-ups undone (lazily)."""
    out = {}
    for name, t in g.tensors.items():
        hf = hf_name(cfg["model_type"], name)
        if hf is None:
            if name not in _SKIP:
                raise KilnError(f"{g.path}: tensor {short(name)} is not known for architecture "
                                f"{cfg['model_type']!r}; the file may be for a different model")
            continue
        out[hf] = _fix_up(cfg, hf, t)
    return out


def _fix_up(cfg: dict, hf: str, t: GGUFTensor) -> GGUFTensor:
    arch = cfg["model_type"]
    if arch == "llama" and (".q_proj." in hf or ".k_proj." in hf):
        heads = cfg["num_attention_heads"] if ".q_proj." in hf else cfg["num_key_value_heads"]
        if t.shape[0] % (2 * heads):
            raise KilnError(f"tensor {t.name} has {t.shape[0]} rows, which {heads} heads of even size cannot "
                            f"split; config and weights disagree")
        t = GGUFTensor(t.name, t.shape, t.qtype, t.data, row_perm=_unpermute_rows(t.shape[0], heads),
                       mapped=t.mapped)
    if arch == "gemma3" and hf.endswith("norm.weight"):
        t = GGUFTensor(t.name, t.shape, t.qtype, t.data, add=-1.0, mapped=t.mapped)
    return t


def _unpermute_rows(n_rows: int, n_heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation (HF's rotate-half → GGML's interleaved pairs).

    The converter did w.reshape(H, 2, D/2, ...).swapaxes(1, 2): GGUF row (h, i, j) holds HF row (h, j, i).
    """
    half = n_rows // n_heads // 2
    gguf_rows = torch.arange(n_rows).view(n_heads, half, 2)  # GGUF row index laid out as (h, i, j)
    return gguf_rows.transpose(1, 2).reshape(-1)  # HF row (h, j, i) ← GGUF row (h, i, j)
