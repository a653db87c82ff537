"""A GPU run's startup, begun early, and the command line's quick end.

Owns: `from_command_line` (kiln/__init__.py calls it before torch is imported: when this process is a `kiln` command
that will run a model on a GPU, the CUDA driver and the device's primary context start in a daemon thread, then
Triton's cache key in a child interpreter, so that the ~0.5 s and ~0.4 s they take on an H100 host pass while torch
imports, ~1.2-1.9 s, bench/results/2026-12-06-h100-g/ and -h/), `settle` (from `kiln.load`, once the device is known:
the same for that device, or any context begun for another given back), `context` (one device's, in a thread),
`triton_key` (Triton's cache key, which hashes Triton's own files, in a child interpreter) and `finish` (after a
command that wrote only to stdout / stderr: flush, run the exit handlers, end without the interpreter's teardown of
torch, ~0.4-0.7 s on this 2-core CPU).
Not: choosing the device (load.py), the commands themselves (cli.py).

This module imports nothing beyond the standard library (ctypes's import: ~1 ms): it runs before torch. The driver
is reached through ctypes, whose calls release the GIL (torch's own first CUDA call would not run beside its
import). A context begun here is the device's primary context, the one torch's CUDA runtime takes; the driver
serialises its own initialisation, so the main thread's first CUDA call waits for, or reuses, what the thread did.
Giving back a context torch also holds only drops this module's reference. Any failure in a thread is dropped: the
main thread meets it again where it needs the device, and reports it there.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading

GPU_COMMANDS = frozenset(("generate", "chat", "cache-prompt", "serve", "bench"))  # run a model, a user waits
QUICK_EXIT = frozenset(("generate", "chat", "info", "fit"))  # write nothing but stdout and stderr
_threads: dict[int, threading.Thread] = {}  # device ordinal -> the thread beginning its context
_retained: dict[int, int] = {}  # device ordinal -> CUdevice whose primary context a thread retained
_begun: set = set()  # the other work begun once a process ("triton_key"; "installed": Triton has the child's key)
_lock = threading.Lock()


def from_command_line() -> None:
    """Begin the GPU's context when this process is `kiln <command>` (the entry point or `python -m kiln[.cli]`)
    running a model on a CUDA device; otherwise nothing. Cheap: it reads sys.orig_argv and the environment."""
    args = command_args(getattr(sys, "orig_argv", []))
    ordinal = gpu_ordinal(args, os.environ) if args else None
    if ordinal is not None:
        context(ordinal)  # and, once the driver has the device, Triton's key (its child hashes beside the import)


def command_args(orig_argv: list[str]) -> list[str] | None:
    """The arguments after `kiln` in an interpreter's original command line, or None when it runs something else."""
    i = 1
    while i < len(orig_argv):
        a = orig_argv[i]
        if a == "-m":
            return orig_argv[i + 2:] if orig_argv[i + 1:i + 2] in (["kiln"], ["kiln.cli"]) else None
        if a in ("-c", "-") or not a.startswith("-"):  # a script: the `kiln` entry point, or another
            return orig_argv[i + 1:] if os.path.basename(a) == "kiln" else None
        i += 2 if a in ("-X", "-W", "--check-hash-based-pycs") else 1  # the options that take a value
    return None


def gpu_ordinal(args: list[str], env) -> int | None:
    """The CUDA device a `kiln` command line will run its model on, or None where it runs none, runs on the CPU,
    only prints help, or runs several processes (tensor parallelism: each rank takes its own device)."""
    if not args or args[0] not in GPU_COMMANDS or {"-h", "--help", "-tp"} & set(args):
        return None
    if any(a.startswith("--tensor-parallel") for a in args) or in_a_group(env):
        return None
    if env.get("CUDA_VISIBLE_DEVICES", "0").strip() in ("", "-1"):
        return None
    device = "cuda"
    for i, a in enumerate(args):
        if a == "--device" and i + 1 < len(args):
            device = args[i + 1]
        elif a.startswith("--device="):
            device = a.split("=", 1)[1]
    kind, _, index = device.partition(":")
    if kind != "cuda":
        return None
    return int(index) if index.isdigit() else 0 if not index else None


def in_a_group(env) -> bool:
    """Is this process a rank of a multi-process run (torchrun's variables, or the ones kiln's -tp sets)?"""
    return "WORLD_SIZE" in env or "LOCAL_RANK" in env


def context(ordinal: int) -> None:
    """Begin the CUDA driver and device `ordinal`'s primary context in a daemon thread (once a process)."""
    with _lock:
        if ordinal in _threads:
            return
        os.environ.setdefault("CUDA_MODULE_LOADING", "LAZY")  # what torch sets before its own first call
        _threads[ordinal] = t = threading.Thread(target=_retain, args=(ordinal,), name="kiln-cuda-context",
                                                 daemon=True)
    t.start()


