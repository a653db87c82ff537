"""Model files are untrusted input: fuzzed GGUF and safetensors files must each end in one KilnError, quickly.

The GGUF base file is built from the real Qwen2.5-Coder-0.5B header: every metadata entry in its own order
and value type (chat template included), all 291 tensor infos with their names, shapes and types, and the
vocabulary cut to its first tokens plus the 22 special ones (the full 152k-token vocabulary takes ~1 s to
parse, too slow for thousands of cases; a handful of cases below also truncate the real header itself).
The two vocabulary-sized tensors shrink to match, offsets are laid out again, and the data section is a
sparse run of zeros, so the file has the real layout at a few hundred kB on disk. Unmutated it loads
(config, weights, tokenizer, the model on the meta device); each case mutates it — bit flips and special
values in every field, truncation at every field, duplicated or dropped entries, retyped values, absurd
counts, sizes, dims, offsets, alignments, nested arrays — and runs what `kiln.load` runs up to building
the model on the meta device. Every case must be accepted or raise KilnError, within a time budget, with
no other exception and bounded memory. The safetensors fuzz does the same to a tiny folder.

The cases run in a child process (so a crash or a hang is caught and named, and its memory measured).
Each case is seeded by (seed, index): a failure prints the seed and the mutation to reproduce it with
    PYTHONPATH=. python tests/test_fuzz_formats.py gguf --seed SEED --case INDEX
and a long run is
    PYTHONPATH=. nice -n 19 python tests/test_fuzz_formats.py gguf --cases 50000 --seed 1
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import resource
import struct
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CASE_SECONDS = 5.0  # a case slower than this is a hang
RSS_GROWTH_MB = 1024  # peak memory a whole run may add over the unmutated base's load

# GGUF value types (the spec's numbering) and their sizes
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q",
        I64: "<q", F64: "<d"}
_QUANT = {0: (1, 4), 1: (1, 2), 6: (32, 22), 8: (32, 34), 12: (256, 144), 14: (256, 210)}  # F32 F16 Q5_0 Q8_0 Q4_K Q6_K
KEEP_TOKENS = 1000  # normal tokens kept from the real vocabulary (the 22 special ones are kept too)


# --------------------------------------------------------------------------------------------------- GGUF model
# A GGUF header as data, parsed and written here independently of kiln's reader.

@dataclass
class Header:
    version: int
    kvs: list  # [key, vtype, payload bytes]
    tensors: list  # [name, dims (GGUF order), qtype, offset]
    align: int = 32
    data_size: int = 0


def _walk_value(buf: bytes, pos: int, vtype: int) -> int:
    """Position after one value of `vtype` at `pos`."""
    if vtype == STRING:
        return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
    if vtype == ARRAY:
        etype, n = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if etype in _FMT:
            return pos + n * struct.calcsize(_FMT[etype])
        for _ in range(n):
            pos = _walk_value(buf, pos, etype)
        return pos
    return pos + struct.calcsize(_FMT[vtype])


def parse_header(buf: bytes) -> Header:
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    pos, kvs, tensors = 24, [], []
    for _ in range(n_kv):
        n = struct.unpack_from("<Q", buf, pos)[0]
        key = buf[pos + 8:pos + 8 + n].decode()
        vtype = struct.unpack_from("<I", buf, pos + 8 + n)[0]
        start = pos + 12 + n
        pos = _walk_value(buf, start, vtype)
        kvs.append([key, vtype, buf[start:pos]])
    for _ in range(n_tensors):
        n = struct.unpack_from("<Q", buf, pos)[0]
        name = buf[pos + 8:pos + 8 + n].decode()
        pos += 8 + n
        n_dims = struct.unpack_from("<I", buf, pos)[0]
        dims = list(struct.unpack_from(f"<{n_dims}Q", buf, pos + 4))
        qtype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        tensors.append([name, dims, qtype, offset])
    return Header(version, kvs, tensors)


def _string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def string_array(items) -> bytes:
    return struct.pack("<IQ", STRING, len(items)) + b"".join(_string(s) for s in items)


def scalar_array(etype: int, items) -> bytes:
    return struct.pack("<IQ", etype, len(items)) + b"".join(struct.pack(_FMT[etype], v) for v in items)


def tensor_bytes(dims, qtype) -> int:
    block, size = _QUANT.get(qtype, (1, 1))
    n = 1
    for d in dims:
        n *= d
    return n // block * size


def layout(h: Header) -> None:
    """Offsets packed one after another, aligned, as writers lay them out; sets the data size."""
    off = 0
    for t in h.tensors:
        t[3] = off
        off += -(-tensor_bytes(t[1], t[2]) // h.align) * h.align
    h.data_size = off


class Writer:
    """Serializes a Header and records where each integer field and each value landed."""

    def __init__(self):
        self.out, self.fields, self.bounds = bytearray(), [], []

    def int(self, fmt: str, v: int, label: str):
        self.fields.append((len(self.out), fmt, label))
        self.out += struct.pack(fmt, v % 2**(8 * struct.calcsize(fmt)))  # unsigned: wraps as C would

    def blob(self, b: bytes, label: str):
        self.bounds.append((len(self.out), label))
        self.out += b

    def string(self, s: str, label: str):
        self.int("<Q", len(s.encode()), f"length of {label}")
        self.blob(s.encode(), label)


def serialize(h: Header, n_tensors: int | None = None, n_kv: int | None = None) -> Writer:
    w = Writer()
    w.blob(b"GGUF", "magic")
    w.int("<I", h.version, "version")
    w.int("<Q", len(h.tensors) if n_tensors is None else n_tensors, "tensor count")
    w.int("<Q", len(h.kvs) if n_kv is None else n_kv, "metadata count")
    for key, vtype, payload in h.kvs:
        w.string(key, f"key {key}")
        w.int("<I", vtype, f"type of {key}")
        if vtype == ARRAY and len(payload) >= 12:
            w.int("<I", struct.unpack_from("<I", payload)[0], f"element type of {key}")
            w.int("<Q", struct.unpack_from("<Q", payload, 4)[0], f"length of {key}")
            w.blob(payload[12:], f"elements of {key}")
            _string_fields(w, payload, key)
        elif vtype == STRING and len(payload) >= 8:
            w.int("<Q", struct.unpack_from("<Q", payload)[0], f"length of {key}")
            w.blob(payload[8:], f"value of {key}")
        else:
            w.fields.append((len(w.out), _FMT.get(vtype, "<B"), f"value of {key}"))
            w.blob(payload, f"value of {key}")
    for name, dims, qtype, offset in h.tensors:
        w.string(name, f"name of {name}")
        w.int("<I", len(dims), f"n_dims of {name}")
        for i, d in enumerate(dims):
            w.int("<Q", d, f"dim {i} of {name}")
        w.int("<I", qtype, f"type of {name}")
        w.int("<Q", offset, f"offset of {name}")
    w.blob(b"", "end of header")
    return w


def _string_fields(w: Writer, payload: bytes, key: str, sample: int = 12):
    """Record the length fields of the first few strings of a string array (targets for mutations)."""
    if struct.unpack_from("<I", payload)[0] != STRING:
        return
    base, pos = len(w.out) - len(payload) + 12, 12
    for i in range(min(sample, struct.unpack_from("<Q", payload, 4)[0])):
        if pos + 8 > len(payload):
            return
        w.fields.append((base + pos - 12, "<Q", f"length of string {i} of {key}"))
        pos += 8 + struct.unpack_from("<Q", payload, pos)[0]


def file_bytes(h: Header, w: Writer) -> tuple[bytes, int]:
    """(header bytes, total file size): data starts at the next multiple of the alignment."""
    start = -(-len(w.out) // h.align) * h.align
    return bytes(w.out), start + h.data_size


def real_header(path: Path) -> Header:
    """The real file's header, read in growing chunks (its vocabulary makes it ~6 MB)."""
    size = 1 << 22
    with open(path, "rb") as f:
        while True:
            f.seek(0)
            buf = f.read(size)
            try:
                return parse_header(buf)
            except (struct.error, UnicodeDecodeError):
                if len(buf) < size:
                    raise
                size *= 2


