"""Chat templates: render a model's Jinja template in a sandbox, and say where the caller's text landed in it.

Owns: the sandbox (a template in a downloaded file is untrusted code), `render` (the text and the spans of it
that came from the caller's strings), and `Workers`, worker processes that render within a time and memory
budget (Jinja has no time limit, and `{% set ns.x = ns.x ~ ns.x %}` in a loop exhausts memory).
Not: what the spans mean (tokenizer.py: caller text never yields control tokens), choosing the template, HTTP.

Spans: the template renders twice, the second time with each non-empty caller string wrapped in the
noncharacters U+FDD0 … U+FDD1. If that text, markers removed, equals the first, the markers give the spans;
if not (the template inspected the text), they are unknown (None) and the tokenizer applies a stricter rule.
Dict keys and `role` / `type` values are structure, not marked. This module imports nothing from kiln: a
worker runs it as a plain script that must start in a fraction of a second, without torch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from jinja2 import TemplateError, TemplateSyntaxError, nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

log = logging.getLogger("kiln.chat_template")
OPEN, CLOSE = "\ufdd0", "\ufdd1"  # noncharacters: never meant to appear in interchanged text
_STRUCTURE = frozenset(("role", "type"))  # values templates compare against fixed words: not marked
_HEADER = struct.Struct("<Q")


class TemplateFailed(Exception):
    """The template could not render this conversation. `kind`: "template" (its own error, a syntax error, a blocked
    attribute), "timeout", "memory", "died" (its worker process), "too_long" (more than `max_chars` characters:
    `chars` is how many it reached)."""

    def __init__(self, message: str, kind: str = "template", chars: int = 0):
        super().__init__(message)
        self.kind, self.chars = kind, chars


@dataclass
class Job:
    """One render: the template source, fixed values (bos_token…, add_generation_prompt) and the caller's data."""
    source: str
    fixed: dict
    data: dict  # messages, tools, documents, template kwargs: JSON-shaped (see `plain`)

    def strings(self, marked: bool | None = None) -> list[str]:
        """The caller's strings: all (None), those `render` marks (True), or the rest, keys included (False)."""
        out: list[str] = []
        _walk(self.data, out, marked)
        return out


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]] | None  # caller text in `text`, sorted and disjoint; None: unknown
    job: Job | None = field(default=None, repr=False)


# --- The sandbox -----------------------------------------------------------------------------------------------
class _TemplateRaised(Exception):
    """A template's own raise_exception(...) call."""


class _Sandbox(ImmutableSandboxedEnvironment):
    def unsafe_undefined(self, obj, attribute):
        # Jinja's default is a silent Undefined, which would let `{{ ''.__class__ }}` render as "" and keep going;
        # a template that reaches for Python internals is hostile or broken, so stop it.
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is not allowed")


