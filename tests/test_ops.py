"""kiln.ops: every Triton kernel against its plain-torch twin, on small random shapes.

Owns: the comparisons (norm incl. Gemma offset and fused residual; RoPE incl. partial rotary, q/k norms,
strided inputs; gated activations; split-KV decode attention incl. GQA, several query tokens, sliding
window, soft-capping, positions not starting at 0, cache lengths that are not a multiple of the tile,
D = 64 and 256, the single-split launch without a merge, q8_0 / q4_0 keys and/or values read as codes + scales
and values rotated back in the kernel; the rotated, encoded KV write (kv_write);
RoPE with the KV write in one kernel, into caches of another dtype; per-row positions and cache rows for a
server's batched step),
the dispatch rule and the split-count knob (the policy's), and — on a GPU — one CUDA-graph capture and replay.
Not: speed (bench/gpu_ops_check.py), real shapes.

Without a GPU the kernels run in Triton's interpreter: TRITON_INTERPRET must be set before triton is
imported (triton's own library functions and kiln's kernels are decorated at import time; if another
module imported triton earlier, this file re-runs itself in a fresh process), and the policy `P`
(triton_cpu, what KILN_TRITON_CPU=1 sets) routes CPU tensors to the kernels. On a GPU the same tests run
the compiled kernels.
The interpreter runs float32 and float16 faithfully but not bfloat16 (it truncates casts and multiplies
the raw bits in tl.dot), so bfloat16 cases run on CUDA only.
"""

import os
from functools import partial

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from interpreter import rerun_in_fresh_process, late, triton_on_cpu  # noqa: E402,F401  (autouse fixture)
from kiln import ops  # noqa: E402  (after the interpreter switch)
from kiln.errors import KilnError  # noqa: E402
from kiln.ops.attention import Launch  # noqa: E402
from kiln.policy import Policy  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
P = Policy(triton_cpu=True)  # every op below runs its Triton kernel (on CPU tensors: in the interpreter)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}  # float32 tight; 16-bit: about one unit in the last place

# If another test module imported triton first, its own library functions (tl.sum, …) were compiled for
# the GPU and the interpreter cannot call them (and kiln's policy may have been read without triton_cpu):
# run this file again in a fresh process instead.
LATE = late()


@pytest.mark.skipif(not LATE, reason="the interpreter is on in this process")
@pytest.mark.interpreted("file")
def test_in_a_fresh_process():
    rerun_in_fresh_process(__file__)


def rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)


def close(a, b, dtype):
    torch.testing.assert_close(a, b, **TOL[dtype])


# ---------------------------------------------------------------- dispatch

def test_cpu_tensors_use_the_reference_unless_asked():
    x = torch.randn(4, 8)
    assert not ops.use_triton(x, Policy.from_env({}))
    assert ops.use_triton(x, Policy.from_env({"KILN_TRITON_CPU": "1"}))


# ---------------------------------------------------------------- norm

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("e", [96, 1000])
def test_rms_norm(dtype, offset, e):
    x, w = rand(3, 5, e, dtype=dtype), rand(e, dtype=dtype, seed=1)
    y = ops.rms_norm(x, w, 1e-6, offset, policy=P)
    assert y.dtype == dtype and y.shape == x.shape
    close(y, ops.rms_norm_ref(x, w, 1e-6, offset), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_fused_residual(dtype, offset):
    x, r, w = rand(2, 3, 200, dtype=dtype), rand(2, 3, 200, dtype=dtype, seed=2), rand(200, dtype=dtype, seed=1)
    y, h = ops.rms_norm(x, w, 1e-5, offset, residual=r, policy=P)
    y_ref, h_ref = ops.rms_norm_ref(x, w, 1e-5, offset, residual=r)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)  # the sum is rounded exactly like torch's
    close(y, y_ref, dtype)


def test_rms_norm_strided_rows():
    x = rand(6, 256)[:, :128]  # rows 256 apart: read in place, no copy
    w = rand(128, seed=1)
    close(ops.rms_norm(x, w, 1e-6, policy=P), ops.rms_norm_ref(x, w, 1e-6), torch.float32)


# ---------------------------------------------------------------- gated activations

@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # interpreter: exp(-x) → inf → sigmoid 0
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("f", [200, 1500])  # less than one block; more than one block
def test_gated_activations(dtype, f):
    gu = rand(2, 3, 2 * f, dtype=dtype, scale=3.0)
    for fast, ref in [(ops.silu_mul, ops.silu_mul_ref), (ops.gelu_tanh_mul, ops.gelu_tanh_mul_ref)]:
        out = fast(gu, policy=P)
        assert out.shape == (2, 3, f) and out.dtype == dtype
        close(out, ref(gu), dtype)


# ---------------------------------------------------------------- RoPE (+ q/k norm)

def _inv_freq(rot, base=10000.0):
    return (1.0 / base ** (torch.arange(0, rot, 2).float() / rot)).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [
    dict(d=64, rot=64, norm=None),  # Llama
    dict(d=64, rot=64, norm=0.0),  # Qwen3: q/k RMSNorm, w * x
    dict(d=256, rot=256, norm=1.0),  # Gemma 3: (1 + w) norm, head dim 256
    dict(d=64, rot=32, norm=None),  # partial rotary keeps the tail
    dict(d=96, rot=48, norm=0.0),  # partial rotary, non-power-of-two halves, norm over the tail too
])
def test_rope_qk(dtype, case):
    b, t, h, k, d, rot = 2, 3, 8, 2, case["d"], case["rot"]
    qkv = rand(b, t, (h + 2 * k) * d, dtype=dtype)  # a fused QKV output: q and k are strided views
    q = qkv[..., : h * d].view(b, t, h, d)  # (B, T, H, D)
    kk = qkv[..., h * d: (h + k) * d].view(b, t, k, d)  # (B, T, K, D)
    pos = torch.tensor([17, 18, 19], device=DEVICE)
    kw = dict(attn_factor=1.25, rot_dim=rot, eps=1e-6)
    if case["norm"] is not None:
        kw.update(q_norm_w=rand(d, dtype=dtype, seed=3), k_norm_w=rand(d, dtype=dtype, seed=4),
                  norm_offset=case["norm"])
    qo, ko = ops.rope_qk(q, kk, pos, _inv_freq(rot), policy=P, **kw)
    q_ref, k_ref = ops.rope_qk_ref(q, kk, pos, _inv_freq(rot), **kw)
    assert qo.shape == (b, t, h, d) and ko.shape == (b, t, k, d) and qo.dtype == dtype
    close(qo, q_ref, dtype)
    close(ko, k_ref, dtype)


