"""kiln/finetune: LoRA layers against PEFT, QLoRA gradients through dequantizing matmuls against a dense base,
data checks, a short training run, fuse, and the CLI (finetune, fuse, generate --adapter)."""

import json
import shutil
from pathlib import Path

import gguf
import pytest
import torch
from torch import nn

import test_models as tm
from kiln.errors import KilnError
from kiln.finetune import data as D
from kiln.finetune import layers as L
from kiln.finetune.trainer import TrainArgs, build_base, train

DATA = Path(__file__).parent / "data" / "finetune"
TARGETS = ("q_proj", "v_proj", "down_proj")


def _randomize_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in L.lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_saved_adapter_in_peft_gives_kilns_logits(tmp_path, name):
    """PEFT loads kiln's adapter (its key names, layers_to_transform) over the same base: same logits."""
    from peft import PeftModel
    cfg = tm.CONFIGS[name]
    hf, _ = tm._hf_model(cfg)
    km = tm._kiln_model(cfg, hf)
    layers = L.layer_indices(km, 2)
    L.apply_lora(km, 4, 8.0, 0.0, TARGETS, layers)
    _randomize_b(km)
    L.save_adapter(km, tmp_path, L.peft_config(4, 8.0, 0.0, TARGETS, layers, cfg["num_hidden_layers"]))
    keys = json.loads((tmp_path / "adapter_config.json").read_text())
    assert keys["layers_to_transform"] == [1, 2]
    ids = torch.randint(0, cfg["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = hf(ids).logits
        ours = km(ids)
        theirs = PeftModel.from_pretrained(hf, tmp_path).eval()(ids).logits
    assert (ours - base).abs().max() > 0.05  # the adapter changes something
    assert (ours - theirs).abs().max() <= 1e-3


def _q8_model(tmp_path):
    from test_gguf import LLAMA, _hf, write_gguf

    from kiln.formats.gguf import hf_tensors, read_gguf, to_config
    path = write_gguf(tmp_path / "q8.gguf", _hf(LLAMA, seed=2), LLAMA, "llama", qtype=gguf.GGMLQuantizationType.Q8_0)
    g = read_gguf(path)
    cfg = to_config(g)
    return cfg, hf_tensors(g, cfg)


def test_qlora_gradients_match_a_dense_base(tmp_path):
    """On a Q8_0 GGUF the QLoRA base keeps its blocks; loss and adapter gradients are the dense model's (with and
    without --grad-checkpoint), and only adapters hold gradients."""
    from kiln.finetune.trainer import checkpoint_blocks
    from kiln.load import build_model
    cfg, weights = _q8_model(tmp_path)
    models = [build_base(cfg, weights), build_model(cfg, weights), build_base(cfg, weights)]
    assert sum(isinstance(m, L.DequantLinear) for m in models[0].modules()) == 2 * 7
    ids = torch.randint(0, cfg["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(3))
    grads, losses = [], []
    for m in models:
        torch.manual_seed(0)
        L.apply_lora(m, 4, 8.0)
        _randomize_b(m)
        if m is models[2]:
            checkpoint_blocks(m)
        logp = torch.log_softmax(m(ids[:, :-1]), -1)
        loss = -logp.gather(-1, ids[:, 1:, None]).mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in L.lora_parameters(m)]))
        assert all(p.grad is None for n, p in m.named_parameters() if "lora_" not in n)
    for i in (1, 2):
        assert torch.allclose(losses[0], losses[i], atol=1e-5)
        assert torch.allclose(grads[0], grads[i], atol=1e-5, rtol=1e-4) and grads[0].abs().max() > 0


@pytest.mark.parametrize("kind", ["BlockLinear", "Int4Linear"])
def test_gradient_through_compact_cpu_layers(kind):
    """dL/dx through a frozen compact layer (Q4_K blocks as the file holds them, or repacked to int4) is
    dL/dy @ its dequantized weight (x needs a gradient: the torch path, not the native GEMV)."""
    from test_quant_kernels import random_rows

    from kiln.quant import cpu, packed
    raw = random_rows(packed.Q4_K, 64, 256, seed=0)
    if kind == "BlockLinear":
        base = cpu.BlockLinear.from_gguf(raw, packed.Q4_K, (64, 256))
    else:
        base = cpu.Int4Linear.from_gguf(raw, packed.Q4_K, (64, 256))
    layer = L.LoRALinear(base, 4, 8.0)
    x = torch.randn(3, 256, requires_grad=True)
    g = torch.randn(3, 64)
    layer(x).backward(g)
    assert torch.allclose(x.grad, g @ base.dequantize(), atol=1e-4)
    assert layer.lora_B.weight.grad is not None and layer.lora_B.weight.grad.abs().max() > 0


def test_malformed_record_names_file_and_line(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "ok"}\n{"prompt": "a"}\n')
    with pytest.raises(KilnError, match=r"train\.jsonl:2: .*prompt"):
        D.read_split(tmp_path, "train")
    (tmp_path / "train.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(KilnError, match=r"train\.jsonl:2: not a JSON"):
        D.read_split(tmp_path, "train")
    with pytest.raises(KilnError, match="valid.jsonl not found"):
        D.read_split(tmp_path, "valid")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, qwen_path):
    """A tiny random qwen2 HF folder with the real Qwen tokenizer (and its chat template)."""
    from kiln.formats.gguf import read_gguf
    from kiln.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(read_gguf(qwen_path).meta)
    cfg = dict(tm.CONFIGS["qwen2"], vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2)
    hf, _ = tm._hf_model(cfg)
    out = tmp_path_factory.mktemp("tiny")
    hf.save_pretrained(out)
    tok.save_folder(out)
    return out


@pytest.mark.model
def test_mask_prompt_trains_on_the_assistant_turn(tiny_folder):
    from kiln.tokenizer import Tokenizer
    tok = Tokenizer.from_folder(tiny_folder)
    rec = json.loads((DATA / "train.jsonl").read_text().splitlines()[0])
    (ids, off), (ids2, off0) = D.encode(rec, tok, True), D.encode(rec, tok, False)
    assert ids == ids2 and off0 == 0
    assert tok.decode(ids[off:]).startswith(rec["messages"][-1]["content"])
    _, tgt = D.collate([(ids, off)])
    assert tok.decode([t for t in tgt[0].tolist() if t >= 0]) == tok.decode(ids[off:])


@pytest.mark.model
def test_train_fuse_and_cli(tiny_folder, tmp_path):
    """A short run lowers the validation loss and saves a PEFT adapter; resume continues; the fused folder and
    `--adapter` reproduce the adapted model's logits; the CLI trains and fuses."""
    import kiln
    from kiln.finetune.fuse import fuse
    from kiln.finetune.trainer import load_base
    model, tok = load_base(tiny_folder)
    out = tmp_path / "ad"
    args = TrainArgs(iters=30, batch_size=4, lora_rank=8, learning_rate=3e-3, mask_prompt=True, adapter_path=str(out),
                     val_batches=2, steps_per_eval=30, save_every=10)
    res = train(model, tok, DATA, args, progress=False, log=lambda *_: None)
    (_, before), (_, after) = res["val_loss"][0], res["val_loss"][-1]
    assert after < 0.85 * before, res["val_loss"]  # 12.6 -> 9.8 measured
    assert (out / "adapter_model.safetensors").is_file() and (out / "optimizer.pt").is_file()
    ids = torch.tensor([tok.encode("Write in Kilnish: red apple")])
    with torch.no_grad():
        want = model(ids)
        base, _ = kiln.load(tiny_folder, device="cpu")
        plain = base(ids)
        L.load_adapter(base, out)
        assert (base(ids) - want).abs().max() <= 1e-4 < (plain - want).abs().max()
        fused, _ = kiln.load(fuse(tiny_folder, out, tmp_path / "fused"), device="cpu")
        assert (fused(ids) - want).abs().max() <= 1e-3
    from kiln.cli import main
    assert main(["finetune", "--model", str(tiny_folder), "--data", str(DATA), "--iters", "2", "--batch-size", "2",
                 "--adapter-path", str(out), "--resume", "--val-batches", "1", "--steps-per-eval", "2"]) == 0
    assert main(["fuse", "--model", str(tiny_folder), "--adapter", str(out), "-o", str(tmp_path / "f2")]) == 0
    assert main(["generate", "--model", str(tiny_folder), "--adapter", str(tmp_path / "nope"), "-p", "hi"]) == 2
    _serve_with_adapter(tiny_folder, out, base)


def _serve_with_adapter(folder, adapter, adapted):
    """`kiln serve --adapter`: the official client's chat completion is kiln.generate's over base + adapter."""
    import openai

    import kiln
    from test_adapter_bank import serving
    tok = kiln.load(folder, device="cpu")[1]
    with serving(folder, ["--adapter", str(adapter), "--parallel", "2"]) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=120)
        msgs = [{"role": "user", "content": "Write in Kilnish: red apple"}]
        r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8)
        want = kiln.generate(adapted, tok, msgs, max_tokens=8)
        assert r.choices[0].message.content == want
        assert want != kiln.generate(kiln.load(folder, device="cpu")[0], tok, msgs, max_tokens=8)  # the base's


