"""Tests for kiln.quant: every supported GGUF tensor type dequantizes bit-identically to gguf-py.

Owns: random-block comparisons against `gguf.quants.dequantize`, plain-float round trips, chunking and
alignment edge cases, output dtypes, and the KilnError paths. Not: reading real GGUF files (tests for
kiln/formats) or speed (bench/).
"""

import gguf
import numpy as np
import pytest
import torch

import kiln.quant as kq
from kiln.errors import KilnError

T = gguf.GGMLQuantizationType

# Byte offsets of the f16 scale fields in each block: random bytes there would make inf/NaN scales.
F16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
    T.IQ4_NL: [0], T.IQ4_XS: [0],
}


def random_blocks(qtype: int, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random raw bytes of a (rows, cols) tensor with finite f16 scales: (rows, row_bytes) uint8."""
    rng = np.random.default_rng(seed)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows * cols // block_size, type_size), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        # Magnitudes from 1e-4 to 1, both signs, like real scales (and far from f16 overflow).
        scale = (rng.standard_normal(len(blocks)) * 10.0 ** rng.uniform(-4, 0, len(blocks))).astype(np.float16)
        blocks[:, offset:offset + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def reference(raw: np.ndarray, qtype: int) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, T(qtype))))


def kiln_dequantize(raw: np.ndarray, qtype: int, shape, **kw) -> torch.Tensor:
    return kq.dequantize(torch.from_numpy(raw).reshape(-1), qtype, shape, **kw)


def shape_for(qtype: int, rows: int) -> tuple[int, int]:
    block_size = gguf.GGML_QUANT_SIZES[qtype][0]
    return rows, 2 * block_size


@pytest.mark.parametrize("rows", [3, 5])
@pytest.mark.parametrize("qtype", list(F16_FIELDS), ids=lambda t: t.name)
def test_matches_gguf_py_bit_exact(qtype, rows):
    shape = shape_for(qtype, rows)
    raw = random_blocks(qtype, *shape, seed=rows)
    got = kiln_dequantize(raw, qtype, shape)
    assert got.dtype == torch.float32 and got.shape == shape
    assert torch.equal(got, reference(raw, qtype))


def test_supported_covers_every_tested_type():
    plain = {T.F32, T.F16, T.BF16}
    assert kq.SUPPORTED == frozenset(int(t) for t in set(F16_FIELDS) | plain)


def test_many_blocks_across_chunks(monkeypatch):
    # 4096 Q4_K blocks, split into 1000-block chunks so the last chunk is partial.
    monkeypatch.setattr(kq, "CHUNK_WEIGHTS", 1000 * 256)
    shape = (16, 256 * 256)
    raw = random_blocks(T.Q4_K, *shape, seed=7)
    assert torch.equal(kiln_dequantize(raw, T.Q4_K, shape), reference(raw, T.Q4_K))


@pytest.mark.parametrize("qtype", [T.Q5_0, T.Q6_K, T.F32], ids=lambda t: t.name)
@pytest.mark.parametrize("chunk_weights", [1, 1 << 20])
def test_unaligned_input_and_one_block_chunks(qtype, chunk_weights, monkeypatch):
    # Bytes at an odd offset inside a bigger buffer, chunks of one block or of the whole tensor: same answer.
    monkeypatch.setattr(kq, "CHUNK_WEIGHTS", chunk_weights)
    if qtype == T.F32:
        shape, raw = (2, 8), (np.arange(16, dtype=np.float32) - 5).view(np.uint8).reshape(2, -1)
    else:
        shape = shape_for(qtype, 2)
        raw = random_blocks(qtype, *shape)
    buffer = torch.zeros(raw.size + 3, dtype=torch.uint8)
    buffer[1:1 + raw.size] = torch.from_numpy(raw).reshape(-1)
    assert torch.equal(kq.dequantize(buffer[1:1 + raw.size], qtype, shape), reference(raw, qtype))


def test_input_bytes_untouched_and_output_not_aliased():
    raw = random_blocks(T.Q3_K, 2, 512)
    data = torch.from_numpy(raw.copy()).reshape(-1)
    kq.dequantize(data, T.Q3_K, (2, 512))
    assert np.array_equal(data.numpy(), raw.reshape(-1))
    f32 = torch.arange(8, dtype=torch.float32)
    out = kq.dequantize(f32.view(torch.uint8), T.F32, (8,))
    out.zero_()
    assert torch.equal(f32, torch.arange(8, dtype=torch.float32))


def test_f32_f16_round_trip():
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    got = kiln_dequantize(x.view(np.uint8), T.F32, x.shape)
    assert torch.equal(got, torch.from_numpy(x))
    h = x.astype(np.float16)
    got = kiln_dequantize(h.view(np.uint8), T.F16, h.shape)
    assert torch.equal(got, torch.from_numpy(h.astype(np.float32)))


def test_bf16_round_trip():
    x = np.random.default_rng(2).standard_normal((3, 32)).astype(np.float32)
    bits = (x.view(np.uint32) >> 16).astype(np.uint16)                  # truncate to bf16
    expected = (bits.astype(np.uint32) << 16).view(np.float32)
    got = kiln_dequantize(bits.view(np.uint8), T.BF16, x.shape)
    assert torch.equal(got, torch.from_numpy(expected))
    assert torch.equal(got, reference(bits.view(np.uint8), T.BF16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q8_0, T.IQ4_XS, T.BF16], ids=lambda t: t.name)
def test_output_dtype_is_float32_result_cast(qtype, dtype):
    shape = (3, 512)
    if qtype == T.BF16:
        raw = np.random.default_rng(3).integers(0, 1 << 14, shape, dtype=np.uint16).view(np.uint8)
    else:
        raw = random_blocks(qtype, *shape)
    full = kiln_dequantize(raw, qtype, shape)
    got = kiln_dequantize(raw, qtype, shape, dtype=dtype)
    assert got.dtype == dtype and torch.equal(got, full.to(dtype))


@pytest.mark.parametrize("qtype, name", [(T.IQ2_XXS, "IQ2_XXS"), (99, "type 99"), (T.I32, "I32")])
def test_unsupported_type_is_named(qtype, name):
    with pytest.raises(KilnError, match=f"tensor type {name} is not supported by kiln") as err:
        kq.dequantize(torch.zeros(66 * 2, dtype=torch.uint8), qtype, (2, 256))
    assert "supported: F32, F16, BF16, Q4_0" in str(err.value) and "IQ4_XS" in str(err.value)


def test_wrong_byte_count():
    raw = random_blocks(T.Q4_0, 2, 64).reshape(-1)
    with pytest.raises(KilnError, match="Q4_0 tensor of shape \\(2, 64\\) needs 72 bytes, got 71"):
        kq.dequantize(torch.from_numpy(raw[:-1]), T.Q4_0, (2, 64))


def test_row_not_multiple_of_block_and_non_bytes():
    with pytest.raises(KilnError, match="row length 48 is not a multiple of its block size 32"):
        kq.dequantize(torch.zeros(54, dtype=torch.uint8), T.Q4_0, (2, 48))
    with pytest.raises(KilnError, match="uint8"):
        kq.dequantize(torch.zeros(4), T.F32, (4,))


def test_type_name_and_nbytes():
    assert kq.type_name(T.Q4_K) == "Q4_K" and kq.type_name(12) == "Q4_K"
    assert kq.type_name(99) == "type 99"
    assert kq.nbytes(T.Q4_K, (2, 512)) == 2 * 2 * 144
    assert kq.nbytes(T.F16, (3, 5)) == 30
    assert kq.nbytes(T.IQ2_XXS, (1, 256)) == 66                        # known even if not dequantizable
    with pytest.raises(KilnError, match="99"):
        kq.nbytes(99, (1, 256))
