"""The `kiln` command line as a user runs it, and the Python API's side of the same input rules.

Real subprocesses (`python -m kiln.cli`, the code the `kiln` entry point runs) with stdout and stderr
on pipes as in a log; the real Qwen file for what needs a real model (marked `model`), a tiny random
GGUF written here for the rest. Argument checks are run in-process too (the same `main(argv)`) where a
subprocess per case would cost seconds each: there a model file that is not a GGUF proves the check
ran before the load, because loading it would fail with another message.
"""

import fcntl
import io
import os
import re
import socket
import stat
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest

from kiln.cli import SUBCOMMANDS, main
from kiln.errors import KilnError


def kiln(*args, stdin=None, timeout=900, **kw):
    """Run `kiln ARGS`; stdout and stderr decoded as they are (text mode would turn a `\r` into `\n`)."""
    r = subprocess.run([sys.executable, "-m", "kiln.cli", *map(str, args)], capture_output=True, timeout=timeout,
                       input=None if stdin is None else stdin.encode(), **kw)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())


def run(capsys, *argv) -> tuple[int, str, str]:
    """`kiln ARGV` in this process: (exit status, stdout, stderr)."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def not_a_model(tmp_path):
    path = tmp_path / "not-a-model.gguf"
    path.write_bytes(b"this is not a GGUF file" * 10)
    return path


def tiny_gguf(path, add_bos=True):
    """A one-layer random llama with a byte-level BPE vocabulary (256 bytes + <s>, </s>) as a GGUF."""
    import gguf
    import numpy as np
    chars = _byte_chars()
    tokens, types = chars + ["<s>", "</s>"], [1] * 256 + [3, 3]
    hidden, ffn, vocab = 32, 64, len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in [(w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, hidden),
                   (w.add_feed_forward_length, ffn), (w.add_head_count, 2), (w.add_head_count_kv, 2),
                   (w.add_rope_freq_base, 1e4), (w.add_layer_norm_rms_eps, 1e-5), (w.add_tokenizer_model, "gpt2"),
                   (w.add_tokenizer_pre, "default"), (w.add_token_list, tokens), (w.add_token_types, types),
                   (w.add_bos_token_id, 256), (w.add_eos_token_id, 257), (w.add_add_bos_token, add_bos)]:
        add(v)
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,), "output.weight": (vocab, hidden),
              "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
              **{f"blk.0.attn_{k}.weight": (hidden, hidden) for k in ("q", "k", "v", "output")},
              "blk.0.ffn_gate.weight": (ffn, hidden), "blk.0.ffn_up.weight": (ffn, hidden),
              "blk.0.ffn_down.weight": (hidden, ffn)}
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        w.add_tensor(name, (np.ones(shape) if len(shape) == 1 else rng.standard_normal(shape) * 0.2).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (what byte-level BPE vocabularies spell)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


# --- help ---------------------------------------------------------------------------------------------------------
def test_help_lists_the_commands():
    r = kiln("--help")
    assert r.returncode == 0
    for cmd in ("generate", "chat", "info", "pull", "convert"):
        assert cmd in r.stdout


def _options_without_help(help_text: str) -> list[str]:
    """Options (and positionals) in argparse's --help text that have no description after them."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(("options:", "positional arguments:")))
    entries = []  # [invocation, has description]
    for line in lines[start:]:
        m = re.match(r"^  (\S.*?)(?:\s{2,}(\S.*))?$", line)
        if m and not line.startswith("   "):
            entries.append([m.group(1), bool(m.group(2))])
        elif line.startswith("   ") and line.strip() and entries:
            entries[-1][1] = True  # the description on the next line(s)
    return [inv for inv, described in entries if not described and not inv.startswith("-h, --help")]