def base_header(real: Header) -> Header:
    """The fuzz base: the real header with a cut vocabulary (see the module docstring)."""
    h = copy.deepcopy(real)
    kv = {k: (t, p) for k, t, p in h.kvs}
    tokens = _strings(kv["tokenizer.ggml.tokens"][1])
    types = list(struct.unpack_from(f"<{len(tokens)}i", kv["tokenizer.ggml.token_type"][1], 12))
    special = [i for i, t in enumerate(types) if t in (3, 4)]  # CONTROL, USER_DEFINED
    keep = list(range(KEEP_TOKENS)) + special
    new_id = {old: new for new, old in enumerate(keep)}
    kept = [tokens[i] for i in keep]
    vocab = set(kept)
    merges = [m for m in _strings(kv["tokenizer.ggml.merges"][1])[:4 * KEEP_TOKENS]
              if " " in m and all(p in vocab for p in (*m.split(" ", 1), m.replace(" ", "", 1)))]
    for entry in h.kvs:
        key = entry[0]
        if key == "tokenizer.ggml.tokens":
            entry[2] = string_array(kept)
        elif key == "tokenizer.ggml.token_type":
            entry[2] = scalar_array(I32, [types[i] for i in keep])
        elif key == "tokenizer.ggml.merges":
            entry[2] = string_array(merges)
        elif key.endswith("_token_id"):
            entry[2] = struct.pack("<I", new_id[struct.unpack("<I", entry[2])[0]])
    for t in h.tensors:
        if t[0] in ("token_embd.weight", "output.weight"):
            t[1][1] = len(keep)
    layout(h)
    return h


def _strings(payload: bytes) -> list[str]:
    n, pos, out = struct.unpack_from("<Q", payload, 4)[0], 12, []
    for _ in range(n):
        m = struct.unpack_from("<Q", payload, pos)[0]
        out.append(payload[pos + 8:pos + 8 + m].decode("utf-8", "replace"))
        pos += 8 + m
    return out


# --------------------------------------------------------------------------------------------------- mutations
# Each takes (rng, base Header, its Writer) and returns (header bytes, file size, description).

SPECIAL_INTS = [0, 1, 2, 3, 7, 31, 33, 64, 255, 4096, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62,
                2**63 - 1, 2**63, 2**64 - 1]


def _special(rng, fmt: str, old: int, left: int) -> int:
    bits = 8 * struct.calcsize(fmt)
    v = rng.choice(SPECIAL_INTS + [old + 1, old - 1, old * 2, old // 2, left, left + 1, left // 8,
                                   rng.getrandbits(bits)])
    v %= 2**bits
    return v - 2**bits if fmt.islower() and v >= 2**(bits - 1) else v  # signed formats


def m_set_field(rng, h, w):
    off, fmt, label = rng.choice(w.fields)
    out = bytearray(w.out)
    if fmt in ("<f", "<d"):
        v = rng.choice([float("nan"), float("inf"), -1.0, 0.0, 1e38, 1e-45])
    elif fmt == "<?":
        v = rng.choice([True, False])
    else:
        v = _special(rng, fmt, struct.unpack_from(fmt, out, off)[0], len(out) - off)
    struct.pack_into(fmt, out, off, v)
    size = file_bytes(h, w)[1]
    return bytes(out), size, f"set {label} (byte {off}) to {v}"