def test_cli_errors_before_loading(tmp_path, capsys):
    from kiln.cli import main
    shutil.copy(DATA / "valid.jsonl", tmp_path / "valid.jsonl")
    (tmp_path / "train.jsonl").write_text('{"messages": "hi"}\n')
    assert main(["finetune", "--model", str(tmp_path / "none.gguf"), "--data", str(tmp_path), "--iters", "0"]) == 2
    assert "--iters 0" in capsys.readouterr().err
    with pytest.raises(KilnError, match="rank 0"):
        L.apply_lora(nn.Module(), r=0)


_KERNEL_TRAINING = """
import tempfile, torch
from pathlib import Path
import test_finetune as T
from kiln.finetune import layers as L
from kiln.finetune.trainer import build_base
from kiln.policy import Policy
cfg, weights = T._q8_model(Path(tempfile.mkdtemp()))
ids = torch.randint(0, cfg["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(3))
out = []
for kernels in (True, False):  # the ops' kernels for CPU tensors (this process's default), then torch only
    m = build_base(cfg, weights)
    m.policy = Policy(triton_cpu=kernels)
    torch.manual_seed(0)
    L.apply_lora(m, 4, 8.0)
    T._randomize_b(m)
    logp = torch.log_softmax(m(ids[:, :-1]), -1)
    loss = -logp.gather(-1, ids[:, 1:, None]).mean()
    loss.backward()
    out.append((loss.detach(), torch.cat([p.grad.flatten() for p in L.lora_parameters(m)])))
assert torch.allclose(out[0][0], out[1][0], atol=1e-5), (out[0][0], out[1][0])
assert torch.allclose(out[0][1], out[1][1], atol=1e-5, rtol=1e-4) and out[0][1].abs().max() > 0
print("ok", float(out[0][0]))
"""


