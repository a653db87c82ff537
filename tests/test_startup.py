"""kiln/startup.py: which command lines begin a GPU context early, the entry point's quick exit, and (on a GPU) that
the context begun through the driver is the one torch then runs in."""

import subprocess
import sys

import pytest

from kiln import startup


@pytest.mark.parametrize("argv, env, ordinal", [
    (["python", "-m", "kiln.cli", "generate", "--prompt", "x"], {}, 0),
    (["python", "-X", "importtime", "-m", "kiln", "generate"], {}, 0),  # an option's value is not the script
    (["/usr/bin/python3", "/venv/bin/kiln", "serve", "--device", "cuda:1"], {}, 1),
    (["/usr/bin/python3", "/venv/bin/kiln", "bench", "--device=cuda"], {}, 0),
    (["/usr/bin/python3", "/venv/bin/kiln", "serve", "--device=cpu"], {}, None),
    (["python", "-m", "kiln.cli", "chat", "--device", "cpu"], {}, None),
    (["python", "-m", "kiln.cli", "generate", "-tp", "2"], {}, None),  # each rank takes its own device
    (["python", "-m", "kiln.cli", "serve", "--tensor-parallel=2"], {}, None),
    (["python", "-m", "kiln", "generate"], {"LOCAL_RANK": "1"}, None),  # under torchrun
    (["python", "-m", "kiln.cli", "generate"], {"CUDA_VISIBLE_DEVICES": ""}, None),
    (["python", "-m", "kiln.cli", "generate", "--help"], {}, None),
    (["python", "-m", "kiln.cli", "info", "m.gguf"], {}, None),  # reads a file, runs no model
    (["python", "-m", "kiln.cli", "convert", "m.gguf"], {}, None),
    (["python", "-c", "import kiln"], {}, None),
    (["python", "script.py", "generate"], {}, None),
    (["python", "-m", "pytest", "kiln"], {}, None),
    (["python"], {}, None),
])
def test_only_a_kiln_command_that_runs_a_model_on_a_gpu_begins_its_context(argv, env, ordinal):
    args = startup.command_args(argv)
    assert (startup.gpu_ordinal(args, env) if args is not None else None) == ordinal


def test_quick_exit_runs_the_exit_handlers_then_flushes_everything():
    code = ("import atexit, logging, sys; from kiln.startup import finish; "
            "atexit.register(lambda: sys.stdout.write('bye')); logging.basicConfig(); "
            "logging.getLogger('t').warning('logged'); sys.stdout.write('x' * 1_000_000); finish(3)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3
    assert r.stdout == "x" * 1_000_000 + "bye"
    assert "logged" in r.stderr


def test_quick_exit_into_a_closed_pipe_is_quiet():
    code = "import sys; from kiln.startup import finish; sys.stdout.write('x' * 1_000_000); finish(0)"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(10)
    p.stdout.close()  # as `kiln generate ... | head -c 10` does
    assert p.wait(timeout=60) == 0
    assert p.stderr.read() == b""


needs_gpu = pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")


def _fresh(code: str) -> str:
    """stdout of `code` run in a fresh interpreter (no CUDA context yet), which must succeed."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip()


_SHARED = """
import ctypes, threading
from kiln import startup  # imports torch (the package's API)
cuda = ctypes.CDLL("libcuda.so.1")
flags, active = ctypes.c_uint(), ctypes.c_int()
assert cuda.cuInit(0) == 0
assert cuda.cuDevicePrimaryCtxGetState(0, ctypes.byref(flags), ctypes.byref(active)) == 0
assert not active.value, "importing kiln made a context"
startup.context(0)
next(t for t in threading.enumerate() if t.name == "kiln-cuda-context").join(timeout=60)
assert cuda.cuDevicePrimaryCtxGetState(0, ctypes.byref(flags), ctypes.byref(active)) == 0
assert active.value, "the thread made no context"
import torch
torch.zeros(1, device="cuda:0").add_(1).item()
current, primary = ctypes.c_void_p(), ctypes.c_void_p()
assert cuda.cuCtxGetCurrent(ctypes.byref(current)) == 0 and current.value
assert cuda.cuDevicePrimaryCtxRetain(ctypes.byref(primary), 0) == 0
assert current.value == primary.value, "torch runs in another context"
print("shared")
"""


@needs_gpu
def test_the_context_begun_through_the_driver_is_the_one_torch_runs_in():
    assert _fresh(_SHARED) == "shared"


_GIVEN_BACK = """
import ctypes, torch
from kiln import startup
startup.context(0)
startup.settle(torch.device("cpu"))  # the model went to the CPU: the context begun for it is given back
cuda = ctypes.CDLL("libcuda.so.1")
flags, active = ctypes.c_uint(), ctypes.c_int()
assert cuda.cuDevicePrimaryCtxGetState(0, ctypes.byref(flags), ctypes.byref(active)) == 0
assert not active.value, "the context begun is still held"
print("given back")
"""


@needs_gpu
def test_a_context_begun_for_a_device_the_model_does_not_use_is_given_back():
    assert _fresh(_GIVEN_BACK) == "given back"


_KEY = """
import threading
from kiln import startup
import triton.runtime.autotuner as autotuner
import triton.runtime.cache as cache
own = cache.triton_key
startup._answer.append(("/elsewhere/triton/__init__.py", "3.0-x"))  # another Triton's answer
startup._install()
assert cache.triton_key is own, "took another Triton's key"
startup._answer.clear()
startup.triton_key()
next(t for t in threading.enumerate() if t.name == "kiln-triton-key").join(timeout=120)
startup._install()
assert cache.triton_key is not own and autotuner.triton_key is cache.triton_key, "the child's key was not handed over"
assert cache.triton_key() == own(), "the child's key is not the one Triton computes here"
print("same key")
"""


def test_tritons_key_computed_by_a_child_interpreter_is_the_one_triton_computes():
    pytest.importorskip("triton")
    assert _fresh(_KEY) == "same key"
