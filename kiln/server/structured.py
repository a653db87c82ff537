"""Constrained decoding: JSON schema, any JSON object, GBNF, regex and forced tool calls, as logits processors.

Owns: `Structured` (per model: xgrammar's view of the vocabulary and an LRU of compiled grammars), `Constraint`
(one compiled grammar) and `GrammarProcessor` (the engine's per-request LogitsProcessor).
Not: sampling (sample.py), when the processor runs (engine.py), HTTP fields (protocol.py), reading tool calls
back out (tools.py, whose formats the grammars here write).

The mask is filled on the CPU by xgrammar and applied where the logits live (xgrammar's kernel on the CPU,
unpacked on the device elsewhere), so it never waits on the device; padded vocabulary rows are always masked.
The grammar sees each token's bytes as `tokenizer.id_to_bytes` gives them (known gap: SentencePiece decoders
that drop the reply's first space can lose it from a constraint that starts with a space). Once the grammar is
complete it allows the end-of-generation ids, which terminate it; control tokens are never allowed inside.
Limits (xgrammar's): at most 16 whitespace characters in a row in JSON; string `format`s are checked by shape
only (2023-02-31 passes as a date); keywords it does not enforce (uniqueItems) are not enforced. Tool-call
arguments are always strict.

Shape alphabet: V = logits columns (model vocabulary, may be padded), W = ceil(V / 32) bitmask words.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict

import torch

from kiln.errors import KilnError
from kiln.server.tools import HERMES_CLOSE, HERMES_OPEN, MISTRAL_MARK, PYTHON_TAG, check_style

# Control tokens whose text a tool-call format spells out: kept matchable although they are special.
TOOL_MARKERS = frozenset((HERMES_OPEN, HERMES_CLOSE, PYTHON_TAG, MISTRAL_MARK))
_MAX_WS = 16  # longest whitespace run inside constrained JSON: pretty-printing fits, endless blank runs do not


def _xgr():
    try:
        import xgrammar
    except ImportError:
        raise KilnError("structured output needs xgrammar; install it with: pip install 'kiln[serve]'") from None
    return xgrammar


# --- The compiler (one per model) ------------------------------------------------------------------------------
class Structured:
    """Compile constraints for one tokenizer; compiled grammars are kept in an LRU of `cache_size` entries."""

    def __init__(self, tokenizer, vocab_size: int | None = None, cache_size: int = 64):
        xgr = _xgr()
        self.vocab_size = int(vocab_size or tokenizer.vocab_size)
        self.stop_ids = sorted(i for i in tokenizer.eos_token_ids if i < self.vocab_size)
        vocab = token_bytes(tokenizer, self.vocab_size)
        self.info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=self.vocab_size,
                                      stop_token_ids=self.stop_ids)
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=min(8, os.cpu_count() or 1),
                                             cache_enabled=False)  # ours below is bounded
        self._cache: OrderedDict[tuple, object] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    # --- the four kinds of response constraint -----------------------------------------------------------------
    def json_schema(self, schema: dict | bool, strict: bool = True) -> Constraint:
        """JSON matching `schema`; strict: no properties or items beyond those the schema names."""
        if not isinstance(schema, (dict, bool)):
            raise KilnError(f"a JSON schema must be an object (or true/false), got {type(schema).__name__}")
        text = _dump(schema, "JSON schema")
        return self._get(("json_schema", text, bool(strict)), lambda: self._compiler.compile_json_schema(
            text, any_whitespace=True, max_whitespace_cnt=_MAX_WS, strict_mode=bool(strict)), "JSON schema")

    def json_object(self) -> Constraint:
        """Any JSON object (OpenAI's response_format json_object)."""
        return self.json_schema({"type": "object"}, strict=False)

    def gbnf(self, text: str) -> Constraint:
        """A llama.cpp GBNF grammar (root rule `root`), as llama-server takes it in its `grammar` field."""
        if not isinstance(text, str) or not text.strip():
            raise KilnError("a GBNF grammar must be a non-empty string with a rule named root "
                            "(e.g. root ::= \"yes\" | \"no\")")
        ebnf = gbnf_to_ebnf(text)
        return self._get(("gbnf", ebnf), lambda: self._compiler.compile_grammar(ebnf, root_rule_name="root"),
                         "GBNF grammar")

    def regex(self, pattern: str) -> Constraint:
        """Text matching `pattern` in full."""
        if not isinstance(pattern, str) or not pattern:
            raise KilnError("a regex constraint must be a non-empty string")
        return self._get(("regex", pattern), lambda: self._compiler.compile_regex(pattern), "regex")

    # --- forced tool calls -------------------------------------------------------------------------------------
    def tool_call(self, tools: list[dict], choice, style: str, parallel: bool = False) -> Constraint:
        """The model must call a tool in `style`'s format, its arguments matching that function's parameters.

        `choice`: "required" (any of `tools`) or {"type": "function", "function": {"name": ...}} (that one).
        `parallel`: allow several calls in a row (each still any of the allowed functions).
        """
        funcs = _pick_functions(_functions(tools), choice)
        tag = _tool_tag(funcs, check_style(style), bool(parallel))
        text = _dump(tag, "tool parameters")
        return self._get(("tool_call", text), lambda: self._compiler.compile_structural_tag(text),
                         "tool parameters schema")

    # --- cache -------------------------------------------------------------------------------------------------
    def _get(self, key: tuple, compile_fn, what: str) -> Constraint:
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        try:
            compiled = compile_fn()
        except (RuntimeError, ValueError, TypeError) as e:
            raise KilnError(f"invalid {what}: {_xgr_message(e)}") from None
        if matches_nothing(compiled, self.vocab_size, self.stop_ids):
            raise KilnError(f"invalid {what}: it matches no text at all (e.g. a rule that only refers to itself, "
                            "like root ::= root), so no answer could satisfy it")
        made = Constraint(compiled, self.vocab_size, self.stop_ids)
        with self._lock:
            self._cache[key] = made
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return made


def matches_nothing(compiled, vocab_size: int, stop_ids: list[int], budget: int = 256, branch: int = 8) -> bool:
    """True only if no token sequence can complete the grammar: a search from its start that tries every allowed
    token wherever few are allowed, and ends where one may stop. A grammar that allows many tokens somewhere, or
    needs more than `budget` states to explore, is taken to match something (the search proves only emptiness)."""
    xgr = _xgr()
    matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=stop_ids or None)
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    shifts = torch.arange(32, dtype=torch.int32)
    left = [budget]

    def dead() -> bool:  # every continuation from the matcher's state ends nowhere
        left[0] -= 1
        if left[0] < 0 or matcher.is_terminated():
            return False
        matcher.fill_next_token_bitmask(bitmask)
        allowed = (((bitmask[0, :, None] >> shifts) & 1).flatten()[:vocab_size]).nonzero().flatten().tolist()
        if any(t in stop_ids for t in allowed) or len(allowed) > branch:
            return False
        for t in allowed:
            if not matcher.accept_token(t):
                continue
            found = not dead()
            matcher.rollback(1)
            if found:
                return False
        return True
    return dead()