def test_rope_large_positions():
    """Angles of thousands of radians: in-kernel cos/sin must reduce the argument as torch does."""
    q, k = rand(1, 2, 4, 128), rand(1, 2, 2, 128, seed=1)
    pos = torch.tensor([4095, 30000], device=DEVICE)
    inv = _inv_freq(128, base=1e6)
    for a, b in zip(ops.rope_qk(q, k, pos, inv, policy=P), ops.rope_qk_ref(q, k, pos, inv)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


# ---------------------------------------------------------------- decode attention

ATTN_CASES = {
    "gqa-t1": dict(h=8, k=2, d=64, t=1, s=200, start=150),
    "gqa-t4": dict(h=8, k=2, d=64, t=4, s=200, start=150),
    "window-t4": dict(h=8, k=2, d=64, t=4, s=200, start=150, window=40),
    "softcap": dict(h=8, k=2, d=64, t=2, s=130, start=100, softcap=20.0),
    "d256-window": dict(h=4, k=1, d=256, t=1, s=100, start=90, window=32),
    "d256-t4": dict(h=4, k=1, d=256, t=4, s=70, start=3),
    "first-token": dict(h=8, k=2, d=64, t=1, s=64, start=0),
    "mha-batch3": dict(h=4, k=4, d=64, t=1, s=100, start=99, b=3),
}


def _attn_inputs(c, dtype):
    b = c.get("b", 2)
    q = rand(b, c["t"], c["h"], c["d"], dtype=dtype)
    kc = rand(b, c["k"], c["s"], c["d"], dtype=dtype, seed=1)
    vc = rand(b, c["k"], c["s"], c["d"], dtype=dtype, seed=2)
    pos = torch.arange(c["start"], c["start"] + c["t"], device=DEVICE)
    return q, kc, vc, pos


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(ATTN_CASES))
def test_decode_attention(dtype, name):
    c = ATTN_CASES[name]
    q, kc, vc, pos = _attn_inputs(c, dtype)
    args = (q, kc, vc, pos, c["d"] ** -0.5, c.get("window"), c.get("softcap"))
    out = ops.decode_attention(*args, policy=P)
    assert out.shape == q.shape and out.dtype == dtype
    ref = ops.decode_attention_ref(*args)
    if dtype == torch.float32:
        close(out, ref, dtype)
    else:  # probabilities enter the P·V matmul in the 16-bit dtype, as in every flash kernel
        torch.testing.assert_close(out, ref, rtol=2 * TOL[dtype]["rtol"], atol=2 * TOL[dtype]["atol"])


@pytest.mark.parametrize("splits", [1, 3, 16])  # one program per head; uneven; more splits than tiles
@pytest.mark.parametrize("interleave", [False, True])  # each split one run of tiles, or every NS-th tile
@pytest.mark.parametrize("merge", [(32, 4096), (64, 64)])  # merge columns a program, splits a chunk: 1, or 2
def test_decode_attention_split_counts(splits, interleave, merge, monkeypatch):
    from kiln.ops import attention
    monkeypatch.setattr(attention, "MERGE_COLS", merge[0])
    monkeypatch.setattr(attention, "MERGE_ELEMS", merge[1])  # 64 // 64: two splits at a time, the last half empty
    c = dict(h=8, k=2, d=64, t=3, s=300, start=250, window=100)
    q, kc, vc, pos = _attn_inputs(c, torch.float32)
    for block_n in (16, 64):  # the window's first key inside a tile, and many tiles a split
        out = ops.decode_attention(q, kc, vc, pos, 0.125, 100, splits=splits, policy=P,
                                   launch=Launch(block_n=block_n, interleave=interleave))
        close(out, ops.decode_attention_ref(q, kc, vc, pos, 0.125, 100), torch.float32)


@pytest.mark.parametrize("name", list(ATTN_CASES))
def test_decode_attention_one_split_is_one_launch(name, monkeypatch):
    """splits=1: the split kernel writes the normalized output itself; the merge kernel never runs."""
    from kiln.ops import attention
    monkeypatch.setattr(attention, "_merge_kernel", None)  # launching it would raise
    c = ATTN_CASES[name]
    for dtype in (torch.float32, torch.float16):
        q, kc, vc, pos = _attn_inputs(c, dtype)
        args = (q, kc, vc, pos, c["d"] ** -0.5, c.get("window"), c.get("softcap"))
        out = ops.decode_attention(*args, splits=1, policy=P)
        assert out.shape == q.shape and out.dtype == dtype
        tol = {k: (2 if dtype != torch.float32 else 1) * v for k, v in TOL[dtype].items()}
        torch.testing.assert_close(out, ops.decode_attention_ref(*args), **tol)


