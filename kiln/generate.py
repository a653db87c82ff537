"""Generation: chunked prefill, the decode step, and the generators everything else consumes.

Owns: `generate_step` (token ids in, one (token, logprobs) per step out, forever), `stream_generate`
(prompt handling, context checks, detokenization, stop strings, EOS, stats per response) and `generate`.
Not: sampling math (sample.py), the cache layout (cache.py), chat templates (tokenizer.py).
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch

from kiln.cache import KVCache, Step
from kiln.errors import KilnError
from kiln.sample import SamplingParams, apply_bias, apply_penalties, bias_vector, sample

_SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}
_ALIASES = {"temp": "temperature"}


@dataclass
class GenerationResponse:
    text: str  # text completed by this step (may be empty while a character or stop string is pending)
    token: int
    logprobs: torch.Tensor | None  # (V,) log-probabilities of this step's distribution
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: str | None = None  # "stop", "length" or None while generating


def sampling_params(**kw) -> SamplingParams:
    kw = {_ALIASES.get(k, k): v for k, v in kw.items()}
    unknown = sorted(set(kw) - _SAMPLING_FIELDS)
    if unknown:
        raise KilnError(f"unknown sampling argument(s) {unknown}; known: {sorted(_SAMPLING_FIELDS)}")
    try:
        return SamplingParams(**kw)
    except (TypeError, ValueError) as e:
        raise KilnError(f"invalid sampling value: {e}") from None


class Decoder:
    """One batch-1 decode step, `logits = step(token, pos)`; on CUDA replayed from one captured graph.

    The graph reads its inputs from static buffers (token, position as a device tensor) and writes
    static logits, so a step costs one graph launch and no host synchronization.
    """

    def __init__(self, model, cache: KVCache, use_graph: bool | None = None):
        self.model, self.cache = model, cache
        device = cache.k.device
        self.use_graph = device.type == "cuda" if use_graph is None else use_graph
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.graph, self.logits = None, None

    def _forward(self) -> torch.Tensor:
        return self.model(self.token, Step.graph(self.cache, self.pos))[:, -1].float()  # (1, V)

    def capture(self):
        """Warm up (Triton compiles, autotunes) then capture; writes only the cache's last slot."""
        self.pos.fill_(self.cache.max_len - 1)  # a slot still masked when the real steps read it
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()

    def step(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        self.token.copy_(token.view(1, 1))
        if not self.use_graph:
            return self.model(self.token, Step.prefill(self.cache, pos))[:, -1].float()
        if self.graph is None:
            self.capture()
        self.pos.fill_(pos)
        self.graph.replay()
        return self.logits


def decoder_for(model, max_len: int) -> Decoder:
    """A Decoder with a cache of at least `max_len` slots, reused across calls (capture is paid once).

    Cache lengths are rounded up to a multiple of 256 so that nearby requests share one captured graph;
    the last two sizes are kept on the model. The cache is the model's: one generation at a time per
    model (a concurrent server needs its own caches).
    """
    p = next(model.parameters())
    size = min(-(-max_len // 256) * 256, max(max_len, model.args.max_position_embeddings))
    pool = model.__dict__.setdefault("_kiln_decoders", {})
    if size not in pool:
        while len(pool) >= 2:
            pool.pop(next(iter(pool)))
        pool[size] = Decoder(model, KVCache.for_model(model, max_len=size, dtype=p.dtype, device=p.device))
    return pool[size]


@torch.inference_mode()
def generate_step(prompt: list[int], model, params: SamplingParams, decoder: Decoder,
                  prefill_step: int = 512, logprobs: bool = True) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (token, logprobs (V,) or None) for each generated token; the caller decides when to stop.

    The device runs one step ahead of the host: step n+1 is queued before token n is read back, so
    the host's bookkeeping overlaps the GPU's work.
    """
    cache = decoder.cache
    device = cache.k.device
    ids = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
    vocab = model.args.vocab_size
    params.check_vocab(vocab)
    bias, gen = bias_vector(params, vocab, device), params.generator(device)
    counts = None
    if params.needs_counts:
        counts = torch.zeros(1, vocab, dtype=torch.int32, device=device)
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.int32))

    def pick(logits):  # (1, V) float32 → token (1,), logprobs (V,) or None; all on the device
        lp = logits.log_softmax(-1)[0] if logprobs else None
        if counts is not None:
            logits = apply_penalties(logits, counts, params)
        token = sample(apply_bias(logits, bias), params, gen)
        if counts is not None:
            counts[0, token] += 1
        return token, lp

    for start in range(0, ids.shape[1], prefill_step):  # chunked prefill bounds activation memory
        logits = model(ids[:, start:start + prefill_step], Step.prefill(cache, start), last_only=True)
    pos = ids.shape[1]
    token, lp = pick(logits[:, -1].float())
    host = torch.empty(1, dtype=torch.long, pin_memory=device.type == "cuda")
    ready = torch.cuda.Event() if device.type == "cuda" else None
    while True:
        host.copy_(token, non_blocking=ready is not None)
        if ready is not None:
            ready.record()
        more = pos < cache.max_len
        if more:  # queue the next step before waiting for this token
            nxt = pick(decoder.step(token, pos))
        if ready is not None:
            ready.synchronize()
        yield int(host[0]), lp
        if not more:
            return
        (token, lp), pos = nxt, pos + 1


def prompt_ids(tokenizer, prompt) -> list[int]:
    """A str is used as is, a list of chat messages gets the chat template, a list of ints is ids."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    if isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt):
        return tokenizer.chat_ids(list(prompt), add_generation_prompt=True)  # message text is encoded as text
    raise KilnError("prompt must be a string, a list of chat messages (dicts) or a list of token ids")


def stream_generate(model, tokenizer, prompt, max_tokens: int = 256, *, stop=None, ignore_eos: bool = False,
                    max_context: int | None = None, prefill_step: int = 512,
                    **sampling) -> Iterator[GenerationResponse]:
    """Yield one GenerationResponse per generated token; the last one has finish_reason set."""
    params = sampling_params(**sampling)
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise KilnError(f"invalid max_tokens {max_tokens!r}: must be an integer >= 1")
    ids = prompt_ids(tokenizer, prompt)
    if not ids or prompt in ("", [], ()):  # empty text is empty even where the tokenizer adds a BOS
        raise KilnError("the prompt is empty: give at least one token of text")
    ctx = max_context or model.args.max_position_embeddings
    if len(ids) >= ctx:
        raise KilnError(f"the prompt has {len(ids)} tokens but the context holds {ctx}; shorten the "
                        f"prompt or raise the context size")
    stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
    decoder = decoder_for(model, min(len(ids) + max_tokens, ctx))
    limit = min(len(ids) + max_tokens, ctx)
    yield from _stream(model, tokenizer, ids, params, decoder, limit, max_tokens, stops, ignore_eos, prefill_step)


def _stream(model, tokenizer, ids, params, decoder, limit, max_tokens, stops, ignore_eos, prefill_step):
    detok, pending, eos = tokenizer.detokenizer(), "", set(tokenizer.eos_token_ids)
    tic, n, prompt_tps, t_first = time.perf_counter(), 0, 0.0, None
    for n, (token, logprobs) in enumerate(generate_step(ids, model, params, decoder, prefill_step), 1):
        if t_first is None:
            t_first = time.perf_counter()
            prompt_tps = len(ids) / max(t_first - tic, 1e-9)
        finish = None
        if token in eos and not ignore_eos:
            finish = "stop"
        else:
            pending += detok.add(token)
        emit, pending, hit = _split_stop(pending, stops)
        if hit:
            finish = "stop"
        elif n >= max_tokens or len(ids) + n >= limit:
            finish = finish or "length"
        if finish:
            emit += pending + ("" if hit else detok.flush())
        gen_tps = (n - 1) / max(time.perf_counter() - t_first, 1e-9) if n > 1 else 0.0
        yield GenerationResponse(emit, token, logprobs, len(ids), prompt_tps, n, gen_tps,
                                 peak_memory_gb(decoder.cache.k.device), finish)
        if finish:
            return


def _split_stop(pending: str, stops: list[str]) -> tuple[str, str, bool]:
    """(text safe to emit, text held back, stop string found). Text after a stop string is dropped."""
    if not stops:
        return pending, "", False
    hits = [i for i in (pending.find(s) for s in stops) if i >= 0]
    if hits:
        return pending[:min(hits)], "", True
    hold = max((k for s in stops for k in range(1, len(s)) if pending.endswith(s[:k])), default=0)
    return pending[:len(pending) - hold], pending[len(pending) - hold:], False


def peak_memory_gb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return rss * 1024 / 1e9


def generate(model, tokenizer, prompt, max_tokens: int = 256, verbose: bool = False, **kw) -> str:
    """The whole generated text; with verbose, stream it to stdout and print speed."""
    text, last = [], None
    for last in stream_generate(model, tokenizer, prompt, max_tokens, **kw):
        text.append(last.text)
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print(f"\n==========\nPrompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens-per-sec\n"
              f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens-per-sec\n"
              f"Peak memory: {last.peak_memory:.2f} GB", file=sys.stderr)
    return "".join(text)
