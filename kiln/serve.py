"""`kiln serve`: start the OpenAI-compatible server on a model.

Owns: the command's options, binding the port before the (slow) model load so that /health can say
"loading" (and a port in use is one line, exit 2), and exiting with a one-line error when the model
cannot be loaded.
Not: the server itself (kiln/server/app.py).
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import logging
import socket
from pathlib import Path

from kiln.errors import KilnError


def parser() -> argparse.ArgumentParser:
    from kiln.commands import _model_args, _Parser, cache_type_args, draft_args, ngl_arg, tp_arg
    p = _Parser(prog="kiln serve", description="Serve a model over the OpenAI API (chat, completions, tools, "
                                               "structured output) to many clients at once.")
    _model_args(p)
    p.add_argument("--alias", default=None, help="the model id clients send (default: the file or folder name "
                                                 "without extension)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8080, help="TCP port to listen on (default 8080)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every endpoint "
                                                   "but /health")
    p.add_argument("--parallel", "-np", type=int, default=4, help="concurrent sequences (slots; default 4)")
    p.add_argument("--ctx-size", "-c", type=int, default=None,
                   help="context per slot in tokens (default: the model's, at most 4096)")
    p.add_argument("--kv-budget", default=None, metavar="SIZE",
                   help="instead of --ctx-size: the KV cache memory the slots share (e.g. 2GiB, 500MB); each slot "
                        "gets the positions that fit, so a q8_0 cache (-ctk q8_0 -ctv q8_0) holds 1.88x the "
                        "context of bf16 in the same memory")
    cache_type_args(p)
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a slot before new ones get 503 + Retry-After (default 64)")
    p.add_argument("--max-body", type=int, default=8 * 1024 * 1024, help="largest request body in bytes (413 "
                                                                          "above; default 8 MiB)")
    draft_args(p)
    p.add_argument("--adapter", action="append", default=None, metavar="[NAME=]PATH",
                   help="a PEFT LoRA adapter folder (kiln finetune's output) to serve, repeatable: each request picks "
                        "one by model 'ID:NAME', the body's \"adapter\": NAME or llama-server's \"lora\" field, and "
                        "requests of different adapters decode in one batch; a request that picks none runs the first "
                        "(NAME default: the folder's name; 'base' picks no adapter)")
    p.add_argument("--adapter-scale", type=float, default=1.0, help="multiplies every adapter's effect (default 1)")
    ngl_arg(p)
    tp_arg(p, "serves HTTP once every rank has loaded its shard")
    p.add_argument("--allowed-hosts", default="", metavar="NAMES",
                   help="comma-separated Host names clients may use besides localhost and --host (default: only "
                        "those; any when --host is 0.0.0.0 or ::); guards against DNS rebinding, '*' allows any")
    p.add_argument("--read-timeout", type=float, default=20.0, metavar="S",
                   help="seconds a client may take to send a request's head, or pause in its body (default 20)")
    p.add_argument("--shutdown-grace", type=float, default=5.0, metavar="S",
                   help="on SIGTERM, seconds requests in flight may still run before they are cut (default 5)")
    p.add_argument("--slot-save-path", default=None, metavar="DIR",
                   help="folder for POST /slots/{id}?action=save|restore (llama-server's): a slot's KV state to a "
                        "file and back (default: off)")
    p.add_argument("--log-level", default="warning", help="uvicorn's log level (default warning)")
    return p


def _check(a) -> None:
    from kiln.commands import cache_kw, check_draft, check_model_args
    check_model_args(a)
    check_draft(a)
    cache_kw(a)
    a.adapters = adapter_list(a.adapter)
    for name in ("parallel", "max_queue", "max_body"):
        if getattr(a, name) < 1:
            raise KilnError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("read_timeout", "shutdown_grace"):
        if not getattr(a, name) > 0:
            raise KilnError(f"--{name.replace('_', '-')} must be a positive number of seconds")
    if a.ctx_size is not None and a.ctx_size < 16:
        raise KilnError("--ctx-size must be at least 16 tokens")
    if a.kv_budget is not None:
        if a.ctx_size is not None:
            raise KilnError("give --ctx-size or --kv-budget, not both")
        a.kv_budget = parse_size(a.kv_budget)
    if a.slot_save_path is not None and not Path(a.slot_save_path).is_dir():
        raise KilnError(f"--slot-save-path {a.slot_save_path}: not a folder (create it first)")
    if not 0 < a.port < 65536:
        raise KilnError(f"--port {a.port} is not a TCP port (1..65535)")


_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30}


def parse_size(text: str) -> int:
    """'2GiB', '500MB', '1.5gb', '1000000' → bytes; KilnError otherwise."""
    t = text.strip().lower().replace(" ", "")
    num = t.rstrip("kmgib")
    try:
        value = float(num) * _UNITS[t[len(num):]]
    except (ValueError, KeyError):
        raise KilnError(f"--kv-budget {text!r}: not a size (e.g. 2GiB, 500MB, or bytes)") from None
    if not 1 <= value < 2 ** 62:
        raise KilnError(f"--kv-budget {text!r}: must be a positive number of bytes")
    return int(value)


def adapter_list(values: list[str] | None) -> list[tuple[str, Path]]:
    """--adapter values ([NAME=]PATH) as [(name, folder)], each a PEFT folder (checked before anything loads)."""
    out = []
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep or Path(v).is_dir():  # a folder whose own name has '=' is a plain PATH
            name, path = Path(v).name, v
        if not (Path(path) / "adapter_config.json").is_file():
            raise KilnError(f"--adapter {v}: {path} is not a PEFT adapter folder (no adapter_config.json)")
        out.append((name, Path(path)))
    return out


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a port in use is one line and exit 2 (uvicorn would log
    its own error and exit 1 after we said "listening")."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise KilnError(f"--host {host!r} is not an address this machine can listen on ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart over TIME_WAIT
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        why = "already in use (another server? pick another --port)" if e.errno == errno.EADDRINUSE else e.strerror
        raise KilnError(f"cannot listen on {host}:{port}: {why}") from None
    return sock


def main(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    _check(a)
    missing = [m for m in ("fastapi", "uvicorn", "xgrammar") if importlib.util.find_spec(m) is None]
    if missing:
        raise KilnError(f"kiln serve needs {', '.join(missing)}: pip install 'kiln[serve]' "
                        f"(from a checkout: pip install -e '.[serve]')")
    from kiln.hub import resolve
    path = Path(resolve(a.model, progress=True))  # a bad name fails here, before the port is taken
    from kiln.commands import parallel_wanted
    from kiln.load import load
    model_id = a.alias or (path.stem if path.is_file() else path.name)
    if parallel_wanted(a):
        return _serve_parallel(a, argv, path, model_id)

    def load_whole():
        # -ngl N < the model's layers: a CPU + GPU split (kiln/split.py), which the engine steps eagerly (no CUDA
        # graphs, no look-ahead); its KV cache is per layer, in each layer's dtype (no -ctk / -ctv: KVCache says so)
        model, tok = load(path, device=a.device, dtype=a.dtype, progress=False, n_gpu_layers=a.n_gpu_layers,
                          ctx_size=(a.ctx_size or 4096) * a.parallel)
        if a.adapters:  # each request picks one (server/adapters.py); rows of different ones share a step
            from kiln.finetune.bank import AdapterBank
            AdapterBank.load(model, a.adapters, a.adapter_scale)
        drafting = dict(prompt_lookup=a.prompt_lookup_ngram, num_draft_tokens=a.num_draft_tokens)
        if a.draft_model is not None:  # speculative decoding in the engine (kiln/engine_draft.py)
            drafting["draft_model"], _ = load(resolve(a.draft_model), device=a.device, dtype=a.dtype, progress=False)
        return model, tok, drafting

    return _run(a, path, model_id, dict(loader=load_whole))


def _run(a, path: Path, model_id: str, model_kw: dict) -> int:
    """Serve until shut down: the app on `model_kw` (a `loader`, run in the background while the port already
    answers, or a loaded `model` and `tokenizer`)."""
    from kiln.server.app import create_app, server_for
    from kiln.server.transport import allowed_hosts
    app = create_app(**model_kw, model_id=model_id,
                     api_key=a.api_key, n_slots=a.parallel, ctx_size=a.ctx_size, max_queue=a.max_queue,
                     max_body=a.max_body, allowed_hosts=allowed_hosts(a.host, a.allowed_hosts.split(",")),
                     read_timeout=a.read_timeout, cache_types=(a.cache_type_k, a.cache_type_v),
                     slot_save_path=a.slot_save_path, kv_budget=a.kv_budget)
    server = server_for(app, a.host, a.port, log_level=a.log_level, read_timeout=a.read_timeout,
                        shutdown_grace=a.shutdown_grace)
    st = app.state.kiln
    st.on_load_failed = lambda e: setattr(server, "should_exit", True)
    logging.basicConfig(level=logging.INFO, format="kiln serve: %(message)s")
    sock = bind(a.host, a.port)
    print(f"kiln serve: loading {path} as {model_id!r}; listening on http://{a.host}:{a.port}/v1", flush=True)
    with sock:
        server.run(sockets=[sock])
    if st.load_error is not None:
        raise st.load_error if isinstance(st.load_error, KilnError) else KilnError(
            f"could not load {path}: {type(st.load_error).__name__}: {st.load_error}")
    return 0


def _serve_parallel(a, argv: list[str], path: Path, model_id: str) -> int:
    """serve over the ranks of a tensor-parallel group (kiln/launch.py): every rank loads its shard first; then
    rank 0 serves HTTP (its engine a launch.LeaderEngine) while the others follow its model calls."""
    from kiln import launch
    from kiln.load import load
    from kiln.commands import check_parallel
    check_parallel(a)

    def load_shard(device, shard, first):
        return load(path, device=device, dtype=a.dtype, progress=False, shard=shard)

    return launch.run(a.tensor_parallel, ["serve", *argv], a.device, load_shard,
                      lambda model, tok, pool: _run(a, path, model_id, dict(model=model, tokenizer=tok)), path)
