"""kiln: run large language models locally, from Python, fast.

Public API (mlx-lm's shape): `load`, `generate`, `stream_generate`. Everything else is an implementation
detail reached through these or through the `kiln` command line.
"""

from kiln.errors import KilnError

__version__ = "0.1.0"
__all__ = ["KilnError", "load", "generate", "stream_generate", "__version__"]


def __getattr__(name):
    # Lazy: `import kiln` stays cheap for the CLI's --help and for tools that only need KilnError.
    if name == "load":
        from kiln.load import load
        return load
    if name in ("generate", "stream_generate"):
        from kiln import generate as _g
        return getattr(_g, name)
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
