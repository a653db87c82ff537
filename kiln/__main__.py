"""`python -m kiln ...` (and `torchrun ... -m kiln ...`): the `kiln` command."""

from kiln.cli import run

run()
