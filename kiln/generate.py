"""Generation: the batch-1 token loop and the pieces it shares with the batched engine (kiln/engine.py).

Owns: `generate_step` (token ids in, one (token, logprobs) per step out, until the cache is full, or on
past it with a `ContextShift`), `stream_generate` / `generate` (prompt handling, context checks, which
layers get a bounded cache, the text stream, stats per response); and, once for both token loops: prompt
ids (`prompt_ids`, `check_prompt`), the model calls of each kind (`prefill_chunk`, `Decoder._forward`; the
engine's batched-rows call is its own), the batch-1 `Decoder` (its decode graph and its prompt graphs, one
per length bucket: `PREFILL_BUCKETS`; a split model's decode step replays graphs of its GPU blocks,
split.DeviceGraphs) and the explicit `DecoderPool` that reuses them.
Not: sampling math and per-sequence sampling state (sample.py), detokenization and stop strings
(textstream.py), the cache layout (cache.py), chat templates (tokenizer.py), batching (engine.py).
"""

from __future__ import annotations

import collections
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

import torch

from kiln.cache import KVCache, Step, layer_windows, plan_rings
from kiln.errors import KilnError
from kiln.models.base import key_rotation
from kiln.ops.graph import capture_graph
from kiln.sample import Sampler, SamplingParams
from kiln.split import DeviceGraphs, gpu_blocks
from kiln.speculative import drafter_for, speculative_step
from kiln.textstream import TextStream
_SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}
_ALIASES = {"temp": "temperature"}


@dataclass
class GenerationResponse:
    text: str  # text completed by this step (may be empty while a character or stop string is pending)
    token: int
    logprobs: torch.Tensor | None  # (V,) log-probabilities of this step's distribution (None: not asked for)
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB so far, read at the first and last response and every 64th (a read of torch's
    #                     allocator statistics takes ~0.3 ms of host time: more than a small model's decode step)
    finish_reason: str | None = None  # "stop", "length" or None while generating
    drafted: int = 0  # speculative decoding: draft tokens proposed so far, and how many the model kept
    accepted: int = 0


def sampling_params(**kw) -> SamplingParams:
    kw = {_ALIASES.get(k, k): v for k, v in kw.items()}
    unknown = sorted(set(kw) - _SAMPLING_FIELDS)
    if unknown:
        raise KilnError(f"unknown sampling argument(s) {unknown}; known: {sorted(_SAMPLING_FIELDS)}")
    try:
        return SamplingParams(**kw)
    except (TypeError, ValueError) as e:
        raise KilnError(f"invalid sampling value: {e}") from None


class ContextFull(KilnError):
    """The prompt leaves no room for a generated token in the context (the server's context_length_exceeded)."""


def prompt_ids(tokenizer, prompt) -> list[int]:
    """A str is used as is, a list of chat messages gets the chat template, a list of ints is ids."""
    if isinstance(prompt, (str, list, tuple)) and not prompt:  # empty even where the tokenizer adds a BOS
        raise KilnError("the prompt is empty: give at least one token of text")
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    if isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt):
        return tokenizer.chat_ids(list(prompt), add_generation_prompt=True)  # message text is encoded as text
    raise KilnError("prompt must be a string, a list of chat messages (dicts) or a list of token ids")


def check_prompt(ids: list[int], context: int, vocab: int, fix: str = "raise the context size") -> list[int]:
    """The ids, if a model with `vocab` ids can generate after them within `context` positions; else KilnError
    (ContextFull when too long; `fix` says how to get a larger context)."""
    if not ids:
        raise KilnError("the prompt is empty: give at least one token of text")
    bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab), None)
    if bad is not None:
        raise KilnError(f"prompt token id {bad!r} is outside the vocabulary (0..{vocab - 1})")
    if len(ids) >= context:
        raise ContextFull(f"the prompt has {len(ids)} tokens but the context holds {context}; shorten the "
                          f"prompt or {fix}")
    return ids


# ---------------------------------------------------------------------------------------------------------------
# Model calls and CUDA graphs (shared with engine.py)
# ---------------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------------
# The token loop and the text around it
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ContextShift:
    """llama.cpp's --context-shift: when a token would go to position n_ctx, positions keep..keep+discard-1
    are dropped, discard = (n_ctx - keep) // 2, and the later ones move down with their keys re-rotated
    (KVCache.shift; `rotate` from models.base.key_rotation), and generation goes on."""
    n_ctx: int
    keep: int
    rotate: Callable

    @property
    def discard(self) -> int:
        return (self.n_ctx - self.keep) // 2


