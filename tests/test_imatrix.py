"""`kiln imatrix` and importance matrices in `kiln convert --imatrix` (kiln/imatrix.py).

The collected statistics equal what Hugging Face transformers' own model feeds its linear layers (the
model the GGUF was written from); the file kiln writes is parsed by ggml's own GGUF reader (llama.cpp's
gguf_init_from_file) with the keys and tensors llama-quantize's load_imatrix needs; and a file quantized by
kiln with it equals, tensor for tensor, ggml_quantize_chunk's output with the importance that llama-quantize
derives from the same file (llama_model_quantize itself cannot take an imatrix from Python: its parameter is
a C++ std::unordered_map).
"""

import struct

import numpy as np
import pytest
import torch

from kiln.errors import KilnError
from kiln.imatrix import collect, read_imatrix, write_imatrix
from kiln.quantize import convert_gguf
from tests.test_convert_gguf import CFG_MIX, llama_cpp_call, needs_llama_cpp, one_thread  # noqa: F401
from tests.test_gguf import _hf, _kiln, write_gguf

CHUNKS = [[1] + list(range(4 + i, 35 + i)) for i in range(3)]      # 3 chunks of 32 tokens, BOS first


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("imx") / "f32.gguf"
    return write_gguf(path, _hf(CFG_MIX), CFG_MIX, "llama", vocab=True)


@pytest.fixture(scope="module")
def collected(source):
    return collect(_kiln(source), CHUNKS)


@pytest.fixture(scope="module")
def hf_stats():
    return _transformers_stats()


def _transformers_stats():
    hf = _hf(CFG_MIX)
    sums, counts, hooks = {}, {}, []
    kinds = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    for path, mod in hf.named_modules():
        parts = path.split(".")
        if isinstance(mod, torch.nn.Linear) and parts[-1] in kinds and "layers" in parts:
            name = f"blk.{parts[2]}.{kinds[parts[-1]]}.weight"

            def hook(m, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + (x * x).sum(0)
                counts[name] = counts.get(name, 0) + x.shape[0]
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for c in CHUNKS:
            hf(torch.tensor([c]))
    return sums, counts


@pytest.mark.parametrize("joined", [False, True], ids=["apart", "joined"])
def test_statistics_match_transformers(collected, hf_stats, source, joined):
    # joined: q/k/v and gate/up as one layer each, as kiln loads them on GPUs and on its compact CPU path
    if joined:
        from kiln.quant.swap import join_projections
        model = join_projections(_kiln(source))
        assert model.model.layers[0].mlp.gate_up is not None
        collected = collect(model, CHUNKS)
    sums, counts = hf_stats
    assert sorted(collected.sums) == sorted(sums) and len(sums) == 7 * CFG_MIX["num_hidden_layers"]
    for name, s in sums.items():
        assert collected.counts[name] == counts[name] == 32 * len(CHUNKS)
        rel = ((collected.sums[name] - s).norm() / s.norm()).item()
        assert rel < 1e-4, (name, rel)


def test_file_round_trip_and_errors(collected, tmp_path):
    path = write_imatrix(tmp_path / "m.gguf", collected.sums, collected.counts, ["text.txt"], 3, 32)
    back = read_imatrix(path)
    name = "blk.1.ffn_down.weight"
    want = (collected.sums[name] / collected.counts[name]).float()
    assert torch.allclose(back[name], want, rtol=1e-6)
    (tmp_path / "bad.dat").write_bytes(b"\x01\x00\x00\x00\xff\xff")
    with pytest.raises(KilnError, match="importance matrix"):
        read_imatrix(tmp_path / "bad.dat")
    with pytest.raises(KilnError, match="cannot read"):
        read_imatrix(tmp_path / "missing.gguf")


def test_reads_the_legacy_dat_format(tmp_path):
    # llama.cpp's legacy layout (common/imatrix-loader.cpp): n_entries, then per entry name length, name,
    # ncall, nval, nval floats holding mean * ncall; then chunk count and dataset name
    rows = {"blk.0.attn_q.weight": (4, np.arange(1, 257, dtype=np.float32)),
            "blk.0.ffn_down.weight": (0, np.full(288, 2.5, np.float32))}
    blob = struct.pack("<i", len(rows))
    for name, (ncall, v) in rows.items():
        blob += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, v.size) + v.tobytes()
    blob += struct.pack("<ii", 10, 4) + b"wiki"
    (tmp_path / "old.dat").write_bytes(blob)
    back = read_imatrix(tmp_path / "old.dat")
    assert torch.equal(back["blk.0.attn_q.weight"], torch.arange(1, 257, dtype=torch.float32) / 4)
    assert torch.equal(back["blk.0.ffn_down.weight"], torch.full((288,), 2.5))


@needs_llama_cpp
@pytest.mark.parametrize("ftype", ["q3_k_s", "iq4_xs"])
def test_llama_cpp_reads_it_and_quantizes_the_same(collected, source, tmp_path, one_thread, ftype):  # noqa: F811
    imx = write_imatrix(tmp_path / "m.gguf", collected.sums, collected.counts, ["text.txt"], 3, 32)
    ours = convert_gguf(source, tmp_path / f"{ftype}.gguf", ftype, imatrix=imx)
    plain = convert_gguf(source, tmp_path / f"{ftype}-plain.gguf", ftype)
    r = llama_cpp_call("imatrix", imx, source, ours)
    assert r["meta"] == {"general.type": "imatrix", "datasets": ["text.txt"], "chunk_count": 3, "chunk_size": 32}
    assert sorted(r["entries"]) == sorted(collected.sums)
    assert r["used"] == 7 * CFG_MIX["num_hidden_layers"]
    assert all(r["same"].values()), [n for n, s in r["same"].items() if not s]
    assert ours.read_bytes() != plain.read_bytes()          # the importance matrix did steer the quantizer


def test_cli_writes_a_file_kiln_reads(source, tmp_path):
    from kiln.cli import main
    text = tmp_path / "t.txt"
    text.write_text(" ".join("abcdefghijklmnopqrstuvwxyz"[i % 26] for i in range(80)))
    out = tmp_path / "cli.imatrix.gguf"
    rc = main(["imatrix", "--model", str(source), "--data", str(text), "-o", str(out), "--ctx-size", "16",
               "--chunks", "2", "--device", "cpu"])
    assert rc == 0
    m = read_imatrix(out)
    assert len(m) == 7 * CFG_MIX["num_hidden_layers"] and m["blk.0.attn_q.weight"].shape == (256,)
    assert main(["imatrix", "--model", str(source), "--data", str(text), "-o", str(out), "--ctx-size", "64",
                 "--device", "cpu"]) == 2                    # too short a text: one line, no traceback
