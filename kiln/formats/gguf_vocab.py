"""GGUF vocabularies -> `tokenizers` backends that split text exactly as llama.cpp does.

Owns: reading and checking `tokenizer.ggml.*`, building a `tokenizers.Tokenizer` (byte-level BPE with llama.cpp's
per-`pre` regexes; SentencePiece "llama" vocabularies replayed as score-ranked BPE), llama.cpp's end-of-generation
ids and retyping of tokens it knows by spelling, BOS/EOS, flags, templates, and each id's piece. Entry point:
`backend_from_gguf(meta, cache_dir) -> (backend, Tokenizer keyword arguments)`; the piece spellings are shared with
tokenizer.py. The hot paths of a 150k-262k token vocabulary (splitting merges, spelling pieces) run in bulk, each
beside its one-by-one twin. Not: parsing the file (gguf.py), encoding and decoding (tokenizer.py), keeping derived
merges on disk (vocab_cache.py).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from functools import cache
from itertools import accumulate, repeat
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _Backend

from kiln.errors import KilnError
from kiln.formats.vocab_cache import cached_merges

log = logging.getLogger(__name__)

# llama.cpp's token types (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_MATCHED_IN_TEXT = (UNKNOWN, CONTROL, USER_DEFINED)  # split out of the text before the model sees it
_SKIPPABLE = (UNKNOWN, CONTROL)  # what skip_special_tokens drops (llama.cpp: unparse_special=False)

# --- Pre-tokenizer regexes -------------------------------------------------------------------------------------
# Keyed by tokenizer.ggml.pre. Spelled as llama.cpp spells them (llama-vocab.cpp): its
# rewrites (explicit case classes instead of (?i:), lookahead forms for the Lu/Ll patterns) change which strings
# match, and llama.cpp is the reference. Each regex splits every piece left by the one before it.
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
_UPPER_LOWER = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
_LOWER_UPPER = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
_TEKKEN = _UPPER_LOWER + "|" + _LOWER_UPPER + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_GPT4O = (_UPPER_LOWER + _CONTRACTIONS + "?|" + _LOWER_UPPER + _CONTRACTIONS + "?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CJK = r"[一-龥ࠀ-一가-퟿]+"
_DEEPSEEK_LETTERS = (  # \u escapes: these letters change under Unicode normalization, which editors apply
    "\\s?["
    "A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕ"
    "Ἐ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌῐ-\u1fd3ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ"
    "\u212a-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟"
    "𞤀-𞥃"
    "]+"
)
_PORO = r" ?[^(\s|.,!?…。，、।۔،)]+"

_PRE_REGEXES = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt2": (_GPT2,),
    "llama3": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "qwen35": (_QWEN35,),
    "starcoder": (r"\p{N}", _GPT2),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"),
    "deepseek-llm": (r"[\r\n]", _DEEPSEEK_LETTERS, r"\s?[!-/:-~！-／：-～‘-‟　-。]+", r"\s+$", _CJK, r"\p{N}+"),
    "deepseek-coder": (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"),
    "deepseek-v3": (r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+",
                    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
    "tekken": (_TEKKEN,),
    "gpt-4o": (_GPT4O,),
    "poro": (_PORO,),
    "viking": (_PORO, r"\p{N}"),
    "seed-coder": (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)"
                   r"|\s+",),
    "bailingmoe": (r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",),
}
# tokenizer.ggml.pre value -> (regex family, llama.cpp's flags for it)
_PRE_ALIASES = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
                    ("llama3", {"ignore_merges": True, "add_bos": True})),
    **dict.fromkeys(("dbrx", "smaug-bpe", "chatglm-bpe", "glm4"), ("llama3", {})),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "hunyuan", "megrez", "kormo", "f2llmv2", "grok-2",
                     "solar-open"), ("qwen2", {})),
    **dict.fromkeys(("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"),
                    ("starcoder", {})),
    **dict.fromkeys(("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "mpt", "olmo",
                     "jais", "trillion", "granite-docling", "exaone4", "roberta-bpe", "jina-v1-en", "jina-v2-code",
                     "a.x-4.0", "mellum", "modern-bert"), ("gpt2", {})),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2"), ("gpt-4o", {})),
    **dict.fromkeys(("poro-chat", "bloom", "gpt3-finnish"), ("poro", {})),
    "default": ("default", {}), "qwen35": ("qwen35", {}), "falcon": ("falcon", {}), "viking": ("viking", {}),
    "deepseek-llm": ("deepseek-llm", {}), "deepseek-coder": ("deepseek-coder", {}),
    "deepseek-v3": ("deepseek-v3", {}), "tekken": ("tekken", {"ignore_merges": True, "add_bos": True}),
    "seed-coder": ("seed-coder", {}), "bailingmoe": ("bailingmoe", {}), "bailingmoe2": ("bailingmoe", {}),
}

# Tokens llama.cpp recognises by their spelling (llama-vocab.cpp). It stops generation on the first group, and
# promotes every token it recognises here to CONTROL, which changes how text containing them is split: e.g. Qwen's
# plain "</s>" becomes one special token. kiln follows, because llama.cpp is the reference for GGUF files.
_EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
))
_FIM_TEXTS = {  # fill-in-the-middle markers, looked up only when the file does not name them
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>", "<PRE>",
                "\u2581<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>", "<SUF>", "\u2581<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>", "<MID>", "\u2581<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
_FIM_EOG = ("fim_pad", "fim_rep", "fim_sep")  # llama.cpp also stops on these
_ALWAYS_SHOWN = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")  # gpt-oss: USER_DEFINED in llama.cpp
BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


# --- The vocabulary and the backend ----------------------------------------------------------------------------
def backend_from_gguf(meta: dict, cache_dir: Path | None = None) -> tuple[_Backend, dict]:
    """The backend for a GGUF file's metadata, and the rest of what a Tokenizer needs (its keyword arguments:
    pieces, special ids, BOS/EOS, end-of-generation ids, add_bos/add_eos, chat templates, template tokens).
    `cache_dir`: where a SentencePiece vocabulary's merges are kept across processes (vocab_cache.py); None: not
    kept."""
    vocab = _GGUFVocab.read(meta)
    eog = _llama_cpp_specials(vocab, meta)
    if vocab.model == "gpt2":
        backend, flags = _bpe_backend(vocab, meta)
    elif vocab.model == "llama":
        backend, flags = _spm_backend(vocab, meta, cache_dir), {"add_bos": True}
    else:
        raise KilnError(f"GGUF tokenizer model {vocab.model!r:.80} is not supported (kiln reads 'gpt2' BPE and "
                        "'llama' SentencePiece vocabularies); point kiln at the model's Hugging Face folder "
                        "(tokenizer.json) instead")
    return backend, dict(eos_token_ids=eog, **_gguf_fields(vocab, meta, flags))


class _GGUFVocab:
    """The tokenizer.ggml.* arrays, checked once."""

    def __init__(self, model, tokens, types, scores, merges):
        self.model, self.tokens, self.types, self.scores, self.merges = model, tokens, types, scores, merges
        self._ids: dict[str, int] | None = None

    @classmethod
    def read(cls, meta: dict) -> _GGUFVocab:
        tokens = _gguf_list(meta, "tokenizer.ggml.tokens", str, None)
        if not tokens:
            raise KilnError("this GGUF file carries no vocabulary (tokenizer.ggml.tokens); use the model's "
                            "Hugging Face folder (tokenizer.json) as the tokenizer")
        n = len(tokens)
        types = _gguf_list(meta, "tokenizer.ggml.token_type", int, n) or [NORMAL] * n
        scores = _gguf_list(meta, "tokenizer.ggml.scores", (int, float), n) or [0.0] * n
        model = meta.get("tokenizer.ggml.model", "llama")
        if not isinstance(model, str) or not isinstance(meta.get("tokenizer.ggml.pre", ""), str):
            raise KilnError("GGUF tokenizer.ggml.model / tokenizer.ggml.pre is not a string; the file is damaged, "
                            "re-download or re-convert it")
        merges = _gguf_list(meta, "tokenizer.ggml.merges", str, None) or []
        return cls(model, list(tokens), types[:n], scores[:n], merges)

    @property
    def ids(self) -> dict[str, int]:
        """Token text -> id; the first id wins on duplicates."""
        if self._ids is None:
            n = len(self.tokens)
            self._ids = dict(zip(reversed(self.tokens), range(n - 1, -1, -1)))
        return self._ids

    def added_tokens(self) -> list[AddedToken]:
        """Tokens matched in raw text before the model runs: CONTROL/UNKNOWN (special) and USER_DEFINED."""
        return [AddedToken(self.tokens[i], special=self.types[i] != USER_DEFINED, normalized=False)
                for i in self.typed(_MATCHED_IN_TEXT)]

    def typed(self, kinds: Iterable[int], keep: bool = True) -> list[int]:
        """Ids whose type is one of `kinds` (or, not `keep`, is none of them), in id order; one numpy pass."""
        hit = np.isin(np.asarray(self.types), list(kinds))
        return np.flatnonzero(hit if keep else ~hit).tolist()

    def find(self, texts: Iterable[str]) -> list[int]:
        """Ids of the tokens spelled as one of `texts`, in id order."""
        return sorted(self.ids[t] for t in set(texts) if t in self.ids)

    def promote(self, ids: Iterable[int]) -> None:
        """Make tokens CONTROL (llama.cpp does so for tokens it recognises as turn ends or FIM markers)."""
        for i in ids:
            self.types[i] = CONTROL


def _gguf_list(meta: dict, key: str, kind, n: int | None) -> list:
    """meta[key] as a list of `kind` of at least `n` items ([] when absent); KilnError when it is not one.

    Model files are untrusted: a vocabulary array of the wrong type or length is refused here, by name.
    """
    value = meta.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not _all_of(value, kind) or (n and len(value) < n):
        what = f"a {type(value).__name__}" if not isinstance(value, list) else f"{len(value)} items"
        raise KilnError(f"GGUF vocabulary is inconsistent: {key} is {what}, expected {n or 'a list of'} "
                        f"{getattr(kind, '__name__', 'number')} values; the file is damaged, re-download or "
                        f"re-convert it")
    return value


def _all_of(values: list, kind) -> bool:
    """all(isinstance(v, kind) for v in values), one check per distinct type instead of per item."""
    return all(issubclass(t, kind) for t in set(map(type, values)))


def _bpe_backend(vocab: _GGUFVocab, meta: dict) -> tuple[_Backend, dict]:
    """gpt2-style byte-level BPE, split by the regexes llama.cpp uses for this `pre`."""
    regexes, flags = _pre_regexes(meta.get("tokenizer.ggml.pre") or "")
    backend = _Backend(_bpe_model(vocab, flags.get("ignore_merges", False)))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
    backend.pre_tokenizer = pre_tokenizers.Sequence(splits + [pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                        use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.add_tokens(vocab.added_tokens())
    return backend, flags


def _bpe_model(vocab: _GGUFVocab, ignore_merges: bool) -> models.BPE:
    """The BPE over the file's merges. The merges are split in bulk (`_merge_pairs`) and handed over unchecked:
    `models.BPE` refuses a merge naming a token the vocabulary lacks, and only then are they split and checked
    one by one (`_checked_merges`, which drops such merges as llama.cpp does)."""
    pairs = _merge_pairs(vocab.merges)
    if pairs is not None:
        try:
            return models.BPE(vocab=vocab.ids, merges=pairs, ignore_merges=ignore_merges)
        except Exception:  # the Rust builder's errors are plain Exceptions
            pass
    return models.BPE(vocab=vocab.ids, merges=_checked_merges(vocab), ignore_merges=ignore_merges)


def _merge_pairs(lines: list[str]) -> list[tuple[str, str]] | None:
    """Each merge split at its one space, in bulk; None unless every merge has exactly one space and not
    first, where llama.cpp's rule (the first space after the first character) splits them the same."""
    if list(map(str.count, lines, repeat(" "))).count(1) != len(lines):
        return None
    words = " ".join(lines).split(" ")
    left, right = words[0::2], words[1::2]
    return list(zip(left, right)) if all(left) else None


