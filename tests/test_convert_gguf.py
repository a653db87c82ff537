"""`kiln convert --to gguf` (kiln/quantize.py) on a small llama written as llama.cpp's converter would.

The written file is read back by gguf-py and by kiln: every tensor's bytes are kiln's quantizer applied to
the source's weights in the type llama.cpp's mix gives it, the metadata is the source's, and the model
computes what the source computes within the type's error. The low-bit types (q2_k, q3_k_s/m/l, iq4_nl,
iq4_xs) are checked against llama.cpp itself where llama-cpp-python is installed: kiln's file equals
llama_model_quantize's tensor for tensor, and llama.cpp runs it (tests/llamacpp_quant.py, a child process).
"""

import importlib.util
import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from kiln.errors import KilnError
from kiln.formats.gguf import read_gguf
from kiln.quant import dequantize
from kiln.quant.quantize import quantize
from kiln.quantize import FILE_TYPES, convert_gguf
from tests.test_gguf import LLAMA, _hf, _kiln, write_gguf

T = gguf.GGMLQuantizationType
CFG = {**LLAMA, "hidden_size": 256, "intermediate_size": 512}
TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "f32.gguf"
    return write_gguf(path, _hf(CFG), CFG, "llama", meta={"tokenizer.chat_template": TEMPLATE})


IDS = [1, 5, 9, 33, 2, 70, 11, 3]


def _logits(path):
    ids = torch.tensor([IDS])
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
    from kiln.quantize import MixInfo, tensor_type
    assert tensor_type("blk.1.attn_v.weight", (128, 256), "q4_k_m", MixInfo(2, True), pure=True) == T.Q4_K
    assert tensor_type("output.weight", (96, 256), "q4_k_m", MixInfo(2, True), pure=True) == T.Q4_K


def test_q4_k_m_mix_and_fallbacks():
    # llama.cpp's Q4_K_M: output in Q6_K, attn_v and ffn_down in Q6_K on the layers use_more_bits picks,
    # and rows that are not a multiple of 256 fall back (Q4_K -> Q5_0, Q6_K -> Q8_0)
    from kiln.quantize import MixInfo, tensor_type
    assert tensor_type("output.weight", (96, 256), "q4_k_m", MixInfo(2, True)) == T.Q6_K
    assert tensor_type("token_embd.weight", (96, 256), "q4_k_m", MixInfo(2, False)) == T.Q6_K     # tied: the output
    assert tensor_type("token_embd.weight", (96, 256), "q4_k_m", MixInfo(2, True)) == T.Q4_K
    assert tensor_type("blk.0.attn_v.weight", (128, 256), "q4_k_m", MixInfo(2, True)) == T.Q4_K
    assert tensor_type("blk.1.attn_v.weight", (128, 256), "q4_k_m", MixInfo(2, True)) == T.Q6_K
    assert tensor_type("blk.0.attn_norm.weight", (256,), "q4_k_m", MixInfo(2, True)) == T.F32
    assert tensor_type("blk.0.attn_q.weight", (896, 896), "q4_k_m", MixInfo(24, True)) == T.Q5_0
    assert tensor_type("output.weight", (1000, 896), "q4_k_m", MixInfo(24, True)) == T.Q8_0
    assert tensor_type("blk.0.ffn_down.weight", (896, 4864), "q4_k_m", MixInfo(24, True)) == T.Q6_K
    assert tensor_type("blk.4.ffn_down.weight", (896, 4864), "q4_k_m", MixInfo(24, True)) == T.Q4_K


def test_interrupted_conversion_leaves_nothing(source, tmp_path, monkeypatch):
    import kiln.quant.quantize as qz
    calls = {"n": 0}
    real = qz.quantize

    def failing(x, qtype, imatrix=None):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(x, qtype, imatrix)
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


# ---- the low-bit file types against llama.cpp's own quantizer -----------------------------------------------

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed")
# 256-wide rows, ffn_down's 288-wide rows fall back (Q2_K/Q3_K -> Q4_0, IQ4_XS -> IQ4_NL, Q4_K -> Q5_0, ...);
# 8 heads on 2 KV heads: the GQA >= 4 rules of the mixes
CFG_MIX = {**LLAMA, "hidden_size": 256, "intermediate_size": 288, "num_hidden_layers": 3,
           "num_attention_heads": 8, "num_key_value_heads": 2}
