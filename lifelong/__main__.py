"""``python -m lifelong ...``: the `lifelong` command (what ``torchrun -m lifelong`` runs on each rank)."""

import sys

from .cli.main import main

sys.exit(main())
