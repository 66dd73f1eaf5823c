"""``python -m pytest_umtt.controller``: the same as ``umtt-controller``."""

import sys

from .cli import main

sys.exit(main())