NEW_TYPES = ["q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "iq4_nl", "iq4_xs"]
HELPER = Path(__file__).parent / "llamacpp_quant.py"


def llama_cpp_call(*args) -> dict:
    r = subprocess.run([sys.executable, str(HELPER), *map(str, args)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@contextmanager
def torch_threads(n: int):
    # kiln's quantizers are long chains of small vector ops: on a CPU shared with other jobs, torch's
    # thread pool spends more time waiting than working (20x here); one thread keeps the tests fast
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def mix_source(tmp_path_factory):
    path = tmp_path_factory.mktemp("mix") / "f32.gguf"
    return write_gguf(path, _hf(CFG_MIX), CFG_MIX, "llama", vocab=True,
                      meta={"tokenizer.chat_template": TEMPLATE})


@pytest.fixture(scope="module")
def new_type_files(mix_source, tmp_path_factory):
    """kiln's file of each new type, and llama.cpp's run of it and own quantization of the source
    (one child process for all)."""
    out = tmp_path_factory.mktemp("new_types")
    with torch_threads(1):
        ours = {t: convert_gguf(mix_source, out / f"kiln-{t}.gguf", t) for t in NEW_TYPES}
    theirs = llama_cpp_call("check", mix_source, out, *(f"{p}:{int(FILE_TYPES[t][1])}" for t, p in ours.items()))
    return {t: (p, theirs[p.name]) for t, p in ours.items()}


def _same_tensors(ours: Path, theirs: Path):
    a, b = gguf.GGUFReader(str(ours)), gguf.GGUFReader(str(theirs))
    tb = {t.name: t for t in b.tensors}
    assert sorted(tb) == sorted(t.name for t in a.tensors)
    for t in a.tensors:
        assert t.tensor_type == tb[t.name].tensor_type, (t.name, t.tensor_type.name, tb[t.name].tensor_type.name)
        assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(tb[t.name].data).view(np.uint8)), t.name
    key = "general.file_type"
    assert a.fields[key].contents() == b.fields[key].contents()


@needs_llama_cpp
@pytest.mark.parametrize("ftype", NEW_TYPES)
def test_new_types_equal_llama_cpp_and_load_in_both(new_type_files, ftype):
    """kiln's file is llama-quantize's, tensor for tensor (the mix, the fallbacks, the bytes), and it
    runs in llama.cpp and in kiln to the same logits."""
    ours, theirs = new_type_files[ftype]
    assert theirs["rc"] == 0
    _same_tensors(ours, Path(theirs["llama_file"]))
    ref = torch.tensor(theirs["logits"])
    with torch.no_grad():
        mine = _kiln(ours)(torch.tensor([IDS]))[0, -1]
    rel = ((mine - ref).norm() / ref.norm()).item()
    assert rel < 0.05, rel          # llama.cpp rounds activations to 8 bits in its K-quant dot products
    assert read_gguf(ours).meta["tokenizer.chat_template"] == TEMPLATE


def test_low_bit_mixes():
    # llama.cpp's llama_tensor_get_type_impl for the new types (the test above checks whole files)
    from kiln.quantize import MixInfo, tensor_type
    gqa8 = MixInfo(32, True, n_gqa=8)
    assert tensor_type("blk.0.attn_v.weight", (512, 4096), "q2_k", gqa8) == T.Q4_K
    assert tensor_type("blk.0.attn_v.weight", (512, 4096), "q2_k", MixInfo(32)) == T.Q3_K
    assert tensor_type("blk.5.ffn_down.weight", (4096, 11008), "q2_k", gqa8) == T.Q3_K
    assert tensor_type("blk.5.attn_output.weight", (4096, 4096), "q2_k", gqa8) == T.Q3_K
    assert tensor_type("blk.1.attn_v.weight", (512, 4096), "q3_k_m", gqa8) == T.Q5_K
    assert tensor_type("blk.2.attn_v.weight", (512, 4096), "q3_k_m", gqa8) == T.Q4_K
    assert tensor_type("blk.1.ffn_down.weight", (4096, 11008), "q3_k_m", gqa8) == T.Q5_K
    assert tensor_type("blk.2.ffn_down.weight", (4096, 11008), "q3_k_m", gqa8) == T.Q4_K
    assert tensor_type("blk.9.ffn_down.weight", (4096, 11008), "q3_k_l", gqa8) == T.Q5_K
    assert tensor_type("blk.9.ffn_down.weight", (4096, 11008), "q3_k_s", gqa8) == T.Q3_K
    assert tensor_type("blk.0.ffn_down.weight", (4096, 11008), "iq4_xs", gqa8) == T.Q5_K
    assert tensor_type("blk.0.ffn_down.weight", (4096, 11008), "iq4_xs",
                       MixInfo(32, True, 8, has_imatrix=True)) == T.IQ4_XS
    assert tensor_type("blk.0.attn_v.weight", (512, 4096), "iq4_nl", gqa8) == T.Q5_K
    assert tensor_type("blk.0.attn_q.weight", (896, 896), "iq4_xs", gqa8) == T.IQ4_NL
    assert tensor_type("blk.0.attn_q.weight", (896, 896), "q3_k_s", gqa8) == T.Q4_0
    assert tensor_type("blk.0.attn_q.weight", (896, 100), "q2_k", gqa8) == T.F16
    assert tensor_type("output.weight", (1000, 896), "q2_k", gqa8) == T.Q8_0
