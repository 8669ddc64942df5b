"""``python -m resilience``: the command-line tool."""

import sys

from .ops.cli import main

sys.exit(main())
