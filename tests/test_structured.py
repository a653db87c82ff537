"""Tests for kiln/server/structured.py: constrained output always parses and validates.

Owns: JSON schemas (>= 10, varied), json_object, GBNF, regex and forced tool calls, each driven two ways: a
random walk over the tokens the constraint allows (no model: many shapes cheaply) and the real Qwen model's greedy
decoding on CPU (all requests at once through the server's engine, so the model's weights are read once per step
for all of them); outputs checked by independent readers (json + jsonschema, re.fullmatch, a hand-written
expression parser, tools.parse_tool_calls + jsonschema); the bitmask fast path against its torch twin and the bit
layout; vocabulary details (control tokens, padded logits, end tokens); error messages; the compile cache.
Not: the engine's own batching and sampling (tests/test_engine.py) or the HTTP fields (tests/test_server.py).
"""

import json
import random
import re

import jsonschema
import numpy as np
import pytest
import torch

from kiln.errors import KilnError
from kiln.server.structured import Structured, apply_bitmask, apply_bitmask_torch, gbnf_to_ebnf
from kiln.server.tools import ToolStreamParser, parse_tool_calls


# --- fixtures and helpers ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok(qwen_path):
    from kiln.formats.gguf import read_gguf
    from kiln.tokenizer import Tokenizer
    return Tokenizer.from_gguf(read_gguf(qwen_path).meta)


@pytest.fixture(scope="module")
def structured(tok):
    return Structured(tok, vocab_size=151936)  # Qwen2.5's embedding rows


def allowed_ids(proc, vocab: int) -> np.ndarray:
    logits = np.zeros(vocab, dtype=np.float32)  # numpy's zeros: no torch thread pool on a busy machine
    proc.mask(torch.from_numpy(logits))
    return np.flatnonzero(logits == 0)


_STRUCTURAL = set('{}[],:"0123456789.- \n')


def walk(tok, constraint, vocab=151936, seed=0, max_steps=300) -> str:
    """Decode by picking random allowed tokens (mostly short structural ones, so strings end) until the end token."""
    rng, proc, out = random.Random(seed), constraint.processor(), []
    short = _structural(tok, vocab)
    for _ in range(max_steps):
        ids = allowed_ids(proc, vocab)
        assert len(ids), "the constraint allows nothing"
        stops = ids[np.isin(ids, list(tok.eos_token_ids))]
        preferred = ids[short[ids]]
        if len(stops) and rng.random() < 0.5:
            token = int(stops[0])
        elif len(preferred) and rng.random() < 0.8:
            token = int(preferred[rng.randrange(len(preferred))])
        else:
            token = int(ids[rng.randrange(len(ids))])
        proc.accept(token)
        if token in tok.eos_token_ids:
            assert proc.is_terminated()
            return tok.decode(out)
        out.append(token)
    raise AssertionError(f"no end after {max_steps} tokens: {tok.decode(out)!r}")


_SHORT = {}


def _structural(tok, vocab: int) -> np.ndarray:
    """(vocab,) bool: tokens of at most 3 characters, all JSON punctuation, digits or whitespace."""
    if (id(tok), vocab) not in _SHORT:
        flags = [bool(p) and len(p) <= 3 and set(p.decode("latin-1")) <= _STRUCTURAL
                 for p in (tok.id_to_bytes(i) for i in range(tok.vocab_size))]
        _SHORT[id(tok), vocab] = np.array(flags + [False] * (vocab - tok.vocab_size))
    return _SHORT[id(tok), vocab]


def run_batch(qwen, jobs: dict) -> dict:
    """The real model's greedy replies to all `jobs` at once, through the server's engine (one batched decode):
    {name: (messages, constraint, tools, max_tokens)} → {name: (text, finish_reason)}."""
    from kiln.sample import SamplingParams
    from kiln.engine import Engine, EngineRequest
    model, tok = qwen
    engine = Engine(model, tok, n_slots=len(jobs), ctx_size=640)
    engine.start()
    try:
        handles = {}
        for name, (messages, constraint, tools, max_tokens) in jobs.items():
            ids = tok.encode(tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True),
                             add_special_tokens=False)
            handles[name] = engine.submit(EngineRequest(
                prompt=ids, params=SamplingParams(temperature=0.0), max_tokens=max_tokens,
                stop_token_ids=frozenset(tok.eos_token_ids), processor=constraint.processor()))
        out = {}
        for name, h in handles.items():
            steps = list(h.sync())
            out[name] = tok.decode([o.token for o in steps if not o.is_stop]), steps[-1].finish_reason
        return out
    finally:
        engine.stop()


