"""Progress of slow steps (downloads, loading, conversion), shaped for where it is shown.

Owns: `bar(...)`: a tqdm bar on a terminal; elsewhere (pipe, log, CI) plain lines at most every `every`
seconds and a last one, so logs get no `\\r` redraws. Not: what is measured, whether to report (`enabled`).
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

# The plain line: what a reader of a log wants from a bar, without the bar itself.
LINE = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]"


def bar(iterable=None, *, total=None, desc: str = "", unit: str = "it", enabled: bool = True,
        leave: bool = True, every: float = 10.0, file=None):
    """A progress reporter with tqdm's `update(n)`, `close()`, iteration and `with`; `n` is the count so far.

    `unit="B"` counts bytes (shown as kB, MB, GB with a rate and the time left). `leave=False` clears a
    terminal bar when done and, off a terminal, skips the last line.
    """
    file = sys.stderr if file is None else file
    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    if is_terminal(file):
        return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=unit == "B", leave=leave, file=file)
    return Lines(iterable, total=total, desc=desc, unit=unit, leave=leave, every=every, file=file)


def is_terminal(file) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


class Lines:
    """Progress as plain lines: `desc:  40% 196M/491M [00:20<00:30, 9.8MB/s]` every `every` seconds."""

    def __init__(self, iterable=None, *, total=None, desc="", unit="it", leave=True, every=10.0, file=None):
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.leave, self.every, self.file = leave, every, sys.stderr if file is None else file
        self.n, self.start, self.closed = 0, time.monotonic(), False
        self._last = self.start

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, k: int = 1):
        self.n += k
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self._line(now)

    def close(self):
        if not self.closed and self.leave:
            self._line(time.monotonic())
        self.closed = True

    def _line(self, now: float):
        text = tqdm.format_meter(self.n, self.total, now - self.start, prefix=self.desc, unit=self.unit,
                                 unit_scale=self.unit == "B", bar_format=LINE)
        print(text, file=self.file, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
