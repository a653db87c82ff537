"""Prompt cache files (kiln/prompt_cache.py): a saved prompt's KV state gives the same greedy continuation as
a fresh prefill on the real 0.5B model; another model's file, a truncated file and a foreign file are clear
KilnErrors."""

import json
import struct

import pytest

import kiln
from kiln import prompt_cache
from kiln.errors import KilnError

pytestmark = pytest.mark.model

DOC = ("The kiln is a thermally insulated chamber used to harden clay into pottery and bricks. "
       "Potters load the kiln, seal it, and raise the temperature slowly. Question: what does a kiln do?")


def test_saved_prompt_continues_like_a_fresh_prefill(qwen, tmp_path, capsys):
    model, tok = qwen
    path = tmp_path / "doc.kpc"
    n, size = prompt_cache.cache_prompt(model, tok, DOC, path, cache_type_k="q8_0")
    assert n == len(tok.encode(DOC)) and path.stat().st_size == size
    fresh = kiln.generate(model, tok, DOC + " Answer:", max_tokens=8, cache_type_k="q8_0")
    reused = kiln.generate(model, tok, DOC + " Answer:", max_tokens=8, prompt_cache=path)
    assert reused == fresh and fresh.strip()
    header, parts = prompt_cache.load(path, model, tok)
    assert header["tokens"] == tok.encode(DOC) and header["type_k"] == "q8_0"

    data = path.read_bytes()
    (tmp_path / "short.kpc").write_bytes(data[:-100])
    with pytest.raises(KilnError, match="truncated"):
        kiln.generate(model, tok, DOC, max_tokens=2, prompt_cache=tmp_path / "short.kpc")
    (tmp_path / "foreign.kpc").write_bytes(b"GGUF" + data[4:])
    with pytest.raises(KilnError, match="not a kiln prompt cache"):
        kiln.generate(model, tok, DOC, max_tokens=2, prompt_cache=tmp_path / "foreign.kpc")
    old = tmp_path / "v1.kpc"  # format 1 (before the bases): its q8_0 keys were stored unrotated
    old.write_bytes(_format_1(data))
    with pytest.raises(KilnError, match="made before kiln rotated quantized KV caches"):
        kiln.generate(model, tok, DOC, max_tokens=2, prompt_cache=old)
    model.args.rope_theta += 1  # another model's config: another identity
    try:
        with pytest.raises(KilnError, match="another model"):
            kiln.generate(model, tok, DOC, max_tokens=2, prompt_cache=path)
    finally:
        model.args.rope_theta -= 1


def _format_1(data: bytes) -> bytes:
    """A format-2 file rewritten as format 1 wrote it: no version and no bases in the header."""
    start = len(prompt_cache.MAGIC)
    (size,) = struct.unpack_from("<Q", data, start)
    header = json.loads(data[start + 8:start + 8 + size])
    for key in ("version", "basis_k", "basis_v"):
        header.pop(key)
    head = json.dumps(header).encode()
    return prompt_cache.MAGIC + struct.pack("<Q", len(head)) + head + data[start + 8 + size:]


def test_a_format_1_file_of_a_dense_cache_still_loads(qwen, tmp_path):
    """Only q8_0 / q4_0 changed layout (stored rotated): a format-1 file of the model's own dtype still loads."""
    model, tok = qwen
    path = tmp_path / "dense.kpc"
    prompt_cache.cache_prompt(model, tok, DOC, path)
    path.write_bytes(_format_1(path.read_bytes()))
    fresh = kiln.generate(model, tok, DOC + " Answer:", max_tokens=4)
    assert kiln.generate(model, tok, DOC + " Answer:", max_tokens=4, prompt_cache=path) == fresh