def test_decode_attention_splits_from_the_policy(monkeypatch):
    from kiln.ops import attention
    merges = []
    real = attention._merge_kernel
    monkeypatch.setattr(attention, "_merge_kernel", type("Spy", (), {
        "__getitem__": lambda self, grid: merges.append(grid) or real[grid]})())
    c = dict(h=8, k=2, d=64, t=2, s=300, start=250, window=100)
    q, kc, vc, pos = _attn_inputs(c, torch.float32)
    ref = ops.decode_attention_ref(q, kc, vc, pos, 0.125, 100)
    for env, n_merges in (("1", 0), ("3", 1)):
        policy = Policy.from_env({"KILN_ATTN_SPLITS": env, "KILN_TRITON_CPU": "1"})
        close(ops.decode_attention(q, kc, vc, pos, 0.125, 100, policy=policy), ref, torch.float32)
        assert len(merges) == n_merges
    close(ops.decode_attention(q, kc, vc, pos, 0.125, 100, splits=1, policy=policy), ref,
          torch.float32)  # the argument wins
    assert len(merges) == 1
    with pytest.raises(KilnError, match="KILN_ATTN_SPLITS"):
        Policy.from_env({"KILN_ATTN_SPLITS": "zero"})


@pytest.mark.parametrize("d,splits,cols", [(64, 3, 32), (128, 2, 32), (128, 5, 64), (128, 1, 32), (96, 3, 32)])
def test_decode_attention_stores_its_output_quantized(d, splits, cols, monkeypatch):
    """One output row (B·T = 1) and a merge to run: the merge kernel also stores the output quantized to int8 as
    quantize_act stores it (codes, scales and run sums, bit for bit), so the output projection needs no
    launch of its own; with one split, or a head dim not a power of two, it leaves the buffer to the caller."""
    from kiln.ops import attention
    from kiln.quant.gemv_int8 import empty_act, quantize_act
    monkeypatch.setattr(attention, "MERGE_COLS", cols)  # a merge program's columns: one 32-block, or two
    c = dict(b=1, h=8, k=2, d=d, t=1, s=300, start=250)
    for dtype in DTYPES:
        q, kc, vc, pos = _attn_inputs(c, dtype)
        act = empty_act(8 * d, dtype, q.device)
        out = ops.decode_attention(q, kc, vc, pos, d ** -0.5, splits=splits, policy=P, q8=act)
        close(out, ops.decode_attention_ref(q, kc, vc, pos, d ** -0.5), dtype)
        assert act.filled == (splits > 1 and d != 96)
        if act.filled:
            want = quantize_act(out.reshape(1, -1), P)
            for got, ref in zip(act.buffers, want.buffers):
                assert torch.equal(got, ref.reshape(got.shape))


def test_decode_attention_never_reads_past_the_last_position():
    c = dict(h=8, k=2, d=64, t=2, s=200, start=70)
    q, kc, vc, pos = _attn_inputs(c, torch.float32)
    ref = ops.decode_attention_ref(q, kc, vc, pos, 0.125)
    kc[:, :, 72:], vc[:, :, 72:] = float("nan"), float("nan")  # slots no query may see
    for interleave in (False, True):
        close(ops.decode_attention(q, kc, vc, pos, 0.125, splits=4, policy=P, launch=Launch(block_n=16,
              interleave=interleave)), ref, torch.float32)


# ---------------------------------------------------------------- RoPE + KV write in one kernel
# The expectation is the two ops it replaces, rope_qk_ref then write_kv_ref; the `_ref` twin must equal it too.
# Caches may hold another dtype than k and v. The interpreter truncates float32 → bfloat16 casts instead of
# rounding them, so values enter as bfloat16-exact numbers (their copies are then exact everywhere) and the
# rotated keys are compared at bfloat16's tolerance.

ROPE_KV_CASES = {
    "llama": dict(d=64, rot=64, norm=None),
    "qwen3-norm": dict(d=64, rot=64, norm=0.0),
    "gemma3-d256": dict(d=256, rot=256, norm=1.0),
    "partial": dict(d=64, rot=32, norm=None),
    "partial-odd-norm": dict(d=96, rot=48, norm=0.0),
}


def _rope_kv_inputs(b, t, h, k, d, dtype):
    """q, k, v as strided views of one fused QKV output, as the models produce them."""
    qkv = rand(b, t, (h + 2 * k) * d, dtype=dtype).to(torch.bfloat16).to(dtype)
    q = qkv[..., : h * d].view(b, t, h, d)  # (B, T, H, D)
    kk = qkv[..., h * d: (h + k) * d].view(b, t, k, d)  # (B, T, K, D)
    v = qkv[..., (h + k) * d:].view(b, t, k, d)  # (B, T, K, D)
    return q, kk, v


def _check_rope_kv(q, kk, v, kc, vc, pos, rows, inv, kw, slots=None):
    at = pos if slots is None else slots  # where the keys and values go (a ring layer's slots)
    want_k, want_v = kc.clone(), vc.clone()
    want_q, rk = ops.rope_qk_ref(q, kk, pos, inv, **kw)
    ops.write_kv_ref(want_k, want_v, rk, v, at, rows)
    b, t = q.shape[:2]
    hit = torch.zeros(kc.shape[:3], dtype=torch.bool, device=kc.device)  # (B or N, K, S): slots written
    hit[(rows if rows is not None else torch.arange(b, device=kc.device))[:, None], :, at.expand(b, t)] = True
    two_k, two_v = kc.clone(), vc.clone()  # the rope kernel, then the KV write, unfused
    two_q, rk = ops.rope_qk(q, kk, pos, inv, policy=P, **kw)
    ops.write_kv_ref(two_k, two_v, rk, v, at, rows)
    for fn in (partial(ops.rope_qk_write_kv, policy=P), ops.rope_qk_write_kv_ref):
        got_k, got_v = kc.clone(), vc.clone()
        got_q = fn(q, kk, v, got_k, got_v, pos, inv, rows=rows, slots=slots, **kw)
        assert got_q.shape == q.shape and got_q.dtype == q.dtype
        close(got_q, want_q, q.dtype)
        torch.testing.assert_close(got_v, want_v, rtol=0, atol=0)  # the values copied, nothing else touched
        torch.testing.assert_close(got_k[~hit], kc[~hit], rtol=0, atol=0)
        close(got_k[hit], want_k[hit], kc.dtype if kc.dtype != torch.float32 else q.dtype)
        # The same bits as rope_qk + the write (keys rounded to k's dtype first), where the conversion to the
        # cache's dtype is exact or rounds as torch does (the interpreter truncates to bfloat16, see above).
        if fn is not ops.rope_qk_write_kv_ref and (CUDA or kc.dtype in (q.dtype, torch.float32)):
            for got, two in ((got_q, two_q), (got_k, two_k), (got_v, two_v)):
                torch.testing.assert_close(got, two, rtol=0, atol=0)


