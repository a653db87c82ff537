"""kiln.engine: continuous batching on the real Qwen2.5-Coder-0.5B model (fp32, CPU).

Owns: the engine's behaviour against an independent reference — each request run alone through
`kiln.stream_generate` (the batch-1 path): concurrent greedy requests, a request joining mid-run, prefix
cache hits, seeded sampling, penalties, logit bias and logprobs must all reproduce their solo runs; plus
cancel (running and queued), the bounded queue, bad requests, stop tokens, logits processors (a ban, a
terminating one, a failing one that must not take down its neighbours) and async iteration.
Not: the per-row attention ops (tests/test_ops.py, tests/test_models.py), HTTP (tests/test_server.py).
"""

import asyncio

import pytest
import torch

from kiln.cache import KVCache, Step
from kiln.errors import KilnError
from kiln.generate import stream_generate
from kiln.sample import SamplingParams
from kiln.engine import Engine, EngineRequest, QueueFull

pytestmark = pytest.mark.model

PROMPTS = ["def fibonacci(n):", "The capital of France is", "import numpy as np\n# load the csv",
           "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n"]
N = 6  # tokens per request: enough to diverge on any mixing of rows, few enough to keep the file fast
LONG = 12  # the first prompt's reference is this long (a request that others join)


def solo(qwen, prompt, n=N, **sampling):
    """The reference: one request alone through kiln's batch-1 generation → (tokens, logprobs rows)."""
    model, tok = qwen
    outs = list(stream_generate(model, tok, prompt, n, ignore_eos=True, **sampling))
    return [o.token for o in outs], [o.logprobs for o in outs]


def run(engine, req):
    """Submit and read to the end → (tokens, outputs)."""
    outs = list(engine.submit(req).sync())
    return [o.token for o in outs], outs


def req(tok, prompt, n=N, **kw):
    params = SamplingParams(**{k: kw.pop(k) for k in list(kw) if k in SamplingParams.__dataclass_fields__})
    return EngineRequest(prompt=tok.encode(prompt) if isinstance(prompt, str) else prompt, params=params,
                         max_tokens=n, ignore_eos=kw.pop("ignore_eos", True), **kw)


@pytest.fixture(scope="module")
def engine(qwen):
    model, tok = qwen
    e = Engine(model, tok, n_slots=4, ctx_size=256, max_queue=8)
    e.start()
    yield e
    e.stop()


@pytest.fixture(scope="module")
def solo_runs(qwen):
    """(tokens, logprobs) of each prompt alone, greedy; the first one LONG tokens, the others N."""
    return [solo(qwen, p, n=LONG if i == 0 else N) for i, p in enumerate(PROMPTS)]


@pytest.fixture(scope="module")
def greedy_refs(solo_runs):
    return [tokens[:N] for tokens, _ in solo_runs]


def test_concurrent_greedy_requests_equal_their_solo_runs(qwen, engine, greedy_refs):
    tok = qwen[1]
    handles = [engine.submit(req(tok, p)) for p in PROMPTS]  # all in the queue before the first step
    got = [[o.token for o in h.sync()] for h in handles]
    assert got == greedy_refs
    assert all(h.finish_reason == "length" for h in handles)
    assert engine.stats()["steps"] < len(PROMPTS) * N  # they really shared decode steps


