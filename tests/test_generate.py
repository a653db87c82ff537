"""Generation on the real Qwen2.5-Coder-0.5B: the cached decode loop, streaming, stops, sampling knobs.

The reference for the cached loop is the uncached forward (argmax of `model(ids)` re-run on the whole
sequence each step); streaming must reproduce the one-shot text; stop strings, EOS and max_tokens end
generation with the right finish_reason.
"""

import pytest
import torch

import kiln
from kiln.errors import KilnError
from kiln.decoder import DecoderPool

pytestmark = pytest.mark.model


@torch.inference_mode()
def _uncached_greedy(model, ids, n):
    ids = list(ids)
    out = []
    for _ in range(n):
        nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
        ids.append(nxt)
        out.append(nxt)
    return out


def test_cached_greedy_equals_uncached(qwen):
    model, tok = qwen
    ids = tok.encode("def fibonacci(n):\n")
    got = [r.token for r in kiln.stream_generate(model, tok, ids, max_tokens=12, ignore_eos=True)]
    assert got == _uncached_greedy(model, ids, 12)


def test_stream_equals_generate_and_decode(qwen):
    model, tok = qwen
    msgs = [{"role": "user", "content": "List three prime numbers, with an emoji after each."}]
    rs = list(kiln.stream_generate(model, tok, msgs, max_tokens=40))
    text = kiln.generate(model, tok, msgs, max_tokens=40)
    assert "".join(r.text for r in rs) == text
    toks = [r.token for r in rs if r.token not in tok.eos_token_ids]
    assert text == tok.decode(toks)
    assert rs[-1].finish_reason in ("stop", "length") and all(r.finish_reason is None for r in rs[:-1])
    assert rs[-1].prompt_tokens == len(tok.encode(tok.apply_chat_template(msgs), add_special_tokens=False))
    assert "\ufffd" not in text
    # log-probabilities of every step's distribution, or none when not asked for (generate and the CLI)
    lp = torch.stack([r.logprobs for r in rs])
    assert torch.allclose(lp.exp().sum(-1), torch.ones(len(rs)), atol=1e-3)
    assert all(int(lp[i].argmax()) == r.token for i, r in enumerate(rs))  # greedy: the most likely token
    bare = list(kiln.stream_generate(model, tok, msgs, max_tokens=40, logprobs=False))
    assert [r.token for r in bare] == [r.token for r in rs] and all(r.logprobs is None for r in bare)
    assert all(r.peak_memory > 0 for r in bare)


def test_eos_ends_with_stop_and_max_tokens_with_length(qwen):
    model, tok = qwen
    rs = list(kiln.stream_generate(model, tok, [{"role": "user", "content": "Reply with just: OK"}], max_tokens=30))
    assert rs[-1].finish_reason == "stop" and rs[-1].token in tok.eos_token_ids
    rs = list(kiln.stream_generate(model, tok, "import numpy as np\n", max_tokens=5, ignore_eos=True))
    assert len(rs) == 5 and rs[-1].finish_reason == "length" and rs[-1].generation_tokens == 5


def test_stop_string_truncates(qwen):
    model, tok = qwen
    prompt = "def add(a, b):\n"
    full = kiln.generate(model, tok, prompt, max_tokens=20, ignore_eos=True)
    stop = full[5:9]
    assert stop and stop in full
    rs = list(kiln.stream_generate(model, tok, prompt, max_tokens=20, stop=[stop, "never-appears"], ignore_eos=True))
    assert "".join(r.text for r in rs) == full[:full.index(stop)]
    assert rs[-1].finish_reason == "stop"


def test_sampling_seed_bias_and_validation(qwen):
    model, tok = qwen
    kw = dict(max_tokens=12, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)
    a, b = kiln.generate(model, tok, "Once upon a time", **kw), kiln.generate(model, tok, "Once upon a time", **kw)
    assert a == b
    target = tok.encode(" banana", add_special_tokens=False)[0]
    rs = list(kiln.stream_generate(model, tok, "My favourite word is", max_tokens=3, logit_bias={target: 100}))
    assert all(r.token == target for r in rs)
    with pytest.raises(KilnError, match="top_p"):
        kiln.generate(model, tok, "x", top_p=0)
    with pytest.raises(KilnError, match="unknown sampling"):
        kiln.generate(model, tok, "x", temprature=0.5)
    with pytest.raises(KilnError, match="context holds 8"):
        kiln.generate(model, tok, "a b c d e f g h i j k l", max_context=8)
    with pytest.raises(KilnError, match="token id 10000000 is outside the vocabulary"):
        kiln.generate(model, tok, [1, 10 ** 7])
    with pytest.raises(KilnError, match="outside the vocabulary"):
        kiln.generate(model, tok, [-1, 2])
    with pytest.raises(KilnError, match="stop must be"):
        kiln.generate(model, tok, "x", stop=["ok", 3])


def test_no_step_runs_ahead_past_max_tokens(qwen):
    """generate_step queues token n+1's step before it hands over token n, except past max_tokens: a
    one-token generation (a cold `kiln generate --max-tokens 1`) runs no decode step, so on a GPU it
    captures no decode graph. The step's mark is the keys it writes at the first generated position."""
    from kiln.generate import generate_step
    from kiln.sample import SamplingParams
    model, tok = qwen
    ids = tok.encode("def add(a, b):")
    greedy = SamplingParams(temperature=0.0)
    dec = DecoderPool(model).get(len(ids) + 8)
    one = list(generate_step(ids, model, greedy, dec, max_tokens=1, logprobs=False))
    assert len(one) == 1 and not dec.cache.k[:, :, :, len(ids)].any()
    two = list(generate_step(ids, model, greedy, dec, max_tokens=2, logprobs=False))
    assert [t for t, _ in two][:1] == [one[0][0]] and len(two) == 2 and dec.cache.k[:, :, :, len(ids)].any()


def test_a_decoder_pool_reuses_its_cache_across_calls(qwen):
    """An explicit pool, not state on the model: a second prompt over the first one's used cache (stale keys
    past its own positions) gives what a fresh cache gives."""
    model, tok = qwen
    pool = DecoderPool(model)
    kw = dict(max_tokens=8, ignore_eos=True)
    kiln.generate(model, tok, "def add(a, b):", decoders=pool, **kw)
    decoder = pool.get(16)
    reused = kiln.generate(model, tok, "import os\n", decoders=pool, **kw)
    assert reused == kiln.generate(model, tok, "import os\n", **kw)
    assert pool.get(16) is decoder and not [k for k in vars(model) if "decoder" in k]


def test_penalties_change_a_repetitive_continuation(qwen):
    model, tok = qwen
    prompt = "one one one one one one one"
    plain = [r.token for r in kiln.stream_generate(model, tok, prompt, max_tokens=6, ignore_eos=True)]
    pen = [r.token for r in kiln.stream_generate(model, tok, prompt, max_tokens=6, ignore_eos=True,
                                                 repetition_penalty=3.0)]
    one = tok.encode(" one", add_special_tokens=False)[0]
    assert plain.count(one) > pen.count(one)