class _GenerationTag(Extension):
    """Hugging Face's {% generation %}…{% endgeneration %} marks assistant text for training masks; render the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Hugging Face's filter: plain json.dumps (Jinja's own escapes <, >, & and ' for HTML, which models never saw)
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise _TemplateRaised(str(message))


class Env:
    """A sandboxed Jinja environment and the templates compiled in it."""

    def __init__(self):
        self.jinja = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationTag])
        self.jinja.filters["tojson"] = _tojson
        self.jinja.globals["raise_exception"] = _raise_exception
        self.jinja.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._compiled: dict[str, object] = {}

    def template(self, source: str):
        if source not in self._compiled:
            try:
                self._compiled[source] = self.jinja.from_string(source)
            except TemplateSyntaxError as e:
                raise TemplateFailed(f"the chat template has a syntax error at line {e.lineno}: {e.message}") from None
        return self._compiled[source]


def _generate(template, context: dict, max_chars: int | None) -> str:
    """Render piece by piece, stopping as soon as the text is longer than `max_chars`."""
    parts, n = [], 0
    try:
        for piece in template.generate(**context):
            parts.append(piece)
            n += len(piece)
            if max_chars is not None and n > max_chars:
                raise TemplateFailed(f"the rendered prompt is longer than {max_chars} characters", "too_long", n)
    except (TemplateFailed, MemoryError, _Deadline):
        raise
    except _TemplateRaised as e:
        raise TemplateFailed(f"the chat template rejected this conversation: {e}") from None
    except SecurityError as e:
        raise TemplateFailed(f"the chat template tried to reach Python internals and was stopped ({e}); use a "
                             "trusted template") from None
    except RecursionError:
        raise TemplateFailed("the chat template recursed too deeply (or the conversation is nested too deeply)") \
            from None
    except TemplateError as e:
        raise TemplateFailed(f"the chat template failed: {e}") from None
    except Exception as e:  # a template is a program; its TypeErrors etc. are bad input, not kiln bugs
        raise TemplateFailed(f"the chat template failed: {type(e).__name__}: {e}") from None
    return "".join(parts)


# --- Rendering with spans --------------------------------------------------------------------------------------
def render(env: Env, job: Job, max_chars: int | None = None) -> Rendered:
    """The template's text for `job`, and where the caller's strings landed in it (see the module docstring)."""
    template = env.template(job.source)
    text = _generate(template, {**job.data, **job.fixed}, max_chars)
    if OPEN in job.source or CLOSE in job.source or any(OPEN in s or CLOSE in s for s in job.strings()):
        return Rendered(text, None, job)
    try:
        marked = _generate(template, {**_mark(job.data), **job.fixed}, 3 * len(text) + 4096)
    except TemplateFailed as e:
        if e.kind != "too_long":
            return Rendered(text, None, job)  # the template trips over the markers: spans unknown
        raise
    return Rendered(text, _spans(marked, text), job)


def _mark(value, key: str | None = None):
    if isinstance(value, str):
        return f"{OPEN}{value}{CLOSE}" if value and key not in _STRUCTURE else value
    if isinstance(value, dict):
        return {k: _mark(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_mark(v) for v in value]
    return value


def _walk(value, out: list[str], marked: bool | None, key: str | None = None) -> None:
    if isinstance(value, str):
        is_marked = bool(value) and key not in _STRUCTURE
        if marked is None or marked == is_marked:
            out.append(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            if marked is not True:
                out.append(k)
            _walk(v, out, marked, k)
    elif isinstance(value, list):
        for v in value:
            _walk(v, out, marked)


def _spans(marked: str, text: str) -> list[tuple[int, int]] | None:
    """Spans of marked text in `text`, if removing the markers from `marked` gives exactly `text`."""
    spans, pos, at = [], 0, 0
    while True:
        i = marked.find(OPEN, pos)
        plain = marked[pos:] if i < 0 else marked[pos:i]
        if CLOSE in plain or text[at:at + len(plain)] != plain:
            return None
        at += len(plain)
        if i < 0:
            return spans if at == len(text) else None
        j = marked.find(CLOSE, i + 1)
        inner = marked[i + 1:j] if j >= 0 else OPEN
        if OPEN in inner or text[at:at + len(inner)] != inner:
            return None
        if inner:
            spans.append((at, at + len(inner)))
        at, pos = at + len(inner), j + 1


def plain(value, depth: int = 0):
    """JSON-shaped copies only: the sandbox should never see caller objects with methods of their own."""
    if depth > 200:
        raise TemplateFailed("the conversation is nested more than 200 levels deep")
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, depth + 1) for v in value]
    if type(value).__module__ == "numpy" and callable(getattr(value, "item", None)):
        return plain(value.item(), depth + 1)
    for kind, base_value in ((str, str.__str__), (int, int.__int__), (float, float.__float__)):
        if isinstance(value, kind):  # subclasses (enums…) are cut back to the plain value
            return base_value(value)
    if callable(getattr(value, "model_dump", None)):  # pydantic models, e.g. the OpenAI SDK's messages
        return plain(value.model_dump(), depth + 1)
    return f"<{type(value).__name__}>"


def plain_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
        raise TemplateFailed("messages must be a list of objects like {'role': 'user', 'content': '...'}")
    # keys set to None are dropped, as transformers does: OpenAI clients send content=None next to tool_calls
    return [{k: v for k, v in plain(m).items() if v is not None} for m in messages]


# --- Worker processes (the server's): one job at a time each, killed and replaced when over budget -------------
def _dump(obj) -> bytes:
    body = json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return _HEADER.pack(len(body)) + body


def _load(body: bytes):
    return json.loads(body.decode("utf-8", "surrogatepass"))


class _Deadline(Exception):
    pass


def _worker_main() -> None:
    """The worker's loop: read a job from stdin, write the result to stdout, until stdin closes."""
    import resource
    import signal

    def alarm(signum, frame):
        raise _Deadline()
    signal.signal(signal.SIGALRM, alarm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the server, which stops us by closing stdin
    memory = int(sys.argv[2])
    with open("/proc/self/statm") as f:
        base = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = base + memory if hard == resource.RLIM_INFINITY else min(base + memory, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    env, stdin, stdout = Env(), sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = stdin.read(_HEADER.size)
        if len(head) < _HEADER.size:
            return
        req = _load(stdin.read(_HEADER.unpack(head)[0]))
        try:
            reply = _work(env, req, memory)
        except _Deadline:  # the alarm rang just as the render finished
            reply = {"error": f"the chat template took more than {req['timeout']:g} s to render", "kind": "timeout"}
        stdout.write(_dump(reply))
        stdout.flush()


def _work(env: Env, req: dict, memory: int) -> dict:
    import signal
    job = Job(req["source"], req["fixed"], req["data"])
    try:
        signal.setitimer(signal.ITIMER_REAL, req["timeout"])
        r = render(env, job, req["max_chars"])
        return {"text": r.text, "spans": r.spans}
    except _Deadline:
        return {"error": f"the chat template took more than {req['timeout']:g} s to render", "kind": "timeout"}
    except MemoryError:
        return {"error": f"the chat template used more than {memory >> 20} MiB of memory", "kind": "memory"}
    except TemplateFailed as e:
        return {"error": str(e), "kind": e.kind, "chars": e.chars}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


class _Worker:
    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc

    async def call(self, payload: bytes) -> dict:
        self.proc.stdin.write(payload)
        await self.proc.stdin.drain()
        head = await self.proc.stdout.readexactly(_HEADER.size)
        return _load(await self.proc.stdout.readexactly(_HEADER.unpack(head)[0]))

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


class Workers:
    """`n` worker processes rendering jobs within `timeout` seconds and `memory` bytes each (beyond their start).

    A worker that overruns is stopped by its own alarm; one that does not answer `grace` seconds after that (stuck in
    C code) is killed and replaced. Use from one event loop; `close()` when done."""

    def __init__(self, n: int = 2, timeout: float = 5.0, memory: int = 1 << 30, grace: float = 2.0):
        self.n, self.timeout, self.memory, self.grace = n, timeout, memory, grace
        self._idle: asyncio.Queue | None = None
        self._all: set[_Worker] = set()

    async def render(self, job: Job, max_chars: int | None = None) -> Rendered:
        """Render `job` in a worker; TemplateFailed when the template fails or goes over budget."""
        payload = _dump({"source": job.source, "fixed": job.fixed, "data": job.data, "max_chars": max_chars,
                         "timeout": self.timeout})
        if self._idle is None:
            self._idle = asyncio.Queue()
            for _ in range(self.n):
                self._idle.put_nowait(None)  # a worker is started when first needed
        worker = await self._idle.get()
        try:
            if worker is None or worker.proc.returncode is not None:
                worker = await self._spawn()
        except BaseException:
            self._idle.put_nowait(None)
            raise
        try:
            reply = await asyncio.wait_for(worker.call(payload), self.timeout + self.grace)
        except BaseException as e:  # over time, dead, or the request was cancelled: this worker is done
            worker.kill()
            self._all.discard(worker)
            self._idle.put_nowait(None)
            if isinstance(e, TimeoutError):
                raise TemplateFailed(f"the chat template took more than {self.timeout:g} s to render", "timeout") \
                    from None
            if isinstance(e, (OSError, asyncio.IncompleteReadError)):
                raise TemplateFailed("the chat template's worker process died while rendering (the template used "
                                     "more memory or time than allowed)", "died") from None
            raise
        self._idle.put_nowait(worker)
        if "error" in reply:
            raise TemplateFailed(reply["error"], reply["kind"], reply.get("chars", 0))
        return Rendered(reply["text"], [tuple(s) for s in reply["spans"]] if reply["spans"] is not None else None,
                        job)

    async def _spawn(self) -> _Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-P", os.path.abspath(__file__), "--worker", str(self.memory),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 20)
        worker = _Worker(proc)
        self._all.add(worker)
        return worker

    async def close(self) -> None:
        for w in list(self._all):
            if w.proc.stdin is not None:
                w.proc.stdin.close()
        for w in list(self._all):
            try:
                await asyncio.wait_for(w.proc.wait(), self.grace)
            except TimeoutError:
                w.kill()
                await w.proc.wait()
        self._all.clear()
        self._idle = None


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker_main()