@pytest.mark.interpreted("_KERNEL_TRAINING")
def test_training_through_a_model_whose_ops_take_the_kernels():
    """On a GPU every op of a forward takes its Triton kernel, which has no backward: where autograd must go
    through an op (its input requires grad) the torch reference runs instead. Under the interpreter, with
    the kernels taking CPU tensors, loss and adapter gradients equal the torch-only model's."""
    from interpreter import run_interpreted
    assert run_interpreted(_KERNEL_TRAINING, timeout=600).startswith("ok")


@pytest.mark.parametrize("name", ["qwen2", "gemma3"])
def test_adapter_over_joined_projections(tmp_path, name):
    """A GPU or compact CPU load joins q/k/v and gate/up into one matmul each: the adapter's LoRA runs beside the
    joined matmul (the tuple of parts and the wide gate/up both), the logits of the adapter over the layers
    apart; --adapter-scale scales it the same way."""
    from kiln.quant.swap import join_projections
    cfg = tm.CONFIGS[name]
    hf, _ = tm._hf_model(cfg)
    src = tm._kiln_model(cfg, hf)
    layers = list(range(cfg["num_hidden_layers"]))
    L.apply_lora(src, 4, 8.0, 0.0, L.DEFAULT_TARGETS, layers)
    _randomize_b(src)
    L.save_adapter(src, tmp_path, L.peft_config(4, 8.0, 0.0, L.DEFAULT_TARGETS, layers, cfg["num_hidden_layers"]))
    ids = torch.randint(0, cfg["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    for scale in (1.0, 0.5):
        apart, joined = tm._kiln_model(cfg, hf), join_projections(tm._kiln_model(cfg, hf))
        assert sum(type(m).__name__ == "Joined" for m in joined.modules()) == 2 * cfg["num_hidden_layers"]
        for m in (apart, joined):
            L.load_adapter(m, tmp_path, scale)
        with torch.no_grad():
            want, got, base = apart(ids), joined(ids), hf(ids).logits
        assert (want - base).abs().max() > 0.05  # the adapter changes something
        assert (got - want).abs().max() <= 1e-4, (scale, (got - want).abs().max())


def test_fuse_into_gguf_equals_base_plus_adapter(tmp_path):
    """`kiln fuse --to gguf` on a llama GGUF (q/k rows in llama.cpp's permuted order): the fused file, written
    f32, gives the logits of the base with the adapter applied (<= 1e-3); re-quantized to q8_0 it stays close."""
    from kiln.cli import main
    from kiln.load import build_model
    from kiln.reader import read_weights
    load = lambda path: build_model(*read_weights(path))  # noqa: E731 (the test files carry no vocabulary)
    cfg, _ = _q8_model(tmp_path)
    base_path = tmp_path / "q8.gguf"
    src = load(base_path)
    layers = list(range(cfg["num_hidden_layers"]))
    torch.manual_seed(0)
    L.apply_lora(src, 4, 8.0, 0.0, L.DEFAULT_TARGETS, layers)
    _randomize_b(src)
    L.save_adapter(src, tmp_path / "ad", L.peft_config(4, 8.0, 0.0, L.DEFAULT_TARGETS, layers, len(layers)))
    ids = torch.randint(0, cfg["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = src(ids)
        plain = load(base_path)(ids)
    assert (want - plain).abs().max() > 0.05  # the adapter changes something
    for ftype, tol in (("f32", 1e-3), ("q8_0", 5e-2)):
        out = tmp_path / f"fused-{ftype}.gguf"
        assert main(["fuse", "--model", str(base_path), "--adapter", str(tmp_path / "ad"), "-o", str(out), "--to",
                     "gguf", "--type", ftype]) == 0
        with torch.no_grad():
            got = load(out)(ids)
        assert (got - want).abs().max() <= tol, (ftype, (got - want).abs().max())
    assert main(["fuse", "--model", str(tmp_path / "ad"), "--adapter", str(tmp_path / "ad"), "-o",
                 str(tmp_path / "x.gguf"), "--to", "gguf"]) == 2  # a folder base: GGUF output needs a GGUF
