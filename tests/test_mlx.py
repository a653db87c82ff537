"""mlx-lm's quantized folders, against mlx and mlx-lm themselves: the bit layout on random tensors, tiny folders
written with mlx's own ops, bad folders, and the real 0.5B both ways (kiln writes, mlx-lm runs it; mlx-lm writes,
kiln runs it), all on the CPU.
"""

import json

import numpy as np
import pytest
import torch

import kiln
from kiln.errors import KilnError
from kiln.formats.safetensors import read_folder
from kiln.load import build_model
from kiln.quant import dequantize as gguf_dequantize
from kiln.quant import mlx as affine

mx = pytest.importorskip("mlx.core")

_MX = {torch.float32: mx.float32, torch.bfloat16: mx.bfloat16, torch.float16: mx.float16}


def _to_mx(t: torch.Tensor):
    return mx.array(t.float().numpy()).astype(_MX[t.dtype])


def _to_torch(a, dtype=torch.float32) -> torch.Tensor:
    if a.dtype == mx.uint32:
        return torch.from_numpy(np.array(a).view(np.int32)).view(torch.uint32)
    return torch.from_numpy(np.array(a.astype(mx.float32))).to(dtype)


# ------------------------------------------------------------------ (a) the layout, against mlx's own ops

@pytest.mark.parametrize("bits", affine.BITS)
@pytest.mark.parametrize("group", affine.GROUPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layout_matches_mlx(bits, group, dtype):
    w = (torch.randn(24, 384, generator=torch.Generator().manual_seed(bits * group)) * 0.1).to(dtype)
    wq_mx, s_mx, b_mx = mx.quantize(_to_mx(w), group_size=group, bits=bits)
    wq, s, b = affine.quantize(w, bits, group)
    assert torch.equal(wq.view(torch.int32), _to_torch(wq_mx).view(torch.int32))  # byte-identical
    assert torch.equal(s, _to_torch(s_mx, dtype)) and torch.equal(b, _to_torch(b_mx, dtype))
    assert torch.equal(affine.pack(affine.unpack(wq, bits), bits).view(torch.int32), wq.view(torch.int32))
    ref = _to_torch(mx.dequantize(wq_mx, s_mx, b_mx, group_size=group, bits=bits), dtype)
    assert torch.equal(affine.dequantize(wq, s, b, bits, group), ref)  # bit-identical, mlx's roundings
    if bits in affine.BLOCK_TYPES:  # the same codes as GGUF blocks: w = d * q + m with d, m in f16
        blocks = affine.to_blocks(wq, s, b, bits, group)
        qtype = affine.BLOCK_TYPES[bits]
        ours = gguf_dequantize(blocks.reshape(-1), qtype, tuple(w.shape))
        import gguf
        theirs = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType(qtype)).reshape(w.shape)
        codes = affine.unpack(wq, bits).float().view(24, -1, group)
        want = codes * s.half().float()[..., None] + b.half().float()[..., None]
        assert torch.equal(ours, torch.from_numpy(theirs)) and torch.equal(ours, want.view(w.shape))


# ------------------------------------------------------------------ tiny folders written with mlx's ops

def _mlx_folder(path, bits, group, layers=None, dtype=mx.bfloat16):
    """A tiny qwen2 (tied head, attention biases) quantized and saved by mlx itself; returns (config, the float
    weights kiln should see): mlx's dequantization in float32 where kiln keeps blocks (4, 5 bits), in the
    model dtype (mlx's roundings) where kiln dequantizes (2, 3, 6, 8 bits)."""
    import test_models as tm
    cfg = dict(tm.CONFIGS["qwen2"])
    hf, _ = tm._hf_model(cfg)
    layers = layers or {}
    state, ref = {}, {}
    for name, p in hf.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied: mlx-lm stores no head
        a, module = mx.array(p.numpy()).astype(dtype), name.removesuffix(".weight")
        b, g = layers.get(module, (bits, group))
        if p.ndim == 2 and p.shape[1] % g == 0:
            wq, s, bi = mx.quantize(a, group_size=g, bits=b)
            state |= {f"{module}.weight": wq, f"{module}.scales": s, f"{module}.biases": bi}
            if b in affine.BLOCK_TYPES:
                s, bi = s.astype(mx.float32), bi.astype(mx.float32)
            ref[name] = _to_torch(mx.dequantize(wq, s, bi, group_size=g, bits=b))
        else:
            state[name], ref[name] = a, _to_torch(a)
    mx.save_safetensors(str(path / "model.safetensors"), state, metadata={"format": "mlx"})
    q = {"group_size": group, "bits": bits, "mode": "affine"}
    q |= {m: {"group_size": g, "bits": b} for m, (b, g) in layers.items()}
    (path / "config.json").write_text(json.dumps(cfg | {"quantization": q, "quantization_config": q}))
    return cfg, ref


