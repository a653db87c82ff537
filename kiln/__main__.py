"""`python -m kiln ...` (and `torchrun ... -m kiln ...`): the `kiln` command."""

import sys

from kiln.cli import main

sys.exit(main())