def token_bytes(tokenizer, vocab_size: int) -> list[bytes]:
    """The bytes each id decodes to, as xgrammar sees them: empty (never allowed) for control tokens other than
    tool-call markers, and for ids past the tokenizer's vocabulary."""
    out = []
    n = min(vocab_size, tokenizer.vocab_size)
    for i in range(n):
        piece = tokenizer.id_to_bytes(i)
        if tokenizer.is_special(i) and piece.decode("utf-8", "replace") not in TOOL_MARKERS:
            piece = b""
        out.append(piece)
    return out


def _dump(value, what: str) -> str:
    """Compact JSON text; key order kept (a schema's property order is the order the output must follow)."""
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise KilnError(f"the {what} is not plain JSON ({e})") from None


_XGR_PREFIX = re.compile(r"^\[[\d:]+\] \S+?:\d+: ")


def _xgr_message(e: Exception) -> str:
    """xgrammar's message without its timestamp and C++ source location."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = _XGR_PREFIX.sub("", text)
    if "Unexpected character: <" in text:
        text += " (llama.cpp's token references such as <[123]> or <think> are not supported; spell the text)"
    return text


# --- A compiled constraint and its per-request processor -------------------------------------------------------
class Constraint:
    """One compiled grammar; cheap to share between requests. `processor()` gives a fresh matcher."""

    def __init__(self, compiled, vocab_size: int, stop_ids: list[int]):
        self.compiled, self.vocab_size, self.stop_ids = compiled, vocab_size, stop_ids

    def processor(self) -> GrammarProcessor:
        return GrammarProcessor(self.compiled, self.vocab_size, self.stop_ids)


class GrammarProcessor:
    """The engine's LogitsProcessor for one request (interface B): mask → sample → accept, until terminated."""

    def __init__(self, compiled, vocab_size: int, stop_ids: list[int]):
        xgr = _xgr()
        self._matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=stop_ids or None)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)  # (1, W) int32 on the CPU
        self._stop_ids = stop_ids

    def mask(self, logits: torch.Tensor) -> None:
        """Set every token the grammar forbids next to -inf, in place; logits (V,) on any device."""
        if self._matcher.is_terminated():  # nothing may follow but the end
            keep = torch.full_like(logits, float("-inf"))
            ids = torch.tensor(self._stop_ids, device=logits.device, dtype=torch.long)
            keep[ids] = logits[ids]
            logits.copy_(keep)
            return
        self._matcher.fill_next_token_bitmask(self._bitmask)
        if logits.device.type == "cuda" and not self._bitmask.is_pinned():
            self._bitmask = self._bitmask.pin_memory()
        apply_bitmask(logits, self._bitmask[0])

    def accept(self, token: int) -> None:
        """Advance past the sampled token; KilnError if the grammar does not allow it (it was not masked in)."""
        if not self._matcher.accept_token(int(token)):
            raise KilnError(f"token {int(token)} does not fit the output constraint at this point "
                            "(it was sampled without the constraint's mask)")

    def is_terminated(self) -> bool:
        return self._matcher.is_terminated()


