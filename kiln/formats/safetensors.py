"""Hugging Face / mlx-community folders: config.json plus one or sharded safetensors files.

Owns: reading config.json (multimodal checkpoints give their text_config), finding the shards (through
model.safetensors.index.json when present), and naming tensors by their Hugging Face text-model names; writing
one (`write_folder`: kiln convert --to hf / --to mlx, kiln fuse).
Not: tokenizer files (tokenizer.py), pickled weights (never read: a pickle can run code), mlx-lm's quantized
layers (formats/mlx.py: this file finds them, that one says what they are).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from kiln.errors import KilnError, short

_FLOATS = ("F32", "F16", "BF16", "F64")  # the dtypes kiln converts weights from
_TORCH_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
# Multimodal checkpoints (Gemma 3 4B+, …) keep the text model under these prefixes.
_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.")


class _LazyShards(Mapping):
    """{name: tensor}, each tensor read from its shard on first access (safetensors mmaps the file).

    Shapes come from the headers (`shapes()`), so config and weights are checked before anything is read.
    A Mapping, not a dict: `get`, `values` and `items` all read through `__getitem__`.
    """

    types_checked = True  # floats (read_folder checked), or blocks of supported types built here

    def __init__(self, where: dict[str, tuple[Path, str]], shapes: dict[str, tuple[int, ...]],
                 quantized: dict | None = None, kinds: dict[str, str] | None = None):
        self._where, self._shapes, self._handles = where, shapes, {}
        self._quantized = quantized or {}  # {X.weight: formats.mlx.Quantized}, built on access
        self._embedding = None
        self._kinds = kinds or {}  # {name: torch's name of its stored dtype}

    def __iter__(self):
        yield from self._where
        yield from self._quantized

    def __len__(self) -> int:
        return len(self._where) + len(self._quantized)

    def __contains__(self, name) -> bool:
        return name in self._where or name in self._quantized

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {**self._shapes, **{n: q.shape for n, q in self._quantized.items()}}

    def kinds(self) -> dict[str, str]:
        """{name: how it is stored ('bfloat16', 'mlx 4-bit/64': 4-bit groups of 64)}, from the headers."""
        return {**self._kinds, **{n: f"mlx {q.bits}-bit/{q.group_size}" for n, q in self._quantized.items()}}

    def __getitem__(self, name):
        if name not in self._quantized:
            return self._read(*self._where[name])
        from kiln.formats.mlx import materialize
        if name != "model.embed_tokens.weight":
            return materialize(self._quantized[name], self._read, name)
        if self._embedding is None:  # a tied head must get the very object its embedding got: quant/linear
            self._embedding = materialize(self._quantized[name], self._read, name)  # shares planes by identity
        return self._embedding

    def _read(self, path: Path, stored: str):
        from safetensors import SafetensorError, safe_open
        try:
            if path not in self._handles:
                self._handles[path] = safe_open(str(path), framework="pt")
            return self._handles[path].get_tensor(stored)
        except (SafetensorError, OSError, TypeError, ValueError) as e:  # dtype torch lacks, file changed…
            raise KilnError(f"{path}: tensor {stored} cannot be read ({e}); re-download the file") from None


def read_folder(path: Path) -> tuple[dict, dict]:
    from kiln.formats import mlx
    config, scheme = _config(path)
    entries = {}  # {name: (file, stored, shape, dtype)}
    for f in _shards(path):
        for stored, (shape, dtype) in _header(f).items():
            name = _text_name(stored)
            if name is None:
                continue
            if name in entries:
                raise KilnError(f"{path}: tensor {short(name)} is stored twice ({entries[name][0].name}: "
                                f"{entries[name][1]}, {f.name}: {stored}); the folder is inconsistent")
            entries[name] = (f, stored, shape, dtype)
    quantized = {}
    if scheme is not None:
        entries, quantized = mlx.group(entries, scheme, path)
    for name, (f, stored, shape, dtype) in entries.items():
        if dtype not in _FLOATS:
            raise KilnError(f"{f}: tensor {short(stored)} is stored as {dtype}; kiln reads weights stored as "
                            f"{', '.join(_FLOATS)}" + (" (or quantized as mlx-lm writes them)" if scheme else ""))
    where = {n: e[:2] for n, e in entries.items()}
    shapes = {n: e[2] for n, e in entries.items()}
    kinds = {n: _TORCH_NAMES[e[3]] for n, e in entries.items()}
    return config, _LazyShards(where, shapes, quantized, kinds)


def _config(path: Path) -> tuple[dict, object]:
    """(the text model's config, its formats.mlx.Scheme or None when the weights are not quantized)."""
    from kiln.formats import mlx
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise KilnError(f"{path} has no config.json; a Hugging Face model folder needs one")
    cfg = _json_object(cfg_path)
    scheme = mlx.parse(cfg, cfg_path, _text_name)
    if "text_config" in cfg:  # multimodal wrapper: run the text model
        if not isinstance(cfg["text_config"], dict):
            raise KilnError(f"{cfg_path}: text_config is not a JSON object")
        text = dict(cfg["text_config"])
        outer = cfg.get("model_type", "")
        text.setdefault("model_type", outer.replace("_vl", "") if isinstance(outer, str) else outer)
        for k in ("eos_token_id", "bos_token_id", "tie_word_embeddings"):
            if k in cfg:
                text.setdefault(k, cfg[k])
        cfg = text
    if not isinstance(cfg.get("model_type"), str):
        raise KilnError(f"{cfg_path} has no model_type string; kiln cannot tell the architecture")
    return cfg, scheme


def _json_object(file: Path) -> dict:
    try:
        value = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KilnError(f"{file} is not valid JSON: {e}") from None
    except RecursionError:
        raise KilnError(f"{file} is nested too deeply to be a model's JSON") from None
    if not isinstance(value, dict):
        raise KilnError(f"{file} holds a JSON {type(value).__name__}, not an object")
    return value


def _shards(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = _json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) and f and Path(f).name == f
                                                       for f in weight_map.values()):
            raise KilnError(f"{index} is not a valid safetensors index: its weight_map must name shard "
                            f"files in the folder")
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in path.iterdir())[:8]
        raise KilnError(f"{path} has no .safetensors weights (found {found}); kiln never reads pickled "
                        f".bin/.pt weights, convert them to safetensors first")
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise KilnError(f"{path} is missing weight shards {missing}; the download is incomplete")
    return files


