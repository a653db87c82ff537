"""Prompt cache files: a prompt's KV state saved once (`kiln cache-prompt`) and reused by a later generation
(`--prompt-cache FILE`, `stream_generate(..., prompt_cache=FILE)`), llama.cpp's --prompt-cache.

Owns the file format and its checks: b"KILNPC1\\n", an 8-byte little-endian header length, a JSON header
(the model's identity, the token ids, the cache types, the basis keys and values are stored in, each stored
part's dtype and shape), then each part's raw bytes (keys' parts, then values'; positions 0..n of every layer).
A split model's cache (kiln/split.py: one tensor per layer, each on its device in its dtype) is stored one part
per layer ("per_layer": true), and restores only into a cache laid out the same.
Format 2 (header "version": 2) added the bases: q8_0 / q4_0 keys and values are stored rotated
(kv_types.Basis); a file without them (format 1) holds them unrotated, so one of those types is refused with a
clear KilnError (make it again) and a dense one loads as before. The identity is a sha256 of the model's
config (`model.args`), the tokenizer's vocabulary size, special ids and the ids of a probe text, so a cache
made by another model (or tokenizer) is refused with a clear KilnError, as is a truncated or foreign file.
Not: the cache layout (cache.py), how much of a prompt a file covers (generate.py reuses the longest common
prefix of its tokens and the prompt).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct

import torch

from kiln.cache import KVCache
from kiln.errors import KilnError

MAGIC = b"KILNPC1\n"
VERSION = 2  # 2: the header names the basis of keys and values (kv_types.Basis.name; None: as they come)
_PROBE = "The kiln fires clay at 1200 °C; def f(x): return x * 2  # 字"


def identity(model, tokenizer) -> str:
    """sha256 of what makes two models' KV states interchangeable: config and tokenizer."""
    args = dataclasses.asdict(model.args) if dataclasses.is_dataclass(model.args) else vars(model.args)
    ident = {"args": args, "vocab": tokenizer.vocab_size, "eos": sorted(tokenizer.eos_token_ids),
             "probe": tokenizer.encode(_PROBE)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def save(path, model, tokenizer, cache: KVCache, tokens: list[int], extra: dict | None = None) -> int:
    """Write the first len(tokens) positions of batch-1 `cache` (which holds `tokens`) to `path`; bytes.
    `extra`: more header fields (the server's slots: the adapter the keys were computed under)."""
    n = len(tokens)
    parts = [p.narrow(-2, 0, n).contiguous().cpu() for p in _stored(cache)]  # (L, 1, K, n, W) or (1, K, n, W)
    header = {"identity": identity(model, tokenizer), "tokens": [int(t) for t in tokens],
              "type_k": cache.type_k, "type_v": cache.type_v, "n_k": len(cache.kp), "version": VERSION,
              "per_layer": _per_layer(cache),
              "basis_k": _name(cache.k_basis), "basis_v": _name(cache.v_basis),
              "parts": [{"dtype": str(p.dtype).removeprefix("torch."), "shape": list(p.shape)} for p in parts],
              **(extra or {})}
    head = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", len(head)) + head)
        for p in parts:
            f.write(p.view(torch.uint8).numpy().tobytes())
    return len(MAGIC) + 8 + len(head) + sum(p.numel() * p.element_size() for p in parts)


def load(path, model, tokenizer) -> tuple[dict, list[torch.Tensor]]:
    """(header, stored parts) of a prompt cache file made by this model; KilnError otherwise."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise KilnError(f"cannot read prompt cache {path}: {e.strerror}") from None
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 8:
        raise KilnError(f"{path} is not a kiln prompt cache file (make one with `kiln cache-prompt`)")
    (size,) = struct.unpack_from("<Q", data, len(MAGIC))
    start = len(MAGIC) + 8 + size
    try:
        header = json.loads(data[len(MAGIC) + 8:start])
        specs = [(getattr(torch, s["dtype"]), tuple(s["shape"])) for s in header["parts"]]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise KilnError(f"prompt cache {path} is truncated or corrupt: its header does not parse") from None
    if header.get("identity") != identity(model, tokenizer):
        raise KilnError(f"prompt cache {path} was made by another model (or tokenizer) than the one loaded; "
                        f"make it again with `kiln cache-prompt` for this model")
    parts = []
    for dtype, shape in specs:
        n = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        if start + n > len(data):
            raise KilnError(f"prompt cache {path} is truncated: {len(data)} bytes, its header says more")
        parts.append(torch.frombuffer(bytearray(data[start:start + n]), dtype=torch.uint8).view(dtype).view(shape))
        start += n
    if start != len(data):
        raise KilnError(f"prompt cache {path} is corrupt: {len(data) - start} bytes past its last part")
    return header, parts


def restore(cache: KVCache, header: dict, parts: list[torch.Tensor], n: int):
    """Copy the first n stored positions into batch-1 `cache` (of the same cache types)."""
    if bool(header.get("per_layer")) != _per_layer(cache):  # before the types: a split's are None (per layer)
        saved, here = ("split across devices", "on one device") if header.get("per_layer") else \
            ("on one device", "split across devices")
        raise KilnError(f"the prompt cache was saved from the model {saved} (its KV cache laid out for that); the "
                        f"model here runs {here}: make it again with the model placed as here")
    if (cache.type_k, cache.type_v) != (header["type_k"], header["type_v"]):
        raise KilnError(f"the prompt cache stores KV as {header['type_k']}/{header['type_v']}; generate with "
                        f"--cache-type-k {header['type_k']} --cache-type-v {header['type_v']}")
    stored, wanted = (header.get("basis_k"), header.get("basis_v")), (_name(cache.k_basis), _name(cache.v_basis))
    if stored != wanted:
        old = "version" not in header
        raise KilnError(f"the prompt cache stores its {header['type_k']}/{header['type_v']} keys and values in "
                        f"another basis ({_bases(stored)}) than this kiln ({_bases(wanted)})"
                        + ("; it was made before kiln rotated quantized KV caches" if old else "")
                        + ": make it again with `kiln cache-prompt`")
    dsts = _stored(cache)
    if len(dsts) != len(parts) or any(d.shape[:-2] != s.shape[:-2] or d.shape[-1] != s.shape[-1]
                                      for d, s in zip(dsts, parts)):
        raise KilnError("the prompt cache's stored parts do not match this model's KV cache layout: make it again")
    for dst, src in zip(dsts, parts):
        dst.narrow(-2, 0, n).copy_(src.narrow(-2, 0, n))  # (to each layer's device and dtype)


def _per_layer(cache: KVCache) -> bool:
    """A split model's cache (kiln/split.py): one tensor per layer, on its device, in its dtype."""
    return isinstance(cache.kp[0], list)


def _stored(cache: KVCache) -> list[torch.Tensor]:
    """Every stored tensor, positions along dim -2, keys' parts then values': (L, B, K, S, W) each, or for a
    split model's cache one (B, K, S, D) per layer."""
    return [t for p in cache.kp + cache.vp for t in (p if isinstance(p, list) else [p])]


def _name(basis) -> str | None:
    return None if basis is None else basis.name


def _bases(names) -> str:
    return "/".join(n or "unrotated" for n in names)


@torch.inference_mode()
def cache_prompt(model, tokenizer, prompt, path, cache_type_k: str | None = None,
                 cache_type_v: str | None = None, prefill_step: int = 512) -> tuple[int, int]:
    """Prefill `prompt` (text, chat messages or ids, as generate takes it) and save its KV state to `path`;
    (tokens, bytes written)."""
    from kiln.decoder import prefill_chunk
    from kiln.tokenizer import check_prompt, prompt_ids
    ids = check_prompt(prompt_ids(tokenizer, prompt), model.args.max_position_embeddings + 1, model.args.vocab_size)
    cache = KVCache.for_model(model, max_len=len(ids), type_k=cache_type_k, type_v=cache_type_v)
    x = torch.tensor([ids], device=cache.k.device)
    for s in range(0, len(ids), prefill_step):
        prefill_chunk(model, x[:, s:s + prefill_step], cache, s)
    return len(ids), save(path, model, tokenizer, cache, ids)