def settle(device) -> None:
    """Once the model's device is known (kiln.load): begin its context (and so Triton's key) when it is a CUDA
    device, and hand Triton a key that came before Triton was imported; give back any context begun for a device
    the model will not run on (a torch without CUDA on a machine with a driver), so that it holds no GPU memory for
    the process's life."""
    if device.type == "cuda":
        context(device.index or 0)
        _install()  # the key, where the child began before torch's import and has answered
    with _lock:
        unused = [(o, t) for o, t in _threads.items() if device.type != "cuda" or o != (device.index or 0)]
    for ordinal, t in unused:
        t.join()
        device_handle = _retained.pop(ordinal, None)
        if device_handle is not None:
            _libcuda().cuDevicePrimaryCtxRelease(device_handle)


def _retain(ordinal: int) -> None:
    try:
        cuda = _libcuda()
    except OSError:  # no NVIDIA driver here: nothing to begin
        return
    device, ctx = ctypes.c_int(), ctypes.c_void_p()
    if (cuda.cuInit(0) == 0 and cuda.cuDeviceGet(ctypes.byref(device), ordinal) == 0
            and cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), device) == 0):  # held as torch holds it
        _retained[ordinal] = device.value
        triton_key()  # a GPU is there: its kernels will need the key (never begun on a machine without one)


def _libcuda():
    return ctypes.CDLL("libcuda.so.1")  # the driver's API; OSError where no NVIDIA driver is installed


# A child interpreter computes Triton's key: Triton's own function, on the same files, at the same time, so its answer is
# the one Triton would compute here. It prints where its Triton lives, then the key.
_KEY_CHILD = ("import sys, triton; from triton.runtime.cache import triton_key; "
              "sys.stdout.write(triton.__file__ + '\\n' + triton_key())")
_answer: list[tuple[str, str]] = []  # the child's (where its Triton lives, key), once it has come


def triton_key() -> None:
    """Compute Triton's cache key once a process, away from the main thread: a child interpreter runs Triton's own
    `triton_key` (it hashes Triton's files, libtriton's ~400 MB among them: 0.34 s on an H100 host) and a daemon thread
    hands its answer to Triton (`_install`). In a thread of this process the same work held up the main one: the model's
    build beside it took 0.42 s instead of 0.19 on an H100 (bench/results/2026-12-06-h100-h/; its 1 MB reads and the
    main thread's short torch calls take turns at the GIL). Begun by the context's thread once the driver has the
    device. A Triton without the function, or a child that fails: Triton computes its key itself."""
    with _lock:
        if "triton_key" in _begun:
            return
        _begun.add("triton_key")
    cache = sys.modules.get("triton.runtime.cache")
    info = getattr(getattr(cache, "triton_key", None), "cache_info", None)
    if info is not None and info().currsize or not sys.executable:  # Triton has its key already
        return
    import subprocess
    try:
        child = subprocess.Popen([sys.executable, "-c", _KEY_CHILD], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    except OSError:
        return
    threading.Thread(target=_await_key, args=(child,), name="kiln-triton-key", daemon=True).start()


def _await_key(child) -> None:
    try:
        out, _ = child.communicate(timeout=300)
    except Exception:  # noqa: BLE001 - never finished: Triton computes its key itself
        child.kill()
        return
    where, _, key = out.decode("utf-8", "replace").partition("\n")
    if child.returncode == 0 and key:
        _answer.append((where, key))
        _install()


def _install() -> None:
    """Give Triton the child's key, once Triton is imported here and is the child's Triton (same file, and the key
    begins with its version); once a process. Where Triton already has its own, the two are equal."""
    cache = sys.modules.get("triton.runtime.cache")
    triton = sys.modules.get("triton")
    with _lock:
        if not _answer or "installed" in _begun or cache is None or triton is None:
            return
        own = getattr(cache, "triton_key", None)
        where, key = _answer[0]
        if (getattr(triton, "__file__", None) != where or not key.startswith(str(getattr(triton, "__version__", "")))
                or getattr(own, "cache_info", None) is None):
            return
        _begun.add("installed")
        known = functools.lru_cache()(lambda: key)
        for name in ("triton.runtime.cache", "triton.runtime.autotuner"):  # where Triton looks it up
            module = sys.modules.get(name)
            if module is not None and getattr(module, "triton_key", None) is own:
                module.triton_key = known


def finish(code: int) -> None:
    """End the process with `code` now: run the exit handlers, flush stdout and stderr, skip the teardown."""
    import atexit
    atexit._run_exitfuncs()  # logging's flush among them; they may still write
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`kiln generate ... | head`): nothing more to say there
            pass
    os._exit(code)