@pytest.mark.parametrize("command", list(SUBCOMMANDS))
def test_every_option_has_help(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and f"kiln {command}" in out
    assert _options_without_help(out) == [], out


# --- argument checks come before the model ------------------------------------------------------------------------
BAD = [  # (argv after the command, a fragment of the one-line error)
    (["generate", "--max-tokens", "-5", "-p", "hi"], "--max-tokens -5"),
    (["generate", "--max-tokens", "0", "-p", "hi"], "--max-tokens 0"),
    (["generate", "--temp", "-1", "-p", "hi"], "temperature"),
    (["generate", "--top-p", "0", "-p", "hi"], "top_p"),
    (["generate", "--min-p", "1.5", "-p", "hi"], "min_p"),
    (["generate", "--top-k", "-1", "-p", "hi"], "top_k"),
    (["generate", "--repetition-penalty", "0", "-p", "hi"], "repetition_penalty"),
    (["generate", "--seed", str(2 ** 64), "-p", "hi"], "--seed"),
    (["generate", "--ctx-size", "0", "-p", "hi"], "--ctx-size 0"),
    (["generate", "--dtype", "int3", "-p", "hi"], "--dtype"),
    (["generate", "--device", "tpu9", "-p", "hi"], "--device"),
    (["generate", "-p", ""], "the prompt is empty"),  # with the chat template …
    (["generate", "--no-chat-template", "-p", ""], "the prompt is empty"),  # … and without: one rule
    (["generate", "-p", " \n "], "the prompt is empty"),
    (["generate"], "give a prompt"),
    (["generate", "--prompt-file", "/no/such/prompt.txt"], "cannot read --prompt-file /no/such/prompt.txt"),
    (["generate", "-p", "hi", "--prompt-file", "x"], "not both"),
    (["generate", "-p", "hi", "--system", "s", "--no-chat-template"], "--system needs the chat template"),
    (["chat", "--max-tokens", "-1"], "--max-tokens -1"),
    (["chat", "--top-p", "2"], "top_p"),
    (["chat", "--ctx-size", "1"], "--ctx-size 1"),
    (["generate", "--max-kv-size", "4", "-p", "hi"], "--max-kv-size 4"),  # bounded caches (--keep 4)
    (["generate", "--keep", "-1", "-p", "hi"], "--keep -1"),
    (["generate", "--max-kv-size", "64", "--context-shift", "-p", "hi"], "not both"),
    (["chat", "--context-shift", "--prompt-lookup-ngram", "2"], "speculative"),
]


@pytest.mark.parametrize("argv,says", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_arguments_fail_before_the_model_loads(capsys, not_a_model, argv, says):
    t0 = time.perf_counter()
    rc, out, err = run(capsys, *argv, "--model", not_a_model)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and says in err, err  # not "... is not a GGUF file"
    assert time.perf_counter() - t0 < 5  # checks only: no load, no download


def test_unreadable_prompt_file(capsys, tmp_path, not_a_model):
    secret = tmp_path / "prompt.txt"
    secret.write_text("hello")
    secret.chmod(0)
    if os.access(secret, os.R_OK):  # root reads everything; a folder is unreadable as text for anyone
        secret = tmp_path
    rc, out, err = run(capsys, "generate", "--model", not_a_model, "--prompt-file", secret)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "cannot read --prompt-file" in err, err


def test_empty_stdin_is_an_empty_prompt(not_a_model):
    r = kiln("generate", "--model", not_a_model, "--prompt", "-", stdin="")
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "the prompt is empty" in r.stderr, r.stderr


def test_unknown_model_name_is_one_line():
    r = kiln("generate", "--model", "./no-such-model.gguf", "--prompt", "hi")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_the_api_refuses_an_empty_prompt(tmp_path):
    import kiln as api
    model, tok = api.load(tiny_gguf(tmp_path / "tiny.gguf", add_bos=True), device="cpu")
    assert tok.encode("") == [256]  # this tokenizer would turn "" into a BOS alone
    assert len(api.generate(model, tok, "hi", max_tokens=3)) > 0
    for empty in ("", [], ()):
        with pytest.raises(KilnError, match="empty"):
            api.generate(model, tok, empty, max_tokens=3)


@pytest.mark.model
def test_info_describes_the_file(qwen_path):
    r = kiln("info", qwen_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "qwen2" in out and "Q5_0" in out and "Q6_K" in out and "Q8_0" in out
    assert "24" in out and "32768" in out  # layers, context
    assert "chat template  yes" in out or "chat template" in out and "yes" in out.split("chat template")[1][:20]


# --- convert --------------------------------------------------------------------------------------------------------
def test_convert_writes_every_file_with_the_umask_mode(tmp_path):
    src = tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "hf"
    r = kiln("convert", src, out, umask=0o027)
    assert r.returncode == 0, r.stderr
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()}
    assert "model.safetensors" in modes and len(modes) >= 4
    assert set(modes.values()) == {0o640}, {k: oct(v) for k, v in modes.items()}


# --- serve: a port in use -------------------------------------------------------------------------------------------
def test_serve_on_a_port_in_use_is_one_line_and_exit_2(tmp_path):
    pytest.importorskip("uvicorn")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        r = kiln("serve", "--model", tiny_gguf(tmp_path / "tiny.gguf"), "--port", port, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "listening" not in r.stdout and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"kiln serve: error: cannot listen on 127.0.0.1:{port}: already in use "
                                             f"(another server? pick another --port)"]


# --- progress -------------------------------------------------------------------------------------------------------
def test_progress_is_a_bar_on_a_terminal_and_plain_lines_elsewhere():
    from kiln.progress import bar
    pipe = io.StringIO()  # not a terminal, as a log file or a pipe
    with bar(total=3_000_000, desc="downloading x", unit="B", file=pipe, every=0.05) as b:
        for _ in range(3):
            time.sleep(0.06)
            b.update(1_000_000)
    lines = pipe.getvalue().splitlines()
    assert "\r" not in pipe.getvalue() and 2 <= len(lines) <= 4, lines
    assert lines[-1].startswith("downloading x: 100% 3.00M/3.00M [") and "B/s]" in lines[-1], lines
    main_fd, sub_fd = os.openpty()
    fcntl.ioctl(sub_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))  # a terminal's size
    with os.fdopen(sub_fd, "w") as tty, os.fdopen(main_fd, "rb", buffering=0) as screen:
        with bar(total=10, desc="loading", unit="tensor", file=tty, leave=False) as b:
            b.update(10)
        tty.flush()
        drawn = screen.read(4096)
    assert b"\r" in drawn and b"loading" in drawn  # tqdm, redrawn in place


def test_the_loading_bar_stays_out_of_a_log(tmp_path):
    """`generate` loads with progress on; with stderr on a pipe it must carry no redraws."""
    r = kiln("generate", "--model", tiny_gguf(tmp_path / "tiny.gguf"), "--no-chat-template", "-p", "ab",
             "--max-tokens", "4", "--verbose")
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "Generation: " in r.stderr


@pytest.mark.model
def test_pull_of_a_cached_model_prints_its_path_and_no_redraws(qwen_path):
    r = kiln("pull", "qwen2.5-coder-0.5b")
    assert r.returncode == 0 and "\r" not in r.stderr
    assert r.stdout.strip() == str(qwen_path) or os.environ.get("KILN_TEST_MODELS")


# --- streaming with the real model ------------------------------------------------------------------------------------
def _read_as_it_comes(cmd, stdin=None, timeout=900):
    """Run cmd; return [(seconds since start, stdout bytes)] per read, stderr, exit status."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err = []
    reader = threading.Thread(target=lambda: err.append(p.stderr.read()), daemon=True)
    reader.start()
    if stdin is not None:
        p.stdin.write(stdin.encode())
    p.stdin.close()
    chunks = []
    while chunk := os.read(p.stdout.fileno(), 65536):
        chunks.append((time.perf_counter() - t0, chunk))
    p.wait(timeout)
    reader.join(timeout)
    return chunks, err[0].decode(), p.returncode


def _assert_streamed(chunks):
    texts = [(t, c) for t, c in chunks if c.strip(b"> \n")]
    assert len(texts) >= 4, texts  # not one write at the end
    first, last = texts[0][0], texts[-1][0]
    assert last - first > 0.25, (first, last)  # spread over the generation


@pytest.mark.model
def test_generate_and_chat_stream_their_text(qwen_path):
    cli = [sys.executable, "-m", "kiln.cli"]
    chunks, err, rc = _read_as_it_comes(cli + ["generate", "--model", str(qwen_path), "--prompt",
                                               "Write a Python function named square.", "--max-tokens", "48"])
    assert rc == 0, err
    assert "def square" in b"".join(c for _, c in chunks).decode()
    _assert_streamed(chunks)
    assert "\r" not in err  # the loading bar is not redrawn into a pipe
    chunks, err, rc = _read_as_it_comes(cli + ["chat", "--model", str(qwen_path), "--max-tokens", "16"],
                                        stdin="Count from 1 to 5, separated by spaces.\n/reset\nSay hi.\n")
    assert rc == 0, err
    assert re.search(r"1\D+2\D+3", b"".join(c for _, c in chunks).decode()) and "history cleared" in err
    _assert_streamed(chunks)
