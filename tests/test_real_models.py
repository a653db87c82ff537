"""kiln against llama.cpp on two real GGUF models (Qwen2.5-Coder 0.5B, Gemma 3 270M; both Q4_K_M).

Owns the acceptance check "matches llama.cpp": teacher-forced top-1 agreement and KL divergence over
stored documents, greedy 32-token continuations, and tokenizer ids on the same texts. The llama.cpp side
is precomputed by tests/data/make_llamacpp_refs.py into tests/data/refs_<key>.npz, so this file never
needs llama.cpp. It does not test speed (bench/ does) or the cached decode path (generate tests do).

Model files come from conftest.real_model (pulled into kiln's cache on first use).
Run with `pytest -m model -s tests/test_real_models.py` to see the measured numbers.

Why the top-1 thresholds are measured against llama.cpp itself: llama.cpp's CPU path rounds activations
to 8 bits inside its dot products, so a different summation order moves those roundings and its logits by
~0.1-0.3. The references therefore also hold llama.cpp's argmax under its own other settings (one token
per eval, flash attention, an f32 KV cache; make_llamacpp_refs.py VARIANTS). Against its batched
reference those agree at only 93.1-94.9% of Gemma's positions and 98.0-98.5% of Qwen's, while kiln
equals transformers' fp32 reading of the same GGUF (test_equals_transformers_on_the_same_gguf). So
top-1 agreement is asserted at >= 98% where llama.cpp agrees with itself (every variant picks the
reference's token) and where its choice is decisive (top-1/top-2 margin of at least DECISIVE logits),
and overall at no less than llama.cpp's own variants reach.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

try:  # tests/ as a package, or tests/ itself on sys.path (pytest's default "prepend" import mode)
    from tests.conftest import real_model
    from tests.refs import load_refs, sha256_file
except ImportError:
    from conftest import real_model
    from refs import load_refs, sha256_file

pytestmark = pytest.mark.model

DATA = Path(__file__).parent / "data"
FILES = ("qwen2.5-coder-0.5b", "gemma3-270m")  # kiln's built-in names = the refs' keys
MIN_TOP1 = 0.98  # where llama.cpp agrees with itself, and where its top-1/top-2 margin >= DECISIVE
DECISIVE = 0.5
MAX_KL = 0.02
# of 8 prompts exactly equal for all 32 tokens (llama.cpp's own other settings reproduce 3-6 of Gemma's 8
# and 5-7 of Qwen's: the refs' greedy "variants" and batch_agree), and …
MIN_GREEDY_EQUAL = 3
MIN_GREEDY_EXPLAINED = 7  # … equal or diverging only at a llama.cpp near-tie
# Reported, not asserted: llama.cpp's own batched and one-token paths already flip argmaxes whose
# top-1/top-2 margin was up to ~0.13 logits (see "batch_agree" in the refs), so a divergence there is
# numerics rather than a bug.
NEAR_TIE = 0.25


@pytest.fixture(scope="module", params=sorted(FILES))
def case(request):
    """(key, model, tokenizer, refs), loaded once per model for the whole module."""
    key = request.param
    path = real_model(key)
    refs = load_refs(DATA / f"refs_{key}.npz")
    assert sha256_file(path) == refs["meta"]["sha256"], f"{path} is not the file the references were made from"
    import kiln
    model, tokenizer = kiln.load(str(path), device="cpu", dtype=torch.float32)
    return key, model, tokenizer, refs


@torch.inference_mode()
def log_probs(model, ids):
    """kiln's next-token log-probs at every position of `ids`, float64, (T, V)."""
    logits = model(torch.tensor([list(ids)], dtype=torch.long))  # (1, T, V)
    return logits[0].double().log_softmax(-1)


def coarse_kl(doc, lq):
    """Per-position KL(llama.cpp || kiln) over llama.cpp's top-K tokens plus one bucket for the rest.

    Merging the tail into one bucket can only lose information, so by the log-sum inequality this is a
    lower bound of the true KL over the full vocabulary (the references store only the top-K).
    """
    ids = torch.from_numpy(doc["topk_ids"].astype(np.int64))                       # (T, K)
    lp = torch.cat([torch.from_numpy(doc["topk_logprobs"]).double(),
                    torch.from_numpy(doc["rest_logprob"]).double()[:, None]], 1)  # (T, K+1)
    lp = lp - lp.logsumexp(1, keepdim=True)  # float32 storage leaves the buckets a hair off summing to 1
    q_rest = lq.scatter(1, ids, float("-inf")).logsumexp(1, keepdim=True)          # (T, 1)
    lq = torch.cat([lq.gather(1, ids), q_rest], 1)                                 # (T, K+1)
    return (lp.exp() * (lp - lq)).sum(1)                                           # (T,)


