"""kiln's quantizers (kiln/quant/quantize.py) against gguf-py and llama.cpp.

Legacy and float types: byte-identical to gguf-py's `gguf.quants.quantize`, run live. K-quants (Q2_K ...
Q6_K) and IQ4_NL / IQ4_XS, without and with an importance matrix, and Q4_0 ... Q5_1 with one (llama.cpp's
own weighted quantizers, which gguf-py does not have): byte-identical, every block, to
llama.cpp's `ggml_quantize_chunk` bytes stored in tests/data/quant_refs.npz (tests/data/make_quant_refs.py;
CI does not build llama.cpp), on a seeded random tensor with the block math's edge cases and on rows of a
real tensor of the 0.5B model.
"""

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from kiln.errors import KilnError
from kiln.formats.gguf import read_gguf
from kiln.quant import dequantize
from kiln.quant.quantize import quantize
from tests.data.make_quant_refs import (LEGACY_IMATRIX_TYPES, REAL_ROWS, REAL_TENSOR, TYPES, importance,
                                        random_input)

T = gguf.GGMLQuantizationType
REFS = Path(__file__).parent / "data" / "quant_refs.npz"
TESTED_ROWS = 6  # of the real tensor's REAL_ROWS stored: 114 super-blocks per type, a few seconds on CPU


@pytest.fixture(scope="module")
def refs():
    with np.load(REFS, allow_pickle=False) as z:
        return {k: z[k] for k in z.files if k != "meta"} | {"meta": json.loads(str(z["meta"]))}


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0])
def test_matches_gguf_py(qtype):
    x = random_input()
    x[4, :8] = np.nan if qtype == T.BF16 else 0        # bf16 forces NaN quiet
    x[5, :32] = 1e-30                                   # scales that vanish in f16
    ours = quantize(torch.from_numpy(x), qtype).numpy()
    theirs = gguf.quants.quantize(x, qtype).view(np.uint8).reshape(ours.shape)
    assert ours.shape == theirs.shape and np.array_equal(ours, theirs)


def _compare(x: np.ndarray, theirs: np.ndarray, name: str, imatrix: np.ndarray | None):
    qtype = T[name]
    ours = quantize(torch.from_numpy(x), qtype, None if imatrix is None else torch.from_numpy(imatrix)).numpy()
    assert ours.shape == theirs.shape
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    same = (ours.reshape(-1, size) == theirs.reshape(-1, size)).all(1)
    print(f"{name}: {same.sum()} of {same.size} blocks identical")
    assert same.all(), f"{name}: blocks {np.nonzero(~same)[0][:8]} differ from llama.cpp's"


CASES = [(t, False) for t in TYPES] + [(t, True) for t in TYPES + LEGACY_IMATRIX_TYPES]
IDS = [f"{t}-{'imatrix' if i else 'plain'}" for t, i in CASES]


@pytest.mark.parametrize("name,imatrix", CASES, ids=IDS)
def test_quants_match_llama_cpp_random(refs, name, imatrix):
    x = random_input()
    key = f"random_{name}" + ("_imatrix" if imatrix else "")
    _compare(x, refs[key], name, importance(x.shape[1]) if imatrix else None)


@pytest.mark.model
@pytest.mark.parametrize("name,imatrix", CASES, ids=IDS)
def test_quants_match_llama_cpp_real(refs, qwen_path, name, imatrix):
    t = read_gguf(qwen_path).tensors[REAL_TENSOR]
    data = t.raw_rows()[:REAL_ROWS].reshape(-1)                        # the first rows' bytes
    x = dequantize(data, t.qtype, (REAL_ROWS, t.shape[1])).numpy()[:TESTED_ROWS]
    key = f"real_{name}" + ("_imatrix" if imatrix else "")
    _compare(x, refs[key][:TESTED_ROWS], name, importance(x.shape[1]) if imatrix else None)


def test_bad_input_is_a_kiln_error():
    with pytest.raises(KilnError, match="multiple"):
        quantize(torch.zeros(3, 100), T.Q4_K)
    with pytest.raises(KilnError, match="cannot quantize"):
        quantize(torch.zeros(3, 256), T.IQ2_XXS)
    with pytest.raises(KilnError, match="importance matrix"):
        quantize(torch.zeros(3, 256), T.Q4_K, torch.ones(128))


def test_best_index_iq4_lookup_equals_search():
    """The table lookup of best_index_iq4 against its binary-search twin, at and beside every midpoint."""
    from kiln.quant.qmath import best_index_iq4, best_index_iq4_ref
    v = torch.cat([torch.randn(1 << 16) * 100, torch.arange(-300, 300, 0.25),
                   torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e30, -1e30])])
    v = torch.cat([v, torch.nextafter(v, torch.tensor(float("inf"))), torch.nextafter(v, torch.tensor(-float("inf")))])
    assert torch.equal(best_index_iq4(v), best_index_iq4_ref(v))
