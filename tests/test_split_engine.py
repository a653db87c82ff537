"""The batched engine (kiln/engine.py) and `kiln serve` on a model split across devices (kiln/split.py), run on
the CPU as tests/test_split.py does: two groups of blocks on "cpu" and "cpu:0", so every batched-rows step
(prefill rows, decode, speculative verify) crosses the boundary, and the KV cache is one tensor per layer.

Reference: each request alone through `kiln.stream_generate` on the unsplit fp32 model (fixture `qwen`), and
that model's own prefill for the keys a slot holds. (CPU tensors all report the device "cpu", so these tests
check the crossing's logic and the per-layer cache, not that a tensor left on the wrong GPU would fail.)
"""

import threading
import time

import pytest
import torch

import kiln
from kiln import prompt_cache
from kiln.cache import KVCache, Step
from kiln.engine import Engine, EngineRequest
from kiln.errors import KilnError
from kiln.sample import SamplingParams
from kiln.split import Place

pytestmark = pytest.mark.model

PROMPTS = ["def fibonacci(n):", "The capital of France is", "import numpy as np\n# load the csv file\n",
           "x", "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n"]
N = 6
K = 10  # blocks on the first place; the other 14 on the second


@pytest.fixture(scope="module")
def split(qwen_path, qwen):
    n = qwen[0].args.num_hidden_layers
    model, _ = kiln.load(qwen_path, device="cpu", places=[Place("cpu", False)] * K + [Place("cpu:0", False)] * (n - K))
    return model


def solo(qwen, prompt, n=N):
    """(tokens, logprob of each) of one request alone on the unsplit model."""
    model, tok = qwen
    outs = list(kiln.stream_generate(model, tok, prompt, n, ignore_eos=True))
    return [o.token for o in outs], [float(o.logprobs[o.token]) for o in outs]


def run_all(engine, tok, prompts, n=N):
    """Submit every prompt before the loop's first step, read each to its end → outputs per prompt."""
    handles = [engine.submit(EngineRequest(prompt=tok.encode(p), params=SamplingParams(), max_tokens=n,
                                           ignore_eos=True)) for p in prompts]
    engine.start()
    try:
        return [list(h.sync()) for h in handles]
    finally:
        engine.stop()


