"""`kiln convert`: a GGUF file to a Hugging Face folder (config.json, safetensors, tokenizer files).

Owns: writing a folder that transformers and kiln's safetensors path both read: weights dequantized to
the chosen dtype under Hugging Face names, config.json from the GGUF metadata, tokenizer.json from the
GGUF vocabulary, tokenizer_config.json (chat template, BOS/EOS) and generation_config.json.
Not: quantizing into GGUF (`--to gguf` is kiln/quantize.py) or into an mlx-lm folder (`--to mlx` is
kiln/convert_mlx.py); main() only dispatches to them. The reverse direction.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kiln.errors import KilnError


def gguf_to_hf(src, out_dir, dtype=torch.float32, progress: bool = False) -> Path:
    from kiln.formats.gguf import hf_tensors, read_gguf, to_config
    from kiln.formats.safetensors import hf_config, write_folder
    from kiln.progress import bar
    from kiln.reader import materialize
    from kiln.tokenizer import Tokenizer

    g = read_gguf(src)
    config = to_config(g)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = hf_tensors(g, config)
    state = {name: materialize(w, name, None, "cpu", dtype).contiguous()
             for name, w in bar(list(weights.items()), desc="converting", unit="tensor", enabled=progress)}
    write_folder(out, state, hf_config(config, dtype), Tokenizer.from_gguf(g.meta))
    return out


def main(argv: list[str]) -> int:
    from kiln.commands import _Parser
    from kiln.quantize import FILE_TYPES
    p = _Parser(prog="kiln convert", description="Convert a GGUF file to a Hugging Face safetensors folder "
                "(--to hf, the default), re-quantize it into a GGUF file (--to gguf), or quantize a GGUF file "
                "or a Hugging Face folder into the folder `mlx_lm.convert -q` writes (--to mlx).")
    p.add_argument("model", help="GGUF file or built-in name (--to mlx: also a Hugging Face folder)")
    p.add_argument("out", help="output folder (--to hf, --to mlx) or file (--to gguf)")
    p.add_argument("--to", choices=("hf", "gguf", "mlx"), default="hf", help="what to write (default hf)")
    p.add_argument("--dtype", help="--to hf: float32, bfloat16 or float16 (default float32); --to mlx: the "
                   "dtype of scales, biases and unquantized tensors (default bfloat16)")
    p.add_argument("--q-bits", type=int, default=4, choices=(2, 3, 4, 5, 6, 8),
                   help="--to mlx: bits per weight (default 4). kiln runs 4- and 5-bit folders on its "
                   "quantized kernels; 2, 3, 6 and 8 bits are dequantized to float when kiln loads them")
    p.add_argument("--q-group-size", type=int, default=64, choices=(32, 64, 128),
                   help="--to mlx: weights per scale and bias (default 64)")
    p.add_argument("--type", default="q8_0", help="--to gguf: " + ", ".join(FILE_TYPES)
                   + " (default q8_0; each quantized type takes llama.cpp's per-tensor mix unless --pure)")
    p.add_argument("--imatrix", metavar="FILE", help="--to gguf: importance matrix (llama.cpp's GGUF or .dat "
                   "format, e.g. from `kiln imatrix`) steering the K-quant, IQ4 and Q4_0..Q5_1 "
                   "quantizers")
    p.add_argument("--tensor-type", action="append", metavar="REGEX=TYPE",
                   help="--to gguf: tensors whose name matches REGEX get TYPE (repeatable; first match wins)")
    p.add_argument("--output-tensor-type", metavar="TYPE", help="--to gguf: type of output.weight")
    p.add_argument("--token-embedding-type", metavar="TYPE", help="--to gguf: type of token_embd.weight")
    p.add_argument("--pure", action="store_true", help="--to gguf: every weight in --type, no mix")
    a = p.parse_args(argv)
    from kiln.hub import resolve
    from kiln.reader import dtype_named
    if a.to == "gguf":
        return _main_gguf(a, resolve)
    if a.to == "mlx":
        from kiln.convert_mlx import to_mlx
        dtype = dtype_named(a.dtype or "bfloat16")
        if Path(a.out).exists() and (not Path(a.out).is_dir() or any(Path(a.out).iterdir())):
            raise KilnError(f"{a.out} already exists and is not an empty folder; give a new folder to write into")
        if not Path(a.out).resolve().parent.is_dir():
            raise KilnError(f"the folder of {a.out} does not exist")
        print(to_mlx(resolve(a.model), a.out, a.q_bits, a.q_group_size, dtype, progress=True))
        return 0
    dtype = dtype_named(a.dtype or "float32")  # checked before a built-in name is pulled
    if Path(a.out).exists() and not Path(a.out).is_dir():
        raise KilnError(f"{a.out} is a file; give a folder to write the model into")
    src = resolve(a.model)
    if src.is_dir():
        raise KilnError(f"{src} is already a folder; kiln convert reads a GGUF file")
    print(gguf_to_hf(src, a.out, dtype, progress=True))
    return 0


def _main_gguf(a, resolve) -> int:
    from kiln.quantize import FILE_TYPES, convert_gguf, parse_overrides, parse_type
    # every argument checked before a built-in name is pulled
    if a.type not in FILE_TYPES:
        raise KilnError(f"unknown --type {a.type!r}; kiln writes " + ", ".join(FILE_TYPES))
    overrides = parse_overrides(a.tensor_type)
    out_t = parse_type(a.output_tensor_type) if a.output_tensor_type else None
    embd_t = parse_type(a.token_embedding_type) if a.token_embedding_type else None
    if Path(a.out).is_dir():
        raise KilnError(f"{a.out} is a folder; --to gguf writes one file")
    if not Path(a.out).resolve().parent.is_dir():
        raise KilnError(f"the folder of {a.out} does not exist")
    imatrix = None
    if a.imatrix:
        from kiln.imatrix import read_imatrix
        imatrix = read_imatrix(a.imatrix)
    src = resolve(a.model)
    if src.is_dir():
        raise KilnError(f"{src} is a folder; kiln convert --to gguf reads a GGUF file (for now)")
    print(convert_gguf(src, a.out, a.type, overrides, out_t, embd_t, a.pure, progress=True, imatrix=imatrix))
    return 0
