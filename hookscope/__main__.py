"""``python -m hookscope``: the command line."""

from __future__ import annotations

import sys

from hookscope.cli import main

sys.exit(main())
