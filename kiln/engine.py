"""Continuous batching in token space: many requests share one model, one KV cache and one decode step.

Owns: the request queue (bounded: `QueueFull`), the slot cache (`n_slots` sequences of `ctx_size`
positions each) and which request holds which slot, prefix caching (a new request takes the free slot
whose remembered tokens share the longest prefix with its prompt, and prefills only the rest), chunked
prefill, the batched decode step (every running request advances one token per model call, each row at
its own position: models/base.py's per-row `pos` over a `cache.RowsView`), sampling the batch (one argmax
for the plain greedy rows, each other row's own `sample.Sampler`), speculative decoding (`_speculate`: each
row's drafts, from engine_draft.SlotDrafter, checked in one forward of K + 1 tokens a row; rejected positions
need no undo, the slot's tokens say what it holds), logprobs, delivering `StepOutput`s to
the `RequestHandle` a thread or an event loop reads (both in engine_io.py, re-exported here), and slot work
between iterations (`slot_call`: the server's /slots save, restore and erase).
Not: text of any kind (templates: tokenizer.py; detokenization and stop strings: textstream.py), HTTP
(server/), grammars (a processor comes in ready-made: server/structured.py), the model's math (models/,
ops/). Shared with kiln.generate's batch-1 loop rather than kept here: the prompt check, the prefill
call and CUDA-graph capture (generate.py) and each sequence's sampling state (sample.Sampler).

Threads: one background loop thread (`start()`) owns the model, the cache and every request's state.
`submit`, `cancel` and `stats` may be called from any thread (an event loop's included); outputs cross
back through each handle's own queue, waking an awaiting event loop with `call_soon_threadsafe`.

Logprobs: `StepOutput.logprob` (and `top_logprobs`) are the log-softmax of the model's raw distribution
at that step — before penalties, logit bias, the processor's mask and temperature — as kiln.generate
reports them: what the model believed, not the sampler's filtered view.

Shape alphabet: B rows in a step, V vocab (the model's logits width, which may exceed the tokenizer's).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
from dataclasses import dataclass

import torch

from kiln.cache import KVCache, Step
from kiln.engine_draft import DraftJob, SlotDrafter
from kiln.engine_step import BatchStep, adapters_of, fit_context, static_step
from kiln.engine_io import NO_TOKEN, EngineRequest, QueueFull, RequestHandle, StepOutput
from kiln.errors import KilnError
from kiln.decoder import prefill_chunk
from kiln.tokenizer import check_prompt
from kiln.sample import Sampler, pick_rows, top_logprobs
from kiln.speculative import accept_drafts, processed_logits
from kiln.split import input_device

__all__ = ["NO_TOKEN", "Engine", "EngineRequest", "QueueFull", "RequestHandle", "StepOutput", "fit_context"]

log = logging.getLogger("kiln.engine")


@dataclass
class _Slot:
    index: int
    tokens: list[int]  # the tokens whose keys and values this slot holds, at positions 0..len-1
    last_used: int = 0  # admission counter: the least recently used free slot goes first
    adapter: tuple[int, float] = (0, 1.0)  # (adapter, scale) those keys and values were computed under


class _Row:
    """One admitted request and its sampling state (on the model's device)."""

    def __init__(self, handle: RequestHandle, slot: _Slot, todo: list[int], vocab: int, device):
        req = handle.request
        self.handle, self.req, self.slot, self.todo = handle, req, slot, todo  # todo: prompt left to prefill
        self.n_out, self.last = 0, NO_TOKEN  # tokens generated; the last one, to be fed next
        self.sampler = Sampler(req.params, req.prompt, vocab, device, req.processor)


class Engine:
    """Continuous batching over a slot KV cache; see the module docstring.

        engine = Engine(model, tokenizer, n_slots=4, ctx_size=4096, max_queue=64)
        engine.start()
        handle = engine.submit(EngineRequest(prompt=ids, params=SamplingParams(), max_tokens=64))
        for out in handle.sync(): ...          # or: async for out in handle
        engine.stop()
    """

    step_class = BatchStep  # tensor parallelism's rank 0 announces each batched step (launch.LeaderEngine)

    def __init__(self, model, tokenizer=None, n_slots: int = 4, ctx_size: int = 4096, max_queue: int = 64,
                 prefill_step: int | None = None, graphs: bool | None = None, look_ahead: bool = True,
                 cache_type_k: str | None = None, cache_type_v: str | None = None, draft_model=None,
                 prompt_lookup: int = 0, num_draft_tokens: int = 4):
        """`graphs`: the static, padded decode step (`BatchStep`), captured as CUDA graphs on CUDA
        (default: on CUDA only; a model split across devices, kiln/split.py, steps eagerly: its token ids,
        sampling and logits on the embedding's device, the CPU). `prefill_step`: prompt tokens prefilled per
        loop iteration, at most, in one forward (default 2048 on CUDA, as llama-server's batch; 512 elsewhere).
        `look_ahead`: with the static step, launch the next decode step on the device's own greedy picks
        before the host reads them (`_can_look_ahead`); the attribute may be switched while running.
        `draft_model` (same vocabulary) or `prompt_lookup` (n-gram size): speculative decoding, up to
        `num_draft_tokens` drafts a row a step, verified eagerly (no look-ahead then); greedy rows give their
        plain greedy tokens, sampled rows tokens distributed as plain sampling (speculative.py's rule)."""
        a = model.args
        if not isinstance(n_slots, int) or n_slots < 1:
            raise KilnError(f"invalid n_slots {n_slots!r}: need at least one slot (concurrent sequence)")
        if not isinstance(ctx_size, int) or not 2 <= ctx_size <= a.max_position_embeddings:
            raise KilnError(f"invalid ctx_size {ctx_size!r}: must be between 2 and the model's "
                            f"{a.max_position_embeddings} positions")
        if not isinstance(max_queue, int) or max_queue < 0:
            raise KilnError(f"invalid max_queue {max_queue!r}: must be an integer >= 0")
        self.model, self.tokenizer = model, tokenizer
        p = next(model.parameters())
        prefill_step = prefill_step or (2048 if p.device.type == "cuda" else 512)
        self.n_slots, self.ctx_size, self.max_queue, self.prefill_step = n_slots, ctx_size, max_queue, prefill_step
        self.vocab = a.vocab_size
        static = static_step(model, graphs)
        self.cache = KVCache.for_model(model, batch=n_slots + static, max_len=ctx_size,  # + a scratch slot
                                       type_k=cache_type_k, type_v=cache_type_v)  # kv_types.CACHE_TYPES
        self.device = input_device(model, self.cache.k.device)  # token ids, sampling and logits (split: the CPU)
        self._step = self.step_class(model, self.cache, n_slots, static)
        self.look_ahead = bool(look_ahead)
        self.drafter = None if draft_model is None and not prompt_lookup else SlotDrafter(
            num_draft_tokens, prompt_lookup, draft_model, model, n_slots, ctx_size)
        self._ahead: tuple[list[_Row], torch.Tensor] | None = None  # a step launched before its inputs were read
        self._slots = [_Slot(i, []) for i in range(n_slots)]
        self._queue: collections.deque[RequestHandle] = collections.deque()
        self._rows: list[_Row] = []  # admitted requests, in admission order
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._clock = 0
        self._commands: list[tuple[int, object, concurrent.futures.Future]] = []  # slot work for the loop thread
        self._counters = dict(requests_total=0, requests_finished=0, prefix_hits=0, prefix_tokens=0,
                              tokens_generated=0, prompt_tokens_prefilled=0, prefill_forwards=0, steps=0, errors=0,
                              drafted=0, accepted=0)

    # ------------------------------------------------------------------ public, any thread

    def start(self) -> None:
        """Capture the batched step's CUDA graphs (if on: `warm_up`), then start the loop thread."""
        if self._thread is None:
            self.warm_up()  # here, before serving: a capture must not meet another thread's CUDA work
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="kiln-engine", daemon=True)
            self._thread.start()

    def warm_up(self) -> None:
        """Capture the batched step for every bucket (CUDA graphs); `start()` calls it. Before `start()`
        only (it runs on the caller's thread); a no-op without graphs or when every bucket is captured."""
        if self._thread is not None:
            raise KilnError("warm_up() must be called before start()")
        if self._step.use_graphs:
            with torch.inference_mode():
                for bucket in self._step.buckets:
                    if bucket not in self._step.graphs:
                        self._step._capture(bucket)

    def stop(self) -> None:
        """Finish every request with "cancelled" and join the loop thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def submit(self, req: EngineRequest) -> RequestHandle:
        """Queue a request. KilnError for an invalid one; QueueFull when `max_queue` requests already wait."""
        self._check(req)
        handle = RequestHandle(self, req)
        with self._wake:
            if self._stopping:
                raise KilnError("the engine is stopped")
            free = self.n_slots - len(self._rows)
            if len(self._queue) >= self.max_queue + max(free, 0):
                raise QueueFull(f"{len(self._queue)} requests are waiting for a slot")
            self._queue.append(handle)
            self._counters["requests_total"] += 1
            self._wake.notify_all()
        return handle

    def stats(self) -> dict:
        with self._wake:
            rows = list(self._rows)
            out = dict(self._counters, queue_depth=len(self._queue), active=len(rows), n_slots=self.n_slots,
                       decoding=sum(1 for r in rows if not r.todo), ctx_size=self.ctx_size,
                       kv_tokens_used=sum(len(s.tokens) for s in self._slots),
                       kv_tokens_active=sum(len(r.slot.tokens) for r in rows),
                       kv_tokens_total=self.n_slots * self.ctx_size)
        return out

    def slots(self) -> list[dict]:
        """Each slot: its index, context size, whether a request runs in it, and how many tokens' keys and
        values it holds (a finished request's stay, for the next prompt that shares their prefix)."""
        with self._wake:
            busy = {r.slot.index for r in self._rows}
            return [{"id": s.index, "n_ctx": self.ctx_size, "is_processing": s.index in busy, "n_tokens": len(s.tokens)}
                    for s in self._slots]

    def slot_call(self, index: int, fn) -> concurrent.futures.Future:
        """Run fn(cache, slot) on the loop thread between two iterations, while slot `index` is idle: `cache`
        the slot's batch-1 view of the KV cache (writes land in it), `slot` its `_Slot`: `tokens`, the list of
        ids whose keys and values it holds, and `adapter`, the (adapter, scale) they were computed under (fn
        may change both). The future holds fn's result, or a KilnError for a slot that does not exist or is
        busy."""
        if not isinstance(index, int) or not 0 <= index < self.n_slots:
            raise KilnError(f"slot {index!r} does not exist: this engine has slots 0..{self.n_slots - 1}")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            if self._stopping or self._thread is None:
                raise KilnError("the engine is not running")
            self._commands.append((index, fn, fut))
            self._wake.notify_all()
        return fut

    def _run_commands(self) -> None:
        with self._wake:
            commands, self._commands = self._commands, []
            busy = {r.slot.index for r in self._rows}
        for index, fn, fut in commands:
            if index in busy:
                fut.set_exception(KilnError(f"slot {index} is processing a request; try again when it is idle"))
                continue
            try:
                if self.drafter is not None:  # fn may rewrite the slot: its draft cache starts over
                    self.drafter.forget(index, 0)
                fut.set_result(fn(self.cache.slot(index), self._slots[index]))
            except Exception as e:  # noqa: BLE001 (the caller's error, handed back through the future)
                fut.set_exception(e)

    def _check(self, req: EngineRequest) -> None:
        if not isinstance(req.prompt, (list, tuple)):
            raise KilnError("the prompt must be a list of token ids")
        check_prompt(req.prompt, self.ctx_size, self.vocab)
        if not isinstance(req.max_tokens, int) or req.max_tokens < 1:
            raise KilnError(f"invalid max_tokens {req.max_tokens!r}: must be an integer >= 1")
        if not isinstance(req.top_logprobs, int) or not 0 <= req.top_logprobs <= self.vocab:
            raise KilnError(f"invalid top_logprobs {req.top_logprobs!r}: must be an integer >= 0")
        req.params.check_vocab(self.vocab)
        bank = getattr(self.model, "adapter_bank", None)
        n = 0 if bank is None else len(bank.names)
        if not isinstance(req.adapter, int) or not 0 <= req.adapter <= n:
            raise KilnError(f"invalid adapter {req.adapter!r}: this model has {n} adapters (0: none)")

    def _on_cancel(self, handle: RequestHandle) -> None:
        """A queued request leaves at once; an admitted one at the loop's next step boundary."""
        with self._wake:
            try:
                self._queue.remove(handle)
            except ValueError:  # admitted (or finished): the loop retires it
                self._wake.notify_all()
                return
            self._counters["requests_finished"] += 1
        self._end(handle, "cancelled")

    # ------------------------------------------------------------------ the loop (engine thread)

    def _run(self) -> None:
        with torch.inference_mode():
            while self._wait_for_work():
                try:
                    self._run_commands()
                    self._iteration()
                except Exception as e:  # a failure outside any one request (a bug): fail the running ones
                    log.exception("engine step failed")
                    for row in list(self._rows):
                        self._finish(row, "error", str(e) or type(e).__name__)
            self._shutdown()

    def _wait_for_work(self) -> bool:
        with self._wake:
            while not self._stopping and not self._queue and not self._rows and not self._commands:
                self._wake.wait()
            return not self._stopping

    def _iteration(self) -> None:
        for row in [r for r in self._rows if r.handle.cancelled]:
            self._finish(row, "cancelled")
        self._admit()
        self._prefill()
        self._decode()

    def _shutdown(self) -> None:
        with self._wake:
            commands, self._commands = self._commands, []
        for _, _, fut in commands:
            fut.set_exception(KilnError("the engine stopped"))
        for row in list(self._rows):
            self._finish(row, "cancelled")
        with self._wake:
            queued, self._queue = list(self._queue), collections.deque()
        for h in queued:
            self._counters["requests_finished"] += 1
            self._end(h, "cancelled")

    # ------------------------------------------------------------------ admission and prefill

    def _admit(self) -> None:
        """Move queued requests into free slots, each into the one sharing the longest prompt prefix."""
        while True:
            with self._wake:
                busy = {r.slot.index for r in self._rows}
                free = [s for s in self._slots if s.index not in busy]
                if not free or not self._queue:
                    return
                handle = self._queue.popleft()
            self._place(handle, free)

    def _place(self, handle: RequestHandle, free: list[_Slot]) -> None:
        req = handle.request  # its keys and values depend on its tokens and on (adapter, scale): scale 1 with none
        prompt, adapter = req.prompt, ((req.adapter, float(req.adapter_scale)) if req.adapter else (0, 1.0))
        slot, shared = max(((s, _common_prefix(s.tokens, prompt) if s.adapter == adapter else 0) for s in free),
                           key=lambda sp: (sp[1], -sp[0].last_used))  # keys under another adapter differ
        reuse = min(shared, len(prompt) - 1)  # at least one token is prefilled: its logits are the first step
        del slot.tokens[reuse:]
        if self.drafter is not None:
            self.drafter.forget(slot.index, reuse)
        slot.adapter = adapter
        self._clock += 1
        slot.last_used = self._clock
        handle.cached_tokens = reuse
        if reuse:
            self._counters["prefix_hits"] += 1
            self._counters["prefix_tokens"] += reuse
        try:
            row = _Row(handle, slot, list(prompt[reuse:]), self.vocab, self.device)
        except Exception as e:
            self._counters["requests_finished"] += 1
            self._end(handle, "error", str(e))
            return
        with self._wake:
            self._rows.append(row)

    def _prefill(self) -> None:
        """Prefill waiting prompts, oldest first, up to `prefill_step` tokens per iteration (in chunks of
        at most that), so that running requests keep decoding while a long prompt is read. The chunks of
        one iteration go through the model together: one forward of padded rows (`_prefill_rows`), each
        row at its own slot and position, so that new requests do not wait behind each other."""
        budget, batch = self.prefill_step, []
        for row in [r for r in self._rows if r.todo]:
            if budget <= 0:
                break
            n = min(len(row.todo), budget)
            budget -= n
            batch.append((row, n))
        t = max((n for _, n in batch), default=0)
        together = [(r, n) for r, n in batch if len(r.slot.tokens) + t <= self.ctx_size]  # padding fits
        if len(together) > 1:
            groups = [together] + [[rn] for rn in batch if rn not in together]
        else:
            groups = [[rn] for rn in batch]
        for group in groups:
            try:
                logits = self._prefill_rows(group) if len(group) > 1 else self._prefill_chunk(*group[0])
                self._counters["prefill_forwards"] += 1
            except Exception as e:
                log.exception("prefill failed")
                for row, _ in group:
                    self._finish(row, "error", str(e) or type(e).__name__)
                continue
            done = [b for b, (row, _) in enumerate(group) if not row.todo]
            if done:  # whole prompts are in: their last logits give their first tokens
                self._emit([group[b][0] for b in done], logits[done] if len(group) > 1 else logits)

    def _prefill_chunk(self, row: _Row, n: int) -> torch.Tensor:
        """The next n prompt tokens of one row, as a batch-1 prefill of its slot: logits (1, V) of the last."""
        slot = row.slot
        ids = torch.tensor([row.todo[:n]], dtype=torch.long, device=self.device)  # (1, n)
        logits = self._chunk_forward(slot.index, ids, len(slot.tokens))
        self._took(row, n)
        return logits

    def _chunk_forward(self, slot: int, ids: torch.Tensor, pos: int) -> torch.Tensor:
        """The model call of `_prefill_chunk`: ids (1, n) into slot `slot` at pos.. → logits (1, V)."""
        with self._adapters([self._slots[slot].adapter]):
            return prefill_chunk(self.model, ids, self.cache.slot(slot), pos)

    def _adapters(self, keys: list[tuple[int, float]]):
        """The adapter selection of rows with (adapter, scale) `keys`, for one eager model call."""
        rows = torch.tensor([i for i, _ in keys], dtype=torch.long, device=self.device)
        return adapters_of(self.model, rows, torch.tensor([s for _, s in keys], device=self.device))

    def _prefill_rows(self, group: list[tuple[_Row, int]]) -> torch.Tensor:
        """The next n_b prompt tokens of each row b in one forward over the slot cache (`Step.rows`): rows
        padded at the end to the longest chunk T (the pads' keys land past the row's tokens, where nothing
        reads them before a real token overwrites them) → logits (B, V) of each row's last real token."""
        t, dev = max(n for _, n in group), self.device
        ids = torch.tensor([r.todo[:n] + [0] * (t - n) for r, n in group], dtype=torch.long, device=dev)  # (B, T)
        last = torch.tensor([n - 1 for _, n in group], dtype=torch.long, device=dev)  # (B,)
        logits = self._rows_forward(ids, [len(r.slot.tokens) for r, _ in group], [r.slot.index for r, _ in group],
                                    last)
        for r, n in group:
            self._took(r, n)
        return logits

    def _rows_forward(self, ids: torch.Tensor, pos: list[int], slots: list[int], last: torch.Tensor) -> torch.Tensor:
        """The model call of `_prefill_rows`: row b of ids (B, T) into slot slots[b] at pos[b].. → logits (B, V)
        of row b's token last[b]."""
        view = self.cache.rows(slots, max(pos) + ids.shape[1])
        step = Step.rows(view, torch.tensor(pos, dtype=torch.long, device=self.device))
        with self._adapters([self._slots[s].adapter for s in slots]):
            return self.model(ids, step, last_only=last)[:, -1].float().to(self.device)  # (B, V); split: head's

    def _took(self, row: _Row, n: int) -> None:
        """n prompt tokens of the row are in its slot now."""
        row.slot.tokens.extend(row.todo[:n])
        row.todo = row.todo[n:]
        self._counters["prompt_tokens_prefilled"] += n

    # ------------------------------------------------------------------ the batched decode step

    def _decode(self) -> None:
        rows = sorted((r for r in self._rows if not r.todo and r.last != NO_TOKEN), key=lambda r: r.slot.index)
        ahead, self._ahead = self._ahead, None
        if not rows:
            return
        if ahead is None and self.drafter is not None and self._speculate(rows):
            return
        if ahead is not None and ahead[0] == rows:  # launched last iteration with these rows' tokens
            logits = ahead[1]
        else:  # (a stale look-ahead only rewrote, at the same positions, keys and values of the same tokens)
            logits = self._step_rows(rows, [r.last for r in rows])  # (B, V)
        for r in rows:
            r.slot.tokens.append(r.last)
        self._counters["steps"] += 1
        self._emit(rows, logits, self._can_look_ahead(rows))

    def _step_rows(self, rows: list[_Row], tokens: list[int] | torch.Tensor) -> torch.Tensor:
        """The batched step on `tokens`, one per row, each at its slot's next position: logits (B, V)."""
        return self._step(tokens, [len(r.slot.tokens) for r in rows], [r.slot.index for r in rows],
                          [r.slot.adapter for r in rows])

    def _can_look_ahead(self, rows: list[_Row]) -> bool:
        """Launch the next decode step before reading this one's tokens (the host's work per token then
        overlaps the device's next step)? Only where it will almost surely be used and nothing but the
        tokens is needed from the host: the static step (no drafts), greedy rows without processors or top_logprobs,
        none at its length limit, nobody waiting for a slot or a prefill. A row that stops (EOS, cancel)
        or joins makes the launched step stale; the next iteration then runs its own."""
        if not (self.look_ahead and self._step.static) or self.drafter:
            return False
        if self._queue or any(r.todo for r in self._rows):
            return False
        return all(r.sampler.plain and not r.req.top_logprobs and r.n_out + 1 < r.req.max_tokens
                   and len(r.req.prompt) + r.n_out + 1 < self.ctx_size for r in rows)

    def _speculate(self, rows: list[_Row]) -> bool:
        """One speculative step: each row's drafts (none for rows with a logits processor), one forward of
        its last token and drafts at its next positions (rows padded to the longest), the drafts a row keeps
        and the token after them delivered in order. False, and nothing run, when no row has a draft."""
        jobs = {}
        for b, r in enumerate(rows):
            k = min(self.drafter.num_draft, self.ctx_size - 1 - len(r.slot.tokens), r.req.max_tokens - r.n_out - 1)
            if r.req.processor is None and k > 0:
                jobs[b] = DraftJob(r.slot.index, r.slot.tokens + [r.last], k, r.req.params, r.sampler.gen)
        drafts = dict(zip(jobs, self.drafter.draft(list(jobs.values())))) if jobs else {}
        if not any(d for d, _ in drafts.values()):
            return False
        t = min(1 + max(len(d) for d, _ in drafts.values()), min(self.ctx_size - len(r.slot.tokens) for r in rows))
        drafts = {b: (d[:t - 1], None if q is None else q[:t - 1]) for b, (d, q) in drafts.items()}
        ids = [[r.last] + drafts.get(b, ([], None))[0] for b, r in enumerate(rows)]
        ids = torch.tensor([i + [0] * (t - len(i)) for i in ids], device=self.device)  # (B, T)
        logits = self._step.verify(ids, [len(r.slot.tokens) for r in rows], [r.slot.index for r in rows],
                                   [r.slot.adapter for r in rows])  # (B, T, V): row b from its slot's next position
        self._counters["steps"] += 1
        for b, r in enumerate(rows):
            d, q = drafts.get(b, ([], None))
            raw = logits[b, :1 + len(d)]  # (1 + k, V)
            try:
                if d:
                    q = None if q is None else q.to(raw.device)  # a draft model on another device than the head
                    a, last = accept_drafts(processed_logits(r.sampler, raw, d), d, q, r.req.params, r.sampler.gen)
                else:  # the plain step's draw (a processor's mask included)
                    a, last = 0, int(r.sampler(raw[:1])[0])
            except Exception as e:  # a processor or a sampling value that fails: this request only
                log.exception("sampling failed for one request")
                self._finish(r, "error", f"{type(e).__name__}: {e}")
                continue
            self._counters["drafted"] += len(d)
            self._counters["accepted"] += a
            length = len(r.slot.tokens) + 1  # the context, r.last included
            self._deliver(r, raw, d[:a] + [last])
            self.drafter.trim(r.slot.index, length + min(a, max(len(d) - 1, 0)))
        return True

    def _deliver(self, row: _Row, raw: torch.Tensor, tokens: list[int]) -> None:
        """A speculative step's tokens for one row, in order: raw (≥ len(tokens), V) the logits each was
        drawn after. The slot takes the row's fed token and each kept draft; stops at the row's end."""
        z = raw[:len(tokens)]
        lse = torch.logsumexp(z, dim=-1)  # (n,)
        chosen = (z.gather(1, torch.tensor(tokens, device=z.device)[:, None])[:, 0] - lse).tolist()
        tops = top_logprobs(z, lse, [row.req.top_logprobs] * len(tokens))  # as _emit's, one "row" per position
        fed = [row.last] + tokens[:-1]
        for i, (tok, prev, lp) in enumerate(zip(tokens, fed, chosen)):
            row.slot.tokens.append(prev)
            self._advance(row, tok, lp, tops.get(i))
            if row not in self._rows:
                return

    def _look_ahead(self, rows: list[_Row], tokens: torch.Tensor) -> None:
        try:
            logits = self._step_rows(rows, tokens)
        except Exception:  # the next iteration runs the step itself (and meets the error there)
            log.exception("launching the next decode step early failed")
            return
        self._ahead = (list(rows), logits)

    def _emit(self, rows: list[_Row], logits: torch.Tensor, look_ahead: bool = False) -> None:
        """Sample one token per row from logits (B, V), deliver it, and finish the rows that are done.
        With `look_ahead`, the next decode step is launched on the picked tokens (still on the device)
        before the host waits for them."""
        tokens, failed = pick_rows([r.sampler for r in rows], logits)
        lse = torch.logsumexp(logits, dim=-1)  # (B,)
        chosen = logits.gather(1, tokens[:, None])[:, 0] - lse  # (B,) raw-distribution logprobs
        out = torch.stack([tokens.double(), chosen.double()])  # (2, B): one device → host transfer
        tops = top_logprobs(logits, lse, [r.req.top_logprobs for r in rows])
        if look_ahead and not failed:
            ready = None
            if out.is_cuda:
                out = out.to("cpu", non_blocking=True)
                ready = torch.cuda.Event()
                ready.record()
            self._look_ahead(rows, tokens)
            if ready is not None:
                ready.synchronize()
        host = out.tolist()
        for b, row in enumerate(rows):
            if b in failed:
                self._finish(row, "error", failed[b])
                continue
            self._advance(row, int(host[0][b]), host[1][b], tops.get(b))

    def _advance(self, row: _Row, token: int, logprob: float, top) -> None:
        """Account for the token a row just produced, deliver it, and finish the row if it is done."""
        req = row.req
        row.n_out += 1
        self._counters["tokens_generated"] += 1
        is_stop = token in req.stop_token_ids and not req.ignore_eos
        try:
            row.sampler.accept(token)
            terminated = req.processor is not None and req.processor.is_terminated()
        except Exception as e:
            log.exception("the logits processor failed")
            self._finish(row, "error", f"{type(e).__name__}: {e}")
            return
        finish = None
        if is_stop or terminated:
            finish = "stop"
        elif row.n_out >= req.max_tokens or len(req.prompt) + row.n_out >= self.ctx_size:
            finish = "length"
        row.last = token
        if finish:
            row.handle.finish_reason = finish
            self._retire(row)
        row.handle._put(StepOutput(token, logprob, top, finish, is_stop))

    def _finish(self, row: _Row, reason: str, error: str | None = None) -> None:
        """Free a row's slot and hand its request the final, tokenless output (`_end`)."""
        self._retire(row)
        self._end(row.handle, reason, error)

    def _end(self, handle: RequestHandle, reason: str, error: str | None = None) -> None:
        """Hand a request its final, tokenless output: cancelled, or failed (the error goes to the handle)."""
        handle.error, handle.finish_reason = error, reason
        if reason == "error":
            self._counters["errors"] += 1
        handle._put(StepOutput(NO_TOKEN, 0.0, None, reason, True))

    def _retire(self, row: _Row) -> None:
        """Free the row's slot; the slot keeps its tokens (and their keys and values) for prefix reuse."""
        with self._wake:
            if row in self._rows:
                self._rows.remove(row)
                self._counters["requests_finished"] += 1


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
