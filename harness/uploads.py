"""What a run sends to its store, and when. Its buffered metrics, the mode guard's tags and ledger, and
its checkpoints go out together every ``train.upload_every_s`` seconds (0: every epoch) and when the run
ends, however it ends: a request to a tracking server is a round trip (5-15 ms on this machine, 50-250
ms with a delayed ACK or a distant server), often more than a small model's epoch, and a sweep's trial
would otherwise spend most of its time uploading (README "Scaling out").

Every epoch's checkpoint is written locally (``last.pt``; ``best.pt`` on improvement). An upload sends,
in this order, the metrics, the ledger page and the guard's tags, ``best.pt`` if it changed, then
``last.pt``: whatever instant kills the run, the store's newest whole checkpoint is at or before the
last epoch whose metrics it holds, so ``--resume`` retrains the epochs after it and logs only the steps
the store lacks (harness/resume.py): the numbers of an uninterrupted run, at the price of retraining at
most ``upload_every_s`` seconds of epochs.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from harness import failpoints
from harness.cli import signals_deferred
from harness.tracking.tracker import Tracker

if TYPE_CHECKING:
    from harness.guard import ModeGuard

log = logging.getLogger("harness.run")


class Uploads:
    """A run's pending uploads; a context manager that removes its local checkpoints at the end."""

    def __init__(self, tracker: Tracker, guard: ModeGuard | None, every_s: float):
        self.tracker, self.guard, self.every_s = tracker, guard, every_s
        self._dir = tempfile.TemporaryDirectory(prefix="harness-checkpoints-")
        self.folder = Path(self._dir.name)
        self._sent_at = time.monotonic()
        self._tags: dict[str, str] = {}
        self._pages: list[int] = []  # epochs whose ledger entry is not in the store yet
        self._best = self._last = False  # local checkpoints newer than the store's

    def __enter__(self) -> "Uploads":
        return self

    def __exit__(self, *exc) -> None:
        self._dir.cleanup()

    def guard_epoch(self, epoch: int) -> int:
        """Close the guard's epoch (again after the test phase, which joins the last epoch's ledger);
        its findings go out with the next upload. Returns the epoch's count of findings."""
        report = self.guard.end_epoch(epoch)
        if report["findings"]:
            run_wide = self.guard.summary()
            self._tags.update({f"mode_guard.{k}": ",".join(run_wide[k]) for k in report["findings"]})
        if epoch not in self._pages:
            self._pages.append(epoch)
        return report["count"]

    def checkpoint(self, last: Path, improved: bool) -> None:
        """``last`` was just written for this epoch; on improvement it is the best one too."""
        if improved:
            shutil.copyfile(last, last.with_name("best.pt"))
            self._best = True
        self._last = True

    def due(self) -> bool:
        return time.monotonic() - self._sent_at >= self.every_s

    def send(self) -> None:
        """Upload everything pending, in the order that keeps a kill at any instant resumable; a Ctrl-C
        or SIGTERM meanwhile takes effect once it is done (no write cut in half)."""
        with signals_deferred():
            self._send()

    def _send(self) -> None:
        t = self.tracker
        t.flush()
        failpoints.reach("after_epoch_metrics")
        if self._pages:
            first, last = self._pages[0], self._pages[-1]
            page = {str(e): self.guard.ledger.get(e, {}) for e in self._pages}
            t.log_dict(page, f"mode_guard/ledger/epochs-{first:04d}-{last:04d}.json")
            self._pages = []
        if self._tags:
            t.set_tags(self._tags)
            self._tags = {}
        if self._best:
            t.log_artifact(self.folder / "best.pt", "checkpoints")
            self._best = False
        if self._last:
            path = self.folder / "last.pt"
            t.log_artifact(failpoints.torn_copy(path, "mid_checkpoint_upload"), "checkpoints")
            failpoints.reach("mid_checkpoint_upload")
            self._last = False
            failpoints.reach("after_checkpoint")
        self._sent_at = time.monotonic()

    def send_on_failure(self) -> None:
        """The run is ending on an error: send what it has, if the store answers; never raise over it."""
        try:
            if self.tracker.reachable():
                self.send()
        except Exception as e:  # the run's own error is the one to report
            log.debug("uploads at the end of a failed run: %s", e)
