"""`kiln convert SRC OUT --to gguf --type T`: a GGUF file re-quantized with kiln's own quantizers.

Owns: the file types (`FILE_TYPES`: f32 ... q8_0, q2_k, q3_k_s/m/l, q4_k_s/m, q5_k_s/m, q6_k, iq4_nl,
iq4_xs), the per-tensor choice (`tensor_type`: llama.cpp's `llama_tensor_get_type` / `_impl` rules for the
file types kiln writes, on dense models — attn_v, ffn_down, attn_output and the output head by layer, GQA
ratio and importance matrix — its fallbacks for rows that are not a multiple of the block,
`--tensor-type REGEX=TYPE`, `--output-tensor-type`, `--token-embedding-type`, `--pure`), handing each
tensor its importance-matrix row (`--imatrix`), and writing the file with gguf-py's `GGUFWriter`: the
source's metadata (tokenizer, chat template, everything) copied, `general.file_type` set, written to a
temporary name in the output's folder and renamed at the end.
Not: the block math (kiln/quant/quantize.py), reading GGUF (kiln/formats/gguf.py), importance matrix files
(kiln/imatrix.py), Hugging Face folders as a source (not yet), MoE / Falcon / 70B special cases of the mix.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from kiln.errors import KilnError

_T = gguf.GGMLQuantizationType
_F = gguf.LlamaFileType

# --type name -> (default tensor type, llama.cpp's file type); the per-tensor mix is `_mixed_type`
FILE_TYPES = {
    "f32": (_T.F32, _F.ALL_F32), "f16": (_T.F16, _F.MOSTLY_F16), "bf16": (_T.BF16, _F.MOSTLY_BF16),
    "q8_0": (_T.Q8_0, _F.MOSTLY_Q8_0), "q4_0": (_T.Q4_0, _F.MOSTLY_Q4_0), "q4_1": (_T.Q4_1, _F.MOSTLY_Q4_1),
    "q5_0": (_T.Q5_0, _F.MOSTLY_Q5_0), "q5_1": (_T.Q5_1, _F.MOSTLY_Q5_1),
    "q2_k": (_T.Q2_K, _F.MOSTLY_Q2_K), "q3_k_s": (_T.Q3_K, _F.MOSTLY_Q3_K_S),
    "q3_k_m": (_T.Q3_K, _F.MOSTLY_Q3_K_M), "q3_k_l": (_T.Q3_K, _F.MOSTLY_Q3_K_L),
    "q4_k_s": (_T.Q4_K, _F.MOSTLY_Q4_K_S), "q4_k_m": (_T.Q4_K, _F.MOSTLY_Q4_K_M),
    "q5_k_s": (_T.Q5_K, _F.MOSTLY_Q5_K_S), "q5_k_m": (_T.Q5_K, _F.MOSTLY_Q5_K_M),
    "q6_k": (_T.Q6_K, _F.MOSTLY_Q6_K), "iq4_nl": (_T.IQ4_NL, _F.MOSTLY_IQ4_NL),
    "iq4_xs": (_T.IQ4_XS, _F.MOSTLY_IQ4_XS),
}

# llama.cpp's tensor_type_fallback when a row is not a multiple of the type's block (types kiln writes)
_FALLBACK = {_T.IQ4_XS: _T.IQ4_NL, _T.Q2_K: _T.Q4_0, _T.Q3_K: _T.Q4_0, _T.Q4_K: _T.Q5_0, _T.Q5_K: _T.Q5_1,
             _T.Q6_K: _T.Q8_0}
_FLOATS = (_T.F32, _T.F16, _T.BF16)


@dataclass(frozen=True)
class MixInfo:
    """What llama.cpp's mix rules read from the whole model: layers, n_head / n_head_kv, a separate output
    tensor (else the token embedding is tied to it), and whether an importance matrix is in use."""
    n_layer: int
    has_output: bool = True
    n_gqa: int = 1
    has_imatrix: bool = False


def parse_type(name: str) -> int:
    """A tensor type name (q8_0, Q6_K, f16, ...) as a GGMLQuantizationType that kiln can write."""
    from kiln.quant.quantize import QUANTIZABLE
    try:
        t = _T[name.upper()]
    except KeyError:
        t = None
    if t not in QUANTIZABLE:
        raise KilnError(f"unknown or unsupported tensor type {name!r}; kiln writes "
                        + ", ".join(sorted(x.name.lower() for x in QUANTIZABLE)))
    return t


def _use_more_bits(i: int, n: int) -> bool:
    # llama.cpp: the first and last eighth of the layers, and every third layer between them
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _layer(name: str) -> int | None:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _category(name: str) -> str:
    """llama.cpp's tensor_get_category (attn_qkv and attn_kv_b count as attn_v, as its mix treats them)."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
                     ("attn_output.weight", "attn_output"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def _output_type(t: int, ncols: int) -> int:
    if ncols % gguf.GGML_QUANT_SIZES[_T(t)][0]:
        return _T.Q8_0
    return t if t == _T.Q8_0 else _T.Q6_K


def _attn_v_type(t: int, ftype: str, i: int, mix: MixInfo) -> int:
    if ftype == "q2_k":
        return _T.Q4_K if mix.n_gqa >= 4 else _T.Q3_K
    if ftype == "q3_k_m":
        return _T.Q5_K if i < 2 else _T.Q4_K
    if ftype == "q3_k_l" or (ftype in ("iq4_nl", "iq4_xs") and mix.n_gqa >= 4):
        return _T.Q5_K
    if ftype in ("q4_k_m", "q5_k_m") and _use_more_bits(i, mix.n_layer):
        return _T.Q6_K
    if ftype == "q4_k_s" and i < 4:
        return _T.Q5_K
    return t


def _ffn_down_type(t: int, ftype: str, i: int, mix: MixInfo) -> int:
    n = mix.n_layer
    rules = {
        "q2_k": _T.Q3_K,
        "q3_k_m": _T.Q5_K if i < n // 16 else _T.Q4_K,
        "q3_k_l": _T.Q5_K,
        "q4_k_m": _T.Q6_K if _use_more_bits(i, n) else t,
        "iq4_nl": _T.Q5_K if i < n // 8 and not mix.has_imatrix else t,
        "iq4_xs": _T.Q5_K if i < n // 8 and not mix.has_imatrix else t,
        "q5_k_m": _T.Q6_K if _use_more_bits(i, n) else t,
        "q4_k_s": _T.Q5_K if i < n // 8 else t,
        "q4_0": _T.Q4_1 if mix.has_imatrix and i < n // 8 else t,
        "q5_0": _T.Q5_1 if mix.has_imatrix and i < n // 8 else t,
    }
    return rules.get(ftype, t)


def _mixed_type(name: str, ncols: int, t: int, ftype: str, mix: MixInfo, output_type) -> int:
    """llama_tensor_get_type_impl for the file types kiln writes (dense models; not Falcon's or the
    8-expert and 70B special cases)."""
    cat = _category(name)
    i = _layer(name) or 0
    if cat == "output" or (cat == "token_embd" and not mix.has_output):
        return output_type if output_type is not None else _output_type(t, ncols)
    if cat == "attn_v":
        return _attn_v_type(t, ftype, i, mix)
    if cat == "ffn_down":
        return _ffn_down_type(t, ftype, i, mix)
    if cat == "attn_output":
        return {"q2_k": _T.Q3_K, "q3_k_m": _T.Q4_K, "q3_k_l": _T.Q5_K}.get(ftype, t)
    return t


def _fallback(t: int, ncols: int) -> int:
    if ncols % gguf.GGML_QUANT_SIZES[_T(t)][0] == 0:
        return t
    t = _FALLBACK.get(t, t)
    return t if ncols % gguf.GGML_QUANT_SIZES[_T(t)][0] == 0 else _T.F16


def tensor_type(name: str, shape: tuple[int, ...], ftype: str, mix: MixInfo, overrides=(), output_type=None,
                embd_type=None, pure: bool = False) -> int:
    """The GGUF type of tensor `name` (torch shape (rows, n)) in a file of type `ftype`: llama.cpp's
    llama_tensor_get_type (overrides, then the mix, then the fallback for rows that are not a multiple of
    the type's block)."""
    base = FILE_TYPES[ftype][0]
    if len(shape) < 2 or not name.endswith(".weight"):
        return _T.F32  # norms and biases stay float32, as llama.cpp keeps them
    cat = _category(name)
    if embd_type is not None and cat == "token_embd":
        return embd_type
    if output_type is not None and cat == "output":
        return output_type
    if base in _FLOATS:
        return base
    for pattern, forced in overrides:
        if re.search(pattern, name):
            return _fallback(forced, shape[-1])
    t = base if pure else _mixed_type(name, shape[-1], base, ftype, mix, output_type)
    return _fallback(t, shape[-1])


def _copy_metadata(src: str, writer: gguf.GGUFWriter, ftype: int):
    reader = gguf.GGUFReader(src)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(int(ftype))


def _n_gqa(g) -> int:
    heads, kv = (g.meta.get(f"{g.arch}.attention.{k}") for k in ("head_count", "head_count_kv"))
    if not isinstance(heads, int) or not isinstance(kv, int) or kv <= 0:
        return 1  # per-layer arrays (or missing): llama.cpp's n_gqa() of layer 0 is not reproduced
    return heads // kv


def _add_tensor(writer, name: str, q: np.ndarray, qt: int, shape):
    if qt == _T.F32:
        writer.add_tensor(name, q.view(np.float32).reshape(shape))
    elif qt == _T.F16:
        writer.add_tensor(name, q.view(np.float16).reshape(shape))
    else:
        writer.add_tensor(name, q.reshape(*shape[:-1], -1), raw_dtype=qt)


def _importance(imatrix: dict, name: str, ncols: int):
    w = imatrix.get(name)
    if w is None or w.numel() != ncols:
        return None  # llama.cpp too quantizes a tensor without an entry (or a per-expert one) without it
    return w


def convert_gguf(src, out, ftype: str = "q8_0", overrides=(), output_type=None, embd_type=None,
                 pure: bool = False, progress: bool = False, imatrix=None, deltas=None) -> Path:
    """Write the GGUF file `src` re-quantized to `ftype` at `out` (a temporary name, renamed at the end).
    `imatrix`: an importance matrix file (kiln/imatrix.py reads llama.cpp's GGUF and legacy .dat formats)
    or a dict {GGUF tensor name: per-column importance}. `deltas`: {GGUF tensor name: float32 tensor of its
    shape, in the file's row order} added to the dequantized tensor before quantizing (`kiln fuse`)."""
    from kiln.formats.gguf import read_gguf, write_file
    from kiln.imatrix import read_imatrix
    from kiln.progress import bar
    from kiln.quant import dequantize
    from kiln.quant.quantize import quantize

    if ftype not in FILE_TYPES:
        raise KilnError(f"unknown --type {ftype!r}; kiln writes " + ", ".join(FILE_TYPES))
    if imatrix is not None and not isinstance(imatrix, dict):
        imatrix = read_imatrix(imatrix)
    g = read_gguf(src)
    out = Path(out)
    n_layer = 1 + max((_layer(n) for n in g.tensors if _layer(n) is not None), default=-1)
    mix = MixInfo(n_layer, "output.weight" in g.tensors, _n_gqa(g), bool(imatrix))
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
    writer = gguf.GGUFWriter(str(tmp), g.arch)  # nothing is written before write_file
    _copy_metadata(str(src), writer, FILE_TYPES[ftype][1])
    for name, t in bar(list(g.tensors.items()), desc="quantizing", unit="tensor", enabled=progress):
        x = dequantize(t.data.reshape(-1), t.qtype, t.shape)       # file order: no row permutation
        if deltas and name in deltas:
            x = x + deltas[name].reshape(x.shape).to(x.dtype)
        qt = tensor_type(name, t.shape, ftype, mix, overrides=overrides, output_type=output_type,
                         embd_type=embd_type, pure=pure)
        w = _importance(imatrix, name, t.shape[-1]) if imatrix else None
        _add_tensor(writer, name, quantize(x.reshape(-1, t.shape[-1]), qt, w).numpy(), qt, t.shape)
        del x
    write_file(writer, tmp, out)
    return out


def parse_overrides(items) -> list[tuple[str, int]]:
    """`REGEX=TYPE` strings -> [(regex, type)], each checked."""
    result = []
    for item in items or ():
        pattern, sep, name = item.rpartition("=")
        if not sep or not pattern:
            raise KilnError(f"--tensor-type takes REGEX=TYPE, got {item!r}")
        try:
            re.compile(pattern)
        except re.error as e:
            raise KilnError(f"--tensor-type {item!r}: bad regular expression ({e})") from None
        result.append((pattern, parse_type(name)))
    return result
