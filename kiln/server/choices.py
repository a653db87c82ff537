"""Requests out: a request's engine outputs to each choice's text, logprobs and tool calls, and their end.

Owns: `Choice` (one engine request's text side), `merged_outputs`, `run_to_end` (a non-streaming request, cancelled
when its client hangs up), `in_flight` (counts, shutdown cut, cancelling what is left), `check_finished` (an
engine failure is a logged 500) and `usage_of`. Every function takes the app's ServerState as `st`.
Not: routes and response bodies (app.py), prompts (prompts.py), detokenizing and stop strings (kiln/textstream.py),
tool-call formats (tools.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request

from kiln.server import protocol as P
from kiln.textstream import TextStream

log = logging.getLogger("kiln.server")


class Choice:
    """The text side of one engine request: its TextStream (detokenizer, stop strings), logprobs, tool parser."""

    def __init__(self, index: int, handle, st, req: P.GenRequest, tools_on: bool = False):
        self.index, self.handle, self.st = index, handle, st
        self.want_logprobs = req.logprobs
        self.stream = TextStream(st.tokenizer, req.stop)
        self.parts, self.entries, self.entries_all = [], [], []
        self.n_tokens, self.finish = 0, None
        self.parser = None
        if tools_on:
            from kiln.server.tools import ToolStreamParser
            self.parser = ToolStreamParser(st.tool_style)
        self.calls_seen = 0
        self.single_call = isinstance(req, P.ChatRequest) and not req.parallel_tool_calls

    def step(self, out) -> tuple[str, list[dict]]:
        """Take one StepOutput; return (text now safe to show, logprob entries not yet sent)."""
        self.n_tokens += out.token >= 0  # a tokenless final output (cancelled, error) is not generated text
        if self.want_logprobs and not out.is_stop:
            self.entries.append(self._entry(out))
            self.entries_all.append(self.entries[-1])
        emit = self.stream.step(None if out.is_stop else out.token, out.finish_reason)
        if self.stream.stop_hit:
            self.handle.cancel()  # frees the slot now; the text after the stop string is dropped
        self.finish = self.stream.finish
        self.parts.append(emit)
        if emit or self.finish:
            entries, self.entries = self.entries, []
            return emit, entries
        return "", []

    def _entry(self, out) -> dict:
        tok = self.st.tokenizer
        top = [(tok.id_to_bytes(t), lp) for t, lp in (out.top_logprobs or [])]
        return P.chat_logprob(tok.id_to_bytes(out.token), out.logprob, top)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def tool_events(self, text: str) -> list:
        events = self.parser.feed(text) if text else []
        return events + (self.parser.finish() if self.finish else [])


async def merged_outputs(st, choices: list[Choice], t0: float) -> AsyncIterator[tuple[Choice, object]]:
    """(choice, StepOutput) from all choices as they come, the first timed from `t0`; stops following a choice once
    it is finished."""
    async for c, out in _merged(choices):
        if t0 is not None:
            st.metrics.ttft.observe(time.perf_counter() - t0)
            t0 = None
        yield c, out


async def _merged(choices: list[Choice]):
    if len(choices) == 1:
        c = choices[0]
        async for out in c.handle:
            yield c, out
            if c.finish:
                return
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(c: Choice):
        try:
            async for out in c.handle:
                await queue.put((c, out))
        finally:
            await queue.put((c, None))
    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        live = len(choices)
        while live:
            c, out = await queue.get()
            if out is None:
                live -= 1
            elif c.finish is None:
                yield c, out
    finally:
        for t in tasks:
            t.cancel()


def cancel_all(choices: list[Choice]) -> None:
    for c in choices:
        if c.finish is None:
            c.handle.cancel()


async def _watch_disconnect(request: Request, choices: list[Choice]) -> None:
    """For non-streaming requests: a client that hangs up cancels its generations."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            request.state.gone = True
            cancel_all(choices)
            return


async def run_to_end(st, request: Request, choices: list[Choice], t0: float) -> None:
    """Drive every choice to its end (non-streaming); cancel all if the client goes away or we fail."""
    watcher = asyncio.create_task(_watch_disconnect(request, choices))
    try:
        async for c, out in merged_outputs(st, choices, t0):
            c.step(out)
    finally:
        watcher.cancel()
        cancel_all(choices)
    if getattr(request.state, "gone", False):  # nobody reads this answer; 499 keeps it out of the 5xx counts
        raise P.APIError(499, "the client closed the request", code="client_closed")


def check_finished(st, choices: list[Choice], streaming: bool = False) -> None:
    failed = [c for c in choices if c.finish not in ("stop", "length")]
    if not failed:
        return
    if st.cut and all(c.finish == "cancelled" for c in failed):  # shutdown: a stream has said so in its finish
        if streaming:
            return
        raise P.APIError(503, "the server shut down before this request finished", code="shutting_down")
    why = getattr(failed[0].handle, "error", None) or failed[0].finish
    ref = uuid.uuid4().hex[:8]
    log.error("generation ended with %r [%s]: %s", failed[0].finish, ref, why)
    raise P.APIError(500, f"generation failed (reference {ref} in the server log)", code="engine_error")


def usage_of(groups: list[tuple[list[int], list[Choice]]]) -> dict:
    prompt = sum(len(ids) for ids, _ in groups)
    completion = sum(c.n_tokens for _, cs in groups for c in cs)
    cached = sum(int(getattr(cs[0].handle, "cached_tokens", 0) or 0) for _, cs in groups)
    return P.usage(prompt, completion, cached)


@contextlib.contextmanager
def in_flight(st, groups: list[tuple[list[int], list[Choice]]]):
    """While a request runs: counted in flight, its choices open to a shutdown cut; however it ends (done, client
    gone, failed), its generations are cancelled and its tokens counted."""
    choices = [c for _, cs in groups for c in cs]
    st.metrics.in_flight += 1
    st.live.update(choices)
    try:
        yield
    finally:
        st.metrics.in_flight -= 1
        st.live.difference_update(choices)
        cancel_all(choices)
        st.metrics.count_tokens(usage_of(groups))
