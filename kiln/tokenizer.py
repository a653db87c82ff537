"""Text ↔ token ids: tokenizers built from GGUF vocabularies or Hugging Face folders, chat templates, streaming.

Owns: turning a GGUF file's `tokenizer.ggml.*` metadata into a `tokenizers.Tokenizer` that splits text exactly as
llama.cpp does (gpt2-style byte-level BPE with llama.cpp's per-`pre` regexes; SentencePiece-style "llama" vocabularies
replayed as a score-ranked BPE), reading a Hugging Face tokenizer folder, the ids that end generation, chat prompts
whose control tokens come only from the template (`chat_ids`: message text is tokenized as text), a provable bound on
characters per token, and a streaming detokenizer that never emits half a UTF-8 character.
Not: reading the GGUF file (formats/gguf.py hands us `meta`), stop strings (textstream.py), sampling (sample.py),
the Jinja sandbox and rendering itself (chat_template.py),
tool-call parsing (server/), and llama.cpp's cosmetic `clean_spaces` pass on decode (kiln's decode is lossless).

Decoding goes through one table of bytes per id (what llama.cpp calls a token's piece), so `decode(ids)` and the
concatenation of a `StreamingDetokenizer`'s output are the same bytes decoded the same way.
"""

from __future__ import annotations

import bisect
import codecs
import json
import logging
import re
import threading
from collections.abc import Iterable, Mapping
from functools import cache, cached_property
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _Backend

from kiln import chat_template
from kiln.errors import KilnError

log = logging.getLogger(__name__)

# llama.cpp's token types (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_MATCHED_IN_TEXT = (UNKNOWN, CONTROL, USER_DEFINED)  # split out of the text before the model sees it
_SKIPPABLE = (UNKNOWN, CONTROL)  # what skip_special_tokens drops (llama.cpp: unparse_special=False)

# ---------------------------------------------------------------------------------------------------------------
# Pre-tokenizer regexes, keyed by tokenizer.ggml.pre. Spelled as llama.cpp spells them (llama-vocab.cpp): its
# rewrites (explicit case classes instead of (?i:), lookahead forms for the Lu/Ll patterns) change which strings
# match, and llama.cpp is the reference. Each regex splits every piece left by the one before it.
# ---------------------------------------------------------------------------------------------------------------
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
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