def m_flip_field(rng, h, w):
    off, fmt, label = rng.choice(w.fields)
    bit = rng.randrange(8 * struct.calcsize(fmt))
    out = bytearray(w.out)
    out[off + bit // 8] ^= 1 << (bit % 8)
    return bytes(out), file_bytes(h, w)[1], f"flip bit {bit} of {label} (byte {off})"


def m_flip_anywhere(rng, h, w):
    out = bytearray(w.out)
    k = rng.choice([1, 1, 2, 8])
    where = sorted(rng.randrange(len(out)) for _ in range(k))
    for off in where:
        out[off] ^= 1 << rng.randrange(8)
    return bytes(out), file_bytes(h, w)[1], f"flip {k} random bits at bytes {where}"


def m_truncate(rng, h, w):
    points = [off for off, _, _ in w.fields] + [off for off, _ in w.bounds]
    cut = max(0, rng.choice(points) + rng.choice([0, 0, 1, 3, -1, 5]))
    header, size = file_bytes(h, w)
    if rng.random() < 0.15:  # inside the data section
        cut = rng.randrange(len(header), size)
        return header, cut, f"truncate the file at byte {cut} (in the tensor data)"
    return header[:cut], cut, f"truncate the file at byte {cut}"


def _restructure(rng, h: Header) -> str:
    """Mutate a copy of the header structurally; returns the description."""
    kv = rng.randrange(len(h.kvs))
    key = h.kvs[kv][0]
    t = rng.randrange(len(h.tensors))
    name = h.tensors[t][0]
    choice = rng.randrange(22)
    if choice == 0:
        h.kvs.insert(kv + 1, list(h.kvs[kv]))
        return f"metadata {key} declared twice"
    if choice == 1:
        del h.kvs[kv]
        return f"metadata {key} dropped"
    if choice == 2:
        new = rng.choice([U8, I8, U32, I32, F32, BOOL, STRING, U64, I64, F64, 13, 2**31])
        h.kvs[kv][1] = new
        return f"metadata {key} retyped to {new} (payload kept)"
    if choice == 3:
        value = _odd_value(rng)
        h.kvs[kv][1:] = value[:2]
        return f"metadata {key} replaced by {value[2]}"
    if choice == 4:
        arch_key = rng.choice(["qwen2.embedding_length", "qwen2.block_count", "qwen2.feed_forward_length",
                               "qwen2.attention.head_count", "qwen2.attention.head_count_kv",
                               "qwen2.context_length", "qwen2.attention.key_length"])
        v = rng.choice([0, 1, 3, 7, 2**20, 2**31 - 1, 2**32 - 1, 2**40, 2**63 - 1, 2**64 - 1])
        _set_kv(h, arch_key, U64, struct.pack("<Q", v))
        return f"metadata {arch_key} set to {v}"
    if choice == 5:
        depth = rng.choice([2, 3, 50, 5000])
        payload = scalar_array(U8, [1, 2])
        for _ in range(depth - 1):
            payload = struct.pack("<IQ", ARRAY, 1) + payload
        h.kvs[kv][1:] = [ARRAY, payload]
        return f"metadata {key} replaced by arrays nested {depth} deep"
    if choice == 6:
        align = rng.choice([0, 1, 3, 6, 48, 64, 2**31, 2**32 - 1])
        vtype = rng.choice([U32, U32, U64, I32, STRING, F32])
        payload = _string(str(align)) if vtype == STRING else struct.pack(_FMT[vtype], float(align) if vtype == F32
                                                                           else align % 2**31)
        _set_kv(h, "general.alignment", vtype, payload)
        return f"general.alignment set to {align} as type {vtype}"
    if choice == 7:
        vocab = rng.choice(["tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                            "tokenizer.ggml.scores"])
        value = rng.choice([(ARRAY, scalar_array(I32, [1, 2, 3]), "3 int32s"),
                            (ARRAY, string_array(["a", "b"]), "2 strings"),
                            (ARRAY, scalar_array(F32, [0.5] * 5), "5 floats"),
                            (ARRAY, string_array([]), "an empty string array"),
                            (ARRAY, string_array(["", "", "\xff"]), "odd strings"),
                            (STRING, _string("hello"), "a string"),
                            (U32, struct.pack("<I", 7), "a uint32")])
        _set_kv(h, vocab, *value[:2])
        return f"{vocab} replaced by {value[2]}"
    if choice == 8:
        other = rng.choice(h.tensors)[0]
        h.tensors[t][0] = other
        return f"tensor {name} renamed to {other} (a duplicate name)"
    if choice == 9:
        del h.tensors[t]
        return f"tensor {name} dropped"
    if choice == 10:
        h.tensors.append([rng.choice(["blk.99.attn_q.weight", "blk.0.mystery.weight", "", "x" * 300]),
                          [32, 4], 0, h.data_size])
        h.data_size += 512
        return f"an extra tensor {h.tensors[-1][0][:20]!r} added"
    if choice == 11:
        dims = rng.choice([[0], [0, 896], [2**63, 1], [2**32, 2**32], [2**62, 4], [2**64 - 1],
                           [1, 1, 1, 1, 1], [], [256, 2**40], [896, 896, 896, 896], [32] * 9])
        h.tensors[t][1] = dims
        return f"tensor {name} given dims {dims}"
    if choice == 12:
        h.tensors[t][1] = list(reversed(h.tensors[t][1]))
        return f"tensor {name} transposed"
    if choice == 13:
        qtype = rng.choice([0, 1, 2, 4, 5, 6, 8, 10, 12, 14, 16, 20, 23, 30, 31, 39, 40, 41, 2**31, 2**32 - 1])
        h.tensors[t][2] = qtype
        return f"tensor {name} given type {qtype}"
    if choice == 14:
        other = rng.choice(h.tensors)
        h.tensors[t][3] = other[3]
        return f"tensor {name} given the offset of {other[0]} (overlap)"
    if choice == 15:
        off = rng.choice([1, 16, h.data_size, h.data_size - 32, 2**40, 2**63, 2**64 - 32])
        h.tensors[t][3] = off
        return f"tensor {name} given offset {off}"
    if choice == 16:
        h.tensors[t][3] += rng.choice([-32, 32, 64])
        h.tensors[t][3] %= 2**64
        return f"tensor {name} moved by one alignment step"
    if choice == 17:
        h.version = rng.choice([0, 1, 2, 4, 2**31])
        return f"version {h.version}"
    if choice == 18:
        rng.shuffle(h.tensors)
        return "tensor infos shuffled (offsets kept)"
    if choice == 19:  # another architecture's reading path: its name, and the keys under it
        arch = rng.choice(["llama", "gemma3", "phi3", "qwen3", "mamba"])
        for entry in h.kvs:
            entry[0] = entry[0].replace("qwen2.", f"{arch}.", 1)
        _set_kv(h, "general.architecture", STRING, _string(arch))
        return f"architecture {arch}"
    if choice == 20:  # another tokenizer's reading path
        model = rng.choice(["llama", "llama", "bert", "t5", "", "gpt2"])
        _set_kv(h, "tokenizer.ggml.model", STRING, _string(model))
        if rng.random() < 0.5:
            _set_kv(h, "tokenizer.ggml.pre", STRING, _string(rng.choice(["llama3", "default", "tekken", "??", ""])))
        if rng.random() < 0.5:
            _set_kv(h, "tokenizer.ggml.scores", ARRAY, scalar_array(F32, [rng.uniform(-9, 0) for _ in range(1022)]))
        return f"tokenizer model {model!r}"
    h.data_size //= rng.choice([2, 1000])
    return f"data section cut to {h.data_size} bytes"


def _odd_value(rng):
    return rng.choice([
        (STRING, _string("x" * rng.choice([0, 1, 1000])), "a string"),
        (STRING, _string(b"\xff\xfe\x00"), "an invalid UTF-8 string"),
        (F32, struct.pack("<f", float("nan")), "NaN"),
        (F64, struct.pack("<d", float("-inf")), "-inf"),
        (I32, struct.pack("<i", -1), "-1"),
        (I64, struct.pack("<q", -2**63), "-2^63"),
        (BOOL, struct.pack("<?", True), "true"),
        (ARRAY, scalar_array(U8, []), "an empty array"),
        (ARRAY, string_array(["x"] * 3), "a string array"),
        (ARRAY, struct.pack("<IQ", 13, 5), "an array of unknown type 13"),
        (ARRAY, struct.pack("<IQ", STRING, 2**62), "a string array of 2^62 elements"),
        (ARRAY, struct.pack("<IQ", U64, 2**61), "a uint64 array of 2^61 elements"),
    ])


def _set_kv(h: Header, key: str, vtype: int, payload: bytes) -> None:
    for entry in h.kvs:
        if entry[0] == key:
            entry[1:] = [vtype, payload]
            return
    h.kvs.append([key, vtype, payload])


def m_restructure(rng, h, w):
    h = Header(h.version, [list(kv) for kv in h.kvs], [[n, list(d), q, o] for n, d, q, o in h.tensors], h.align,
               h.data_size)
    what = _restructure(rng, h)
    if rng.random() < 0.5 and "offset" not in what and "overlap" not in what and "shuffled" not in what:
        layout(h)  # a consistent layout, so the mutation itself is what the reader meets
    w2 = serialize(h)
    header, size = file_bytes(h, w2)
    return header, size, what


def m_lie_counts(rng, h, w):
    n_t = rng.choice([0, len(h.tensors) - 1, len(h.tensors) + 1, 2**32, 2**63, 2**64 - 1, len(h.tensors)])
    n_kv = rng.choice([0, len(h.kvs) - 1, len(h.kvs) + 1, 2**31, 2**63 - 1, len(h.kvs)])
    header, size = file_bytes(h, serialize(h, n_t, n_kv))
    return header, size, f"declared {n_t} tensors and {n_kv} metadata entries"


MUTATIONS = [(m_set_field, 4), (m_flip_field, 3), (m_flip_anywhere, 1), (m_truncate, 2), (m_restructure, 5),
             (m_lie_counts, 1)]


def mutate(seed: int, case: int, h: Header, w: Writer):
    rng = random.Random(f"{seed}:{case}")
    fn = rng.choices([m for m, _ in MUTATIONS], weights=[k for _, k in MUTATIONS])[0]
    return fn(rng, h, w)


# --------------------------------------------------------------------------------------------------- GGUF run

def load_gguf(path: Path):
    """What kiln.load does with a GGUF file, up to and including the model on the meta device."""
    from kiln.load import meta_model, read_model
    config, weights, tokenizer = read_model(path)
    meta_model(config, weights)
    return tokenizer


def write_file(path: Path, header: bytes, size: int) -> None:
    """The header, then zeros up to `size` as a hole (the data section costs no disk)."""
    path.unlink(missing_ok=True)  # a fresh inode: an earlier case's mmap never sees this one
    with open(path, "wb") as f:
        f.write(header[:size])
        f.truncate(size)


@dataclass
class Tally:
    accepted: int = 0
    rejected: int = 0
    failures: list = field(default_factory=list)
    slowest: tuple = (0.0, "")
    rss_base: float = 0.0  # peak RSS (MB) once the unmutated base has loaded
    rss_jump: tuple = (0.0, "")  # the largest rise of the peak in one case, and that case
    messages: dict = field(default_factory=dict)  # first words of each error, counted


PROGRESS: Path | None = None  # where the child notes the case it is running (set by main)


def run_case(tally: Tally, load, path: Path, what: str, repro: str) -> None:
    from kiln.errors import KilnError
    if PROGRESS is not None:
        PROGRESS.write_text(f"{what}\n  reproduce: {repro}\n")
    t0, rss = time.perf_counter(), _rss_mb()
    problem = None
    try:
        load(path)
        tally.accepted += 1
    except KilnError as e:
        tally.rejected += 1
        msg = str(e)
        if not msg or len(msg) > 1000:
            problem = f"KilnError message of {len(msg)} characters: {msg[:300]!r}"
        key = " ".join(msg.replace(str(path), "FILE").split()[:6])
        tally.messages[key] = tally.messages.get(key, 0) + 1
    except Exception as e:  # the finding: anything but KilnError
        problem = "".join(traceback.format_exception(e)[-6:])
    dt = time.perf_counter() - t0
    if _rss_mb() - rss > tally.rss_jump[0]:
        tally.rss_jump = (_rss_mb() - rss, what)
    if dt > tally.slowest[0]:
        tally.slowest = (dt, what)
    if dt > CASE_SECONDS:
        problem = (problem or "") + f"took {dt:.1f} s (budget {CASE_SECONDS} s)"
    if problem:
        tally.failures.append(f"{what}\n  reproduce: {repro}\n  {problem}")
        print("FAIL", tally.failures[-1], flush=True)  # at once: a long run shows what it finds as it goes


def fuzz_gguf(model: Path, work: Path, seed: int, cases: range) -> Tally:
    h = base_header(real_header(model))
    w = serialize(h)
    header, size = file_bytes(h, w)
    path = work / "fuzz.gguf"
    write_file(path, header, size)
    tok = load_gguf(path)  # the unmutated base must load, or the mutations mean nothing
    assert tok.decode(tok.encode("def hello(): return 42")) == "def hello(): return 42"
    tally = Tally(rss_base=_rss_mb())
    for case in cases:
        header_m, size_m, what = mutate(seed, case, h, w)
        size_m = min(size_m, 2 * size)  # a mutation may declare exabytes; the file stays a sparse copy
        write_file(path, header_m, size_m)
        run_case(tally, load_gguf, path, f"gguf case {case}: {what}", _repro("gguf", model, seed, case))
    return tally


def _repro(kind: str, model: Path | None, seed: int, case: int) -> str:
    where = f" --model {model}" if model else ""
    return f"PYTHONPATH=. python tests/test_fuzz_formats.py {kind}{where} --seed {seed} --case {case}"


# --------------------------------------------------------------------------------------------------- safetensors

TINY = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=1e4,
            tie_word_embeddings=False)


def tiny_folder(folder: Path) -> tuple[dict, bytes]:
    """A tiny Llama as a Hugging Face folder (f32 and f16 tensors); returns (header dict, data bytes)."""
    import torch
    from safetensors.torch import save
    from tokenizers import Tokenizer, models

    from kiln.models import get_model
    model_cls, args_cls = get_model("llama")
    torch.manual_seed(0)
    state = model_cls(args_cls.from_dict(TINY)).state_dict()
    state = {k: v.half() if "mlp" in k else v for k, v in state.items()}
    raw = save(state)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY))
    vocab = {f"t{i}": i for i in range(TINY["vocab_size"])}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(folder / "tokenizer.json"))
    (folder / "model.safetensors").write_bytes(raw)
    n = struct.unpack_from("<Q", raw)[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def st_bytes(header, data: bytes, text: str | None = None) -> bytes:
    body = (text if text is not None else json.dumps(header)).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(body)) + body + data