@pytest.mark.parametrize("bits,group", [(4, 32), (5, 64), (3, 32), (8, 64)])
def test_tiny_mlx_folder_loads_exactly(tmp_path, bits, group):
    """Every weight as mlx dequantizes it; 4 and 5 bits through GGUF blocks, the rest dense. Group 64 leaves
    down_proj (96 inputs) in float, as mlx-lm's quantize_model does; one layer overrides the bits."""
    override = {"model.layers.1.self_attn.o_proj": (2 if bits != 2 else 4, 32)}
    cfg, ref = _mlx_folder(tmp_path, bits, group, override)
    config, weights = read_folder(tmp_path)
    kinds = {n: type(weights[n]).__name__ for n in weights}
    assert kinds["model.layers.0.mlp.up_proj.weight"] == ("GGUFTensor" if bits in (4, 5) else "Tensor")
    assert kinds["model.embed_tokens.weight"] == kinds["model.layers.0.mlp.up_proj.weight"]
    ids = torch.randint(0, cfg["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = build_model(config, weights)(ids)
        want = build_model(config, ref)(ids)
    assert torch.equal(ours, want)


def _corrupt(path, edit_config=None, drop=None):
    if edit_config:
        cfg = json.loads((path / "config.json").read_text())
        edit_config(cfg)
        (path / "config.json").write_text(json.dumps(cfg))
    if drop:
        state = mx.load(str(path / "model.safetensors"))
        del state[drop]
        mx.save_safetensors(str(path / "model.safetensors"), state)


@pytest.mark.parametrize("edit,drop,match", [
    (lambda c: c["quantization"].update(bits=7), None, "bits 7 is not one mlx writes"),
    (lambda c: c["quantization"].update(group_size=48), None, "group size 48"),
    (lambda c: c["quantization"].update(mode="mxfp4"), None, "mode 'mxfp4' is not supported"),
    (lambda c: c.pop("quantization") and c.update(quantization_config={"quant_method": "gptq"}), None,
     "'gptq' is not mlx's affine"),
    (lambda c: c["quantization"].update(bits=8), None, "does not hold .* groups of 32 at 8 bits"),
    (None, "model.layers.0.mlp.up_proj.scales", r"up_proj.scales is missing"),
    (None, "model.layers.0.mlp.up_proj.biases", r"no model.layers.0.mlp.up_proj.biases beside it"),
])
def test_bad_mlx_folders(tmp_path, edit, drop, match):
    _mlx_folder(tmp_path, 4, 32)
    _corrupt(tmp_path, edit, drop)
    with pytest.raises(KilnError, match=match):
        read_folder(tmp_path)


def test_bad_convert_arguments(tmp_path, qwen_path):
    from kiln.convert_mlx import to_mlx
    with pytest.raises(KilnError, match="bits 7"):
        to_mlx(qwen_path, tmp_path / "out", bits=7)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(KilnError, match="not an empty folder"):
        to_mlx(qwen_path, tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no partial output left behind


def test_cli_converts_a_gguf_to_an_mlx_folder(tmp_path):
    """`kiln convert --to mlx` on a tiny llama GGUF (untied head: quantized too): every file under the umask's
    mode, mlx-lm's logits on the folder match kiln's, and a bad --q-bits is one line with exit status 2."""
    import stat

    import mlx_lm
    from test_cli import kiln as run, tiny_gguf
    src, out = tiny_gguf(tmp_path / "tiny.gguf"), tmp_path / "mlx"
    r = run("convert", src, out, "--to", "mlx", "--q-bits", "5", "--q-group-size", "32", umask=0o027)
    assert r.returncode == 0, r.stderr
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()}
    assert {"model.safetensors", "model.safetensors.index.json", "config.json", "tokenizer.json"} <= set(modes)
    assert set(modes.values()) == {0o640}, modes
    assert _headers(out)["lm_head.weight"] == ("U32", (258, 5))
    model, tok = mlx_lm.load(str(out))
    ids = tok.encode("hello world")
    ref = _to_torch(model(mx.array([ids])))[0]
    ours, _ = kiln.load(out, device="cpu")
    with torch.no_grad():
        assert _kl(ref, ours(torch.tensor([ids]))[0]) < 1e-3  # mlx-lm computes in bf16 here
    info = run("info", out)
    assert info.returncode == 0 and "mlx-lm quantized safetensors" in info.stdout, info.stderr
    assert "bfloat16 x3, mlx 5-bit/32 x9" in info.stdout, info.stdout  # norms; 7 linears, embedding, head
    bad = run("convert", src, tmp_path / "bad", "--to", "mlx", "--q-bits", "7")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "--q-bits" in bad.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlx", "tiny.gguf"]


# ------------------------------------------------------------------ (b) the real 0.5B, both ways

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for this file: on the 2 shared cores of the test machine, torch's second thread waits
    on a busy core at every op, and loading and converting the 0.5B ran 3-10x slower with it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


PROMPTS = ["def fibonacci(n):", "The capital of France is", "import numpy as np\n", "# Sort a list in Python\n"]
N_TOKENS = 4
KL_TEXT = "def quicksort(xs):\n    if len(xs) <= 1:"


@pytest.fixture(scope="module")
def real_paths(tmp_path_factory):
    """(GGUF, the bf16 Hugging Face folder `kiln convert` writes from it)."""
    from kiln.convert import gguf_to_hf
    from tests.conftest import real_model
    gguf_path = real_model("qwen2.5-coder-0.5b")
    return gguf_path, gguf_to_hf(gguf_path, tmp_path_factory.mktemp("qwen-hf"), torch.bfloat16)


@pytest.fixture(scope="module")
def kiln_written(real_paths, tmp_path_factory):
    """kiln's 4-bit folder (float32 scales: mlx's CPU kernels run bf16 ~10x slower here)."""
    from kiln.convert_mlx import to_mlx
    return to_mlx(real_paths[0], tmp_path_factory.mktemp("kiln-mlx") / "q4", 4, 64, dtype=torch.float32)


@pytest.fixture(scope="module")
def mlx_written(real_paths, tmp_path_factory):
    """The folder `mlx_lm.convert -q` writes from kiln's Hugging Face folder (float32, as above)."""
    from mlx_lm import convert
    out = tmp_path_factory.mktemp("mlx-lm") / "q4"
    convert(str(real_paths[1]), str(out), quantize=True, q_group_size=64, q_bits=4, dtype="float32")
    return out


def _headers(folder):
    from safetensors import safe_open
    with safe_open(str(folder / "model.safetensors"), framework="np") as f:
        return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}


@pytest.mark.model
def test_kiln_writes_what_mlx_lm_writes(kiln_written, mlx_written, real_paths, tmp_path):
    """From the same Hugging Face folder, kiln's folder holds mlx_lm.convert's tensors byte for byte (names,
    dtypes, shapes, packing, scales, biases, the layers left in float); from the GGUF, the same tensor set."""
    from safetensors.torch import load_file

    from kiln.convert_mlx import to_mlx
    assert _headers(kiln_written) == _headers(mlx_written)
    ours, theirs = (json.loads((f / "config.json").read_text()) for f in (kiln_written, mlx_written))
    assert ours["quantization"] == theirs["quantization"] == theirs["quantization_config"] \
        == ours["quantization_config"]
    same_source = to_mlx(real_paths[1], tmp_path / "q4", 4, 64, dtype=torch.float32)
    a, b = (load_file(str(f / "model.safetensors")) for f in (same_source, mlx_written))
    assert a.keys() == b.keys()
    bits = lambda t: t.view(torch.int32) if t.dtype == torch.uint32 else t  # noqa: E731
    differ = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(bits(a[k]), bits(b[k]))]
    assert not differ, differ[:5]