def test_static_padded_step_equals_solo_runs(qwen, greedy_refs):
    """The form a CUDA graph replays (graphs=True; eager here): rows padded to a bucket write into a
    scratch slot. Rows leave at different steps, so the bucket shrinks 4 → 2 → 1."""
    model, tok = qwen
    e = Engine(model, tok, n_slots=4, ctx_size=128, graphs=True)
    e.start()
    try:
        lengths = [N, 2, 4]
        handles = [e.submit(req(tok, p, n=k)) for p, k in zip(PROMPTS, lengths)]
        assert [[o.token for o in h.sync()] for h in handles] == [r[:k] for r, k in zip(greedy_refs, lengths)]
        assert e._step.buckets == [1, 2, 4] and e.cache.k.shape[1] == 5  # 4 slots + the scratch slot
    finally:
        e.stop()
    for slot in e._slots[:3]:  # each slot holds exactly its own tokens' keys: padding wrote elsewhere
        n = len(slot.tokens)
        fresh = KVCache.for_model(model, max_len=n)
        with torch.inference_mode():
            model(torch.tensor([slot.tokens]), Step.prefill(fresh, 0))
        torch.testing.assert_close(e.cache.k[:, slot.index, :, :n], fresh.k[:, 0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prefill_step", [512, 7])
def test_prompts_prefilled_together_equal_their_solo_runs(qwen, solo_runs, prefill_step):
    """Prompts of different lengths waiting together are prefilled in one forward of padded rows, each at its
    own slot and position (Engine._prefill_rows): tokens and logprobs equal their solo runs, and every slot
    holds exactly its own tokens' keys (the pads wrote only past them). With a 7-token budget the prompts
    go in chunks over several iterations, a chunk of one row beside the start of the next."""
    model, tok = qwen
    e = Engine(model, tok, n_slots=4, ctx_size=128, prefill_step=prefill_step)
    handles = [e.submit(req(tok, p)) for p in PROMPTS]  # all waiting before the loop's first iteration
    e.start()
    try:
        outs = [list(h.sync()) for h in handles]
    finally:
        e.stop()
    lengths = [len(tok.encode(p)) for p in PROMPTS]
    assert len(set(lengths)) > 2  # really padded
    if prefill_step > max(lengths) * len(PROMPTS):
        assert e.stats()["prefill_forwards"] == 1
    else:
        assert e.stats()["prefill_forwards"] < sum(-(-n // prefill_step) for n in lengths)
    for got, (tokens, logprobs) in zip(outs, solo_runs):
        assert [o.token for o in got] == tokens[:N]
        want = [float(lp[t]) for lp, t in zip(logprobs[:N], tokens[:N])]
        assert [o.logprob for o in got] == pytest.approx(want, abs=2e-3)
    for slot in e._slots:  # (a masked forward of padded rows rounds apart from one unmasked row: 1e-3; a
        n = len(slot.tokens)  # key a pad overwrote would be off by O(1))
        fresh = KVCache.for_model(model, max_len=n)
        with torch.inference_mode():
            model(torch.tensor([slot.tokens]), Step.prefill(fresh, 0))
        torch.testing.assert_close(e.cache.k[:, slot.index, :, :n], fresh.k[:, 0], rtol=1e-3, atol=1e-3)


def test_look_ahead_steps_that_go_stale_change_nothing(qwen, greedy_refs, solo_runs):
    """The static step launches the next step on the device's own picks before the host reads them
    (Engine._look_ahead). A row that stops on a stop token makes that step stale, a row that joins too;
    outputs must still equal the solo runs and every slot hold exactly its own tokens' keys."""
    model, tok = qwen
    e = Engine(model, tok, n_slots=4, ctx_size=128, graphs=True)
    launched = []
    look_ahead = e._look_ahead
    e._look_ahead = lambda rows, tokens: (launched.append(len(rows)), look_ahead(rows, tokens))
    e.start()
    try:
        ref0 = solo_runs[0][0]
        stop = ref0[4]
        k = ref0.index(stop)
        a = e.submit(req(tok, PROMPTS[0], n=LONG, ignore_eos=False, stop_token_ids=frozenset({stop})))
        b = e.submit(req(tok, PROMPTS[1]))
        it = b.sync()
        first = [next(it).token for _ in range(2)]
        c = e.submit(req(tok, PROMPTS[2]))  # joins while a and b decode
        assert [o.token for o in a.sync()] == ref0[:k + 1] and a.finish_reason == "stop"
        assert first + [o.token for o in it] == greedy_refs[1]
        assert [o.token for o in c.sync()] == greedy_refs[2]
    finally:
        e.stop()
    assert launched, "no step was launched ahead"
    for slot in e._slots[:3]:
        n = len(slot.tokens)
        fresh = KVCache.for_model(model, max_len=n)
        with torch.inference_mode():
            model(torch.tensor([slot.tokens]), Step.prefill(fresh, 0))
        torch.testing.assert_close(e.cache.k[:, slot.index, :, :n], fresh.k[:, 0], rtol=1e-4, atol=1e-4)


def test_mixed_sampling_params_in_one_batch_equal_their_solo_runs(qwen, engine, greedy_refs):
    """Per-row sampling: a seeded temperature draw, penalties and a logit bias next to a greedy row."""
    tok = qwen[1]
    cases = [(PROMPTS[0], dict(temperature=0.9, top_p=0.95, seed=7)),
             (PROMPTS[1], dict(repetition_penalty=1.3, frequency_penalty=0.5)),
             (PROMPTS[2], dict(logit_bias={29337: -100.0, 198: 5.0}))]
    refs = [solo(qwen, p, **kw)[0] for p, kw in cases]
    cases.append((PROMPTS[3], dict(temperature=0.0)))
    refs.append(greedy_refs[3])
    handles = [engine.submit(req(tok, p, **dict(kw))) for p, kw in cases]
    assert [[o.token for o in h.sync()] for h in handles] == refs


def test_a_request_joins_a_running_batch(qwen, engine, solo_runs, greedy_refs):
    tok = qwen[1]
    long_ref = solo_runs[0][0]
    a = engine.submit(req(tok, PROMPTS[0], n=LONG))
    it = a.sync()
    first = [next(it).token for _ in range(3)]  # a is decoding
    b_tokens, _ = run(engine, req(tok, PROMPTS[1]))
    assert a.finish_reason is None  # b started and finished while a was still running: it joined
    assert b_tokens == greedy_refs[1]
    assert first + [o.token for o in it] == long_ref


def test_prefix_cache_hit_is_reported_and_changes_nothing(qwen, greedy_refs):
    model, tok = qwen
    e = Engine(model, tok, n_slots=2, ctx_size=256)
    e.start()
    try:
        system = "<|im_start|>system\nYou are a careful assistant who answers briefly.<|im_end|>\n"
        p1 = system + "<|im_start|>user\nName a prime number.<|im_end|>\n<|im_start|>assistant\n"
        p2 = system + "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
        shared = 0
        for x, y in zip(tok.encode(p1), tok.encode(p2)):
            if x != y:
                break
            shared += 1
        h1 = e.submit(req(tok, p1, n=4))
        t1 = [o.token for o in h1.sync()]
        assert h1.cached_tokens == 0
        h2 = e.submit(req(tok, p1, n=4))  # the very same prompt: all but its last token are cached
        assert [o.token for o in h2.sync()] == t1 == solo(qwen, p1, n=4)[0]
        assert h2.cached_tokens == len(tok.encode(p1)) - 1
        h3 = e.submit(req(tok, p2, n=4))  # the slot with the longest common prefix serves it
        assert [o.token for o in h3.sync()] == solo(qwen, p2, n=4)[0]
        assert h3.cached_tokens == shared > 10  # the system prompt, from the slot p1 left behind
        assert e.stats()["prefix_hits"] == 2
    finally:
        e.stop()


def test_logprobs_match_the_solo_distribution(qwen, engine, solo_runs):
    tok = qwen[1]
    tokens, lps = (x[:4] for x in solo_runs[1])
    _, outs = run(engine, req(tok, PROMPTS[1], n=4, top_logprobs=3))
    for t, lp, o in zip(tokens, lps, outs):
        assert o.token == t
        assert o.logprob == pytest.approx(lp[t].item(), abs=1e-3)
        top = torch.topk(lp, 3)
        assert [i for i, _ in o.top_logprobs] == top.indices.tolist()
        assert [v for _, v in o.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-3)
    _, outs = run(engine, req(tok, PROMPTS[1], n=2))
    assert outs[0].top_logprobs is None


def test_stop_token_finishes_with_stop(qwen, engine, greedy_refs):
    tok = qwen[1]
    ref = greedy_refs[0]
    stop = ref[2]
    k = ref.index(stop)
    _, outs = run(engine, req(tok, PROMPTS[0], ignore_eos=False, stop_token_ids=frozenset({stop})))
    assert [o.token for o in outs] == ref[:k + 1]
    assert outs[-1].finish_reason == "stop" and outs[-1].is_stop
    assert not any(o.is_stop for o in outs[:-1]) and all(o.finish_reason is None for o in outs[:-1])
    _, outs = run(engine, req(tok, PROMPTS[0], ignore_eos=True, stop_token_ids=frozenset({stop})))
    assert [o.token for o in outs] == ref and outs[-1].finish_reason == "length"


class Ban:
    """A logits processor that forbids some tokens; optionally terminates after `end` tokens."""

    def __init__(self, banned, end=None, fail_at=None):
        self.banned, self.end, self.fail_at, self.seen = list(banned), end, fail_at, []

    def mask(self, logits):
        if self.fail_at is not None and len(self.seen) == self.fail_at:
            raise ValueError("grammar state lost")
        logits[self.banned] = float("-inf")

    def accept(self, token):
        self.seen.append(token)

    def is_terminated(self):
        return self.end is not None and len(self.seen) >= self.end


def test_processor_ban_equals_a_minus_100_logit_bias(qwen, engine, greedy_refs):
    tok = qwen[1]
    banned = [greedy_refs[3][0], greedy_refs[3][2]]
    ref = solo(qwen, PROMPTS[3], n=4, logit_bias={t: -100.0 for t in banned})[0]
    p = Ban(banned)
    tokens, outs = run(engine, req(tok, PROMPTS[3], n=4, processor=p))
    assert tokens == ref and not set(banned) & set(tokens)
    assert p.seen == tokens  # every sampled token was accepted
    p = Ban([], end=3)
    tokens, outs = run(engine, req(tok, PROMPTS[3], processor=p))
    assert tokens == greedy_refs[3][:3] and outs[-1].finish_reason == "stop"


def test_a_failing_processor_fails_only_its_request(qwen, engine, greedy_refs):
    tok = qwen[1]
    bad = engine.submit(req(tok, PROMPTS[0], processor=Ban([], fail_at=2)))
    good = engine.submit(req(tok, PROMPTS[1]))
    outs = list(bad.sync())
    assert outs[-1].finish_reason == "error" and "grammar state lost" in bad.error
    assert [o.token for o in outs[:-1]] == greedy_refs[0][:2]
    assert [o.token for o in good.sync()] == greedy_refs[1]


def test_cancel_frees_the_slot_and_a_queued_request_leaves_at_once(qwen):
    model, tok = qwen
    e = Engine(model, tok, n_slots=1, ctx_size=128, max_queue=4)
    e.start()
    try:
        a = e.submit(req(tok, PROMPTS[0], n=100))
        b = e.submit(req(tok, PROMPTS[1], n=100))  # waits: the only slot is a's
        it = a.sync()
        next(it), next(it)
        b.cancel()
        assert [o.finish_reason for o in b.sync()] == ["cancelled"]
        a.cancel()
        rest = list(it)
        assert rest[-1].finish_reason == "cancelled" and len(rest) < 90
        c_tokens, _ = run(e, req(tok, PROMPTS[2], n=3))  # the slot is free again
        assert len(c_tokens) == 3
        s = e.stats()
        assert s["active"] == 0 and s["queue_depth"] == 0 and s["requests_finished"] == 3
    finally:
        e.stop()


def test_a_full_queue_raises_queue_full(qwen):
    model, tok = qwen
    e = Engine(model, tok, n_slots=1, ctx_size=128, max_queue=1)
    e.start()
    try:
        a = e.submit(req(tok, PROMPTS[0], n=50))
        b = e.submit(req(tok, PROMPTS[1], n=2))
        with pytest.raises(QueueFull):
            e.submit(req(tok, PROMPTS[2], n=2))
        a.cancel()
        assert [o.finish_reason for o in a.sync()][-1] == "cancelled"
        assert len(list(b.sync())) == 2
    finally:
        e.stop()


def test_bad_requests_are_refused_with_the_numbers(qwen, engine):
    tok = qwen[1]
    with pytest.raises(KilnError, match="300 tokens but the context holds 256"):
        engine.submit(req(tok, [1] * 300))
    with pytest.raises(KilnError, match="empty"):
        engine.submit(req(tok, []))
    with pytest.raises(KilnError, match="outside the vocabulary"):
        engine.submit(req(tok, [10 ** 7]))
    with pytest.raises(KilnError, match="max_tokens"):
        engine.submit(req(tok, PROMPTS[0], n=0))
    with pytest.raises(KilnError, match="ctx_size"):
        Engine(qwen[0], tok, ctx_size=10 ** 9)


def test_context_full_finishes_with_length(qwen):
    model, tok = qwen
    prompt = tok.encode(PROMPTS[0])
    e = Engine(model, tok, n_slots=1, ctx_size=len(prompt) + 3)
    e.start()
    try:
        tokens, outs = run(e, req(tok, prompt, n=100))
        assert len(tokens) == 3 and outs[-1].finish_reason == "length"
    finally:
        e.stop()


def test_async_iteration_from_an_event_loop(qwen, engine, greedy_refs):
    tok = qwen[1]

    async def main():
        handles = [engine.submit(req(tok, p)) for p in PROMPTS[:2]]  # submitted on the loop's thread

        async def read(h):
            return [o.token async for o in h]
        return await asyncio.gather(*(read(h) for h in handles))

    assert asyncio.run(main()) == greedy_refs[:2]


def test_stop_cancels_everything_and_joins(qwen):
    model, tok = qwen
    e = Engine(model, tok, n_slots=1, ctx_size=64)
    e.start()
    a = e.submit(req(tok, PROMPTS[0], n=50))
    b = e.submit(req(tok, PROMPTS[1], n=50))
    next(a.sync())
    thread = e._thread
    e.stop()
    assert not thread.is_alive()
    assert a.finish_reason == "cancelled" and [o.finish_reason for o in b.sync()][-1] == "cancelled"


def test_a_kv_budget_holds_1_88x_the_context_in_q8_0():
    """engine.fit_context (`kiln serve --kv-budget`): in one KV byte budget a q8_0 slot cache gets 64/34 of a
    bf16 one's positions per slot, within the budget; every slot filled at once holds its whole prompt
    (bench/kv_capacity.py measures the same on a real config)."""
    from kiln.engine import fit_context
    from tests.test_bounded_cache import LLAMA, _tiny
    model = _tiny(dict(LLAMA, model_type="qwen2", head_dim=32))  # fp32 on the CPU; 3 layers, 2 KV heads
    budget, n_slots, held = 3 * 100 * 768, 3, {}  # bf16: 3 layers x K and V x 2 heads x 32 x 2 bytes = 768 a position
    g = torch.Generator().manual_seed(0)
    for kind in ("bf16", "q8_0"):
        ctx = fit_context(model, budget, n_slots, kind, kind)
        engine = Engine(model, None, n_slots=n_slots, ctx_size=ctx, cache_type_k=kind, cache_type_v=kind)
        assert engine.cache.nbytes <= budget
        engine.start()
        try:
            handles = [engine.submit(EngineRequest(prompt=torch.randint(0, 128, (ctx - 4,), generator=g).tolist(),
                                                   params=SamplingParams(), max_tokens=2)) for _ in range(n_slots)]
            assert all(list(h.sync())[-1].finish_reason == "length" for h in handles)
            held[kind] = engine.stats()["kv_tokens_used"]
        finally:
            engine.stop()
        assert held[kind] >= n_slots * (ctx - 4)
    assert fit_context(model, budget, n_slots, "bf16", "bf16") == 100
    assert held["q8_0"] / held["bf16"] == pytest.approx(64 / 34, rel=0.02)
    with pytest.raises(KilnError, match="need at least 16"):
        fit_context(model, 10_000, n_slots)
    from kiln.serve import parse_size
    assert [parse_size(t) for t in ("2GiB", "500MB", "1.5kb", "4096")] == [2 ** 31, 500_000_000, 1500, 4096]
    for bad in ("2 parsecs", "inf", "-1", "GiB"):
        with pytest.raises(KilnError, match="--kv-budget"):
            parse_size(bad)


def test_compact_cpu_rows_decode_through_the_one_call_native_step(qwen_path, monkeypatch):
    """The default (compact) CPU model in the engine: a decode step's rows go through the one-call native
    step together, each on its slot's view at its own position (models.base._native_steps); every request's
    tokens and logprobs are those of kiln's batch-1 generation on the same model (logprobs to 1e-3; 3e-2 where the
    CPU has AMX: prompts prefilled together are more than 16 rows, bfloat16 through its tiles, where a short prompt
    alone takes the native GEMVs; ops.cpu.bf16_tiles)."""
    import kiln
    from kiln import native
    from kiln.ops import cpu as ops_cpu
    model, tok = kiln.load(qwen_path, device="cpu")
    if not native.available():
        pytest.skip("no C compiler: the native step is not built")
    prompts = PROMPTS[:3]
    refs = [solo((model, tok), p) for p in prompts]
    calls, real = [], native.decode_layers
    monkeypatch.setattr(native, "decode_layers", lambda *a: calls.append(1) or real(*a))
    e = Engine(model, tok, n_slots=3, ctx_size=128)
    e.start()
    try:
        got = [run(e, req(tok, p)) for p in prompts[:1]]  # one row alone, then three together
        alone = len(calls)
        handles = [e.submit(req(tok, p)) for p in prompts]
        outs = [list(h.sync()) for h in handles]
    finally:
        e.stop()
    assert got[0][0] == refs[0][0]
    assert alone >= N - 1  # the lone row's decode steps took the native call
    assert N - 1 <= len(calls) - alone < 3 * (N - 1)  # the three rows' steps too, several rows a call
    for out, (tokens, lps) in zip(outs, refs):
        assert [o.token for o in out] == tokens
        want = [float(lp[t]) for lp, t in zip(lps, tokens)]
        assert [o.logprob for o in out] == pytest.approx(want, abs=3e-2 if ops_cpu.amx(model.policy) else 1e-3)
