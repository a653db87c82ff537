"""Tool calls in generated text: which format a model family writes, and reading calls out of it.

Owns: `tool_style(tokenizer)`, `ToolStreamParser` (calls read delta by delta), `parse_tool_calls` (a whole reply:
the stream parser fed all of it, so the two cannot disagree) and their value types.
Not: forcing a call (structured.py writes grammars for these formats), OpenAI shapes (app.py), putting the tools
into the prompt (the chat template).

Formats (style names):
  hermes   Qwen2.5, Hermes, kiln's default: <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>, any
           number of blocks anywhere; a block ends at </tool_call> (or the text's end); text after its JSON
           object inside the block is ignored.
  llama3   Llama 3.1 / 3.2: {"name": "f", "parameters": {...}} at the start of the reply, optionally after
           <|python_tag|>; several calls separated by whitespace or ";".
  mistral  [TOOL_CALLS] [{"name": "f", "arguments": {...}}, ...] (the JSON-list form, before v11 tokenizers).
Rules: a call is a JSON object with a non-empty string "name" and, as arguments, the first of "arguments" /
"parameters" (required for llama3, `{}` when absent elsewhere), an object or a string holding one; other keys
are ignored. `arguments` is that object re-serialized compactly (json.dumps(obj, ensure_ascii=False,
separators=(",", ":"))). Text that is not a valid call stays in the content verbatim; whitespace touching a call
is dropped. A call is committed (ToolCallStart) once its name is complete and its arguments object has begun,
and cannot be taken back: one that breaks later (invalid JSON, a reply cut off) stays a call with the arguments
read so far, in a stream and a whole reply alike (as OpenAI's cut-off replies do); duplicate keys are kept.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from kiln.errors import KilnError

STYLES = ("hermes", "llama3", "mistral")
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MISTRAL_MARK = "[TOOL_CALLS]"
_WS = " \t\n\r"  # JSON's whitespace
_ARG_KEYS = ("arguments", "parameters")


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # compact JSON text of an object


@dataclass
class ContentDelta:
    text: str


@dataclass
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass
class ToolArgsDelta:
    index: int
    text: str


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


# --- Which format ----------------------------------------------------------------------------------------------
_TEMPLATE_SIGNS = (("hermes", ("<tool_call>",)), ("mistral", ("[TOOL_CALLS]",)),
                   ("llama3", ("<|python_tag|>", "<|eom_id|>", '"parameters": dictionary')))
_TOKEN_SIGNS = (("mistral", "[TOOL_CALLS]"), ("llama3", "<|python_tag|>"), ("hermes", "<tool_call>"))


def tool_style(tokenizer) -> str:
    """The tool-call format this model writes: read from its chat templates, then its special tokens;
    "hermes" (the most common format) when neither says."""
    templates = "\n".join(t for t in (getattr(tokenizer, "chat_templates", None) or {}).values() if t)
    templates = templates or (getattr(tokenizer, "chat_template", None) or "")
    for style, signs in _TEMPLATE_SIGNS:
        if any(s in templates for s in signs):
            return style
    for style, token in _TOKEN_SIGNS:
        if tokenizer.token_to_id(token) is not None:
            return style
    return "hermes"


def check_style(style) -> str:
    if style not in STYLES:
        raise KilnError(f"unknown tool-call style {style!r}; kiln knows {', '.join(STYLES)}")
    return style


# --- The whole reply at once: the stream parser, fed everything ------------------------------------------------
def parse_tool_calls(text: str, style: str) -> tuple[str, list[ToolCall]]:
    """(content without the calls, the calls) of a complete reply written in `style`'s format."""
    parser = ToolStreamParser(style)
    content, calls = [], []
    for e in parser.feed(text) + parser.finish():
        if isinstance(e, ContentDelta):
            content.append(e.text)
        elif isinstance(e, ToolCallStart):
            calls.append(ToolCall(e.id, e.name, ""))
        else:
            calls[e.index].arguments += e.text
    return "".join(content), calls