def _checked_merges(vocab: _GGUFVocab) -> list[tuple[str, str]]:
    """The slow twin of _merge_pairs: each merge split by llama.cpp's rule, those naming a missing token dropped."""
    ids = vocab.ids
    return [m for m in map(_split_merge, vocab.merges) if m and m[0] in ids and m[1] in ids and m[0] + m[1] in ids]


def _split_merge(line: str) -> tuple[str, str] | None:
    cut = line.find(" ", 1)  # llama.cpp splits at the first space after the first character
    return (line[:cut], line[cut + 1:]) if cut > 0 else None


def _pre_regexes(pre: str) -> tuple[tuple[str, ...], dict]:
    if not pre:
        log.warning("GGUF file names no pre-tokenizer (tokenizer.ggml.pre); using llama.cpp's 'default' split, "
                    "which may not be the model's own; re-convert the model with a current llama.cpp to fix")
        pre = "default"
    if pre not in _PRE_ALIASES:
        log.warning("unknown GGUF pre-tokenizer %.80r; splitting text with the GPT-2 regex, so token ids may differ "
                    "from the model's own tokenizer", pre)
        return _PRE_REGEXES["gpt2"], {}
    family, flags = _PRE_ALIASES[pre]
    return _PRE_REGEXES[family], flags


