"""Generation: the batch-1 token loop and the text around it.

Owns: `generate_step` (token ids in, one (token, logprobs) per step out, until the cache is full, or on
past it with a `ContextShift`), `stream_generate` / `generate` (prompt handling, context checks, which
layers get a bounded cache, the text stream, stats per response).
Not: the model calls and their CUDA graphs (decoder.py: `Decoder`, `DecoderPool`, `prefill_chunk`, shared
with the engine), prompt ids and their checks (tokenizer.prompt_ids / check_prompt), sampling math and
per-sequence sampling state (sample.py), detokenization and stop strings (textstream.py), the cache layout
(cache.py), batching (engine.py).
"""

from __future__ import annotations

import collections
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

import torch

from kiln.cache import layer_windows
from kiln.decoder import PREFILL_BUCKETS, Decoder, DecoderPool
from kiln.errors import KilnError
from kiln.models.base import key_rotation
from kiln.sample import Sampler, SamplingParams
from kiln.speculative import drafter_for, speculative_step
from kiln.textstream import TextStream
from kiln.tokenizer import check_prompt, prompt_ids
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
