"""Tests for kiln/server/tools.py: tool-call formats, whole-text parsing, and streaming equal to whole-text parsing.

Owns: hand-written replies in the three formats (hermes, llama3, mistral) with their expected content and calls;
random calls (json.dumps of random objects, loosely re-spaced and escaped) against the objects they were made from;
streaming in every split of short replies and random splits of long ones against the whole-text parse (which is
the same parser fed everything at once); format detection from real and hand-made tokenizers.
Not: constraining the model to write calls (tests/test_structured.py), the HTTP shapes (tests/test_server.py).
"""

import json
import random

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import models

from kiln.errors import KilnError
from kiln.server.tools import (ContentDelta, ToolArgsDelta, ToolCallStart, ToolStreamParser, parse_tool_calls,
                               tool_style)
from kiln.tokenizer import Tokenizer


def compact(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def full(text, style):
    content, calls = parse_tool_calls(text, style)
    return content, [(c.name, c.arguments) for c in calls]


def streamed(text, style, cuts=()):
    """(content, [(name, arguments)]) from feeding `text` cut at `cuts`; checks the events' own invariants."""
    parser, events, prev = ToolStreamParser(style), [], 0
    for cut in [*sorted(cuts), len(text)]:
        events += parser.feed(text[prev:cut])
        prev = cut
    events += parser.finish()
    content, calls, ids = "", {}, set()
    for e in events:
        if isinstance(e, ContentDelta):
            content += e.text
        elif isinstance(e, ToolCallStart):
            assert e.index == len(calls) and e.id.startswith("call_") and e.id not in ids
            calls[e.index] = [e.name, ""]
            ids.add(e.id)
        else:
            assert isinstance(e, ToolArgsDelta) and e.index in calls and e.index == max(calls)
            calls[e.index][1] += e.text
    return content, [tuple(calls[i]) for i in sorted(calls)]


def assert_stream_matches(text, style, n_random=40, seed=0, every_split=True):
    want = full(text, style)
    splits = [[k] for k in range(len(text) + 1)] if every_split else []
    splits.append(range(1, len(text)))  # one character at a time
    rng = random.Random(seed)
    for _ in range(n_random):
        splits.append(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
    for cuts in splits:
        assert streamed(text, style, cuts) == want, (style, text, cuts)
    return want


ARGS = {"city": "Paris", "days": 3, "units": ["c", "f"], "deep": {"x": None, "y": [1.5, -2e-3, True]}}
W = compact(ARGS)

# (style, reply, expected content, expected [(name, arguments)])
CASES = [
    # --- hermes (Qwen2.5) ---
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": ' + json.dumps(ARGS, indent=2) + '}\n</tool_call>',
     "", [("get_weather", W)]),
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n'
               '<tool_call>{"name":"b","arguments":{"q":"x y"}}</tool_call>\n',
     "Let me check.", [("a", "{}"), ("b", '{"q":"x y"}')]),
    ("hermes", '  <tool_call>  {"arguments": {"z": 1}, "name": "late_name"}  </tool_call>  done  ',
     "done  ", [("late_name", '{"z":1}')]),
    ("hermes", '<tool_call>{"name": "s", "arguments": "{\\"k\\": [1, 2]}"}</tool_call>', "", [("s", '{"k":[1,2]}')]),
    ("hermes", '<tool_call>{"name": "noargs"}</tool_call>', "", [("noargs", "{}")]),
    ("hermes", '<tool_call>{"name": "p", "parameters": {"a": 1}, "id": "x"}}}</tool_call>', "", [("p", '{"a":1}')]),
    ("hermes", '<tool_call>\n{"name": "unclosed", "arguments": {"a": "</tool_call> inside"}}', "",
     [("unclosed", '{"a":"</tool_call> inside"}')]),
    ("hermes", "no calls here, just <tool text and </tool_call> ", "no calls here, just <tool text and </tool_call> ",
     []),
    ("hermes", 'a <tool_call>{"name": oops}</tool_call> b <tool_call>{"name": "ok", "arguments": {}}</tool_call>',
     'a <tool_call>{"name": oops}</tool_call> b', [("ok", "{}")]),
    ("hermes", 'x <tool_call>not json</tool_call>', 'x <tool_call>not json</tool_call>', []),
    ("hermes", 'x <tool_call>{"arguments": {}}</tool_call> y', 'x <tool_call>{"arguments": {}}</tool_call> y', []),
    ("hermes", '<tool_call>{"name": "", "arguments": {}}</tool_call>', '<tool_call>{"name": "", "arguments": {}}'
                                                                      '</tool_call>', []),
    ("hermes", '<tool_call>{"name": "n", "arguments": [1]}</tool_call>', '<tool_call>{"name": "n", "arguments": [1]}'
                                                                          '</tool_call>', []),
    ("hermes", '<tool_call>{"name": "n", "arguments": NaN}</tool_call>', '<tool_call>{"name": "n", "arguments": NaN}'
                                                                          '</tool_call>', []),
    ("hermes", 'trailing <tool_call> {"name"', 'trailing <tool_call> {"name"', []),
    ("hermes", 'esc <tool_call>{"name": "e", "arguments": {"s": "\\u00e9\\ud83d\\ude00\\n\\t\\"\\\\\\/", '
               '"n": [1E2, -0.0, 0.5e+1, 12345678901234567890], "raw": "line\nbreak"}}</tool_call>', "esc",
     [("e", compact({"s": "é😀\n\t\"\\/", "n": [100.0, -0.0, 5.0, 12345678901234567890], "raw": "line\nbreak"}))]),
    # --- llama3 (Llama 3.1 / 3.2) ---
    ("llama3", '{"name": "get_weather", "parameters": ' + json.dumps(ARGS) + '}', "", [("get_weather", W)]),
    ("llama3", '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}',
     "", [("a", '{"x":1}'), ("b", "{}")]),
    ("llama3", '\n {"type": "function", "name": "t", "arguments": {"q": "z"}}\nThat is all.', "That is all.",
     [("t", '{"q":"z"}')]),
    ("llama3", '{"name": "Bob", "age": 3}', '{"name": "Bob", "age": 3}', []),
    ("llama3", 'The answer is {"name": "f", "parameters": {}}', 'The answer is {"name": "f", "parameters": {}}', []),
    ("llama3", '<|python_tag|>brave_search.call(query="x")', '<|python_tag|>brave_search.call(query="x")', []),
    ("llama3", '{"name": "a", "parameters": {}} {"oops": 1}', '{"oops": 1}', [("a", "{}")]),
    ("llama3", '  <|python', '  <|python', []),
    # --- mistral ---
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": ' + json.dumps(ARGS) + '}]', "",
     [("get_weather", W)]),
    ("mistral", 'Sure! [TOOL_CALLS][{"name": "a", "arguments": {"x": 1}, "id": "abcdefghi"}, '
                '{"name": "b", "arguments": "{}"}] ', "Sure!", [("a", '{"x":1}'), ("b", "{}")]),
    ("mistral", '[TOOL_CALLS] hello', '[TOOL_CALLS] hello', []),
    ("mistral", '[TOOL_CALLS][{"nom": "a"}]', '[TOOL_CALLS][{"nom": "a"}]', []),
    ("mistral", '[TOOL_CALLS][{"name": "a", "arguments": {}}, {"bad": 1}]', '{"bad": 1}]', [("a", "{}")]),
    ("mistral", '[TOOL_CALLS][{"name": "a", "arguments": {}} junk', 'junk', [("a", "{}")]),
    ("mistral", 'x [TOOL_CALLS] [] y', 'x  y', []),
    ("mistral", 'no marker [TOOL', 'no marker [TOOL', []),
]


