"""The text side of one generation: token ids in, text safe to show out, with stop strings and a finish reason.

Owns: `TextStream` (detokenizer + stop strings + finish reason per sequence: kiln.stream_generate and the
server), `StopMatcher` (stop strings, linear in the text fed) and `split_stop`, its slow twin.
Not: decoding bytes (tokenizer.py), stop tokens and length limits (generate.py, engine.py), tool calls.
"""

from __future__ import annotations

from collections.abc import Iterable


class StopMatcher:
    """Feed text as it comes; get back what is safe to emit, holding back any end that may still begin a stop.

    Each stop runs a Knuth-Morris-Pratt automaton (`_Stop`) whose state is the longest end of the text that
    starts the stop, so the largest state is the text to hold back and nothing is rescanned: amortized O(1)
    per character and stop, the failure table grown only as far as a match has (a 300,000-character stop costs
    nothing until the text spells it). Empty stops are ignored; once a stop is found the matcher is spent.
    """

    def __init__(self, stops: Iterable[str] = ()):
        self._stops = [_Stop(s) for s in stops if s]
        self.pending = ""  # text held back: it may be the start of a stop string

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, a stop string was found). On a find, the text from the earliest stop on is
        dropped (and `pending` with it)."""
        if not self._stops:
            return text, False
        pending, base = self.pending + text, len(self.pending)
        starts = [base + end - len(stop.s) for stop in self._stops if (end := stop.advance(text)) is not None]
        if starts:
            self.pending = ""
            return pending[:min(starts)], True
        hold = max(stop.state for stop in self._stops)
        self.pending = pending[len(pending) - hold:] if hold else ""
        return pending[:len(pending) - hold], False

    def flush(self) -> str:
        """The held-back text: the stream has ended without completing a stop string."""
        out, self.pending = self.pending, ""
        return out


class _Stop:
    """One stop string's KMP automaton, its failure table built lazily (only as far as `state` has reached)."""

    def __init__(self, s: str):
        self.s, self.state = s, 0  # state: length of the longest end of the text fed that is a start of s
        self._fail, self._k = [0], 0  # _fail[i]: longest proper border of s[:i+1]; _k: the border being built

    def advance(self, text: str) -> int | None:
        """Feed `text`; the end (index into text) of the first full match, if any (the state then resets)."""
        s, fail, state = self.s, self._fail, self.state
        self._grow(min(len(s), state + len(text)))
        for i, ch in enumerate(text):
            while state and s[state] != ch:
                state = fail[state - 1]
            if s[state] == ch:
                state += 1
                if state == len(s):
                    self.state = 0
                    return i + 1
        self.state = state
        return None

    def _grow(self, n: int) -> None:
        """Extend the failure table to cover s[:n] (the standard KMP construction, resumed where it stopped)."""
        s, fail, k = self.s, self._fail, self._k
        for i in range(len(fail), n):
            while k and s[i] != s[k]:
                k = fail[k - 1]
            if s[i] == s[k]:
                k += 1
            fail.append(k)
        self._k = k


def split_stop(pending: str, stops: list[str]) -> tuple[str, str, bool]:
    """The slow twin of StopMatcher.feed: (text safe to emit, text held back, stop found), rescanning all of
    `pending` (everything held back plus the new text) each time; quadratic in the stop length."""
    stops = [s for s in stops if s]
    hits = [i for i in (pending.find(s) for s in stops) if i >= 0]
    if hits:
        return pending[:min(hits)], "", True
    hold = max((k for s in stops for k in range(1, len(s)) if pending.endswith(s[:k])), default=0)
    return pending[:len(pending) - hold], pending[len(pending) - hold:], False


class TextStream:
    """One generated sequence's text: feed each token with the token loop's finish reason, get the text now
    safe to show. A stop string ends the stream with finish "stop" (its text and everything after dropped);
    any other finish releases what was held back (partial stop strings, an unfinished UTF-8 character)."""

    def __init__(self, tokenizer, stops: Iterable[str] = ()):
        self._detok = tokenizer.detokenizer()
        self._stops = StopMatcher(stops)
        self.finish: str | None = None  # set once the stream has ended
        self.stop_hit = False  # it ended on a stop string

    def step(self, token: int | None, finish: str | None = None) -> str:
        """`token`: the generated id, or None for one that is not text (a stop token, a tokenless final output);
        `finish`: the token loop's reason if this is its last output ("stop", "length", "cancelled", …)."""
        emit, self.stop_hit = self._stops.feed(self._detok.add(token) if token is not None else "")
        if self.stop_hit:
            self.finish = "stop"
        elif finish:
            self.finish = finish
            emit += self._stops.flush() + self._detok.flush()
        return emit
