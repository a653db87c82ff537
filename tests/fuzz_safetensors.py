"""safetensors fuzzing: a tiny Llama folder, mutations of its header, data and config, and `fuzz_safetensors`.

Owns: `tiny_folder` (kiln's own Llama at random weights, f32 and f16, saved with the safetensors library,
a WordLevel tokenizer.json), the mutations (header length, bit flips, truncation, the JSON header's
offsets, dtypes, shapes, duplicate and missing names, config.json values) and running them through
kiln.load on CPU (the tiny model loads whole, so reading the tensors is covered too).
Not: judging a case (fuzz_run.py).
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

from fuzz_run import Tally, repro, run_case, _rss_mb

TINY = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=1e4,
            tie_word_embeddings=False)


def tiny_folder(folder: Path) -> tuple[dict, bytes]:
    """A tiny Llama as a Hugging Face folder (f32 and f16 tensors); returns (header dict, data bytes)."""
    import torch
    from safetensors.torch import save
    from tokenizers import Tokenizer, models

    from kiln.models import get_model
    model_cls, args_cls = get_model("llama")
    torch.manual_seed(0)
    state = model_cls(args_cls.from_dict(TINY)).state_dict()
    state = {k: v.half() if "mlp" in k else v for k, v in state.items()}
    raw = save(state)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY))
    vocab = {f"t{i}": i for i in range(TINY["vocab_size"])}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(folder / "tokenizer.json"))
    (folder / "model.safetensors").write_bytes(raw)
    n = struct.unpack_from("<Q", raw)[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def st_bytes(header, data: bytes, text: str | None = None) -> bytes:
    body = (text if text is not None else json.dumps(header)).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(body)) + body + data


def _tensor_names(header):
    return [k for k in header if k != "__metadata__"]


def s_header_length(rng, header, data):
    raw = bytearray(st_bytes(header, data))
    n = struct.unpack_from("<Q", raw)[0]
    v = rng.choice([0, 1, 2, n - 1, n + 1, n + 8, len(raw), len(raw) - 8, 100_000_001, 2**31, 2**63, 2**64 - 1])
    struct.pack_into("<Q", raw, 0, v % 2**64)
    return bytes(raw), f"header length set to {v}"


def s_flip(rng, header, data):
    raw = bytearray(st_bytes(header, data))
    n = struct.unpack_from("<Q", raw)[0]
    where = sorted(rng.randrange(8 + n) for _ in range(rng.choice([1, 1, 3])))
    for off in where:
        raw[off] ^= 1 << rng.randrange(8)
    return bytes(raw), f"flip bits at header bytes {where}"


def s_truncate(rng, header, data):
    raw = st_bytes(header, data)
    cut = rng.randrange(len(raw))
    return raw[:cut], f"truncate at byte {cut} of {len(raw)}"


def s_json(rng, header, data):
    h = json.loads(json.dumps(header))
    names = _tensor_names(h)
    name = rng.choice(names)
    t = h[name]
    other = h[rng.choice(names)]
    choice = rng.randrange(14)
    if choice == 0:
        t["data_offsets"] = list(other["data_offsets"])
        what = "offsets of another tensor (overlap)"
    elif choice == 1:
        b, e = t["data_offsets"]
        t["data_offsets"] = rng.choice([[e, b], [b, e + 4], [b + 1, e + 1], [b, len(data) + 64], [-4, e],
                                        [b, 2**64 - 1], [2**63, 2**63 + 4], [float(b), e], ["0", e], [b], 7])
        what = f"offsets {t['data_offsets']}"
    elif choice == 2:
        t["dtype"] = rng.choice(["Q4", "F8_E8M0", "F8_E4M3", "F8_E5M2", "BOOL", "U8", "I8", "U16", "U32", "U64",
                                 "I64", "F64", "C64", "F4", "f32", "", 5, None])
        what = f"dtype {t['dtype']!r}"
    elif choice == 3:
        t["shape"] = rng.choice([[], [0], [-1], [2**62, 2**62], [2**64], ["a"], list(reversed(t["shape"])),
                                 t["shape"] + [1], [1] + t["shape"], 3, [1.5], [2**31, 2**31, 4]])
        what = f"shape {t['shape']}"
    elif choice == 4:
        del h[name]
        what = "tensor dropped"
    elif choice == 5:
        e = other["data_offsets"][1]
        h[rng.choice(["model.layers.9.mlp.up_proj.weight", "mystery", "lm_head.weight.x", "",
                      "model.language_model.layers.0.mlp.up_proj.weight"])] = dict(
            dtype="F32", shape=[1], data_offsets=[e - 4, e])
        what = "extra tensor"
    elif choice == 6:
        h["__metadata__"] = rng.choice([{"format": "pt"}, {"a": 5}, [1], "x", {"a": {"b": "c"}}, None])
        what = f"__metadata__ {h['__metadata__']!r}"
    elif choice == 7:  # a duplicate key: JSON text with the same name twice
        text = json.dumps(h)
        dup = json.dumps({name: other})[1:-1]
        return st_bytes(h, data, "{" + dup + ", " + text[1:]), f"key {name} appears twice"
    elif choice == 8:
        text = rng.choice(["[]", "5", "null", '"x"', "[" * 100000 + "]" * 100000, '{"a": ' * 50000 + "1" + "}" * 50000,
                           "{" + json.dumps(h)[1:-1] + ",}", json.dumps(h)[:-1], "\udcff"])
        return st_bytes(h, data, text), f"header text {text[:30]!r}..."
    elif choice == 9:
        t.clear()
        what = "empty tensor entry"
    elif choice == 10:
        t["data_offsets"], other["data_offsets"] = other["data_offsets"], t["data_offsets"]
        what = "offsets swapped with another tensor"
    elif choice == 11:
        h = {k: h[k] for k in reversed(list(h))}
        what = "entries reversed"
    elif choice == 12:
        text = json.dumps(h) + " " * rng.choice([1, 7, 1000])
        return st_bytes(h, data, text), "header padded with spaces"
    else:
        t[rng.choice(["dtype", "shape", "data_offsets"])] = {"nested": [1, 2]}
        what = "a field replaced by an object"
    return st_bytes(h, data), f"tensor {name}: {what}"


def s_config(rng, header, data):
    cfg = dict(TINY)
    key = rng.choice(list(TINY) + ["head_dim", "rope_scaling", "text_config", "partial_rotary_factor"])
    value = rng.choice([0, -1, 2**40, 2**63, 1.5, "12", None, [], {}, True, float("nan"), 10**400 if False else 1e308,
                        {"rope_type": "llama3"}, {"rope_type": "linear"}, "llama", "mamba"])
    if rng.random() < 0.15:
        del cfg["hidden_size" if key not in cfg else key]
        return st_bytes(header, data), cfg, f"config.json lacks {key}"
    cfg[key] = value
    return st_bytes(header, data), cfg, f"config.json {key} = {value!r}"


ST_MUTATIONS = [(s_header_length, 2), (s_flip, 3), (s_truncate, 2), (s_json, 6), (s_config, 2)]


def fuzz_safetensors(work: Path, seed: int, cases: range) -> Tally:
    import kiln
    base = work / "base"
    header, data = tiny_folder(base)
    kiln.load(base, device="cpu")  # the unmutated base loads
    tally = Tally(rss_base=_rss_mb())
    folder = work / "case"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (folder / name).write_bytes((base / name).read_bytes())
    for case in cases:
        rng = random.Random(f"{seed}:{case}")
        fn = rng.choices([m for m, _ in ST_MUTATIONS], weights=[k for _, k in ST_MUTATIONS])[0]
        out = fn(rng, header, data)
        raw, what = out[0], out[-1]
        cfg = out[1] if len(out) == 3 else TINY
        (folder / "config.json").write_text(json.dumps(cfg, allow_nan=True))
        (folder / "model.safetensors").write_bytes(raw)
        run_case(tally, lambda p: kiln.load(p, device="cpu"), folder, f"safetensors case {case}: {what}",
                 repro("safetensors", None, seed, case))
    return tally
