"""Training data as mlx-lm takes it: a folder of train.jsonl / valid.jsonl / test.jsonl.

Owns: reading and checking records (`{"messages": [...]}` through the chat template, `{"prompt",
"completion"}`, `{"text"}`; a malformed one is a KilnError naming file and line), turning each into token ids
and a loss mask (`mask_prompt`: only the completion / the last assistant turn is trained on), and batching
(padded, shuffled with a seed).
Not: the loss or the loop (trainer.py).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from kiln.errors import KilnError


def read_split(folder, split: str, required: bool = True) -> list[dict]:
    path = Path(folder) / f"{split}.jsonl"
    if not path.is_file():
        if required:
            raise KilnError(f"{path} not found: the data folder needs train.jsonl and valid.jsonl "
                            f"(test.jsonl for --test)")
        return []
    records = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError:
            raise KilnError(f"{path} is not UTF-8 text") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise KilnError(f"{path}:{n}: not a JSON object ({e})") from None
        problem = _check(rec)
        if problem:
            raise KilnError(f"{path}:{n}: {problem}")
        records.append(rec)
    if not records:
        raise KilnError(f"{path} holds no records")
    return records


def _check(rec) -> str | None:
    if not isinstance(rec, dict):
        return "a record must be a JSON object"
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs):
            return "\"messages\" must be a non-empty list of {\"role\": str, \"content\": str}"
        return None
    if "prompt" in rec or "completion" in rec:
        if not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("completion"), str):
            return "\"prompt\" and \"completion\" must both be strings"
        return None
    if "text" in rec:
        return None if isinstance(rec["text"], str) else "\"text\" must be a string"
    return "a record needs \"messages\", \"prompt\" and \"completion\", or \"text\""


def encode(rec: dict, tok, mask_prompt: bool) -> tuple[list[int], int]:
    """(ids, offset): the loss counts tokens from `offset` on (0 unless mask_prompt)."""
    if "text" in rec and "messages" not in rec and "prompt" not in rec:
        ids = tok.encode(rec["text"])
        if tok.eos_token_id is not None and (not ids or ids[-1] != tok.eos_token_id):
            ids.append(tok.eos_token_id)
        return ids, 0
    msgs = rec.get("messages") or [{"role": "user", "content": rec["prompt"]},
                                   {"role": "assistant", "content": rec["completion"]}]
    if not tok.chat_template:
        if "prompt" in rec:  # no template: the prompt and completion as plain text
            prompt = tok.encode(rec["prompt"])
            ids = prompt + tok.encode(rec["completion"], add_special_tokens=False) + [tok.eos_token_id]
            return ids, len(prompt) if mask_prompt else 0
        raise KilnError("\"messages\" records need a chat template, and this model has none")
    ids = tok.chat_ids(msgs, add_generation_prompt=False)
    if not mask_prompt:
        return ids, 0
    if msgs[-1]["role"] != "assistant":
        raise KilnError("--mask-prompt trains on the last assistant turn; a record ends with a "
                        f"{msgs[-1]['role']!r} message")
    return ids, len(tok.chat_ids(msgs[:-1], add_generation_prompt=True))


def dataset(records: list[dict], tok, mask_prompt: bool, max_len: int) -> list[tuple[list[int], int]]:
    out = []
    for rec in records:
        ids, off = encode(rec, tok, mask_prompt)
        out.append((ids[:max_len], min(off, max_len - 1)))
    return out


def collate(items: list[tuple[list[int], int]]):
    """ids (B, T) padded with 0, targets (B, T-1) with -100 where no loss is taken; and the token count."""
    t = max(len(ids) for ids, _ in items)
    ids = torch.zeros(len(items), t, dtype=torch.long)
    tgt = torch.full((len(items), t - 1), -100, dtype=torch.long)
    for i, (seq, off) in enumerate(items):
        ids[i, :len(seq)] = torch.tensor(seq)
        start = max(off - 1, 0)  # target j predicts token j+1
        tgt[i, start:len(seq) - 1] = torch.tensor(seq[start + 1:])
    return ids, tgt


def batches(data: list, batch_size: int, seed: int, loop: bool = True):
    """Batches of `batch_size` items, sorted by length within a shuffled order (less padding), forever if
    `loop` (a fresh shuffle each pass), else one ordered pass."""
    if len(data) < batch_size and loop:
        raise KilnError(f"--batch-size {batch_size} is larger than the {len(data)} training examples")
    rng = random.Random(seed)
    while True:
        order = list(range(len(data)))
        if loop:
            rng.shuffle(order)
        for i in range(0, len(order) - (batch_size - 1 if loop else 0), batch_size):
            yield collate([data[j] for j in order[i:i + batch_size]])
        if not loop:
            return
