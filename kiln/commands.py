"""Front doors for the core subcommands: generate, chat, info, pull.

Owns: each command's argparse options, the checks of everything that can be judged before the model is
pulled or loaded (`check_model_args`, also serve's), and how each prints (generate streams its text).
Thin: the work is in load.py, generate.py, hub.py and formats/.
Not: dispatch or error printing (cli.py).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from pathlib import Path

from kiln.errors import KilnError
from kiln.generate import sampling_params
from kiln.hub import BUILTIN, DEFAULT_MODEL


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own exit is 2 as well; keep it one line
        raise KilnError(message)


def _model_args(p: argparse.ArgumentParser):
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"GGUF file, Hugging Face folder or repo id, or a built-in name "
                        f"({', '.join(BUILTIN)}); default {DEFAULT_MODEL}")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: fp32 on CPU, "
                                                 "bf16 on GPU)")


def _quantized_arg(p: argparse.ArgumentParser):
    p.add_argument("--quantized", choices=["auto", "on", "off"], default="auto",
                   help="keep the weights compact (auto: what the file quantized, on GPUs as its GGUF blocks, on "
                        "CPU as kiln/quant/cpu.py's layers, float weights float; on: float weights as int8 rows "
                        "too on CPU; off: the float copy, about 4x a Q4 file in float32 on CPU)")


def ngl(text: str):
    """-ngl's value: 'auto', 'all' or a layer count >= 0."""
    if text in ("auto", "all"):
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a layer count, 'all' or 'auto', got {text!r}")
    return int(text)


def ngl_arg(p: argparse.ArgumentParser):
    p.add_argument("--n-gpu-layers", "-ngl", type=ngl, default="auto", metavar="N|all|auto",
                   help="blocks on the GPU, the rest on the CPU (compact layers); auto (default): as many as "
                        "fit in free GPU memory (`kiln fit` shows the plan); ignored without a GPU unless N > 0")


