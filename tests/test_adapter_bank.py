"""kiln/finetune/bank.py and the adapters of kiln serve: several LoRA adapters over one model, one per batch row.

The reference is PEFT's own mixed-adapter batch (`PeftModel(..., adapter_names=[...])`: each row through its
named adapter, "__base__" through none) over the same Hugging Face model: rows of one kiln forward — layers
apart and joined (q/k/v, gate/up in one matmul, as GPU and compact CPU loads run) — give its logits; the
engine's concurrent requests under different adapters give PEFT's greedy tokens, prefix reuse never crosses
adapters; the server (official openai client) picks by model id, the body's adapter or llama-server's lora.
"""

import concurrent.futures
import contextlib
import subprocess
import sys
import time

import pytest
import torch

import test_models as tm
from kiln.engine import Engine, EngineRequest
from kiln.errors import KilnError
from kiln.finetune import layers as L
from kiln.finetune.bank import AdapterBank
from kiln.sample import SamplingParams

# two adapters of different ranks and targets: the stacks pad ranks, and hold zeros where one adapts nothing
ADAPTERS = {"sql": (4, L.DEFAULT_TARGETS, 1), "poet": (8, ("q_proj", "v_proj", "down_proj"), 2)}


def _save_adapters(cfg, hf, root):
    """Each ADAPTERS entry trained-looking (random B) and saved in PEFT's format; {name: folder}."""
    out, layers = {}, list(range(cfg["num_hidden_layers"]))
    for name, (r, targets, seed) in ADAPTERS.items():
        m = tm._kiln_model(cfg, hf)
        torch.manual_seed(seed)
        L.apply_lora(m, r, 2.0 * r, 0.0, targets, layers)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for mod in L.lora_modules(m).values():
                mod.lora_B.weight.copy_(torch.randn(mod.lora_B.weight.shape, generator=g) * 0.1)
        out[name] = L.save_adapter(m, root / name, L.peft_config(r, 2.0 * r, 0.0, targets, layers,
                                                                 cfg["num_hidden_layers"])).parent
    return out


