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

The cases run in child processes (tests/fuzz_run.py; the mutations are in fuzz_gguf.py and
fuzz_safetensors.py), so a crash or a hang is caught and named and memory is measured. Each case is
seeded by (seed, index): a failure prints its mutation and the line that reproduces it, e.g.
    PYTHONPATH=. python tests/fuzz_run.py gguf --model FILE.gguf --seed SEED --case INDEX
and a long run is
    PYTHONPATH=. nice -n 19 python tests/fuzz_run.py gguf --model FILE.gguf --cases 50000 --seed 1
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fuzz_gguf import (ARRAY, F32, I32, KEEP_TOKENS, STRING, U8, U32, U64, _FMT, Header, _set_kv, _string, _strings,
                       base_header, file_bytes, layout, load_gguf, real_header, scalar_array, serialize)
from fuzz_run import write_file

ROOT = Path(__file__).resolve().parent.parent
RUNNER = Path(__file__).resolve().parent / "fuzz_run.py"

def fuzz(kind: str, cases: int, seed: int, tmp_path: Path, *extra: str, timeout: float = 300) -> list[dict]:
    """Run `cases` cases in child processes (two where there are two cores); their summaries."""
    workers = 2 if (os.cpu_count() or 1) >= 2 else 1
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    procs = []
    for k in range(workers):
        cmd = [sys.executable, str(RUNNER), kind, "--cases", str(cases), "--seed", str(seed), "--shard",
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
        t0 = time.process_time()
        with pytest.raises(KilnError, match="truncated") as e:
            read_gguf(path)
        assert expect.get(where, "") in str(e.value), (where, str(e.value))
        assert time.process_time() - t0 < 10, where


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
    t0 = time.process_time()
    with pytest.raises(KilnError) as e:
        load_gguf(tmp_path / "m.gguf")
    assert words in str(e.value), str(e.value)
    assert time.process_time() - t0 < 2.0  # CPU seconds: a loaded machine does not fail it


@pytest.mark.model
def test_gguf_fuzz(qwen_path, tmp_path):
    """2,000 mutations of the real model's header: each one accepted or one clean KilnError, quickly."""
    runs = fuzz("gguf", 2000, 20261203, tmp_path, "--model", str(qwen_path))
    assert sum(r["cases"] for r in runs) == 2000 and not any(r["failures"] for r in runs)
    assert sum(r["rejected"] for r in runs) > 1500  # the mutations hit: most files are refused...
    assert sum(r["accepted"] for r in runs) > 100  # ...and some reach the tokenizer and the model
    # a minute on CI's two cores: CPU seconds (imports included), which a busy machine does not inflate
    assert sum(r["cpu_seconds"] for r in runs) < 120, runs


def test_safetensors_fuzz(tmp_path):
    """A tiny Llama folder, its safetensors header and config mutated: accepted or one KilnError each."""
    runs = fuzz("safetensors", 600, 20261203, tmp_path)
    assert sum(r["cases"] for r in runs) == 600 and not any(r["failures"] for r in runs)
    assert sum(r["rejected"] for r in runs) > 400 and sum(r["accepted"] for r in runs) > 20
