"""The `kiln` command line as a user runs it: real subprocesses, the real Qwen file."""

import subprocess
import sys

import pytest


def kiln(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "kiln.cli", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=900)


def test_help_lists_the_commands():
    r = kiln("--help")
    assert r.returncode == 0
    for cmd in ("generate", "chat", "info", "pull", "convert"):
        assert cmd in r.stdout


def test_unknown_model_name_is_one_line():
    r = kiln("generate", "--model", "./no-such-model.gguf", "--prompt", "hi")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.model
def test_info_describes_the_file(qwen_path):
    r = kiln("info", qwen_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "qwen2" in out and "Q5_0" in out and "Q6_K" in out and "Q8_0" in out
    assert "24" in out and "32768" in out  # layers, context
    assert "chat template  yes" in out or "chat template" in out and "yes" in out.split("chat template")[1][:20]


@pytest.mark.model
def test_generate_and_chat(qwen_path):
    r = kiln("generate", "--model", qwen_path, "--prompt", "Write a Python function named square.", "--max-tokens", "48")
    assert r.returncode == 0, r.stderr
    assert "def square" in r.stdout
    r = kiln("chat", "--model", qwen_path, "--max-tokens", "12",
             stdin="What is 2+2? Answer with a number.\n/reset\nSay hi.\n")
    assert r.returncode == 0, r.stderr
    assert "4" in r.stdout and "history cleared" in r.stderr
