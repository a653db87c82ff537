"""kiln: run large language models locally, from Python, fast.

Public API (mlx-lm's shape): `load`, `generate`, `stream_generate`, `finetune` (and `DecoderPool`, to reuse KV
caches and CUDA graphs across their calls). The batched engine that serves many sequences at once is
`kiln.engine.Engine`.
Everything else is reached through these or through the `kiln` command line.
"""

from kiln import startup

startup.from_command_line()  # before torch is imported: a `kiln` command's GPU context starts beside the import
from kiln.errors import KilnError  # noqa: E402
# Imported eagerly so that the functions, not the same-named submodules, are what `kiln.load` and
# `kiln.generate` (and `kiln.finetune`) mean (importing a submodule later would otherwise rebind the attribute).
from kiln.decoder import DecoderPool  # noqa: E402
from kiln.generate import generate, stream_generate  # noqa: E402
from kiln.load import load  # noqa: E402
from kiln.finetune import finetune  # noqa: E402  (the function; kiln/finetune/ is the package)

__version__ = "0.1.0"
__all__ = ["KilnError", "load", "generate", "stream_generate", "finetune", "DecoderPool", "__version__"]
