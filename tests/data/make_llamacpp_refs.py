"""Generate llama.cpp reference outputs for kiln's real-model tests (tests/test_real_models.py).

Owns: the reference texts and prompts, running them through llama.cpp (llama-cpp-python, CPU), and
writing one compact `refs_<key>.npz` per model beside this script. Run once, by hand, and commit the
.npz files; CI reads them through tests/refs.py and never builds llama.cpp.

Deliberately not here: anything about kiln, and reading the files back (tests/refs.py does that with
numpy alone, so the tests never import llama_cpp).

What is stored per model (see tests/refs.py for the exact layout):
  - teacher-forced documents: token ids, and at every position the top-K log-probs (computed in float64
    from llama.cpp's float32 logits), the log-prob mass of everything outside the top-K, and the argmax;
  - greedy continuations: prompt text and ids, 32 greedily generated ids (EOS ignored), their text,
    and llama.cpp's top-1 minus top-2 logit margin at each step (a near-tie explains a divergence), and
    the greedy continuations under llama.cpp's other settings (flash attention, an f32 KV cache);
  - llama.cpp's own spread: the argmax at every document position from other llama.cpp settings of the
    same build and file (VARIANTS: one token per eval, flash attention, an f32 KV cache). The reference
    is one batched eval; how often these agree with it is the floor any other implementation can expect,
    because llama.cpp rounds activations to 8 bits inside its dot products and a different summation
    order already moves those roundings (tests/test_real_models.py).

Usage:  python tests/data/make_llamacpp_refs.py [--models-dir DIR] [--only KEY]
Needs llama-cpp-python (built for CPU; this project used 0.3.36 with AVX-512, no AMX).
"""

# llama_cpp first: importing it after numpy/torch has crashed the AVX-512 wheel built for this project.
import llama_cpp  # noqa: I001

import argparse
import hashlib
import json
import os
import time

import numpy as np

TOP_K = 64
N_GEN = 32
HERE = os.path.dirname(os.path.abspath(__file__))

MODELS = {
    "qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    "gemma3-270m": "gemma-3-270m-q4_k_m.gguf",
}

# ── texts ────────────────────────────────────────────────────────────────────────────────────────────
# Varied on purpose: prose, code (indentation runs, punctuation), non-Latin scripts and accents,
# numbers and markdown, and each model's own chat-template special tokens.

PROSE = (
    "The lighthouse keeper had not spoken to another person in eleven days. Each morning he climbed the "
    "hundred and twelve steps to the lamp room, wiped the salt from the glass, and wrote the weather in "
    "a ledger that nobody would ever read. On the twelfth day a small boat appeared on the horizon, its "
    "sail patched with what looked like a bedsheet. He watched it for an hour before he understood that "
    "it was not drifting at all: someone was rowing, slowly and deliberately, straight toward the rocks "
    "where the old channel had silted up years ago. He put down his tea, found the brass megaphone behind "
    "the door, and went down to the landing to shout a warning he was not sure anyone would hear."
)

CODE = '''import heapq
from dataclasses import dataclass, field


@dataclass(order=True)
class Job:
    priority: int
    name: str = field(compare=False)


def schedule(jobs: list[Job], workers: int = 2) -> dict[int, list[str]]:
    """Assign jobs to the least loaded worker, highest priority first."""
    loads = [(0, w) for w in range(workers)]
    heapq.heapify(loads)
    plan: dict[int, list[str]] = {w: [] for w in range(workers)}
    for job in sorted(jobs, reverse=True):
        load, w = heapq.heappop(loads)
        plan[w].append(job.name)
        heapq.heappush(loads, (load + job.priority, w))
    return plan

'''

MIXED = (
    "## Résumé des mesures (2024)\n\n"
    "| Ville | Température moyenne | Précipitations |\n"
    "|-------|--------------------:|---------------:|\n"
    "| Paris | 12,4 °C | 637 mm |\n"
    "| 東京 | 16,3 °C | 1 530 mm |\n\n"
    "Die Werte wurden zwischen dem 1. Januar und dem 31. Dezember gemessen; Abweichungen von mehr als "
    "±0,5 °C sind **fett** markiert. 今年の東京は例年より暖かかった。"
    " Итого: 3 города, 365 дней, 1 095 наблюдений.\n\n"
    "- Version 2.3.1 — letzte Änderung am 2025-01-15\n"
)

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def qwen_chat(user, assistant=None, system=QWEN_SYSTEM):
    """Qwen2.5's chat template written out by hand (what its jinja template renders)."""
    s = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    return s if assistant is None else s + assistant + "<|im_end|>\n"


def gemma_chat(user, model=None):
    """Gemma 3's turn markup written out by hand (BOS comes from the tokenizer, add_bos=True)."""
    s = f"<start_of_turn>user\n{user}<end_of_turn>\n<start_of_turn>model\n"
    return s if model is None else s + model + "<end_of_turn>\n"