def _tensor_names(header):
    return [k for k in header if k != "__metadata__"]


def s_header_length(rng, header, data):
    raw = bytearray(st_bytes(header, data))
    n = struct.unpack_from("<Q", raw)[0]
    v = rng.choice([0, 1, 2, n - 1, n + 1, n + 8, len(raw), len(raw) - 8, 100_000_001, 2**31, 2**63, 2**64 - 1])
    struct.pack_into("<Q", raw, 0, v % 2**64)
    return bytes(raw), f"header length set to {v}"


def s_flip(rng, header, data):
    raw = bytearray(st_bytes(header, data))
    n = struct.unpack_from("<Q", raw)[0]
    where = sorted(rng.randrange(8 + n) for _ in range(rng.choice([1, 1, 3])))
    for off in where:
        raw[off] ^= 1 << rng.randrange(8)
    return bytes(raw), f"flip bits at header bytes {where}"


def s_truncate(rng, header, data):
    raw = st_bytes(header, data)
    cut = rng.randrange(len(raw))
    return raw[:cut], f"truncate at byte {cut} of {len(raw)}"


def s_json(rng, header, data):
    h = json.loads(json.dumps(header))
    names = _tensor_names(h)
    name = rng.choice(names)
    t = h[name]
    other = h[rng.choice(names)]
    choice = rng.randrange(14)
    if choice == 0:
        t["data_offsets"] = list(other["data_offsets"])
        what = "offsets of another tensor (overlap)"
    elif choice == 1:
        b, e = t["data_offsets"]
        t["data_offsets"] = rng.choice([[e, b], [b, e + 4], [b + 1, e + 1], [b, len(data) + 64], [-4, e],
                                        [b, 2**64 - 1], [2**63, 2**63 + 4], [float(b), e], ["0", e], [b], 7])
        what = f"offsets {t['data_offsets']}"
    elif choice == 2:
        t["dtype"] = rng.choice(["Q4", "F8_E8M0", "F8_E4M3", "F8_E5M2", "BOOL", "U8", "I8", "U16", "U32", "U64",
                                 "I64", "F64", "C64", "F4", "f32", "", 5, None])
        what = f"dtype {t['dtype']!r}"
    elif choice == 3:
        t["shape"] = rng.choice([[], [0], [-1], [2**62, 2**62], [2**64], ["a"], list(reversed(t["shape"])),
                                 t["shape"] + [1], [1] + t["shape"], 3, [1.5], [2**31, 2**31, 4]])
        what = f"shape {t['shape']}"
    elif choice == 4:
        del h[name]
        what = "tensor dropped"
    elif choice == 5:
        e = other["data_offsets"][1]
        h[rng.choice(["model.layers.9.mlp.up_proj.weight", "mystery", "lm_head.weight.x", "",
                      "model.language_model.layers.0.mlp.up_proj.weight"])] = dict(
            dtype="F32", shape=[1], data_offsets=[e - 4, e])
        what = "extra tensor"
    elif choice == 6:
        h["__metadata__"] = rng.choice([{"format": "pt"}, {"a": 5}, [1], "x", {"a": {"b": "c"}}, None])
        what = f"__metadata__ {h['__metadata__']!r}"
    elif choice == 7:  # a duplicate key: JSON text with the same name twice
        text = json.dumps(h)
        dup = json.dumps({name: other})[1:-1]
        return st_bytes(h, data, "{" + dup + ", " + text[1:]), f"key {name} appears twice"
    elif choice == 8:
        text = rng.choice(["[]", "5", "null", '"x"', "[" * 100000 + "]" * 100000, '{"a": ' * 50000 + "1" + "}" * 50000,
                           "{" + json.dumps(h)[1:-1] + ",}", json.dumps(h)[:-1], "\udcff"])
        return st_bytes(h, data, text), f"header text {text[:30]!r}..."
    elif choice == 9:
        t.clear()
        what = "empty tensor entry"
    elif choice == 10:
        t["data_offsets"], other["data_offsets"] = other["data_offsets"], t["data_offsets"]
        what = "offsets swapped with another tensor"
    elif choice == 11:
        h = {k: h[k] for k in reversed(list(h))}
        what = "entries reversed"
    elif choice == 12:
        text = json.dumps(h) + " " * rng.choice([1, 7, 1000])
        return st_bytes(h, data, text), "header padded with spaces"
    else:
        t[rng.choice(["dtype", "shape", "data_offsets"])] = {"nested": [1, 2]}
        what = "a field replaced by an object"
    return st_bytes(h, data), f"tensor {name}: {what}"


