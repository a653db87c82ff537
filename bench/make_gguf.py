"""Shape-faithful random-weight GGUF files of real model configs, for speed benchmarks.

Owns: the four benchmark configs (Qwen3-0.6B, Llama-3.2-1B, Qwen3-8B, Llama-3.1-8B), the metadata
llama.cpp's converter writes for them, a synthetic byte-level BPE vocabulary of the right size, the
per-tensor type mix of Q4_K_M / Q8_0 / F16 files (llama.cpp `src/llama-quant.cpp`), random quantized
blocks whose scale fields are overwritten so weights are ~N(0, 0.02)-sized, streaming the file to disk,
and `weight_bytes_per_token(path)` for roofline math.
Not: real weights or real vocabularies (the files compute nothing meaningful; only speed and agreement
between runtimes on the same bytes can be measured with them), quantizing real data, timing anything.

Usage: python bench/make_gguf.py --model qwen3-0.6b --type Q4_K_M --out DIR [--seed 0]
       python bench/make_gguf.py --model all --type all --out DIR
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFEndian, GGUFWriter, TokenType

Q = GGMLQuantizationType

# ---------------------------------------------------------------- model configs (from config.json)


@dataclass(frozen=True)
class ModelSpec:
    name: str  # file name stem and --model value
    arch: str  # GGUF general.architecture
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool
    rope_theta: float
    rms_eps: float
    context: int
    config_has_head_dim: bool  # the converter writes key/value_length only when config.json has head_dim
    pre: str  # tokenizer.ggml.pre
    first_special: int  # ids from here on are control tokens, as in the real vocabularies
    specials: tuple[tuple[int, str], ...]
    bos: int
    eos: int
    pad: int | None
    add_bos: bool
    llama3_rope: tuple[float, float, float, int] | None = None  # factor, low, high, original context
    sliding_window: int | None = None  # gemma3: every layer but each sixth attends within this window


_QWEN_SPECIALS = ((151643, "<|endoftext|>"), (151644, "<|im_start|>"), (151645, "<|im_end|>"))
_LLAMA_SPECIALS = ((128000, "<|begin_of_text|>"), (128001, "<|end_of_text|>"), (128009, "<|eot_id|>"))
_QWEN = dict(arch="qwen3", head_dim=128, vocab=151936, rope_theta=1e6, rms_eps=1e-6, context=40960,
             config_has_head_dim=True, pre="qwen2", first_special=151643, specials=_QWEN_SPECIALS,
             bos=151643, eos=151645, pad=151643, add_bos=False)
_LLAMA = dict(arch="llama", vocab=128256, rope_theta=500000.0, rms_eps=1e-5, context=131072,
              pre="llama-bpe", first_special=128000, specials=_LLAMA_SPECIALS, bos=128000, eos=128001,
              pad=None, add_bos=True)

# Gemma 3's text models: its real vocabulary is a 262k SentencePiece one; here the byte-level stand-in's merges
# run out at 246,334 tokens and the rest are control tokens (the bos / eos ids among them).
_GEMMA = dict(arch="gemma3", head_dim=256, vocab=262144, tied=True, rope_theta=1e6, rms_eps=1e-6,
              config_has_head_dim=True, pre="qwen2", first_special=246334,
              specials=((246334, "<bos>"), (246335, "<eos>"), (246336, "<end_of_turn>")), bos=246334,
              eos=246335, pad=None, add_bos=True)


MODELS = {s.name: s for s in (
    ModelSpec("qwen3-0.6b", hidden=1024, layers=28, heads=16, kv_heads=8, ffn=3072, tied=True, **_QWEN),
    ModelSpec("llama-3.2-1b", hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, ffn=8192,
              tied=True, config_has_head_dim=True, llama3_rope=(32.0, 1.0, 4.0, 8192), **_LLAMA),
    ModelSpec("qwen3-8b", hidden=4096, layers=36, heads=32, kv_heads=8, ffn=12288, tied=False, **_QWEN),
    ModelSpec("llama-3.1-8b", hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, ffn=14336,
              tied=False, config_has_head_dim=False, llama3_rope=(8.0, 1.0, 4.0, 8192), **_LLAMA),
    ModelSpec("gemma-3-1b", hidden=1152, layers=26, heads=4, kv_heads=1, ffn=6912, context=32768,
              sliding_window=512, **_GEMMA),
    ModelSpec("gemma-3-4b", hidden=2560, layers=34, heads=8, kv_heads=4, ffn=10240, context=131072,
              sliding_window=1024, **_GEMMA),
)}

FILE_TYPES = {"Q4_K_M": 15, "Q8_0": 7, "F16": 1}  # general.file_type (llama_ftype)

# ---------------------------------------------------------------- vocabulary


def byte_level_alphabet() -> list[str]:
    """GPT-2's byte → printable character map, listed in its order (printable bytes first)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = sorted(set(range(256)) - set(keep))
    # Printable bytes stand for themselves; the rest (controls, space, ...) move to 256 + n.
    return [chr(b) for b in keep] + [chr(256 + n) for n in range(len(shifted))]


