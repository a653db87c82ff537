"""Speculative decoding (kiln/speculative.py): the output must be what plain decoding gives.

Greedy: token for token the plain greedy output, on the real Qwen2.5-Coder-1.5B with the 0.5B as the draft
model, and with prompt lookup on a code-editing prompt. Sampling: a chi-square test of the tokens drawn in a
speculative round against the target's exact distribution (computed by enumeration on a tiny random model
whose draft model disagrees with it), which a rule that kept draft tokens too often would fail.
"""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import kiln
from kiln.errors import KilnError
from kiln.decoder import Decoder
from kiln.load import build_model
from kiln.sample import SamplingParams
from kiln.speculative import ModelDrafter, NgramDrafter, speculative_step

CHI2_DF7_P001 = 24.32  # chi-square critical value, 7 degrees of freedom, p = 0.001


def tiny(seed: int, vocab: int = 8, noise: float = 0.0):
    cfg = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, model_type="qwen2",
               rope_theta=1e4, tie_word_embeddings=False)
    conf = AutoConfig.for_model("qwen2", **{k: v for k, v in cfg.items() if k != "model_type"})
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(conf, dtype=torch.float32).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in n else p.normal_(0, 0.4)
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(99)) * noise)  # a near copy
    return build_model(cfg, hf.state_dict())


@torch.inference_mode()
def exact_next(model, prefixes: torch.Tensor) -> torch.Tensor:
    """p(next | prefix) for each row of prefixes (N, T) → (N, V)."""
    return model(prefixes)[:, -1].float().softmax(-1)


def assert_marginals(target, prompt: list[int], counts: torch.Tensor, n: int) -> None:
    """counts (3, V) of the 2nd, 3rd and 4th tokens of n runs against their exact marginals under plain
    sampling (by enumeration): a chi-square test each."""
    v = counts.shape[1]
    p1 = exact_next(target, torch.tensor([prompt]))[0]  # (V,)
    p2 = exact_next(target, torch.tensor([prompt + [a] for a in range(v)]))  # (V, V): p(t2 | t1)
    p3 = exact_next(target, torch.tensor([prompt + [a, b] for a in range(v) for b in range(v)])).view(v, v, v)
    p4 = exact_next(target, torch.tensor([prompt + [a, b, c] for a in range(v) for b in range(v)
                                          for c in range(v)])).view(v, v, v, v)
    marginals = [p1 @ p2, torch.einsum("a,ab,abc->c", p1, p2, p3), torch.einsum("a,ab,abc,abcd->d", p1, p2, p3, p4)]
    for got, m in zip(counts, marginals):
        chi2 = float(((got - n * m) ** 2 / (n * m)).sum())
        assert chi2 < CHI2_DF7_P001, (chi2, got.tolist(), (n * m).tolist())


