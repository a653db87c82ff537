"""The OpenAI wire format: request validation in, response and SSE chunk bodies out.

Owns: `APIError` (status + OpenAI error body), the fields each endpoint accepts (an unknown field is a 400 that
names it, never silently dropped), type and range checks naming the `param`, `ChatRequest` / `CompletionRequest`,
and the JSON shapes of completions, chunks, usage and logprobs.
Not: anything that needs the model or tokenizer (prompts.py), generation (engine.py), constraints (structured.py),
tool-call parsing (tools.py).
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

_ERROR_TYPES = {401: "authentication_error", 500: "server_error", 503: "server_error"}  # the rest: invalid_request
MAX_N = 16  # choices per request
MAX_STOPS = 16
MAX_STOP_CHARS = 1000  # per stop string: matching costs grow with it, and real stop strings are short
SEED_RANGE = (-2**63, 2**63 - 1)  # a 64-bit seed; choice i of n samples with seed + i
MAX_DEPTH = 64  # JSON nesting: tool schemas need a few dozen levels at most, and deeper input breaks recursive code
MIN_TEMPERATURE = 1e-3  # below this (but above 0, greedy) logits / temperature overflows float32
MAX_TOP_LOGPROBS = 20
FINGERPRINT = "kiln"


class APIError(Exception):
    """An HTTP error with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def bad(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def unsupported(param: str, message: str | None = None) -> APIError:
    return APIError(400, message or f"unsupported field {param}", param=param, code="unsupported_field")


def too_deep(value, limit: int = MAX_DEPTH) -> bool:
    """Whether a parsed JSON value nests more than `limit` arrays and objects (no recursion of its own)."""
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if d > limit:
            return True
        items = v.values() if isinstance(v, dict) else v
        stack.extend((x, d + 1) for x in items if isinstance(x, (dict, list)))
    return False


# --- Value checks: each takes (param name, value) and returns the normalized value or raises a 400 naming param ---
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def number(lo: float, hi: float, lo_open: bool = False):
    def check(name, v):
        if not _is_num(v) or v < lo or v > hi or (lo_open and v == lo):
            span = f"{'(' if lo_open else '['}{lo}, {hi}]" if hi != math.inf else f"{'>' if lo_open else '>='} {lo}"
            raise bad(name, f"invalid {name} {v!r}: must be a number {'in ' if hi != math.inf else ''}{span}")
        return float(v)
    return check


def integer(lo: int, hi: int | None = None):
    def check(name, v):
        if not _is_int(v) or v < lo or (hi is not None and v > hi):
            span = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise bad(name, f"invalid {name} {v!r}: must be an integer {span}")
        return v
    return check


def boolean(name, v):
    if not isinstance(v, bool):
        raise bad(name, f"invalid {name} {v!r}: must be true or false")
    return v


def string(name, v):
    if not isinstance(v, str) or not v:
        raise bad(name, f"invalid {name}: must be a non-empty string")
    return v


def obj(name, v):
    if not isinstance(v, dict):
        raise bad(name, f"invalid {name}: must be a JSON object")
    return v


def seed(name, v):
    lo, hi = SEED_RANGE
    if not _is_int(v) or not lo <= v <= hi:
        raise bad(name, f"invalid {name} {v!r}: must be an integer in [{lo}, {hi}] (64 bits)")
    return v


def temperature(name, v):
    if not _is_num(v) or not (v == 0 or MIN_TEMPERATURE <= v <= 100):
        raise bad(name, f"invalid {name} {v!r}: must be 0 (greedy) or a number in [{MIN_TEMPERATURE}, 100]")
    return float(v)


def stop(name, v) -> list[str]:
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad(name, "invalid stop: must be a non-empty string or a list of non-empty strings")
    if len(stops) > MAX_STOPS:
        raise bad(name, f"invalid stop: {len(stops)} strings given, at most {MAX_STOPS} are allowed")
    longest = max(map(len, stops), default=0)
    if longest > MAX_STOP_CHARS:
        raise bad(name, f"invalid stop: a stop string of {longest} characters; at most {MAX_STOP_CHARS} are allowed")
    return stops


def logit_bias(name, v) -> dict[int, float]:
    obj(name, v)
    out = {}
    for k, b in v.items():
        try:
            tok = int(k)
        except (TypeError, ValueError):
            raise bad(name, f"invalid logit_bias key {k!r}: keys must be token ids (integers)") from None
        if not _is_num(b) or not -100 <= b <= 100:
            raise bad(name, f"invalid logit_bias value {b!r} for token {k}: must be a number in [-100, 100]")
        out[tok] = float(b)
    return out


def stream_options(name, v) -> bool:
    obj(name, v)
    unknown = sorted(set(v) - {"include_usage"})
    if unknown:
        raise unsupported(f"{name}.{unknown[0]}", f"unsupported field {name}.{unknown[0]}; kiln accepts only "
                                                  "include_usage")
    return boolean(f"{name}.include_usage", v.get("include_usage", False))


def dict_of_strings(name, v) -> dict:
    obj(name, v)
    if not all(isinstance(k, str) for k in v):
        raise bad(name, f"invalid {name}: keys must be strings")
    return v


def lora(name, v) -> list[tuple[int, float]]:
    """llama-server's per-request adapters: [{"id": i, "scale": s}, ...] -> [(i, s)]."""
    if not isinstance(v, list):
        raise bad(name, f"invalid {name}: must be a list of {{'id': int, 'scale': number}} objects")
    out = []
    for i, e in enumerate(v):
        obj(f"{name}[{i}]", e)
        unknown = sorted(set(e) - {"id", "scale"})
        if unknown:
            raise unsupported(f"{name}[{i}].{unknown[0]}")
        if "id" not in e:
            raise bad(f"{name}[{i}].id", f"{name}[{i}] has no id")
        out.append((integer(0)(f"{name}[{i}].id", e["id"]),
                    number(-100, 100)(f"{name}[{i}].scale", e.get("scale", 1.0))))
    return out


_SAMPLING = {  # request field -> check; the names are SamplingParams' own
    "temperature": temperature,
    "top_p": number(0, 1, lo_open=True),
    "top_k": integer(0),
    "min_p": number(0, 1),
    "presence_penalty": number(-2, 2),
    "frequency_penalty": number(-2, 2),
    "repetition_penalty": number(0.01, 100),  # 1 is off; outside this, logits / penalty overflows or vanishes
    "logit_bias": logit_bias,
    "seed": seed,
}
_COMMON = {
    "model": string,
    "max_tokens": integer(1),
    "stop": stop,
    "n": integer(1, MAX_N),
    "stream": boolean,
    "stream_options": stream_options,
    "user": string,  # an end-user id for the caller's own bookkeeping; kiln logs nothing per user
    "ignore_eos": boolean,  # llama-server / vLLM extension
    "adapter": string,  # kiln: the name of a LoRA adapter the server loaded (--adapter NAME=PATH), or "base"
    "lora": lora,  # llama-server: [{"id": i, "scale": s}] over the server's adapters in --adapter order
    **_SAMPLING,
}


# --- Normalized requests ---------------------------------------------------------------------------------------
@dataclass
class GenRequest:
    """What both endpoints share."""
    model: str | None = None
    max_tokens: int | None = None  # None: up to the end of the context
    sampling: dict = field(default_factory=dict)  # SamplingParams keyword arguments
    stop: list[str] = field(default_factory=list)
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False
    adapter: str | None = None  # the body's "adapter" (a name), if any
    lora: list[tuple[int, float]] | None = None  # the body's "lora" (llama-server's), if any
    adapter_key: tuple[int, float] = (0, 1.0)  # what the server resolved: (AdapterBank entry, scale)


@dataclass
class ChatRequest(GenRequest):
    messages: list[dict] = field(default_factory=list)
    tools: list[dict] | None = None
    tool_choice: Any = "auto"  # "auto" | "none" | "required" | {"type": "function", "function": {"name": …}}
    parallel_tool_calls: bool = True
    constraint: tuple | None = None  # ("json_object",) | ("json_schema", schema, strict) | ("gbnf", text) | …
    chat_template_kwargs: dict = field(default_factory=dict)


@dataclass
class CompletionRequest(GenRequest):
    prompts: list = field(default_factory=list)  # each a str or a list of token ids
    echo: bool = False


def _check_fields(body, table: dict, endpoint: str) -> dict:
    """Run every present, non-null field through its check; an unknown field is a 400 naming it."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    unknown = sorted(set(body) - set(table))
    if unknown:
        raise unsupported(unknown[0], f"unsupported field '{unknown[0]}' for {endpoint}; kiln does not honour it, "
                                      "so it rejects it rather than ignore it (remove the field)")
    return {k: table[k](k, v) for k, v in body.items() if v is not None}


def _common(v: dict, req: GenRequest) -> None:
    req.model = v.get("model")
    req.sampling = {k: v[k] for k in _SAMPLING if k in v}
    req.stop = v.get("stop", [])
    req.n = v.get("n", 1)
    req.stream = v.get("stream", False)
    if "stream_options" in v and not req.stream:
        raise bad("stream_options", "stream_options is only allowed with stream: true")
    req.include_usage = v.get("stream_options", False)
    req.ignore_eos = v.get("ignore_eos", False)
    req.adapter, req.lora = v.get("adapter"), v.get("lora")


# --- chat ---------------------------------------------------------------------------------------------------
_ROLES = {"system", "developer", "user", "assistant", "tool"}
_MESSAGE_KEYS = {"role", "content", "name", "tool_calls", "tool_call_id"}


def messages(name, v) -> list[dict]:
    if not isinstance(v, list) or not v:
        raise bad(name, "invalid messages: must be a non-empty list of message objects")
    return [_message(f"{name}[{i}]", m) for i, m in enumerate(v)]


def _message(name: str, m) -> dict:
    obj(name, m)
    unknown = sorted(set(m) - _MESSAGE_KEYS)
    if unknown:
        raise unsupported(f"{name}.{unknown[0]}")
    role = m.get("role")
    if role not in _ROLES:
        raise bad(f"{name}.role", f"invalid {name}.role {role!r}: must be one of {sorted(_ROLES)}")
    out = {"role": "system" if role == "developer" else role, "content": _content(f"{name}.content", m.get("content"))}
    if out["content"] is None and not (role == "assistant" and m.get("tool_calls")):
        raise bad(f"{name}.content", f"{name} has no content")
    for key in ("name", "tool_call_id"):
        if m.get(key) is not None:
            out[key] = string(f"{name}.{key}", m[key])
    if m.get("tool_calls"):
        out["tool_calls"] = _history_calls(f"{name}.tool_calls", m["tool_calls"])
    return out


def _content(name: str, c) -> str | None:
    """A string, or a list of text parts joined; other part types (images, audio) are unsupported."""
    if c is None or isinstance(c, str):
        return c
    if not isinstance(c, list):
        raise bad(name, f"invalid {name}: must be a string or a list of text parts")
    texts = []
    for i, part in enumerate(c):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"unsupported content part {name}[{i}] of type {kind!r}: kiln serves text models "
                                f"and accepts only {{'type': 'text', 'text': ...}} parts", param=f"{name}[{i}]",
                           code="unsupported_content")
        texts.append(part["text"])
    return "".join(texts)


def _history_calls(name: str, calls) -> list[dict]:
    """Assistant tool calls from earlier turns; arguments become objects, as chat templates expect."""
    import json
    if not isinstance(calls, list):
        raise bad(name, f"invalid {name}: must be a list")
    out = []
    for i, c in enumerate(calls):
        fn = obj(f"{name}[{i}].function", c.get("function") if isinstance(c, dict) else None)
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except (ValueError, RecursionError):
                raise bad(f"{name}[{i}].function.arguments", "tool call arguments must be a JSON string") from None
            if isinstance(args, (dict, list)) and too_deep(args, MAX_DEPTH - 6):  # 6: their depth in a body
                raise bad(f"{name}[{i}].function.arguments", f"tool call arguments may nest at most "
                                                             f"{MAX_DEPTH - 6} levels deep")
        out.append({"id": c.get("id"), "type": "function",
                    "function": {"name": string(f"{name}[{i}].function.name", fn.get("name")), "arguments": args}})
    return out


def tools(name, v) -> list[dict]:
    if not isinstance(v, list) or not v:
        raise bad(name, "invalid tools: must be a non-empty list of {'type': 'function', 'function': {...}}")
    out = []
    for i, t in enumerate(v):
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise bad(f"{name}[{i}]", f"invalid {name}[{i}]: must be {{'type': 'function', 'function': {{...}}}}")
        fn = t["function"]
        string(f"{name}[{i}].function.name", fn.get("name"))
        if fn.get("parameters") is not None:
            obj(f"{name}[{i}].function.parameters", fn["parameters"])
        out.append({"type": "function", "function": {k: v for k, v in fn.items() if v is not None}})
    return out


def tool_choice(name, v):
    if v in ("auto", "none", "required"):
        return v
    fn = v.get("function") if isinstance(v, dict) and v.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise bad(name, "invalid tool_choice: must be 'auto', 'none', 'required' or "
                        "{'type': 'function', 'function': {'name': ...}}")
    return {"type": "function", "function": {"name": fn["name"]}}


def response_format(name, v) -> tuple | None:
    obj(name, v)
    kind = v.get("type")
    extra = sorted(set(v) - {"type", "json_schema"} if kind == "json_schema" else set(v) - {"type"})
    if extra:
        raise unsupported(f"{name}.{extra[0]}")
    if kind == "text":
        return None
    if kind == "json_object":
        return ("json_object",)
    if kind != "json_schema":
        raise bad(f"{name}.type", f"invalid {name}.type {kind!r}: must be 'text', 'json_object' or 'json_schema'")
    js = obj(f"{name}.json_schema", v.get("json_schema"))
    extra = sorted(set(js) - {"name", "schema", "strict", "description"})
    if extra:
        raise unsupported(f"{name}.json_schema.{extra[0]}")
    schema = obj(f"{name}.json_schema.schema", js.get("schema", {}))
    strict = boolean(f"{name}.json_schema.strict", js.get("strict") or False)
    return ("json_schema", schema, strict)


_CHAT = {
    **_COMMON,
    "messages": messages,
    "max_completion_tokens": integer(1),
    "logprobs": boolean,
    "top_logprobs": integer(0, MAX_TOP_LOGPROBS),
    "tools": tools,
    "tool_choice": tool_choice,
    "parallel_tool_calls": boolean,
    "response_format": response_format,
    "grammar": string,  # GBNF, as llama-server takes it
    "regex": string,  # kiln extension: the output matches this regular expression
    "chat_template_kwargs": dict_of_strings,
}


def parse_chat(body) -> ChatRequest:
    v = _check_fields(body, _CHAT, "/v1/chat/completions")
    if "messages" not in v:
        raise bad("messages", "missing required field messages")
    req = ChatRequest(messages=v["messages"])
    _common(v, req)
    req.max_tokens = v.get("max_completion_tokens", v.get("max_tokens"))
    req.logprobs = v.get("logprobs", False)
    req.top_logprobs = v.get("top_logprobs", 0)
    if req.top_logprobs and not req.logprobs:
        raise bad("top_logprobs", "top_logprobs needs logprobs: true")
    req.tools, req.parallel_tool_calls = v.get("tools"), v.get("parallel_tool_calls", True)
    req.tool_choice = v.get("tool_choice", "auto")
    req.chat_template_kwargs = v.get("chat_template_kwargs", {})
    _check_tool_choice(req)
    req.constraint = _constraint(v, req)
    return req


def _check_tool_choice(req: ChatRequest) -> None:
    if isinstance(req.tool_choice, dict):
        names = [t["function"]["name"] for t in req.tools or []]
        if req.tool_choice["function"]["name"] not in names:
            raise bad("tool_choice", f"tool_choice names function {req.tool_choice['function']['name']!r}, "
                                     f"which is not among the tools ({names})")
    elif req.tool_choice == "required" and not req.tools:
        raise bad("tool_choice", "tool_choice 'required' needs a non-empty tools list")


def _constraint(v: dict, req: ChatRequest) -> tuple | None:
    """At most one of: response_format json, grammar, regex, a forced tool call."""
    found = {}
    if v.get("response_format") is not None:
        found["response_format"] = v["response_format"]
    if "grammar" in v:
        found["grammar"] = ("gbnf", v["grammar"])
    if "regex" in v:
        found["regex"] = ("regex", v["regex"])
    if req.tools and (req.tool_choice == "required" or isinstance(req.tool_choice, dict)):
        found["tool_choice"] = ("tool_call",)
    if len(found) > 1:
        a, b = sorted(found)[:2]
        raise bad(b, f"{a} and {b} both constrain the output; give only one of them")
    return next(iter(found.values()), None)


# --- completions ----------------------------------------------------------------------------------------------
def prompt(name, v) -> list:
    """A string, a list of strings, a list of token ids, or a list of lists of token ids."""
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and v and all(_is_int(t) for t in v):
        return [v]
    if isinstance(v, list) and v and all(isinstance(p, str) or (isinstance(p, list) and p and all(_is_int(t) for t in p))
                                         for p in v):
        return v
    raise bad(name, "invalid prompt: must be a string, a list of strings, a non-empty list of token ids, or a list "
                    "of such lists")


def no_suffix(name, v):
    raise unsupported(name, "unsupported field 'suffix': kiln does not do fill-in-the-middle through /v1/completions")


_COMPLETIONS = {
    **_COMMON,
    "prompt": prompt,
    "logprobs": integer(0, 5),
    "echo": boolean,
    "best_of": integer(1, MAX_N),
    "suffix": no_suffix,
}


def parse_completion(body) -> CompletionRequest:
    v = _check_fields(body, _COMPLETIONS, "/v1/completions")
    if "prompt" not in v:
        raise bad("prompt", "missing required field prompt")
    req = CompletionRequest(prompts=v["prompt"], echo=v.get("echo", False))
    _common(v, req)
    req.max_tokens = v.get("max_tokens", 16)  # OpenAI's default for this endpoint
    req.logprobs = "logprobs" in v
    req.top_logprobs = v.get("logprobs") or 0
    if v.get("best_of", req.n) != req.n:
        raise bad("best_of", "best_of must equal n: kiln returns every choice it generates")
    if req.echo and req.logprobs:
        raise bad("echo", "echo with logprobs would need prompt logprobs, which kiln does not compute")
    return req


# --- Response bodies -------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def finite(lp: float) -> float:
    """JSON has no -inf; OpenAI reports impossible tokens as -9999."""
    return lp if math.isfinite(lp) else -9999.0


def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


def chat_logprob(piece: bytes, lp: float, top: list[tuple[bytes, float]]) -> dict:
    """One entry of choices[].logprobs.content."""
    def one(b, p):
        return {"token": b.decode("utf-8", "replace"), "logprob": finite(p), "bytes": list(b)}
    return {**one(piece, lp), "top_logprobs": [one(b, p) for b, p in top]}


def legacy_logprobs(entries: list[dict], offset: int) -> dict:
    """The completions endpoint's shape, from chat-shaped entries; text_offset counts characters from `offset`."""
    offsets, at = [], offset
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


def chunk(kind: str, rid: str, created: int, model: str, choices: list[dict], usage_: dict | None = None,
          with_usage: bool = False) -> dict:
    """One SSE event body; kind is "chat.completion.chunk" or "text_completion"."""
    body = {"id": rid, "object": kind, "created": created, "model": model, "system_fingerprint": FINGERPRINT,
            "choices": choices}
    if with_usage:
        body["usage"] = usage_
    return body
