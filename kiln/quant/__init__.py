"""Turn a GGUF tensor's raw bytes into a torch tensor: `dequantize(data, qtype, shape, dtype)`.

Owns: the table of supported GGUF tensor types (`SUPPORTED`), their names (`type_name`) and byte sizes
(`nbytes`), input checks that raise `KilnError`, the plain float types (F32, F16, BF16), and the chunked
loop that feeds blocks to the per-format dequantizers and writes into one preallocated output.
Not: the block layouts themselves (legacy.py, kquants.py, iquants.py, one `dequantize_<type>` each), reading
GGUF files (kiln/formats/gguf.py), quantizing, or quantized matmul.

Results are bit-identical in float32 to gguf-py's `gguf.quants.dequantize`; any other `dtype` is that
float32 result rounded once. The output never aliases `data`, which is never written.
"""

import math

import gguf
import torch

from kiln.errors import KilnError
from kiln.quant import iquants, kquants, legacy

_T = gguf.GGMLQuantizationType

# Weights dequantized per step. Each step's temporaries (unpacked codes; a float32 result only for other
# output dtypes) are a few bytes per weight, so peak memory is the output plus tens of MiB. Measured on 2
# threads, steps of 1M-4M run within ~30% of each other, no size best for every type. Larger steps mean
# fewer ops (each one a thread hand-off, costly on a busy CPU), but from 8M on Q6_K's temporaries leave
# the caches and it runs ~30% slower.
CHUNK_WEIGHTS = 1 << 22


def _dequantize_f32(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return legacy.into(out, legacy.words(blocks, torch.float32))


def _dequantize_f16(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return legacy.into(out, legacy.words(blocks, torch.float16))


def _dequantize_bf16(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    # bf16 is the top half of a float32: widen the bits, shift them up, reread as float32.
    return legacy.into(out, (legacy.words(blocks, torch.int16).int() << 16).view(torch.float32))


# Ordered as users meet them: plain floats, legacy, K-quants, non-linear 4-bit. Each maps
# (N, type_size) uint8 -> (N, block_size) float32, written into `out=` when given.
_DEQUANTIZERS = {
    _T.F32: _dequantize_f32,
    _T.F16: _dequantize_f16,
    _T.BF16: _dequantize_bf16,
    _T.Q4_0: legacy.dequantize_q4_0,
    _T.Q4_1: legacy.dequantize_q4_1,
    _T.Q5_0: legacy.dequantize_q5_0,
    _T.Q5_1: legacy.dequantize_q5_1,
    _T.Q8_0: legacy.dequantize_q8_0,
    _T.Q2_K: kquants.dequantize_q2_k,
    _T.Q3_K: kquants.dequantize_q3_k,
    _T.Q4_K: kquants.dequantize_q4_k,
    _T.Q5_K: kquants.dequantize_q5_k,
    _T.Q6_K: kquants.dequantize_q6_k,
    _T.IQ4_NL: iquants.dequantize_iq4_nl,
    _T.IQ4_XS: iquants.dequantize_iq4_xs,
}

SUPPORTED: frozenset[int] = frozenset(int(t) for t in _DEQUANTIZERS)


def type_name(qtype: int) -> str:
    """GGUF's name for a tensor type id ('Q4_K'), or 'type 99' for an id gguf does not know."""
    try:
        return _T(qtype).name
    except ValueError:
        return f"type {qtype}"


def _sizes(qtype: int) -> tuple[int, int]:
    """(block_size, type_size) of a known type id; KilnError for an unknown one."""
    try:
        return gguf.GGML_QUANT_SIZES[_T(qtype)]
    except (ValueError, KeyError):
        raise KilnError(f"unknown GGUF tensor type id {qtype}; "
                        "the file is damaged or newer than this kiln's gguf package") from None


def _check_rows(qtype: int, shape: tuple[int, ...], block_size: int) -> None:
    row = shape[-1] if shape else 1
    if row % block_size:
        raise KilnError(f"{type_name(qtype)} tensor of shape {tuple(shape)}: row length {row} "
                        f"is not a multiple of its block size {block_size}")


def nbytes(qtype: int, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of this type and torch-order shape occupies in a GGUF file."""
    block_size, type_size = _sizes(qtype)
    _check_rows(qtype, shape, block_size)
    return math.prod(shape) // block_size * type_size


def _dequantizer(qtype: int):
    fn = _DEQUANTIZERS.get(qtype)
    if fn is None:
        supported = ", ".join(t.name for t in _DEQUANTIZERS)
        raise KilnError(f"tensor type {type_name(qtype)} is not supported by kiln (supported: {supported}); "
                        "use a GGUF file quantized to one of those")
    return fn


def _check_data(data: torch.Tensor, qtype: int, shape: tuple[int, ...]) -> None:
    if data.dtype != torch.uint8:
        raise KilnError(f"dequantize expects the tensor's raw bytes as uint8, got {data.dtype}")
    expected = nbytes(qtype, shape)
    if data.numel() != expected:
        raise KilnError(f"{type_name(qtype)} tensor of shape {tuple(shape)} needs {expected} bytes, "
                        f"got {data.numel()}; the file is truncated or its header is wrong")


def dequantize(data: torch.Tensor, qtype: int, shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
    """Raw GGUF bytes of one tensor (uint8) -> a new tensor of `shape` (torch order) in `dtype`."""
    fn = _dequantizer(qtype)
    _check_data(data, qtype, shape)
    block_size, type_size = _sizes(qtype)
    blocks = data.reshape(-1, type_size)                               # (n_blocks, type_size)
    out = torch.empty(tuple(shape), dtype=dtype)
    flat = out.view(-1, block_size)                                    # (n_blocks, block_size)
    step = max(1, CHUNK_WEIGHTS // block_size)
    for start in range(0, blocks.shape[0], step):
        chunk, target = blocks[start:start + step], flat[start:start + step]
        if dtype == torch.float32:
            fn(chunk, out=target)  # straight into the result: no float32 temporary, no extra copy
        else:
            target.copy_(fn(chunk))
    return out