def apply_bitmask(logits: torch.Tensor, words: torch.Tensor) -> None:
    """logits (V,) ← -inf where bit j of words[j // 32] is 0 (words (W,) int32 on the CPU); columns past the
    bitmask are masked too. On the CPU xgrammar's kernel does it (one pass, no thread pool); elsewhere torch."""
    n = min(logits.shape[-1], words.shape[-1] * 32)
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16, torch.float16):
        _xgr().apply_token_bitmask_inplace(logits, words, vocab_size=n)
    else:
        apply_bitmask_torch(logits[:n], words)
    logits[n:] = float("-inf")


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def apply_bitmask_torch(logits: torch.Tensor, words: torch.Tensor) -> None:
    """The plain-torch twin, for any device: unpack the bits where the logits live and mask in place.

    logits (n,) with n <= 32 * W; the words are copied to the logits' device (asynchronously from pinned memory).
    """
    device = logits.device
    shifts = _SHIFTS.get(device)
    if shifts is None:
        shifts = _SHIFTS.setdefault(device, torch.arange(32, dtype=torch.int32, device=device))
    bits = (words.to(device, non_blocking=True).unsqueeze(1) >> shifts) & 1  # (W, 32): bit j of word w
    allowed = bits.view(-1)[:logits.shape[-1]].bool()  # (n,)
    logits.masked_fill_(~allowed, float("-inf"))