@pytest.mark.parametrize("cache_dtype", [None, torch.float32, torch.bfloat16])  # None: the inputs' dtype
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(ROPE_KV_CASES))
def test_rope_qk_write_kv(name, dtype, cache_dtype):
    c = ROPE_KV_CASES[name]
    b, t, h, k, d, s = 2, 3, 8, 2, c["d"], 24
    q, kk, v = _rope_kv_inputs(b, t, h, k, d, dtype)
    cdt = cache_dtype or dtype
    big_k = rand(2, b, k, s, d, dtype=cdt, seed=5)  # (L, B, K, S, D)
    big_v = rand(2, b, k, s, d, dtype=cdt, seed=6)
    pos = torch.tensor([17, 18, 19], device=DEVICE)
    kw = dict(attn_factor=1.25, rot_dim=c["rot"], eps=1e-6)
    if c["norm"] is not None:
        kw.update(q_norm_w=rand(d, dtype=dtype, seed=3), k_norm_w=rand(d, dtype=dtype, seed=4),
                  norm_offset=c["norm"])
    _check_rope_kv(q, kk, v, big_k[1], big_v[1], pos, None, _inv_freq(c["rot"]), kw)  # a layer's view


# ---------------------------------------------------------------- per-row positions (a server's batched step)
# Rows at different depths in different cache rows (slots). The independent reference is the shared-
# position op run on each row alone, on that row's own slot.

