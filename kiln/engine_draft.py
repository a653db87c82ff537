"""Speculative decoding in the engine: the drafts of a batch of rows, each in its own slot.

Owns: `SlotDrafter` — prompt lookup over each row's own context (speculative.NgramDrafter), or a draft model
with a slot cache of its own (one row per engine slot, as many positions) that drafts for every row at once:
one padded forward catches each row's draft cache up with what its target accepted, then one batched step per
draft token. Greedy rows draft the draft model's argmax; sampled rows draw from its tempered and filtered
distribution q with the row's own generator (no penalties: any q keeps the output exact), as
speculative.ModelDrafter does for one sequence.
Not: verifying and accepting (engine.py, with speculative.accept_drafts), the batch-1 drafters and their
rules (speculative.py), the engine's own slot bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.cache import KVCache, Step
from kiln.errors import KilnError
from kiln.decoder import prefill_chunk
from kiln.sample import SamplingParams, filter_logits
from kiln.speculative import NgramDrafter, check_drafting
from kiln.split import input_device

CATCH_UP_ROWS = 16  # a row further behind than this catches up alone, as a chunked prompt prefill


@dataclass
class DraftJob:
    """One row's request for drafts: its slot, its context (every token, the last one not yet in the
    target's cache), how many tokens at most, and its sampling (params, generator)."""
    slot: int
    seq: list[int]
    k: int
    params: SamplingParams
    gen: torch.Generator | None


class SlotDrafter:
    """Drafts for the engine's rows: `draft(jobs)` → [(tokens, q (k, V) or None)] per job, then `trim(slot,
    valid)` once the target has kept the first `valid` tokens of that slot's context."""

    def __init__(self, num_draft: int, prompt_lookup: int = 0, draft_model=None, target=None, n_slots: int = 1,
                 ctx_size: int = 0):
        check_drafting(draft_model, prompt_lookup, target, num_draft)
        if draft_model is None and not prompt_lookup:
            raise KilnError("speculative decoding needs a drafter: a draft model or prompt lookup")
        self.num_draft = num_draft
        self.ngram = NgramDrafter(prompt_lookup) if prompt_lookup else None
        self.model = draft_model
        if draft_model is not None:
            self.cache = KVCache.for_model(draft_model, batch=n_slots, max_len=ctx_size)
            self.device = input_device(draft_model, self.cache.k.device)  # a split draft's: the CPU
            self.known = [0] * n_slots  # leading tokens of each slot's context that its draft cache holds
            self.fed = [0] * n_slots  # positions the last draft wrote (context and draft tokens)

    def forget(self, slot: int, keep: int) -> None:
        """The slot's context now agrees with what it held only on its first `keep` tokens (a new request
        reusing a prefix, a restored slot)."""
        if self.model is not None:
            self.known[slot] = min(self.known[slot], keep)

    def trim(self, slot: int, valid: int) -> None:
        if self.model is not None:
            self.known[slot] = min(self.fed[slot], valid)

    def draft(self, jobs: list[DraftJob]) -> list[tuple[list[int], torch.Tensor | None]]:
        if self.ngram is not None:
            return [(self.ngram.draft(j.seq, j.k, j.params, j.gen)[0][:j.k], None) for j in jobs]
        return self._model_drafts(jobs)

    def _model_drafts(self, jobs: list[DraftJob]) -> list[tuple[list[int], torch.Tensor | None]]:
        logits = self._catch_up(jobs)  # (B, V): each row's next-token logits after its whole context
        tokens: list[list[int]] = [[] for _ in jobs]
        qs: list[list[torch.Tensor]] = [[] for _ in jobs]
        live = list(range(len(jobs)))  # rows that still draft; row b draws jobs[b].k tokens
        for i in range(max(j.k for j in jobs)):
            picks = []
            for n, b in enumerate(live):
                j = jobs[b]
                if j.params.greedy:
                    t = int(logits[n].argmax())
                else:
                    q = filter_logits(logits[n:n + 1], j.params).softmax(-1)  # (1, V)
                    q = q if j.gen is None else q.to(j.gen.device)  # the row's generator: the target's device
                    t = int(torch.multinomial(q, 1, generator=j.gen)[0, 0])
                    qs[b].append(q[0])
                tokens[b].append(t)
                picks.append(t)
            nxt = [(b, t) for b, t in zip(live, picks) if i < jobs[b].k - 1]
            if not nxt:
                break
            live = [b for b, _ in nxt]
            pos = [len(jobs[b].seq) + i for b in live]
            ids = torch.tensor([[t] for _, t in nxt], dtype=torch.long, device=self.device)
            logits = self._forward(ids, pos, [jobs[b].slot for b in live], False)
        for j in jobs:
            self.known[j.slot] = self.fed[j.slot] = len(j.seq) + j.k - 1
        return [(t, torch.stack(q) if q else None) for t, q in zip(tokens, qs)]

    def _catch_up(self, jobs: list[DraftJob]) -> torch.Tensor:
        """Read into each row's draft cache the context it does not hold yet → logits (B, V) of its last token."""
        out: list[torch.Tensor | None] = [None] * len(jobs)
        short = []
        for b, j in enumerate(jobs):
            start = min(self.known[j.slot], len(j.seq) - 1)
            if len(j.seq) - start > CATCH_UP_ROWS or start + CATCH_UP_ROWS > self.cache.max_len:  # alone, chunked
                ids = torch.tensor([j.seq[start:]], dtype=torch.long, device=self.device)
                view = self.cache.slot(j.slot)
                for c in range(0, ids.shape[1], 512):
                    out[b] = prefill_chunk(self.model, ids[:, c:c + 512], view, start + c)[0]
            else:
                short.append((b, start))
        if short:
            t = max(len(jobs[b].seq) - s for b, s in short)
            ids = torch.tensor([jobs[b].seq[s:] + [0] * (t - len(jobs[b].seq) + s) for b, s in short],
                               dtype=torch.long, device=self.device)  # (B', T): pads past each row's end
            last = torch.tensor([len(jobs[b].seq) - s - 1 for b, s in short], dtype=torch.long, device=self.device)
            rows = self._forward(ids, [s for _, s in short], [jobs[b].slot for b, _ in short], last)
            for n, (b, _) in enumerate(short):
                out[b] = rows[n]
        return torch.stack(out)

    def _forward(self, ids: torch.Tensor, pos: list[int], slots: list[int], last) -> torch.Tensor:
        """Rows ids (B, T) into the draft slots `slots` at positions pos.. → logits (B, V) of each row's token
        `last[b]` (False: the last of all)."""
        view = self.cache.rows(slots, min(max(pos) + ids.shape[1], self.cache.max_len))
        step = Step.rows(view, torch.tensor(pos, dtype=torch.long, device=self.device))
        return self.model(ids, step, last_only=last)[:, -1].float().to(self.device)  # split: from the head's