def _sampling_args(p: argparse.ArgumentParser):
    p.add_argument("--max-tokens", "-n", type=int, default=256, help="most tokens to generate (default 256)")
    p.add_argument("--temp", type=float, default=0.0, help="temperature; 0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample from the smallest set of tokens whose probabilities add up to P (0 < P <= 1; "
                        "default 1, off)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the K most likely tokens (default 0, off)")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens less likely than P times the most likely one (0 <= P <= 1; default 0, off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 makes tokens already in the context less likely (default 1, off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (0 .. 2^64-1; default: "
                                                          "a fresh one each run)")
    p.add_argument("--ctx-size", type=int, default=None,
                   help="context length in tokens, prompt included (default: the model's)")
    cache_type_args(p)
    _bounded_args(p)


def _bounded_args(p: argparse.ArgumentParser):
    p.add_argument("--max-kv-size", type=int, default=None, metavar="N",
                   help="rotating KV cache of N tokens: keep the first --keep tokens and the latest ones, and "
                        "attend only to those (mlx-lm's); memory stays bounded however long the generation, up "
                        "to --ctx-size (default: off; sliding-window layers, as Gemma 3's, keep only their "
                        "window anyway, except with speculative decoding or --prompt-cache)")
    p.add_argument("--keep", type=int, default=4, metavar="N",
                   help="tokens at the start that --max-kv-size and --context-shift never drop (default 4)")
    p.add_argument("--context-shift", action="store_true",
                   help="when the context (--ctx-size) fills, drop half of the tokens after the first --keep "
                        "and go on (llama.cpp's); default: generation stops there, finish reason 'length'")


def cache_type_args(p: argparse.ArgumentParser):
    types = ("f32, f16, bf16, q8_0, q4_0 or fp8 (default: the model's dtype; q8_0 and q4_0 are stored rotated by "
             "a Hadamard matrix, keys less the model's k bias, so a few large channels do not cost a block its "
             "precision)")
    p.add_argument("-ctk", "--cache-type-k", default=None, help=f"KV cache type for keys: {types}")
    p.add_argument("-ctv", "--cache-type-v", default=None, help=f"KV cache type for values: {types}")


def draft_args(p: argparse.ArgumentParser):
    p.add_argument("--draft-model", default=None,
                   help="speculative decoding: a smaller model with the same vocabulary drafts tokens that the "
                        "model checks in one step (output as without it)")
    p.add_argument("--num-draft-tokens", type=int, default=4, help="tokens drafted per step (default 4)")
    p.add_argument("--prompt-lookup-ngram", type=int, default=0, metavar="N",
                   help="speculative decoding without a draft model: draft the tokens that followed the context's "
                        "last n-gram (n <= N) earlier in it; good when the answer repeats the prompt (code edits)")


def _check_bounded(a) -> None:
    """--max-kv-size and --keep, before the load (stream_generate checks them too)."""
    if a.keep < 0:
        raise KilnError(f"--keep {a.keep}: must be at least 0")
    if a.max_kv_size is not None and a.max_kv_size <= a.keep:
        raise KilnError(f"--max-kv-size {a.max_kv_size}: must be larger than --keep ({a.keep})")
    if a.max_kv_size is not None and a.context_shift:
        raise KilnError("give --max-kv-size or --context-shift, not both")
    if a.max_kv_size is not None and (a.draft_model or a.prompt_lookup_ngram or getattr(a, "prompt_cache", None)):
        raise KilnError("--max-kv-size does not combine with speculative decoding or --prompt-cache")
    if a.context_shift and (a.draft_model or a.prompt_lookup_ngram):
        raise KilnError("--context-shift does not combine with speculative decoding")


def check_draft(a) -> None:
    if a.num_draft_tokens < 1:
        raise KilnError(f"--num-draft-tokens {a.num_draft_tokens}: must be at least 1")
    if a.prompt_lookup_ngram < 0:
        raise KilnError(f"--prompt-lookup-ngram {a.prompt_lookup_ngram}: must be at least 1 (0: off)")
    if a.draft_model is not None and a.prompt_lookup_ngram:
        raise KilnError("give --draft-model or --prompt-lookup-ngram, not both")


def _drafting(a) -> dict:
    """stream_generate's speculative-decoding arguments; loads the draft model (as the model was loaded)."""
    draft = None
    if a.draft_model is not None:
        draft, _ = _load(argparse.Namespace(**{**vars(a), "model": a.draft_model, "adapter": None}))
    return dict(draft_model=draft, num_draft_tokens=a.num_draft_tokens, prompt_lookup=a.prompt_lookup_ngram)


def _sampling(a) -> dict:
    return dict(temperature=a.temp, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p,
                repetition_penalty=a.repetition_penalty, seed=a.seed)


def _bounded(a) -> dict:
    return dict(max_kv_size=a.max_kv_size, keep=a.keep, context_shift=a.context_shift)


def cache_kw(a) -> dict:
    """The KV cache options of the command line, checked (a bad type costs no load)."""
    from kiln.kv_types import cache_type
    for t in (a.cache_type_k, a.cache_type_v):
        cache_type(t, None)
    return dict(cache_type_k=a.cache_type_k, cache_type_v=a.cache_type_v)


def check_model_args(a) -> None:
    """--device and --dtype, before anything slow (a download, a load)."""
    from kiln.reader import dtype_named
    try:
        dtype_named(a.dtype)
    except KilnError as e:
        raise KilnError(f"--dtype: {e}") from None
    if a.device is None:
        return
    import torch
    try:
        device = torch.device(a.device)
    except (RuntimeError, ValueError):
        raise KilnError(f"--device {a.device!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise KilnError(f"--device {a.device!r}: kiln runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KilnError(f"--device {a.device}: no CUDA device is available to torch here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise KilnError(f"--device {a.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _check_sampling(a) -> None:
    """Everything about generation that can be judged without the model, so a mistake costs no load."""
    if a.max_tokens < 1:
        raise KilnError(f"--max-tokens {a.max_tokens}: must be at least 1")
    if a.ctx_size is not None and a.ctx_size < 2:
        raise KilnError(f"--ctx-size {a.ctx_size}: must be at least 2 (one prompt token and one generated)")
    if a.seed is not None and not 0 <= a.seed < 2 ** 64:
        raise KilnError(f"--seed {a.seed}: must be in 0 .. 2^64-1")
    sampling_params(**_sampling(a))
    cache_kw(a)
    check_model_args(a)


def _adapter_args(p: argparse.ArgumentParser):
    p.add_argument("--adapter", default=None, help="a PEFT LoRA adapter folder to apply (kiln finetune's output)")
    p.add_argument("--adapter-scale", type=float, default=1.0, help="multiplies the adapter's effect (default 1)")


def _check_adapter(a) -> None:
    """--adapter names a PEFT folder (checked before anything loads)."""
    adapter = getattr(a, "adapter", None)
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise KilnError(f"--adapter {adapter}: not a PEFT adapter folder (no adapter_config.json)")


def tp_arg(p: argparse.ArgumentParser, rank0: str = "reads the prompt and prints"):
    p.add_argument("--tensor-parallel", "-tp", type=int, default=None, metavar="N",
                   help="tensor parallelism: shard the model's heads, MLP and vocabulary over N processes (one "
                        "per GPU, NCCL; on the CPU, gloo and a share of the cores each); kiln starts them "
                        "itself, or run `torchrun --nproc-per-node N -m kiln ...` (several hosts: torchrun's "
                        f"--nnodes, --node-rank and --rdzv-* flags); rank 0 {rank0}, the others follow")


def _load(a, **over):
    from kiln.load import load
    _check_adapter(a)
    adapter = getattr(a, "adapter", None)
    quantized = {"auto": None, "on": True, "off": False}[a.quantized]
    kw = dict(device=a.device, dtype=a.dtype, progress=True, quantized=quantized,
              n_gpu_layers=getattr(a, "n_gpu_layers", None), ctx_size=getattr(a, "ctx_size", None),
              verbose=getattr(a, "verbose", False))
    model, tok = load(a.model, **{**kw, **over})
    if adapter is not None:
        from kiln.finetune.layers import load_adapter
        load_adapter(model, adapter, a.adapter_scale)
    return model, tok


def _read_prompt(a) -> str:
    if a.prompt is not None and a.prompt_file is not None:
        raise KilnError("give the prompt with --prompt or --prompt-file, not both")
    if a.prompt_file is not None:
        try:
            with open(a.prompt_file, encoding="utf-8") as f:
                prompt = f.read()
        except OSError as e:
            raise KilnError(f"cannot read --prompt-file {a.prompt_file}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise KilnError(f"--prompt-file {a.prompt_file} is not UTF-8 text") from None
    elif a.prompt == "-":
        prompt = sys.stdin.read()
    elif a.prompt is None:
        raise KilnError("give a prompt with --prompt TEXT, --prompt-file PATH or --prompt - (stdin)")
    else:
        prompt = a.prompt
    if not prompt.strip():  # the same rule with and without the chat template
        raise KilnError("the prompt is empty; give some text with --prompt TEXT, --prompt-file PATH or --prompt -")
    return prompt


def generate_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kiln generate", description="Generate text from a prompt; the text is printed as it is made.")
    _model_args(p)
    p.add_argument("--prompt", "-p", default=None, help="the prompt ('-' reads stdin); an empty or blank "
                                                        "prompt is an error")
    p.add_argument("--prompt-file", "-f", default=None, help="read the prompt from this file (UTF-8)")
    p.add_argument("--system", default=None, help="system message (chat template only)")
    p.add_argument("--no-chat-template", action="store_true", help="use the prompt as raw text")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="print the fit plan before loading (GPU runs), and speed and memory (and the drafts kept, with "
                        "speculative decoding) to stderr at the end")
    p.add_argument("--prompt-cache", default=None, metavar="FILE",
                   help="reuse the KV state of a prompt saved by `kiln cache-prompt` (same model)")
    draft_args(p)
    _quantized_arg(p)
    ngl_arg(p)
    _adapter_args(p)
    _sampling_args(p)
    tp_arg(p)
    return p


def _build_prompt(a, tok, prompt: str):
    """The prompt text as given, or chat messages where the chat template applies."""
    if not a.no_chat_template and tok.chat_template:
        msgs = ([{"role": "system", "content": a.system}] if a.system else [])
        return msgs + [{"role": "user", "content": prompt}]
    if a.system is not None:
        raise KilnError("--system needs a chat template, and this model has none")
    return prompt


def cache_prompt(argv: list[str]) -> int:
    p = _Parser(prog="kiln cache-prompt", description="Prefill a prompt and save its KV state to a file that "
                "`kiln generate --prompt-cache FILE` reuses (the prompt is built as generate builds it).")
    _model_args(p)
    p.add_argument("--prompt", "-p", default=None, help="the prompt ('-' reads stdin)")
    p.add_argument("--prompt-file", "-f", default=None, help="read the prompt from this file (UTF-8)")
    p.add_argument("--system", default=None, help="system message (chat template only)")
    p.add_argument("--no-chat-template", action="store_true", help="use the prompt as raw text")
    p.add_argument("--output", "-o", required=True, help="the prompt cache file to write")
    cache_type_args(p)
    _quantized_arg(p)
    a = p.parse_args(argv)
    kw = cache_kw(a)
    text = _read_prompt(a)
    if a.system is not None and a.no_chat_template:
        raise KilnError("--system needs the chat template; drop --no-chat-template or --system")
    model, tok = _load(a)
    from kiln.prompt_cache import cache_prompt as save
    try:
        n, size = save(model, tok, _build_prompt(a, tok, text), a.output, **kw)
    except OSError as e:
        raise KilnError(f"cannot write {a.output}: {e.strerror}") from None
    print(f"saved {n} prompt tokens ({size / 1e6:.1f} MB) to {a.output}", file=sys.stderr)
    return 0


def generate(argv: list[str]) -> int:
    a = generate_parser().parse_args(argv)
    _check_sampling(a)
    check_draft(a)
    _check_bounded(a)
    if parallel_wanted(a):
        if a.context_shift:
            raise KilnError("--context-shift does not combine with --tensor-parallel yet")
        return _generate_parallel(a, argv)
    prompt = _read_prompt(a)
    if a.system is not None and a.no_chat_template:
        raise KilnError("--system needs the chat template; drop --no-chat-template or --system")
    model, tok = _load(a)
    _print_generation(a, model, tok, prompt, **_drafting(a))
    return 0


def _print_generation(a, model, tok, prompt: str, **kw) -> None:
    """Stream the generated text to stdout (and, with --verbose, the speed to stderr)."""
    from kiln.generate import stream_generate
    prompt = _build_prompt(a, tok, prompt)
    last = None
    for last in stream_generate(model, tok, prompt, a.max_tokens, stop=a.stop, max_context=a.ctx_size,
                                logprobs=False, prompt_cache=a.prompt_cache, **kw, **_sampling(a),
                                **cache_kw(a), **_bounded(a)):
        print(last.text, end="", flush=True)  # as it is made, also into a pipe
    print(flush=True)
    if a.verbose and last is not None:
        print(f"==========\nPrompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens-per-sec\n"
              f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens-per-sec\n"
              f"Peak memory: {last.peak_memory:.2f} GB", file=sys.stderr)
        if last.drafted:
            print(f"Drafts: {last.accepted} of {last.drafted} kept ({100 * last.accepted / last.drafted:.0f}%)",
                  file=sys.stderr)


def parallel_wanted(a) -> bool:
    """Does the command run over tensor-parallel ranks: -tp N above 1, or under torchrun (or as a rank kiln
    spawned: WORLD_SIZE above 1 in the environment)?"""
    import os
    if a.tensor_parallel is not None and a.tensor_parallel < 1:
        raise KilnError(f"--tensor-parallel {a.tensor_parallel}: must be at least 1")
    return (a.tensor_parallel or 1) > 1 or os.environ.get("WORLD_SIZE", "1") not in ("", "1")


def check_parallel(a) -> None:
    """What tensor parallelism does not combine with yet, before any process is started."""
    for flag, on in (("--draft-model", getattr(a, "draft_model", None)),
                     ("--prompt-lookup-ngram", getattr(a, "prompt_lookup_ngram", 0)),
                     ("--prompt-cache", getattr(a, "prompt_cache", None)), ("--adapter", getattr(a, "adapter", None)),
                     ("--n-gpu-layers", getattr(a, "n_gpu_layers", "auto") not in ("auto", "all"))):
        if on:
            raise KilnError(f"{flag} does not combine with --tensor-parallel yet; drop one of them")


def _generate_parallel(a, argv: list[str]) -> int:
    """generate over the ranks of a tensor-parallel group: rank 0 reads the prompt, samples and prints; the
    others follow its Decoder calls (kiln/launch.py)."""
    from kiln import launch
    check_parallel(a)
    if a.system is not None and a.no_chat_template:
        raise KilnError("--system needs the chat template; drop --no-chat-template or --system")
    ranks = launch.Ranks.from_env()
    prompt = _read_prompt(a) if ranks is None or ranks.rank == 0 else None

    def load(device, shard, first):
        return _load(a, device=device, shard=shard, progress=first)

    return launch.run(a.tensor_parallel, ["generate", *argv], a.device, load,
                      lambda model, tok, pool: _print_generation(a, model, tok, prompt, decoders=pool), a.model)


def chat(argv: list[str]) -> int:
    p = _Parser(prog="kiln chat", description="Chat with a model. /reset clears history, /exit leaves.")
    _model_args(p)
    p.add_argument("--system", default=None, help="system message")
    _quantized_arg(p)
    _adapter_args(p)
    ngl_arg(p)
    _sampling_args(p)
    draft_args(p)
    a = p.parse_args(argv)
    _check_sampling(a)
    check_draft(a)
    _check_bounded(a)
    model, tok = _load(a)
    drafting = _drafting(a)
    if not tok.chat_template:
        raise KilnError("this model has no chat template; use `kiln generate --no-chat-template`")
    from kiln.decoder import DecoderPool
    from kiln.generate import stream_generate
    decoders = DecoderPool(model)  # one KV cache (and CUDA graph) for the whole conversation
    start = [{"role": "system", "content": a.system}] if a.system else []
    history = list(start)
    print("kiln chat: /reset clears the history, /exit or Ctrl-D leaves.", file=sys.stderr)
    while True:
        try:
            line = input(">> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, not an exit
            print()
            continue
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = list(start)
            print("(history cleared)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = []
        try:
            for r in stream_generate(model, tok, history, a.max_tokens, max_context=a.ctx_size, decoders=decoders,
                                     logprobs=False, **drafting, **_sampling(a), **cache_kw(a), **_bounded(a)):
                print(r.text, end="", flush=True)
                reply.append(r.text)
        except KeyboardInterrupt:  # Ctrl-C during a reply stops that reply only
            print(" [interrupted]", end="")
        except KilnError as e:
            history.pop()
            print(f"error: {e}", file=sys.stderr)
            continue
        print()
        history.append({"role": "assistant", "content": "".join(reply)})


def info(argv: list[str]) -> int:
    p = _Parser(prog="kiln info", description="Describe a model: architecture, size, tensor types.")
    p.add_argument("model", help="GGUF file, Hugging Face folder, or built-in name")
    a = p.parse_args(argv)
    from kiln.hub import resolve
    path = resolve(a.model)
    rows = _info_gguf(path) if path.is_file() else _info_folder(path)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _info_gguf(path) -> list[tuple[str, str]]:
    from kiln.formats.gguf import read_gguf, to_config
    from kiln.quant import type_name
    g = read_gguf(path)
    cfg = to_config(g)
    types, nbytes, params = Counter(), Counter(), 0
    for t in g.tensors.values():
        n = t.data.numel()
        types[type_name(t.qtype)] += 1
        nbytes[type_name(t.qtype)] += n
        params += math.prod(t.shape)
    mix = ", ".join(f"{k} x{types[k]} ({nbytes[k] / 1e6:.1f} MB)" for k in sorted(types, key=nbytes.get,
                                                                               reverse=True))
    return _common_rows(path, "GGUF v%d" % g.version, cfg, params) + [
        ("tensor types", mix),
        ("file size", f"{sum(nbytes.values()) / 1e6:.1f} MB of tensors"),
        ("chat template", "yes" if g.meta.get("tokenizer.chat_template") else "no"),
        ("tokenizer", f"{g.meta.get('tokenizer.ggml.model', '?')} "
                      f"(pre: {g.meta.get('tokenizer.ggml.pre', '-')})"),
    ]


def _info_folder(path) -> list[tuple[str, str]]:
    from kiln.formats.safetensors import read_folder
    cfg, weights = read_folder(path)
    dtypes = Counter(weights.kinds().values())  # from the headers: no weight is read
    params = sum(math.prod(s) for s in weights.shapes().values())
    from kiln.tokenizer import Tokenizer
    try:
        has_template = bool(Tokenizer.from_folder(path).chat_template)
    except KilnError:
        has_template = False
    fmt = "mlx-lm quantized safetensors" if any(k.startswith("mlx") for k in dtypes) else "Hugging Face safetensors"
    return _common_rows(path, fmt, cfg, params) + [
        ("tensor types", ", ".join(f"{k} x{v}" for k, v in dtypes.items())),
        ("chat template", "yes" if has_template else "no"),
    ]


def _common_rows(path, fmt, cfg, params) -> list[tuple[str, str]]:
    return [
        ("path", str(path)), ("format", fmt), ("architecture", cfg["model_type"]),
        ("parameters", f"{params / 1e6:.1f} M"), ("layers", str(cfg["num_hidden_layers"])),
        ("hidden size", str(cfg["hidden_size"])),
        ("heads (q/kv)", f"{cfg['num_attention_heads']}/{cfg.get('num_key_value_heads') or cfg['num_attention_heads']}"),
        ("context length", str(cfg.get("max_position_embeddings", "?"))),
        ("vocabulary", str(cfg.get("vocab_size", "?"))),
    ]


def pull(argv: list[str]) -> int:
    p = _Parser(prog="kiln pull", description="Download a model into kiln's cache.")
    p.add_argument("name", nargs="?", default=DEFAULT_MODEL,
                   help=f"built-in name ({', '.join(BUILTIN)}), Hugging Face repo id, or repo/file.gguf "
                        f"(default {DEFAULT_MODEL})")
    a = p.parse_args(argv)
    from kiln.hub import pull as do_pull
    print(do_pull(a.name, progress=True))
    return 0
