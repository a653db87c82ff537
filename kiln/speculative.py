"""Speculative decoding: a cheap drafter proposes K tokens, the target model checks them in one forward.

Owns: the drafters — `ModelDrafter` (a smaller model sharing the target's vocabulary, with its own cache) and
`NgramDrafter` (prompt lookup: the tokens that followed the latest earlier occurrence of the context's last
n-gram; no model) —, `speculative_step` (generate_step's contract: one (token, logprobs) per generated token),
and the acceptance rule. Greedy: a draft token is kept while it equals the target's argmax, so the output
is the target's greedy output. Sampling: draft token d drawn from q is kept with probability min(1, p(d) /
q(d)), a rejection draws from norm(max(0, p - q)) (Leviathan et al. 2023; with an n-gram draft q is one-hot),
so every token is distributed as plain sampling from p. p is the target's distribution after the same
penalties, bias, temperature, top-k/p and min-p that plain sampling applies (sample.py), each row with the
penalty counts of the draft tokens before it.
Not: the single-step loop and its CUDA graphs (generate.py), text (textstream.py), the engine's batch
(engine.py and engine_draft.py, which use `processed_logits` and `accept_drafts` row by row).

Rejected positions need no undo: the target's cache keeps the accepted prefix, and the next verify writes
over the rest before anything reads it; the draft model's cache is trimmed to what still matches.
"""

from __future__ import annotations

import torch

from kiln.decoder import VERIFY_MAX_ROWS, Decoder
from kiln.errors import KilnError
from kiln.sample import Sampler, SamplingParams, apply_penalties, filter_logits


class NgramDrafter:
    """Prompt lookup: find the context's last n tokens (n = max_ngram down to 1) earlier in the context,
    latest occurrence first, and propose the tokens that followed it."""

    def __init__(self, max_ngram: int = 3):
        if not isinstance(max_ngram, int) or max_ngram < 1:
            raise KilnError(f"invalid prompt-lookup n-gram size {max_ngram!r}: must be an integer >= 1")
        self.max_ngram = max_ngram

    def start(self, prompt: list[int]) -> None:
        pass

    def draft(self, seq: list[int], k: int, params: SamplingParams, gen) -> tuple[list[int], None]:
        """Up to k tokens, and None for their distributions (each a one-hot: the draw is deterministic)."""
        n_seq = len(seq)
        for n in range(min(self.max_ngram, n_seq - 1), 0, -1):
            tail = seq[n_seq - n:]
            for start in range(n_seq - n - 1, -1, -1):  # latest earlier occurrence with a continuation
                if seq[start:start + n] == tail:
                    return seq[start + n:start + n + k], None
        return [], None

    def trim(self, valid: int) -> None:
        pass


class ModelDrafter:
    """A draft model (same vocabulary as the target) with its own cache: greedy drafts for a greedy target,
    else draws from its own tempered and filtered distribution q (no penalties: any q keeps the output exact)."""

    def __init__(self, model, max_len: int):
        self.decoder = Decoder.for_model(model, max_len)
        self.known = 0  # leading positions of the context whose keys and values the draft cache holds
        self.fed = 0  # positions written by the last draft (the context's and the draft tokens')

    def start(self, prompt: list[int]) -> None:
        self.known = self.fed = 0

    def draft(self, seq: list[int], k: int, params: SamplingParams, gen) -> tuple[list[int], torch.Tensor | None]:
        """k draft tokens after seq, and their distributions q (k, V) (None when greedy)."""
        dec, device = self.decoder, self.decoder.cache.k.device
        new = torch.tensor([seq[self.known:]], dtype=torch.long, device=device)  # (1, T), T >= 1
        if self.known and new.shape[1] == 1:  # a round's catch-up: the target's bonus token (a graph step)
            logits = dec.step(new[0], self.known)
        elif self.known and new.shape[1] <= VERIFY_MAX_ROWS:  # the accepted drafts this cache did not see (more:
            # a prompt chunk, prefilled, last row only)
            logits = dec.verify(new, self.known)[-1:]
        else:
            for start in range(0, new.shape[1], 512):
                logits = dec.prefill(new[:, start:start + 512], self.known + start)  # (1, V)
        tokens, qs = [], []
        for i in range(k):
            if params.greedy:
                token = logits.argmax(-1)  # (1,)
            else:
                q = filter_logits(logits, params).softmax(-1)  # (1, V)
                token = torch.multinomial(q, 1, generator=gen)[:, 0]
                qs.append(q[0])
            tokens.append(token)
            if i < k - 1:
                logits = dec.step(token, len(seq) + i)
        self.known = self.fed = len(seq) + max(k - 1, 0)
        ids = torch.cat(tokens).tolist() if tokens else []
        return ids, (torch.stack(qs) if qs else None)

    def trim(self, valid: int) -> None:
        """The context's first `valid` tokens are what the cache holds; anything written after is stale."""
        self.known = min(self.fed, valid)


def check_drafting(draft_model=None, prompt_lookup: int = 0, target=None, num_draft: int | None = None) -> None:
    """KilnError unless the drafting asked for can run: one drafter at most, a draft model with the target's
    vocabulary size (one tokenizer), and (when given) a positive number of draft tokens."""
    if draft_model is not None and prompt_lookup:
        raise KilnError("choose one drafter: a draft model or prompt lookup, not both")
    if draft_model is not None and target is not None and draft_model.args.vocab_size != target.args.vocab_size:
        raise KilnError(f"the draft model's vocabulary ({draft_model.args.vocab_size} ids) differs from the "
                        f"target's ({target.args.vocab_size}): speculative decoding needs one vocabulary")
    if num_draft is not None and (not isinstance(num_draft, int) or num_draft < 1):
        raise KilnError(f"invalid num_draft_tokens {num_draft!r}: must be an integer >= 1")