def build_vocab(spec: ModelSpec) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): 256 byte tokens, merged tokens up to the first special id, controls.

    Merges are pairs then triples over a small alphabet ("Ġ" = space, letters, digits), so every merge
    "a b" has a, b and ab in the vocabulary and real text tokenizes into multi-character tokens.
    """
    tokens = byte_level_alphabet()
    firsts = ["Ġ", *"etaoinshrdlucmfwypvbgkjqxz", *"ETAOINSHRDLUCMFWYPVBGKJQXZ", *"0123456789"]
    seconds = firsts[1:]  # the pre-tokenizer never puts a space inside a word
    pairs = [(a, b) for a in firsts for b in seconds]
    triples = [(a + b, c) for a, b in pairs for c in seconds]
    merges = (pairs + triples)[:spec.first_special - len(tokens)]
    tokens += [a + b for a, b in merges]
    types = [int(TokenType.NORMAL)] * len(tokens)
    named = dict(spec.specials)
    for i in range(spec.first_special, spec.vocab):
        tokens.append(named.get(i, f"<|reserved_special_token_{i - spec.first_special}|>"))
        types.append(int(TokenType.CONTROL))
    return tokens, types, [f"{a} {b}" for a, b in merges]


# ---------------------------------------------------------------- metadata


def add_metadata(w: GGUFWriter, spec: ModelSpec, ftype: str) -> None:
    """The keys llama.cpp's convert_hf_to_gguf.py (+ llama-quantize) writes, in its order."""
    w.add_type("model")
    w.add_name(spec.name)
    w.add_description("random weights with the real shapes, for speed benchmarks only (bench/make_gguf.py)")
    w.add_block_count(spec.layers)
    w.add_context_length(spec.context)
    w.add_embedding_length(spec.hidden)
    w.add_feed_forward_length(spec.ffn)
    w.add_head_count(spec.heads)
    w.add_head_count_kv(spec.kv_heads)
    w.add_rope_freq_base(spec.rope_theta)
    w.add_layer_norm_rms_eps(spec.rms_eps)
    if spec.config_has_head_dim:
        w.add_key_length(spec.head_dim)
        w.add_value_length(spec.head_dim)
    w.add_file_type(FILE_TYPES[ftype])
    if spec.arch == "llama":
        w.add_vocab_size(spec.vocab)
        w.add_rope_dimension_count(spec.head_dim)
    if spec.sliding_window:
        w.add_sliding_window(spec.sliding_window)
    add_tokenizer(w, spec)
    w.add_quantization_version(2)


def add_tokenizer(w: GGUFWriter, spec: ModelSpec) -> None:
    tokens, types, merges = build_vocab(spec)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(spec.pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(spec.bos)
    w.add_eos_token_id(spec.eos)
    if spec.pad is not None:
        w.add_pad_token_id(spec.pad)
    w.add_add_bos_token(spec.add_bos)


# ---------------------------------------------------------------- tensors and their types


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]  # torch order: (rows, row_length)
    qtype: GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size


