"""Tests for kiln/formats/vocab_cache.py: a cached tokenizer is the freshly built one, and a cache entry that is
damaged, truncated, stale or unwritable is rebuilt or skipped, never used.

Real-model files come from conftest.real_model (Gemma 3's 262k-token SentencePiece vocabulary is the one whose
merges are cached).
"""

import os

import pytest

from kiln.formats import gguf_vocab
from kiln.formats.vocab_cache import MAGIC, cached_merges
from kiln.tokenizer import Tokenizer

try:  # tests/ as a package, or tests/ itself on sys.path (pytest's default import mode)
    from tests.conftest import real_model
except ImportError:
    from conftest import real_model

RANKED = ["▁the", "▁t", "he", "h", "e", "▁", "t", "é", "ab", "a", "b", "a b", " "]
TEXTS = ["Hello world", "<start_of_turn>user\nWrite a loop<end_of_turn>\n<start_of_turn>model\n",
         "def f(x):\n    return {'k': [x ** 2, \"é\"]}  # ok\n\tpass", "你好，世界 👨‍👩‍👧‍👦 Ünïcödé ĀĀ ﷽",
         "<bos><eos><pad> </s> <unk>", "  leading and trailing  ", "\u2581 literal block ▁▁", "0123456789 3.14e-10",
         "<0x41>\x00\x7f\r\n", "<unused0><image_soft_token><start_of_image>"]


def build(ranked=RANKED):
    return gguf_vocab._spm_merges(ranked, {t: i for i, t in enumerate(ranked)})


class Counting:
    def __init__(self, ranked=RANKED):
        self.calls, self.ranked = 0, ranked

    def __call__(self):
        self.calls += 1
        return build(self.ranked)


def entry(folder):
    (path,) = folder.iterdir()
    return path


def test_a_hit_is_what_a_build_gives(tmp_path):
    count = Counting()
    first = cached_merges(tmp_path, RANKED, count, "v")
    assert first == build() and count.calls == 1 and entry(tmp_path).read_bytes().startswith(MAGIC)
    assert cached_merges(tmp_path, RANKED, count, "v") == first and count.calls == 1
    assert cached_merges(None, RANKED, count, "v") == first and count.calls == 2  # no folder: no cache


@pytest.mark.parametrize("damage", ["flip a payload byte", "flip a key byte", "truncate", "empty", "wrong magic",
                                    "another vocabulary's entry", "out-of-range rank", "odd length"])
def test_a_damaged_or_stale_entry_is_rebuilt(tmp_path, damage):
    cached_merges(tmp_path, RANKED, build, "v")
    path = entry(tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "flip a payload byte":
        data[-3] ^= 0x01
    elif damage == "flip a key byte":
        data[len(MAGIC) + 5] ^= 0x80
    elif damage == "truncate":
        data = data[:len(data) - 4]
    elif damage == "empty":
        data = b""
    elif damage == "wrong magic":
        data[:len(MAGIC)] = b"KILNMRG0"
    elif damage == "another vocabulary's entry":  # a whole, valid entry, under this vocabulary's name
        other = tmp_path / "other"
        cached_merges(other, RANKED[:-1] + ["x"], Counting(RANKED[:-1] + ["x"]), "v")
        data = entry(other).read_bytes()
    elif damage == "out-of-range rank":  # a checksum made to match: still refused
        import hashlib
        import numpy as np
        payload = np.frombuffer(bytes(data[len(MAGIC) + 64:]), "<i4").copy()
        payload[0] = len(RANKED)
        data[len(MAGIC) + 32:] = hashlib.sha256(payload.tobytes()).digest() + payload.tobytes()
    elif damage == "odd length":
        data += b"\0"
    path.write_bytes(bytes(data))
    count = Counting()
    assert cached_merges(tmp_path, RANKED, count, "v") == build() and count.calls == 1
    assert cached_merges(tmp_path, RANKED, count, "v") == build() and count.calls == 1  # rewritten whole


def test_the_key_is_the_vocabulary_and_the_version(tmp_path):
    count = Counting()
    cached_merges(tmp_path, RANKED, count, "v")
    cached_merges(tmp_path, RANKED, count, "v2")  # the derivation changed
    swapped = [RANKED[1], RANKED[0], *RANKED[2:]]  # the same texts, ranked otherwise
    assert cached_merges(tmp_path, swapped, Counting(swapped), "v") == build(swapped)
    joined = ["ab", "c"], ["a", "bc"]  # the same text once joined: told apart by their lengths
    assert cached_merges(tmp_path, joined[0], Counting(joined[0]), "v") == []
    assert cached_merges(tmp_path, joined[1], Counting(joined[1]), "v") == []
    assert count.calls == 2 and len(list(tmp_path.iterdir())) == 5


def test_an_unwritable_folder_leaves_the_build_uncached(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert cached_merges(blocker / "tokenizers", RANKED, build, "v") == build()
    assert "could not write" in caplog.text
    if os.geteuid() != 0:  # root writes anywhere
        folder = tmp_path / "ro"
        folder.mkdir(mode=0o500)
        assert cached_merges(folder, RANKED, build, "v") == build() and not list(folder.iterdir())
    assert not [p for p in tmp_path.rglob("*.tmp")]


@pytest.mark.model
def test_a_cached_tokenizer_encodes_as_a_fresh_one(tmp_path, monkeypatch):
    """Gemma 3's tokenizer built with no cache, then through an empty cache, then from it (the merges not derived
    again), then from a damaged entry: the same ids, pieces and text for special tokens, Unicode and code."""
    from kiln.formats.gguf import read_gguf
    meta = read_gguf(real_model("gemma3-270m")).meta
    fresh = Tokenizer.from_gguf(meta)
    calls = []
    derive = gguf_vocab._spm_merges
    monkeypatch.setattr(gguf_vocab, "_spm_merges", lambda *a: calls.append(1) or derive(*a))
    built = Tokenizer.from_gguf(meta, tmp_path)
    cached = Tokenizer.from_gguf(meta, tmp_path)
    assert len(calls) == 1
    path = entry(tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    rebuilt = Tokenizer.from_gguf(meta, tmp_path)
    assert len(calls) == 2
    for tok in (built, cached, rebuilt):
        assert tok.pieces == fresh.pieces and tok.special_ids == fresh.special_ids
        for text in TEXTS:
            ids = fresh.encode(text)
            assert tok.encode(text) == ids, text
            assert tok.decode(ids) == fresh.decode(ids), text