CHAT_USER = "How do I reverse a list in Python without modifying the original?"
CHAT_REPLY = (
    "Use slicing: `reversed_list = my_list[::-1]` creates a new list with the elements in reverse order, "
    "and `my_list` stays unchanged. If you only need to iterate, `reversed(my_list)` returns an iterator "
    "without copying anything:\n\n```python\nfor item in reversed(my_list):\n    print(item)\n```"
)

DOCS = {
    "qwen2.5-coder-0.5b": {
        "prose": PROSE,
        "code": CODE,
        "chat": qwen_chat(CHAT_USER, CHAT_REPLY),
        "mixed": MIXED,
    },
    "gemma3-270m": {
        "prose": PROSE,
        "code": CODE,
        "chat": gemma_chat(CHAT_USER, CHAT_REPLY),
        "mixed": MIXED,
    },
}

RAW_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "Here is a list of the planets in the solar system:\n1.",
    "Once upon a time, in a small village by the sea,",
]

PROMPTS = {
    "qwen2.5-coder-0.5b": [
        qwen_chat("Write a Python function that checks whether a string is a palindrome."),
        qwen_chat("What is the difference between a process and a thread?"),
        qwen_chat("Translate to French: The weather is nice today."),
        qwen_chat("List three prime numbers greater than 100."),
    ] + RAW_PROMPTS,
    "gemma3-270m": RAW_PROMPTS + [
        "import numpy as np\n\n# Compute the mean of each row\n",
        "Ingredients for pancakes:\n-",
        "Water boils at 100 degrees Celsius. At high altitude,",
        "Q: What is 12 times 12?\nA:",
    ],
}


# Other settings of the same llama.cpp build: (constructor overrides, evaluate one token per eval?).
VARIANTS = {
    "one_token": ({}, True),
    "flash_attn": ({"flash_attn": True}, False),
    "kv_f32": ({"type_k": 0, "type_v": 0}, False),  # GGML_TYPE_F32
}

# ── llama.cpp ────────────────────────────────────────────────────────────────────────────────────────

def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def open_model(path, **overrides):
    # Flash attention off, f16 KV cache (the defaults); logits_all so one eval gives every position.
    kw = dict(model_path=path, n_ctx=1024, n_batch=512, logits_all=True, n_threads=2, verbose=False, seed=0)
    return llama_cpp.Llama(**{**kw, **overrides})


def tokenize(llm, text):
    # add_bos=True defers to the GGUF's add_bos_token (Qwen: no BOS; Gemma: BOS); special=True parses
    # the chat-template markers as single special tokens, as a chat template's output is meant to be.
    return llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)


def detok(llm, ids):
    return llm.detokenize(ids).decode("utf-8", errors="replace")


def logits_of(llm, tokens, one_token=False):
    """Evaluate `tokens` from an empty context in one batch (or one eval per token); return float32
    logits (n, vocab)."""
    llm.reset()
    for part in ([[t] for t in tokens] if one_token else [tokens]):
        llm.eval(part)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def top_k_stats(logits, k=TOP_K, chunk=32):
    """Per row: top-k ids and log-probs (sorted, float64 math), log-mass outside the top-k, argmax.

    Chunked so a (200, 262144) Gemma block never becomes one float64 array of 400 MB.
    """
    ids, lps, rest = [], [], []
    for i in range(0, len(logits), chunk):
        x = logits[i: i + chunk].astype(np.float64)
        m = x.max(axis=1, keepdims=True)
        lse = m + np.log(np.exp(x - m).sum(axis=1, keepdims=True))
        lp = x - lse                                                       # (c, V) log-probs
        top = np.argpartition(-lp, k, axis=1)[:, :k]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(lp, top, 1), axis=1), 1)
        top_lp = np.take_along_axis(lp, top, 1)
        # Rest mass as a logsumexp over the non-top-k entries, not 1 - sum(top): that subtraction loses
        # every digit when the top-k already hold 0.9999... of the mass.
        masked = lp.copy()
        np.put_along_axis(masked, top, -np.inf, 1)
        mm = masked.max(axis=1, keepdims=True)
        rest.append((mm + np.log(np.exp(masked - mm).sum(axis=1, keepdims=True)))[:, 0])
        ids.append(top)
        lps.append(top_lp)
    return (np.concatenate(ids).astype(np.int32), np.concatenate(lps).astype(np.float32),
            np.concatenate(rest).astype(np.float32), logits.argmax(axis=1).astype(np.int32))


def greedy(llm, prompt_ids, n=N_GEN):
    """Greedy decode one token per eval after a batched prompt, as a chat client would; EOS ignored."""
    llm.reset()
    llm.eval(prompt_ids)
    out, margins = [], []
    for _ in range(n):
        row = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        second, first = np.partition(row, -2)[-2:]
        tok = int(np.argmax(row))
        out.append(tok)
        margins.append(float(first - second))
        llm.eval([tok])
    return out, margins


