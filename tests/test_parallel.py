"""Tensor parallelism (kiln/parallel.py): two ranks over gloo give the logits of one process.

One run of two worker processes (subprocesses joined by a file:// rendezvous) builds every case — each
architecture kiln runs, with float weights and with GGUF blocks (Q4_K, Q6_K, Q8_0; llama's q/k rows behind
the file's permutation) — sharded over both ranks, prefills a prompt into the KV cache and runs decode steps;
the test process builds the same models whole and compares every logit (fp32: max |delta| <= 1e-4).
The cases' weights come from fixed seeds, so workers and test build the same models without passing files.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from kiln.cache import KVCache, Step
from kiln.errors import KilnError
from kiln.formats.gguf import GGUFTensor, _fix_up
from kiln.load import build_model
from kiln.reader import check_model
from kiln.parallel import Shard, Sizes
from kiln.quant.cpu import compact_linears

Q4_K, Q6_K, Q8_0 = 12, 14, 8  # GGUF type ids
BASE = dict(vocab_size=99, hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=128, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=1e4,
            tie_word_embeddings=False)  # an odd vocabulary and an MLP of 3 Q6_K blocks: the ranks' shares differ
CONFIGS = {
    "llama": dict(BASE, model_type="llama", mlp_bias=True),  # down_proj's bias: rank 0's alone
    "qwen2": dict(BASE, model_type="qwen2", attention_bias=True, num_key_value_heads=1),  # the KV head on both
    "qwen3": dict(BASE, model_type="qwen3"),
    "gemma3": dict(BASE, model_type="gemma3", tie_word_embeddings=True, sliding_window=4, sliding_window_pattern=2,
                   query_pre_attn_scalar=128, final_logit_softcapping=30.0),
    "phi3": dict(BASE, model_type="phi3", partial_rotary_factor=0.5),
}
QTYPES = {"q_proj": Q4_K, "k_proj": Q4_K, "v_proj": Q8_0, "o_proj": Q4_K, "qkv_proj": Q4_K, "gate_proj": Q4_K,
          "up_proj": Q4_K, "gate_up_proj": Q4_K, "down_proj": Q6_K, "embed_tokens": Q6_K, "lm_head": Q8_0}
KINDS = ("float", "gguf", "quantlinear", "compact")  # weights as floats or GGUF blocks; the layers GGUF blocks become:
# nn.Linear in fp32 (the CPU default), QuantLinear (the GPU layer; its torch path here), the compact CPU layers
CASES = [(arch, kind) for arch in CONFIGS for kind in KINDS[:2]] + \
    [("llama", "quantlinear"), ("phi3", "quantlinear"), ("llama", "compact"), ("gemma3", "compact")]  # one layer
# type's cut is the same in every family: two families each (a permuted q/k, fused projections, a tied head)
PROMPT, DECODE = [3, 14, 15, 92, 65, 35, 89], [79, 32, 38]  # teacher-forced: every run feeds the same ids


def weights_for(arch: str, quant: bool) -> dict:
    """Random weights of the tiny `arch` model (fixed seed); 2-D ones as random GGUF blocks with `quant`."""
    cfg = CONFIGS[arch]
    g = torch.Generator().manual_seed(sorted(CONFIGS).index(arch))
    out = {}
    for name, p in _params(cfg).items():
        if quant and len(p.shape) == 2:
            out[name] = _gguf(cfg, name, tuple(p.shape), g)
        else:
            t = torch.randn(p.shape, generator=g) * 0.05
            out[name] = t + 1 if "norm" in name else t
    return out


def _params(cfg: dict) -> dict:
    from kiln.models import get_model
    model_cls, args_cls = get_model(cfg["model_type"])
    with torch.device("meta"):
        m = model_cls(args_cls.from_dict(cfg))
    names = dict(m.named_parameters())
    if cfg["tie_word_embeddings"]:
        names.pop("lm_head.weight")
    return names


SCALES = {Q8_0: (0, 4e-4), Q4_K: (0, 5e-5, 2, 5e-5), Q6_K: (208, 1e-5)}  # (byte offset, size) of fp16 scales


def _gguf(cfg: dict, name: str, shape: tuple[int, int], g) -> GGUFTensor:
    """A GGUF tensor of random blocks; llama's q/k behind the loader's un-permutation of the converter's rows
    (gguf._fix_up)."""
    return _fix_up(cfg, name, random_gguf(name, shape, QTYPES[name.split(".")[-2]], g))


def random_gguf(name: str, shape: tuple[int, int], qtype: int, g) -> GGUFTensor:
    """Random codes with scales of a sane size: fast to make, and every block one a file could hold."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    n = shape[0] * shape[1] // block
    raw = torch.randint(0, 256, (n, size), generator=g, dtype=torch.uint8)
    offsets = SCALES[qtype]
    for off, scale in zip(offsets[::2], offsets[1::2]):
        d = (torch.rand(n, generator=g) * scale).to(torch.float16)
        raw[:, off:off + 2] = d.view(torch.uint8).view(n, 2)
    return GGUFTensor(name, shape, qtype, raw.reshape(-1))


