"""The OpenAI-compatible HTTP server: state, routes, streamed and whole responses.

Owns: `create_app` (a FastAPI app for any ASGI server) and `serve` (uvicorn in-process); readiness, auth and the
server's state; the routes, from a validated request (protocol.py) to response bodies, SSE chunks and usage;
cancelling a stream's generations when its client leaves; OpenAI error bodies (never a 500 for bad input).
Not: batching (kiln/engine.py), prompts and engine requests (prompts.py), a choice's text (choices.py), grammars
(structured.py), tool-call formats (tools.py), the field table (protocol.py), the HTTP layer (transport.py), the
command line (kiln/serve.py). Work that grows with the input stays off the event loop: templates render in
worker processes (chat_template.Workers); tokenizing and grammar compiling run in threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiln import chat_template
from kiln.errors import KilnError
from kiln.server import adapters, prompts, transport
from kiln.server import protocol as P
from kiln.server.choices import (Choice, cancel_all, check_finished, in_flight, merged_outputs, run_to_end,
                                   usage_of)
from kiln.server.metrics import Metrics

log = logging.getLogger("kiln.server")
MAX_BODY = 8 * 1024 * 1024  # bytes; a request body over this is a 413
RETRY_AFTER_S = prompts.RETRY_AFTER_S
_ROUTES = frozenset({"/health", "/metrics", "/v1/models", "/tokenize", "/detokenize", "/v1/chat/completions",
                     "/v1/completions", "/slots"})


# --- State: what requests need once the model is loaded --------------------------------------------------------
class ServerState:
    def __init__(self, model_id: str, api_key: str | None, n_slots: int, ctx_size: int | None, max_queue: int,
                 max_body: int, read_timeout: float = transport.READ_TIMEOUT, template_timeout: float = 5.0,
                 cache_types: tuple = (None, None), slot_save_path: str | None = None, kv_budget: int | None = None):
        self.model_id, self.api_key, self.max_body, self.read_timeout = model_id, api_key, max_body, read_timeout
        self.slot_save_path = slot_save_path  # the folder of POST /slots/{id}?action=save|restore (None: off)
        self.n_slots, self.ctx_size, self.max_queue = n_slots, ctx_size, max_queue
        self.cache_types = cache_types  # (keys, values): kiln.kv_types.CACHE_TYPES, None: the model's dtype
        self.kv_budget = kv_budget  # bytes of KV cache the slots share (sets ctx_size at attach), or None
        self.model = self.tokenizer = self.engine = self.structured = self.tool_style = None
        self.ready, self.load_error, self.on_load_failed = False, None, None
        self.max_chars: int | None = None  # a prompt longer than this cannot fit the context (see attach)
        self.templates = chat_template.Workers(timeout=template_timeout)
        self.draining = self.cut = False  # shutting down: no new requests; then: in-flight generations cut
        self.live: set[Choice] = set()  # choices in flight (event loop only)
        self._compiler_lock = threading.Lock()
        self.metrics = Metrics()
        self.created = P.now()

    def attach(self, model, tokenizer, drafting: dict | None = None) -> None:
        """Build the engine (with `drafting`, its speculative-decoding arguments) for a loaded model, then open
        for requests."""
        from kiln.engine import Engine, fit_context
        from kiln.server.tools import tool_style
        if self.kv_budget is not None:
            self.ctx_size = fit_context(model, self.kv_budget, self.n_slots, *self.cache_types)
        self.ctx_size = self.ctx_size or min(model.args.max_position_embeddings, 4096)
        self.model, self.tokenizer = model, tokenizer
        self.vocab_size = model.args.vocab_size
        self.tool_style = tool_style(tokenizer)
        per_token = tokenizer.max_token_chars  # None: no provable bound, so every prompt is tokenized
        self.max_chars = self.ctx_size * per_token if per_token else None
        engine = Engine
        if getattr(model, "shard", None) is not None:  # tensor parallelism: the other ranks follow its calls
            from kiln.launch import LeaderEngine
            engine = LeaderEngine
        self.engine = engine(model, tokenizer, n_slots=self.n_slots, ctx_size=self.ctx_size,
                             max_queue=self.max_queue, cache_type_k=self.cache_types[0],
                             cache_type_v=self.cache_types[1], **(drafting or {}))
        self.engine.start()
        self.ready = True

    def compiler(self):
        """The grammar compiler, built on first use in a worker thread (xgrammar scans the vocabulary)."""
        with self._compiler_lock:
            if self.structured is None:
                from kiln.server.structured import Structured
                self.structured = Structured(self.tokenizer, vocab_size=self.vocab_size)
        return self.structured

    def load_in_background(self, loader: Callable) -> None:
        # Measured on 2 busy CPU cores: when torch's first parallel (OpenMP) work runs in the loader thread rather
        # than the main thread, the engine thread decodes 7-10x slower afterwards (a tiny model: 80-120 ms per
        # token instead of 10). One small parallel op here, on the main thread, first, avoids it.
        import torch
        torch.ones(1 << 16).exp_().sum()

        def run():
            try:
                self.attach(*loader())
                log.info("model %s loaded; serving", self.model_id)
            except Exception as e:  # KilnError, or a broken file: report and let the front door exit
                self.load_error = e
                log.error("loading %s failed: %s", self.model_id, e)
                if self.on_load_failed:
                    self.on_load_failed(e)
        threading.Thread(target=run, name="kiln-load", daemon=True).start()

    def drain(self) -> None:
        """Shutdown has begun: new requests get 503; those in flight go on for now."""
        self.draining = True

    def cut_in_flight(self) -> None:
        """The shutdown grace is over: end every generation in flight (streams end with finish_reason
        "cancelled", waiting non-streaming requests get 503)."""
        self.draining = self.cut = True
        for c in list(self.live):
            c.handle.cancel()

    async def stop(self) -> None:
        await self.templates.close()
        if self.engine is not None:
            await asyncio.to_thread(self.engine.stop)


# --- The app ---------------------------------------------------------------------------------------------------
def create_app(loader: Callable[[], tuple] | None = None, *, model=None, tokenizer=None, model_id: str = "model",
               api_key: str | None = None, n_slots: int = 4, ctx_size: int | None = None, max_queue: int = 64,
               max_body: int = MAX_BODY, allowed_hosts: tuple[str, ...] = transport.LOCAL_HOSTS,
               read_timeout: float = transport.READ_TIMEOUT, template_timeout: float = 5.0,
               cache_types: tuple = (None, None), slot_save_path: str | None = None,
               kv_budget: int | None = None, drafting: dict | None = None) -> FastAPI:
    """An ASGI app serving one model. Give either `model` and `tokenizer`, or a `loader` returning them, which
    runs in a thread at startup (/health answers 503 until it is done). `allowed_hosts`: the Host header values
    served (transport.allowed_hosts; "*" for any); `read_timeout`: seconds a request body may pause;
    `template_timeout`: seconds a chat template may take to render one conversation; `slot_save_path`: the
    folder slots are saved to and restored from (server/slots.py; None: those actions answer 501);
    `kv_budget`: bytes of KV cache the slots share, which sets ctx_size (engine.fit_context); `drafting`: the
    engine's speculative-decoding arguments (draft_model or prompt_lookup, num_draft_tokens; a loader may
    return them as a third item, after loading the draft model)."""
    if (loader is None) == (model is None or tokenizer is None):
        raise KilnError("create_app needs either a loader or both model and tokenizer")
    st = ServerState(model_id, api_key, n_slots, ctx_size, max_queue, max_body, read_timeout, template_timeout,
                     cache_types, slot_save_path, kv_budget)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if loader is not None:
            st.load_in_background(loader)
        else:
            st.attach(model, tokenizer, drafting)
        yield
        await st.stop()

    app = FastAPI(title="kiln", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.kiln = st
    app.add_middleware(transport.Guard, metrics=st.metrics, hosts=tuple(allowed_hosts), routes=_ROUTES)
    _handlers(app)
    _routes(app, st)
    return app


def serve(model, tokenizer, host: str = "127.0.0.1", port: int = 8080, *, log_level: str = "warning",
          allowed_hosts: tuple[str, ...] = (), read_timeout: float = transport.READ_TIMEOUT,
          shutdown_grace: float = transport.SHUTDOWN_GRACE, **kw) -> None:
    """Serve a loaded model until Ctrl-C or SIGTERM (blocking). Other keyword arguments go to `create_app`."""
    app = create_app(model=model, tokenizer=tokenizer, allowed_hosts=transport.allowed_hosts(host, allowed_hosts),
                     read_timeout=read_timeout, **kw)
    server_for(app, host, port, log_level=log_level, read_timeout=read_timeout,
               shutdown_grace=shutdown_grace).run()


def server_for(app: FastAPI, host: str, port: int, **kw):
    """The uvicorn.Server kiln runs `app` with (transport.make_server), its shutdown wired to the app's state."""
    st: ServerState = app.state.kiln
    return transport.make_server(app, host, port, on_drain=st.drain, on_cut=st.cut_in_flight, **kw)


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(P.APIError)
    async def api_error(request, e: P.APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(KilnError)
    async def kiln_error(request, e: KilnError):
        return JSONResponse(P.error_body(400, str(e)), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(P.error_body(e.status_code, message), status_code=e.status_code)

    # a kiln bug (any other exception) is answered by transport.Guard: one log entry, a 500 without internals


# --- Request plumbing: readiness, auth, body -------------------------------------------------------------------
def _ready(st: ServerState) -> None:
    if st.load_error is not None:
        raise P.APIError(503, f"the model failed to load: {st.load_error}")
    if st.draining:
        raise P.APIError(503, "the server is shutting down", code="shutting_down")
    if not st.ready:
        raise P.APIError(503, "the model is still loading; retry shortly", code="loading",
                         headers={"Retry-After": str(RETRY_AFTER_S)})


def _auth(st: ServerState, request: Request) -> None:
    if st.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), st.api_key.encode()):
        raise P.APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the "
                              "key the server was started with (--api-key)", code="invalid_api_key",
                         headers={"WWW-Authenticate": "Bearer"})