# ── per model ────────────────────────────────────────────────────────────────────────────────────────

def teacher_forced(llm, docs):
    meta, parts, offset = [], [], 0
    for name, text in docs.items():
        toks = tokenize(llm, text)
        assert 90 <= len(toks) <= 200, f"doc {name!r} is {len(toks)} tokens; keep it within 90..200"
        parts.append((np.asarray(toks, dtype=np.int32),) + top_k_stats(logits_of(llm, toks)))
        meta.append({"name": name, "text": text, "offset": offset, "n": len(toks)})
        offset += len(toks)
    cols = [np.concatenate(c) for c in zip(*parts)]
    return meta, dict(zip(["tf_tokens", "tf_topk_ids", "tf_topk_logprobs", "tf_rest_logprob",
                           "tf_argmax"], cols))


def variant_argmaxes(path, docs, tokens):
    """{"tf_argmax_<variant>": argmax at every document position} for each of VARIANTS."""
    out = {}
    for name, (overrides, one_token) in VARIANTS.items():
        llm = open_model(path, **overrides)
        out[f"tf_argmax_{name}"] = np.concatenate([
            logits_of(llm, tokens[d["offset"]: d["offset"] + d["n"]].tolist(), one_token).argmax(axis=1)
            for d in docs]).astype(np.int32)
        del llm
    return out


def continuations(llm, prompts, others=()):
    """Greedy continuations of each prompt; `others`: (name, llm) of llama.cpp's other settings, whose own
    greedy continuations are stored beside the reference's ("variants")."""
    out = []
    for text in prompts:
        ids = tokenize(llm, text)
        gen, margins = greedy(llm, ids)
        variants = {name: greedy(other, ids)[0] for name, other in others}
        # Self-check: the same sequence evaluated in one batch should pick the same argmaxes as the
        # one-token-at-a-time loop (llama.cpp uses different kernels for the two; a near-tie can flip).
        batch = logits_of(llm, ids + gen)[len(ids) - 1: -1].argmax(axis=1)
        out.append({"prompt": text, "prompt_ids": ids, "gen_ids": gen, "gen_text": detok(llm, gen),
                    "margins": [round(m, 4) for m in margins],
                    "batch_agree": int((batch == np.asarray(gen)).sum()), "variants": variants})
    return out


def build(key, path):
    t0 = time.time()
    llm = open_model(path)
    docs, arrays = teacher_forced(llm, DOCS[key])
    arrays.update(variant_argmaxes(path, docs, arrays["tf_tokens"]))
    meta = {
        "key": key, "file": os.path.basename(path), "sha256": sha256(path),
        "llama_cpp_python": llama_cpp.__version__, "n_vocab": llm.n_vocab(), "top_k": TOP_K,
        "n_ctx": 1024, "n_batch": 512, "n_threads": 2, "flash_attn": False, "kv_type": "f16",
        "docs": docs, "greedy": continuations(llm, PROMPTS[key], [
            (name, open_model(path, **o)) for name, (o, one_token) in VARIANTS.items() if not one_token]),
        "variants": {name: {"overrides": o, "one_token_per_eval": t} for name, (o, t) in VARIANTS.items()},
    }
    out = os.path.join(HERE, f"refs_{key}.npz")
    np.savez_compressed(out, meta=np.array(json.dumps(meta, ensure_ascii=False)), **arrays)
    return out, meta, time.time() - t0


def report(out, meta, secs):
    n = sum(d["n"] for d in meta["docs"])
    print(f"{out}: {os.path.getsize(out) / 1024:.0f} KiB, {n} positions, {secs:.1f} s")
    with np.load(out) as z:
        for name in meta["variants"]:
            agree = np.mean(z[f"tf_argmax_{name}"] == z["tf_argmax"])
            print(f"  llama.cpp {name} vs the batched reference: top-1 {agree:.4f}")
    for name in ("flash_attn", "kv_f32"):
        same = sum(g["variants"][name] == g["gen_ids"] for g in meta["greedy"])
        print(f"  llama.cpp {name}: {same}/{len(meta['greedy'])} greedy continuations equal the reference's")
    for g in meta["greedy"]:
        print(f"  batch/step argmax agree {g['batch_agree']}/{N_GEN}, min margin {min(g['margins']):.3f}: "
              f"{g['prompt'][-40:]!r} -> {g['gen_text']!r}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", default=os.environ.get("KILN_TEST_MODELS", "/work/cache/models"))
    ap.add_argument("--only", choices=sorted(MODELS), help="regenerate one model's file")
    args = ap.parse_args(argv)
    for key, fname in MODELS.items():
        if args.only in (None, key):
            report(*build(key, os.path.join(os.path.expanduser(args.models_dir), fname)))


if __name__ == "__main__":
    main()
