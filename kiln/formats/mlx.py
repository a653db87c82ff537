"""mlx-lm's quantized folders, read through the safetensors path: config.json's `quantization` block and
each quantized layer's three tensors `X.weight` (uint32 codes), `X.scales`, `X.biases`.

Owns: parsing and checking the `quantization` block (`parse`: group_size, bits, mode affine, per-layer
overrides keyed by module path: a dict of their own, or false for a layer left in float), grouping a
folder's tensors into quantized weights (`group` -> `Quantized`: where its tensors are, its bits, group size
and (rows, inputs) shape), and turning one into what the loader takes (`materialize`):
  4 and 5 bits: GGUF Q4_1 / Q5_1 bytes (quant/mlx.to_blocks, exact: a group is G / 32 blocks with its scale
    and bias), so kiln's quantized matmuls run them (QuantLinear on GPUs, the int4 rows on the CPU) and the
    exact fp32 path dequantizes them. The blocks keep scale and bias in f16, which is not always exact:
    bf16 values in f16's normal range fit exactly (in the real 0.5B's bf16 4-bit folder from mlx_lm.convert,
    2 of its 19.7M scales and biases are f16 subnormals that round; logits over 256 tokens unchanged, KL 0),
    float32 ones round to 11 bits (its float32 folder: mean KL 4e-6 against mlx-lm's logits,
    tests/test_mlx.py); a tensor whose values overflow f16 or underflow to 0 there is dequantized instead.
  2, 3, 6, 8 bits: dequantized to float at load, bit-identical to `mx.dequantize` (no kernel here packs
    those widths).
Not: the bit layout (quant/mlx.py), finding shards and reading headers (safetensors.py), writing (convert_mlx.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kiln.errors import KilnError, short
from kiln.quant import mlx as affine

_FLOATS = ("F32", "F16", "BF16")
_PARTS = ("weight", "scales", "biases")


@dataclass(frozen=True)
class Scheme:
    """The folder's quantization: a default (bits, group size) and per-module overrides (None: float)."""
    default: tuple[int, int]
    layers: dict

    def of(self, module: str):
        return self.layers.get(module, self.default)


@dataclass(frozen=True)
class Quantized:
    """One quantized layer's weight: its three stored tensors ((file, stored name) each), bits, group size."""
    where: dict
    bits: int
    group_size: int
    shape: tuple[int, int]  # (R, K): rows, inputs, as the float weight had


def parse(cfg: dict, cfg_path: Path, text_name) -> Scheme | None:
    """The Scheme of a config.json (None when it has no quantization); KilnError for quantization kiln does
    not read. `text_name` maps a stored tensor name to kiln's (multimodal prefixes)."""
    q = cfg.get("quantization")
    if q is None:
        if "quantization_config" in cfg:
            qc = cfg["quantization_config"]
            method = qc.get("quant_method") if isinstance(qc, dict) else None
            raise KilnError(f"{cfg_path}: quantization_config {short(method or qc)} is not mlx's affine "
                            f"quantization; kiln reads quantized safetensors only as mlx-lm writes them "
                            f"(config.json `quantization`); use the float folder or a GGUF file")
        return None
    if not isinstance(q, dict):
        raise KilnError(f"{cfg_path}: quantization is {short(q)}, not a JSON object")
    default = _params(q, cfg_path, "")
    layers = {}
    for key, v in q.items():
        if key in ("group_size", "bits", "mode") or v is True:
            continue
        name = text_name(f"{key}.weight")
        if name is None:
            continue
        module = name.removesuffix(".weight")
        layers[module] = None if v is False else _params(v, cfg_path, f"{key}: ")
    return Scheme(default, layers)