def _header(f: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{stored name: (shape, dtype)} from a shard's header; the safetensors library checks that the
    header's JSON, offsets, sizes and dtypes describe the file."""
    from safetensors import SafetensorError, safe_open
    _refuse_duplicate_keys(f)
    try:
        with safe_open(str(f), framework="pt") as h:
            return {k: (tuple(s.get_shape()), s.get_dtype()) for k in h.keys() for s in [h.get_slice(k)]}
    except (SafetensorError, OSError) as e:
        raise KilnError(f"{f} is not a readable safetensors file ({e}); re-download it") from None


_MAX_HEADER = 100 << 20  # the safetensors library's own limit on the JSON header


def _refuse_duplicate_keys(f: Path) -> None:
    """The format forbids a name twice in the header, but JSON parsers (the safetensors library's too) keep
    the last silently, so one file could mean two models to two readers: refuse it. Everything else about
    the header is the library's to check."""
    try:
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            if not 0 < n <= min(_MAX_HEADER, f.stat().st_size - 8):
                return
            json.loads(fh.read(n), object_pairs_hook=lambda pairs: _no_duplicates(f, pairs))
    except (OSError, ValueError, RecursionError):  # unreadable or not JSON: the library says why
        return


def _no_duplicates(f: Path, pairs: list) -> dict:
    out = dict(pairs)
    if len(out) < len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise KilnError(f"{f}: the header names {short(dup)} twice; the file is ambiguous or corrupt, "
                        f"re-download it")
    return out


def _text_name(stored: str) -> str | None:
    if stored.endswith("rotary_emb.inv_freq"):  # old checkpoints saved this derived buffer
        return None
    if stored.startswith(("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                          "model.multi_modal_projector.")):
        return None
    for p in _TEXT_PREFIXES:
        if stored.startswith(p):
            rest = stored[len(p):]
            return rest if rest.startswith("lm_head.") else "model." + rest
    return stored


def hf_config(config: dict, dtype) -> dict:
    """config.json's content: the config without its None values, with torch_dtype."""
    cfg = {k: v for k, v in config.items() if v is not None}
    cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    return cfg


def write_folder(out: Path, state: dict, cfg: dict, tok, fmt: str = "pt", indent: int = 2) -> None:
    """model.safetensors (metadata format `fmt`), config.json and the tokenizer's files into the folder `out`."""
    from safetensors.torch import save_file
    save_file(state, str(out / "model.safetensors"), metadata={"format": fmt})
    (out / "config.json").write_text(json.dumps(cfg, indent=indent))
    # safetensors writes through a private temporary file (mode 0600); the weights get the mode that
    # config.json got from open() under the user's umask, like every other file here
    os.chmod(out / "model.safetensors", stat.S_IMODE((out / "config.json").stat().st_mode))
    tok.save_folder(out)