def s_config(rng, header, data):
    cfg = dict(TINY)
    key = rng.choice(list(TINY) + ["head_dim", "rope_scaling", "text_config", "partial_rotary_factor"])
    value = rng.choice([0, -1, 2**40, 2**63, 1.5, "12", None, [], {}, True, float("nan"), 10**400 if False else 1e308,
                        {"rope_type": "llama3"}, {"rope_type": "linear"}, "llama", "mamba"])
    if rng.random() < 0.15:
        del cfg["hidden_size" if key not in cfg else key]
        return st_bytes(header, data), cfg, f"config.json lacks {key}"
    cfg[key] = value
    return st_bytes(header, data), cfg, f"config.json {key} = {value!r}"


ST_MUTATIONS = [(s_header_length, 2), (s_flip, 3), (s_truncate, 2), (s_json, 6), (s_config, 2)]


def fuzz_safetensors(work: Path, seed: int, cases: range) -> Tally:
    import kiln
    base = work / "base"
    header, data = tiny_folder(base)
    kiln.load(base, device="cpu")  # the unmutated base loads
    tally = Tally(rss_base=_rss_mb())
    folder = work / "case"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (folder / name).write_bytes((base / name).read_bytes())
    for case in cases:
        rng = random.Random(f"{seed}:{case}")
        fn = rng.choices([m for m, _ in ST_MUTATIONS], weights=[k for _, k in ST_MUTATIONS])[0]
        out = fn(rng, header, data)
        raw, what = out[0], out[-1]
        cfg = out[1] if len(out) == 3 else TINY
        (folder / "config.json").write_text(json.dumps(cfg, allow_nan=True))
        (folder / "model.safetensors").write_bytes(raw)
        run_case(tally, lambda p: kiln.load(p, device="cpu"), folder, f"safetensors case {case}: {what}",
                 _repro("safetensors", None, seed, case))
    return tally