@pytest.fixture
def one_thread():
    """Tiny matmuls on one thread: two threads spin against each other (~25x slower on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("draft_seed, noise", [(1, 0.0), (0, 0.03)], ids=["far-draft", "near-draft"])
def test_speculative_sampling_draws_from_the_target_distribution(one_thread, draft_seed, noise):
    """Tokens 2-4 of 800 seeded runs (one round of two drafts after the first token) against their exact
    marginals. A far draft is mostly rejected (the residual draw), a near one mostly kept (the bonus draw)."""
    target, draft = tiny(0), tiny(draft_seed, noise=noise)
    prompt, v, n = [1, 2, 3], 8, 800
    params = SamplingParams(temperature=1.0)
    counts, accepted = torch.zeros(3, v), 0
    decoder, drafter = Decoder.for_model(target, 16), ModelDrafter(draft, 16)  # reused: each run starts at 0
    for seed in range(n):
        params.seed = seed
        stats = {}
        out = [t for t, _ in speculative_step(prompt, target, params, decoder, drafter, num_draft=2, max_tokens=4,
                                              logprobs=False, stats=stats)]
        for i in range(3):
            counts[i, out[i + 1]] += 1
        accepted += stats["accepted"]
    assert_marginals(target, prompt, counts, n)
    rate = accepted / (2 * n)
    assert (rate < 0.5) if draft_seed else (rate > 0.5), rate  # each case exercises the path it is for


def test_ngram_drafter_proposes_what_followed_the_latest_match():
    d = NgramDrafter(max_ngram=2)
    seq = [5, 6, 7, 8, 1, 5, 6, 9, 4, 5, 6]
    assert d.draft(seq, 3, SamplingParams(), None)[0] == [9, 4, 5]  # "5 6" last seen before the tail at 5
    assert d.draft([1, 2, 3], 3, SamplingParams(), None)[0] == []
    with pytest.raises(KilnError):
        NgramDrafter(0)


@pytest.mark.model
def test_speculative_greedy_equals_plain_greedy_on_real_models(qwen):
    draft, tok = qwen
    target, _ = kiln.load("qwen2.5-coder-1.5b", quantized=False)
    prompt = [{"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."}]
    plain = [r.token for r in kiln.stream_generate(target, tok, prompt, max_tokens=20, logprobs=False)]
    rs = list(kiln.stream_generate(target, tok, prompt, max_tokens=20, logprobs=False, draft_model=draft,
                                   num_draft_tokens=4))
    assert [r.token for r in rs] == plain
    assert rs[-1].accepted > 0 and rs[-1].drafted >= rs[-1].accepted
    code = "def area(w, h):\n    total = w * h\n    print('area', total)\n    return total\n"
    edit = f"{code}\n\n# The same function with `total` renamed to `result`:\ndef area(w, h):\n"
    plain = [r.token for r in kiln.stream_generate(target, tok, edit, max_tokens=24, logprobs=False)]
    rs = list(kiln.stream_generate(target, tok, edit, max_tokens=24, logprobs=False, prompt_lookup=3,
                                   num_draft_tokens=8))
    assert [r.token for r in rs] == plain
    assert rs[-1].accepted >= 8, (rs[-1].accepted, tok.decode(plain))  # the new code repeats the prompt's lines
    with pytest.raises(KilnError):
        list(kiln.stream_generate(target, tok, edit, max_tokens=4, draft_model=draft, prompt_lookup=3))


def test_bench_times_speculative_against_plain_greedy(qwen, tmp_path):
    """`kiln bench --prompt-lookup-ngram`: the speculative run's tokens equal plain greedy's on the same
    prompt, and the drafts it reports kept are a part of those drafted."""
    from kiln.bench import format_report, run_speculative
    model, tok = qwen
    code = "def area(w, h):\n    total = w * h\n    return total\n"
    prompt = tok.encode(f"{code}\n\n# The same function, renamed:\ndef area2(w, h):\n")
    sp = run_speculative(model, tok, prompt, 16, 1, dict(prompt_lookup=3, num_draft_tokens=4))
    assert sp["greedy_equal"] is True
    assert 0 < sp["accepted"] <= sp["drafted"] and sp["acceptance"] == sp["accepted"] / sp["drafted"]
    assert sp["speedup"] == sp["speculative_user_tok_s"] / sp["plain_user_tok_s"] > 0
    from kiln.bench import main
    with pytest.raises(KilnError, match="not both"):
        main(["--model", "x", "--draft-model", "y", "--prompt-lookup-ngram", "2"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verify_graph_equals_the_eager_forward_cuda(dtype):
    """Decoder.verify, the speculative check's forward: from its second use a CUDA graph per row count over
    the static cache, at any position; every row's logits as the eager forward's at the same positions."""
    from kiln.cache import Step
    model = tiny(0, vocab=64).to("cuda", dtype)
    dec = Decoder.for_model(model, 48)
    ids = torch.randint(0, 64, (1, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    dec.prefill(ids[:, :10], 0)
    atol, rtol = (1e-4, 1e-4) if dtype == torch.float32 else (6e-2, 2e-2)
    with torch.inference_mode():
        for pos in (10, 10, 15, 20):  # first use eager, then the graph (captured once) at moving positions
            rows = ids[:, pos:pos + 5]
            got = dec.verify(rows, pos).clone()
            ref = model(rows, Step.prefill(dec.cache, pos))[0].float()  # rewrites the same slots
            assert got.shape == (5, 64)
            torch.testing.assert_close(got, ref, atol=atol, rtol=rtol)
    assert list(dec._verifies) == [5]


# ---------------------------------------------------------------- the engine (continuous batching)

def engine_tokens(engine, prompts, n, **params):
    from kiln.engine import EngineRequest
    handles = [engine.submit(EngineRequest(prompt=p, params=SamplingParams(**params), max_tokens=n, ignore_eos=True,
                                           top_logprobs=1)) for p in prompts]
    return [list(h.sync()) for h in handles]


@pytest.mark.model
@pytest.mark.parametrize("graphs", [None, True])
def test_engine_speculation_gives_plain_greedy_tokens_and_logprobs(qwen, graphs):
    """Three greedy requests on two slots (one waits, then reuses a slot) with prompt lookup, the model itself
    as its draft (every draft kept: several tokens a row a step) and a random draft (nearly every one
    rejected): the tokens of each request run alone, and its logprobs; eager, and in the static form (graphs:
    rows padded to a bucket on the scratch slot, tokens from static buffers: what a CUDA graph replays)."""
    from kiln.engine import Engine
    model, tok = qwen
    code = "def area(w, h):\n    total = w * h\n    print('area', total)\n    return total\n"
    prompts = [tok.encode(p) for p in (f"{code}\n\n# The same function with `total` renamed to `result`:\n"
                                       "def area(w, h):\n", "def fibonacci(n):", "The capital of France is")]
    solo = [list(kiln.stream_generate(model, tok, p, 10, ignore_eos=True)) for p in prompts]
    stranger = tiny(3, vocab=model.args.vocab_size)
    for kw in (dict(prompt_lookup=3, num_draft_tokens=6), dict(draft_model=model, num_draft_tokens=3),
               dict(draft_model=stranger, num_draft_tokens=2)):
        e = Engine(model, tok, n_slots=2, ctx_size=128, graphs=graphs, **kw)
        e.start()
        try:
            outs = engine_tokens(e, prompts, 10, temperature=0.0)
            stats = e.stats()
        finally:
            e.stop()
        assert [[o.token for o in out] for out in outs] == [[r.token for r in s] for s in solo], kw
        for out, s in zip(outs, solo):
            want = [float(r.logprobs[r.token]) for r in s]
            assert [o.logprob for o in out] == pytest.approx(want, abs=2e-3)
            assert [o.top_logprobs[0][0] for o in out] == [o.token for o in out]
        assert stats["drafted"] > 0 and stats["steps"] < 30, (kw, stats)  # fewer steps than the 30 tokens
        if kw.get("draft_model") is model:
            assert stats["accepted"] == stats["drafted"]
        if kw.get("draft_model") is stranger:
            assert stats["accepted"] < stats["drafted"] / 2


@pytest.mark.parametrize("drafter", ["far-draft", "ngram"])
def test_engine_speculative_sampling_draws_from_the_target_distribution(one_thread, drafter):
    """The engine's speculative rows (four slots at different points of their requests in one verify step)
    sample tokens 2-4 with the target's exact marginals, as in the batch-1 test above."""
    from kiln.engine import Engine
    target, v, n, prompt = tiny(0), 8, 800, [1, 2, 3]
    kw = dict(draft_model=tiny(1), num_draft_tokens=2) if drafter == "far-draft" else dict(prompt_lookup=1,
                                                                                          num_draft_tokens=2)
    e = Engine(target, None, n_slots=4, ctx_size=16, max_queue=n, **kw)
    e.start()
    try:
        from kiln.engine import EngineRequest
        handles = [e.submit(EngineRequest(prompt=prompt, params=SamplingParams(temperature=1.0, seed=s), max_tokens=4,
                                          ignore_eos=True)) for s in range(n)]
        outs = [[o.token for o in h.sync()] for h in handles]
        stats = e.stats()
    finally:
        e.stop()
    counts = torch.zeros(3, v)
    for out in outs:
        for i in range(3):
            counts[i, out[i + 1]] += 1
    assert_marginals(target, prompt, counts, n)
    assert stats["drafted"] > n / 2 and 0 < stats["accepted"] < stats["drafted"], stats