async def _open(st: ServerState, request: Request):
    """Auth, readiness and the JSON body, in that order (a wrong key learns nothing about the server)."""
    _auth(st, request)
    _ready(st)
    return await transport.read_json(request, st.max_body, st.read_timeout)


def _check_model(st: ServerState, name: str | None) -> None:
    if st.ready:
        adapters.check_model(st, name)
    elif name is not None and name != st.model_id:  # adapters are known once loaded
        raise P.APIError(404, f"the model {name!r} does not exist; this server serves {st.model_id!r}",
                         param="model", code="model_not_found")


# --- Routes ----------------------------------------------------------------------------------------------------
def _routes(app: FastAPI, st: ServerState) -> None:
    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        if st.load_error is not None:
            return JSONResponse({"status": "error", **P.error_body(503, f"load failed: {st.load_error}")}, 503)
        if st.draining:
            return JSONResponse({"status": "shutting down", **P.error_body(503, "the server is shutting down")}, 503)
        if not st.ready:
            return JSONResponse({"status": "loading", **P.error_body(503, "the model is loading")}, 503,
                                headers={"Retry-After": str(RETRY_AFTER_S)})
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(request: Request):
        _auth(st, request)
        stats = st.engine.stats() if st.engine is not None else None
        return Response(st.metrics.render(stats), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        _auth(st, request)
        return {"object": "list", "data": adapters.cards(st, _model_card(st)) if st.ready else [_model_card(st)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        _auth(st, request)
        _check_model(st, name)
        card = _model_card(st)
        return next((c for c in adapters.cards(st, card) if c["id"] == name), card) if st.ready else card

    @app.get("/slots")
    async def slots(request: Request):
        _auth(st, request)
        _ready(st)
        return st.engine.slots()

    @app.post("/slots/{slot}")
    async def slot_action(slot: str, request: Request, action: str = ""):
        from kiln.server import slots
        _auth(st, request)
        _ready(st)
        needs_body = action in ("save", "restore")  # erase and unknown actions: no body read
        body = await transport.read_json(request, st.max_body, st.read_timeout) if needs_body else None
        return await slots.act(st, slot, action, body)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return await prompts.tokenize(st, await _open(st, request))

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return prompts.detokenize(st, await _open(st, request))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _open(st, request)
        return await _chat(st, request, P.parse_chat(body))

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _open(st, request)
        return await _completions(st, request, P.parse_completion(body))


def _model_card(st: ServerState) -> dict:
    return {"id": st.model_id, "object": "model", "created": st.created, "owned_by": "kiln",
            "meta": {"n_ctx": st.ctx_size, "n_slots": st.n_slots, "loaded": st.ready}}


# --- /v1/chat/completions --------------------------------------------------------------------------------------
async def _chat(st: ServerState, request: Request, req: P.ChatRequest):
    served = adapters.resolve(st, req)
    prompts.check_capacity(st, req.n, "n")
    ids = await prompts.chat_ids(st, req)
    prompts.check_context(st, ids, "messages")
    constraint = await prompts.constraint(st, req)
    tools_on = bool(req.tools) and req.tool_choice != "none"
    t0 = time.perf_counter()
    handles = prompts.submit(st, ids, req, constraint, 0)
    choices = [Choice(i, h, st, req, tools_on) for i, h in enumerate(handles)]
    meta = (P.new_id("chatcmpl"), P.now(), served)
    if req.stream:
        return _SSE(_chat_stream(st, req, ids, choices, meta, t0), lambda: cancel_all(choices))
    await _complete(st, request, [(ids, choices)], t0)
    body = {"id": meta[0], "object": "chat.completion", "created": meta[1], "model": meta[2],
            "system_fingerprint": P.FINGERPRINT, "choices": [_chat_choice(st, c, req, tools_on) for c in choices],
            "usage": usage_of([(ids, choices)])}
    return JSONResponse(body)


async def _complete(st: ServerState, request: Request, groups: list, t0: float) -> None:
    """A non-streaming request's generations run to the end (counted in flight meanwhile), checked, timed."""
    choices = [c for _, cs in groups for c in cs]
    with in_flight(st, groups):
        await run_to_end(st, request, choices, t0)
    check_finished(st, choices)
    st.metrics.latency.observe(time.perf_counter() - t0)


def _chat_choice(st: ServerState, c: Choice, req: P.ChatRequest, tools_on: bool) -> dict:
    from kiln.server.tools import parse_tool_calls
    content, calls = c.text, []
    if tools_on:
        content, calls = parse_tool_calls(content, st.tool_style)
        calls = calls[:1] if not req.parallel_tool_calls else calls
    message = {"role": "assistant", "content": content if content or not calls else None}
    finish = c.finish
    if calls:
        message["tool_calls"] = [{"id": t.id, "type": "function",
                                  "function": {"name": t.name, "arguments": t.arguments}} for t in calls]
        finish = "tool_calls" if finish == "stop" else finish
    logprobs = {"content": c.entries_all} if req.logprobs else None
    return {"index": c.index, "message": message, "logprobs": logprobs, "finish_reason": finish}


class _SSE(StreamingResponse):
    """An event stream that runs `on_close` however it ends: finished, client gone before or during it. A stream
    that did not reach its end (the client left) is counted as 499, not as the 200 it started with."""

    def __init__(self, events: AsyncIterator[dict | str], on_close: Callable[[], None]):
        self.finished = False

        async def body():
            async for e in events:
                yield f"data: {e if isinstance(e, str) else json.dumps(e, ensure_ascii=False)}\n\n"
            self.finished = True
        super().__init__(body(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:  # a generator that never started has no finally of its own to run
            self.on_close()
            if not self.finished:
                scope["kiln.status"] = 499


async def _stream_steps(st: ServerState, groups: list, t0: float):
    """(choice, text, logprob entries) as outputs come; cancels every generation if the client goes away."""
    with in_flight(st, groups):  # normal end, client gone (CancelledError) or an error: slots freed either way
        async for c, out in merged_outputs(st, [c for _, cs in groups for c in cs], t0):
            text, entries = c.step(out)
            if text or entries or c.finish:
                yield c, text, entries


async def _stream_end(st: ServerState, events: AsyncIterator, choices: list[Choice], final, t0: float):
    """`events`, then the usage chunk (`final()`, None for none) and [DONE]; an error ends the stream with its body."""
    try:
        async for e in events:
            yield e
        check_finished(st, choices, streaming=True)
    except Exception as e:
        yield (e.body() if isinstance(e, P.APIError) else P.error_body(400, str(e)) if isinstance(e, KilnError)
               else transport.internal_error(e, "a stream failed"))
        yield "[DONE]"
        return
    st.metrics.latency.observe(time.perf_counter() - t0)
    usage = final()
    if usage is not None:
        yield usage
    yield "[DONE]"


def _chunker(kind: str, req: P.GenRequest, meta):
    return lambda choice_dicts, usage=None: P.chunk(kind, *meta, choice_dicts, usage, req.include_usage)


def _usage_chunk(chunk, req: P.GenRequest, groups: list):
    return lambda: chunk([], usage_of(groups)) if req.include_usage else None


def _chat_stream(st: ServerState, req: P.ChatRequest, ids, choices: list[Choice], meta, t0: float):
    chunk = _chunker("chat.completion.chunk", req, meta)

    def logprobs(entries):
        return {"content": entries} if req.logprobs and entries else None

    async def events():
        for c in choices:
            yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        async for c, text, entries in _stream_steps(st, [(ids, choices)], t0):
            for delta in _chat_deltas(c, text, req):
                yield chunk([{"index": c.index, "delta": delta, "logprobs": logprobs(entries), "finish_reason": None}])
                entries = []
            if c.finish:  # logprobs of tokens whose text is empty (or was held back) ride on the last chunk
                finish = "tool_calls" if c.calls_seen and c.finish == "stop" else c.finish
                yield chunk([{"index": c.index, "delta": {}, "logprobs": logprobs(entries), "finish_reason": finish}])
            elif entries and req.logprobs:
                yield chunk([{"index": c.index, "delta": {}, "logprobs": logprobs(entries), "finish_reason": None}])
    return _stream_end(st, events(), choices, _usage_chunk(chunk, req, [(ids, choices)]), t0)


def _chat_deltas(c: Choice, text: str, req: P.ChatRequest) -> list[dict]:
    """The delta objects for one step's text: plain content, or tool-call starts and argument pieces."""
    if c.parser is None:
        return [{"content": text}] if text else []
    from kiln.server.tools import ContentDelta, ToolArgsDelta, ToolCallStart
    deltas = []
    for e in c.tool_events(text):
        if isinstance(e, ContentDelta) and e.text:
            deltas.append({"content": e.text})
        elif isinstance(e, ToolCallStart) and (e.index == 0 or not c.single_call):
            c.calls_seen += 1
            deltas.append({"tool_calls": [{"index": e.index, "id": e.id, "type": "function",
                                           "function": {"name": e.name, "arguments": ""}}]})
        elif isinstance(e, ToolArgsDelta) and (e.index == 0 or not c.single_call) and e.text:
            deltas.append({"tool_calls": [{"index": e.index, "function": {"arguments": e.text}}]})
    return deltas


# --- /v1/completions -------------------------------------------------------------------------------------------
async def _completions(st: ServerState, request: Request, req: P.CompletionRequest):
    served = adapters.resolve(st, req)
    prompts.check_capacity(st, len(req.prompts) * req.n, "n" if len(req.prompts) == 1 else "prompt")
    prompt_ids = await prompts.completion_ids(st, req)
    t0 = time.perf_counter()
    groups: list[tuple[list[int], list[Choice]]] = []
    try:
        for k, ids in enumerate(prompt_ids):
            handles = prompts.submit(st, ids, req, None, k * req.n)
            groups.append((ids, [Choice(k * req.n + i, h, st, req) for i, h in enumerate(handles)]))
    except BaseException:
        cancel_all([c for _, cs in groups for c in cs])
        raise
    choices = [c for _, cs in groups for c in cs]
    echoes = [st.tokenizer.decode(ids) if req.echo else "" for ids, cs in groups for _ in cs]
    meta = (P.new_id("cmpl"), P.now(), served)
    if req.stream:
        return _SSE(_completion_stream(st, req, groups, choices, echoes, meta, t0),
                    lambda: cancel_all(choices))
    await _complete(st, request, groups, t0)
    body = {"id": meta[0], "object": "text_completion", "created": meta[1], "model": meta[2],
            "system_fingerprint": P.FINGERPRINT,
            "choices": [{"index": c.index, "text": echo + c.text,
                         "logprobs": P.legacy_logprobs(c.entries_all, len(echo)) if req.logprobs else None,
                         "finish_reason": c.finish} for c, echo in zip(choices, echoes)],
            "usage": usage_of(groups)}
    return JSONResponse(body)


def _completion_stream(st, req: P.CompletionRequest, groups, choices, echoes, meta, t0):
    chunk = _chunker("text_completion", req, meta)
    offsets = {c.index: len(e) for c, e in zip(choices, echoes)}

    async def events():
        for c, e in zip(choices, echoes):
            if e:
                yield chunk([{"index": c.index, "text": e, "logprobs": None, "finish_reason": None}])
        async for c, text, entries in _stream_steps(st, groups, t0):
            lp = P.legacy_logprobs(entries, offsets[c.index]) if req.logprobs else None
            offsets[c.index] += len(text)
            yield chunk([{"index": c.index, "text": text, "logprobs": lp, "finish_reason": c.finish}])
    return _stream_end(st, events(), choices, _usage_chunk(chunk, req, groups), t0)
