"""The model calls a batch-1 generation makes, and the CUDA graphs that replay them.

Owns: `prefill_chunk` (a prompt chunk into the cache, the last row's logits: the model call both token loops
and the prompt cache prefill with), the batch-1 `Decoder` (its decode graph, its prompt graphs, one per
length bucket: `PREFILL_BUCKETS`, and its verify graphs for speculative rounds: `VERIFY_MAX_ROWS`; a split
model's decode step replays graphs of its GPU blocks, split.DeviceGraphs) and the explicit `DecoderPool`
that keeps them across generations.
Not: the token loop and the text around it (generate.py), drafting (speculative.py), the batched engine's
steps (engine_step.py), graph capture itself (ops/graph.py), the cache layout (cache.py).
"""

from __future__ import annotations

import torch

from kiln.cache import KVCache, Step, layer_windows, plan_rings
from kiln.ops.graph import capture_graph
from kiln.split import DeviceGraphs, gpu_blocks


def prefill_chunk(model, ids: torch.Tensor, cache, pos: int) -> torch.Tensor:
    """Read prompt tokens ids (1, T) into `cache` at positions pos.. ; logits (1, V) of the last one."""
    return model(ids, Step.prefill(cache, pos), last_only=True)[:, -1].float().to(ids.device)  # split: head's


# Prompt lengths a prefill graph is captured for: a prompt of n tokens runs in the smallest that holds it, padded
# (at most ~50% more rows, whose cost is small beside the fixed cost of reading every weight once).
PREFILL_BUCKETS = (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)


# Rows a verify (Decoder.verify) takes in a captured graph: a speculative round's drafts plus one; more run eagerly.
VERIFY_MAX_ROWS = 64


def prefill_bucket(n: int, max_len: int) -> int | None:
    """The padded length a prompt of n tokens is prefilled at in a graph into a cache of max_len slots; None:
    none fits (eager)."""
    return next((b for b in PREFILL_BUCKETS if n <= b <= max_len), None)