def make_call(obj, need_args: bool = False) -> ToolCall | None:
    """A ToolCall from a decoded call object, or None if it is not one (see the module's rules)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    key = next((k for k in obj if k in _ARG_KEYS), None)
    if key is None and need_args:
        return None
    args = {} if key is None or obj[key] is None else obj[key]
    if isinstance(args, str):
        try:
            args = json.loads(args, strict=False)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(new_call_id(), obj["name"], json.dumps(args, ensure_ascii=False, separators=(",", ":")))


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


# --- Streaming -------------------------------------------------------------------------------------------------
class ToolStreamParser:
    """Feed text deltas, get events: ContentDelta, ToolCallStart, ToolArgsDelta; then `finish()`.

    Text that may still turn out to be a call marker (or whitespace next to a call) is held back until it is
    decided, so no content is ever taken back. Each call's ToolArgsDelta texts concatenate to its `arguments`.
    """

    def __init__(self, style: str):
        self.style = check_style(style)
        self.mode = "start" if style == "llama3" else "text"
        self._marker = HERMES_OPEN if style == "hermes" else MISTRAL_MARK
        self._in = self._buf = self._raw = ""  # unread input; held marker prefix; the undecided region's text
        self._ws, self._after = "", False  # trailing content whitespace held back; just after a call
        self._events: list = []
        self._index = 0  # calls committed so far
        self._scan: _JsonScanner | None = None
        self._committed, self._sent, self._name, self._argkey = False, 0, None, None
        self._tail_from, self._tail_bad, self._in_list = 0, False, 0

    def feed(self, text: str) -> list:
        self._in, self._buf = self._buf + text, ""
        while self._in:
            getattr(self, "_m_" + self.mode)()
        return self._take()

    def finish(self) -> list:
        """The events for what is still held: the reply has ended."""
        if self._buf:  # a marker's start that never finished
            self._say(self._buf)
        if self.mode in ("start", "body", "bad", "open") or (self.mode == "item" and self._in_list == 0) or (
                self.mode == "call" and not self._committed) or (self.mode == "tail" and self._tail_bad):
            self._say(self._raw)
        self._buf, self._raw, self.mode = "", "", "drop"
        if self._ws:
            self._events.append(ContentDelta(self._ws))
            self._ws = ""
        return self._take()

    # --- content ----------------------------------------------------------------------------------------------
    def _say(self, text: str) -> None:
        """Content; its trailing whitespace is held (a call may follow), leading whitespace after a call dropped."""
        if self._after:
            text = text.lstrip()
            if not text:
                return
            self._after = False
        text = self._ws + text
        body = text.rstrip()
        self._ws = text[len(body):]
        if body:
            self._events.append(ContentDelta(body))

    def _take(self) -> list:
        out: list = []
        for e in self._events:  # merge neighbours of one kind: fewer, larger deltas
            last = out[-1] if out else None
            if isinstance(e, ContentDelta) and isinstance(last, ContentDelta):
                out[-1] = ContentDelta(last.text + e.text)
            elif isinstance(e, ToolArgsDelta) and isinstance(last, ToolArgsDelta) and last.index == e.index:
                out[-1] = ToolArgsDelta(e.index, last.text + e.text)
            else:
                out.append(e)
        self._events = []
        return out

    def _next(self) -> str:
        ch, self._in = self._in[0], self._in[1:]
        return ch

    # --- modes: plain text ------------------------------------------------------------------------------------
    def _m_text(self):  # hermes, mistral: content until a marker
        s, m = self._in, self._marker
        j = s.find(m)
        if j < 0:
            k = _held_prefix(s, m)
            self._say(s[:len(s) - k])
            self._buf, self._in = s[len(s) - k:], ""
            return
        self._say(s[:j])
        self._raw, self._in = m, s[j + len(m):]
        self.mode = "body" if self.style == "hermes" else "open"

    def _m_plain(self):
        self._say(self._in)
        self._in = ""

    def _m_drop(self):
        self._in = ""

    # --- modes: hermes ------------------------------------------------------------------------------------------
    def _m_body(self):  # after <tool_call>: whitespace, then the call object
        ch = self._next()
        self._raw += ch
        if ch == "{":
            self._begin_call()
        elif ch not in _WS:
            self.mode = "bad"
            self._bad_check()

    def _m_bad(self):  # not a call: the block, up to its close, is content
        self._raw += self._in
        self._in = ""
        self._bad_check()

    def _bad_check(self):
        k = self._raw.find(HERMES_CLOSE, len(HERMES_OPEN))
        if k >= 0:
            cut = k + len(HERMES_CLOSE)
            self._in = self._raw[cut:] + self._in
            self._say(self._raw[:cut])
            self._raw, self.mode = "", "text"

    def _m_tail(self):  # after the call object: skip to </tool_call>
        self._raw += self._in
        self._in = ""
        k = self._raw.find(HERMES_CLOSE, self._tail_from)
        if k >= 0:
            cut = k + len(HERMES_CLOSE)
            self._in = self._raw[cut:]
            if self._tail_bad:
                self._say(self._raw[:cut])
            self._raw, self.mode = "", "text"

    # --- modes: mistral -----------------------------------------------------------------------------------------
    def _m_open(self):  # after [TOOL_CALLS]: whitespace, then "["
        ch = self._next()
        self._raw += ch
        if ch == "[":
            self.mode, self._in_list = "item", 0
        elif ch not in _WS:
            self._fail_plain(self._raw)

    def _m_item(self):  # a list element: whitespace, then "{" (or "]" for an empty list)
        ch = self._next()
        if self._in_list == 0:
            self._raw += ch
        if ch == "{":
            if self._in_list:
                self._raw = "{"
            self._begin_call()
        elif ch == "]" and self._in_list == 0:
            self._raw, self.mode = "", "text"
        elif ch not in _WS:
            self._fail_plain(self._raw if self._in_list == 0 else ch)

    def _m_sep(self):  # after an element: "," or "]"
        ch = self._next()
        if ch == ",":
            self._raw, self.mode = "", "item"
        elif ch == "]":
            self._raw, self.mode = "", "text"
        elif ch not in _WS:
            self._fail_plain(ch)

    def _fail_plain(self, content: str):
        """What was undecided is content, and so is everything after it."""
        self._raw, self.mode = "", "plain"
        self._say(content)

    # --- modes: llama3 ------------------------------------------------------------------------------------------
    def _m_start(self):  # the reply's start: whitespace, <|python_tag|>?, whitespace, then "{"
        s = self._raw + self._in
        p = _skip(s, 0)
        if s.startswith(PYTHON_TAG, p):
            p = _skip(s, p + len(PYTHON_TAG))
        elif PYTHON_TAG.startswith(s[p:]):  # maybe the tag, still arriving (or nothing yet)
            self._raw, self._in = s, ""
            return
        if p == len(s):
            self._raw, self._in = s, ""
        elif s[p] == "{":
            self._raw, self._in = s[:p + 1], s[p + 1:]
            self._begin_call()
        else:
            self._raw, self._in, self.mode = "", s, "plain"

    def _m_between(self):  # after a call: ";" and whitespace, then another call or plain content
        ch = self._next()
        if ch == "{":
            self._raw = "{"
            self._begin_call()
        elif ch not in _WS + ";":
            self._in, self.mode = ch + self._in, "plain"

    # --- a call object ------------------------------------------------------------------------------------------
    def _begin_call(self):
        self._scan = _JsonScanner()
        self._scan.feed("{")
        self._committed, self._sent, self._name, self._argkey = False, 0, None, None
        self.mode = "call"

    def _m_call(self):
        s, i = self._in, 0
        while i < len(s):
            ch, i = s[i], i + 1
            self._raw += ch
            try:
                self._scan.feed(ch)
            except _JsonError:
                self._in = s[i:]
                return self._call_failed()
            self._call_progress()
            if self._scan.done:
                self._in = s[i:]
                return self._call_done()
        self._in = ""

    def _call_progress(self):
        scan = self._scan
        if not self._committed:
            if self._name is None and "name" in scan.complete:
                name = json.loads(scan.members["name"], strict=False)
                self._name = name if isinstance(name, str) and name else ""
            self._argkey = self._argkey or next((k for k in scan.members if k in _ARG_KEYS), None)
            if self._name and self._argkey and scan.members[self._argkey].startswith("{"):
                self._commit(self._name)
        if self._committed:
            args = scan.members[self._argkey]
            if len(args) > self._sent:
                self._events.append(ToolArgsDelta(self._index, args[self._sent:]))
                self._sent = len(args)

    def _commit(self, name: str):
        self._events.append(ToolCallStart(self._index, new_call_id(), name))
        self._committed, self._ws, self._after = True, "", True

    def _call_done(self):
        call = None
        if not self._committed:
            call = make_call(json.loads(self._scan.text, strict=False), need_args=self.style == "llama3")
            if call is not None:
                self._commit(call.name)
                self._events.append(ToolArgsDelta(self._index, call.arguments))
        ok = self._committed
        if ok:
            self._index += 1
            self._after = True
        if self.style == "hermes":
            self._tail_from, self._tail_bad, self.mode = len(self._raw), not ok, "tail"
        elif not ok:
            self._fail_plain(self._raw)
        else:
            self._in_list += 1
            self._raw, self.mode = "", "sep" if self.style == "mistral" else "between"

    def _call_failed(self):
        if self._committed:  # too late to take the call back: it ends here
            self._index += 1
            self._after = True
            if self.style == "hermes":
                self._tail_from, self._tail_bad, self.mode = len(self._raw), False, "tail"
            else:
                self._raw, self.mode = "", "drop"
        elif self.style == "hermes":
            self.mode = "bad"
            self._bad_check()
        else:
            self._fail_plain(self._raw)


def _held_prefix(s: str, marker: str) -> int:
    """Length of the longest end of s that could be the start of marker."""
    for k in range(min(len(s), len(marker) - 1), 0, -1):
        if marker.startswith(s[-k:]):
            return k
    return 0


# --- Incremental JSON: validate one object character by character and re-serialize it compactly as it goes -----
class _JsonError(ValueError):
    pass


_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][-+]?\d+)?")
_NUM_CHARS = frozenset("0123456789+-.eE")
_HEX = frozenset("0123456789abcdefABCDEF")
_ESCAPES = frozenset('"\\/bfnrtu')


class _JsonScanner:
    """One JSON object, fed a character at a time (`feed` raises _JsonError at the first invalid one).

    `text`: the compact serialization so far (json.dumps(..., ensure_ascii=False, separators=(",", ":")) of the
    finished object); `members[key]`: the same per top-level member, append-only; `complete`: keys whose value
    ended; `done`: the object closed. Only final text is emitted (numbers and literals when they end, string
    characters once an escape is complete; a high surrogate waits for its partner).
    """

    def __init__(self):
        self.out: list[str] = []
        self.members: dict[str, str] = {}
        self.complete: set[str] = set()
        self.done = False
        self._stack: list[str] = []  # open containers: "{" or "["
        self._expect = "value"  # value | value_or_close | key | key_or_close | colon | comma_or_close | done
        self._tok = ""  # the token being read: "s" string, "n" number, "l" literal, "" none
        self._key = False  # the string being read is a key
        self._pend = ""  # raw text of the token not yet emitted
        self._esc = 0  # -1: after a backslash; k > 0: hex digits still due; 0: not in an escape
        self._hold = False  # the last escape was a high surrogate
        self._key_text, self._member = "", None

    @property
    def text(self) -> str:
        return "".join(self.out)

    def feed(self, ch: str) -> None:
        if self._tok == "s":
            return self._string(ch)
        if self._tok:
            if (ch in _NUM_CHARS) if self._tok == "n" else ch.isalpha():
                self._pend += ch
                return
            self._end_scalar()
        self._struct(ch)

    def _emit(self, text: str) -> None:
        """Append to the output and to the member (or key) it belongs to."""
        self.out.append(text)
        depth = len(self._stack)
        if depth == 1 and self._tok == "s" and self._key:
            self._key_text += text
        elif depth >= 2 or (depth == 1 and (self._tok or self._expect == "value")):
            self.members[self._member] += text

    def _struct(self, ch: str) -> None:
        if ch in _WS:
            return
        e = self._expect
        if e in ("value", "value_or_close"):
            if ch == "]" and e == "value_or_close":
                return self._close(ch)
            if ch in "{[":
                self._stack.append(ch)
                self._expect = "key_or_close" if ch == "{" else "value_or_close"
                return self._emit(ch)
            if ch == '"':
                return self._open_string(key=False)
            if ch in "-0123456789tfn":
                self._tok, self._pend = "n" if ch in "-0123456789" else "l", ch
                return
        elif e in ("key", "key_or_close"):
            if ch == "}" and e == "key_or_close":
                return self._close(ch)
            if ch == '"':
                return self._open_string(key=True)
        elif e == "colon" and ch == ":":
            self._emit(ch)
            self._expect = "value"
            return
        elif e == "comma_or_close":
            top = self._stack[-1]
            if ch == ",":
                self._emit(ch)
                self._expect = "key" if top == "{" else "value"
                return
            if ch == ("}" if top == "{" else "]"):
                return self._close(ch)
        raise _JsonError(f"unexpected {ch!r}")

    def _close(self, ch: str) -> None:
        self._emit(ch)
        self._stack.pop()
        self._value_done()

    def _value_done(self) -> None:
        if not self._stack:
            self.done, self._expect = True, "done"
            return
        self._expect = "comma_or_close"
        if len(self._stack) == 1 and self._member is not None:
            self.complete.add(self._member)

    def _end_scalar(self) -> None:
        raw = self._pend
        if self._tok == "n":
            if not _NUMBER.fullmatch(raw):
                raise _JsonError(f"bad number {raw!r}")
            text = json.dumps(json.loads(raw))
        elif raw in ("true", "false", "null"):
            text = raw
        else:
            raise _JsonError(f"bad literal {raw!r}")
        self._emit(text)
        self._tok, self._pend = "", ""
        self._value_done()

    def _open_string(self, key: bool) -> None:
        self._tok, self._key, self._pend, self._esc, self._hold = "s", key, "", 0, False
        self._emit('"')

    def _string(self, ch: str) -> None:
        if ch == '"' and self._esc == 0:
            return self._close_string()
        self._pend += ch
        if self._esc == -1:
            if ch not in _ESCAPES:
                raise _JsonError(f"bad escape \\{ch}")
            self._esc = 4 if ch == "u" else 0
            self._hold = self._hold and ch == "u"
        elif self._esc > 0:
            if ch not in _HEX:
                raise _JsonError("bad \\u escape")
            self._esc -= 1
            self._hold = self._esc == 0 and 0xD800 <= int(self._pend[-4:], 16) <= 0xDBFF
        elif ch == "\\":
            self._esc = -1
        else:
            self._hold = False
        if self._esc == 0 and not self._hold:
            self._flush_string()

    def _flush_string(self) -> None:
        if self._pend:
            value = json.loads('"' + self._pend + '"', strict=False)
            self._emit(json.dumps(value, ensure_ascii=False)[1:-1])
            self._pend = ""

    def _close_string(self) -> None:
        self._flush_string()
        self._emit('"')
        self._tok = ""
        if not self._key:
            return self._value_done()
        self._key, self._expect = False, "colon"
        if len(self._stack) > 1:  # a nested key: part of a member's value
            return
        self._member = json.loads(self._key_text, strict=False)
        self._key_text = ""
        self.members.setdefault(self._member, "")
