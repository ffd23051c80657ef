"""File locks between the processes of one machine: one sweep's workers counting trials, two commands
creating a fresh store at once, and the one process that may train a given run. ``flock`` locks die with
their process, so a SIGKILL never leaves one behind."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from harness.errors import UserError


class Busy(UserError):
    """The lock is held by another process (``blocking=False``)."""


@contextlib.contextmanager
def file_lock(path: str | Path, *, blocking: bool = True, holder: str = "") -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing). With ``blocking=False`` a held lock
    raises :class:`Busy` naming whoever wrote themselves into the file (``holder``)."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; callers keep their own consistency checks
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            f.seek(0)
            raise Busy(f.read().strip() or "another process") from None
        if holder:
            f.truncate(0)
            f.write(holder)
            f.flush()
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def run_lock(run_id: str) -> Iterator[None]:
    """Held by the process that trains (or resumes) run ``run_id`` on this machine, so a second
    ``--resume`` of the same run is refused instead of logging every epoch twice."""
    path = Path(tempfile.gettempdir()) / "harness-locks" / f"run-{run_id}.lock"
    with file_lock(path, blocking=False, holder=f"pid {os.getpid()}"):
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # still locked here: no one else is inside