class Decoder:
    """One batch-1 decode step, `logits = step(token, pos)`, and prompt chunks, `logits = prefill(ids, pos)`;
    on CUDA both replay captured graphs.

    The decode graph reads its inputs from static buffers (token, position as a device tensor) and writes
    static logits, so a step costs one graph launch and no host synchronization. A prompt from position 0
    runs in the graph of its length's bucket (PREFILL_BUCKETS): the ids padded into a static buffer, the
    logits of its last real row picked by a device index. A prefill's host work (about 0.5-2 ms per layer
    of Python and launches on the H200's host) is then one launch; padded rows sit after the prompt, so
    causal attention keeps them out of every real row, and their cache slots are overwritten by the tokens
    that follow before anything reads them (a ring layer's would not be: it sends them to its scratch slot,
    Step.prefill's `valid`). A bucket is captured on its second use, so a one-shot prompt
    pays no capture; the prefill graphs share one memory pool (they never run at once), and their logits
    are valid until the next prefill.
    """

    def __init__(self, model, cache: KVCache, use_graph: bool | None = None):
        self.model, self.cache = model, cache
        device = cache.k.device
        self.use_graph = device.type == "cuda" if use_graph is None else use_graph
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.graph, self.logits = None, None
        self.graphs = DeviceGraphs() if gpu_blocks(model) and use_graph is not False else None  # a split's
        self._prefills: dict[int, tuple] = {}  # bucket -> (graph, ids buffer, row index, real rows, logits)
        self._verifies: dict[int, tuple] = {}  # rows T -> (graph, ids buffer, position, logits (T, V))
        self._seen: set = set()  # prefill buckets and ("verify", T) used once (captured at the second use)
        self._pool = None

    @classmethod
    def for_model(cls, model, max_len: int, cache_type_k: str | None = None,
                  cache_type_v: str | None = None, rings: list | None = None) -> Decoder:
        """A Decoder over a fresh cache of `max_len` positions (stored as cache_type_k / _v; None: the model's
        dtype; `rings`: the bounded layers, cache.plan_rings), on the model's device (a split model's: each
        layer's on its own, kiln/split.py)."""
        return cls(model, KVCache.for_model(model, max_len=max_len, type_k=cache_type_k, type_v=cache_type_v,
                                            rings=rings))

    def _forward(self, step: Step) -> torch.Tensor:
        """The decode step's model call: `self.token` where `step` says (eager: Step.prefill at an int
        position; in a graph: Step.graph at the static position tensor)."""
        return self.model(self.token, step)[:, -1].float().to(self.token.device)  # (1, V); split: from the head's

    def capture(self, pos: int):
        """Warm up and capture; writes only the cache's last slot (still masked when real steps read it), or
        with ring layers the slots of `pos`, the step about to run (it overwrites them before reading)."""
        self.pos.fill_(pos if self.cache.rings else self.cache.max_len - 1)
        self.graph, self.logits = capture_graph(lambda: self._forward(Step.graph(self.cache, self.pos)))

    def step(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        self.token.copy_(token.view(1, 1))
        if not self.use_graph:
            return self._forward(Step.prefill(self.cache, pos, graphs=self.graphs))
        if self.graph is None:
            self.capture(pos)
        self.pos.fill_(pos)
        self.graph.replay()
        return self.logits

    def prefill(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        """Read prompt tokens ids (1, T) (on the cache's device) into the cache at positions pos.. ; logits
        (1, V) float32 of the last one (`prefill_chunk`, from a graph where one serves)."""
        t = ids.shape[1]
        bucket = prefill_bucket(t, self.cache.max_len) if self.use_graph and pos == 0 else None
        if bucket is None or (bucket not in self._prefills and bucket not in self._seen):
            if bucket is not None:
                self._seen.add(bucket)
            return prefill_chunk(self.model, ids, self.cache, pos)
        if bucket not in self._prefills:
            self._prefills[bucket] = self._capture_prefill(bucket)
        graph, buf, row, valid, logits = self._prefills[bucket]
        buf[:, :t].copy_(ids)
        row.fill_(t - 1)
        valid.fill_(t)
        graph.replay()
        return logits

    def verify(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        """Read a few tokens ids (1, T) into the cache at positions pos.. (any pos); logits (T, V) float32 of
        every row: speculative decoding's check of T - 1 drafts, and a draft model's catch-up. On CUDA from a
        graph per T (Step.graph over the static cache, as the decode step), captured at its second use while
        the slots it writes as it is captured (the last T) lie past pos; valid until the next verify."""
        t = ids.shape[1]
        entry = self._verifies.get(t)
        if entry is None:
            graphable = (self.use_graph and not self.cache.rings and t <= VERIFY_MAX_ROWS
                         and pos + t <= self.cache.max_len - t)
            if not graphable or ("verify", t) not in self._seen:
                self._seen.add(("verify", t))
                return self.model(ids, Step.prefill(self.cache, pos))[0].float()
            buf = torch.zeros(1, t, dtype=torch.long, device=ids.device)
            at = torch.full((), self.cache.max_len - t, dtype=torch.long, device=ids.device)
            self._pool = self._pool or torch.cuda.graph_pool_handle()
            graph, logits = capture_graph(lambda: self.model(buf, Step.graph(self.cache, at))[0].float(), self._pool)
            entry = self._verifies[t] = (graph, buf, at, logits)
        graph, buf, at, logits = entry
        buf.copy_(ids)
        at.fill_(pos)
        graph.replay()
        return logits

    def _capture_prefill(self, bucket: int) -> tuple:
        device = self.cache.k.device
        buf = torch.zeros(1, bucket, dtype=torch.long, device=device)  # pads: token 0, after the prompt
        row = torch.zeros(1, dtype=torch.long, device=device)
        # Ring layers write only the `valid` real rows (0 while capturing: nothing) and send the padding to
        # their scratch slot; a cache without rings takes the padding, overwritten before it is read.
        valid = torch.zeros((), dtype=torch.long, device=device)
        step = Step.prefill(self.cache, 0, valid=valid if self.cache.rings else None)
        self._pool = self._pool or torch.cuda.graph_pool_handle()
        graph, logits = capture_graph(lambda: self.model(buf, step, last_only=row)[:, -1].float(), self._pool)
        return graph, buf, row, valid, logits


class DecoderPool:
    """The Decoders of one model, kept across generations so a cache is allocated and its graph captured once
    per size. Sizes round up to a multiple of 256 (nearby requests share one); the last `keep` sizes stay.
    One generation at a time per pool (concurrent sequences: the engine)."""

    decoder_class = Decoder  # tensor parallelism's rank 0 makes Decoders that announce their calls (launch.py)

    def __init__(self, model, keep: int = 2):
        self.model, self.keep = model, keep
        self._decoders: dict[tuple, Decoder] = {}

    def get(self, max_len: int, cache_type_k: str | None = None, cache_type_v: str | None = None, *,
            sliding: bool = True, max_kv_size: int | None = None, keep: int = 4) -> Decoder:
        """A Decoder whose cache holds at least `max_len` positions, stored as the given cache types; its
        sliding-window layers keep only their window (`sliding`), and with `max_kv_size` every layer only its
        first `keep` positions and the latest ones (cache.plan_rings)."""
        size = min(-(-max_len // 256) * 256, max(max_len, self.model.args.max_position_embeddings))
        rings = plan_rings(layer_windows(self.model), size, max_kv_size, keep, sliding)
        key = (size, cache_type_k, cache_type_v, tuple(rings or ()))
        if key not in self._decoders:
            while len(self._decoders) >= self.keep:
                self._decoders.pop(next(iter(self._decoders)))
            self._decoders[key] = self.decoder_class.for_model(self.model, size, cache_type_k, cache_type_v, rings)
        return self._decoders[key]