ROW_POS = [[40], [3], [129]]  # three rows, one new token each, far apart (one past a 64-key tile)
ROW_SLOTS = [2, 0, 3]  # batch row b lives in cache row ROW_SLOTS[b] of 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_qk_per_row_positions(dtype):
    q, k = rand(3, 2, 8, 64, dtype=dtype), rand(3, 2, 2, 64, dtype=dtype, seed=1)
    pos = torch.tensor([[5, 6], [900, 901], [0, 1]], device=DEVICE)  # (B, T)
    kw = dict(q_norm_w=rand(64, dtype=dtype, seed=3), k_norm_w=rand(64, dtype=dtype, seed=4), norm_offset=1.0)
    qo, ko = ops.rope_qk(q, k, pos, _inv_freq(64), policy=P, **kw)
    for b in range(3):
        q_ref, k_ref = ops.rope_qk_ref(q[b:b + 1], k[b:b + 1], pos[b], _inv_freq(64), **kw)
        close(qo[b:b + 1], q_ref, dtype)
        close(ko[b:b + 1], k_ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_write_kv_per_row_positions_and_slots(dtype):
    kc, vc = rand(4, 2, 150, 64, dtype=dtype), rand(4, 2, 150, 64, dtype=dtype, seed=1)  # (N, K, S, D)
    k, v = rand(3, 1, 2, 64, dtype=dtype, seed=2), rand(3, 1, 2, 64, dtype=dtype, seed=3)  # (B, T, K, D)
    pos, rows = torch.tensor(ROW_POS, device=DEVICE), torch.tensor(ROW_SLOTS, device=DEVICE)
    ref_k, ref_v = kc.clone(), vc.clone()
    for b, slot in enumerate(ROW_SLOTS):  # one row at a time, through the shared-position op
        ops.write_kv_ref(ref_k[slot:slot + 1], ref_v[slot:slot + 1], k[b:b + 1], v[b:b + 1], pos[b])
    got_k, got_v = kc.clone(), vc.clone()
    ops.write_kv_ref(got_k, got_v, k, v, pos, rows)
    torch.testing.assert_close(got_k, ref_k, rtol=0, atol=0)
    torch.testing.assert_close(got_v, ref_v, rtol=0, atol=0)
    assert torch.equal(ref_k[2, :, 40], k[0, 0].to(dtype))


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slots", [True, False])  # rows naming cache rows, or batch row b in cache row b
@pytest.mark.parametrize("name", ["llama", "qwen3-norm", "partial-odd-norm"])
def test_rope_qk_write_kv_per_row_positions(name, slots, cache_dtype):
    c = ROPE_KV_CASES[name]
    d = c["d"]
    q, kk, v = _rope_kv_inputs(3, 2, 8, 2, d, torch.float16)
    kc, vc = rand(4, 2, 150, d, dtype=cache_dtype, seed=5), rand(4, 2, 150, d, dtype=cache_dtype, seed=6)
    pos = torch.tensor([[40, 41], [3, 4], [128, 129]], device=DEVICE)  # (B, T)
    rows = torch.tensor(ROW_SLOTS, device=DEVICE) if slots else None
    kw = dict(rot_dim=c["rot"])
    if c["norm"] is not None:
        kw.update(q_norm_w=rand(d, dtype=torch.float16, seed=3), k_norm_w=rand(d, dtype=torch.float16, seed=4),
                  norm_offset=c["norm"])
    _check_rope_kv(q, kk, v, kc if slots else kc[:3], vc if slots else vc[:3], pos, rows, _inv_freq(c["rot"]), kw)


@pytest.mark.parametrize("per_row", [False, True])
def test_rope_qk_write_kv_at_ring_slots(per_row):
    """A ring layer's write (cache.Ring): RoPE at the absolute positions, the keys and values into the slots
    the positions wrap to (Ring(2, 5): 0, 1, then 2 + (p - 2) % 5), not at the positions."""
    from kiln.cache import Ring
    c = ROPE_KV_CASES["qwen3-norm"]
    d, ring = c["d"], Ring(2, 5)
    q, kk, v = _rope_kv_inputs(3, 1, 8, 2, d, torch.float16)
    kc, vc = rand(4, 2, ring.slots + 1, d, seed=5), rand(4, 2, ring.slots + 1, d, seed=6)  # + scratch
    pos = torch.tensor([[40], [1], [9]] if per_row else [9], device=DEVICE)  # (B, 1), or (1,) for every row
    rows = torch.tensor(ROW_SLOTS, device=DEVICE) if per_row else None
    kw = dict(rot_dim=c["rot"], q_norm_w=rand(d, dtype=torch.float16, seed=3),
              k_norm_w=rand(d, dtype=torch.float16, seed=4))
    slots = ring.slot(pos)
    assert slots.flatten().tolist() == ([5, 1, 4] if per_row else [4])
    _check_rope_kv(q, kk, v, kc if per_row else kc[:3], vc if per_row else vc[:3], pos, rows, _inv_freq(c["rot"]),
                   kw, slots)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_attention_sees_a_ring_up_to_its_last_slot(dtype):
    """`last`: a query at pos sees slots 0..min(pos, last) and nothing after (a ring layer's whole ring once it
    has wrapped; its scratch slot never): each row against the reference over its slots alone, the cache cut
    after them, as a query at the last of them."""
    q = rand(3, 1, 8, 64, dtype=dtype)  # (B, T, H, D)
    kc, vc = rand(4, 2, 11, 64, dtype=dtype, seed=1), rand(4, 2, 11, 64, dtype=dtype, seed=2)  # 10 slots + scratch
    pos, rows = torch.tensor(ROW_POS, device=DEVICE), torch.tensor(ROW_SLOTS, device=DEVICE)  # 40, 3, 129
    ref = torch.cat([ops.decode_attention_ref(q[b:b + 1], kc[s:s + 1, :, :n], vc[s:s + 1, :, :n],
                                              torch.tensor([n - 1], device=DEVICE), 0.125)
                     for b, (s, n) in enumerate(zip(ROW_SLOTS, (10, 4, 10)))])
    close(ops.decode_attention_ref(q, kc, vc, pos, 0.125, rows=rows, last=9), ref, dtype)
    kc[:, :, 10], vc[:, :, 10] = float("nan"), float("nan")  # the scratch slot: the kernel never loads it
    tol = {k: 2 * v for k, v in TOL[dtype].items()}
    for splits in (3, 1):
        out = ops.decode_attention(q, kc, vc, pos, 0.125, rows=rows, last=9, splits=splits, policy=P)
        torch.testing.assert_close(out, ref, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window", [None, 30])
def test_decode_attention_per_row_positions_and_slots(dtype, window):
    q = rand(3, 1, 8, 64, dtype=dtype)  # (B, T, H, D)
    kc, vc = rand(4, 2, 150, 64, dtype=dtype, seed=1), rand(4, 2, 150, 64, dtype=dtype, seed=2)
    pos, rows = torch.tensor(ROW_POS, device=DEVICE), torch.tensor(ROW_SLOTS, device=DEVICE)
    ref = torch.cat([ops.decode_attention_ref(q[b:b + 1], kc[s:s + 1], vc[s:s + 1], pos[b], 0.125, window)
                     for b, s in enumerate(ROW_SLOTS)])
    close(ops.decode_attention_ref(q, kc, vc, pos, 0.125, window, rows=rows), ref, torch.float32)
    tol = {k: 2 * v for k, v in TOL[dtype].items()}
    for splits, interleave in ((3, False), (3, True), (1, False)):  # split + merge (runs, dealt tiles); one launch
        out = ops.decode_attention(q, kc, vc, pos, 0.125, window, rows=rows, splits=splits, policy=P,
                                   launch=Launch(block_n=32, interleave=interleave))
        torch.testing.assert_close(out, ref, **tol)


# ---------------------------------------------------------------- RoPE + KV write + decode attention in one kernel
# rope_decode_attention against its two references (rope_qk_write_kv_ref, then decode_attention_ref), and
# against the two kernels it replaces (the same rotated keys in the cache, bit for bit).

FUSED_CASES = {
    "qwen3": dict(h=8, k=2, d=64, norm=0.0, start=150),
    "qwen3-d128": dict(h=4, k=2, d=128, norm=0.0, start=150),  # the head dim whose default launch fuses
    "llama-window": dict(h=8, k=2, d=64, norm=None, start=150, window=40),
    "gemma-d256-softcap": dict(h=4, k=1, d=256, norm=1.0, start=90, softcap=20.0),
    "first-token": dict(h=8, k=2, d=64, norm=0.0, start=0),
    "mha-rows": dict(h=4, k=4, d=64, norm=0.0, start=None),  # per-row positions in named cache rows
}


@pytest.mark.parametrize("splits", [1, 3, 16])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(FUSED_CASES))
def test_rope_decode_attention(name, dtype, splits):
    from kiln.ops import attention
    from kiln.ops.attention import rope_fuses
    c = FUSED_CASES[name]
    h, kh, d = c["h"], c["k"], c["d"]
    per_row = c["start"] is None
    b = 3 if per_row else 2
    q, kk, v = _rope_kv_inputs(b, 1, h, kh, d, dtype)
    n = 4 if per_row else b
    kc, vc = rand(n, kh, 200, d, dtype=dtype, seed=5), rand(n, kh, 200, d, dtype=dtype, seed=6)
    pos = torch.tensor(ROW_POS if per_row else [c["start"]], device=DEVICE)
    rows = torch.tensor(ROW_SLOTS, device=DEVICE) if per_row else None
    kw = dict(attn_factor=1.25, eps=1e-6)
    if c["norm"] is not None:
        kw.update(q_norm_w=rand(d, dtype=dtype, seed=3), k_norm_w=rand(d, dtype=dtype, seed=4), norm_offset=c["norm"])
    inv, scale, window, softcap = _inv_freq(d), d ** -0.5, c.get("window"), c.get("softcap")
    assert rope_fuses(q, kk, v, kc, vc, inv)
    want_k, want_v = kc.clone(), vc.clone()  # the references
    want = ops.rope_decode_attention_ref(q, kk, v, want_k, want_v, pos, inv, scale, window=window, softcap=softcap,
                                         rows=rows, **kw)
    two_k, two_v = kc.clone(), vc.clone()  # the two kernels it replaces
    qr = ops.rope_qk_write_kv(q, kk, v, two_k, two_v, pos, inv, rows=rows, policy=P, **kw)
    two = ops.decode_attention(qr, two_k, two_v, pos, scale, window, softcap, rows, splits=splits, policy=P)
    got_k, got_v = kc.clone(), vc.clone()
    launch = attention.launch_for(d)._replace(rope=True)  # the head dim's tiles, fused
    got = ops.rope_decode_attention(q, kk, v, got_k, got_v, pos, inv, scale, window=window, softcap=softcap,
                                    rows=rows, splits=splits, policy=P, launch=launch, **kw)
    assert got.shape == q.shape and got.dtype == dtype
    tol = {k_: (1 if dtype == torch.float32 else 2) * v_ for k_, v_ in TOL[dtype].items()}
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got, two, **tol)
    torch.testing.assert_close(got_v, two_v, rtol=0, atol=0)  # values copied, every other slot untouched
    # keys rotated with rope.py's arithmetic: bit for bit in the interpreter; compiled for a GPU, the two kernels'
    # multiply-adds and sums may fuse and order differently (float32 keys 1 ulp apart here and there on the H100)
    torch.testing.assert_close(got_k, two_k, **(TOL[dtype] if CUDA else dict(rtol=0, atol=0)))


