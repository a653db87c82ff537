"""`kiln convert SRC OUT --to gguf --type T`: a GGUF file re-quantized with kiln's own quantizers.

Owns: the file types (`FILE_TYPES`: a GGUF type, or one of llama.cpp's per-tensor mixes for the _S/_M
K-quant types), the per-tensor choice (`tensor_type`: llama.cpp's `llama_tensor_get_type` rules for the
mixes kiln writes, its fallbacks for rows that are not a multiple of 256, `--tensor-type REGEX=TYPE`,
`--output-tensor-type`, `--token-embedding-type`, `--pure`), and writing the file with gguf-py's
`GGUFWriter`: the source's metadata (tokenizer, chat template, everything) copied, `general.file_type`
set, written to a temporary name in the output's folder and renamed at the end.
Not: the block math (kiln/quant/quantize.py), reading GGUF (kiln/formats/gguf.py), Hugging Face folders
as a source (not yet), importance matrices (not yet).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import gguf
import numpy as np

from kiln.errors import KilnError

_T = gguf.GGMLQuantizationType
_F = gguf.LlamaFileType

# --type name -> (default tensor type, llama.cpp's file type, mix rule or None)
FILE_TYPES = {
    "f32": (_T.F32, _F.ALL_F32, None), "f16": (_T.F16, _F.MOSTLY_F16, None),
    "bf16": (_T.BF16, _F.MOSTLY_BF16, None), "q8_0": (_T.Q8_0, _F.MOSTLY_Q8_0, None),
    "q4_0": (_T.Q4_0, _F.MOSTLY_Q4_0, None), "q4_1": (_T.Q4_1, _F.MOSTLY_Q4_1, None),
    "q5_0": (_T.Q5_0, _F.MOSTLY_Q5_0, None), "q5_1": (_T.Q5_1, _F.MOSTLY_Q5_1, None),
    "q6_k": (_T.Q6_K, _F.MOSTLY_Q6_K, None),
    "q4_k_s": (_T.Q4_K, _F.MOSTLY_Q4_K_S, "s"), "q4_k_m": (_T.Q4_K, _F.MOSTLY_Q4_K_M, "m"),
    "q5_k_s": (_T.Q5_K, _F.MOSTLY_Q5_K_S, "s"), "q5_k_m": (_T.Q5_K, _F.MOSTLY_Q5_K_M, "m"),
}

# llama.cpp's fallback when a row is not a multiple of the 256-weight super-block (for the types kiln writes)
_FALLBACK = {_T.Q4_K: _T.Q5_0, _T.Q5_K: _T.Q5_1, _T.Q6_K: _T.Q8_0}


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


def tensor_type(name: str, shape: tuple[int, ...], ftype: str, n_layer: int, has_output: bool,
                overrides=(), output_type=None, embd_type=None, pure: bool = False) -> int:
    """The GGUF type of tensor `name` (torch shape (rows, n)) in a file of type `ftype`."""
    base, _, mix = FILE_TYPES[ftype]
    if len(shape) < 2 or not name.endswith(".weight"):
        return _T.F32  # norms and biases stay float32, as llama.cpp keeps them
    t = base
    is_output = name == "output.weight" or (not has_output and name == "token_embd.weight")
    if not pure:
        i = _layer(name)
        if is_output and mix:
            t = _T.Q6_K
        elif mix == "m" and i is not None and (".attn_v." in name or ".ffn_down." in name) \
                and _use_more_bits(i, n_layer):
            t = _T.Q6_K
        elif mix == "s" and base == _T.Q4_K and ".ffn_down." in name and i is not None and i < n_layer // 8:
            t = _T.Q5_K
        if output_type is not None and name == "output.weight":
            t = output_type
        if embd_type is not None and name == "token_embd.weight":
            t = embd_type
    for pattern, forced in overrides:
        if re.search(pattern, name):
            t = forced
            break
    block = gguf.GGML_QUANT_SIZES[_T(t)][0]
    if shape[-1] % block:
        t = _FALLBACK.get(t, t)
        if shape[-1] % gguf.GGML_QUANT_SIZES[_T(t)][0]:
            t = _T.F16
    return t


def _copy_metadata(src: str, writer: gguf.GGUFWriter, ftype: int):
    reader = gguf.GGUFReader(src)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(int(ftype))


def convert_gguf(src, out, ftype: str = "q8_0", overrides=(), output_type=None, embd_type=None,
                 pure: bool = False, progress: bool = False) -> Path:
    """Write the GGUF file `src` re-quantized to `ftype` at `out` (a temporary name, renamed at the end)."""
    from kiln.formats.gguf import read_gguf
    from kiln.progress import bar
    from kiln.quant import dequantize
    from kiln.quant.quantize import quantize

    if ftype not in FILE_TYPES:
        raise KilnError(f"unknown --type {ftype!r}; kiln writes " + ", ".join(FILE_TYPES))
    g = read_gguf(src)
    out = Path(out)
    n_layer = 1 + max((_layer(n) for n in g.tensors if _layer(n) is not None), default=-1)
    has_output = "output.weight" in g.tensors
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
    writer = gguf.GGUFWriter(str(tmp), g.arch)
    try:
        _copy_metadata(str(src), writer, FILE_TYPES[ftype][1])
        for name, t in bar(list(g.tensors.items()), desc="quantizing", unit="tensor", enabled=progress):
            x = dequantize(t.data.reshape(-1), t.qtype, t.shape)       # file order: no row permutation
            qt = tensor_type(name, t.shape, ftype, n_layer, has_output, overrides, output_type,
                             embd_type, pure)
            q = quantize(x.reshape(-1, t.shape[-1]), qt).numpy()
            if qt == _T.F32:
                arr = q.view(np.float32).reshape(t.shape)
                writer.add_tensor(name, arr)
            elif qt == _T.F16:
                writer.add_tensor(name, q.view(np.float16).reshape(t.shape))
            else:
                writer.add_tensor(name, q.reshape(*t.shape[:-1], -1), raw_dtype=qt)
            del x
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
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
