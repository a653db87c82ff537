"""GGUF reading on tiny files written with gguf-py: names, q/k un-permutation, fix-ups, and every error.

A tiny Llama and a tiny Gemma 3 are written the way llama.cpp's converter writes them (llama q/k rows
permuted, Gemma norms stored as 1 + w); kiln must read them back into the exact Hugging Face model.
"""

import struct
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

from kiln.errors import KilnError
from kiln.formats.gguf import hf_tensors, read_gguf, to_config
from kiln.load import build_model, load

transformers = pytest.importorskip("transformers")

LLAMA = dict(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
             rope_theta=10000.0, tie_word_embeddings=False)
GEMMA = dict(model_type="gemma3_text", vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=6,
             num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=64,
             rms_norm_eps=1e-6, rope_theta=1e6, rope_local_base_freq=1e4, sliding_window=4,
             query_pre_attn_scalar=32, tie_word_embeddings=True)

BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
         "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}
LLAMA_BLOCK = {**BLOCK, "post_attention_layernorm": "ffn_norm"}
GEMMA_BLOCK = {**BLOCK, "pre_feedforward_layernorm": "ffn_norm", "post_attention_layernorm": "post_attention_norm",
               "post_feedforward_layernorm": "post_ffw_norm"}


def _hf(cfg, seed=0):
    from transformers import AutoConfig, AutoModelForCausalLM
    conf = AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(conf, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" in name else 0.1))
    return m


def _permute(w, n_head):
    """What llama.cpp's converter does to llama q/k rows (rotate-half → interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(name, table):
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    parts = name.split(".")
    key = ".".join(parts[3:-1])
    return f"blk.{parts[2]}.{table[key]}.{parts[-1]}"


def spm_vocab(w: gguf.GGUFWriter, n: int):
    """A SentencePiece-style vocabulary of n tokens (<unk>, <s>, </s>, then letters and pieces), enough for
    llama.cpp to load the file."""
    letters = [chr(97 + i) for i in range(26)]
    words = [chr(0x2581) + c * k for k in range(1, 9) for c in letters]
    pieces = (["<unk>", "<s>", "</s>", "<0x0A>", chr(0x2581)] + letters + words)[:n]
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores([float(len(p)) if i > 3 else 0.0 for i, p in enumerate(pieces)])
    w.add_token_types([2, 3, 3, 6] + [1] * (n - 4))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


def write_gguf(path, hf, cfg, arch, qtype=None, meta=None, skip=(), vocab=False):
    """Write `hf`'s weights as llama.cpp's converter would; 2-D weights in `qtype` (default F32); with
    `vocab`, a small SentencePiece vocabulary (spm_vocab) so that llama.cpp loads the file."""
    w = gguf.GGUFWriter(str(path), arch)
    if vocab:
        spm_vocab(w, cfg["vocab_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if "head_dim" in cfg:
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    if arch == "gemma3":
        w.add_sliding_window(cfg["sliding_window"])
    for k, v in (meta or {}).items():
        w.add_string(k, v) if isinstance(v, str) else w.add_uint32(k, v)
    table = GEMMA_BLOCK if arch == "gemma3" else LLAMA_BLOCK
    for name, t in hf.state_dict().items():
        if name in skip or (name == "lm_head.weight" and cfg["tie_word_embeddings"]):
            continue
        t = t.detach().clone()
        if arch == "llama" and ".q_proj." in name:
            t = _permute(t, cfg["num_attention_heads"])
        if arch == "llama" and ".k_proj." in name:
            t = _permute(t, cfg["num_key_value_heads"])
        if arch == "gemma3" and name.endswith("norm.weight"):
            t = t + 1
        arr = t.numpy().astype(np.float32)
        if qtype is not None and arr.ndim == 2:
            w.add_tensor(_gguf_name(name, table), gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(_gguf_name(name, table), arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _kiln(path):
    g = read_gguf(path)
    cfg = to_config(g)
    return build_model(cfg, hf_tensors(g, cfg))


@pytest.mark.parametrize("arch,cfg", [("llama", LLAMA), ("gemma3", GEMMA)])
def test_gguf_reads_back_the_hugging_face_model(tmp_path, arch, cfg):
    hf = _hf(cfg)
    km = _kiln(write_gguf(tmp_path / "m.gguf", hf, cfg, arch))
    ids = torch.randint(0, cfg["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = (km(ids) - hf(ids).logits).abs().max().item()
    assert err <= 1e-4, f"{arch}: max |Δlogit| {err}"


def _unpermute(w, n_head):
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_quantized_q_rows_are_unpermuted_exactly(tmp_path):
    hf = _hf(LLAMA, seed=1)
    path = write_gguf(tmp_path / "q8.gguf", hf, LLAMA, "llama", qtype=gguf.GGMLQuantizationType.Q8_0)
    g = read_gguf(path)
    weights = hf_tensors(g, to_config(g))
    for gname, hname, heads in [("blk.1.attn_q.weight", "model.layers.1.self_attn.q_proj.weight", 4),
                                ("blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj.weight", 2)]:
        raw = g.tensors[gname].data.numpy().reshape(g.tensors[gname].shape[0], -1)
        ref = _unpermute(torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0)), heads)
        got = weights[hname].dequantize()
        assert torch.equal(got, ref)  # packed rows moved, not re-quantized: bit-exact
        assert (got - hf.state_dict()[hname]).abs().max() < 0.01  # and close to the original weights


def test_quantized_linears_compute_what_the_dequantized_model_does(tmp_path):
    """load(quantized=True) keeps Q8_0 blocks in QuantLinear layers; same logits as dequantizing."""
    from kiln.quant.linear import QuantLinear
    hf = _hf(LLAMA, seed=2)
    path = write_gguf(tmp_path / "q8.gguf", hf, LLAMA, "llama", qtype=gguf.GGMLQuantizationType.Q8_0)
    g = read_gguf(path)
    cfg = to_config(g)
    dense = build_model(cfg, hf_tensors(g, cfg))
    packed = build_model(cfg, hf_tensors(g, cfg), quantized=True)
    assert sum(isinstance(m, QuantLinear) for m in packed.modules()) == 2 * 7 + 1  # 7 per layer + head
    ids = torch.randint(0, LLAMA["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(packed(ids), dense(ids), atol=1e-5)


# ---------------------------------------------------------------- errors

def test_wrong_magic(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(KilnError, match="not a GGUF file"):
        read_gguf(p)


def test_truncated_file(tmp_path):
    full = write_gguf(tmp_path / "m.gguf", _hf(LLAMA), LLAMA, "llama").read_bytes()
    for cut in (len(full) // 2, 200):  # inside the tensor data, inside the header
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(full[:cut])
        with pytest.raises(KilnError, match="truncated"):
            read_gguf(p)


def test_unknown_architecture(tmp_path):
    cfg = dict(LLAMA)
    path = write_gguf(tmp_path / "m.gguf", _hf(cfg), cfg, "mamba")
    with pytest.raises(KilnError, match="architecture 'mamba' is not supported"):
        to_config(read_gguf(path))


def test_unsupported_tensor_type(tmp_path):
    cfg = dict(LLAMA, hidden_size=256, intermediate_size=256, num_attention_heads=4)
    hf = _hf(cfg)
    path = write_gguf(tmp_path / "m.gguf", hf, cfg, "llama", skip={"model.layers.0.mlp.up_proj.weight"})
    w = gguf.GGUFWriter(str(tmp_path / "iq2.gguf"), "llama")  # same model with one IQ2_XXS tensor
    g = read_gguf(path)
    for k, v in g.meta.items():
        if k.startswith("llama."):
            (w.add_float32 if isinstance(v, float) else w.add_uint32)(k, v)
    for t in g.tensors.values():
        w.add_tensor(t.name, t.data.numpy().view(np.float32).reshape(t.shape))
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.IQ2_XXS]
    raw = np.zeros((256, 256 // block * size), dtype=np.uint8)
    w.add_tensor("blk.0.ffn_up.weight", raw, raw_dtype=gguf.GGMLQuantizationType.IQ2_XXS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(KilnError, match="IQ2_XXS"):
        _kiln(tmp_path / "iq2.gguf")


def test_missing_tokenizer(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", _hf(LLAMA), LLAMA, "llama")
    with pytest.raises(KilnError, match="tokenizer"):
        load(path, device="cpu")


def test_prompt_longer_than_context(tmp_path):
    from kiln.generate import stream_generate
    km = _kiln(write_gguf(tmp_path / "m.gguf", _hf(LLAMA), LLAMA, "llama"))
    with pytest.raises(KilnError, match="prompt has 80 tokens but the context holds 64"):
        next(stream_generate(km, None, list(range(80)), max_tokens=4))


def test_cli_prints_one_line_and_exits_2(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"nope")
    r = subprocess.run([sys.executable, "-m", "kiln.cli", "generate", "--model", str(p), "--prompt", "hi"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "not a GGUF file" in r.stderr
    r = subprocess.run([sys.executable, "-m", "kiln.cli", "generate", "--temp", "-1", "--prompt", "hi",
                        "--model", str(p)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "temperature" in r.stderr


# ---------------------------------------------------------------- string arrays: bulk against one by one

def _string_array(items: list[bytes], tail: bytes = b"\x07" * 40) -> bytes:
    return b"".join(struct.pack("<Q", len(b)) + b for b in items) + tail


def _both_readers(buf: bytes, n: int):
    """(bulk_strings's answer, the one-by-one reader's strings and end, or its KilnError's text)."""
    from kiln.formats.gguf import _Cursor, bulk_strings
    cur = _Cursor(buf, "x.gguf")
    try:
        slow = (cur.strings_one_by_one(n, "the array"), cur.pos)
    except KilnError as e:
        slow = str(e)
    return bulk_strings(buf, 0, len(buf), n), slow


def _vocabulary(rng, n: int) -> list[bytes]:
    alphabet = ["a", "Ġ", "▁", "é", "你", "👨‍👩‍👧", " ", "\n", "<|im_end|>", "{", "\t", "\x7f"]
    return [("".join(rng.choice(alphabet, size=rng.integers(1, 12)))).encode() for _ in range(n)]


@pytest.mark.parametrize("case", ["plain", "empty strings", "empty strings in a row", "long strings", "zero byte",
                                  "leading zero byte", "invalid utf-8", "truncated", "length past the end",
                                  "array at the end"])
def test_bulk_strings_equal_one_by_one(case):
    """The bulk reader gives the one-by-one reader's strings and end, or declines (None) and leaves the
    one-by-one reader to decode or refuse the array; it never gives anything else."""
    rng = np.random.default_rng(0)
    items = _vocabulary(rng, 3000)
    tail = b"\x07" * 40
    if case == "empty strings":
        items[5] = items[9] = items[-1] = b""
    elif case == "empty strings in a row":  # one run of zero bytes: where each starts is not guessed
        items[5:9] = [b""] * 4
    elif case == "long strings":
        items[10], items[20] = b"x" * 70_000, "é".encode() * 300
    elif case == "zero byte":
        items[100] = b"ab\0cd"
    elif case == "leading zero byte":
        items[100] = b"\0\0\0\0ab"
    elif case == "invalid utf-8":
        items[100] = b"ab\xffcd"
    elif case == "array at the end":
        tail = b""
    buf = _string_array(items, tail)
    if case == "truncated":
        buf = buf[:len(buf) // 2]
    elif case == "length past the end":
        buf = buf + struct.pack("<Q", 1000) + b"abc"
    n = len(items) + (case == "length past the end")
    bulk, slow = _both_readers(buf, n)
    if case in ("plain", "empty strings", "long strings", "array at the end"):
        assert bulk is not None and bulk == slow
    else:  # declined: the one-by-one reader reads these (replacing invalid UTF-8) or names the damage
        assert bulk is None
    if case == "invalid utf-8":
        assert slow[0][100] == "ab\ufffdcd"
    if case in ("truncated", "length past the end"):
        assert "truncated or corrupt" in slow


@pytest.mark.model
@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b", "gemma3-270m", "qwen2.5-coder-1.5b"])
def test_real_vocabularies_read_in_bulk(name, monkeypatch):
    """On each real model every vocabulary-sized array is read in bulk, and the metadata equals what the
    one-by-one reader reads (test_fuzz_formats also checks the Qwen header against an independent parse)."""
    from kiln.formats import gguf as G
    try:
        from tests.conftest import real_model
    except ImportError:
        from conftest import real_model
    path = real_model(name)
    served, bulk = [], G.bulk_strings

    def spy(*args):
        out = bulk(*args)
        served.append((args[-1], out is not None))
        return out

    monkeypatch.setattr(G, "bulk_strings", spy)
    fast = read_gguf(path).meta
    big = [ok for n, ok in served if n >= G._BULK_MIN]
    assert big and all(big)
    monkeypatch.setattr(G, "bulk_strings", lambda *a: None)
    assert fast == read_gguf(path).meta
