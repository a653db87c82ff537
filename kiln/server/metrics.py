"""Prometheus metrics for the server, in the text exposition format (version 0.0.4).

Owns: request, token and latency counters and histograms, rendered with gauges read from the engine at scrape
time. Not: what is measured when (app.py, choices.py, transport.py), the engine's bookkeeping (engine.stats()).
Every update happens on the event loop thread, so no locks.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_GAUGES = {  # engine.stats() key -> (metric name, help)
    "queue_depth": ("kiln_queue_depth", "requests waiting for a slot"),
    "active": ("kiln_slots_active", "slots generating"),
    "n_slots": ("kiln_slots_total", "slots (concurrent sequences)"),
    "kv_tokens_used": ("kiln_kv_cache_tokens_used", "KV-cache positions holding tokens"),
    "kv_tokens_total": ("kiln_kv_cache_tokens_total", "KV-cache positions in all slots"),
    "prefix_hits": ("kiln_prefix_cache_hits_total", "requests that reused a cached prompt prefix"),
    "drafted": ("kiln_draft_tokens_total", "tokens drafted for speculative decoding"),
    "accepted": ("kiln_draft_tokens_accepted_total", "drafted tokens the model kept"),
}
_COUNTERS = ("prefix_hits", "drafted", "accepted")  # engine.stats() keys that only grow


def _labels(pairs: tuple) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}" if pairs else ""


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum, self.n = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for le, c in zip([*self.buckets, math.inf], self.counts):
            total += c
            out.append(f'{name}_bucket{{le="{"+Inf" if le == math.inf else le}"}} {total}')
        return out + [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.n}"]


class Metrics:
    def __init__(self):
        self.requests: dict[tuple, int] = defaultdict(int)  # (endpoint, status) -> count
        self.tokens = {"prompt": 0, "generated": 0, "cached": 0}
        self.latency = Histogram()
        self.ttft = Histogram()
        self.in_flight = 0

    def request_done(self, endpoint: str, status: int) -> None:
        self.requests[(endpoint, status)] += 1

    def count_tokens(self, usage: dict) -> None:
        """Add one request's usage (protocol.usage) to the token counters."""
        self.tokens["prompt"] += usage["prompt_tokens"]
        self.tokens["generated"] += usage["completion_tokens"]
        self.tokens["cached"] += usage["prompt_tokens_details"]["cached_tokens"]

    def render(self, stats: dict | None) -> str:
        out = ["# HELP kiln_requests_total HTTP requests by endpoint and status", "# TYPE kiln_requests_total counter"]
        for (endpoint, status), n in sorted(self.requests.items()):
            out.append(f"kiln_requests_total{_labels((('endpoint', endpoint), ('status', status)))} {n}")
        for kind, help_ in (("prompt", "prompt tokens processed"), ("generated", "tokens generated"),
                            ("cached", "prompt tokens served from the prefix cache")):
            name = f"kiln_{kind}_tokens_total"
            out += [f"# HELP {name} {help_}", f"# TYPE {name} counter", f"{name} {self.tokens[kind]}"]
        for name, h, help_ in (("kiln_request_duration_seconds", self.latency, "completion request latency"),
                               ("kiln_time_to_first_token_seconds", self.ttft, "time to the first generated token")):
            out += [f"# HELP {name} {help_}", f"# TYPE {name} histogram", *h.lines(name)]
        out += ["# HELP kiln_requests_in_flight requests being served", "# TYPE kiln_requests_in_flight gauge",
                f"kiln_requests_in_flight {self.in_flight}"]
        for key, (name, help_) in _GAUGES.items():
            if stats and isinstance(stats.get(key), (int, float)):
                kind = "counter" if key in _COUNTERS else "gauge"
                out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {stats[key]}"]
        return "\n".join(out) + "\n"