def _spm_backend(vocab: _GGUFVocab, meta: dict, cache_dir: Path | None = None) -> _Backend:
    """SentencePiece "llama" vocabularies, replayed as BPE.

    llama.cpp's SPM tokenizer starts from UTF-8 characters and repeatedly merges the adjacent pair whose
    concatenation is a token with the highest score (ties: leftmost). A BPE whose merges are every (left, right)
    split of every token, ranked by the token's score, makes the same choices; characters outside the vocabulary
    fall back to <0xXX> byte tokens in both. (One corner differs: two different tokens with exactly equal scores
    are ranked by id here, by position in llama.cpp; real vocabularies give every normal token its own score.)
    """
    ids = vocab.ids
    order = np.argsort(-np.asarray(vocab.scores, dtype=np.float64), kind="stable")  # best score first
    ranked = list(map(vocab.tokens.__getitem__, order.tolist()))
    folder = cache_dir if len(ranked) >= _SPM_CACHED_FROM else None  # a small one derives faster than it reads
    merges = cached_merges(folder, ranked, lambda: _spm_merges(ranked, ids), _SPM_MERGES)
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    unk_text = vocab.tokens[unk] if isinstance(unk, int) and 0 <= unk < len(vocab.tokens) else None
    backend = _Backend(models.BPE(vocab=ids, merges=merges, byte_fallback=True, unk_token=unk_text))
    prefix = _spm_space_prefix(meta)
    steps = [normalizers.Prepend("▁")] if prefix else []
    backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    # the normalizer runs on each stretch of text between matched tokens, so every stretch gets the "▁" prefix,
    # which is what llama.cpp does (it prefixes a space after every special token)
    backend.add_tokens(vocab.added_tokens())
    return backend


