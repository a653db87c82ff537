"""Requests in: a validated request (protocol.py) to prompt ids and engine requests.

Owns: chat prompts (rendered in a worker process, then tokenized in a thread with message text as text:
Tokenizer.encode_chat), completion prompts, /tokenize and /detokenize, the checks that need the model (character
count before tokenizing, context, vocabulary, queue capacity), compiling constraints off the event loop, and one
engine request per choice. Every function takes the app's ServerState as `st`.
Not: HTTP (app.py, transport.py), the field table (protocol.py), what comes back out (choices.py).
"""

from __future__ import annotations

import asyncio

from kiln import chat_template
from kiln.errors import KilnError
from kiln.tokenizer import ContextFull, check_prompt
from kiln.sample import SamplingParams
from kiln.server import protocol as P

RETRY_AFTER_S = 1


async def tokenize(st, body) -> dict:
    if not isinstance(body, dict) or not isinstance(body.get("content"), str):
        raise P.bad("content", "send {'content': TEXT} (optionally 'add_special': bool, 'with_pieces': bool)")
    unknown = sorted(set(body) - {"content", "add_special", "with_pieces"})
    if unknown:
        raise P.APIError(400, f"unsupported field '{unknown[0]}' for /tokenize", param=unknown[0])
    add = P.boolean("add_special", body.get("add_special", False))
    pieces = P.boolean("with_pieces", body.get("with_pieces", False))
    check_chars(st, body["content"], "content")
    def run():
        ids = st.tokenizer.encode(body["content"], add_special_tokens=add)
        return [{"id": i, "piece": st.tokenizer.id_to_piece(i)} for i in ids] if pieces else ids
    return {"tokens": await asyncio.to_thread(run)}


def detokenize(st, body) -> dict:
    if not isinstance(body, dict) or set(body) != {"tokens"}:
        raise P.bad("tokens", "send {'tokens': [ids...]}")
    return {"content": st.tokenizer.decode(token_ids(st, "tokens", body["tokens"]))}


def token_ids(st, param: str, ids) -> list[int]:
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise P.bad(param, f"invalid {param}: must be a list of token ids")
    bad = [i for i in ids if not 0 <= i < st.tokenizer.vocab_size]
    if bad:
        raise P.bad(param, f"token id {bad[0]} is outside the vocabulary (0..{st.tokenizer.vocab_size - 1})")
    return ids


async def chat_ids(st, req: P.ChatRequest) -> list[int]:
    """The chat prompt's ids: template rendered in a worker process, then tokenized in a worker thread, with message
    text and tool names tokenized as text (control tokens come only from the template: Tokenizer.encode_chat)."""
    tok = st.tokenizer
    kwargs = dict(req.chat_template_kwargs)
    clash = sorted(set(kwargs) & {"messages", "tools"})
    if clash:
        raise P.bad("chat_template_kwargs", f"chat_template_kwargs may not set {clash[0]!r}; use the field itself")
    generation_prompt = kwargs.pop("add_generation_prompt", True)
    tools = req.tools if req.tool_choice != "none" else None
    job = tok.chat_job(req.messages, tools, bool(generation_prompt), **kwargs)
    try:
        rendered = await st.templates.render(job, st.max_chars)
    except chat_template.TemplateFailed as e:
        if e.kind == "too_long":
            raise _chars_over(st, e.chars, "messages", "at least ") from None
        raise P.APIError(400, str(e), param="messages", code="chat_template_error") from None
    check_chars(st, rendered.text, "messages")
    return await asyncio.to_thread(tok.encode_chat, rendered)


def check_chars(st, text: str, param: str) -> None:
    """Refuse, before tokenizing, a text that cannot fit the context (see Tokenizer.max_token_chars)."""
    if st.max_chars is not None and len(text) > st.max_chars:
        raise _chars_over(st, len(text), param)


def _chars_over(st, n: int, param: str, more: str = "") -> P.APIError:
    return P.APIError(400, f"the prompt is {more}{n} characters long, more than a context of {st.ctx_size} tokens "
                           f"can hold (a token of this model covers at most {st.max_chars // st.ctx_size} "
                           f"characters); shorten the prompt or start the server with a larger --ctx-size",
                      param=param, code="context_length_exceeded")