# --- GBNF → xgrammar EBNF --------------------------------------------------------------------------------------
_ANY_CHAR = "[\\0-\\U0010ffff]"


def gbnf_to_ebnf(text: str) -> str:
    """llama.cpp GBNF in xgrammar's EBNF dialect. The dialects agree except for `.` (any character), which
    xgrammar spells as a character class; strings, classes and comments are copied untouched."""
    out, i, n = [], 0, len(text)
    while i < n:
        ch = text[i]
        if ch in "\"[":
            j = _skip_quoted(text, i, '"' if ch == '"' else "]")
            out.append(text[i:j])
            i = j
        elif ch == "#":
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(text[i:j])
            i = j
        else:
            out.append(_ANY_CHAR if ch == "." else ch)
            i += 1
    return "".join(out)


def _skip_quoted(text: str, i: int, close: str) -> int:
    """Index just past the string or class opening at i (backslash escapes respected; unterminated: the end)."""
    j = i + 1
    while j < len(text) and text[j] != close:
        j += 2 if text[j] == "\\" else 1
    return min(j + 1, len(text))


# --- Tool calls as xgrammar structural tags --------------------------------------------------------------------
def _functions(tools) -> list[tuple[str, dict]]:
    """(name, parameters schema) of each tool; OpenAI's {"type": "function", "function": {...}} or bare {...}."""
    if not isinstance(tools, list) or not tools:
        raise KilnError("tools must be a non-empty list of {'type': 'function', 'function': {'name': ..., "
                        "'parameters': {...}}}")
    out = []
    for k, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name:
            raise KilnError(f"tools[{k}] has no function name; give {{'type': 'function', 'function': "
                            "{'name': ..., 'parameters': {...}}}")
        params = fn.get("parameters")
        params = {"type": "object", "properties": {}} if params is None else params
        if not isinstance(params, (dict, bool)):
            raise KilnError(f"tools[{k}] ({name}): parameters must be a JSON schema object")
        out.append((name, params))
    return out


def _pick_functions(funcs: list[tuple[str, dict]], choice) -> list[tuple[str, dict]]:
    if choice == "required":
        return funcs
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise KilnError(f"tool_choice {choice!r} does not force a call; constrain with 'required' or "
                        "{'type': 'function', 'function': {'name': ...}}")
    picked = [f for f in funcs if f[0] == name]
    if not picked:
        raise KilnError(f"tool_choice names function {name!r}, which is not among the tools "
                        f"({[f[0] for f in funcs]})")
    return picked[:1]


def _tool_tag(funcs, style: str, parallel: bool) -> dict:
    """The structural tag for one call (or several) in `style`'s format; strict JSON for the arguments."""
    key = "parameters" if style == "llama3" else "arguments"
    calls = [_seq(_const('{"name": ' + json.dumps(name, ensure_ascii=False) + f', "{key}": '),
                  {"type": "json_schema", "json_schema": params, "max_whitespace_cnt": _MAX_WS}, _const("}"))
             for name, params in funcs]
    one = calls[0] if len(calls) == 1 else {"type": "or", "elements": calls}
    if style == "hermes":
        one = _seq(_const("<tool_call>\n"), one, _const("\n</tool_call>"))
        body = _seq(one, {"type": "star", "content": _seq(_const("\n"), one)}) if parallel else one
    elif style == "mistral":
        more = {"type": "star", "content": _seq(_const(", "), one)} if parallel else None
        body = _seq(_const("[TOOL_CALLS]["), one, *([more] if more else []), _const("]"))
    else:  # llama3: Llama 3.1's JSON call; several are separated by "; "
        body = _seq(one, {"type": "star", "content": _seq(_const("; "), one)}) if parallel else one
    return {"type": "structural_tag", "format": body}


def _const(text: str) -> dict:
    return {"type": "const_string", "value": text}


def _seq(*elements) -> dict:
    return {"type": "sequence", "elements": list(elements)}
