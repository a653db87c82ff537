"""Bounded KV caches (cache.Ring): sliding-window layers that keep only their window, the rotating cache of
max_kv_size (the first `keep` tokens and the latest ones, mlx-lm's), and llama.cpp's context shift.

References: a sliding-window ring must give the logits of the whole-context cache and of the uncached forward
(its window mask drops the same keys the ring drops), in one prefill, chunked prefills, eager and
CUDA-graph-form decode steps, native and torch kernels; a rotating cache the full cache's while the sequence
fits, and beyond it `_reference_forward`, an explicit forward whose every query attends to the first `keep`
positions and the last max_kv_size - keep; a context shift the forward of a fresh model over the kept tokens
at their new positions (one layer: its keys depend on nothing else), and, with several layers, the explicit
forward with the dropped tokens masked from the queries after the shift (keep 0: every kept token moves by
the same distance). Tiny random configs run in well under a second each (on a quiet machine); Gemma 3 270M's
real config gives the memory at 32k (on the meta device), its tokenizer the front door (finish reasons, a
shift past the context, argument checks); mlx-lm, where installed, the positions a rotating cache keeps.
bench/bounded_check.py compares ring and whole cache on the real weights (too slow for this file).
"""

import pytest
import torch
import torch.nn.functional as F

import kiln
from kiln.cache import KVCache, Ring, Step, layer_windows, plan_rings
from kiln.errors import KilnError
from kiln.decoder import Decoder
from kiln.generate import ContextShift, generate_step
from kiln.load import build_model
from kiln.models.base import key_rotation, ring_mask
from kiln.ops import rope_qk_ref
from kiln.policy import Policy
from kiln.sample import SamplingParams

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)
GEMMA = dict(TINY, model_type="gemma3", head_dim=32, rope_theta=1e6, rope_local_base_freq=1e4, sliding_window=5,
             query_pre_attn_scalar=24, num_hidden_layers=4,
             layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"])
LLAMA = dict(TINY, model_type="llama", rope_theta=10000.0, num_hidden_layers=3)
TORCH = Policy(native=False)


def _meta(cfg: dict):
    """The model of cfg on the meta device (no weights)."""
    import importlib
    mod = importlib.import_module(f"kiln.models.{cfg['model_type']}")
    with torch.device("meta"):
        return mod.Model(mod.ModelArgs.from_dict(cfg))


def _weights(cfg: dict) -> dict:
    g = torch.Generator().manual_seed(0)
    return {n: (torch.rand(p.shape, generator=g) - 0.5 if "norm" in n else torch.randn(p.shape, generator=g) * 0.15)
            for n, p in _meta(cfg).named_parameters()}


def _tiny(cfg: dict, **over):
    cfg = dict(cfg, **over)
    return build_model(cfg, _weights(cfg))


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _cached(model, ids, cache, chunk, policy=None, graph_from=None):
    """Logits (1, T, V) of ids read through `cache` in chunks of `chunk` tokens; from position graph_from on,
    one token a step in the CUDA-graph form (the position a device tensor, the static cache's write)."""
    out, pos = [], 0
    while pos < ids.shape[1]:
        n = 1 if graph_from is not None and pos >= graph_from else chunk
        step = (Step.graph(cache, torch.tensor(pos), policy) if graph_from is not None and pos >= graph_from
                else Step.prefill(cache, pos, policy))
        out.append(model(ids[:, pos:pos + n], step))
        pos += n
    return torch.cat(out, 1)


# ---------------------------------------------------------------- sliding-window rings

@pytest.mark.parametrize("chunk, policy", [(40, None), (7, None), (5, None), (2, None), (1, None), (1, TORCH)],
                         ids=["prefill", "chunks-7", "chunks-5", "chunks-2", "decode-native", "decode-torch"])
def test_sliding_ring_equals_full_cache(chunk, policy):
    model = _tiny(GEMMA)
    ids = _ids(40)  # 8 windows of 5
    rings = plan_rings(layer_windows(model), 64)
    assert rings == [Ring(0, 5), Ring(0, 5), None, Ring(0, 5)]
    ring, full = KVCache.for_model(model, max_len=64, rings=rings), KVCache.for_model(model, max_len=64)
    with torch.no_grad():
        ref = model(ids)
    got, want = _cached(model, ids, ring, chunk, policy), _cached(model, ids, full, chunk, policy)
    assert (want - ref).abs().max() < 1e-4
    assert (got - want).abs().max() < 1e-4, f"chunk {chunk}: ring vs full {(got - want).abs().max():.2e}"
    assert ring.k[0].shape[2] == 6 and ring.k[2].shape[2] == 64  # a window layer: 5 slots + scratch
    assert ring.nbytes < 0.35 * full.nbytes


def test_sliding_ring_graph_steps_and_quantized_types():
    """The CUDA-graph form of a decode step (device position, index_copy into the ring, mask from the ring's
    positions) and a q8_0 cache: the same logits as the full cache of the same type."""
    model = _tiny(GEMMA)
    ids = _ids(24, seed=2)
    rings = plan_rings(layer_windows(model), 32)
    # q8_0: ring and full attend over keys in another order, so SDPA may round a last bit differently (it
    # does on AMD EPYC, not on Xeon), and a code of the next token's stored keys can flip: logits move by
    # ~1e-3. Keys taken from wrong slots move them by ~0.1 and more.
    for kind, tol in ((None, 1e-4), ("q8_0", 1e-2)):
        ring = KVCache.for_model(model, max_len=32, type_k=kind, type_v=kind, rings=rings)
        full = KVCache.for_model(model, max_len=32, type_k=kind, type_v=kind)
        got, want = _cached(model, ids, ring, 6, graph_from=8), _cached(model, ids, full, 6, graph_from=8)
        assert (got - want).abs().max() < tol, f"{kind}: {(got - want).abs().max():.2e}"


def test_a_split_model_keeps_rings_per_layer_device():
    """A model split between two places (kiln/split.py; "cpu" and "cpu:0" cross as CPU and GPU do): each
    layer's ring on its own device, the logits of the unsplit model's full cache."""
    from kiln.load import build_split
    from kiln.split import Place
    places = [Place("cpu", False)] * 2 + [Place("cpu:0", False)] * 2
    split = build_split(GEMMA, _weights(GEMMA), places, Place("cpu:0", False), TORCH)
    model, ids = _tiny(GEMMA), _ids(20, seed=10)
    ring = KVCache.for_model(split, max_len=32, rings=plan_rings(layer_windows(split), 32))
    assert ring.k[1].shape[2] == 6 and ring.k[2].shape[2] == 32
    got, want = _cached(split, ids, ring, 3), _cached(model, ids, KVCache.for_model(model, max_len=32), 3)
    assert (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("t", [3, 9])
def test_a_padded_prompt_keeps_only_its_real_rows(t):
    """A prompt graph's form (Decoder.prefill on CUDA): t real tokens padded to 16 rows, `valid` = t on the
    device; the padding goes to the scratch slot, so the decode steps after it see what an unpadded prompt
    left (t = 9: more real rows than the window of 5, then padding that would overwrite all of them)."""
    model = _tiny(GEMMA)
    ids = _ids(t + 6, seed=9)
    padded = torch.cat([ids[:, :t], torch.zeros(1, 16 - t, dtype=torch.long)], 1)
    rings = plan_rings(layer_windows(model), 32)
    a, b = KVCache.for_model(model, max_len=32, rings=rings), KVCache.for_model(model, max_len=32, rings=rings)
    with torch.no_grad():
        first = model(padded, Step.prefill(a, 0, valid=torch.tensor(t)))[:, t - 1]
        ref = model(ids[:, :t], Step.prefill(b, 0))[:, -1]
        assert (first - ref).abs().max() < 1e-5
        for p in range(t, t + 6):
            got, want = model(ids[:, p:p + 1], Step.prefill(a, p)), model(ids[:, p:p + 1], Step.prefill(b, p))
            assert (got - want).abs().max() < 1e-5, p


def test_a_decoder_pool_bounds_sliding_layers_and_generates_the_same():
    """Through generate_step: the default (ring) decoder and a whole-context one pick the same tokens with the
    same log-probabilities, prompt longer than the window, eager decode."""
    from kiln.decoder import DecoderPool
    model = _tiny(GEMMA)
    prompt = _ids(13, seed=3)[0].tolist()
    runs = []
    for sliding in (True, False):
        dec = DecoderPool(model).get(48, sliding=sliding)
        assert (dec.cache.rings is not None) == sliding
        runs.append(list(generate_step(prompt, model, SamplingParams(temperature=0.0), dec, prefill_step=4,
                                       max_tokens=12)))
    assert [t for t, _ in runs[0]] == [t for t, _ in runs[1]]
    assert max((a - b).abs().max().item() for (_, a), (_, b) in zip(*runs)) < 1e-4


def test_plan_rings():
    w = [512, 512, None]
    assert plan_rings(w, 4096) == [Ring(0, 512), Ring(0, 512), None]
    assert plan_rings(w, 512) is None  # the window covers the context: nothing to bound
    assert plan_rings(w, 4096, sliding=False) is None
    assert plan_rings([None, None], 4096) is None
    # rotating: every layer keeps `keep` + the latest, or only its window where that is shorter
    assert plan_rings(w, 4096, max_kv_size=1024, keep=4) == [Ring(0, 512), Ring(0, 512), Ring(4, 1020)]
    assert plan_rings(w, 4096, max_kv_size=256, keep=4) == [Ring(4, 252)] * 3
    assert plan_rings(w, 200, max_kv_size=256) is None
    for bad in (4, 0, -3, 2.5, True):
        with pytest.raises(KilnError, match="max_kv_size"):
            plan_rings(w, 4096, max_kv_size=bad, keep=4)

@pytest.mark.parametrize("types", [(None, None), ("q8_0", "f16")])
def test_bench_kv_bytes_match_what_a_bounded_cache_allocates(types):
    """kiln bench's KV line: bytes a token in every layer, and past the window what one more position costs a
    cache whose sliding layers are rings (measured from two allocated caches, not from the formula)."""
    from kiln.bench import _kv_bytes_per_token
    model = _tiny(GEMMA)
    kv = _kv_bytes_per_token(model, types)
    one = KVCache.for_model(model, max_len=1, type_k=types[0], type_v=types[1])
    assert kv["bytes_per_token"] == one.nbytes and (kv["layers"], kv["window_layers"], kv["window"]) == (4, 3, 5)

    def ringed(n):
        rings = plan_rings(layer_windows(model), n)
        return KVCache.for_model(model, max_len=n, type_k=types[0], type_v=types[1], rings=rings).nbytes
    assert kv["bytes_per_token_past_window"] == (ringed(96) - ringed(64)) // 32
    assert "window_layers" not in _kv_bytes_per_token(_tiny(LLAMA), (None, None))



def test_ring_slots_and_positions():
    r = Ring(2, 3)
    assert [r.slot(p) for p in range(9)] == [0, 1, 2, 3, 4, 2, 3, 4, 2]
    assert r.slot(torch.arange(9)).tolist() == [0, 1, 2, 3, 4, 2, 3, 4, 2]
    assert r.held(0, "cpu").tolist() == [-1] * 6  # the last: the scratch slot, never a key
    assert r.held(3, "cpu").tolist() == [0, 1, 2, -1, -1, -1]
    assert r.held(9, "cpu").tolist() == [0, 1, 8, 6, 7, -1]
    assert r.held(torch.tensor(9), "cpu").tolist() == [0, 1, 8, 6, 7, -1]


def test_gemma3_270m_cache_memory_drops(gemma_path):
    """Gemma 3 270M at its 32k context: 15 of 18 layers keep 512 slots instead of 32768 (bytes counted on the
    meta device: nothing allocated)."""
    from kiln.formats.gguf import read_gguf, to_config
    model = _meta(to_config(read_gguf(gemma_path)))
    ctx = model.args.max_position_embeddings
    assert ctx == 32768 and sum(w == 512 for w in layer_windows(model)) == 15
    full = KVCache.for_model(model, max_len=ctx, dtype=torch.bfloat16, device="meta")
    ring = KVCache.for_model(model, max_len=ctx, dtype=torch.bfloat16, device="meta",
                             rings=plan_rings(layer_windows(model), ctx))
    assert full.nbytes == 18 * 2 * 256 * ctx * 2
    assert ring.nbytes == (3 * ctx + 15 * 513) * 2 * 256 * 2  # 0.18 of it: 0.60 GB -> 0.11 GB (+ scratch)
    rot = KVCache.for_model(model, max_len=ctx, dtype=torch.bfloat16, device="meta",
                            rings=plan_rings(layer_windows(model), ctx, max_kv_size=1024))
    assert rot.nbytes == (3 * 1025 + 15 * 513) * 2 * 256 * 2


def test_fit_counts_the_sliding_window_rings():
    """`kiln fit`'s KV bytes follow the rings: 6 blocks, five with a window of 512, at 8192 positions."""
    from kiln.fit import ModelSizes, needs
    mib = 1 << 20
    s = ModelSizes(6, [mib] * 6, [mib] * 6, mib, mib, mib, mib, kv_elems=512, compute_elems=0, max_ctx=8192,
                   windows=[512] * 5 + [None])
    full = ModelSizes(**{**s.__dict__, "windows": None})
    assert needs(full, 6, 8192)[2] == 6 * 512 * 8192 * 2
    assert needs(s, 6, 8192)[2] == (5 * 513 + 8192) * 512 * 2
    assert needs(s, 2, 8192)[2:] == ((513 + 8192) * 512 * 2, 4 * 513 * 512 * 4)  # the last two on the GPU
    assert needs(s, 6, 300)[2] == needs(full, 6, 300)[2]  # a context inside the window: no ring


# ---------------------------------------------------------------- rotating cache (max_kv_size)

def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@torch.no_grad()
def _reference_forward(model, ids, visible):
    """Logits (1, T, V) of a Llama model with every layer's query p attending to the keys j of `visible`
    (T, T) bool, written out from the weights: RMSNorm, q/k/v, RoPE, softmax attention, SwiGLU."""
    a, body = model.args, model.model
    t = ids.shape[1]
    pos = torch.arange(t)
    x = body.embed_tokens(ids)  # (1, T, E)
    for blk in body.layers:
        at = blk.self_attn
        h = _rms(x, blk.input_layernorm.weight, a.rms_norm_eps)
        q = at.q_proj(h).view(1, t, -1, at.d)  # (1, T, H, D)
        k = at.k_proj(h).view(1, t, -1, at.d)
        v = at.v_proj(h).view(1, t, -1, at.d).transpose(1, 2)  # (1, K, T, D)
        q, k = rope_qk_ref(q, k, pos, body.rotary.inv_freq)
        q, k = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(at.h // at.kv, 1)
        scores = (q @ k.transpose(-1, -2)) * at.d ** -0.5  # (1, H, T, T)
        att = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v.repeat_interleave(at.h // at.kv, 1)
        x = x + at.o_proj(att.transpose(1, 2).reshape(1, t, -1))
        h = _rms(x, blk.post_attention_layernorm.weight, a.rms_norm_eps)
        m = blk.mlp
        x = x + m.down_proj(F.silu(m.gate_proj(h)) * m.up_proj(h))
    return model.lm_head(_rms(x, body.norm.weight, a.rms_norm_eps))


def _rotating_visible(t: int, max_kv_size: int, keep: int) -> torch.Tensor:
    p, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    return (j <= p) & ((j < keep) | (p - j < max_kv_size - keep))


def test_reference_forward_is_the_model():
    model = _tiny(LLAMA)
    ids = _ids(20)
    with torch.no_grad():
        assert (_reference_forward(model, ids, torch.ones(20, 20).tril().bool()) - model(ids)).abs().max() < 1e-4


@pytest.mark.parametrize("chunk", [30, 8, 1])
def test_rotating_cache_equals_full_then_keep_plus_window(chunk):
    model = _tiny(LLAMA)
    ids, m, keep = _ids(30, seed=4), 12, 4
    rings = plan_rings(layer_windows(model), 64, max_kv_size=m, keep=keep)
    assert rings == [Ring(4, 8)] * 3
    cache = KVCache.for_model(model, max_len=64, rings=rings)
    got = _cached(model, ids, cache, chunk)
    with torch.no_grad():
        full = model(ids)
    ref = _reference_forward(model, ids, _rotating_visible(30, m, keep))
    assert (got[:, :m] - full[:, :m]).abs().max() < 1e-4  # shorter than max_kv_size: the full cache's
    assert (got - ref).abs().max() < 1e-4
    assert (ref[:, m:] - full[:, m:]).abs().max() > 1e-2  # beyond it the two differ: the test can tell


def test_rotating_cache_on_gemma_keeps_windows_and_the_full_cache_while_it_fits():
    model = _tiny(GEMMA)
    ids = _ids(30, seed=5)
    rings = plan_rings(layer_windows(model), 64, max_kv_size=12, keep=4)
    assert rings == [Ring(0, 5), Ring(0, 5), Ring(4, 8), Ring(0, 5)]
    got = _cached(model, ids, KVCache.for_model(model, max_len=64, rings=rings), 7)
    with torch.no_grad():
        full = model(ids)
    assert (got[:, :12] - full[:, :12]).abs().max() < 1e-4
    assert (got[:, 12:] - full[:, 12:]).abs().max() > 1e-3


def _visible_sets(m: int, keep: int, chunks: list[int]):
    """Per query, the positions it attends to: (mlx-lm's RotatingKVCache, kiln's Ring) over the same chunks
    (each key's value is its position, so the returned keys and their mask name the positions)."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.models.cache import RotatingKVCache
    c, ring, pos, theirs, ours = RotatingKVCache(max_size=m, keep=keep), Ring(keep, m - keep), 0, [], []
    for n in chunks:
        x = mx.array(np.arange(pos, pos + n, dtype=np.float32).reshape(1, 1, n, 1))
        mask = c.make_mask(n, return_array=True) if n > 1 else None
        keys = np.array(c.update_and_fetch(x, x)[0]).reshape(-1).astype(int)
        vis = np.ones((n, len(keys)), bool) if mask is None else np.array(mask).reshape(n, -1).astype(bool)
        theirs += [sorted(keys[v].tolist()) for v in vis]
        q = torch.arange(pos, pos + n)
        k_pos = ring.held(pos + 1, "cpu") if n == 1 else torch.cat([ring.held(pos, "cpu"), q])
        ours += [sorted(k_pos[v].tolist()) for v in ring_mask(q, k_pos, ring, None)]
        pos += n
    return theirs, ours


def test_rotating_cache_keeps_what_mlx_lm_keeps():
    """mlx-lm itself (skipped where it is not installed): decode steps attend to the same positions, also
    after a prompt; a prompt chunk that runs past max_kv_size differs by design — mlx-lm's chunk queries see
    a plain window of max_kv_size keys (without the first `keep`), kiln's the kept ones and the latest."""
    pytest.importorskip("mlx_lm.models.cache")
    for chunks in ([1] * 30, [6] + [1] * 20, [30] + [1] * 10):
        theirs, ours = _visible_sets(12, 4, chunks)
        start = chunks[0] if chunks[0] > 12 else 0  # the long prompt's own queries: the documented difference
        assert theirs[start:] == ours[start:]
    theirs, ours = _visible_sets(12, 4, [30])
    assert theirs[20] == list(range(9, 21)) and ours[20] == [0, 1, 2, 3] + list(range(13, 21))


# ---------------------------------------------------------------- context shift

def _run_shift(model, prompt, n_ctx, keep, n, max_len=None):
    dec = Decoder.for_model(model, max_len or n_ctx)
    shift = ContextShift(n_ctx, keep, key_rotation(model, n_ctx))
    return list(generate_step(prompt, model, SamplingParams(temperature=0.0), dec, max_tokens=n, shift=shift))


@pytest.mark.parametrize("cfg", [LLAMA, GEMMA], ids=["llama", "gemma-local"])
def test_context_shift_continues_as_a_fresh_forward_over_the_kept_tokens(cfg):
    """One layer: its keys depend only on token and position, so after each shift the next distribution is
    exactly that of a fresh forward over the kept tokens at positions 0.. (five shifts in 40 tokens)."""
    model = _tiny(cfg, num_hidden_layers=1, layer_types=["sliding_attention"] if cfg is GEMMA else None)
    prompt, n_ctx, keep = _ids(6, seed=6)[0].tolist(), 16, 3
    steps = _run_shift(model, prompt, n_ctx, keep, 40)
    discard, cached, worst, shifts = (n_ctx - keep) // 2, list(prompt), 0.0, 0
    with torch.no_grad():
        for i, (token, lp) in enumerate(steps):
            if i:  # the previous token is fed at position len(cached): first a shift if the context is full
                if len(cached) >= n_ctx:
                    cached, shifts = cached[:keep] + cached[keep + discard:], shifts + 1
                cached.append(steps[i - 1][0])
            want = model(torch.tensor([cached]))[0, -1].float().log_softmax(-1)
            worst = max(worst, (lp - want).abs().max().item())
    assert shifts >= 3 and worst < 1e-4, f"{shifts} shifts, max |Δlogprob| {worst:.2e}"


def test_context_shift_with_several_layers_equals_masked_reference():
    """Three layers, one shift with keep 0: the logits after it equal the explicit forward over the whole
    sequence where the queries after the shift do not see the dropped tokens (every kept token moves by the
    same distance and RoPE sees only relative positions, so the re-rotated keys at their new positions act as
    those at the old ones; with keep > 0 the kept prefix moves closer, which the one-layer test checks)."""
    model = _tiny(LLAMA)
    prompt, n_ctx, keep, n = _ids(5, seed=7)[0].tolist(), 14, 0, 12
    steps = _run_shift(model, prompt, n_ctx, keep, n, max_len=32)
    seq = prompt + [t for t, _ in steps]
    discard, t = (n_ctx - keep) // 2, len(seq)
    visible = torch.ones(t, t).tril().bool()
    visible[n_ctx:, keep:keep + discard] = False  # queries from position n_ctx on (the shifted ones)
    ref = _reference_forward(model, torch.tensor([seq]), visible)[0].log_softmax(-1)  # (T, V)
    got = torch.stack([lp for _, lp in steps])  # step i: the distribution after seq[:len(prompt) + i]
    want = ref[len(prompt) - 1:len(prompt) - 1 + n]
    assert (got - want).abs().max() < 1e-4
    unshifted = model(torch.tensor([seq]))[0].log_softmax(-1)[len(prompt) - 1:len(prompt) - 1 + n]
    assert (got[-2:] - unshifted[-2:]).abs().max() > 1e-3  # the shift is really there


def test_context_shift_refuses_a_window_it_would_break():
    model = _tiny(GEMMA, num_hidden_layers=1, layer_types=["sliding_attention"])
    dec = Decoder.for_model(model, 8, rings=plan_rings(layer_windows(model), 8))
    shift = ContextShift(8, 4, key_rotation(model, 8))  # 2 dropped of 8: the window of 5 would lose a token
    with pytest.raises(KilnError, match="context shift"):
        list(generate_step([1, 2, 3, 4, 5], model, SamplingParams(temperature=0.0), dec, max_tokens=10, shift=shift))


# ---------------------------------------------------------------- the front door, with Gemma 3 270M's tokenizer

@pytest.fixture(scope="module")
def gemma_tok(gemma_path):
    """(a tiny random Gemma 3 over the real vocabulary, the real Gemma 3 270M tokenizer): stream_generate's
    finish reasons and checks do not depend on the weights, and this loads in a second, not twenty."""
    from kiln.reader import read_model
    config, _, tok = read_model(gemma_path)
    return _tiny(GEMMA, vocab_size=config["vocab_size"]), tok


@pytest.mark.model
def test_stream_generate_finish_reasons_shift_and_rotation(gemma_tok):
    model, tok = gemma_tok
    ids = tok.encode("The capital of France is")
    n = len(ids)
    rs = list(kiln.stream_generate(model, tok, ids, max_tokens=50, max_context=n + 6, ignore_eos=True))
    assert len(rs) == 6 and rs[-1].finish_reason == "length"  # the context is full: no error
    rs = list(kiln.stream_generate(model, tok, ids, max_tokens=30, max_context=n + 6, ignore_eos=True,
                                   context_shift=True, keep=2))  # shifts past the context of n + 6
    assert len(rs) == 30 and rs[-1].finish_reason == "length" and all(r.finish_reason is None for r in rs[:-1])
    rot = list(kiln.stream_generate(model, tok, ids, max_tokens=12, ignore_eos=True, max_kv_size=n + 2))
    plain = list(kiln.stream_generate(model, tok, ids, max_tokens=12, ignore_eos=True))
    assert len(rot) == 12 and rot[-1].finish_reason == "length"
    lp = [(a.logprobs - b.logprobs).abs().max().item() for a, b in zip(rot, plain)]
    assert max(lp[:3]) < 1e-4 and max(lp[3:]) > 1e-3  # the same while n + 2 tokens hold everything, then not
    for bad in (dict(max_kv_size=2, keep=4), dict(keep=-1), dict(max_kv_size=16, context_shift=True),
                dict(max_kv_size=16, prompt_lookup=2)):
        with pytest.raises(KilnError):
            list(kiln.stream_generate(model, tok, ids, max_tokens=2, **bad))


# ---------------------------------------------------------------- the GPU path (skipped without CUDA)

@pytest.mark.skipif(torch.cuda.is_available() or not __import__("kiln.policy").policy.DEFAULT.triton_cpu,
                    reason="the fused step on CPU tensors needs TRITON_INTERPRET=1 KILN_TRITON_CPU=1 (~20 s): "
                           "run this file so to check it")
def test_fused_graph_step_with_rings_under_the_triton_interpreter(monkeypatch):
    """The GPU decode step's kernels on CPU tensors (Triton's interpreter): every layer takes the fused RoPE +
    KV write and split-KV decode kernels (a full layer's in one, ops.rope_decode_attention), a ring layer's
    written at its slots and read whole (base._ring_fuses);
    the same logits as the full cache (sliding windows; also q8_0 / q4_0 ones), and as the unfused ring step
    where a rotating cache's layers mix (global ones fused, sliding ones whose window its kept tokens may
    leave unfused)."""
    from kiln.models import base
    model = _tiny(GEMMA)
    ids = _ids(11, seed=2)
    calls = []
    for name in ("decode_attention", "rope_decode_attention"):  # a ring layer's kernel; a full layer's (RoPE in it)
        real = getattr(base, name)
        monkeypatch.setattr(base, name, lambda *a, real=real, **k: calls.append(1) or real(*a, **k))
    rings = plan_rings(layer_windows(model), 32)
    for kind, tol in ((None, 1e-4), ("q8_0", 1e-2)):
        ring = KVCache.for_model(model, max_len=32, rings=rings, type_k=kind, type_v=kind)
        full = KVCache.for_model(model, max_len=32, type_k=kind, type_v=kind)
        assert base.prepare(Step.graph(ring, torch.tensor(9)), ids[:, :1], model.policy, {}, set()).fused
        calls.clear()
        got = _cached(model, ids, ring, 7, graph_from=7)
        assert len(calls) == 4 * 4  # four graph steps, every layer fused
        want = _cached(model, ids, full, 7, graph_from=7)
        assert (got - want).abs().max() < tol, f"{kind}: {(got - want).abs().max():.2e}"
    rot = plan_rings(layer_windows(model), 32, 8, 4)  # sliding layers Ring(4, 4) in a window of 5, global too
    calls.clear()
    got = _cached(model, ids, KVCache.for_model(model, max_len=32, rings=rot), 7, graph_from=7)
    assert len(calls) == 4 * 1  # the global layer only
    want = _cached(model, ids, KVCache.for_model(model, max_len=32, rings=rot), 7, Policy(triton_cpu=False),
                   graph_from=7)
    assert (got - want).abs().max() < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("max_kv_size", [None, 12])
def test_cuda_graph_decoder_with_rings_equals_full_cache(max_kv_size):
    """On the GPU: prompt, then decode steps replayed from the captured CUDA graph (fused kernels for the
    layers without a ring, the unfused ring step for the others); the same log-probabilities as the full
    cache (sliding window) or as the rotating reference run on the CPU."""
    model = _tiny(GEMMA)
    prompt = _ids(9, seed=8)[0].tolist()
    params = SamplingParams(temperature=0.0)
    rings = plan_rings(layer_windows(model), 64, max_kv_size, 4)
    cpu = list(generate_step(prompt, model, params, Decoder.for_model(model, 64, rings=rings), max_tokens=24))
    gpu_model = model.to("cuda")
    dec = Decoder.for_model(gpu_model, 64, rings=rings)
    assert dec.use_graph and dec.cache.rings is not None
    got = list(generate_step(prompt, gpu_model, params, dec, max_tokens=24))
    assert dec.graph is not None
    assert [t for t, _ in got] == [t for t, _ in cpu]
    assert max((a.cpu() - b).abs().max().item() for (_, a), (_, b) in zip(got, cpu)) < 1e-3


def test_context_shift_re_ropes_keys_stored_rotated():
    """q8_0 / q4_0 store keys rotated and less the k bias (kv_types.Basis): a shift re-ropes them in the model's
    basis. An f32 cache in that basis shifts to the plain cache's logits exactly (in float); a q8_0 cache (its
    keys and values stored rotated) stays as near them after the shift as before it."""
    model = _tiny(dict(LLAMA, model_type="qwen2", head_dim=32))  # q/k/v biases: a key offset
    ids, rotate = _ids(20, seed=8), key_rotation(model, 16)
    caches = [KVCache.for_model(model, max_len=16, rotate=r) for r in (False, True)]
    caches.append(KVCache.for_model(model, max_len=16, type_k="q8_0", type_v="q8_0"))
    outs = []
    with torch.no_grad():
        for c in caches:
            before = model(ids[:, :16], Step.prefill(c, 0))[0]  # (16, V)
            c.shift(16, 3, 6, rotate)  # positions 3..8 dropped, 9..15 now at 3..9
            after = torch.cat([model(ids[:, t:t + 1], Step.prefill(c, t - 6))[0] for t in range(16, 20)])
            outs.append((before, after))
    (b0, a0), (b1, a1), (bq, aq) = outs
    assert (b1 - b0).abs().max() <= 1e-4 and (a1 - a0).abs().max() <= 1e-4, (a1 - a0).abs().max()
    err_before, err_after = (bq - b0).abs().max().item(), (aq - a0).abs().max().item()
    print(f"q8_0 vs f32: max |Δlogit| {err_before:.4f} before the shift, {err_after:.4f} after")
    assert 1e-4 < err_after <= 3 * err_before, (err_before, err_after)