def test_rope_decode_attention_never_reads_the_new_slot():
    """The slot the new key goes to holds anything before the step (here NaN): the fused kernel never loads it,
    so nothing of it reaches the output."""
    q, kk, v = _rope_kv_inputs(1, 1, 8, 2, 64, torch.float32)
    kc, vc = rand(1, 2, 100, 64, seed=5), rand(1, 2, 100, 64, seed=6)
    pos, inv = torch.tensor([70], device=DEVICE), _inv_freq(64)
    want_k, want_v = kc.clone(), vc.clone()
    want = ops.rope_decode_attention_ref(q, kk, v, want_k, want_v, pos, inv, 0.125)
    kc[:, :, 70:], vc[:, :, 70:] = float("nan"), float("nan")
    for splits in (1, 4):
        k2, v2 = kc.clone(), vc.clone()
        close(ops.rope_decode_attention(q, kk, v, k2, v2, pos, inv, 0.125, splits=splits, policy=P,
                                        launch=Launch(rope=True)), want, torch.float32)
        close(k2[:, :, :71], want_k[:, :, :71], torch.float32)


@pytest.mark.parametrize("d", [64, 128])
def test_rope_decode_attention_switch(d, monkeypatch):
    """KILN_ROPE_ATTN=0 (the policy's rope_attn), or a head dim whose launch does not fuse (64): RoPE and the KV
    write in their own kernel first, the same answer."""
    from kiln.ops import attention
    calls, real = [], attention.rope_qk_write_kv
    monkeypatch.setattr(attention, "rope_qk_write_kv", lambda *a, **k: calls.append(1) or real(*a, **k))
    q, kk, v = _rope_kv_inputs(1, 1, 8, 2, d, torch.float32)
    outs, caches = [], []
    for env in ("1", "0"):
        kc, vc = rand(1, 2, 100, d, seed=5), rand(1, 2, 100, d, seed=6)
        policy = Policy.from_env({"KILN_ROPE_ATTN": env, "KILN_TRITON_CPU": "1"})
        n = len(calls)
        outs.append(ops.rope_decode_attention(q, kk, v, kc, vc, torch.tensor([70], device=DEVICE), _inv_freq(d),
                                              0.125, splits=3, policy=policy))
        caches.append((kc, vc))
        assert len(calls) - n == (env == "0" or d == 64)
    close(outs[0], outs[1], torch.float32)
    # The same arithmetic (rope.rotate_halves) in both: bit for bit in the interpreter; compiled, the two kernels
    # may contract a multiply-add differently (float32 keys 1 ulp apart here and there on the H100).
    ulps = 2 * torch.finfo(torch.float32).eps if CUDA else 0.0
    for a, b in zip(*caches):
        torch.testing.assert_close(a, b, rtol=ulps, atol=ulps)


def _codes(kind, x):
    """x (..., D) → (codes, float16 scales (..., D/32)): a block type's cache layout (kiln.kv_types); fp8: the
    values and no scales."""
    from kiln.kv_types import encode
    parts = encode(kind, x.float())
    return parts if len(parts) == 2 else (parts[0], None)