def _params(q, cfg_path: Path, where: str) -> tuple[int, int]:
    if not isinstance(q, dict):
        raise KilnError(f"{cfg_path}: quantization {where}{short(q)} is not a JSON object")
    mode = q.get("mode", "affine")
    if mode != "affine":
        raise KilnError(f"{cfg_path}: quantization {where}mode {short(mode)} is not supported; kiln reads mlx's "
                        f"affine quantization (mode affine)")
    bits, group = q.get("bits"), q.get("group_size")
    affine.check(bits, group, f"{cfg_path}: {where}")
    return bits, group


def group(entries: dict, scheme: Scheme, path: Path) -> tuple[dict, dict]:
    """entries {name: (file, stored, shape, dtype)} -> (the float entries, {X.weight: Quantized})."""
    plain, quantized = dict(entries), {}
    for name in [n for n in entries if n.endswith(".scales")]:
        module = name.removesuffix(".scales")
        parts = {p: entries.get(f"{module}.{p}") for p in _PARTS}
        missing = [p for p, e in parts.items() if e is None]
        if missing:
            raise KilnError(f"{path}: {short(name)} has no {module}.{missing[0]} beside it; a quantized layer "
                            f"needs {', '.join(_PARTS)} (the folder is incomplete)")
        bits_group = scheme.of(module)
        if bits_group is None:
            raise KilnError(f"{path}: config.json leaves {short(module)} unquantized, but the folder holds "
                            f"its scales; config and weights disagree")
        quantized[f"{module}.weight"] = _quantized(module, parts, *bits_group)
        for p in _PARTS:
            del plain[f"{module}.{p}"]
    for name, (_, _, _, dtype) in plain.items():
        if name.endswith(".biases") or dtype == "U32":
            module = name.rsplit(".", 1)[0]
            raise KilnError(f"{path}: {short(name)} is part of a quantized layer, but {module}.scales is "
                            f"missing; a quantized layer needs {', '.join(_PARTS)} (the folder is incomplete)")
    return plain, quantized


def _quantized(module: str, parts: dict, bits: int, group_size: int) -> Quantized:
    (_, _, wshape, wdtype), (_, _, sshape, sdtype), (_, _, bshape, bdtype) = (parts[p] for p in _PARTS)
    if wdtype != "U32" or sdtype not in _FLOATS or bdtype != sdtype:
        raise KilnError(f"quantized layer {short(module)} is stored as weight {wdtype}, scales {sdtype}, "
                        f"biases {bdtype}; mlx writes weight U32 and scales and biases in one float type")
    if len(wshape) != 2 or len(sshape) != 2 or bshape != sshape or wshape[0] != sshape[0]:
        raise KilnError(f"quantized layer {short(module)} has weight {wshape}, scales {sshape}, biases "
                        f"{bshape}; kiln reads 2-D quantized weights with one scale and bias per group")
    k = sshape[1] * group_size
    if wshape[1] * 32 != k * bits:
        raise KilnError(f"quantized layer {short(module)}: weight {wshape} does not hold {sshape[1]} groups of "
                        f"{group_size} at {bits} bits ({k * bits // 32} words a row); config.json's "
                        f"quantization and the weights disagree")
    return Quantized({p: parts[p][:2] for p in _PARTS}, bits, group_size, (wshape[0], k))


def materialize(q: Quantized, read, name: str):
    """What the loader takes for one quantized weight: a GGUFTensor of Q4_1 / Q5_1 blocks, or a dense
    tensor in the scales' dtype. `read(file, stored)` reads one stored tensor."""
    from kiln.formats.gguf import GGUFTensor
    wq, scales, biases = (read(*q.where[p]) for p in _PARTS)
    if q.bits in affine.BLOCK_TYPES and affine.f16_fits(scales, biases)[0]:
        blocks = affine.to_blocks(wq, scales, biases, q.bits, q.group_size)   # (R, row bytes)
        return GGUFTensor(name, q.shape, affine.BLOCK_TYPES[q.bits], blocks.reshape(-1))
    return affine.dequantize(wq, scales, biases, q.bits, q.group_size)
