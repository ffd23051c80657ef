"""``python -m harness.sweep``: see :mod:`harness.sweep.cli`."""
import os
import sys

from harness.sweep.cli import main

if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