def check_slot_keys(engine, ref):
    """Each slot holds, layer by layer, the keys the unsplit model computes for its tokens."""
    for slot in engine._slots:
        n = len(slot.tokens)
        fresh = KVCache.for_model(ref, max_len=n)
        with torch.inference_mode():
            ref(torch.tensor([slot.tokens]), Step.prefill(fresh, 0))
        for layer, k in enumerate(engine.cache.k):
            torch.testing.assert_close(k[slot.index, :, :n], fresh.k[layer, 0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("prefill_step", [512, 5])
def test_concurrent_greedy_requests_equal_their_solo_runs(qwen, split, prefill_step):
    """Five requests of different lengths on three slots: prompts prefilled together as padded rows (512) or
    in chunks of one slot (5), decode steps of several rows, requests waiting for a slot; every token as the
    unsplit model's alone, logprobs within 1e-3."""
    ref, tok = qwen
    e = Engine(split, tok, n_slots=3, ctx_size=96, prefill_step=prefill_step)
    assert not e._step.static and not e._step.use_graphs and e.device == torch.device("cpu")
    assert isinstance(e.cache.k, list) and len(e.cache.k) == ref.args.num_hidden_layers  # per layer
    outs = run_all(e, tok, PROMPTS)
    for out, p in zip(outs, PROMPTS):
        tokens, lps = solo(qwen, p)
        assert [o.token for o in out] == tokens, p
        assert [o.logprob for o in out] == pytest.approx(lps, abs=1e-3)
    stats = e.stats()
    assert stats["steps"] < len(PROMPTS) * N and stats["errors"] == 0  # rows really shared decode steps
    if prefill_step == 512:
        assert stats["prefill_forwards"] < len(PROMPTS)  # some prompts went in one padded forward
    check_slot_keys(e, ref)


def test_decode_steps_replay_the_device_blocks_from_graphs(qwen, split):
    """The engine's batched decode steps on a split model replay each run of blocks on a served device from
    a graph per row count (split.DeviceGraphs: static x / residual / positions / slot index, keys over every
    slot's whole cache, later slots masked); here both CPU groups stand in for the GPU (a re-running capture):
    every token as the unsplit model's alone, logprobs within 1e-3, every slot's keys."""
    from kiln.split import DeviceGraphs
    from tests.conftest import rerun_capture
    ref, tok = qwen
    e = Engine(split, tok, n_slots=3, ctx_size=96)
    e._step.split_graphs = graphs = DeviceGraphs(capture=rerun_capture, kinds=("cpu",))
    lengths = [N + 3 * (i % 3) for i in range(len(PROMPTS))]  # rows end apart: a row count meets other slots
    handles = [e.submit(EngineRequest(prompt=tok.encode(p), params=SamplingParams(), max_tokens=n,
                                      ignore_eos=True)) for p, n in zip(PROMPTS, lengths)]
    e.start()
    try:
        outs = [list(h.sync()) for h in handles]
    finally:
        e.stop()
    for out, p, n in zip(outs, PROMPTS, lengths):
        tokens, lps = solo(qwen, p, n)
        assert [o.token for o in out] == tokens, p
        assert [o.logprob for o in out] == pytest.approx(lps, abs=1e-3)
    assert graphs.graphs and all(type(s.graph).replays for s in graphs.graphs.values())
    assert len({key[-1] for key in graphs.graphs}) >= 2  # graphs of more than one row count
    check_slot_keys(e, ref)


def test_the_engine_serves_a_split_whose_first_group_is_compact(qwen_path):
    """`kiln serve -ngl`'s split: compact CPU blocks and a compact token table (which holds no parameter to
    say its device) before the second group: the engine's greedy tokens equal kiln.generate's on the model."""
    model, tok = kiln.load(qwen_path, device="cpu", places=[Place("cpu", True)] * K + [Place("cpu:0", True)] * 14)
    e = Engine(model, tok, n_slots=2, ctx_size=64)
    assert e.device == torch.device("cpu")
    out = run_all(e, tok, PROMPTS[:2])
    for o, p in zip(out, PROMPTS[:2]):
        want = kiln.generate(model, tok, tok.encode(p), max_tokens=N, temperature=0, ignore_eos=True)
        assert tok.decode([x.token for x in o]) == want, p


def test_a_rows_graph_follows_its_slots_and_positions(qwen, split):
    """One row count's graph replayed for other slots at other positions (what a server's changing batch
    does) gives the eager step's logits: the static slot index and positions are refilled each step."""
    from kiln.split import DeviceGraphs
    from tests.conftest import rerun_capture
    tok = qwen[1]
    prompts = [tok.encode(p) for p in PROMPTS[:3]]

    def run(graphs):
        cache, done, out = KVCache.for_model(split, batch=3, max_len=64), [0, 0, 0], []
        with torch.inference_mode():
            for i, ids in enumerate(prompts):
                split(torch.tensor([ids]), Step.prefill(cache.slot(i), 0))
            for slots in ([0, 1], [0, 1], [2, 0], [1, 2], [0, 2]):
                pos = [len(prompts[s]) + done[s] for s in slots]
                step = Step.rows(cache.rows(slots, max(pos) + 1), torch.tensor(pos), graphs=graphs)
                out.append(split(torch.tensor([[100 + s] for s in slots]), step)[:, -1].clone())
                for s in slots:
                    done[s] += 1
        return out

    graphs = DeviceGraphs(capture=rerun_capture, kinds=("cpu",))
    for got, want in zip(run(graphs), run(None)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert [type(s.graph).replays for s in graphs.graphs.values()] == [4, 4]  # both groups, steps 2-5


def test_prompt_lookup_speculation_equals_solo_runs(qwen, split):
    ref, tok = qwen
    code = "def area(w, h):\n    total = w * h\n    print('area', total)\n    return total\n"
    prompts = [f"{code}\n# The same function, renamed:\ndef area2(w, h):\n", "def fibonacci(n):",
               "The capital of France is"]
    e = Engine(split, tok, n_slots=2, ctx_size=128, prompt_lookup=3, num_draft_tokens=4)
    outs = run_all(e, tok, prompts, n=10)
    for out, p in zip(outs, prompts):
        tokens, lps = solo(qwen, p, n=10)
        assert [o.token for o in out] == tokens, p
        assert [o.logprob for o in out] == pytest.approx(lps, abs=1e-3)
    stats = e.stats()
    assert stats["accepted"] > 0 and stats["steps"] < 30, stats


def test_slot_save_and_restore_on_a_split_cache(qwen, split, tmp_path):
    """server/slots.py's save and restore (prompt_cache on a slot's batch-1 view): a slot saved and restored
    into another holds the same keys and values, layer by layer; the file does not restore into an unsplit
    model's cache (laid out otherwise) but says why."""
    ref, tok = qwen
    e = Engine(split, tok, n_slots=2, ctx_size=64)
    e.start()
    try:
        list(e.submit(EngineRequest(prompt=tok.encode(PROMPTS[2]), params=SamplingParams(), max_tokens=3)).sync())
        used = next(s.index for s in e._slots if s.tokens)
        path = tmp_path / "slot.bin"
        tokens = e.slot_call(used, lambda cache, s: (prompt_cache.save(path, split, tok, cache, s.tokens),
                                                     list(s.tokens))[1]).result()

        def restore(cache, s):
            header, parts = prompt_cache.load(path, split, tok)
            prompt_cache.restore(cache, header, parts, len(header["tokens"]))
            s.tokens[:] = header["tokens"]
        e.slot_call(1 - used, restore).result()
    finally:
        e.stop()
    n = len(tokens)
    for kv in (e.cache.k, e.cache.v):
        for t in kv:
            assert torch.equal(t[1 - used, :, :n], t[used, :, :n])
    check_slot_keys(e, ref)
    header, parts = prompt_cache.load(path, ref, tok)  # the same model, so the same identity
    with pytest.raises(KilnError, match="split across devices"):
        prompt_cache.restore(KVCache.for_model(ref, max_len=64), header, parts, n)


def test_graphs_on_a_split_model_are_refused(split, qwen):
    with pytest.raises(KilnError, match="split across devices"):
        Engine(split, qwen[1], n_slots=1, ctx_size=32, graphs=True)


def test_server_serves_a_split_model(qwen, split, tmp_path):
    """`kiln serve`'s app (create_app, as serve.main builds it) on the split model behind a real uvicorn
    server, driven by the official openai client: answers as kiln.generate on the unsplit model; a slot saves
    to a file."""
    openai = pytest.importorskip("openai")
    httpx = pytest.importorskip("httpx")
    from kiln.serve import bind
    from kiln.server.app import create_app, server_for
    ref, tok = qwen
    app = create_app(model=split, tokenizer=tok, model_id="split", n_slots=2, ctx_size=256,
                     slot_save_path=str(tmp_path), drafting=dict(prompt_lookup=3, num_draft_tokens=4))
    server = server_for(app, "127.0.0.1", 0)
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        c = client.completions.create(model="split", prompt="def fibonacci(n):", max_tokens=12, temperature=0)
        assert c.choices[0].text == kiln.generate(ref, tok, "def fibonacci(n):", max_tokens=12)
        chat = [{"role": "user", "content": "Write a Python function that adds two numbers."}]
        r = client.chat.completions.create(model="split", messages=chat, max_tokens=12, temperature=0)
        assert r.choices[0].message.content == kiln.generate(ref, tok, chat, max_tokens=12)
        saved = httpx.post(f"{base}/slots/0?action=save", json={"filename": "s0.bin"}).json()
        assert saved["n_saved"] > 0 and (tmp_path / "s0.bin").stat().st_size == saved["n_written"]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
