"""`kiln convert --to gguf` (kiln/quantize.py) on a small llama written as llama.cpp's converter would.

The written file is read back by gguf-py and by kiln: every tensor's bytes are kiln's quantizer applied to
the source's weights in the type llama.cpp's mix gives it, the metadata is the source's, and the model
computes what the source computes within the type's error.
"""

import subprocess
import sys

import gguf
import pytest
import torch

from kiln.errors import KilnError
from kiln.formats.gguf import read_gguf
from kiln.quant import dequantize
from kiln.quant.quantize import quantize
from kiln.quantize import convert_gguf
from tests.test_gguf import LLAMA, _hf, _kiln, write_gguf

T = gguf.GGMLQuantizationType
CFG = {**LLAMA, "hidden_size": 256, "intermediate_size": 512}
TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "f32.gguf"
    return write_gguf(path, _hf(CFG), CFG, "llama", meta={"tokenizer.chat_template": TEMPLATE})


def _logits(path):
    ids = torch.tensor([[1, 5, 9, 33, 2, 70, 11, 3]])
    with torch.no_grad():
        return _kiln(path)(ids)[0]


@pytest.mark.parametrize("ftype,expect", [
    ("q8_0", {"output.weight": T.Q8_0, "blk.0.attn_v.weight": T.Q8_0, "blk.1.ffn_down.weight": T.Q8_0}),
    # K-quant files take minutes on 2 busy cores; their mix is checked through tensor_type below
])
def test_convert_writes_kilns_quantization(source, tmp_path, ftype, expect):
    out = convert_gguf(source, tmp_path / f"{ftype}.gguf", ftype)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{ftype}.gguf"]      # no temporary left
    src, dst = read_gguf(source), read_gguf(out)
    assert dst.meta["tokenizer.chat_template"] == TEMPLATE
    assert dst.meta["general.file_type"] == {"q8_0": 7, "q4_k_m": 15}[ftype]
    assert dst.meta["llama.block_count"] == CFG["num_hidden_layers"]
    assert set(src.tensors) == set(dst.tensors)
    for name, t in dst.tensors.items():
        s = src.tensors[name]
        assert t.shape == s.shape
        if name in expect:
            assert t.qtype == expect[name], name
        if len(t.shape) == 1:
            assert t.qtype == T.F32
        x = dequantize(s.data.reshape(-1), s.qtype, s.shape)
        assert torch.equal(t.data.reshape(-1), quantize(x, t.qtype).reshape(-1)), name
    a, b = _logits(source), _logits(out)
    rel = ((a - b).norm() / a.norm()).item()
    assert rel < {"q8_0": 0.03, "q4_k_m": 0.3}[ftype], rel  # random weights: no margin to spare
    assert rel > 0


def test_overrides_and_pure(source, tmp_path):
    out = convert_gguf(source, tmp_path / "o.gguf", "q4_0", overrides=[(r"ffn_(up|gate)", T.Q8_0)],
                       output_type=T.Q5_1, embd_type=T.F16)
    t = read_gguf(out).tensors
    assert t["blk.0.ffn_up.weight"].qtype == T.Q8_0 and t["blk.1.ffn_gate.weight"].qtype == T.Q8_0
    assert t["output.weight"].qtype == T.Q5_1 and t["token_embd.weight"].qtype == T.F16
    assert t["blk.0.attn_q.weight"].qtype == T.Q4_0
    from kiln.quantize import tensor_type
    assert tensor_type("blk.1.attn_v.weight", (128, 256), "q4_k_m", 2, True, pure=True) == T.Q4_K
    assert tensor_type("output.weight", (96, 256), "q4_k_m", 2, True, pure=True) == T.Q4_K


def test_q4_k_m_mix_and_fallbacks():
    # llama.cpp's Q4_K_M: output in Q6_K, attn_v and ffn_down in Q6_K on the layers use_more_bits picks,
    # and rows that are not a multiple of 256 fall back (Q4_K -> Q5_0, Q6_K -> Q8_0)
    from kiln.quantize import tensor_type
    assert tensor_type("output.weight", (96, 256), "q4_k_m", 2, True) == T.Q6_K
    assert tensor_type("token_embd.weight", (96, 256), "q4_k_m", 2, False) == T.Q6_K     # tied: the output
    assert tensor_type("token_embd.weight", (96, 256), "q4_k_m", 2, True) == T.Q4_K
    assert tensor_type("blk.0.attn_v.weight", (128, 256), "q4_k_m", 2, True) == T.Q4_K
    assert tensor_type("blk.1.attn_v.weight", (128, 256), "q4_k_m", 2, True) == T.Q6_K
    assert tensor_type("blk.0.attn_norm.weight", (256,), "q4_k_m", 2, True) == T.F32
    assert tensor_type("blk.0.attn_q.weight", (896, 896), "q4_k_m", 24, True) == T.Q5_0
    assert tensor_type("output.weight", (1000, 896), "q4_k_m", 24, True) == T.Q8_0
    assert tensor_type("blk.0.ffn_down.weight", (896, 4864), "q4_k_m", 24, True) == T.Q6_K
    assert tensor_type("blk.4.ffn_down.weight", (896, 4864), "q4_k_m", 24, True) == T.Q4_K


def test_interrupted_conversion_leaves_nothing(source, tmp_path, monkeypatch):
    import kiln.quant.quantize as qz
    calls = {"n": 0}
    real = qz.quantize

    def failing(x, qtype):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(x, qtype)
    monkeypatch.setattr(qz, "quantize", failing)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(source, tmp_path / "x.gguf", "q8_0")
    assert list(tmp_path.iterdir()) == []


def test_cli_bad_type_is_one_line(source, tmp_path):
    r = subprocess.run([sys.executable, "-c", "import sys; from kiln.cli import main; sys.exit(main())", "convert", str(source),
                        str(tmp_path / "x.gguf"), "--to", "gguf", "--type", "q9_9"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "q9_9" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(KilnError, match="REGEX=TYPE"):
        from kiln.quantize import parse_overrides
        parse_overrides(["nonsense"])
