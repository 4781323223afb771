"""``python -m memopt`` / ``memopt``: the command-line interface (see memopt.cli)."""

from __future__ import annotations

import sys

from memopt.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
