"""The `kiln` command: a table of subcommands, each a module with `main(argv)`.

Owns: dispatch, and turning a KilnError (or Ctrl-C) into one line on stderr and exit status 2 (130),
never a traceback.
Not: what any subcommand does (commands.py and the modules named in SUBCOMMANDS).
"""

from __future__ import annotations

import importlib
import sys

from kiln.errors import KilnError

SUBCOMMANDS = {  # name -> (module, one-line help)
    "generate": ("kiln.commands", "generate text from a prompt"),
    "chat": ("kiln.commands", "chat interactively (keeps history; /reset, /exit)"),
    "info": ("kiln.commands", "describe a model file or folder"),
    "pull": ("kiln.commands", "download a model into kiln's cache"),
}

USAGE = "usage: kiln <command> [options]\n\ncommands:\n" + "\n".join(
    f"  {name:<10} {help_}" for name, (_, help_) in SUBCOMMANDS.items()) + \
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
    module = importlib.import_module(SUBCOMMANDS[name][0])
    try:
        return getattr(module, name.replace("-", "_"))(argv[1:]) or 0
    except KilnError as e:
        print(f"kiln {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