def _dequant(kind, codes, scales, dtype):
    from kiln.kv_types import decode
    return decode(kind, (codes, scales) if scales is not None else (codes,), dtype)


_BLOCK_CASES = [("q8_0", stored, case) for stored in ("kv", "k", "v")  # which of keys and values are stored so
                for case in (dict(t=1), dict(t=3, window=40), dict(t=3, rows=True), dict(t=2, d=96))]
_BLOCK_CASES += [("q8_0", "kv", dict(t=2, rot=True))] + [
    ("q4_0", "kv", case) for case in (dict(t=1), dict(t=3, window=40), dict(t=3, rows=True), dict(t=2, d=96))]
_BLOCK_CASES += [("fp8", "kv", dict(t=3, rows=True)), ("fp8", "k", dict(t=1))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind, stored, case", _BLOCK_CASES)
def test_decode_attention_reads_block_caches(dtype, kind, stored, case):
    """Codes and their scales (q8_0: int8; q4_0: two 4-bit codes a byte), or fp8 values, converted tile by tile
    in the kernel: the reference over the dequantized cache (also the reference's own block form), one split and
    several, per-row positions and cache rows, a head dim of 3 scale blocks (the kernel's tile holds 4: the
    padded block masked), and an output rotated back in the kernel (values stored in a Hadamard basis)."""
    from kiln.kv_types import hadamard
    t, window, n, d = case["t"], case.get("window"), 4 if case.get("rows") else 3, case.get("d", 64)
    q = rand(3, t, 8, d, dtype=dtype)
    kq, ks = _codes(kind, rand(n, 2, 150, d, seed=1))
    vq, vs = _codes(kind, rand(n, 2, 150, d, seed=2, scale=3.0))
    kd, vd = _dequant(kind, kq, ks, dtype), _dequant(kind, vq, vs, dtype)
    pos, rows = torch.arange(120, 120 + t, device=DEVICE), None
    if case.get("rows"):
        pos = torch.tensor(ROW_POS, device=DEVICE)[:, :1] + torch.arange(t, device=DEVICE)  # (B, T)
        rows = torch.tensor(ROW_SLOTS, device=DEVICE)
    rot = hadamard(d).to(DEVICE) if case.get("rot") else None
    kc, k_scale = (kq, ks) if "k" in stored else (kd, None)
    vc, v_scale = (vq, vs) if "v" in stored else (vd, None)
    ref = ops.decode_attention_ref(q, kd, vd, pos, 0.125, window, rows=rows)
    if rot is not None:  # rotated back in float32, then rounded
        ref = (ops.decode_attention_ref(q.float(), kd.float(), vd.float(), pos, 0.125, window) @ rot).to(dtype)
    tol = {k: (2 if dtype != torch.float32 else 1) * v for k, v in TOL[dtype].items()}
    torch.testing.assert_close(ops.decode_attention_ref(q, kc, vc, pos, 0.125, window, rows=rows, k_scale=k_scale,
                                                        v_scale=v_scale, out_rot=rot), ref, **tol)
    for splits in (1, 3):  # one launch; split + merge
        out = ops.decode_attention(q, kc, vc, pos, 0.125, window, rows=rows, k_scale=k_scale, v_scale=v_scale,
                                   out_rot=rot, splits=splits, policy=P)
        assert out.dtype == dtype
        torch.testing.assert_close(out, ref, **tol)


def _side(kind, n, kh, s, d, layer, basis, dtype):
    from kiln.kv_types import layout
    from kiln.ops.kv_write import Side
    parts = tuple(torch.zeros(n, kh, s, w, dtype=dt if kind in ("q8_0", "q4_0", "fp8") else dtype, device=DEVICE)
                  for w, dt in layout(kind, d))
    return Side(kind, parts, basis, layer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", [dict(kinds=("q8_0", "q8_0"), rot=(True, True)),
                                  dict(kinds=("q8_0", "q4_0"), rot=(True, True), rows=True, d=96),
                                  dict(kinds=("q4_0", "q8_0"), rot=(False, False), t=3),
                                  dict(kinds=("q8_0", None), rot=(True, False), rows=True, t=2),
                                  dict(kinds=(None, None), rot=(True, True), d=32),
                                  dict(kinds=("fp8", "fp8"), rot=(False, False), rows=True, t=2),
                                  dict(kinds=("q8_0", "q4_0"), rot=(True, True), d=256)])  # 32 columns at a time