# --------------------------------------------------------------------------------------------------- child process

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="fuzz kiln's model-file readers")
    ap.add_argument("kind", choices=["gguf", "safetensors"])
    ap.add_argument("--model", type=Path, help="the real Qwen2.5-Coder-0.5B GGUF (gguf only)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--case", type=int, help="run only this case (to reproduce one)")
    ap.add_argument("--shard", default="0/1", help="K/N: run cases K, K+N, K+2N... (N processes in parallel)")
    ap.add_argument("--progress", type=Path, help="file to hold the case being run (names a hang)")
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args(argv)
    import logging
    import tempfile
    logging.disable(logging.WARNING)  # unknown pre-tokenizers etc. warn; the cases are about errors
    k, n = map(int, args.shard.split("/"))
    cases = range(args.case, args.case + 1) if args.case is not None else range(k, args.cases, n)
    global PROGRESS
    PROGRESS = args.progress
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        t0 = time.perf_counter()
        if args.kind == "gguf":
            tally = fuzz_gguf(args.model, Path(work), args.seed, cases)
        else:
            tally = fuzz_safetensors(Path(work), args.seed, cases)
        growth = _rss_mb() - tally.rss_base
    if growth > RSS_GROWTH_MB:
        tally.failures.append(f"peak memory grew by {growth:.0f} MB")
    summary = dict(kind=args.kind, seed=args.seed, cases=len(cases), accepted=tally.accepted,
                   rejected=tally.rejected, failures=len(tally.failures), seconds=round(time.perf_counter() - t0, 1),
                   slowest_case=[round(tally.slowest[0], 3), tally.slowest[1]], peak_rss_growth_mb=round(growth),
                   largest_rss_jump=[round(tally.rss_jump[0]), tally.rss_jump[1]],
                   errors=dict(sorted(tally.messages.items(), key=lambda kv: -kv[1])[:40]))
    print(json.dumps(summary, indent=1), flush=True)
    return 1 if tally.failures else 0


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------------------------------- tests