def drafter_for(draft_model=None, prompt_lookup: int = 0, max_len: int = 0, target=None):
    """The drafter a generation asked for: a draft model, prompt lookup of n-grams up to `prompt_lookup`
    tokens long, or None (`check_drafting`'s rules)."""
    check_drafting(draft_model, prompt_lookup, target)
    if draft_model is not None:
        return ModelDrafter(draft_model, max_len)
    if prompt_lookup:
        return NgramDrafter(prompt_lookup)
    return None


@torch.inference_mode()
def speculative_step(prompt: list[int], model, params: SamplingParams, decoder, drafter, num_draft: int = 4,
                     prefill_step: int | None = None, logprobs: bool = True, max_tokens: int | None = None,
                     stats: dict | None = None):
    """generate_step's contract with a drafter: yield (token, logprobs (V,) or None) per generated token.
    Each round drafts up to `num_draft` tokens and verifies them with one target forward over K + 1
    positions; `stats` (a dict) counts "drafted" and "accepted" draft tokens and "rounds"."""
    check_drafting(num_draft=num_draft)
    cache = decoder.cache
    device = cache.k.device
    vocab = model.args.vocab_size
    params.check_vocab(vocab)
    sampler = Sampler(params, prompt, vocab, device)
    gen = sampler.gen
    stats = {} if stats is None else stats
    for key in ("drafted", "accepted", "rounds"):
        stats.setdefault(key, 0)
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    step = prefill_step or 512
    for start in range(0, ids.shape[1], step):
        logits = decoder.prefill(ids[:, start:start + step], start)  # (1, V)
    drafter.start(prompt)
    token = int(sampler(logits)[0])
    sampler.accept(token)
    yield token, (logits.log_softmax(-1)[0] if logprobs else None)
    seq, n = list(prompt) + [token], 1
    while len(seq) < cache.max_len and (max_tokens is None or n < max_tokens):
        length = len(seq)  # the last token (seq[-1]) is not in the target's cache yet: it goes at length - 1
        k = min(num_draft, cache.max_len - length, (max_tokens - n - 1) if max_tokens is not None else num_draft)
        drafts, q = drafter.draft(seq, k, params, gen) if k > 0 else ([], None)
        drafts = drafts[:k]
        rows = torch.tensor([[seq[-1]] + drafts], dtype=torch.long, device=device)  # (1, k + 1)
        raw = decoder.verify(rows, length - 1)  # (k + 1, V)
        z = processed_logits(sampler, raw, drafts)
        accepted, last = accept_drafts(z, drafts, q, params, gen)
        new = drafts[:accepted] + [last]
        stats["drafted"] += len(drafts)
        stats["accepted"] += accepted
        stats["rounds"] += 1
        lps = raw.log_softmax(-1) if logprobs else None
        drafter.trim(length + min(accepted, max(len(drafts) - 1, 0)))
        for i, t in enumerate(new):
            sampler.accept(t)
            seq.append(t)
            n += 1
            yield t, (lps[i] if lps is not None else None)
            if max_tokens is not None and n >= max_tokens:
                return


def processed_logits(sampler: Sampler, raw: torch.Tensor, drafts: list[int]) -> torch.Tensor:
    """The target's logits rows (k + 1, V) after the sampler's penalties and bias, row i counting the draft
    tokens before it as generated (what plain sampling would see had they been drawn)."""
    z = raw
    if sampler.counts is not None:
        counts = sampler.counts.clone()  # (1, V)
        out = []
        for i in range(raw.shape[0]):
            out.append(apply_penalties(raw[i:i + 1], counts, sampler.params))
            if i < len(drafts):
                counts[0, drafts[i]] += 1
        z = torch.cat(out)
    if sampler.bias is not None:
        z = z + sampler.bias
    return z


def accept_drafts(z: torch.Tensor, drafts: list[int], q: torch.Tensor | None, params: SamplingParams, gen):
    """(number of draft tokens kept, the token after them) from the target's processed rows z (k + 1, V)."""
    k = len(drafts)
    if params.greedy:
        best = z.argmax(-1).tolist()  # (k + 1,)
        a = 0
        while a < k and drafts[a] == best[a]:
            a += 1
        return a, best[a]
    p = filter_logits(z, params).softmax(-1)  # (k + 1, V)
    d = torch.tensor(drafts, dtype=torch.long, device=z.device)
    p_d = p[torch.arange(k, device=z.device), d] if k else p[:0, 0]  # (k,)
    q_d = q[torch.arange(k, device=z.device), d] if q is not None else torch.ones_like(p_d)
    u = torch.rand(k, generator=gen, device=z.device)
    keep = (u * q_d <= p_d).tolist()  # u < p/q, without dividing by a q of 0
    a = 0
    while a < k and keep[a]:
        a += 1
    if a == k:
        dist = p[k]
    else:
        dist = p[a] - (q[a] if q is not None else torch.nn.functional.one_hot(d[a], p.shape[-1]).to(p.dtype))
        dist = dist.clamp_min(0)
        total = dist.sum()
        dist = dist / total if total > 0 else p[a]
    return a, int(torch.multinomial(dist[None], 1, generator=gen)[0, 0])