def run(model) -> torch.Tensor:
    """Logits (T + steps, V) of PROMPT prefilled into a KV cache, then of each DECODE token, one step each."""
    cache = KVCache.for_model(model, max_len=32)
    with torch.inference_mode():
        out = [model(torch.tensor([PROMPT]), Step.prefill(cache, 0))[0]]
        for i, tok in enumerate(DECODE):
            out.append(model(torch.tensor([[tok]]), Step.prefill(cache, len(PROMPT) + i))[0])
    return torch.cat(out)


def build(arch: str, kind: str, shard: Shard | None = None):
    """The model of one case, whole or (with `shard`) this rank's part as load.load builds it: the config
    and weights checked whole, then cut, the shard built, the collectives wrapped around its layers."""
    cfg, weights = CONFIGS[arch], weights_for(arch, kind != "float")
    check_model(cfg, weights)
    local, mine = (cfg, weights) if shard is None else shard.split(cfg, weights)
    layers = {"quantlinear": dict(quantized=True, device="cpu", dtype=torch.float32),
              "compact": dict(swap=compact_linears)}.get(kind, {})
    model = build_model(local, mine, **layers)
    return model if shard is None else shard.wrap(model, cfg)


def worker(rank: int, world: int, init: str, out: str):
    """One rank of the two: every case sharded, its logits and its cache's KV heads saved to `out`."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    got = {}
    for arch, kind in CASES:
        model = build(arch, kind, Shard(rank, world))
        got[arch, kind] = run(model), KVCache.for_model(model, max_len=4).k.shape[2]
    got["engine"] = serve_requests(build("qwen3", "float", Shard(rank, world)), rank)
    torch.save(got, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


ENGINE_PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [40, 41], [70, 71, 72, 73], [90, 3, 1, 4, 1, 5]]


def serve_requests(model, rank: int | None = None, graphs: bool = True):
    """The tokens of ENGINE_PROMPTS through the batched engine (kiln serve's), all submitted at once into
    two slots (queueing, batched prefills, slot reuse), greedy; the static padded step (graphs=True: what a
    CUDA graph replays, eager here) with look-ahead. Rank 0 leads (launch.LeaderEngine), the others follow."""
    from kiln import launch
    from kiln.engine import Engine, EngineRequest
    from kiln.sample import SamplingParams
    if rank:
        launch.follow(model)
        return None
    engine = (Engine if rank is None else launch.LeaderEngine)(model, None, n_slots=2, ctx_size=32, graphs=graphs)
    engine.start()
    handles = [engine.submit(EngineRequest(p, SamplingParams(), max_tokens=5)) for p in ENGINE_PROMPTS]
    tokens = [[o.token for o in h.sync()] for h in handles]
    engine.stop()
    if rank is not None:
        launch.LeaderPool(model).close()
    return tokens


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both ranks' results: {(arch, kind): (logits, KV heads in its cache)} per rank."""
    tmp = tmp_path_factory.mktemp("tp")
    here = Path(__file__).parent
    code = f"import sys; sys.path[:0] = [{str(here)!r}, {str(here.parent)!r}]; import test_parallel as t; " \
           f"t.worker(int(sys.argv[1]), 2, {str(tmp / 'init')!r}, {str(tmp)!r})"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r)], env=env, stderr=subprocess.PIPE) for r in (0, 1)]
    errs = [p.communicate(timeout=300)[1].decode() for p in procs]
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err[-3000:]
    return [torch.load(tmp / f"rank{r}.pt") for r in (0, 1)]


@functools.lru_cache(maxsize=None)
def reference(arch: str, kind: str) -> torch.Tensor:
    return run(build(arch, kind))