def test_encode_kv_writes_what_the_torch_codecs_write(dtype, case):
    """One kernel rotates q into the keys' basis and writes keys (less the layer's offset, rotated) and values
    (rotated) encoded as q8_0 / q4_0 / fp8 / a float type (None: q's dtype) at the step's positions (shared, or
    per row into other cache rows): codes equal the reference's but for rounding ties (at most one code apart,
    rarely); scales, floats, fp8 values (some past ±448, some subnormal) and the rotated q equal."""
    from kiln.kv_types import Basis, decode
    from kiln.ops.kv_write import encode_kv, encode_kv_ref
    b, t, h, kh, s, d, layer = 2, case.get("t", 1), 8, 2, 40, case.get("d", 64), 1
    q, k, v = rand(b, t, h, d, dtype=dtype), rand(b, t, kh, d, dtype=dtype, seed=1), rand(b, t, kh, d, dtype=dtype,
                                                                                           seed=2, scale=3.0)
    k[..., 3] += 40  # a large channel, as a key bias makes one
    v[..., 5] *= 300  # values past fp8's range
    v[..., 6] *= 1e-3  # and below its normal range
    offset = rand(3, kh, d, seed=3)  # (L, K, D)
    bases = [Basis(d, DEVICE, offset) if case["rot"][0] else None, Basis(d, DEVICE) if case["rot"][1] else None]
    kinds = [kd or {torch.float32: "f32", torch.float16: "f16"}[dtype] for kd in case["kinds"]]
    pos, rows, n = torch.arange(30, 30 + t, device=DEVICE), None, b
    if case.get("rows"):
        pos = torch.tensor([[5], [33]], device=DEVICE) + torch.arange(t, device=DEVICE)  # (B, T)
        rows, n = torch.tensor([3, 0], device=DEVICE), 4
    got = [_side(kd, n, kh, s, d, layer, bs, dtype) for kd, bs in zip(kinds, bases)]
    ref = [_side(kd, n, kh, s, d, layer, bs, dtype) for kd, bs in zip(kinds, bases)]
    q_ref = encode_kv_ref(q, k, v, *ref, pos, rows)
    q_got = encode_kv(q, k, v, *got, pos, rows, policy=P)
    assert (q_got is q) == (bases[0] is None)
    torch.testing.assert_close(q_got, q_ref, **TOL[dtype])
    for kd, g, r in zip(kinds, got, ref):
        assert any(p.float().abs().sum() > 0 for p in r.parts)  # something was written
        if kd == "fp8":
            assert torch.equal(g.parts[0].view(torch.uint8), r.parts[0].view(torch.uint8))
        elif kd in ("q8_0", "q4_0"):
            torch.testing.assert_close(g.parts[1], r.parts[1], rtol=1e-3, atol=1e-6)  # float16 scales
            gv, rv = (decode(kd, x.parts, torch.float32) for x in (g, r))  # (N, K, S, D)
            step = r.parts[1].float().abs().repeat_interleave(32, -1)  # one code, in values
            assert ((gv - rv).abs() <= step * 1.001 + 1e-6).all()
            assert ((gv - rv).abs() > 1e-6).float().mean() < 0.01  # ties only
        else:
            torch.testing.assert_close(g.parts[0], r.parts[0], **TOL[dtype])


# ---------------------------------------------------------------- greedy pick

@pytest.mark.parametrize("dtype", DTYPES)
def test_argmax_is_torch_first_index_of_the_maximum(dtype):
    """Rows of a vocabulary's size through the two-launch argmax: the maximum anywhere (the last column, a part's
    edge), ties within and across parts (the first wins), -inf masks (a grammar's), as torch's argmax."""
    from kiln.ops import pick
    v = 5 * pick._PART + 77  # a partial last part
    x = rand(6, v, dtype=dtype)
    x[0, v - 1] = 50.0                                       # the last column
    x[1, pick._PART - 1] = x[1, pick._PART] = 50.0           # a tie across a part edge: the first
    x[2, 3 * pick._PART + 5] = x[2, 3 * pick._PART + 9] = 50.0  # a tie inside a part
    x[3] = float("-inf")
    x[3, 2 * pick._PART + 1] = -3.0                          # one allowed token
    x[4] = float("-inf")                                     # nothing allowed: index 0, as torch
    got = ops.argmax(x, policy=P)
    assert got.dtype == torch.int64 and torch.equal(got, ops.argmax_ref(x))
    assert torch.equal(ops.argmax(x[:, :100], policy=P), x[:, :100].argmax(-1))  # short rows: torch's
    assert torch.equal(ops.argmax(x[5], policy=P), x[5].argmax(-1))  # one row, no batch dim


# ---------------------------------------------------------------- CUDA graph (GPU only)

@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_layer_ops_capture_in_one_cuda_graph_and_follow_device_positions():
    dt, e, h, k, d, s = torch.bfloat16, 256, 8, 2, 64, 512
    x, res, w = rand(1, 1, e, dtype=dt), rand(1, 1, e, dtype=dt, seed=1), rand(e, dtype=dt, seed=2)
    qkv, gu = rand(1, 1, (h + 2 * k) * d, dtype=dt, seed=3), rand(1, 1, 2 * e, dtype=dt, seed=4)
    kc, vc = rand(1, k, s, d, dtype=dt, seed=5), rand(1, k, s, d, dtype=dt, seed=6)
    pos, inv = torch.tensor([7], device=DEVICE), _inv_freq(d)

    def layer(kc, vc):  # as a decode step launches them: RoPE with the KV write, attention (split + merge)
        y, _ = ops.rms_norm(x, w, 1e-6, 0.0, residual=res, policy=P)
        q = ops.rope_qk_write_kv(qkv[..., : h * d].view(1, 1, h, d), qkv[..., h * d: (h + k) * d].view(1, 1, k, d),
                                 qkv[..., (h + k) * d:].view(1, 1, k, d), kc, vc, pos, inv, policy=P)
        return (y, ops.decode_attention(q, kc, vc, pos, d ** -0.5, policy=P), ops.silu_mul(gu, policy=P),
                ops.decode_attention(q, kc, vc, pos, d ** -0.5, splits=1, policy=P))  # and in one launch

    layer(kc.clone(), vc.clone())  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = layer(kc, vc)
    for p in (7, 300):  # a new position is a new value in the same device tensor: no re-capture
        pos.fill_(p)
        kr, vr = kc.clone(), vc.clone()
        q, kk = ops.rope_qk_ref(qkv[..., : h * d].view(1, 1, h, d), qkv[..., h * d: (h + k) * d].view(1, 1, k, d),
                                pos, inv)
        ops.write_kv_ref(kr, vr, kk, qkv[..., (h + k) * d:].view(1, 1, k, d), pos)
        graph.replay()
        close(kc, kr, dt)
        close(vc, vr, dt)
        for out in (outs[1], outs[3]):
            torch.testing.assert_close(out, ops.decode_attention_ref(q, kr, vr, pos, d ** -0.5),
                                       rtol=3e-2, atol=3e-2)
