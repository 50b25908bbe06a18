"""``python -m vua``: the same as the ``vua`` command."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
