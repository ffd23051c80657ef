"""``python -m harness.doctor``: the storage doctor, see :mod:`harness.sweep.doctor`."""
import sys

from harness.sweep.doctor import main

if __name__ == "__main__":
    sys.exit(main())