def fuzz(kind: str, cases: int, seed: int, tmp_path: Path, *extra: str, timeout: float = 300) -> list[dict]:
    """Run `cases` cases in child processes (two where there are two cores); their summaries."""
    workers = 2 if (os.cpu_count() or 1) >= 2 else 1
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    procs = []
    for k in range(workers):
        cmd = [sys.executable, __file__, kind, "--cases", str(cases), "--seed", str(seed), "--shard",
               f"{k}/{workers}", "--workdir", str(tmp_path), "--progress", str(tmp_path / f"progress{k}"), *extra]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                      cwd=ROOT))
    outs, deadline = [], time.monotonic() + timeout
    for k, proc in enumerate(procs):
        try:
            outs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            stuck = (tmp_path / f"progress{k}").read_text() if (tmp_path / f"progress{k}").exists() else "?"
            pytest.fail(f"{kind} fuzz ran past {timeout} s; the case running was:\n{stuck}")
    for proc, out, k in zip(procs, outs, range(workers)):
        if proc.returncode != 0:
            last = (tmp_path / f"progress{k}").read_text() if (tmp_path / f"progress{k}").exists() else "?"
            pytest.fail(f"{kind} fuzz shard {k} failed (exit {proc.returncode}); last case:\n{last}\n{out[-8000:]}")
    return [json.loads(out[out.index("\n{") + 1:] if not out.startswith("{") else out) for out in outs]


@pytest.fixture(scope="module")
def real(qwen_path):
    return real_header(qwen_path)


@pytest.mark.model
def test_the_test_writer_reproduces_the_real_header(qwen_path, real):
    """The fuzz's own GGUF writer is exact: it writes the real header back byte for byte."""
    out = serialize(real).out
    with open(qwen_path, "rb") as f:
        assert f.read(len(out)) == out
    assert len(real.tensors) == 291 and len(real.kvs) == 26


@pytest.mark.model
def test_reader_matches_an_independent_parse(qwen_path, real):
    """kiln's reader (its fast string-array loop included) reads the real header as this file's walker does."""
    from kiln.formats.gguf import read_gguf
    g = read_gguf(qwen_path)
    assert list(g.meta) == [k for k, _, _ in real.kvs]
    for key, vtype, payload in real.kvs:
        if vtype == ARRAY and struct.unpack_from("<I", payload)[0] == STRING:
            assert g.meta[key] == _strings(payload), key
        elif vtype == ARRAY:
            etype, n = struct.unpack_from("<IQ", payload)
            assert g.meta[key] == list(struct.unpack_from(f"<{n}{_FMT[etype][1]}", payload, 12)), key
        elif vtype == STRING:
            assert g.meta[key] == payload[8:].decode(), key
        elif vtype != ARRAY:
            assert g.meta[key] == struct.unpack(_FMT[vtype], payload)[0], key
    assert [(n, tuple(reversed(d)), q) for n, d, q, _ in real.tensors] == \
        [(t.name, t.shape, t.qtype) for t in g.tensors.values()]


@pytest.mark.model
def test_real_header_truncated_in_every_section(qwen_path, real, tmp_path):
    """The real file cut inside each section of its header (the first 4 MB among them): KilnError naming it."""
    from kiln.errors import KilnError
    from kiln.formats.gguf import read_gguf
    w = serialize(real)
    at = {label: off for off, label in w.bounds}
    fields = {label: off for off, _, label in w.fields}
    cuts = {"the counts": 20, "a key": at["key general.name"] + 3, "the vocabulary": at["elements of tokenizer.ggml.tokens"]
            + 500_000, "the first 4 MB": 4 << 20, "the merges": at["elements of tokenizer.ggml.merges"] + 1_000_000,
            "the chat template": at["value of tokenizer.chat_template"] + 100,
            "a tensor's shape": fields["dim 1 of blk.3.ffn_up.weight"] + 4, "the end of the header": len(w.out),
            "the tensor data": len(w.out) + 300_000}
    expect = {"the vocabulary": "tokenizer.ggml.tokens", "the first 4 MB": "tokenizer.ggml.merges",
              "the merges": "tokenizer.ggml.merges", "the chat template": "tokenizer.chat_template",
              "a tensor's shape": "blk.3.ffn_up.weight", "the tensor data": "needs bytes"}
    with open(qwen_path, "rb") as f:
        head = f.read(max(cuts.values()))
    for where, cut in cuts.items():
        path = tmp_path / "cut.gguf"
        path.write_bytes(head[:cut])
        t0 = time.perf_counter()
        with pytest.raises(KilnError, match="truncated") as e:
            read_gguf(path)
        assert expect.get(where, "") in str(e.value), (where, str(e.value))
        assert time.perf_counter() - t0 < 10, where


@pytest.fixture(scope="module")
def base(real, tmp_path_factory):
    """The fuzz base, loaded once unmutated (so the cases below time only themselves, not torch's warm-up)."""
    h = base_header(real)
    w = serialize(h)
    path = tmp_path_factory.mktemp("base") / "base.gguf"
    write_file(path, *file_bytes(h, w))
    tok = load_gguf(path)
    assert tok.vocab_size == KEEP_TOKENS + 22 and "<|im_start|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}])
    return h, w


def _nested(h):
    _set_kv(h, "general.tags", ARRAY, struct.pack("<IQ", ARRAY, 1) * 3 + scalar_array(U8, [1]))


def _retype(key, vtype, payload):
    return lambda h: _set_kv(h, key, vtype, payload)


def _tensor(name, i, value):
    def change(h):
        for t in h.tensors:
            if t[0] == name:
                t[i] = value
    return change


def _twice(h):
    h.kvs.insert(3, list(h.kvs[2]))


def _dup_tensor(h):
    h.tensors[5][0] = h.tensors[4][0]


def _overlap(h):
    h.tensors[7][3] = h.tensors[6][3]


def _layout(change):
    def both(h):
        change(h)
        layout(h)
    return both