def check_context(st, ids: list[int], param: str) -> None:
    """kiln.generate's prompt check (empty, ids in the model's vocabulary, room in the context) as a 400."""
    try:
        check_prompt(ids, st.ctx_size, st.vocab_size, fix="start the server with a larger --ctx-size")
    except ContextFull as e:
        raise P.APIError(400, str(e), param=param, code="context_length_exceeded") from None
    except KilnError as e:
        raise P.bad(param, str(e)) from None


def check_capacity(st, n_generations: int, param: str) -> None:
    """A request whose generations could never all be in the queue and the slots at once is a 400, not a 503."""
    room = st.n_slots + st.max_queue
    if n_generations > room:
        raise P.bad(param, f"this request asks for {n_generations} generations (prompts x n), but the server holds "
                           f"at most {room} at once ({st.n_slots} slots + {st.max_queue} queued); split it up")


async def constraint(st, req: P.ChatRequest):
    """Compile the request's constraint (off the event loop: big schemas take a while); None if it has none."""
    if req.constraint is None:
        return None
    kind, *args = req.constraint
    param = {"json_object": "response_format", "json_schema": "response_format", "gbnf": "grammar",
             "regex": "regex", "tool_call": "tool_choice"}[kind]

    def build():
        c = st.compiler()
        if kind == "json_schema":
            return c.json_schema(args[0], strict=args[1])
        if kind == "tool_call":
            return c.tool_call(req.tools, req.tool_choice, st.tool_style, parallel=req.parallel_tool_calls)
        return getattr(c, kind)(*args)  # json_object, gbnf, regex
    try:
        return await asyncio.to_thread(build)
    except KilnError as e:
        raise P.bad(param, str(e)) from None


def _sampling(st, req: P.GenRequest, i: int) -> SamplingParams:
    kw = dict(req.sampling)
    if kw.get("seed") is not None:
        kw["seed"] = kw["seed"] + i  # choice i of n gets its own stream; the request stays reproducible
    try:
        params = SamplingParams(**kw)
        params.check_vocab(st.vocab_size)
    except KilnError as e:
        raise P.bad("logit_bias" if "logit_bias" in str(e) else None, str(e)) from None
    return params


def submit(st, ids: list[int], req: P.GenRequest, constraint, first_index: int) -> list:
    """One engine request per choice; all or none (a full queue cancels the ones already in)."""
    from kiln.engine import EngineRequest, QueueFull
    if st.draining:
        raise P.APIError(503, "the server is shutting down", code="shutting_down")
    eos = frozenset() if req.ignore_eos else frozenset(st.tokenizer.eos_token_ids)
    max_tokens = req.max_tokens or st.ctx_size - len(ids)
    handles = []
    try:
        for i in range(req.n):
            handles.append(st.engine.submit(EngineRequest(
                prompt=ids, params=_sampling(st, req, first_index + i), max_tokens=max_tokens,
                stop_token_ids=eos, processor=constraint.processor() if constraint is not None else None,
                top_logprobs=req.top_logprobs, ignore_eos=req.ignore_eos, adapter=req.adapter_key[0],
                adapter_scale=req.adapter_key[1])))
    except BaseException as e:
        for h in handles:
            h.cancel()
        if isinstance(e, QueueFull):
            raise P.APIError(503, "the server is busy: the request queue is full; retry shortly",
                             code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        raise
    return handles


async def completion_ids(st, req: P.CompletionRequest) -> list[list[int]]:
    out = []
    for k, p in enumerate(req.prompts):
        param = "prompt" if len(req.prompts) == 1 else f"prompt[{k}]"
        if isinstance(p, str):
            check_chars(st, p, param)
            ids = await asyncio.to_thread(st.tokenizer.encode, p)
        else:
            ids = token_ids(st, param, p)
        check_context(st, ids, param)
        out.append(ids)
    return out