def tensor_shapes(spec: ModelSpec) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor llama.cpp loads for this config, in the converter's order.

    (llama-quantize would write them sorted by layer, then name; loaders look tensors up by name.)
    """
    s, q, kv = spec, spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    out = [("rope_freqs.weight", (s.head_dim // 2,))] if s.llama3_rope else []
    out.append(("token_embd.weight", (s.vocab, s.hidden)))
    for i in range(s.layers):
        blk = [("attn_norm", (s.hidden,)), ("attn_q", (q, s.hidden)), ("attn_k", (kv, s.hidden)),
               ("attn_v", (kv, s.hidden)), ("attn_output", (s.hidden, q))]
        if s.arch in ("qwen3", "gemma3"):
            blk += [("attn_q_norm", (s.head_dim,)), ("attn_k_norm", (s.head_dim,))]
        if s.arch == "gemma3":  # norms after attention and after the MLP too
            blk += [("post_attention_norm", (s.hidden,))]
        blk += [("ffn_norm", (s.hidden,)), ("ffn_gate", (s.ffn, s.hidden)), ("ffn_up", (s.ffn, s.hidden)),
                ("ffn_down", (s.hidden, s.ffn))]
        if s.arch == "gemma3":
            blk += [("post_ffw_norm", (s.hidden,))]
        out += [(f"blk.{i}.{n}.weight", shape) for n, shape in blk]
    out.append(("output_norm.weight", (s.hidden,)))
    if not s.tied:
        out.append(("output.weight", (s.vocab, s.hidden)))
    return out


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's Q4_K_M rule: first and last eighth of the layers, and every third one between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def choose_type(name: str, shape: tuple[int, ...], ftype: str, spec: ModelSpec) -> GGMLQuantizationType:
    """The type llama-quantize (or the converter, for Q8_0/F16) gives this tensor."""
    if len(shape) < 2:
        return Q.F32  # norms and rope_freqs are never quantized
    if ftype == "F16":
        return Q.F16
    if ftype == "Q8_0":
        return fallback(Q.Q8_0, shape[-1])
    is_output = name == "output.weight" or (spec.tied and name == "token_embd.weight")
    if is_output:  # tied embeddings are quantized like the output they double as
        return Q.Q6_K if shape[-1] % 256 == 0 else Q.Q8_0
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    if name.endswith((".attn_v.weight", ".ffn_down.weight")) and use_more_bits(layer, spec.layers):
        return fallback(Q.Q6_K, shape[-1])
    return fallback(Q.Q4_K, shape[-1])


_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q6_K: Q.Q8_0}  # llama.cpp's, for the types this script picks


def fallback(qtype: GGMLQuantizationType, row_length: int) -> GGMLQuantizationType:
    """Rows that are not whole blocks get a 32-block type, and F16 if even that does not fit."""
    if row_length % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    qtype = _FALLBACK.get(qtype, Q.F16)
    return qtype if row_length % GGML_QUANT_SIZES[qtype][0] == 0 else Q.F16


def plan_tensors(spec: ModelSpec, ftype: str) -> list[TensorPlan]:
    return [TensorPlan(n, shape, choose_type(n, shape, ftype, spec)) for n, shape in tensor_shapes(spec)]


# ---------------------------------------------------------------- tensor data

TARGET_STD = 0.02  # dequantized weight scale; RMSNorm weights of 1 keep activations finite over 36 layers
CHUNK_BYTES = 64 << 20  # random bytes made and written per step: peak memory stays ~ this


def _rms(lo: int, hi: int, center: float = 0.0) -> float:
    """Root mean square of (k - center) for k uniform on lo..hi: what random bits give a factor."""
    k = np.arange(lo, hi + 1, dtype=np.float64) - center
    return float(np.sqrt(np.mean(k * k)))


# Base value of each type's f16 scale so that scale × (random codes) has std ≈ TARGET_STD.
_D_Q8_0 = TARGET_STD / _rms(-128, 127)  # w = d·q, q int8
_D_Q5_0 = TARGET_STD / _rms(0, 31, 16)  # w = d·(q − 16), q 5-bit
_D_Q4_K = TARGET_STD / (_rms(0, 63) * _rms(0, 15, 7.5))  # w = d·sc·(q − 7.5) once mins are tied to scales
_D_Q6_K = TARGET_STD / (_rms(-128, 127) * _rms(0, 63, 32))  # w = d·sc·(q − 32), sc int8


def _set_f16(blocks: np.ndarray, offset: int, values: np.ndarray) -> np.ndarray:
    """Write values as the little-endian f16 field at `offset` of every block; return them as stored."""
    h = values.astype("<f2")
    blocks[:, offset:offset + 2] = h.view(np.uint8).reshape(-1, 2)
    return h.astype(np.float32)


def _set_scale(blocks: np.ndarray, offset: int, base: float) -> np.ndarray:
    # The field's own random low byte jitters the scale ±25% so blocks differ, without more RNG calls.
    u = blocks[:, offset].astype(np.float32) / 255.0
    return _set_f16(blocks, offset, base * (0.75 + 0.5 * u))


def _fix_q4_k(blocks: np.ndarray) -> None:
    # Q4_K: w = d·sc·q − dmin·m per 32-weight sub-block, with 6-bit sc/m packed in s = bytes 4..15.
    # Making every m equal its sc and dmin = 7.5·d gives w = d·sc·(q − 7.5): zero-mean, no per-block bias.
    # Packing: sc[j<4] = s[j] & 63, m[j<4] = s[j+4] & 63; for j ≥ 4 the low 4 bits come from the two
    # nibbles of s[j+4] and the high 2 bits from s[j-4] >> 6 (sc) and s[j] >> 6 (m).
    # So: s[4:8] = s[0:4] (bytes 8:12 = bytes 4:8), and both nibbles of s[8:12] (bytes 12:16) equal.
    blocks[:, 8:12] = blocks[:, 4:8]
    blocks[:, 12:16] = (blocks[:, 12:16] & 0x0F) * 0x11
    d = _set_scale(blocks, 0, _D_Q4_K)
    _set_f16(blocks, 2, 7.5 * d)


def _fix_f16(blocks: np.ndarray) -> None:
    # Keep sign, mantissa and the lowest exponent bit random; fix the rest of the exponent to 0b0100x, so
    # |w| ∈ [2^-7, 2^-5): std ≈ 0.019, never inf/NaN, no float conversion needed.
    h = blocks.view("<u2")
    np.bitwise_and(h, 0x87FF, out=h)
    np.bitwise_or(h, 0x2000, out=h)


_FIXERS = {
    Q.Q8_0: lambda b: _set_scale(b, 0, _D_Q8_0),
    Q.Q5_0: lambda b: _set_scale(b, 0, _D_Q5_0),
    Q.Q4_K: _fix_q4_k,
    Q.Q6_K: lambda b: _set_scale(b, 208, _D_Q6_K),  # d sits after ql[128], qh[64], scales[16]
    Q.F16: _fix_f16,
}


class RandomTensor:
    """Stands in for a numpy array in GGUFWriter.write_tensor_data, which only reads `.nbytes` and calls
    `.tofile(fp)`: the bytes are made and written one chunk at a time, so no tensor is ever whole in RAM.
    """

    def __init__(self, plan: TensorPlan, seed: int, index: int):
        self.plan, self.nbytes = plan, plan.nbytes
        self.rng = np.random.default_rng([seed, index])  # per tensor: independent of the chunk size

    def tofile(self, fp) -> None:
        row_bytes = self.nbytes // self.plan.shape[0]
        rows_per_chunk = max(1, CHUNK_BYTES // row_bytes)
        block_bytes = GGML_QUANT_SIZES[self.plan.qtype][1]
        for row in range(0, self.plan.shape[0], rows_per_chunk):
            n = min(rows_per_chunk, self.plan.shape[0] - row) * row_bytes
            # random_raw is the fastest numpy source (~1.3 GB/s here; Generator.bytes is ~15x slower).
            raw = self.rng.bit_generator.random_raw((n + 7) // 8).view(np.uint8)[:n]
            _FIXERS[self.plan.qtype](raw.reshape(-1, block_bytes))
            raw.tofile(fp)


def llama3_rope_factors(spec: ModelSpec) -> np.ndarray:
    """Per-frequency divisors for llama3 RoPE scaling, as llama.cpp's converter stores in rope_freqs."""
    factor, low, high, old_ctx = spec.llama3_rope
    inv_freq = 1.0 / spec.rope_theta ** (np.arange(0, spec.head_dim, 2, dtype=np.float32) / spec.head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, mid))
    return out.astype(np.float32)


