"""``python -m harness.sweep``: see :mod:`harness.sweep.cli`."""
import os

from harness.cli import exit_with
from harness.sweep.cli import main

if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    exit_with(main)
