"""`kiln bench`: prefill, decode and effective speed of one model file, optionally beside llama.cpp.

Owns: the measurement protocol (fixed random prompt ids, warm-up, medians of repeats, device-side
timing with one synchronization per measured region; prefill per prompt length, its first (eager) run
apart; decode per context depth, as a device loop and as `generate` streams it; load and cold start), the
bandwidth roofline (weight bytes read per decode step over the copy bandwidth measured in the same run),
and the llama.cpp comparison through llama-cpp-python's C API in a child process, timed as llama-bench
times it, its agreement check untimed (it must not share a process with torch: loading it after torch
crashes on the GPU machine).
Not: kernels or graphs (generate.py, quant/, ops/), result archiving (bench/ scripts write JSON there).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from kiln.errors import KilnError
from kiln.ops.pick import argmax


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Bytes per second of a large device copy, counting read + write (NOTES.md's convention)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * nbytes / statistics.median(_timed(lambda: dst.copy_(src), device) for _ in range(5))


def weight_bytes_per_token(model) -> int:
    """Bytes of every matrix a decode step reads: all linear layers including the output head."""
    total = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(getattr(m, "nbytes", None), int):  # QuantLinear: packed bytes
            total += m.nbytes
    return total


def prompt_ids(vocab: int, n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    hi = min(vocab, 32000)  # ordinary tokens of every vocabulary; avoids special ids at the top
    return torch.randint(100, hi, (n,), generator=g).tolist()


def _timed(fn, device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


@torch.inference_mode()
def run_kiln(model, tokenizer, lengths: list[int], g: int, depths: list[int], repeats: int,
             cache_types: tuple = (None, None), pool=None) -> dict:
    """Prefill of each prompt length, decode after each depth (device loop, as llama-bench's tg), the
    decode and effective speed `generate` gets (stream_generate without log-probabilities: the host reads
    and detokenizes every token), time to first token; medians of `repeats`. `pool`: the DecoderPool to use
    (tensor parallelism's rank 0 passes its launch.LeaderPool); a fresh one by default."""
    from kiln.decoder import DecoderPool
    from kiln.generate import stream_generate
    device = next(model.parameters()).device
    ids_all = torch.tensor([prompt_ids(model.args.vocab_size, max(lengths + depths + [1]))], device=device)
    pool = pool or DecoderPool(model, keep=1)
    dec = pool.get(max(lengths + [d + 1 for d in depths]) + g + 1, *cache_types)  # the size generate would use
    capture_s = _timed(lambda: dec.step(ids_all[0, :1], 0), device)  # captures the decode graph (CUDA)

    def decode(start, n):  # the device loop: no token read back until the end
        tok = ids_all[0, :1]
        for i in range(n):
            tok = argmax(dec.step(tok, start + i))
        return tok

    pre, first = {}, {}
    for p in lengths:
        ids = ids_all[:, :p]
        first[p] = 1e3 * _timed(lambda: dec.prefill(ids, 0).argmax(-1), device)  # a length's first prompt
        dec.prefill(ids, 0)  # the second captures its prefill graph (CUDA)
        pre[p] = p / statistics.median(_timed(lambda: dec.prefill(ids, 0).argmax(-1), device)
                                       for _ in range(repeats))
    tg = {}
    for d in depths:
        if d:
            dec.prefill(ids_all[:, :d], 0)
        decode(max(d, 1), 4)
        tg[d] = g / statistics.median(_timed(lambda: decode(max(d, 1), g), device) for _ in range(repeats))
    # The device loop over the span a generation below decodes (after the same prompt): its depth, so that the
    # user-facing figure is compared with the device-only one for the same work.
    dec.prefill(ids_all[:, :lengths[0]], 0)
    decode(lengths[0], 4)
    at_prompt = g / statistics.median(_timed(lambda: decode(lengths[0], g), device) for _ in range(repeats))
    user, eff, ttft = [], [], []
    prompt = ids_all[0, :lengths[0]].tolist()
    for _ in range(repeats + 2):  # the first two runs: a prompt of a new length, then its graph's capture
        t0 = time.perf_counter()
        for r in stream_generate(model, tokenizer, prompt, g, ignore_eos=True, decoders=pool, logprobs=False,
                                 cache_type_k=cache_types[0], cache_type_v=cache_types[1]):
            if r.generation_tokens == 1:
                t1 = time.perf_counter()
        t2 = time.perf_counter()
        user.append((g - 1) / (t2 - t1) if g > 1 else float("nan"))
        eff.append(g / (t2 - t0))
        ttft.append(1e3 * (t1 - t0))
    user, eff, ttft = user[2:], eff[2:], ttft[2:]
    forward = getattr(pool, "forward", model)  # a LeaderPool's forward: on every rank
    return {
        "prefill_tok_s": pre, "prefill_first_ms": first, "decode_tok_s": tg,
        "decode_user_tok_s": statistics.median(user), "decode_device_at_prompt_tok_s": at_prompt,
        "user_over_device": statistics.median(user) / at_prompt, "effective_tok_s": statistics.median(eff),
        "ttft_ms": statistics.median(ttft), "ms_per_token": 1e3 / tg[depths[0]], "capture_s": capture_s,
        "prompt_logits_top1": forward(ids_all[:, :min(lengths[0], 512)])[0].argmax(-1).tolist(),
    }


def run_speculative(model, tokenizer, prompt: list[int], g: int, repeats: int, drafting: dict) -> dict:
    """Speculative decoding as `generate` streams it (stream_generate with the drafter, greedy) beside plain
    decoding of the same prompt, alternately; medians of `repeats`; the drafts kept over every run."""
    from kiln.decoder import DecoderPool
    from kiln.generate import stream_generate
    pool = DecoderPool(model, keep=1)
    times, drafted, accepted, same = {"plain": [], "speculative": []}, 0, 0, True
    for i in range(repeats + 1):  # the first run of each: new lengths, graph captures
        out = {}
        for kind in ("plain", "speculative"):
            kw = drafting if kind == "speculative" else {}
            toks, t1 = [], None
            for r in stream_generate(model, tokenizer, prompt, g, ignore_eos=True, decoders=pool, logprobs=False,
                                     temperature=0.0, **kw):
                t1 = t1 or time.perf_counter()
                toks.append(r.token)
            t2 = time.perf_counter()
            if i:
                times[kind].append((len(toks) - 1) / (t2 - t1) if len(toks) > 1 else float("nan"))
                if kind == "speculative":
                    drafted, accepted = drafted + r.drafted, accepted + r.accepted
            out[kind] = toks
        same = same and out["plain"] == out["speculative"]
    plain, spec = statistics.median(times["plain"]), statistics.median(times["speculative"])
    return {"drafter": ("draft model" if drafting.get("draft_model") is not None
                        else f"prompt lookup (n-gram <= {drafting.get('prompt_lookup')})"),
            "num_draft_tokens": drafting.get("num_draft_tokens"), "plain_user_tok_s": plain,
            "speculative_user_tok_s": spec, "speedup": spec / plain, "drafted": drafted, "accepted": accepted,
            "acceptance": accepted / drafted if drafted else float("nan"), "greedy_equal": same}


def cold_generate(model_name, device=None) -> float:
    """Wall seconds of a fresh `kiln generate --max-tokens 1` process (imports, load, prefill, one token)."""
    cmd = [sys.executable, "-m", "kiln.cli", "generate", "--model", str(model_name), "--max-tokens", "1",
           "--prompt", "Hello"] + (["--device", str(device)] if device else [])
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise KilnError(f"kiln generate failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    return time.perf_counter() - t


# llama.cpp timed as llama-bench times it (its C API through llama-cpp-python's bindings): prompts in batches of
# n_batch 2048 (n_ubatch 512), logits of the last row only, flash attention on, memory cleared before each
# run; generation one token per llama_decode with a synchronize after each; a depth prefilled untimed first;
# its KV cache in kiln's -ctk / -ctv types where llama.cpp has them (`_GGML_KV`; else its default, f16).
# The agreement check (every prompt row's argmax) runs afterwards, outside the timed region.
_LLAMA_WORKER = r"""
import ctypes, json, statistics, sys, time
t0 = time.perf_counter()
import llama_cpp
cfg = json.loads(sys.argv[1])
ids, g, reps, lengths, depths = cfg["ids"], cfg["g"], cfg["repeats"], cfg["lengths"], cfg["depths"]
n_ctx = max(lengths + [d + g for d in depths]) + 16
kv = {k: v for k, v in (("type_k", cfg["type_k"]), ("type_v", cfg["type_v"])) if v is not None}
llm = llama_cpp.Llama(cfg["path"], n_gpu_layers=-1, flash_attn=True, n_ctx=n_ctx, n_batch=2048, n_ubatch=512,
                      verbose=False, n_threads=cfg["threads"], n_threads_batch=cfg["threads"], **kv)
load_s = time.perf_counter() - t0
ctx = llm._ctx.ctx
mem = llama_cpp.llama_get_memory(ctx)
n_vocab = llm.n_vocab()
def decode(tokens, logits=False):
    for i in range(0, len(tokens), 2048):
        chunk = tokens[i:i + 2048]
        arr = (llama_cpp.llama_token * len(chunk))(*chunk)
        if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, len(chunk))):
            raise SystemExit("llama_decode failed")
    llama_cpp.llama_synchronize(ctx)
def gen(n):
    tok = (llama_cpp.llama_token * 1)(ids[0])
    for _ in range(n):
        if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(tok, 1)):
            raise SystemExit("llama_decode failed")
        llama_cpp.llama_synchronize(ctx)
def timed(fn, before=None):
    llama_cpp.llama_memory_clear(mem, False)
    if before:
        before()
    t = time.perf_counter(); fn(); return time.perf_counter() - t
first_token_s = load_s + timed(lambda: decode(ids[:lengths[0]]))
pre = {p: p / statistics.median(timed(lambda: decode(ids[:p])) for _ in range(reps)) for p in lengths}
tg = {d: g / statistics.median(timed(lambda: gen(g), (lambda: decode(ids[:d])) if d else None) for _ in range(reps))
      for d in depths}
def top1(n):  # every row's logits, untimed: a batch that asks for all of them
    llama_cpp.llama_memory_clear(mem, False)
    batch = llama_cpp.llama_batch_init(n, 0, 1)
    for i in range(n):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = ids[i], i, 1, 1
        batch.seq_id[i][0] = 0
    batch.n_tokens = n
    if llama_cpp.llama_decode(ctx, batch):
        raise SystemExit("llama_decode failed")
    out = []
    for i in range(n):
        row = llama_cpp.llama_get_logits_ith(ctx, i)
        out.append(max(range(n_vocab), key=row.__getitem__))
    llama_cpp.llama_batch_free(batch)
    return out
print(json.dumps({"prefill_tok_s": pre, "decode_tok_s": tg, "ms_per_token": 1e3 / tg[depths[0]],
                  "load_s": load_s, "first_token_s": first_token_s,
                  "prompt_logits_top1": top1(min(lengths[0], 512)), "version": llama_cpp.__version__}))
"""


_GGML_KV = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8, "bf16": 30}  # ggml's type numbers of kiln's cache types


def run_llamacpp(path: str, ids: list[int], lengths: list[int], g: int, depths: list[int], repeats: int,
                 threads: int, kv_types: tuple = (None, None)) -> dict:
    """llama.cpp's figures for the same work (`_LLAMA_WORKER`, its own process); kv_types: kiln's canonical
    cache type names (None: llama.cpp's default), each passed on where llama.cpp has it."""
    cfg = json.dumps({"path": path, "ids": ids, "lengths": lengths, "g": g, "depths": depths, "repeats": repeats,
                      "threads": threads, "type_k": _GGML_KV.get(kv_types[0]), "type_v": _GGML_KV.get(kv_types[1])})
    r = subprocess.run([sys.executable, "-c", _LLAMA_WORKER, cfg], capture_output=True, text=True)
    if r.returncode:
        raise KilnError(f"llama.cpp comparison failed (is llama-cpp-python installed?): "
                        f"{r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("prefill_tok_s", "decode_tok_s"):  # JSON turned the lengths into strings
        out[key] = {int(k): v for k, v in out[key].items()}
    return out


def _ints(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    return vals


def main(argv: list[str]) -> int:
    from kiln.commands import _Parser, _model_args, _quantized_arg
    p = _Parser(prog="kiln bench", description="Measure prefill, decode and effective tok/s of a model.")
    _model_args(p)
    p.add_argument("-p", "--prompt-tokens", type=_ints, default=[512],
                   help="prompt length(s) in tokens, comma-separated (default 512); the first is also the "
                        "prompt of the generate runs")
    p.add_argument("-g", "--gen-tokens", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument("-d", "--depth", type=_ints, default=[0],
                   help="context depth(s) the decode is timed after, comma-separated, as llama-bench -d "
                        "(default 0)")
    p.add_argument("-r", "--repeats", type=int, default=5, help="timed runs; the report takes the median "
                                                                 "(default 5)")
    p.add_argument("--compare", choices=["llama.cpp"], default=None, help="also run llama.cpp on the same file "
                   "(with the same -ctk / -ctv where llama.cpp has the type)")
    p.add_argument("--cold", action="store_true",
                   help="also time a fresh `kiln generate --max-tokens 1` process (cold start)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp CPU threads")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    _quantized_arg(p)
    from kiln.commands import (_adapter_args, _check_adapter, check_draft, draft_args, _drafting, cache_kw,
                               cache_type_args, ngl_arg, parallel_wanted, tp_arg)
    _adapter_args(p)
    cache_type_args(p)
    ngl_arg(p)
    tp_arg(p, "measures and prints (figures of its own shard)")
    draft_args(p)
    p.add_argument("--prompt-file", default=None,
                   help="with --draft-model or --prompt-lookup-ngram: the text whose continuation the speculative "
                        "and plain greedy runs time (default: the random prompt of the other rows)")
    a = p.parse_args(argv)
    cache_kw(a)
    check_draft(a)
    _check_adapter(a)
    if a.adapter is not None and a.compare:
        raise KilnError("--adapter does not combine with --compare (llama.cpp would run the base alone)")
    q = {"auto": None, "on": True, "off": False}[a.quantized]
    spec = None
    if a.draft_model is not None or a.prompt_lookup_ngram:
        spec = (lambda: _drafting(a), a.prompt_file)
    kw = dict(quantized=q, depths=a.depth, cold=a.cold, cache_types=(a.cache_type_k, a.cache_type_v),
              n_gpu_layers=a.n_gpu_layers, adapter=(a.adapter, a.adapter_scale) if a.adapter else None)
    args = (a.model, a.prompt_tokens, a.gen_tokens, a.repeats, a.device, a.dtype, a.compare, a.threads)
    if parallel_wanted(a):
        if spec is not None:
            raise KilnError("--draft-model and --prompt-lookup-ngram do not combine with --tensor-parallel yet")
        return _bench_parallel(a, argv, args, kw)
    report = bench(*args, **kw, speculative=spec)
    print(json.dumps(report, indent=1) if a.json else format_report(report))
    return 0


def _bench_parallel(a, argv, args, kw) -> int:
    """bench over the ranks of a tensor-parallel group (kiln/launch.py): every rank loads its shard, rank 0
    measures and prints while the others follow."""
    from kiln import launch
    from kiln.commands import check_parallel
    check_parallel(a)
    if a.compare or a.cold:
        raise KilnError("--compare and --cold do not combine with --tensor-parallel yet")

    def lead(model, tok, pool):
        report = bench(*args, **kw, loaded=(model, tok, pool))
        print(json.dumps(report, indent=1) if a.json else format_report(report))

    return launch.run(a.tensor_parallel, ["bench", *argv], a.device, lambda device, shard, first: _load_timed(
        args[0], device, args[5], kw["quantized"], shard), lead, a.model)


def _load_timed(model_name, device, dtype, quantized, shard=None):
    from kiln.load import load
    t = time.perf_counter()
    model, tok = load(model_name, device=device, dtype=dtype, quantized=quantized, shard=shard)
    model.load_s = time.perf_counter() - t
    return model, tok


def bench(model_name, p, g, repeats, device=None, dtype=None, compare=None, threads=2, quantized=None,
          depths=(0,), cold=False, cache_types: tuple = (None, None), n_gpu_layers=None, loaded=None,
          speculative=None, adapter=None) -> dict:
    """The report of one model; `loaded`: (model, tokenizer, decoder pool) already loaded (a tensor-parallel
    rank 0: its shard and its LeaderPool), else the model is loaded here; `adapter`: (PEFT folder, scale)
    applied after the load (its time included). `speculative`: (a function returning
    stream_generate's drafting arguments, a prompt file or None) to also time speculative decoding."""
    from kiln.generate import peak_memory_gb
    from kiln.load import load
    lengths, depths = ([p] if isinstance(p, int) else list(p)), list(depths)
    if min(lengths) < 1 or g < 1 or repeats < 1 or min(depths) < 0:
        raise KilnError("--prompt-tokens, --gen-tokens and --repeats must be >= 1, --depth >= 0")
    t = time.perf_counter()
    if loaded is None:
        model, tokenizer = load(model_name, device=device, dtype=dtype, quantized=quantized,
                                n_gpu_layers=n_gpu_layers, ctx_size=max(lengths) + max(depths) + g + 1)
        if adapter is not None:
            from kiln.finetune.layers import load_adapter
            load_adapter(model, *adapter)
        pool, load_s = None, time.perf_counter() - t
    else:
        (model, tokenizer, pool), load_s = loaded, loaded[0].load_s
    dev = next(model.parameters()).device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    out = {"model": getattr(model, "source", str(model_name)), "device": name,
           "torch": torch.__version__, "p": lengths, "g": g, "depths": depths, "repeats": repeats, "load_s": load_s}
    if dev.type == "cpu":  # the batch-1 decode step's kernels (kiln/native.py) or torch's alone
        from kiln import native
        from kiln.models.base import native_plan
        out["native_cpu_kernels"] = model.policy.native and native.available()
        from kiln.cache import KVCache
        reads = KVCache.for_model(model, max_len=1, type_k=cache_types[0], type_v=cache_types[1]).native_reads
        out["native_step"] = bool(out["native_cpu_kernels"] and model.policy.native_step and reads
                                  and native_plan(model.model.layers) is not None)  # a token in one native call
        from kiln.ops import cpu as ops_cpu  # a prompt's quantized matmuls in bf16 through AMX's tiles
        out["amx_prompts"] = ops_cpu.amx(model.policy)
    if dev.type == "cuda":  # GPU memory the loaded model holds, beside the file it came from
        out["memory_after_load_gb"] = torch.cuda.memory_allocated(dev) / 1e9
        if os.path.isfile(out["model"]):
            out["file_gb"] = os.path.getsize(out["model"]) / 1e9
            out["memory_over_file"] = out["memory_after_load_gb"] / out["file_gb"]
    vocab = model.args.vocab_size
    if loaded is not None:  # what each rank holds and reads per token below: its shard
        out["tensor_parallel"] = model.shard.world
    k = run_kiln(model, tokenizer, lengths, g, depths, repeats, cache_types, pool)
    k["kv_cache"] = {"types": dec_types(model, cache_types), **_kv_bytes_per_token(model, cache_types)}
    wb, bw = weight_bytes_per_token(model), copy_bandwidth(dev)
    d0 = k["decode_tok_s"][depths[0]]
    k.update(load_s=load_s, peak_memory_gb=peak_memory_gb(dev), weight_bytes_per_token=wb, copy_bw_gb_s=bw / 1e9,
             achieved_gb_s=wb * d0 / 1e9, roofline_share=wb * d0 / bw)
    out["kiln"] = k
    if speculative is not None:
        make, prompt_file = speculative
        prompt = prompt_ids(vocab, lengths[0])
        if prompt_file is not None:
            from pathlib import Path
            prompt = tokenizer.encode(Path(prompt_file).read_text())
        k["speculative"] = run_speculative(model, tokenizer, prompt, g, repeats, make())
    if cold:
        k["cold_generate_s"] = cold_generate(out["model"], device)
    if compare == "llama.cpp":
        del model  # llama.cpp gets the device to itself
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        ids = prompt_ids(vocab, max(lengths + depths + [1]))
        mine = k["kv_cache"]["types"].split("/")
        kv = [t if t in _GGML_KV and given else None for t, given in zip(mine, cache_types)]
        lc = run_llamacpp(out["model"], ids, lengths, g, depths, repeats, threads, kv)
        lc["kv_cache"] = "/".join(t or "f16" for t in kv)  # what llama.cpp ran with
        n = len(lc["prompt_logits_top1"])
        out["llama.cpp"] = lc
        out["prompt_top1_agreement"] = sum(x == y for x, y in zip(k["prompt_logits_top1"], lc["prompt_logits_top1"])) / n
        out["ratio"] = {"prefill_tok_s": {p: k["prefill_tok_s"][p] / lc["prefill_tok_s"][p] for p in lengths},
                        "decode_tok_s": {d: k["decode_tok_s"][d] / lc["decode_tok_s"][d] for d in depths},
                        "decode_user_tok_s": k["decode_user_tok_s"] / lc["decode_tok_s"][depths[0]],
                        "load_s": k["load_s"] / lc["load_s"]}
    for side in ("kiln", "llama.cpp"):
        out.get(side, {}).pop("prompt_logits_top1", None)
    return out


def format_report(r: dict) -> str:
    k, lc, ratio = r["kiln"], r.get("llama.cpp"), r.get("ratio", {})
    native = {True: ", native decode kernels", False: ", no native kernels"}.get(r.get("native_cpu_kernels"), "")
    native += ", one call a token" if r.get("native_step") else ""
    native += ", bf16 prompts through AMX" if r.get("amx_prompts") else ""
    tp = f", tensor parallel over {r['tensor_parallel']} ranks (rank 0's figures)" if "tensor_parallel" in r else ""
    lines = [f"model   {r['model']}", f"device  {r['device']}{native}{tp}  (torch {r['torch']})",
             f"load {r['load_s']:.1f} s, decode graph capture {k['capture_s']:.2f} s; g={r['g']}, median of "
             f"{r['repeats']}", "", f"{'':34}{'kiln':>12}" + (f"{'llama.cpp':>12}{'ratio':>8}" if lc else "")]

    def row(label, mine, theirs=None, rat=None, fmt="12.1f"):
        line = f"{label:<34}{mine:>{fmt}}"
        if lc:
            line += f"{theirs:>{fmt}}" if theirs is not None else f"{'':>12}"
            line += f"{rat:>8.2f}" if rat is not None else ""
        return line

    for p in r["p"]:
        lines.append(row(f"prefill pp{p} tok/s", k["prefill_tok_s"][p], lc and lc["prefill_tok_s"][p],
                         ratio.get("prefill_tok_s", {}).get(p)))
        lines.append(row("  first prompt of that length ms", k["prefill_first_ms"][p]))
    for d in r["depths"]:
        lines.append(row(f"decode tg{r['g']}" + (f" @ depth {d}" if d else "") + " tok/s", k["decode_tok_s"][d],
                         lc and lc["decode_tok_s"][d], ratio.get("decode_tok_s", {}).get(d)))
    lines.append(row("decode as generate streams it", k["decode_user_tok_s"], lc and lc["decode_tok_s"][r["depths"][0]],
                     ratio.get("decode_user_tok_s")))
    lines.append(f"  = {100 * k['user_over_device']:.1f}% of the device loop over the same span "
                 f"({k['decode_device_at_prompt_tok_s']:.1f} tok/s after the pp{r['p'][0]} prompt)")
    if "speculative" in k:
        sp = k["speculative"]
        lines.append(row(f"speculative greedy, K={sp['num_draft_tokens']}", sp["speculative_user_tok_s"]))
        lines.append(row("  plain greedy, same prompt", sp["plain_user_tok_s"]))
        lines.append(f"  {sp['drafter']}: {sp['speedup']:.2f}x, {sp['accepted']} of {sp['drafted']} drafts kept "
                     f"({100 * sp['acceptance']:.0f}%), tokens equal to plain greedy: {sp['greedy_equal']}")
    lines.append(row(f"effective tok/s (pp{r['p'][0]} + tg{r['g']})", k["effective_tok_s"]))
    lines.append(row("time to first token ms", k["ttft_ms"]))
    lines.append(row("load s", k["load_s"], lc and lc["load_s"], ratio.get("load_s"), fmt="12.2f"))
    if "cold_generate_s" in k:
        lines.append(row("cold start to first token s", k["cold_generate_s"], lc and lc["first_token_s"],
                         fmt="12.2f"))
    elif lc:  # kiln's own cold start runs with --cold only
        lines.append(f"{'cold start to first token s':<34}{'(--cold)':>12}{lc['first_token_s']:>12.2f}")
    kv = k.get("kv_cache")
    if kv:
        ring = (f" ({kv['window_layers']} of {kv['layers']} layers keep only their {kv['window']}-token window: "
                f"{kv['bytes_per_token_past_window']:,} a token past it)") if kv.get("window_layers") else ""
        lines.append(f"KV cache {kv['types']}, {kv['bytes_per_token']:,} bytes a token{ring}"
                     + (f"; llama.cpp's {lc['kv_cache']}" if lc and "kv_cache" in lc else ""))
    if "memory_over_file" in r:
        lines += ["", f"GPU memory after load {r['memory_after_load_gb']:.3f} GB = "
                      f"{r['memory_over_file']:.2f} x the file ({r['file_gb']:.3f} GB)"]
    lines += ["", f"peak memory {k['peak_memory_gb']:.2f} GB; weights read per token "
                  f"{k['weight_bytes_per_token'] / 1e6:.1f} MB; {k['achieved_gb_s']:.0f} GB/s of "
                  f"{k['copy_bw_gb_s']:.0f} GB/s copy bandwidth ({100 * k['roofline_share']:.0f}% of roofline)"]
    if "prompt_top1_agreement" in r:
        lines.append(f"prompt logits top-1 agreement with llama.cpp: {100 * r['prompt_top1_agreement']:.1f}% "
                     f"(an untimed pass)")
    if lc:
        lines.append("llama.cpp cold start: its process start, load and first prompt; kiln's: a fresh `kiln "
                     "generate` process")
    return "\n".join(lines)


def dec_types(model, cache_types) -> str:
    """The cache types as 'K/V', canonical names."""
    from kiln.kv_types import cache_type
    dtype = next(model.parameters()).dtype
    return "/".join(cache_type(t, dtype) for t in cache_types)


def _kv_bytes_per_token(model, cache_types) -> dict:
    """KV cache bytes one token takes in every layer; with sliding-window layers (which keep only their window,
    cache.plan_rings), how many there are and the bytes a token takes past the window (the other layers')."""
    from kiln.cache import KVCache, layer_windows
    per_token = KVCache.for_model(model, max_len=1, type_k=cache_types[0], type_v=cache_types[1]).nbytes
    windows = layer_windows(model)
    out = {"bytes_per_token": per_token, "layers": len(windows)}
    sliding = [w for w in windows if w]
    if sliding:  # every layer's keys and values have one shape: a layer's share is per_token / layers
        out.update(window_layers=len(sliding), window=max(sliding),
                   bytes_per_token_past_window=per_token * (len(windows) - len(sliding)) // len(windows))
    return out
