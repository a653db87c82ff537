"""Regenerate tests/data/tokenize_refs.json: llama.cpp's token ids for a mixed corpus, per test model.

Owns: the corpus and the call into llama.cpp (through llama-cpp-python) that produces the reference ids and
the reference detokenized text the tokenizer tests compare kiln against.
Not: the comparison itself (tests/test_tokenizer.py), or fetching the models.

Run (llama-cpp-python installed, models present):
    KILN_TEST_MODELS=/path/to/models python tests/data/make_tokenize_refs.py
The ids come from `Llama(vocab_only=True).tokenize(text, add_bos=True, special=True)`, i.e. llama.cpp with
special-token parsing on, which is what kiln's `encode` mirrors.

Besides the two models as shipped, VARIANTS rewrites their metadata (same vocabulary, another `tokenizer.ggml.pre`,
or a SentencePiece space prefix) into vocab-only GGUF files in a temporary folder, so llama.cpp's regex for every
pre-tokenizer family kiln knows is checked against a real vocabulary. `_variants` in the JSON records each variant's
base model and metadata overrides.
"""

import ctypes
import json
import os
import sys
import tempfile
from pathlib import Path

MODELS = {
    "qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    "gemma-3-270m": "gemma-3-270m-q4_k_m.gguf",
}

_QWEN_PRES = ("default", "gpt-2", "llama-bpe", "dbrx", "deepseek-llm", "deepseek-coder", "deepseek-v3", "starcoder",
              "falcon", "tekken", "gpt-4o", "poro-chat", "viking", "seed-coder", "bailingmoe", "qwen35")
VARIANTS = {
    **{f"qwen2.5-coder-0.5b+pre={pre}": ("qwen2.5-coder-0.5b", {"tokenizer.ggml.pre": pre}) for pre in _QWEN_PRES},
    "gemma-3-270m+space-prefix": ("gemma-3-270m", {"tokenizer.ggml.add_space_prefix": True}),
}

CORPUS = [
    "Hello, world!",
    "",
    " leading space",
    "trailing space ",
    "  two leading and three trailing   ",
    "     ",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "fn main() {\n\tlet v: Vec<u32> = (0..10).map(|x| x * x).collect();\n\tprintln!(\"{:?}\", v);\n}",
    "const f = async (a, b) => { await Promise.all([a(), b()]); return a ?? b; };",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC;",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }",
    "I ❤️ tokenizers 🤗🚀 — family: 👨‍👩‍👧‍👦, thumbs: 👍🏽 👋🏿, melting 🫠",
    "🇯🇵🇺🇸 flags and keycap 1️⃣ #️⃣",
    "你好，世界！这是一个测试。日本語のテキストも。한국어 문장입니다.",
    "مرحبا بالعالم — שלום עולם",
    "Ελληνικά Русский हिन्दी ภาษาไทย",
    "a\n\n\nb\t\t\tc    d\r\nend",
    "\n",
    "\n" * 34,
    "\t  \t mixed indent\n  \n",
    "line1\r\nline2\r\n",
    "1234567890 3.14159 1,000,000 0x1F 007 ²½Ⅻ",
    "I'm sure you'll see they've said it's John's, WE'RE HERE, DON'T",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
    "  <|im_start|>  spaces around special  <|im_end|>  ",
    "<start_of_turn>user\nWrite a haiku.<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text after bos<eos>",
    "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
    "before<|endoftext|>after",
    "e\u0301 vs \u00e9, n\u0303, Z\u0351\u0352a\u0353lgo\u0354 ﬁ ligature",
    "zero\u200bwidth\u200d joiner, nbsp\u00a0here, ideographic\u3000space, private\ue000use",
    "ÉCOLE école Straße İstanbul ǅemal",
    "<table><tr><td>cell</td></tr></table> <b>bold</b>",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa !!!!!!!!???? ........",
    "# Title\n\n- item 1\n- item 2\n\n```python\nprint('x')\n```\n",
    "https://example.com/path?q=1&r=2#frag user@mail.org",
    "∀x∈ℝ: x² ≥ 0 ⇒ √(x²) = |x|",
    "<0x41> literal byte-token text and <unused0> <mask> [multimodal]",
]


def _detokenize(llama_cpp, vocab, ids: list[int], special: bool) -> str:
    """llama.cpp's own detokenizer (not llama-cpp-python's per-piece loop, which strips spaces after BOS)."""
    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    size = 64 + 64 * len(ids)
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, size, False, special)
    return buf.raw[:n].decode("utf-8", errors="replace")


def refs_for(path: Path) -> list[dict]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    out = []
    for text in CORPUS:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        out.append({
            "text": text,
            "ids": ids,
            "decoded": _detokenize(llama_cpp, vocab, ids, special=True),
            "decoded_plain": _detokenize(llama_cpp, vocab, ids, special=False),
        })
    return out


def read_fields(src: Path) -> tuple[str, list]:
    """(architecture, [(key, value, type, array item type)]) of a GGUF file's metadata."""
    import gguf

    reader = gguf.GGUFReader(src)
    fields = []
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        fields.append((name, field.contents(), vtype, sub))
    return reader.fields["general.architecture"].contents(), fields


def write_vocab_only(dst: Path, arch: str, fields: list, overrides: dict) -> None:
    """A GGUF with the given metadata and no tensors (llama.cpp's vocab_only load never reads them)."""
    import gguf

    writer = gguf.GGUFWriter(dst, arch)
    overrides = dict(overrides)
    for name, value, vtype, sub in fields:
        writer.add_key_value(name, overrides.pop(name, value), vtype, sub)
    for name, value in overrides.items():  # keys the source lacks
        writer.add_key_value(name, value, gguf.GGUFValueType.get_type(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()


def variant_refs(root: Path, refs: dict) -> dict:
    variants, sources = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, (base, overrides) in VARIANTS.items():
            if base not in sources:  # GGUFReader takes ~10-30 s on a large vocabulary: once per model
                sources[base] = read_fields(root / MODELS[base])
            path = Path(tmp) / f"{len(variants)}.gguf"
            write_vocab_only(path, *sources[base], overrides)
            try:
                refs[key] = refs_for(path)
            except (ValueError, RuntimeError) as e:  # a pre this llama.cpp build does not know
                print(f"skipping {key}: {e}", file=sys.stderr)
                continue
            variants[key] = {"base": base, "meta": overrides}
    return variants


def _dump(refs: dict) -> str:
    """JSON with one corpus entry per line: readable in a diff, a fraction of indent=1's size."""
    blocks = []
    for key, value in refs.items():
        if isinstance(value, list):
            body = ",\n".join("  " + json.dumps(e, ensure_ascii=False) for e in value)
            blocks.append(f"{json.dumps(key)}: [\n{body}\n ]")
        else:
            blocks.append(f"{json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}")
    return "{\n" + ",\n".join(" " + b for b in blocks) + "\n}\n"


def main() -> int:
    root = Path(os.environ.get("KILN_TEST_MODELS", os.path.expanduser("~/.cache/kiln/models")))
    refs = {}
    for key, name in MODELS.items():
        if not (root / name).exists():
            print(f"missing {root / name}; set KILN_TEST_MODELS to the folder holding it", file=sys.stderr)
            return 1
        refs[key] = refs_for(root / name)
    refs["_variants"] = variant_refs(root, refs)
    dest = Path(__file__).with_name("tokenize_refs.json")
    dest.write_text(_dump(refs), encoding="utf-8")
    print(f"wrote {dest} ({len(refs) - 1} vocabularies x {len(CORPUS)} texts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
