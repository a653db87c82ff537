"""A disk cache for what is slow to derive from a GGUF vocabulary: a SentencePiece vocabulary's BPE merges.

Owns: an entry's key (a hash of the vocabulary itself: every token's text, in rank order), its file (one per key
under the folder given, written atomically, its payload under a checksum) and reading it back: an entry that is
missing, unreadable, damaged or made for another vocabulary is rebuilt and rewritten, never used.
Not: deriving the merges (gguf_vocab.py), where the folder is (load.py passes <kiln cache>/tokenizers).

Only the merges are kept: the `tokenizers` backend itself, saved with to_str, takes longer to read back with
from_str (a 262k-token vocabulary: 1.5 s) than to build from the merges (0.7 s), and a byte-level BPE
vocabulary's merges are read from the file itself (a bulk split, tens of ms).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from itertools import chain
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# An entry: MAGIC, the key (32 bytes), the payload's sha256 (32 bytes), then the payload: per merge, the ranks of
# its left and right side as int32 little-endian.
MAGIC = b"KILNMRG1"
_HEADER = len(MAGIC) + 32 + 32


def vocabulary_key(ranked: list[str], version: str) -> bytes:
    """sha256 of `version` (what derived the entry) and the tokens' texts in rank order: every text's length,
    then all of them (UTF-8)."""
    lengths = np.fromiter(map(len, ranked), np.int64, len(ranked))
    h = hashlib.sha256(f"{version}\0".encode())
    h.update(lengths.astype("<i8").tobytes())
    h.update("".join(ranked).encode("utf-8", "surrogatepass"))
    return h.digest()


def cached_merges(folder: Path | None, ranked: list[str], build: Callable[[], list[tuple[str, str]]],
                  version: str) -> list[tuple[str, str]]:
    """`build()` (merges whose two sides are texts of `ranked`), kept in `folder` across processes; no cache when
    `folder` is None. `version` names the derivation: change it when `build` would give other merges."""
    if folder is None:
        return build()
    key = vocabulary_key(ranked, version)
    path = Path(folder) / f"spm-merges-{key.hex()[:32]}.bin"
    merges = _read(path, key, ranked)
    if merges is None:
        merges = build()
        _write(path, key, ranked, merges)
    return merges


def _read(path: Path, key: bytes, ranked: list[str]) -> list[tuple[str, str]] | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    payload = memoryview(data)[_HEADER:]
    if (len(data) < _HEADER or data[:len(MAGIC)] != MAGIC or data[len(MAGIC):len(MAGIC) + 32] != key
            or data[len(MAGIC) + 32:_HEADER] != hashlib.sha256(payload).digest() or len(payload) % 8):
        log.warning("tokenizer cache entry %s is damaged or stale; rebuilding it", path)
        return None
    sides = np.frombuffer(payload, "<i4").reshape(-1, 2)
    if len(sides) and (sides.min() < 0 or sides.max() >= len(ranked)):
        log.warning("tokenizer cache entry %s names tokens the vocabulary lacks; rebuilding it", path)
        return None
    return list(zip(map(ranked.__getitem__, sides[:, 0].tolist()), map(ranked.__getitem__, sides[:, 1].tolist())))


def _write(path: Path, key: bytes, ranked: list[str], merges: list[tuple[str, str]]) -> None:
    """Best effort: a folder that cannot be written leaves the load uncached, not failed."""
    rank = dict(zip(ranked, range(len(ranked))))
    try:
        payload = np.fromiter(map(rank.__getitem__, chain.from_iterable(merges)), "<i4", 2 * len(merges)).tobytes()
    except KeyError:  # a side that is not a token: nothing to cache (build() keeps to tokens)
        return
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + key + hashlib.sha256(payload).digest() + payload)
        os.replace(tmp, path)  # atomic: a reader finds no entry or a whole one (a torn one fails its checksum)
    except OSError as e:
        log.warning("could not write the tokenizer cache entry %s (%s); the next load builds it again", path, e)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