_SPM_MERGES = "spm-merges/1"  # the cache's name for what _spm_merges derives: change it when that changes
_SPM_CACHED_FROM = 16384  # tokens


def _spm_merges(ranked: list[str], ids: dict[str, int]) -> list[tuple[str, str]]:
    """Every (left, right) split of every token whose two sides are tokens: by token rank, then left to right."""
    return [(a, b) for p in ranked for k in range(1, len(p)) if (a := p[:k]) in ids and (b := p[k:]) in ids]


def _spm_space_prefix(meta: dict) -> bool:
    return bool(meta.get("tokenizer.ggml.add_space_prefix", True))


def _gguf_fields(vocab: _GGUFVocab, meta: dict, flags: dict) -> dict:
    """Everything but the backend and the end-of-generation ids: pieces, BOS/EOS, templates."""
    ids = _gguf_special_ids(vocab, meta)
    add_bos = meta.get("tokenizer.ggml.add_bos_token", flags.get("add_bos", False))
    names = {"bos_token": ids["bos"], "eos_token": ids["eos"], "unk_token": ids["unknown"],
             "pad_token": ids["padding"]}
    return dict(
        pieces=_gguf_pieces(vocab), special_ids=vocab.typed(_SKIPPABLE),
        bos_token_id=ids["bos"], eos_token_id=ids["eos"],
        add_bos=bool(add_bos) and ids["bos"] is not None, add_eos=bool(meta.get("tokenizer.ggml.add_eos_token")),
        strip_leading_space=vocab.model == "llama" and _spm_space_prefix(meta),
        chat_templates=_gguf_templates(meta),
        template_tokens={k: vocab.tokens[i] for k, i in names.items() if i is not None},
    )