# ---------------------------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------------------------
class Tokenizer:
    """Encode text to ids and back, render chat templates, stream detokenized text.

    `backend` is the `tokenizers.Tokenizer` that does the encoding (special tokens written in the text are matched
    as tokens); decoding reads `pieces`, one bytes string per id, so it never depends on the backend's decoder.
    """

    def __init__(self, backend: _Backend, *, pieces: list[bytes] | None, special_ids: Iterable[int],
                 bos_token_id: int | None, eos_token_id: int | None, eos_token_ids: Iterable[int],
                 add_bos: bool, add_eos: bool = False, strip_leading_space: bool = False,
                 chat_templates: Mapping[str, str] | None = None, template_tokens: Mapping[str, str] | None = None):
        self.backend = backend
        self.pieces = pieces  # None: an unusual decoder; decode through the backend instead
        self.special_ids = frozenset(special_ids)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id  # the one the chat template calls eos_token
        self.eos_token_ids = set(eos_token_ids)
        self.add_bos, self.add_eos = add_bos, add_eos
        self.strip_leading_space = strip_leading_space  # SentencePiece's "▁" on the first word is not text
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True) if pieces is None else len(pieces)
        self.chat_templates = dict(chat_templates or {})
        self.chat_template = self.chat_templates.get("default")
        self.template_tokens = dict(template_tokens or {})  # bos_token, eos_token… as strings, for templates
        self._env: chat_template.Env | None = None  # built on first use, as is the text-only backend copy
        self._text_backend: _Backend | None = None
        self._lock = threading.Lock()

    # --- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, meta) -> Tokenizer:
        """Build from a GGUF file's metadata (`read_gguf(path).meta`, or the GGUFFile itself)."""
        meta = getattr(meta, "meta", meta)
        vocab = _GGUFVocab.read(meta)
        eog = _llama_cpp_specials(vocab, meta)
        if vocab.model == "gpt2":
            backend, flags = _bpe_backend(vocab, meta)
        elif vocab.model == "llama":
            backend, flags = _spm_backend(vocab, meta), {"add_bos": True}
        else:
            raise KilnError(f"GGUF tokenizer model {vocab.model!r:.80} is not supported (kiln reads 'gpt2' BPE and "
                            "'llama' SentencePiece vocabularies); point kiln at the model's Hugging Face folder "
                            "(tokenizer.json) instead")
        return cls(backend, eos_token_ids=eog, **_gguf_fields(vocab, meta, flags))

    @classmethod
    def from_folder(cls, path) -> Tokenizer:
        """Build from a Hugging Face folder: tokenizer.json, plus tokenizer_config.json, generation_config.json,
        config.json and chat_template.jinja where present."""
        root = Path(path)
        file = root / "tokenizer.json"
        if not file.is_file():
            raise KilnError(f"{root} has no tokenizer.json; kiln reads only fast-tokenizer files. Save one with "
                            "transformers: AutoTokenizer.from_pretrained(folder).save_pretrained(folder)")
        try:
            backend = _Backend.from_file(str(file))
        except Exception as e:  # the Rust parser's errors are plain Exceptions
            raise KilnError(f"{file} is not a readable tokenizer ({e}); re-download or re-save it") from None
        return cls(backend, **_folder_fields(root, backend))

    # --- encode / decode ---------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`; BOS first when the model wants one and `add_special_tokens`. Control tokens spelled
        in the text are matched as tokens (chat messages go through `chat_ids`, which does not do that)."""
        if not isinstance(text, str):
            raise KilnError(f"text to encode must be a str, got {type(text).__name__}")
        ids = self._encoding(text).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        if add_special_tokens and self.add_eos and self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        return ids

    def _encoding(self, text: str, backend: _Backend | None = None):
        """The backend's Encoding of `text`. Through encode_batch, which releases the GIL while it works (encode
        does not), so that a long text tokenized in a worker thread does not stall the server's event loop."""
        backend = backend or self.backend
        try:
            return backend.encode_batch([text], add_special_tokens=False)[0]
        except (TypeError, UnicodeEncodeError):  # lone surrogates (valid in JSON, not in UTF-8)
            text = text.encode("utf-8", "replace").decode("utf-8")
            return backend.encode_batch([text], add_special_tokens=False)[0]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; the same text a StreamingDetokenizer emits for them, piece by piece."""
        ids = [self._check_id(i) for i in ids]
        if self.pieces is None:
            return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        pieces = [self._piece(i, skip_special_tokens) for i in ids]
        first = next((k for k, p in enumerate(pieces) if p), None)
        if first is not None:
            pieces[first] = self._strip_first(pieces[first])
        return b"".join(pieces).decode("utf-8", "replace")

    def detokenizer(self, skip_special_tokens: bool = False) -> StreamingDetokenizer:
        """A fresh incremental decoder for one generated sequence."""
        if self.pieces is None:
            return _TextDiffDetokenizer(self, skip_special_tokens)
        return StreamingDetokenizer(self, skip_special_tokens)

    # --- single tokens -----------------------------------------------------------------------------------------
    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary's own spelling of a token (e.g. 'Ġhello', '▁the', '<|im_end|>')."""
        return self.backend.id_to_token(self._check_id(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_bytes(self, token_id: int) -> bytes:
        """The bytes this token adds to decoded text (may be part of a UTF-8 character)."""
        token_id = self._check_id(token_id)
        if self.pieces is None:
            return self.backend.decode([token_id], skip_special_tokens=False).encode("utf-8")
        return self.pieces[token_id]

    def id_to_piece(self, token_id: int) -> str:
        """The text of one token on its own (a partial UTF-8 character shows as U+FFFD)."""
        return self.id_to_bytes(token_id).decode("utf-8", "replace")

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self.special_ids

    def _check_id(self, token_id) -> int:
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise KilnError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        return token_id

    def _piece(self, token_id: int, skip_special: bool) -> bytes:
        return b"" if skip_special and token_id in self.special_ids else self.pieces[token_id]

    def _strip_first(self, piece: bytes) -> bytes:
        return piece[1:] if self.strip_leading_space and piece[:1] == b" " else piece

    # --- chat templates ----------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = True, **kwargs) -> str:
        """The conversation as the model's chat template writes it (rendered in a sandbox: chat_template.py)."""
        return self.render_chat(self.chat_job(messages, tools, add_generation_prompt, **kwargs)).text

    def chat_ids(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
                 **kwargs) -> list[int]:
        """A conversation's prompt ids: the template's text, encoded by `encode_chat` (caller text as text)."""
        return self.encode_chat(self.render_chat(self.chat_job(messages, tools, add_generation_prompt, **kwargs)))

    def chat_job(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
                 **kwargs) -> chat_template.Job:
        """What rendering a conversation needs, as plain JSON (so that a worker process can render it too).
        Template kwargs cannot replace the template's own values (bos_token…, add_generation_prompt)."""
        try:
            data = {"documents": None, **chat_template.plain(kwargs),
                    "messages": chat_template.plain_messages(messages), "tools": chat_template.plain(tools) or None}
        except chat_template.TemplateFailed as e:
            raise KilnError(str(e)) from None
        fixed = {**self.template_tokens, "add_generation_prompt": bool(add_generation_prompt)}
        return chat_template.Job(self._template_source(tools), fixed, data)

    def render_chat(self, job: chat_template.Job, max_chars: int | None = None) -> chat_template.Rendered:
        """Render in this process (no time budget: the server renders in worker processes instead)."""
        with self._lock:
            if self._env is None:
                self._env = chat_template.Env()
        try:
            return chat_template.render(self._env, job, max_chars)
        except chat_template.TemplateFailed as e:
            raise KilnError(str(e)) from None

    def encode_chat(self, chat: chat_template.Rendered) -> list[int]:
        """Ids of rendered chat text in which control tokens come only from the template.

        The text is encoded as a whole, exactly as `encode` does; if a control token turns up inside the caller's
        text (`chat.spans`), the text is encoded again stretch by stretch between the template's own control
        tokens, with control-token spellings inside a stretch encoded as plain text (llama.cpp's parse_special =
        false). Tokens the vocabulary marks user-defined (not control) are still matched, as llama.cpp does.
        BOS goes first when the model wants one and the template did not write it."""
        enc = self._encoding(chat.text)
        ids = enc.ids
        specials = [k for k, t in enumerate(ids) if t in self.special_ids]
        theirs = {k for k in specials if self._caller_wrote(chat, enc.token_to_chars(k))}
        if theirs:
            ours = [(enc.token_to_chars(k), ids[k]) for k in specials if k not in theirs]
            ids = self._encode_around(chat.text, ours)
        if self.add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id] + ids
        return ids

    def _caller_wrote(self, chat: chat_template.Rendered, where: tuple[int, int]) -> bool:
        """Whether a control token at `where` in the text came from the caller's strings (see encode_chat)."""
        s, e = where
        text = chat.text[s:e]
        job = chat.job
        if chat.spans is None:  # the template inspected the caller's text: only a string search is left
            if job is not None and any(text in x for x in job.strings()):
                raise KilnError(f"the conversation contains the text {text!r}, a control token of this model, and "
                                "its chat template reads the message text in a way that keeps kiln from telling "
                                "the two apart; remove it from the messages")
            return False
        k = bisect.bisect_left(chat.spans, (e, -1)) - 1  # the last span starting before the token ends
        if k >= 0 and chat.spans[k][1] > s:
            return True
        if job is not None and any(text in x for x in job.strings(marked=False)):
            raise KilnError(f"a field name or role in the conversation contains {text!r}, a control token of this "
                            "model; rename it")
        return False

    def _encode_around(self, text: str, ours: list[tuple[tuple[int, int], int]]) -> list[int]:
        """Encode the stretches between the template's control tokens as text; keep those tokens."""
        ids, at = [], 0
        for (s, e), token in ours:
            ids += self._as_text(text[at:s])
            ids.append(token)
            at = e
        return ids + self._as_text(text[at:])

    def _as_text(self, text: str) -> list[int]:
        if not text:
            return []
        with self._lock:
            if self._text_backend is None:  # a copy that spells control tokens out (built on first need)
                self._text_backend = _Backend.from_str(self.backend.to_str())
                self._text_backend.encode_special_tokens = True
        return self._encoding(text, self._text_backend).ids

    @cached_property
    def max_token_chars(self) -> int | None:
        """The most characters one token can cover, where provable (see `_max_token_chars`); else None."""
        return _max_token_chars(self.backend, self.pieces)

    def _template_source(self, tools) -> str:
        if tools and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if self.chat_template is None:
            raise KilnError("this model has no chat template; pass --no-chat-template to send the prompt as raw "
                            "text, or supply a template (--chat-template FILE)")
        return self.chat_template


# ---------------------------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------------------------
class StreamingDetokenizer:
    """Feed ids one at a time; get back only text that is complete (never half a UTF-8 character).

    The concatenation of everything `add` and `flush` return equals `tokenizer.decode(ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")  # holds a split character's first bytes
        self._started = False
        self._chunks: list[str] = []

    def add(self, token_id: int) -> str:
        piece = self._tok._piece(self._tok._check_id(token_id), self._skip)
        if piece and not self._started:
            self._started = True
            piece = self._tok._strip_first(piece)
        return self._emit(self._utf8.decode(piece))

    def flush(self) -> str:
        return self._emit(self._utf8.decode(b"", final=True))

    @property
    def text(self) -> str:
        if len(self._chunks) > 1:  # join lazily: += on a long string each token would be quadratic
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def _emit(self, text: str) -> str:
        if text:
            self._chunks.append(text)
        return text


class _TextDiffDetokenizer(StreamingDetokenizer):
    """For backends whose decoder kiln cannot turn into per-token bytes: re-decode and emit what grew."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        super().__init__(tokenizer, skip_special_tokens)
        self._ids: list[int] = []
        self._sent = 0

    def add(self, token_id: int) -> str:
        self._ids.append(self._tok._check_id(token_id))
        text = self._tok.decode(self._ids, self._skip)
        if text.endswith("\ufffd"):  # probably a character still arriving
            return ""
        return self._take(text)

    def flush(self) -> str:
        return self._take(self._tok.decode(self._ids, self._skip))

    def _take(self, text: str) -> str:
        new, self._sent = text[self._sent:], max(self._sent, len(text))
        return self._emit(new)


# ---------------------------------------------------------------------------------------------------------------
# GGUF vocabularies
# ---------------------------------------------------------------------------------------------------------------
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
        return [AddedToken(self.tokens[i], special=t != USER_DEFINED, normalized=False)
                for i, t in enumerate(self.types) if t in _MATCHED_IN_TEXT]

    def find(self, texts: Iterable[str]) -> list[int]:
        """Ids of the tokens spelled as one of `texts`, in id order."""
        return sorted(self.ids[t] for t in set(texts) if t in self.ids)

    def promote(self, ids: Iterable[int]) -> None:
        """Make tokens CONTROL (llama.cpp does so for tokens it recognises as turn ends or FIM markers)."""
        for i in ids:
            if self.types[i] != CONTROL:
                self.types[i] = CONTROL


def _gguf_list(meta: dict, key: str, kind, n: int | None) -> list:
    """meta[key] as a list of `kind` of at least `n` items ([] when absent); KilnError when it is not one.

    Model files are untrusted: a vocabulary array of the wrong type or length is refused here, by name.
    """
    value = meta.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, kind) for v in value) or (n and len(value) < n):
        what = f"a {type(value).__name__}" if not isinstance(value, list) else f"{len(value)} items"
        raise KilnError(f"GGUF vocabulary is inconsistent: {key} is {what}, expected {n or 'a list of'} "
                        f"{getattr(kind, '__name__', 'number')} values; the file is damaged, re-download or "
                        f"re-convert it")
    return value