def _mlx_greedy(model, ids, n):
    from mlx_lm.generate import generate_step
    return [int(t) for (t, _), _ in zip(generate_step(mx.array(ids), model, max_tokens=n), range(n))]


@pytest.mark.model
def test_mlx_lm_runs_the_folder_kiln_writes(kiln_written):
    import mlx_lm
    model, tok = mlx_lm.load(str(kiln_written))
    theirs = [_mlx_greedy(model, tok.encode(p), N_TOKENS) for p in PROMPTS]
    del model
    model, ktok = kiln.load(kiln_written, device="cpu")
    assert [ktok.encode(p) for p in PROMPTS] == [tok.encode(p) for p in PROMPTS]
    ours = [[r.token for r in kiln.stream_generate(model, ktok, p, max_tokens=N_TOKENS, ignore_eos=True)]
            for p in PROMPTS]
    agree = sum(a == b for a, b in zip(ours, theirs))
    print(f"greedy agreement kiln vs mlx-lm: {agree}/{len(PROMPTS)}")
    assert agree >= 3, (ours, theirs)


def _kl(ref: torch.Tensor, out: torch.Tensor) -> float:
    p, q = ref.float().log_softmax(-1), out.float().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


@pytest.mark.model
def test_kiln_runs_the_folder_mlx_lm_writes(mlx_written):
    """Exact fp32 path (Q4_1 blocks dequantized) and the compact CPU path (int4 rows, bf16 activations)."""
    import mlx_lm
    model, tok = mlx_lm.load(str(mlx_written))
    ids = tok.encode(KL_TEXT)
    ref = _to_torch(model(mx.array([ids])))[0]                          # (T, V)
    del model
    for quantized in (False, True):
        ours, _ = kiln.load(mlx_written, device="cpu", quantized=quantized)
        with torch.no_grad():
            kl = _kl(ref, ours(torch.tensor([ids]))[0])
        print(f"mean KL(mlx-lm || kiln{' compact' if quantized else ''}) = {kl:.3g}")
        assert kl <= 0.01


def test_scales_outside_f16_are_dequantized_not_rounded():
    """Q4_1 / Q5_1 hold scale and bias in f16; a weight whose scales overflow it stays exact, as floats."""
    from kiln.formats.mlx import Quantized, materialize
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)) * 1e6
    parts = dict(zip(("weight", "scales", "biases"), affine.quantize(w, 4, 32)))
    q = Quantized({p: (None, p) for p in parts}, 4, 32, (8, 64))
    got = materialize(q, lambda _, p: parts[p], "x.weight")
    assert isinstance(got, torch.Tensor) and torch.equal(got, affine.dequantize(*parts.values(), 4, 32))