def _gguf_special_ids(vocab: _GGUFVocab, meta: dict) -> dict[str, int | None]:
    """bos/eos/eot/eom/unknown/padding ids from the file; SentencePiece files fall back to llama.cpp's 1/2/0."""
    defaults = {"bos": 1, "eos": 2, "unknown": 0} if vocab.model == "llama" else {}
    n = len(vocab.tokens)
    out = {}
    for kind in ("bos", "eos", "eot", "eom", "unknown", "padding"):
        key = f"tokenizer.ggml.{kind}_token_id"
        out[kind] = _gguf_id(meta, key, n) if key in meta else _gguf_id(defaults, kind, n)
    return out


def _gguf_id(meta: dict, key: str, n: int) -> int | None:
    value = meta.get(key)
    return int(value) if isinstance(value, (int, np.integer)) and 0 <= value < n else None


def _llama_cpp_specials(vocab: _GGUFVocab, meta: dict) -> set[int]:
    """llama.cpp's end-of-generation ids, with its retyping of the tokens it recognises by spelling.

    Edits `vocab.types` in place (before any backend is built from them) and returns the ids that end generation.
    """
    eog = set(vocab.find(_EOG_TEXTS))
    for kind, texts in _FIM_TEXTS.items():
        named = _gguf_id(meta, f"tokenizer.ggml.{kind}_token_id", len(vocab.tokens))
        found = [named] if named is not None else vocab.find(texts)[:1]
        vocab.promote(found if named is None else [])
        eog.update(found if kind in _FIM_EOG else [])
    vocab.promote(eog)
    for i in vocab.find(_ALWAYS_SHOWN):
        vocab.types[i] = USER_DEFINED
    ids = _gguf_special_ids(vocab, meta)
    eog.update(i for i in (ids["eos"], ids["eot"], ids["eom"]) if i is not None)
    texts = {vocab.tokens[i] for i in eog}
    if texts & {"<|call|>", "<|calls|>"} and texts & {"<|return|>", "<|flush|>"}:
        for i in eog & set(vocab.find(["<|end|>"])):  # gpt-oss / solar: <|end|> closes a message, not the turn
            eog.discard(i)
            vocab.types[i] = USER_DEFINED
    return eog


def _gguf_templates(meta: dict) -> dict[str, str]:
    """tokenizer.chat_template is the default; tokenizer.chat_template.<name> are named alternatives."""
    key = "tokenizer.chat_template"
    return {"default" if k == key else k[len(key) + 1:]: v for k, v in meta.items()
            if isinstance(v, str) and (k == key or k.startswith(key + "."))}