def _bpe_backend(vocab: _GGUFVocab, meta: dict) -> tuple[_Backend, dict]:
    """gpt2-style byte-level BPE, split by the regexes llama.cpp uses for this `pre`."""
    regexes, flags = _pre_regexes(meta.get("tokenizer.ggml.pre") or "")
    ids = vocab.ids
    merges = [m for m in map(_split_merge, vocab.merges) if m and m[0] in ids and m[1] in ids and m[0] + m[1] in ids]
    backend = _Backend(models.BPE(vocab=ids, merges=merges, ignore_merges=flags.get("ignore_merges", False)))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
    backend.pre_tokenizer = pre_tokenizers.Sequence(splits + [pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                        use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.add_tokens(vocab.added_tokens())
    return backend, flags


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


def _spm_backend(vocab: _GGUFVocab, meta: dict) -> _Backend:
    """SentencePiece "llama" vocabularies, replayed as BPE.

    llama.cpp's SPM tokenizer starts from UTF-8 characters and repeatedly merges the adjacent pair whose
    concatenation is a token with the highest score (ties: leftmost). A BPE whose merges are every (left, right)
    split of every token, ranked by the token's score, makes the same choices; characters outside the vocabulary
    fall back to <0xXX> byte tokens in both. (One corner differs: two different tokens with exactly equal scores
    are ranked by id here, by position in llama.cpp; real vocabularies give every normal token its own score.)
    """
    ids = vocab.ids
    order = np.argsort(-np.asarray(vocab.scores, dtype=np.float64), kind="stable")  # best score first
    ranked = [vocab.tokens[i] for i in order.tolist()]
    merges = [(a, b) for p in ranked for k in range(1, len(p)) if (a := p[:k]) in ids and (b := p[k:]) in ids]
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


def _spm_space_prefix(meta: dict) -> bool:
    return bool(meta.get("tokenizer.ggml.add_space_prefix", True))


def _gguf_fields(vocab: _GGUFVocab, meta: dict, flags: dict) -> dict:
    """Everything but the backend and the end-of-generation ids: pieces, BOS/EOS, templates."""
    ids = _gguf_special_ids(vocab, meta)
    add_bos = meta.get("tokenizer.ggml.add_bos_token", flags.get("add_bos", False))
    names = {"bos_token": ids["bos"], "eos_token": ids["eos"], "unk_token": ids["unknown"],
             "pad_token": ids["padding"]}
    return dict(
        pieces=_gguf_pieces(vocab), special_ids=[i for i, t in enumerate(vocab.types) if t in _SKIPPABLE],
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
    out = {}
    for key, value in meta.items():
        if key == "tokenizer.chat_template" and isinstance(value, str):
            out["default"] = value
        elif key.startswith("tokenizer.chat_template.") and isinstance(value, str):
            out[key[len("tokenizer.chat_template."):]] = value
    return out


def _gguf_pieces(vocab: _GGUFVocab) -> list[bytes]:
    """What each id adds to decoded text, as llama.cpp's token_to_piece(special=True) spells it."""
    normal = _byte_level_bytes if vocab.model == "gpt2" else _spm_bytes
    out = []
    for text, kind in zip(vocab.tokens, vocab.types):
        if kind == NORMAL:
            out.append(normal(text))
        elif kind in _MATCHED_IN_TEXT:
            out.append(text.encode("utf-8"))
        elif kind == BYTE:
            out.append(_byte_token(text))
        else:  # UNUSED / UNDEFINED tokens print nothing
            out.append(b"")
    return out


def _spm_bytes(text: str) -> bytes:
    return text.replace("▁", " ").encode("utf-8")


def _byte_token(text: str) -> bytes:
    m = _BYTE_TOKEN.fullmatch(text)
    return bytes([int(m.group(1), 16)]) if m else text.encode("utf-8")


@cache
def _byte_level_table() -> dict[int, int]:
    """str.translate table undoing GPT-2's byte -> printable character map (characters outside it -> U+FFFF)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in printable]
    table = {c: 0xFFFF for c in range(0x100)}  # a stray raw byte-range char makes the token "not byte-level"
    table.update({b: b for b in printable})
    table.update({0x100 + k: b for k, b in enumerate(shifted)})
    return table


def _byte_level_bytes(text: str) -> bytes:
    try:
        return text.translate(_byte_level_table()).encode("latin-1")
    except UnicodeEncodeError:  # not written in the byte alphabet: the text is the text
        return text.encode("utf-8")


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face folders
# ---------------------------------------------------------------------------------------------------------------
def _folder_fields(root: Path, backend: _Backend) -> dict:
    cfg = _read_json(root / "tokenizer_config.json")
    gen, model_cfg = _read_json(root / "generation_config.json"), _read_json(root / "config.json")
    texts = {k: _token_text(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    bos = _folder_id(backend, texts["bos_token"], gen.get("bos_token_id", model_cfg.get("bos_token_id")))
    eos = _folder_id(backend, texts["eos_token"], None)
    eos_ids = {i for i in (*_id_list(gen.get("eos_token_id")), *_id_list(model_cfg.get("eos_token_id")), eos)
               if i is not None}
    if eos is None and eos_ids:
        eos = min(eos_ids)
    add_bos, add_eos = _folder_adds(backend, cfg, bos, eos)
    pieces, strip = _folder_pieces(backend)
    return dict(
        pieces=pieces, special_ids=[i for i, t in backend.get_added_tokens_decoder().items() if t.special],
        bos_token_id=bos, eos_token_id=eos, eos_token_ids=eos_ids, add_bos=add_bos, add_eos=add_eos,
        strip_leading_space=strip, chat_templates=_folder_templates(root, cfg),
        template_tokens={k: v for k, v in texts.items() if v is not None},
    )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise KilnError(f"{path} is not valid JSON ({e}); re-download it or delete it") from None
    return value if isinstance(value, dict) else {}


def _token_text(value) -> str | None:
    """tokenizer_config spells a special token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value) -> list[int]:
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


def _folder_id(backend: _Backend, text: str | None, fallback) -> int | None:
    found = backend.token_to_id(text) if text else None
    return found if found is not None else (fallback if isinstance(fallback, int) else None)


def _folder_adds(backend: _Backend, cfg: dict, bos: int | None, eos: int | None) -> tuple[bool, bool]:
    """add_bos/add_eos from tokenizer_config, else from what tokenizer.json's post-processor adds."""
    bare = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    probe_bos = bos is not None and full[:1] == [bos] and bare[:1] != [bos]
    probe_eos = eos is not None and full[-1:] == [eos] and bare[-1:] != [eos]
    add_bos = cfg["add_bos_token"] if isinstance(cfg.get("add_bos_token"), bool) else probe_bos
    add_eos = cfg["add_eos_token"] if isinstance(cfg.get("add_eos_token"), bool) else probe_eos
    return add_bos and bos is not None, add_eos and eos is not None


def _folder_pieces(backend: _Backend) -> tuple[list[bytes] | None, bool]:
    """Per-id bytes from the decoder's recipe (byte-level, or "▁"-for-space with byte fallback); None otherwise."""
    style = _decoder_style(json.loads(backend.decoder.__getstate__()) if backend.decoder else {})
    if style is None:
        return None, False
    kind, strip = style
    vocab = backend.get_vocab(with_added_tokens=True)
    tokens = [""] * (max(vocab.values(), default=-1) + 1)  # ids nobody spells (gaps) decode to nothing
    for text, i in vocab.items():
        tokens[i] = text
    added = set(backend.get_added_tokens_decoder())
    normal = _byte_level_bytes if kind == "bytelevel" else _spm_hf_bytes
    return [t.encode("utf-8") if i in added else normal(t) for i, t in enumerate(tokens)], strip


def _decoder_style(spec: dict) -> tuple[str, bool] | None:
    """('bytelevel' | 'spm', strips-first-space) for decoders kiln can read piece by piece."""
    parts = spec.get("decoders", [spec]) if spec.get("type") == "Sequence" else [spec]
    kinds = {p.get("type") for p in parts}
    if kinds <= {"ByteLevel"} and "ByteLevel" in kinds:
        return "bytelevel", False
    if not kinds <= {"Replace", "ByteFallback", "Fuse", "Strip", "Metaspace"}:
        return None
    spm = any(p.get("type") == "Metaspace" or (p.get("type") == "Replace" and p.get("pattern", {}).get("String") == "▁"
                                                and p.get("content") == " ") for p in parts)
    strip = any((p.get("type") == "Strip" and p.get("start", 0) > 0)
                or (p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never") for p in parts)
    return ("spm", strip) if spm else None


def _spm_hf_bytes(text: str) -> bytes:
    return _byte_token(text) if _BYTE_TOKEN.fullmatch(text) else _spm_bytes(text)


def _folder_templates(root: Path, cfg: dict) -> dict[str, str]:
    """tokenizer_config's chat_template (a string, or a list of named ones), overridden by chat_template.jinja."""
    out: dict[str, str] = {}
    value = cfg.get("chat_template")
    if isinstance(value, str):
        out["default"] = value
    elif isinstance(value, list):
        named = [t for t in value if isinstance(t, dict) and isinstance(t.get("template"), str) and "name" in t]
        out.update({str(t["name"]): t["template"] for t in named})
    for path in sorted((root / "additional_chat_templates").glob("*.jinja")):
        out[path.stem] = path.read_text(encoding="utf-8")
    if (root / "chat_template.jinja").is_file():
        out["default"] = (root / "chat_template.jinja").read_text(encoding="utf-8")
    elif "default" not in out and isinstance(_read_json(root / "chat_template.json").get("chat_template"), str):
        out["default"] = _read_json(root / "chat_template.json")["chat_template"]
    return out


# ---------------------------------------------------------------------------------------------------------------
# How many characters one token can stand for
# ---------------------------------------------------------------------------------------------------------------
_KEEPS_CHARS = {"Prepend", "Replace", "ByteLevel", "Metaspace", "Split", "Digits", "Punctuation", "Sequence"}


def _max_token_chars(backend: _Backend, pieces: list[bytes] | None) -> int | None:
    """The most characters of text one token can cover, where kiln can prove a bound; None where it cannot.

    When no step drops or merges characters (normalizers that only prepend or replace one string by one at least as
    long, pre-tokenizers that only split; a BPE model that never drops an unknown character nor fuses a run of them;
    added tokens that absorb no whitespace), every token covers a piece of the text whose UTF-8 bytes are at most its
    own piece's bytes. A text of C characters then needs at least C / max(piece bytes) tokens: the server rejects a
    prompt longer than ctx_size * max_token_chars characters without tokenizing it.
    """
    if pieces is None or not isinstance(backend.model, models.BPE) or backend.model.fuse_unk:
        return None
    steps = [_state(backend.normalizer), _state(backend.pre_tokenizer)]
    flat = [p for spec in steps for p in _flatten(spec)]
    if not all(_keeps_chars(p) for p in flat):
        return None
    if any(t.lstrip or t.rstrip or t.single_word for t in backend.get_added_tokens_decoder().values()):
        return None
    vocab = backend.get_vocab(with_added_tokens=False)
    byte_level = any(p.get("type") == "ByteLevel" for p in flat)
    covered = (byte_level and all(chr(c) in vocab for c in _byte_level_table() if _byte_level_table()[c] != 0xFFFF)
               or backend.model.byte_fallback and all(f"<0x{b:02X}>" in vocab for b in range(256))
               or backend.model.unk_token is not None)
    return max(map(len, pieces), default=1) or 1 if covered else None


def _state(component) -> dict:
    return json.loads(component.__getstate__()) if component is not None else {}


def _flatten(spec: dict) -> list[dict]:
    inner = spec.get("normalizers", spec.get("pretokenizers"))
    return [q for p in inner for q in _flatten(p)] if spec.get("type") == "Sequence" else [spec] if spec else []


def _keeps_chars(step: dict) -> bool:
    kind = step.get("type")
    if kind not in _KEEPS_CHARS:
        return False
    if kind == "Replace":
        pattern = step.get("pattern", {})
        return "String" in pattern and len(step.get("content", "")) >= len(pattern["String"])
    return kind != "Split" or step.get("behavior") != "Removed"