@torch.inference_mode()
def generate_step(prompt: list[int], model, params: SamplingParams, decoder: Decoder,
                  prefill_step: int | None = None, logprobs: bool = True,
                  max_tokens: int | None = None, cached: int = 0,
                  shift: ContextShift | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (token, logprobs (V,) or None) for each generated token; the caller decides when to stop,
    or `max_tokens` does (no step is run ahead for a token past it: `--max-tokens 1` captures no decode
    graph). `cached`: the first `cached` prompt tokens are in the decoder's cache already (a prompt cache
    file), fewer than the prompt's. `prefill_step`: prompt tokens per forward, at most (default: the largest
    prefill graph on CUDA, 4096; 512 elsewhere); chunks bound activation memory. Generation ends when the
    cache is full, or with `shift` goes on past shift.n_ctx (ContextShift).

    On CUDA the device runs up to `AHEAD` steps ahead of the host: steps n+1 and n+2 are queued before
    token n is read back, so the host's bookkeeping (and its jitter) overlaps the GPU's work. Elsewhere
    nothing runs ahead (a CPU step is synchronous: a step run ahead of a stop would only be wasted).
    """
    cache = decoder.cache
    device = cache.k.device
    ids = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
    params.check_vocab(model.args.vocab_size)
    sampler = Sampler(params, prompt, model.args.vocab_size, device)
    on_gpu = device.type == "cuda"
    ahead = AHEAD if on_gpu else 0

    def pick(logits):  # (1, V) float32 → token (1,), logprobs (V,) or None; all on the device
        lp = logits.log_softmax(-1)[0] if logprobs else None
        token = sampler(logits)
        sampler.accept(token)
        return token, lp

    prefill_step = prefill_step or (PREFILL_BUCKETS[-1] if on_gpu else 512)
    for start in range(cached, ids.shape[1], prefill_step):
        logits = decoder.prefill(ids[:, start:start + prefill_step], start)
    pos = ids.shape[1]  # where the newest queued token goes when it is fed back
    buffers = [torch.empty(1, dtype=torch.long, pin_memory=on_gpu) for _ in range(ahead + 1)]
    pending: collections.deque = collections.deque()  # (host buffer, ready event, logprobs) queued, unread

    def queue(token, lp, i):  # the i-th token (from 0): its copy to the host, in buffer i mod (ahead + 1)
        host = buffers[i % len(buffers)]  # (at most ahead + 1 are unread at once: no two share a buffer)
        host.copy_(token, non_blocking=on_gpu)
        ready = torch.cuda.Event() if on_gpu else None
        if ready is not None:
            ready.record()
        pending.append((host, ready, lp))

    token, lp = pick(logits)
    queue(token, lp, 0)
    queued = 1  # tokens queued so far, the first one (from the prompt's logits) included
    while True:
        while (len(pending) <= ahead and (pos < cache.max_len or shift is not None)
               and (max_tokens is None or queued < max_tokens)):
            if shift is not None and pos >= shift.n_ctx:
                cache.shift(pos, shift.keep, shift.discard, shift.rotate)
                pos -= shift.discard
            token, lp = pick(decoder.step(token, pos))
            pos += 1
            queue(token, lp, queued)
            queued += 1
        if not pending:
            return
        host, ready, lp_n = pending.popleft()
        if ready is not None:
            ready.synchronize()
        yield int(host[0]), lp_n


AHEAD = 2  # decode steps queued beyond the token the host reads next (CUDA)


def stream_generate(model, tokenizer, prompt, max_tokens: int = 256, *, stop=None, ignore_eos: bool = False,
                    max_context: int | None = None, prefill_step: int | None = None, decoders: DecoderPool | None = None,
                    logprobs: bool = True, cache_type_k: str | None = None, cache_type_v: str | None = None,
                    prompt_cache=None, draft_model=None, num_draft_tokens: int = 4, prompt_lookup: int = 0,
                    max_kv_size: int | None = None, keep: int = 4, context_shift: bool = False,
                    **sampling) -> Iterator[GenerationResponse]:
    """Yield one GenerationResponse per generated token; the last one has finish_reason set.

    `cache_type_k`, `cache_type_v`: how the KV cache stores keys and values (kiln.kv_types.CACHE_TYPES: f32, f16,
    bf16, q8_0, q4_0, fp8; None: the model's dtype), llama.cpp's -ctk / -ctv.
    `prompt_cache`: a file from `kiln cache-prompt` (kiln/prompt_cache.py) made by this model: the longest
    common prefix of its tokens and the prompt's is read from it instead of prefilled.

    `decoders`: a DecoderPool to reuse caches (and captured CUDA graphs) across calls; a fresh one otherwise.
    `logprobs`: False leaves GenerationResponse.logprobs None and saves a launch per token (what `generate`
    and the CLI do: on a 0.6B model the host's launches, not the GPU, set the pace).
    Speculative decoding (speculative.py): `draft_model` (a kiln model with the same vocabulary) drafts
    `num_draft_tokens` per round, or `prompt_lookup=N` drafts by matching the context's last n-gram (n <= N)
    earlier in it; the target verifies a round in one forward. The output is distributed as without it
    (greedy: the same tokens); responses count `drafted` and `accepted` tokens.
    Bounded caches (cache.plan_rings): sliding-window layers keep only their window (except with speculative
    decoding or a prompt cache, which keep every position); `max_kv_size=N` keeps the first `keep` tokens
    and the latest ones, N in all, and the model attends only to those (mlx-lm's rotating cache).
    `context_shift`: when the context (`max_context`) fills, drop half of what follows the first `keep`
    tokens and go on (llama.cpp's --context-shift); without it generation ends there, finish_reason "length".
    """
    params = sampling_params(**sampling)
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise KilnError(f"invalid max_tokens {max_tokens!r}: must be an integer >= 1")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) for s in stops):
        raise KilnError("stop must be a string or a list of strings")
    ctx = max_context or model.args.max_position_embeddings
    ids = check_prompt(prompt_ids(tokenizer, prompt), ctx, model.args.vocab_size)
    speculative = draft_model is not None or bool(prompt_lookup)
    bounds = _bounds(model, ids, ctx, max_kv_size, keep, context_shift, speculative, prompt_cache is not None)
    limit = len(ids) + max_tokens if context_shift else min(len(ids) + max_tokens, ctx)
    cached, stored = 0, None
    if prompt_cache is not None:
        from kiln import prompt_cache as pc
        header, parts = stored = pc.load(prompt_cache, model, tokenizer)
        cache_type_k, cache_type_v = cache_type_k or header["type_k"], cache_type_v or header["type_v"]
        while cached < min(len(header["tokens"]), len(ids) - 1) and header["tokens"][cached] == ids[cached]:
            cached += 1
    decoder = (decoders or DecoderPool(model, keep=1)).get(min(limit, ctx), cache_type_k, cache_type_v,
                                                            max_kv_size=max_kv_size, keep=keep, sliding=bounds)
    shift = ContextShift(ctx, min(keep, len(ids)), key_rotation(model, ctx)) if context_shift else None
    if stored is not None:
        pc.restore(decoder.cache, *stored, cached)
    drafter = drafter_for(draft_model, prompt_lookup, decoder.cache.max_len, target=model)
    if drafter is not None and cached:
        raise KilnError("speculative decoding does not take a prompt cache yet: give one or the other")
    stats = {}
    if drafter is None:
        steps = generate_step(ids, model, params, decoder, prefill_step, logprobs=logprobs, max_tokens=max_tokens,
                              cached=cached, shift=shift)
    else:
        steps = speculative_step(ids, model, params, decoder, drafter, num_draft_tokens, prefill_step, logprobs,
                                 max_tokens, stats)
    yield from _stream(tokenizer, ids, steps, decoder, limit, max_tokens, stops, ignore_eos, stats)


def _bounds(model, ids, ctx, max_kv_size, keep, context_shift, speculative, prompt_cache) -> bool:
    """Check the bounded-cache arguments; whether sliding-window layers keep only their window (not with
    speculative decoding, which rewinds, nor a prompt cache file, which stores every position, nor a context
    shift that would drop tokens a window still needs)."""
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 0:
        raise KilnError(f"invalid keep {keep!r}: must be an integer >= 0")
    if max_kv_size is not None and (context_shift or speculative or prompt_cache):
        raise KilnError("max_kv_size (a rotating KV cache) does not combine with context_shift, speculative "
                        "decoding or a prompt cache: give one or the other")
    if context_shift and (speculative or ctx - min(keep, len(ids)) < 2):
        raise KilnError("context_shift needs a context of at least keep + 2 tokens and no speculative decoding")
    windows = [w for w in layer_windows(model) if w]
    kept = ctx - min(keep, len(ids)) - (ctx - min(keep, len(ids))) // 2  # positions after the first shift
    return not (speculative or prompt_cache or (context_shift and windows and kept < max(windows)))


def _stream(tokenizer, ids, steps, decoder, limit, max_tokens, stops, ignore_eos, stats):
    text, eos = TextStream(tokenizer, stops), set(tokenizer.eos_token_ids)
    tic, prompt_tps, t_first, peak = time.perf_counter(), 0.0, None, 0.0
    for n, (token, logprobs) in enumerate(steps, 1):
        if t_first is None:
            t_first = time.perf_counter()
            prompt_tps = len(ids) / max(t_first - tic, 1e-9)
        is_eos = token in eos and not ignore_eos
        finish = "stop" if is_eos else "length" if n >= max_tokens or len(ids) + n >= limit else None
        emit = text.step(None if is_eos else token, finish)
        gen_tps = (n - 1) / max(time.perf_counter() - t_first, 1e-9) if n > 1 else 0.0
        if n == 1 or n % 64 == 0 or text.finish:
            peak = peak_memory_gb(decoder.cache.k.device)
        yield GenerationResponse(emit, token, logprobs, len(ids), prompt_tps, n, gen_tps, peak, text.finish,
                                 stats.get("drafted", 0), stats.get("accepted", 0))
        if text.finish:
            return


def peak_memory_gb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return rss * 1024 / 1e9


def generate(model, tokenizer, prompt, max_tokens: int = 256, verbose: bool = False, **kw) -> str:
    """The whole generated text; with verbose, stream it to stdout and print speed."""
    text, last = [], None
    kw.setdefault("logprobs", False)
    for last in stream_generate(model, tokenizer, prompt, max_tokens, **kw):
        text.append(last.text)
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print(f"\n==========\nPrompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens-per-sec\n"
              f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens-per-sec\n"
              f"Peak memory: {last.peak_memory:.2f} GB", file=sys.stderr)
    return "".join(text)