def closed(schema):
    """`schema` with additionalProperties: false on every object that lists properties (what strict enforces)."""
    if isinstance(schema, dict):
        out = {k: closed(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    return [closed(v) for v in schema] if isinstance(schema, list) else schema


def check_json(text: str, schema, strict=True):
    value = json.loads(text)
    jsonschema.validate(value, closed(schema) if strict else schema, format_checker=jsonschema.FormatChecker())
    return value


# --- JSON schemas -------------------------------------------------------------------------------------------------
SCHEMAS = [  # (schema, a request the model can answer in a few tokens)
    ({"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                       "age": {"type": "integer", "minimum": 0, "maximum": 120}},
      "required": ["name", "age"]}, "Alice is 30 years old. Give her as JSON."),
    ({"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 999},
        "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}}, "required": ["id", "email"]}},
      "required": ["user"]}, "A user record: id 7, email bob@mail.com."),
    ({"type": "object", "properties": {"colors": {"type": "array", "items": {
        "type": "string", "enum": ["red", "green", "blue", "yellow"]}, "minItems": 2, "maxItems": 3}},
      "required": ["colors"]}, "List two primary colors."),
    ({"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]}},
      "required": ["sentiment"]}, "Sentiment of: 'I love this phone!'"),
    ({"type": "object", "properties": {"temperature": {"type": "number", "minimum": -50, "maximum": 60},
                                       "unit": {"const": "celsius"}},
      "required": ["temperature", "unit"]}, "Typical summer temperature in Madrid?"),
    ({"type": "object", "properties": {"title": {"type": "string", "minLength": 3, "maxLength": 30},
                                       "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
                                       "rating": {"type": "number"}},
      "required": ["title"]}, "Name a famous movie."),
    ({"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 100}, "minItems": 3, "maxItems": 5},
     "The first four prime numbers."),
    ({"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}, "valid": {"type": "boolean"}},
      "required": ["zip", "valid"]}, "The zip code of Beverly Hills."),
    ({"type": "object", "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
        "type": "object", "properties": {"sku": {"type": "string", "maxLength": 8},
                                         "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["sku", "qty"]}}}, "required": ["items"]}, "An order: 2 of item A1."),
    ({"type": "object", "properties": {"answer": {"anyOf": [{"type": "integer"}, {"type": "null"}]}},
      "required": ["answer"]}, "What is 6 times 7?"),
    ({"type": "object", "properties": {"point": {"type": "array", "prefixItems": [
        {"type": "number", "minimum": -90, "maximum": 90}, {"type": "number", "minimum": -180, "maximum": 180}],
        "items": False}}, "required": ["point"]}, "Latitude and longitude of the Eiffel Tower."),
]
IDS = [f"schema{k}" for k in range(len(SCHEMAS))]


@pytest.mark.parametrize("schema", [s for s, _ in SCHEMAS], ids=IDS)
def test_json_schema_random_walks_validate(tok, structured, schema):
    c = structured.json_schema(schema)
    for seed in range(3):
        check_json(walk(tok, c, seed=seed), schema)


@pytest.mark.model
@pytest.mark.parametrize("k", range(len(SCHEMAS)), ids=IDS)
def test_json_schema_real_model_validates(replies, k):
    text, finish = replies[f"schema{k}"]
    assert finish == "stop", text  # the constraint completed, and the model ended there
    check_json(text, SCHEMAS[k][0])


def test_strict_and_loose_schemas(tok, structured):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    strict, loose = structured.json_schema(schema), structured.json_schema(schema, strict=False)
    extra = '{"a": 1, "b": 2}'
    assert not _accepts(tok, strict, extra) and _accepts(tok, loose, extra)
    assert _accepts(tok, strict, '{"a": 1}')


def _accepts(tok, constraint, text: str) -> bool:
    """Whether `text` (as kiln tokenizes it), then the end token, passes the constraint."""
    proc = constraint.processor()
    for t in tok.encode(text, add_special_tokens=False) + [tok.token_to_id("<|im_end|>")]:
        if t not in allowed_ids(proc, 151936):
            return False
        proc.accept(t)
    return proc.is_terminated()


def test_json_object_walks_give_objects(tok, structured):
    for seed in range(3):
        assert isinstance(json.loads(walk(tok, structured.json_object(), seed=seed)), dict)


# --- GBNF and regex -----------------------------------------------------------------------------------------------
ARITH = """
# arithmetic, llama.cpp style: comments, multi-line rules, dashes in names, {m,n}
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= number | "(" expr ")"
number ::= [1-9] [0-9]{0,2}
"""


def parse_arith(s: str) -> bool:
    """A hand-written recursive-descent reader for ARITH's language."""
    pos = 0

    def expr():
        nonlocal pos
        term()
        while pos < len(s) and s[pos] in "+-":
            pos += 1
            term()

    def term():
        nonlocal pos
        factor()
        while pos < len(s) and s[pos] in "*/":
            pos += 1
            factor()

    def factor():
        nonlocal pos
        if s[pos:pos + 1] == "(":
            pos += 1
            expr()
            assert s[pos] == ")"
            pos += 1
        else:
            m = re.match(r"[1-9][0-9]{0,2}", s[pos:])
            assert m
            pos += m.end()

    try:
        expr()
    except (AssertionError, IndexError):
        return False
    return pos == len(s)


def test_gbnf_random_walks(tok, structured):
    arith = structured.gbnf(ARITH)
    for seed in range(4):
        assert parse_arith(walk(tok, arith, seed=seed))
    kv = structured.gbnf('root ::= pair ("," pair){0,2}\npair ::= key-name "=" value\nkey-name ::= [a-z]{1,5}\n'
                         'value ::= [0-9]{1,4} | "\\"" [^"\\n]{0,6} "\\""')
    for seed in range(4):
        assert re.fullmatch(r'[a-z]{1,5}=([0-9]{1,4}|"[^"\n]{0,6}")(,[a-z]{1,5}=([0-9]{1,4}|"[^"\n]{0,6}")){0,2}',
                            walk(tok, kv, seed=seed))


def test_gbnf_dot_is_any_character(tok, structured):
    assert gbnf_to_ebnf('root ::= "a.b" [.] . # end.') == 'root ::= "a.b" [.] [\\0-\\U0010ffff] # end.'
    c = structured.gbnf('root ::= "<" . . ">"  # two characters of any kind')
    for seed in range(4):
        assert re.fullmatch(r"<..>", walk(tok, c, seed=seed), re.S)
    assert _accepts(tok, c, "<é😀>") and not _accepts(tok, c, "<abc>")


def test_regex_random_walks(tok, structured):
    pattern = r"(cat|dog)s? [0-9]{2,3}( [A-Z][a-z]{0,4})?"
    for seed in range(4):
        assert re.fullmatch(pattern, walk(tok, structured.regex(pattern), seed=seed))


@pytest.mark.model
def test_gbnf_and_regex_real_model(replies):
    assert replies["yes_no"] == ("yes", "stop")
    expr, finish = replies["arith"]
    assert finish == "stop" and parse_arith(expr)
    date, finish = replies["date"]
    assert finish == "stop" and re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", date)


# --- tool calls -----------------------------------------------------------------------------------------------------
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string", "maxLength": 20},
                                          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                                          "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time in a time zone",
                                      "parameters": {"type": "object", "properties": {
                                          "tz": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}/[A-Z][a-z]{1,8}$"}},
                                          "required": ["tz"]}}},
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def check_calls(text, style, names, parallel, tok=None):
    content, calls = parse_tool_calls(text, style)
    assert content == "" and calls and (parallel or len(calls) == 1), text
    for call in calls:
        assert call.name in names
        jsonschema.validate(json.loads(call.arguments), closed(PARAMS[call.name]))
    if tok is not None:  # streamed token by token, the same calls
        parser, events = ToolStreamParser(style), []
        for t in tok.encode(text, add_special_tokens=False):
            events += parser.feed(tok.id_to_piece(t))
        events += parser.finish()
        args = {}
        for e in events:
            assert type(e).__name__ != "ContentDelta", e
            if type(e).__name__ == "ToolArgsDelta":
                args[e.index] = args.get(e.index, "") + e.text
        assert [args[i] for i in sorted(args)] == [c.arguments for c in calls]
    return calls


@pytest.mark.parametrize("style", ["hermes", "llama3", "mistral"])
@pytest.mark.parametrize("parallel", [False, True])
def test_tool_call_random_walks_parse_and_validate(tok, structured, style, parallel):
    required = structured.tool_call(TOOLS, "required", style, parallel=parallel)
    named = structured.tool_call(TOOLS, {"type": "function", "function": {"name": "get_time"}}, style, parallel)
    seen = set()
    for seed in range(3):
        seen |= {c.name for c in check_calls(walk(tok, required, seed=seed), style, set(PARAMS), parallel, tok)}
        check_calls(walk(tok, named, seed=seed), style, {"get_time"}, parallel)
    assert seen <= set(PARAMS)


@pytest.mark.model
def test_tool_call_real_model(qwen, replies):
    text, finish = replies["tool_required"]
    [call] = check_calls(text, "hermes", set(PARAMS), False, qwen[1])
    assert finish == "stop" and call.name == "get_weather" and json.loads(call.arguments)["city"] == "Paris"
    text, finish = replies["tool_named"]  # a weather question, but the time tool is forced
    assert finish == "stop" and check_calls(text, "hermes", {"get_time"}, False)[0].name == "get_time"


# --- every real-model request of this file, decoded together ------------------------------------------------------
@pytest.fixture(scope="module")
def replies(qwen):
    c = Structured(qwen[1], vocab_size=qwen[0].args.vocab_size)
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    jobs = {f"schema{k}": ([{"role": "system", "content": "Answer in JSON only."}, *user(ask)],
                           c.json_schema(schema), None, 60) for k, (schema, ask) in enumerate(SCHEMAS)}
    weather = user("What's the weather like in Paris right now?")
    jobs.update(
        yes_no=(user("Is Paris the capital of France? Answer yes or no."), c.gbnf('root ::= "yes" | "no"'), None, 5),
        arith=(user("Write an arithmetic expression that equals 10."), c.gbnf(ARITH), None, 20),
        date=(user("When did the Berlin Wall fall? Answer as YYYY-MM-DD."), c.regex(r"[0-9]{4}-[0-9]{2}-[0-9]{2}"),
              None, 15),
        tool_required=(weather, c.tool_call(TOOLS, "required", "hermes"), TOOLS, 60),
        tool_named=(weather, c.tool_call(TOOLS, {"type": "function", "function": {"name": "get_time"}}, "hermes"),
                    TOOLS, 60))
    return run_batch(qwen, jobs)


# --- masks, vocabulary, end tokens ------------------------------------------------------------------------------------
def test_apply_bitmask_fast_path_and_torch_twin_match_bit_by_bit():
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(-2 ** 31, 2 ** 31 - 1, (7,), dtype=torch.int32, generator=gen)
    logits = torch.randn(7 * 32 + 9, generator=gen)  # padded past the bitmask
    fast, twin = logits.clone(), logits[:7 * 32].clone()
    apply_bitmask(fast, words)
    apply_bitmask_torch(twin, words)
    bits = [(int(words[j // 32]) >> (j % 32)) & 1 for j in range(7 * 32)]  # the bit layout, spelled out
    assert torch.isinf(twin).tolist() == [b == 0 for b in bits]
    assert torch.equal(fast[:7 * 32], twin) and torch.isinf(fast[7 * 32:]).all()


def test_vocabulary_control_tokens_padding_and_end(tok):
    vocab = tok.vocab_size + 64  # an embedding padded past the tokenizer
    s = Structured(tok, vocab_size=vocab)
    im_start, im_end, tool_open = (tok.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<tool_call>"))
    proc = s.json_object().processor()
    ok = allowed_ids(proc, vocab)
    assert ok.max() < tok.vocab_size and im_start not in ok and im_end not in ok  # no end before the JSON is whole
    for t in tok.encode('{"a": [1, "x"]}', add_special_tokens=False):
        proc.accept(t)
    assert im_end in allowed_ids(proc, vocab)
    proc.accept(im_end)
    assert proc.is_terminated()
    assert set(allowed_ids(proc, vocab).tolist()) == set(s.stop_ids)  # after the end: only end tokens
    assert tool_open in allowed_ids(s.tool_call(TOOLS, "required", "hermes").processor(), vocab)  # a marker: kept
    with pytest.raises(KilnError, match="does not fit the output constraint"):
        s.json_object().processor().accept(tok.encode("x", add_special_tokens=False)[0])


def test_compile_cache(tok):
    s = Structured(tok, cache_size=2)
    a = s.json_schema({"type": "integer"})
    assert s.json_schema({"type": "integer"}) is a
    assert s.json_schema({"type": "integer"}, strict=False) is not a
    s.regex("a+")
    assert s.json_schema({"type": "integer"}) is not a and len(s._cache) == 2  # the oldest entry went


# --- errors ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,match", [
    (lambda s: s.json_schema({"type": "foo"}), 'invalid JSON schema: .*"foo"'),
    (lambda s: s.json_schema({"type": "integer", "minimum": 5, "maximum": 1}), "invalid JSON schema: .*minimum"),
    (lambda s: s.json_schema({"$ref": "#/$defs/missing"}), "invalid JSON schema"),
    (lambda s: s.json_schema('{"type": "object"}'), "must be an object"),
    (lambda s: s.json_schema({"type": "number", "minimum": float("nan")}), "not plain JSON"),
    (lambda s: s.gbnf("root ::= foo"), 'invalid GBNF grammar: .*"foo" is not defined'),
    (lambda s: s.gbnf('rot ::= "a"'), 'invalid GBNF grammar: .*root'),
    (lambda s: s.gbnf('root ::= [a-'), "invalid GBNF grammar: .*line 1"),
    (lambda s: s.gbnf("root ::= <[151645]>"), "token references .* not supported"),
    (lambda s: s.gbnf("  "), "non-empty string"),
    (lambda s: s.regex("(ab"), "invalid regex: .*parenthesis"),
    (lambda s: s.gbnf("root ::= root"), "matches no text at all"),  # was a 500 at the first token
    (lambda s: s.gbnf('root ::= "a" x\nx ::= x'), "invalid GBNF grammar: it matches no text"),
    (lambda s: s.regex("[^\\s\\S]"), "invalid regex: it matches no text"),
    (lambda s: s.tool_call(TOOLS, {"type": "function", "function": {"name": "nope"}}, "hermes"),
     "'nope', which is not among the tools"),
    (lambda s: s.tool_call(TOOLS, "auto", "hermes"), "does not force a call"),
    (lambda s: s.tool_call(TOOLS, "required", "xml"), "unknown tool-call style"),
    (lambda s: s.tool_call([], "required", "hermes"), "non-empty list"),
    (lambda s: s.tool_call([{"type": "function", "function": {}}], "required", "hermes"), r"tools\[0\] has no"),
    (lambda s: s.tool_call([{"function": {"name": "f", "parameters": {"type": "bogus"}}}], "required", "hermes"),
     "invalid tool parameters schema"),
])
def test_errors_name_the_problem(structured, make, match):
    with pytest.raises(KilnError, match=match):
        make(structured)


@pytest.mark.parametrize("grammar", ['root ::= [a-z]+ "."', 'root ::= "x" root | "y"'])
def test_grammars_that_match_something_are_kept(tok, structured, grammar):
    """The emptiness search proves only emptiness: these compile, and a random walk ends where they can end."""
    text = walk(tok, structured.gbnf(grammar))
    assert re.fullmatch(r"[a-z]+\.|x*y", text), text
    structured.gbnf('root ::= "a" | "b" x\nx ::= x')  # one way out beside a dead end is still a language