@pytest.mark.parametrize("style,text,content,calls", CASES)
def test_parse_hand_written(style, text, content, calls):
    assert full(text, style) == (content, calls)
    for _, args in calls:
        assert compact(json.loads(args)) == args  # compact, re-serialized


@pytest.mark.parametrize("style,text,content,calls", CASES)
def test_stream_equals_full_parse_at_every_split(style, text, content, calls):
    assert assert_stream_matches(text, style, n_random=10) == (content, calls)


def test_call_ids_are_unique():
    _, calls = parse_tool_calls('<tool_call>{"name": "a"}</tool_call><tool_call>{"name": "a"}</tool_call>', "hermes")
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


def _random_json(rng, depth=0):
    kind = rng.choice("sifbnao" if depth < 3 else "sifbn")
    if kind == "s":
        return "".join(rng.choice(['a', ' ', 'é', '"', '\\', '\n', '😀', '/', '<', '}', ']', ',', '\x01'])
                       for _ in range(rng.randint(0, 6)))
    if kind == "i":
        return rng.randint(-10 ** rng.randint(0, 20), 10 ** rng.randint(0, 20))
    if kind == "f":
        return rng.uniform(-1e6, 1e6) * 10 ** rng.randint(-30, 30)
    if kind in "bn":
        return rng.choice([True, False, None])
    if kind == "a":
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {f"k{rng.randint(0, 99)}": _random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def _loose_dumps(rng, obj):
    """JSON text with random whitespace and random escape choices."""
    ws = lambda: rng.choice(["", " ", "\n  ", "\t"])  # noqa: E731
    if isinstance(obj, dict):
        return "{" + ws() + ("," + ws()).join(f'{_loose_dumps(rng, k)}{ws()}:{ws()}{_loose_dumps(rng, v)}'
                                              for k, v in obj.items()) + ws() + "}"
    if isinstance(obj, list):
        return "[" + ws() + ("," + ws()).join(_loose_dumps(rng, v) for v in obj) + ws() + "]"
    return json.dumps(obj, ensure_ascii=rng.random() < 0.5)


@pytest.mark.parametrize("style", ["hermes", "llama3", "mistral"])
def test_stream_equals_full_parse_on_random_calls(style):
    rng = random.Random(hash(style) % 1000)
    for trial in range(25):
        objs = [{"name": f"fn_{k}", "arguments" if style != "llama3" else "parameters":
                 {f"p{j}": _random_json(rng) for j in range(rng.randint(0, 4))}} for k in range(rng.randint(1, 3))]
        bodies = [_loose_dumps(rng, o) for o in objs]
        if style == "hermes":
            text = "Intro text.\n" + "\n".join(f"<tool_call>\n{b}\n</tool_call>" for b in bodies)
        elif style == "llama3":
            text = "<|python_tag|>" + "; ".join(bodies)
        else:
            text = "[TOOL_CALLS] [" + ", ".join(bodies) + "]"
        content, calls = assert_stream_matches(text, style, n_random=20, seed=trial, every_split=False)
        key = "parameters" if style == "llama3" else "arguments"
        assert calls == [(o["name"], compact(o[key])) for o in objs]
        assert content == ("Intro text." if style == "hermes" else "")


def test_stream_commits_early_and_streams_arguments():
    """The call starts as soon as its name is known; arguments arrive piece by piece, before the call ends."""
    text = '<tool_call>\n{"name": "write", "arguments": {"text": "' + "word " * 20 + '"}}\n</tool_call>'
    parser = ToolStreamParser("hermes")
    seen_start_at, arg_events = None, 0
    for k in range(0, len(text), 4):
        for e in parser.feed(text[k:k + 4]):
            if isinstance(e, ToolCallStart):
                seen_start_at = k
            arg_events += isinstance(e, ToolArgsDelta)
    parser.finish()
    assert seen_start_at is not None and seen_start_at < text.index('"text"')
    assert arg_events > 10


def test_marker_prefix_is_held_back():
    parser = ToolStreamParser("hermes")
    assert parser.feed("Hello <tool") == [ContentDelta("Hello")]
    assert parser.feed("_c") == []
    events = parser.feed('all>{"name": "f", "arguments": {}}</tool_call>')
    assert [type(e) for e in events] == [ToolCallStart, ToolArgsDelta] and events[1].text == "{}"
    assert parser.finish() == []
    parser = ToolStreamParser("hermes")
    assert parser.feed("a <tool") == [ContentDelta("a")]
    assert parser.feed("box") == [ContentDelta(" <toolbox")]  # not a marker after all: nothing lost
    assert parser.finish() == []


def test_a_call_broken_after_it_started_stays_a_call():
    """Once started, a call cannot be taken back (it has been streamed); a whole reply reads the same."""
    for text in ['<tool_call>{"name": "f", "arguments": {"a": 1, "b": tru', '<tool_call>{"name": "f", "arguments": '
                 '{"a": 1, "b": tru}}</tool_call> after']:
        assert assert_stream_matches(text, "hermes") == ("after" if "after" in text else "", [("f", '{"a":1,"b":')])
    text = '[TOOL_CALLS][{"name": "f", "arguments": {"a": [1, 2'  # cut off mid-call (max_tokens)
    assert assert_stream_matches(text, "mistral") == ("", [("f", '{"a":[1,')])  # a number only once it ends
    text = '{"name": "f", "parameters": {"a": 1, "a": 2}}'  # duplicate keys: both, in both readings
    assert assert_stream_matches(text, "llama3") == ("", [("f", '{"a":1,"a":2}')])


def test_unknown_style():
    with pytest.raises(KilnError, match="unknown tool-call style"):
        parse_tool_calls("x", "xml")
    with pytest.raises(KilnError, match="unknown tool-call style"):
        ToolStreamParser("json")


# --- format detection ------------------------------------------------------------------------------------------
def _tokenizer(template: str | None, tokens=("a",)) -> Tokenizer:
    backend = Backend(models.WordLevel({t: i for i, t in enumerate(["<unk>", *tokens])}, unk_token="<unk>"))
    return Tokenizer(backend, pieces=None, special_ids=[], bos_token_id=None, eos_token_id=None, eos_token_ids=[],
                     add_bos=False, chat_templates={"default": template} if template else None)


def test_tool_style_from_real_tokenizer(qwen_path):
    from kiln.formats.gguf import read_gguf
    assert tool_style(Tokenizer.from_gguf(read_gguf(qwen_path).meta)) == "hermes"  # Qwen2.5: <tool_call> blocks


def test_tool_style_from_templates_and_tokens():
    llama = ('{%- if builtin_tools is defined %}{{- "<|python_tag|>" }}{%- endif %}'
             '{{- "Respond in the format {\\"name\\": function name, \\"parameters\\": dictionary}" }}')
    assert tool_style(_tokenizer(llama)) == "llama3"
    assert tool_style(_tokenizer("{{ '[TOOL_CALLS]' + tool_calls|tojson }}")) == "mistral"
    assert tool_style(_tokenizer("{% for t in tools %}<tool_call>{{ t }}</tool_call>{% endfor %}")) == "hermes"
    assert tool_style(_tokenizer(None, tokens=("[TOOL_CALLS]",))) == "mistral"
    assert tool_style(_tokenizer(None, tokens=("<|python_tag|>",))) == "llama3"
    assert tool_style(_tokenizer("{{ messages }}")) == "hermes"
