"""Sampling against transformers' logits processors, plus validation and reproducibility."""

import math

import pytest
import torch

from kiln.errors import KilnError
from kiln.sample import SamplingParams, apply_penalties, filter_logits, sample

tfg = pytest.importorskip("transformers.generation.logits_process")


def _logits(seed=0, v=200):
    return torch.randn(3, v, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("kw,warpers", [
    (dict(temperature=0.7, top_k=10), lambda: [tfg.TemperatureLogitsWarper(0.7), tfg.TopKLogitsWarper(10)]),
    (dict(temperature=1.3, top_p=0.8), lambda: [tfg.TemperatureLogitsWarper(1.3), tfg.TopPLogitsWarper(0.8)]),
    (dict(temperature=1.0, min_p=0.05), lambda: [tfg.MinPLogitsWarper(0.05)]),
    (dict(temperature=0.9, top_k=50, top_p=0.9), lambda: [tfg.TemperatureLogitsWarper(0.9),
                                                        tfg.TopKLogitsWarper(50), tfg.TopPLogitsWarper(0.9)]),
])
def test_filters_keep_the_same_tokens_as_transformers(kw, warpers):
    logits = _logits()
    ours = filter_logits(logits.clone(), SamplingParams(**kw))
    ref = logits.clone()
    for w in warpers():
        ref = w(None, ref)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
    kept = torch.isfinite(ref)
    assert torch.allclose(ours[kept], ref[kept], atol=1e-5)


def test_repetition_penalty_matches_transformers():
    logits = _logits(1)
    ids = torch.tensor([[3, 7, 7, 150], [0, 1, 2, 3], [199, 5, 5, 5]])
    counts = torch.zeros_like(logits, dtype=torch.int32).scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.int32))
    ours = apply_penalties(logits.clone(), counts, SamplingParams(repetition_penalty=1.3))
    ref = tfg.RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    assert torch.allclose(ours, ref)


def test_presence_and_frequency_penalties_follow_openai():
    logits = torch.zeros(1, 5)
    counts = torch.tensor([[0, 1, 3, 0, 2]])
    out = apply_penalties(logits, counts, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    assert torch.allclose(out, torch.tensor([[0.0, -0.75, -1.25, 0.0, -1.0]]))


def test_greedy_and_top_k_1_are_argmax():
    logits = _logits(2)
    assert torch.equal(sample(logits, SamplingParams()), logits.argmax(-1))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits, SamplingParams(temperature=1.0, top_k=1), g), logits.argmax(-1))


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    p = SamplingParams(temperature=1.0, seed=123)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    draws = lambda: torch.stack([sample(logits, p, gen) for _ in range(3000)])  # noqa: E731
    gen = p.generator("cpu")
    a = draws()
    gen = p.generator("cpu")
    b = draws()
    assert torch.equal(a, b)
    freq = torch.bincount(a.flatten(), minlength=3).float() / a.numel()
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.04)


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(temperature=math.nan), dict(top_p=0), dict(top_p=1.5),
                                dict(top_k=-2), dict(min_p=2), dict(repetition_penalty=0),
                                dict(presence_penalty=3), dict(frequency_penalty=-2.5),
                                dict(logit_bias={5: 500})])
def test_invalid_values_are_rejected_by_name(kw):
    with pytest.raises(KilnError) as e:
        SamplingParams(**kw)
    assert next(iter(kw)) in str(e.value)