def _peft(hf, folders):
    from peft import PeftModel
    names = list(folders)
    pm = PeftModel.from_pretrained(hf, str(folders[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(folders[n]), adapter_name=n)
    return pm.eval()


@pytest.fixture(scope="module", params=["qwen2", "gemma3"])
def setup(request, tmp_path_factory):
    cfg = tm.CONFIGS[request.param]
    hf, _ = tm._hf_model(cfg)
    folders = _save_adapters(cfg, hf, tmp_path_factory.mktemp("adapters"))
    return cfg, hf, folders


@pytest.mark.parametrize("joined", [False, True])
def test_rows_of_one_batch_run_their_own_adapters(setup, joined):
    from kiln.quant.swap import join_projections
    cfg, hf, folders = setup
    m = tm._kiln_model(cfg, hf)
    m = join_projections(m) if joined else m
    bank = AdapterBank.load(m, list(folders.items()))
    assert bank.names == ["sql", "poet"] and m.adapter_bank is bank
    ids = torch.randint(0, cfg["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(0)).repeat(4, 1)
    names = ["__base__", "sql", "poet", "sql"]
    with torch.no_grad():
        want = _peft(tm._hf_model(cfg)[0], folders)(input_ids=ids, adapter_names=names).logits
        base = m(ids)  # outside a selection: the base model
        with bank.select(torch.tensor([0, 1, 2, 1]), torch.tensor([1.0, 1.0, 1.0, 0.5])):
            got = m(ids)
    assert (want[1] - want[0]).abs().max() > 0.05 and (want[2] - want[1]).abs().max() > 0.05
    assert (got[:3] - want[:3]).abs().max() <= 1e-4, (got[:3] - want[:3]).abs().max()
    assert (base - want[0]).abs().max() <= 1e-4
    # row 3: sql at half its scale, as load_adapter(scale=0.5) runs it over the layers apart
    half = tm._kiln_model(cfg, hf)
    L.load_adapter(half, folders["sql"], 0.5)
    with torch.no_grad():
        assert (got[3] - half(ids[:1])[0]).abs().max() <= 1e-4


def test_bank_errors(setup, tmp_path):
    cfg, hf, folders = setup
    m = tm._kiln_model(cfg, hf)
    with pytest.raises(KilnError, match="share a name"):
        AdapterBank.load(m, [("a", folders["sql"]), ("a", folders["poet"])])
    with pytest.raises(KilnError, match="must be non-empty"):
        AdapterBank.load(m, [("base", folders["sql"])])
    wide = dict(cfg, hidden_size=2 * cfg["hidden_size"])  # an adapter made for another model
    other = _save_adapters(wide, tm._hf_model(wide)[0], tmp_path)
    with pytest.raises(KilnError, match="takes"):
        AdapterBank.load(tm._kiln_model(cfg, hf), [("x", other["sql"])])
    bank = AdapterBank.load(tm._kiln_model(cfg, hf), list(folders.items()))
    assert bank.index("poet") == 2 and bank.index("base") == 0
    with pytest.raises(KilnError, match="no adapter named 'nope'"):
        bank.index("nope")


def _peft_greedy(pm, prompt: list[int], name: str, n: int) -> list[int]:
    with torch.no_grad():
        out = pm.generate(input_ids=torch.tensor([prompt]), adapter_names=[name], max_new_tokens=n,
                          min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def test_engine_batches_requests_of_different_adapters(setup):
    """Concurrent greedy requests under base, sql, poet: PEFT's tokens each, in shared decode steps; a prompt
    run before under another adapter is prefilled again (its keys differ), under the same one reused."""
    cfg, hf, folders = setup
    m = tm._kiln_model(cfg, hf)
    AdapterBank.load(m, list(folders.items()))
    pm = _peft(tm._hf_model(cfg)[0], folders)
    prompt = torch.randint(0, cfg["vocab_size"], (9,), generator=torch.Generator().manual_seed(5)).tolist()
    n, order = 6, [("__base__", 0), ("sql", 1), ("poet", 2)]
    want = {name: _peft_greedy(pm, prompt, name, n) for name, _ in order}
    assert len({tuple(v) for v in want.values()}) >= 2  # the adapters change the greedy tokens (qwen2: all 3)
    e = Engine(m, None, n_slots=3, ctx_size=64, graphs=True)  # the static (graph) form, eager on CPU
    e.start()
    try:
        req = lambda i: EngineRequest(prompt=prompt, params=SamplingParams(temperature=0), max_tokens=n,  # noqa: E731
                                      ignore_eos=True, adapter=i)
        handles = [e.submit(req(i)) for _, i in order]
        got = {name: [o.token for o in h.sync()] for (name, _), h in zip(order, handles)}
        assert got == want
        assert e.stats()["steps"] < len(order) * n  # they shared decode steps
        hits = e.stats()["prefix_hits"]
        # again, one at a time: each slot holds this prompt under one adapter; only that adapter may reuse it
        for name, i in [("poet", 2), ("__base__", 0), ("sql", 1)]:
            assert [o.token for o in e.submit(req(i)).sync()] == want[name]
        assert e.stats()["prefix_hits"] == hits + 3
        with pytest.raises(KilnError, match="invalid adapter 3"):
            e.submit(req(3))
    finally:
        e.stop()


@contextlib.contextmanager
def serving(folder, args: list[str], alias: str = "tiny"):
    """`kiln serve` on a CPU over `folder` with `args`, in its own process: its base URL once healthy."""
    import httpx

    from test_server import _free_port
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", "--model", str(folder), "--alias", alias,
                             "--port", str(port), "--device", "cpu", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        end, healthy = time.time() + 300, False
        while not healthy and time.time() < end and proc.poll() is None:
            try:
                healthy = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
            except httpx.TransportError:
                time.sleep(0.2)
        assert healthy, proc.stderr.read()[-2000:] if proc.poll() is not None else "not healthy in 300 s"
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def tiny_served(qwen_path, tmp_path_factory):
    """A tiny random qwen2 HF folder with the real Qwen tokenizer, its two adapters and PEFT over them:
    (tokenizer, folder, {name: adapter folder}, PeftModel)."""
    from kiln.formats.gguf import read_gguf
    from kiln.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(read_gguf(qwen_path).meta)
    cfg = dict(tm.CONFIGS["qwen2"], vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2)
    hf, _ = tm._hf_model(cfg)
    root = tmp_path_factory.mktemp("served")
    hf.save_pretrained(root / "tiny")
    tok.save_folder(root / "tiny")
    folders = _save_adapters(cfg, hf, root)
    return tok, root / "tiny", folders, _peft(tm._hf_model(cfg)[0], folders)


def test_server_picks_adapters_per_request(tiny_served):
    """kiln serve --adapter sql=... --adapter poet=...: concurrent completions of the official client under each
    choice (model id ID:NAME or the adapter's name, the body's adapter, llama-server's lora; none: the first
    adapter) are PEFT's greedy tokens; /v1/models lists the adapters; unknown names and conflicting choices
    are clear errors."""
    import openai

    tok, folder, folders, pm = tiny_served
    prompt = torch.randint(0, 20000, (7,), generator=torch.Generator().manual_seed(2)).tolist()
    n = 5
    want = {name: tok.decode(_peft_greedy(pm, prompt, name, n)) for name in ("__base__", "sql", "poet")}
    assert len(set(want.values())) == 3
    args = ["--adapter", f"sql={folders['sql']}", "--adapter", f"poet={folders['poet']}", "--parallel", "4"]
    with serving(folder, args) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=120)
        assert [c.id for c in client.models.list().data] == ["tiny", "tiny:sql", "tiny:poet"]
        cases = [("tiny:poet", {}, "poet"), ("tiny", {"adapter": "base"}, "__base__"),
                 ("tiny", {"lora": [{"id": 0, "scale": 1.0}, {"id": 1, "scale": 0}]}, "sql"), ("tiny", {}, "sql"),
                 ("tiny:base", {}, "__base__"), ("poet", {}, "poet")]

        def ask(case):
            model, extra, _ = case
            return client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0,
                                             extra_body={"ignore_eos": True, **extra})

        with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
            results = list(pool.map(ask, cases))
        for (model, extra, name), r in zip(cases, results):
            assert r.choices[0].text == want[name], (model, extra)
            assert r.model == ("tiny" if name == "__base__" else f"tiny:{name}")
        for model, extra, status in [("tiny:nope", {}, 404), ("tiny", {"adapter": "nope"}, 400),
                                     ("tiny:sql", {"adapter": "poet"}, 400),
                                     ("tiny", {"lora": [{"id": 0, "scale": 1}, {"id": 1, "scale": 1}]}, 400),
                                     ("tiny", {"lora": [{"id": 5}]}, 400)]:
            with pytest.raises(openai.APIStatusError) as e:
                client.completions.create(model=model, prompt=prompt, max_tokens=1, extra_body=extra)
            assert e.value.status_code == status, (model, extra, e.value)


def test_saved_slots_keep_their_adapter(tiny_served, tmp_path):
    """A slot saved after a request under an adapter restores under it: the next request of that adapter reuses
    the restored prefix, one of another adapter prefills anew (and answers as PEFT's base does); a server
    without that adapter refuses the file."""
    import httpx
    import openai

    tok, folder, folders, pm = tiny_served
    prompt = torch.randint(0, 20000, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    want = {name: tok.decode(_peft_greedy(pm, prompt, name, 4)) for name in ("__base__", "poet")}
    (tmp_path / "slots").mkdir()
    common = ["--parallel", "1", "--slot-save-path", str(tmp_path / "slots")]
    with serving(folder, ["--adapter", f"poet={folders['poet']}", *common]) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=120)
        slot = lambda action, **body: httpx.post(f"{base_url.removesuffix('/v1')}/slots/0",  # noqa: E731
                                                 params={"action": action}, json=body or None, timeout=60)
        ask = lambda model: client.completions.create(model=model, prompt=prompt, max_tokens=4,  # noqa: E731
                                                      temperature=0, extra_body={"ignore_eos": True})
        assert ask("tiny:poet").choices[0].text == want["poet"]
        assert slot("save", filename="poet.bin").status_code == 200
        assert slot("erase").status_code == 200
        assert slot("restore", filename="poet.bin").status_code == 200
        r = ask("tiny:base")  # the restored keys are poet's: not this request's prefix
        assert r.choices[0].text == want["__base__"] and r.usage.prompt_tokens_details.cached_tokens == 0
        assert slot("restore", filename="poet.bin").status_code == 200
        r = ask("tiny:poet")
        assert r.choices[0].text == want["poet"] and r.usage.prompt_tokens_details.cached_tokens == len(prompt) - 1
    with serving(folder, common) as base_url:
        r = httpx.post(f"{base_url.removesuffix('/v1')}/slots/0", params={"action": "restore"},
                       json={"filename": "poet.bin"}, timeout=60)
        assert r.status_code == 400 and "adapter 'poet'" in r.text
