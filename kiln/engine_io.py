"""What goes into the batched engine and what comes out: `EngineRequest`, `StepOutput`, the `RequestHandle` a
caller iterates (a thread with `sync()`, an event loop with `async for`), `QueueFull`.

Owns: the handle's queue of outputs and how it wakes its reader (a condition for threads,
`call_soon_threadsafe` on an event loop), and its `cancel()` (the engine finishes the request "cancelled").
Not: the engine's loop, slots and batching (kiln/engine.py, which re-exports these names).
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kiln.sample import SamplingParams

if TYPE_CHECKING:
    from kiln.engine import Engine

NO_TOKEN = -1  # the token of a final output that carries no token (cancelled, error)


class QueueFull(Exception):
    """Every slot is busy and `max_queue` requests already wait: try again later (HTTP 503)."""


@dataclass
class EngineRequest:
    prompt: list[int]  # token ids, already templated and encoded
    params: SamplingParams
    max_tokens: int
    stop_token_ids: frozenset[int] = frozenset()  # one of these finishes with "stop" (reported, is_stop=True)
    processor: object | None = None  # a LogitsProcessor: mask(logits (V,)), accept(token), is_terminated()
    top_logprobs: int = 0  # 0: only the chosen token's logprob; k > 0: also the top k (id, logprob)
    ignore_eos: bool = False  # stop tokens neither finish nor count as stop tokens
    adapter: int = 0  # the model's AdapterBank entry this request runs under (0: the base model)
    adapter_scale: float = 1.0  # times that adapter's own alpha / r scale


@dataclass
class StepOutput:
    token: int  # NO_TOKEN (-1) on a final "cancelled" / "error" output, which carries no token
    logprob: float  # log-softmax of the raw model distribution at `token` (see the module docstring)
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: str | None  # None while running; "stop", "length", "cancelled" or "error"
    is_stop: bool = False  # a stop token, or a tokenless final output: not text to show


class RequestHandle:
    """What `Engine.submit` returns: iterate it (async or `sync()`) for StepOutputs; `cancel()` to stop.

    The last output has `finish_reason` set; iteration ends after it. `cached_tokens` is the number of
    prompt tokens served from the prefix cache (set when the request gets a slot), `error` the message
    of a request that finished with "error".
    """

    def __init__(self, engine: Engine, request: EngineRequest):
        self.request, self.cached_tokens, self.error, self.finish_reason = request, 0, None, None
        self._engine, self._cancelled = engine, False
        self._items: collections.deque[StepOutput] = collections.deque()
        self._cond = threading.Condition()
        self._done = False  # the final output has been handed to the reader
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    def cancel(self) -> None:
        """Stop generating; the slot is freed at the next step boundary. Safe from any thread, repeatable."""
        if not self._cancelled:
            self._cancelled = True
            self._engine._on_cancel(self)

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def _put(self, out: StepOutput) -> None:  # engine thread
        with self._cond:
            self._items.append(out)
            self._cond.notify_all()
            loop, event = self._loop, self._event
        if loop is not None:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the reader's loop has closed: nobody is waiting any more
                pass

    def _take(self) -> StepOutput | None:
        """The next output if one is ready (caller holds the lock); marks the end after the final one."""
        if not self._items:
            return None
        out = self._items.popleft()
        if out.finish_reason is not None:
            self._done = True
        return out

    def sync(self) -> Iterator[StepOutput]:
        """Blocking iteration (tests, scripts)."""
        while not self._done:
            with self._cond:
                while not self._items:
                    self._cond.wait()
                out = self._take()
            yield out

    def __aiter__(self) -> AsyncIterator[StepOutput]:
        return self

    async def __anext__(self) -> StepOutput:
        while True:
            with self._cond:
                if self._done:
                    raise StopAsyncIteration
                out = self._take()
                if out is not None:
                    return out
                if self._loop is None:
                    self._loop, self._event = asyncio.get_running_loop(), asyncio.Event()
                self._event.clear()  # under the lock: a _put after this sets it again
            await self._event.wait()
