"""``python -m rslib ...`` is the ``rslib`` command (``torchrun -m rslib stage certify FILE`` on every rank)."""

import sys

from rslib.cli import main

sys.exit(main())