def _gguf_pieces(vocab: _GGUFVocab) -> list[bytes]:
    """What each id adds to decoded text, as llama.cpp's token_to_piece(special=True) spells it: every token
    spelled in bulk as a NORMAL one, then the others one by one (`_gguf_pieces_one_by_one` is the slow twin)."""
    pieces = (byte_level_pieces if vocab.model == "gpt2" else spm_pieces)(vocab.tokens)
    if pieces is None:
        return _gguf_pieces_one_by_one(vocab)
    for i in vocab.typed([NORMAL], keep=False):
        pieces[i] = _piece(vocab.tokens[i], vocab.types[i], vocab.model)
    return pieces


def _gguf_pieces_one_by_one(vocab: _GGUFVocab) -> list[bytes]:
    """_gguf_pieces token by token: each spelled as its type says."""
    return [_piece(text, kind, vocab.model) for text, kind in zip(vocab.tokens, vocab.types)]


def _piece(text: str, kind: int, model: str) -> bytes:
    if kind == NORMAL:
        return byte_level_bytes(text) if model == "gpt2" else spm_bytes(text)
    if kind in _MATCHED_IN_TEXT:
        return text.encode("utf-8")
    if kind == BYTE:
        return byte_token(text)
    return b""  # UNUSED / UNDEFINED tokens print nothing


# --- Pieces: the bytes each token adds to decoded text (tokenizer.py reads Hugging Face vocabularies too) ---
def spm_bytes(text: str) -> bytes:
    return text.replace("▁", " ").encode("utf-8")


def byte_token(text: str) -> bytes:
    m = BYTE_TOKEN.fullmatch(text)
    return bytes([int(m.group(1), 16)]) if m else text.encode("utf-8")


def spm_pieces(texts: list[str]) -> list[bytes] | None:
    """[spm_bytes(t) for t in texts] in bulk (one encode, split at zero characters); None where a text holds a
    zero character or a lone surrogate (one that never becomes a NORMAL token's piece must not fail the rest)."""
    joined = "\0".join(texts)
    if joined.count("\0") != len(texts) - 1:
        return None
    try:
        return spm_bytes(joined).split(b"\0")
    except UnicodeEncodeError:
        return None


def byte_level_pieces(texts: list[str]) -> list[bytes] | None:
    """[byte_level_bytes(t) for t in texts] in bulk: every character looked up at once in a table of GPT-2's byte
    alphabet (`byte_level_array`), a text with a character outside it spelled on its own; None where a text holds
    a lone surrogate."""
    try:
        chars = np.frombuffer("".join(texts).encode("utf-32-le"), "<u4")
    except UnicodeEncodeError:
        return None
    table = byte_level_array()
    raw = table[np.minimum(chars, len(table) - 1)]
    data, ends = raw.astype(np.uint8).tobytes(), list(accumulate(map(len, texts)))
    out = list(map(data.__getitem__, map(slice, [0, *ends[:-1]], ends)))
    for i in set(np.searchsorted(ends, np.flatnonzero(raw < 0), side="right").tolist()):
        out[i] = byte_level_bytes(texts[i])
    return out


@cache
def byte_level_array() -> np.ndarray:
    """byte_level_table as an array over characters 0..0x144: the byte, or -1 (not in the alphabet; the last
    entry stands for every character past it)."""
    out = np.full(0x145, -1, dtype=np.int16)
    for c, b in byte_level_table().items():
        out[c] = -1 if b == 0xFFFF else b
    return out


@cache
def byte_level_table() -> dict[int, int]:
    """str.translate table undoing GPT-2's byte -> printable character map (characters outside it -> U+FFFF)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in printable]
    table = {c: 0xFFFF for c in range(0x100)}  # a stray raw byte-range char makes the token "not byte-level"
    table.update({b: b for b in printable})
    table.update({0x100 + k: b for k, b in enumerate(shifted)})
    return table


def byte_level_bytes(text: str) -> bytes:
    try:
        return text.translate(byte_level_table()).encode("latin-1")
    except UnicodeEncodeError:  # not written in the byte alphabet: the text is the text
        return text.encode("utf-8")
