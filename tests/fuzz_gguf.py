"""GGUF fuzzing: the header as data, the fuzz base built from the real model's header, and the mutations.

Owns: `Header` with an independent walker (`parse_header`) and writer (`serialize`, which records where
every integer field lands so mutations can aim at fields, not bytes), `base_header` (the real header with
its vocabulary cut; see test_fuzz_formats.py), the mutations, and `fuzz_gguf`, which runs cases through
`load_gguf` — what kiln.load does with a GGUF file, up to the model on the meta device.
Not: judging a case (fuzz_run.py), kiln's reader itself (kiln/formats/gguf.py; nothing here imports it).
"""

from __future__ import annotations

import copy
import random
import struct
from dataclasses import dataclass
from pathlib import Path

from fuzz_run import Tally, repro, run_case, write_file, _rss_mb

# GGUF value types (the spec's numbering) and their sizes
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q",
        I64: "<q", F64: "<d"}
_QUANT = {0: (1, 4), 1: (1, 2), 6: (32, 22), 8: (32, 34), 12: (256, 144), 14: (256, 210)}  # F32 F16 Q5_0 Q8_0 Q4_K Q6_K
KEEP_TOKENS = 1000  # normal tokens kept from the real vocabulary (the 22 special ones are kept too)



# ---------------------------------------------------------------------------------------------- the header as data
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


# ---------------------------------------------------------------------------------------------- running

def load_gguf(path: Path):
    """What kiln.load does with a GGUF file, up to and including the model on the meta device."""
    from kiln.reader import meta_model, read_model
    config, weights, tokenizer = read_model(path)
    meta_model(config, weights)
    return tokenizer


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
        run_case(tally, load_gguf, path, f"gguf case {case}: {what}", repro("gguf", model, seed, case))
    return tally
