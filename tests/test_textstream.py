"""Tests for kiln/textstream.py: the linear stop-string matcher against its slow twin, and the text stream.

Owns: StopMatcher vs split_stop (rescans everything pending, obviously correct) on random texts, stops and
chunkings — stops that overlap each other, are prefixes or substrings of each other, repeat themselves, and
contain multi-code-point characters; that long stops cost in proportion to the text fed, not to their length;
TextStream's finish reasons and released text over a real tokenizer.
Not: the token loops (tests/test_generate.py, tests/test_engine.py), stops through HTTP (tests/test_server.py).
"""

import random
import time

import pytest

from kiln.textstream import StopMatcher, TextStream, split_stop

# single code points, a combining sequence, an emoji with a skin-tone modifier, a flag (two regional indicators)
ALPHABET = ["a", "b", "c", "\n", " ", "é", "e\u0301", "👍🏽", "🇫🇷", "中"]


def _random_text(rng, n):
    return "".join(rng.choice(ALPHABET[:rng.randint(2, len(ALPHABET))]) for _ in range(n))


def _random_stops(rng, text):
    stops = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.random()
        if kind < 0.4 and len(text) > 1:  # a piece of the text: it will be found
            i = rng.randrange(len(text) - 1)
            stops.append(text[i:i + rng.randint(1, 8)])
        elif kind < 0.6 and stops:  # overlapping another stop: its prefix, suffix or an extension
            other = rng.choice(stops)
            stops.append(rng.choice([other[:rng.randint(1, len(other))], other[-rng.randint(1, len(other)):],
                                     other + _random_text(rng, rng.randint(1, 3))]))
        else:
            stops.append(_random_text(rng, rng.randint(1, 9)))
    return stops


def _run_both(text, stops, cuts):
    """Feed `text` in pieces to the matcher and to the twin; their outputs must agree at every piece."""
    m, pending, out = StopMatcher(stops), "", []
    for a, b in zip([0, *cuts], [*cuts, len(text)]):
        emit, hit = m.feed(text[a:b])
        want_emit, pending, want_hit = split_stop(pending + text[a:b], stops)
        assert (emit, hit, m.pending) == (want_emit, want_hit, pending), (text, stops, cuts, a, b)
        out.append(emit)
        if hit:
            return "".join(out), True
    return "".join(out) + m.flush(), False


@pytest.mark.parametrize("seed", range(4))
def test_matcher_equals_the_rescanning_twin_on_random_streams(seed):
    rng = random.Random(seed)
    for _ in range(300):
        text = _random_text(rng, rng.randint(0, 40))
        stops = _random_stops(rng, text)
        cuts = sorted(rng.sample(range(1, len(text)), min(max(len(text) - 1, 0), rng.randint(0, 15))))
        got, hit = _run_both(text, stops, cuts)
        assert hit == any(s in text for s in stops) and text.startswith(got) and not any(s in got for s in stops)
        assert not hit or any(text.startswith(s, len(got)) for s in stops)  # cut where a stop starts


def test_self_overlapping_and_nested_stops():
    cases = [("aaab", ["aab"]), ("abababc", ["ababc"]), ("xabcabd", ["abd", "cab"]), ("hello world", ["lo w", "o"]),
             ("🇫🇷🇫🇷!", ["🇷🇫🇷!"]), ("cafe\u0301s", ["\u0301s"]), ("abcd", ["abcd", "bc"])]
    for text, stops in cases:
        for k in range(len(text) + 1):
            _run_both(text, stops, [k] if 0 < k < len(text) else [])
        _run_both(text, stops, list(range(1, len(text))))  # one code point at a time
    m = StopMatcher(["abcd", "bc"])  # "abcd" starts first, though "bc" ends first
    assert m.feed("xab") == ("x", False) and m.feed("cd") == ("", True)


def test_empty_stops_are_ignored_and_no_stops_hold_nothing():
    assert StopMatcher(["", "z"]).feed("abc") == ("abc", False)
    assert StopMatcher([]).feed("abc") == ("abc", False)


def test_long_stops_cost_what_is_fed_not_their_length():
    """Issue 17: 16 stops of 300,000 characters froze the server for 36 s on two tokens (the twin's hold-back
    scan is quadratic in the stop length). Here the text keeps every stop pending for 500 feeds."""
    stops = ["ab" * 150_000 + str(i) for i in range(16)]
    t0 = time.perf_counter()
    m = StopMatcher(stops)
    assert all(m.feed("abab") == ("", False) for _ in range(500)) and len(m.pending) == 2000
    assert m.feed("x") == ("ab" * 1000 + "x", False) and m.pending == ""
    assert time.perf_counter() - t0 < 5  # ~0.1 s; each feed the twin makes takes seconds here


# --- TextStream over a real tokenizer ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok(qwen_path):
    from kiln.formats.gguf import read_gguf
    from kiln.tokenizer import Tokenizer
    return Tokenizer.from_gguf(read_gguf(qwen_path).meta)


def _feed(tok, stream, ids, last_finish="length"):
    """The text a token loop shows: it stops at the stream's first finish."""
    out = []
    for k, t in enumerate(ids):
        out.append(stream.step(t, last_finish if k == len(ids) - 1 else None))
        if stream.finish:
            break
    return "".join(out)


def test_text_stream_cuts_at_a_stop_string_and_releases_at_the_end(tok):
    text = "Hello wörld 👍🏽, nice to meet you."
    ids = tok.encode(text, add_special_tokens=False)
    s = TextStream(tok, ["wörld 👍", "meet"])
    assert _feed(tok, s, ids) == "Hello " and s.finish == "stop" and s.stop_hit
    s = TextStream(tok, ["you.!"])  # the stop's start is held until the end, then released
    parts = [s.step(t, "length" if k == len(ids) - 1 else None) for k, t in enumerate(ids)]
    assert "".join(parts) == text and parts[-1].endswith("you.") and s.finish == "length" and not s.stop_hit
    s = TextStream(tok, [])
    assert _feed(tok, s, ids[:-1]) + s.step(None, "stop") == tok.decode(ids[:-1]) and s.finish == "stop"