@pytest.mark.parametrize("arch,kind", CASES, ids=[f"{a}-{k}" for a, k in CASES])
def test_two_ranks_give_the_logits_of_one(ranks, arch, kind):
    """Every logit of prefill and decode steps within 1e-4 of one process's; the compact CPU layers (bf16
    activations, int8 rows quantized per rank's share of a row) within their own distance from fp32."""
    want = reference(arch, "float" if kind == "float" else "gguf")  # fp32 from the file's blocks
    tol = 1e-4
    if kind == "compact":
        tol = 2 * (run(build(arch, kind)) - want).abs().max().item() + 1e-3
    for rank, got in enumerate(ranks):
        logits, kv_heads = got[arch, kind]
        assert logits.shape == want.shape
        err = (logits - want).abs().max().item()
        assert err <= tol, f"{arch} {kind} rank {rank}: max |delta logit| {err} > {tol}"
        assert kv_heads == max(1, CONFIGS[arch]["num_key_value_heads"] // 2)  # the cache: this rank's KV heads


def test_the_engine_on_two_ranks_serves_the_tokens_of_one(ranks):
    want = serve_requests(build("qwen3", "float"))
    assert ranks[0]["engine"] == want
    assert all(len(t) == 5 for t in want)


def test_heads_that_do_not_divide_are_refused():
    cfg = CONFIGS["llama"]
    with pytest.raises(KilnError, match="attention heads .4. to divide"):
        Shard(0, 3).split(cfg, {})
    with pytest.raises(KilnError, match="KV heads .2. to divide among them, or to divide the ranks"):
        Shard(0, 3).split(dict(cfg, num_attention_heads=6), {})
    assert Shard(3, 4).split(cfg, {})[0]["num_key_value_heads"] == 1  # 2 KV heads on 4 ranks: each on two
    s = Sizes(heads=8, kv_heads=2, head_dim=4, intermediate=8, vocab=8, world=4)
    assert [s.kv_rows(r) for r in range(4)] == [(0, 4), (0, 4), (4, 8), (4, 8)]  # the head its queries read


def test_the_mlp_is_cut_in_whole_blocks_of_down_proj():
    cfg, weights = CONFIGS["llama"], weights_for("llama", True)  # 768 columns: 3 Q6_K blocks of 256
    local = [Shard(r, 2).split(cfg, weights) for r in (0, 1)]
    assert [c["intermediate_size"] for c, _ in local] == [256, 512]
    assert [w.shapes()["model.layers.1.mlp.down_proj.weight"] for _, w in local] == [(256, 256), (256, 512)]
    with pytest.raises(KilnError, match="3 blocks|768 columns in blocks of 256 cannot be split among 4"):
        Shard(0, 4).split(dict(cfg, num_attention_heads=4, num_key_value_heads=4), weights)
    assert Shard(1, 2).split(CONFIGS["llama"], weights_for("llama", False))[0]["intermediate_size"] == 384


def test_a_row_cut_inside_a_block_is_refused():
    cfg = dict(CONFIGS["llama"], head_dim=64)  # o_proj's input, 256 columns of Q4_K, cut at 128: inside a block
    o = random_gguf("o", (256, 256), Q4_K, torch.Generator().manual_seed(0))
    weights = {"model.layers.0.self_attn.o_proj.weight": o}
    _, mine = Shard(1, 2).split(cfg, weights)
    with pytest.raises(KilnError, match="blocks of 256 columns.*column 128"):
        mine["model.layers.0.self_attn.o_proj.weight"]


# --- kiln generate --tensor-parallel ---------------------------------------------------------------------------

def _kiln(*args, launcher=("-m", "kiln.cli"), env=None):
    r = subprocess.run([sys.executable, *launcher, *map(str, args)], capture_output=True, timeout=300,
                       env=dict(os.environ, **(env or {})))
    return r.returncode, r.stdout.decode(), r.stderr.decode()


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    """A one-layer llama GGUF with a byte-level vocabulary (tests/test_cli.py), and its 1-rank greedy text on the CPU
    (the ranks below run there too: on a host with fewer GPUs than ranks the CUDA default refuses them)."""
    from test_cli import tiny_gguf

    import kiln
    path = tiny_gguf(tmp_path_factory.mktemp("tp_cli") / "tiny.gguf")
    model, tok = kiln.load(path, device="cpu")
    return path, kiln.generate(model, tok, "hello", max_tokens=12)


def test_generate_on_two_ranks_prints_the_text_of_one(tiny_file):
    path, want = tiny_file
    rc, out, err = _kiln("generate", "-m", path, "-p", "hello", "-n", 12, "--no-chat-template", "-tp", 2,
                         "--device", "cpu")
    assert rc == 0, err
    assert out == want + "\n"
    assert want.strip()


def test_serve_under_torchrun(tiny_file, tmp_path):
    """torchrun's ranks (RANK, WORLD_SIZE from its environment): rank 0 serves HTTP, rank 1 follows; a greedy
    completion is the 1-rank text; SIGTERM ends the job (rank 0 tells its follower first)."""
    import json
    import signal
    import socket
    import time
    import urllib.request
    path, want = tiny_file
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "serve.log", "wb")
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "kiln",
                            "serve", "-m", str(path), "--port", str(port), "--device", "cpu"],
                           stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=5).status == 200:
                    break
            except OSError:
                pass
            assert job.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.3)
        body = json.dumps({"prompt": "hello", "max_tokens": 12, "temperature": 0}).encode()
        req = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
        got = json.loads(urllib.request.urlopen(req, timeout=60).read())["choices"][0]["text"]
        assert got == want
    finally:
        job.send_signal(signal.SIGTERM)
        job.wait(timeout=60)
        log.close()


def test_generate_refuses_what_does_not_combine(tiny_file, capsys):
    from kiln.cli import main
    rc = main(["generate", "-m", str(tiny_file[0]), "-p", "hi", "-tp", "2", "--prompt-lookup-ngram", "3"])
    assert rc == 2 and "--prompt-lookup-ngram does not combine with --tensor-parallel" in capsys.readouterr().err
    rc = main(["generate", "-m", str(tiny_file[0]), "-p", "hi", "-tp", "3"])  # refused before a rank starts
    assert rc == 2 and "attention heads (2) to divide among them" in capsys.readouterr().err
