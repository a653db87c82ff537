"""Sampling: `SamplingParams` and pure functions of logits that never wait on the host.

Owns: validation of every sampling value, penalties over the tokens seen so far, logit bias,
temperature, top-k, top-p, min-p, and the draw itself (`argmax(probs / Exponential(1))`, which needs no
cumulative sum on the host and no `.item()`); `Sampler`, one sequence's sampling state (its seeded
generator, bias vector, token counts and logits processor), shared by `generate_step` and the engine; a
batch's draw (`pick_rows`: one argmax for the greedy rows) and top logprobs (`top_logprobs`).
Not: the token loops (generate.py, engine.py), grammars (server/structured.py builds the processors).

Shape alphabet: B batch, V vocab.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from kiln.errors import KilnError
from kiln.ops.pick import argmax

log = logging.getLogger("kiln.engine")  # the batch's sampling failures are the engine's to report


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the context (llama.cpp, HF)
    presence_penalty: float = 0.0  # OpenAI: subtract once per token present
    frequency_penalty: float = 0.0  # OpenAI: subtract per occurrence
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None

    def __post_init__(self):
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        checks = [
            ("temperature", self.temperature >= 0 and math.isfinite(self.temperature), "a number >= 0"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0 (0 turns it off)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty),
             "a number > 0 (1 turns it off)"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise KilnError(f"invalid sampling value {name}={getattr(self, name)!r}: must be {want}")
        bad = [v for v in self.logit_bias.values() if not -100 <= v <= 100]
        if bad:
            raise KilnError(f"invalid logit_bias value {bad[0]}: biases must be in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_counts(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    def check_vocab(self, vocab_size: int):
        bad = [t for t in self.logit_bias if not 0 <= t < vocab_size]
        if bad:
            raise KilnError(f"logit_bias names token id {bad[0]}, outside the vocabulary (0..{vocab_size - 1})")

    def generator(self, device) -> torch.Generator | None:
        if self.seed is None:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(int(self.seed))
        return g


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """logits (B, V) float32, counts (B, V) occurrences of each token so far."""
    seen = counts > 0
    if p.repetition_penalty != 1:
        penalized = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if p.presence_penalty:
        logits = logits - p.presence_penalty * seen.to(logits.dtype)
    if p.frequency_penalty:
        logits = logits - p.frequency_penalty * counts.to(logits.dtype)
    return logits


def bias_vector(p: SamplingParams, vocab: int, device) -> torch.Tensor | None:
    if not p.logit_bias:
        return None
    b = torch.zeros(vocab, dtype=torch.float32, device=device)
    ids = torch.tensor(list(p.logit_bias), device=device)
    b[ids] = torch.tensor(list(p.logit_bias.values()), dtype=torch.float32, device=device)
    return b


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p as -inf masks; logits (B, V) float32."""
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if p.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= p.top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -math.inf))
    if p.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(-1, keepdim=True).values, -math.inf)
    return logits


def sample(logits: torch.Tensor, p: SamplingParams, generator=None) -> torch.Tensor:
    """Token ids (B,) from processed logits (B, V): greedy, or a Gumbel-style draw."""
    if p.greedy:
        return argmax(logits)
    probs = filter_logits(logits, p).softmax(-1)
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(-1)


class Sampler:
    """One sequence's sampling state on the model's device: `token = sampler(logits)`, then `accept(token)`.

    Penalties count the prompt's tokens too (as llama.cpp and transformers do). `processor`, if any, is a
    logits processor: `mask(logits (V,))` in place, `accept(token)`. `plain` says the draw is a bare argmax
    (greedy, no penalties, bias or processor), which a batch may take for many rows at once.
    """

    def __init__(self, params: SamplingParams, prompt: list[int], vocab: int, device, processor=None):
        self.params, self.processor = params, processor
        self.gen = params.generator(device)
        self.bias = bias_vector(params, vocab, device)
        self.counts = None  # (1, V) occurrences of each token so far
        if params.needs_counts:
            ids = torch.tensor(prompt, dtype=torch.long, device=device)
            self.counts = torch.zeros(1, vocab, dtype=torch.int32, device=device)
            self.counts[0].index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
        self.plain = params.greedy and self.counts is None and self.bias is None and processor is None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Raw logits (1, V) float32 → token (1,) on the device: penalties, bias, the processor's mask, the draw."""
        if self.counts is not None:
            logits = apply_penalties(logits, self.counts, self.params)
        if self.bias is not None:
            logits = logits + self.bias
        if self.processor is not None:
            logits = logits.clone()  # the mask writes in place; the caller's raw logits still serve logprobs
            self.processor.mask(logits[0])
        return sample(logits, self.params, self.gen)

    def accept(self, token) -> None:
        """Record the token drawn (an int, or a (1,) tensor still on the device: no host sync)."""
        if self.processor is not None:
            self.processor.accept(token)
        if self.counts is not None:
            self.counts[0, token] += 1


def pick_rows(samplers: list[Sampler], logits: torch.Tensor) -> tuple[torch.Tensor, dict[int, str]]:
    """A batch's tokens (B,) on the device from logits (B, V), row b drawn by samplers[b] (one argmax for every
    plain greedy row); rows whose sampling raised (a processor or a value that fails: that request only) come
    back as {row: message}, their token 0."""
    plain = [b for b, s in enumerate(samplers) if s.plain]
    if len(plain) == len(samplers):
        return argmax(logits), {}
    tokens = torch.zeros(len(samplers), dtype=torch.long, device=logits.device)
    if plain:
        idx = torch.tensor(plain, device=logits.device)
        tokens[idx] = argmax(logits[idx])
    failed = {}
    for b, s in enumerate(samplers):
        if not s.plain:
            try:
                tokens[b] = s(logits[b:b + 1])[0]
            except Exception as e:
                log.exception("sampling failed for one request")
                failed[b] = f"{type(e).__name__}: {e}"
    return tokens, failed


def top_logprobs(logits: torch.Tensor, lse: torch.Tensor, ks: list[int]) -> dict[int, list[tuple[int, float]]]:
    """Each row's ks[b] most likely tokens and their log-probabilities, logits (B, V) less lse (B,), for the rows
    that ask (ks[b] > 0): {row: [(token, logprob), ...]}, one device-to-host read for all of them."""
    want = [(b, k) for b, k in enumerate(ks) if k > 0]
    if not want:
        return {}
    idx = torch.tensor([b for b, _ in want], device=logits.device)
    vals, ids = torch.topk(logits[idx], max(k for _, k in want), dim=-1)  # (W, k)
    vals = (vals - lse[idx, None]).tolist()
    ids = ids.tolist()
    return {b: list(zip(ids[i][:k], vals[i][:k])) for i, (b, k) in enumerate(want)}
