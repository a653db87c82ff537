"""The `kiln` command: a table of subcommands, each a module with `main(argv)`.

Owns: dispatch, turning a KilnError (or Ctrl-C) into one line on stderr and exit status 2 (130), never a
traceback, and the entry point's exit (`run`).
Not: what any subcommand does (commands.py and the modules named in SUBCOMMANDS).
"""

from __future__ import annotations

import importlib
import os
import sys

from kiln.errors import KilnError
from kiln.startup import QUICK_EXIT, finish, in_a_group

SUBCOMMANDS = {  # name -> (module, function taking argv, one-line help)
    "generate": ("kiln.commands", "generate", "generate text from a prompt"),
    "chat": ("kiln.commands", "chat", "chat interactively (keeps history; /reset, /exit)"),
    "cache-prompt": ("kiln.commands", "cache_prompt", "save a prompt's KV state for generate --prompt-cache"),
    "info": ("kiln.commands", "info", "describe a model file or folder"),
    "fit": ("kiln.fit", "main", "plan which layers go on the GPU and the bytes per device, without loading"),
    "pull": ("kiln.commands", "pull", "download a model into kiln's cache"),
    "convert": ("kiln.convert", "main", "GGUF to a Hugging Face folder, or to GGUF re-quantized (--to gguf)"),
    "imatrix": ("kiln.imatrix", "main", "importance matrix of a model over a text (llama.cpp's format)"),
    "perplexity": ("kiln.eval", "main", "perplexity / KL divergence on a text, as llama-perplexity computes them"),
    "bench": ("kiln.bench", "main", "measure prefill, decode and effective tok/s (optionally vs llama.cpp)"),
    "finetune": ("kiln.finetune", "main", "train a LoRA / QLoRA adapter on your data (PEFT format)"),
    "fuse": ("kiln.finetune.fuse", "main", "merge a LoRA adapter into its base (Hugging Face folder)"),
    "export-adapter": ("kiln.finetune.export", "main", "a LoRA adapter as a GGUF LoRA (llama.cpp) or mlx-lm folder"),
    "serve": ("kiln.serve", "main", "serve a model over the OpenAI API (chat, completions, tools, JSON schema)"),
}

USAGE = "usage: kiln <command> [options]\n\ncommands:\n" + "\n".join(
    f"  {name:<{max(map(len, SUBCOMMANDS))}}  {help_}" for name, (_, _, help_) in SUBCOMMANDS.items()) + \
    "\n\nRun `kiln <command> --help` for a command's options."


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] in ("-V", "--version"):
        from kiln import __version__
        print(f"kiln {__version__}")
        return 0
    name = argv[0]
    if name not in SUBCOMMANDS:
        print(f"kiln: unknown command {name!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    module, func, _ = SUBCOMMANDS[name]
    try:
        return getattr(importlib.import_module(module), func)(argv[1:]) or 0
    except KilnError as e:
        print(f"kiln {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130


def run() -> None:
    """The `kiln` entry point: `main`, then exit. A command that writes nothing but stdout and stderr ends without
    the interpreter's teardown of torch (startup.finish), which would add ~0.5 s to every `kiln generate`."""
    code = main()
    name = sys.argv[1] if len(sys.argv) > 1 else ""
    if name in QUICK_EXIT and not in_a_group(os.environ):  # ranks of a tensor-parallel run end as they do
        finish(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