NAMED = {  # corruption -> (change to the base header, words the KilnError must contain)
    "arrays nested in arrays": (_nested, "array of arrays"),
    "a metadata key declared twice": (_twice, "appears twice"),
    "a tensor name twice": (_dup_tensor, "appears twice"),
    "alignment 0": (_retype("general.alignment", U32, struct.pack("<I", 0)), "not a power of two"),
    "alignment 48": (_retype("general.alignment", U32, struct.pack("<I", 48)), "not a power of two"),
    "alignment as a string": (_retype("general.alignment", STRING, _string("32")), "not a power of two"),
    "dims whose product overflows int64": (_tensor("blk.0.ffn_up.weight", 1, [2**32, 2**32]), "64 bits"),
    "a dimension of 0": (_tensor("blk.0.ffn_up.weight", 1, [896, 0]), "must be positive"),
    "a dimension of 2^63 (negative as int64)": (_tensor("blk.0.ffn_up.weight", 1, [2**63, 1]), "must be positive"),
    "5 dimensions": (_tensor("blk.0.ffn_up.weight", 1, [1] * 5), "GGUF allows 1 to 4"),
    "an unknown tensor type": (_tensor("blk.0.ffn_up.weight", 2, 2**31), "unknown tensor type id"),
    "a known type kiln cannot read": (_layout(_tensor("blk.0.ffn_down.weight", 2, 16)), "IQ2_XXS"),
    "overlapping tensors": (_overlap, "overlap"),
    "an offset past the end": (_tensor("blk.0.ffn_up.weight", 3, 2**40), "needs bytes"),
    "an offset near 2^64": (_tensor("blk.0.ffn_up.weight", 3, 2**64 - 32), "needs bytes"),
    "a misaligned offset": (_tensor("blk.0.ffn_up.weight", 3, 4), "not a multiple of the alignment"),
    "a tensor name of 65 bytes": (_tensor("blk.0.ffn_up.weight", 0, "x" * 65), "at most 64"),
    "a transposed weight": (_layout(_tensor("blk.0.ffn_up.weight", 1, [4864, 896])), "but the model needs"),
    "a hidden size of 2^40": (_retype("qwen2.embedding_length", U64, struct.pack("<Q", 2**40)),
                              "hidden_size is 1099511627776"),
    "a billion layers": (_retype("qwen2.block_count", U32, struct.pack("<I", 10**9)), "layers"),
    "a head count of 0": (_retype("qwen2.attention.head_count", U32, struct.pack("<I", 0)), "positive integer"),
    "a head count as a string": (_retype("qwen2.attention.head_count", STRING, _string("14")), "positive integer"),
    "no head count": (lambda h: h.kvs.__delitem__([k for k, _, _ in h.kvs].index("qwen2.attention.head_count")),
                      "is missing"),
    "a NaN norm epsilon": (_retype("qwen2.attention.layer_norm_rms_epsilon", F32, struct.pack("<f", float("nan"))),
                           "positive number"),
    "token types shorter than the vocabulary": (_retype("tokenizer.ggml.token_type", ARRAY, scalar_array(I32, [1] * 9)),
                                                "tokenizer.ggml.token_type"),
    "tokens that are numbers": (_retype("tokenizer.ggml.tokens", ARRAY, scalar_array(I32, list(range(1022)))),
                                "tokenizer.ggml.tokens"),
    "merges that are numbers": (_retype("tokenizer.ggml.merges", ARRAY, scalar_array(U8, [1, 2])),
                                "tokenizer.ggml.merges"),
    "a 2^62-string vocabulary": (_retype("tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", STRING, 2**62)),
                                 "more than the"),
    "a 2^61-element uint64 array": (_retype("general.tags", ARRAY, struct.pack("<IQ", U64, 2**61)), "more than the"),
    "a string longer than the file": (_retype("general.name", STRING, struct.pack("<Q", 2**63) + b"x"), "needs"),
    "an unknown value type": (_retype("general.name", 13, b"\0" * 8), "unknown value type 13"),
}


@pytest.mark.model
@pytest.mark.parametrize("what", list(NAMED))
def test_named_corruption_is_one_clear_error(base, tmp_path, what):
    """Each corruption the issue names, applied to the real header: KilnError naming it, within a second."""
    from kiln.errors import KilnError
    h0, _ = base
    h = Header(h0.version, [list(kv) for kv in h0.kvs], [[n, list(d), q, o] for n, d, q, o in h0.tensors],
               h0.align, h0.data_size)
    change, words = NAMED[what]
    change(h)
    header, size = file_bytes(h, serialize(h))
    write_file(tmp_path / "m.gguf", header, min(size, 2 * h0.data_size + len(header)))
    t0 = time.perf_counter()
    with pytest.raises(KilnError) as e:
        load_gguf(tmp_path / "m.gguf")
    assert words in str(e.value), str(e.value)
    assert time.perf_counter() - t0 < 2.0


@pytest.mark.model
def test_gguf_fuzz(qwen_path, tmp_path):
    """2,000 mutations of the real model's header: each one accepted or one clean KilnError, quickly."""
    t0 = time.monotonic()
    runs = fuzz("gguf", 2000, 20261203, tmp_path, "--model", str(qwen_path))
    assert sum(r["cases"] for r in runs) == 2000 and not any(r["failures"] for r in runs)
    assert sum(r["rejected"] for r in runs) > 1500  # the mutations hit: most files are refused...
    assert sum(r["accepted"] for r in runs) > 20  # ...and some reach the tokenizer and the model
    assert time.monotonic() - t0 < 120, runs  # the acceptance says a minute on CI; allow a loaded machine


def test_safetensors_fuzz(tmp_path):
    """A tiny Llama folder, its safetensors header and config mutated: accepted or one KilnError each."""
    runs = fuzz("safetensors", 600, 20261203, tmp_path)
    assert sum(r["cases"] for r in runs) == 600 and not any(r["failures"] for r in runs)
    assert sum(r["rejected"] for r in runs) > 400 and sum(r["accepted"] for r in runs) > 20


if __name__ == "__main__":
    sys.exit(main())