def test_teacher_forced_matches_llamacpp(case):
    key, model, _, refs = case
    agree, kls, decisive, stable = [], [], [], []
    variants = sorted(refs["meta"]["variants"])
    own = {v: np.mean(np.concatenate([d[f"argmax_{v}"] == d["argmax"] for d in refs["docs"]])) for v in variants}
    for doc in refs["docs"]:
        lq = log_probs(model, doc["tokens"])
        a = (lq.argmax(-1).numpy() == doc["argmax"])
        kl = coarse_kl(doc, lq).numpy()
        margin = doc["topk_logprobs"][:, 0] - doc["topk_logprobs"][:, 1]
        print(f"\n{key} {doc['name']:>6}: {len(a)} pos, top-1 {a.mean():.4f}, mean KL {kl.mean():.5f}, "
              f"max KL {kl.max():.4f} at {int(kl.argmax())}")
        agree.append(a)
        kls.append(kl)
        decisive.append(margin >= DECISIVE)
        stable.append(np.all([doc[f"argmax_{v}"] == doc["argmax"] for v in variants], axis=0))
    a, kl, d, s = (np.concatenate(x) for x in (agree, kls, decisive, stable))
    floor = min(own.values())
    print(f"{key} all: {len(a)} positions, top-1 {a.mean():.4f} (llama.cpp's own settings: "
          + ", ".join(f"{v} {x:.4f}" for v, x in own.items())
          + f"; where llama.cpp agrees with itself, {s.sum()}: {a[s].mean():.4f}; decisive {d.sum()}: "
          f"{a[d].mean():.4f}), mean KL {kl.mean():.5f}")
    assert a[s].mean() >= MIN_TOP1, f"{key}: top-1 agreement {a[s].mean():.4f} < {MIN_TOP1} where llama.cpp's " \
        "own settings all agree with its reference"
    assert a[d].mean() >= MIN_TOP1, f"{key}: decisive top-1 agreement {a[d].mean():.4f} < {MIN_TOP1}"
    assert a.mean() >= floor, f"{key}: top-1 agreement {a.mean():.4f} < {floor:.4f}, the lowest of llama.cpp's " \
        f"own settings against its reference ({own})"
    assert kl.mean() <= MAX_KL, f"{key}: mean KL(llama.cpp || kiln) {kl.mean():.5f} > {MAX_KL}"


def greedy_ids(model, tokenizer, prompt_ids, n):
    """kiln's own decode loop (KV cache, greedy); test_generate checks it against uncached forwards."""
    import kiln
    return [r.token for r in kiln.stream_generate(model, tokenizer, list(prompt_ids), max_tokens=n,
                                                  ignore_eos=True)]


def test_greedy_matches_llamacpp(case):
    key, model, tokenizer, refs = case
    equal, ties, notes = 0, 0, []
    for g in refs["greedy"]:
        want = list(g["gen_ids"])
        got = greedy_ids(model, tokenizer, g["prompt_ids"], len(want))
        first = next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), None)
        equal += first is None
        if first is not None:
            ties += g["margins"][first] < NEAR_TIE
            # llama.cpp's own top-1/top-2 logit margin there: a near-tie is numerics, a wide gap is a bug.
            notes.append(f"  {g['prompt'][-30:]!r}: diverges at {first} (llama.cpp margin "
                         f"{g['margins'][first]:.3f}); kiln {got[first:first + 4]} vs {want[first:first + 4]}")
    own = {"batched": sum(g["batch_agree"] == len(g["gen_ids"]) for g in refs["greedy"])}
    own.update({v: sum(ids == g["gen_ids"] for g in refs["greedy"] for ids in [g.get("variants", {}).get(v)]
                       if ids is not None) for v in ("flash_attn", "kv_f32")})
    print(f"\n{key}: {equal}/{len(refs['greedy'])} greedy continuations equal llama.cpp's, "
          f"{ties} more diverge only where llama.cpp's margin < {NEAR_TIE} (llama.cpp's own other settings: "
          + ", ".join(f"{v} {n}" for v, n in own.items()) + ")")
    print("\n".join(notes))
    assert equal >= MIN_GREEDY_EQUAL, f"{key}: only {equal} continuations equal llama.cpp's\n" + "\n".join(notes)
    assert equal + ties >= MIN_GREEDY_EXPLAINED, f"{key}: {len(refs['greedy']) - equal - ties} " \
        f"continuations diverge where llama.cpp was decisive\n" + "\n".join(notes)


def test_tokenizer_matches_llamacpp(case):
    key, _, tokenizer, refs = case
    texts = [(g["prompt"], g["prompt_ids"]) for g in refs["greedy"]]
    texts += [(d["text"], d["tokens"].tolist()) for d in refs["docs"]]
    bad = []
    for text, want in texts:
        got = tokenizer.encode(text)
        if got != list(want):
            i = next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
            bad.append(f"  {text[:30]!r}: first difference at {i}: kiln {got[i:i + 4]} vs llama.cpp "
                       f"{list(want[i:i + 4])} ({len(got)} vs {len(want)} ids)")
    assert not bad, f"{key}: {len(bad)}/{len(texts)} texts tokenize differently\n" + "\n".join(bad)


def test_equals_transformers_on_the_same_gguf(gemma_path):
    """transformers reads the GGUF independently (gguf-py dequantization, its own Gemma 3): kiln must
    compute the same function. (Gemma only: transformers needs ~30 s for it, ~100 s for the Qwen file.)"""
    from transformers import AutoModelForCausalLM

    import kiln
    refs = load_refs(DATA / "refs_gemma3-270m.npz")
    hf = AutoModelForCausalLM.from_pretrained(gemma_path.parent, gguf_file=gemma_path.name,
                                              dtype=torch.float32).eval()
    model, _ = kiln.load(gemma_path, device="cpu", dtype=torch.float32, quantized=False)  # the exact weights
    for doc in refs["docs"][:2]:
        ids = torch.tensor([list(doc["tokens"])])
        with torch.inference_mode():
            err = (model(ids) - hf(ids).logits).abs().max().item()
        assert err <= 1e-3, f"{doc['name']}: max |Δlogit| kiln vs transformers {err}"
