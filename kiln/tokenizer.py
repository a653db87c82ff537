"""Text <-> token ids: the Tokenizer (from a GGUF vocabulary or a Hugging Face folder), chat prompts, streaming.

Owns: `Tokenizer` (encode, decode, single tokens, end-of-generation ids), reading a Hugging Face tokenizer
folder, chat prompts whose control tokens come only from the template (`chat_ids`), a prompt's ids and their
checks against a model's vocabulary and context (`prompt_ids`, `check_prompt`: both token loops' and the prompt
cache's), a provable bound on characters per token, and a streaming detokenizer that never emits half a UTF-8
character. Decoding reads one table of bytes per id (llama.cpp's pieces), so `decode(ids)` and a
StreamingDetokenizer's output are the same text.
Not: GGUF vocabularies (formats/gguf_vocab.py), stop strings (textstream.py), sampling, the Jinja sandbox
(chat_template.py), tool calls (server/), llama.cpp's cosmetic `clean_spaces` (kiln's decode is lossless).
"""
from __future__ import annotations

import bisect
import codecs
import json
import threading
from collections.abc import Iterable, Mapping
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer as _Backend
from tokenizers import models

from kiln import chat_template
from kiln.errors import KilnError
from kiln.formats.gguf_vocab import (BYTE_TOKEN, backend_from_gguf, byte_level_bytes, byte_level_table, byte_token,
                                     spm_bytes)


# --- The tokenizer ---------------------------------------------------------------------------------------------
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
    def from_gguf(cls, meta, cache_dir: Path | None = None) -> Tokenizer:
        """Build from a GGUF file's metadata (`read_gguf(path).meta`, or the GGUFFile itself); `cache_dir`: where
        what is slow to derive from the vocabulary is kept across processes (None: nowhere)."""
        meta = getattr(meta, "meta", meta)
        backend, fields = backend_from_gguf(meta, cache_dir)
        return cls(backend, **fields)

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

    def save_folder(self, out: Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and generation_config.json into `out` (a Hugging Face
        folder that from_folder, transformers and mlx-lm read back: kiln convert, fuse, adapters)."""
        out = Path(out)
        self.backend.save(str(out / "tokenizer.json"))
        name = lambda i: self.backend.id_to_token(i) if i is not None else None  # noqa: E731
        tc = {"bos_token": name(self.bos_token_id), "eos_token": name(self.eos_token_id),
              "add_bos_token": self.add_bos, "add_eos_token": self.add_eos,
              "tokenizer_class": "PreTrainedTokenizerFast"}
        if self.chat_template:
            tc["chat_template"] = self.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2, ensure_ascii=False))
        gen = {"bos_token_id": self.bos_token_id, "eos_token_id": sorted(self.eos_token_ids)}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2))

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


# --- Prompts: what a generation starts from -------------------------------------------------------------------
class ContextFull(KilnError):
    """The prompt leaves no room for a generated token in the context (the server's context_length_exceeded)."""


def prompt_ids(tokenizer, prompt) -> list[int]:
    """A str is used as is, a list of chat messages gets the chat template, a list of ints is ids."""
    if isinstance(prompt, (str, list, tuple)) and not prompt:  # empty even where the tokenizer adds a BOS
        raise KilnError("the prompt is empty: give at least one token of text")
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    if isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt):
        return tokenizer.chat_ids(list(prompt), add_generation_prompt=True)  # message text is encoded as text
    raise KilnError("prompt must be a string, a list of chat messages (dicts) or a list of token ids")


def check_prompt(ids: list[int], context: int, vocab: int, fix: str = "raise the context size") -> list[int]:
    """The ids, if a model with `vocab` ids can generate after them within `context` positions; else KilnError
    (ContextFull when too long; `fix` says how to get a larger context)."""
    if not ids:
        raise KilnError("the prompt is empty: give at least one token of text")
    bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab), None)
    if bad is not None:
        raise KilnError(f"prompt token id {bad!r} is outside the vocabulary (0..{vocab - 1})")
    if len(ids) >= context:
        raise ContextFull(f"the prompt has {len(ids)} tokens but the context holds {context}; shorten the "
                          f"prompt or {fix}")
    return ids


# --- Streaming -------------------------------------------------------------------------------------------------
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


# --- Hugging Face folders --------------------------------------------------------------------------------------
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
    normal = byte_level_bytes if kind == "bytelevel" else _spm_hf_bytes
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
    return byte_token(text) if BYTE_TOKEN.fullmatch(text) else spm_bytes(text)


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


# --- How many characters one token can stand for ---------------------------------------------------------------
_KEEPS_CHARS = {"Prepend", "Replace", "ByteLevel", "Metaspace", "Split", "Digits", "Punctuation", "Sequence"}


def _max_token_chars(backend: _Backend, pieces: list[bytes] | None) -> int | None:
    """The most characters of text one token can cover, where kiln can prove a bound; None where it cannot.

    When no step drops or merges characters (normalizers that only prepend or replace by something as long,
    splitting pre-tokenizers, a BPE that neither drops nor fuses unknown characters, added tokens that absorb no
    whitespace), a token covers text of at most its own piece's bytes, so C characters need at least
    C / max(piece bytes) tokens: the server refuses longer prompts than ctx_size * this without tokenizing them.
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
    covered = (byte_level and all(chr(c) in vocab for c in byte_level_table() if byte_level_table()[c] != 0xFFFF)
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