def tensor_data(plan: TensorPlan, spec: ModelSpec, seed: int, index: int):
    if plan.name == "rope_freqs.weight":
        return llama3_rope_factors(spec)
    if plan.qtype == Q.F32:
        return np.ones(plan.shape, dtype=np.float32)  # norm weights: RMSNorm keeps unit scale
    return RandomTensor(plan, seed, index)


# ---------------------------------------------------------------- the file


def write_gguf(spec: ModelSpec, ftype: str, out_dir: Path, seed: int = 0) -> Path:
    """Write DIR/<model>-<type>.gguf (via a .part file, renamed when complete) and return its path."""
    path = out_dir / f"{spec.name}-{ftype}.gguf"
    plans = plan_tensors(spec, ftype)
    _check_disk(out_dir, sum(p.nbytes for p in plans))
    part = path.with_name(path.name + ".part")
    w = GGUFWriter(part, spec.arch)
    try:
        add_metadata(w, spec, ftype)
        for p in plans:  # tensor infos first, so the data can stream after the header
            w.add_tensor_info(p.name, _byte_shape(p), np.dtype(np.uint8), p.nbytes, raw_dtype=p.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, p in enumerate(plans):
            w.write_tensor_data(tensor_data(p, spec, seed, i), tensor_endianess=GGUFEndian.LITTLE)
        w.close()
        os.replace(part, path)
    finally:  # on any failure no half-written file is left behind under either name
        w.close()
        part.unlink(missing_ok=True)
    return path


def _byte_shape(p: TensorPlan) -> tuple[int, ...]:
    # GGUFWriter turns a uint8 byte shape back into the element shape for `raw_dtype`.
    return (*p.shape[:-1], p.nbytes // math.prod(p.shape[:-1]))


def _check_disk(out_dir: Path, nbytes: int) -> None:
    free = shutil.disk_usage(out_dir).free
    if free < nbytes + (256 << 20):
        raise SystemExit(f"error: {out_dir} has {free / 1e9:.1f} GB free but the file needs "
                         f"{nbytes / 1e9:.1f} GB; delete older files or pick another --out")


def weight_bytes_per_token(path: str | os.PathLike) -> int:
    """Bytes of 2-D weights one decode step reads: every linear layer plus the output projection.

    With tied embeddings token_embd is the output projection; otherwise its one-row lookup is left out.
    """
    from kiln.formats.gguf import read_gguf

    tensors = read_gguf(path).tensors
    skip = "token_embd.weight" if "output.weight" in tensors else None
    return sum(t.data.numel() for n, t in tensors.items() if len(t.shape) == 2 and n != skip)


def type_mix(path: str | os.PathLike) -> str:
    from kiln.formats.gguf import read_gguf

    counts = Counter(Q(t.qtype).name for t in read_gguf(path).tensors.values() if len(t.shape) == 2)
    return ", ".join(f"{n} x{c}" for n, c in counts.most_common())


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, choices=[*MODELS, "all"])
    ap.add_argument("--type", required=True, choices=[*FILE_TYPES, "all"])
    ap.add_argument("--out", required=True, type=Path, help="folder for the .gguf files")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    models = list(MODELS) if a.model == "all" else [a.model]
    types = list(FILE_TYPES) if a.type == "all" else [a.type]
    for m in models:
        for t in types:
            _make_one(MODELS[m], t, a.out, a.seed)
    return 0


def _make_one(spec: ModelSpec, ftype: str, out: Path, seed: int) -> None:
    t0 = time.perf_counter()
    path = write_gguf(spec, ftype, out, seed)
    dt = time.perf_counter() - t0
    size = path.stat().st_size
    print(f"{path}  {size / 1e9:.3f} GB  written in {dt:.1f} s ({size / 1e9 / dt:.2f} GB/s)")
    print(f"  weight bytes per token: {weight_bytes_per_token(path):,}  ({type_mix(path)})", flush=True)


if __name__ == "__main__":
    # Run as `python bench/make_gguf.py` from a checkout: make the repository's kiln importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
