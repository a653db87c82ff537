"""The one exception kiln raises on bad input.

Owns: `KilnError`, whose message names the problem and, where there is one, the fix; `short`, how a message
quotes a value read from a file.
Not: printing or exit codes (cli.py turns a KilnError into one line and exit status 2; the server into
an HTTP 4xx body).
"""


class KilnError(Exception):
    """Bad input: a file, a name, a value or a request kiln cannot use. The message says why."""


def short(value, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters: names and values from a corrupt file can be megabytes."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
