"""Fault injection, as trusted databases test themselves: ``HARNESS_FAILPOINT=<point>[:<n>]`` makes the
process SIGKILL itself the n-th time (default 1st) it reaches that point. The kill tests
(tests/test_kill.py) kill a run and a sweep at every point below, run the documented recovery and check
that nothing is lost, duplicated or left RUNNING. Unset (always, outside those tests), a point costs one
dictionary lookup.
"""
from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

#: Every point, where it sits, in the order a run or a sweep reaches them.
POINTS = {
    # harness.run
    "after_run_created": "the MLflow run exists; nothing logged, no checkpoint yet",
    "after_epoch_metrics": "an epoch's metrics are logged; its checkpoint is not",
    "mid_checkpoint_write": "the checkpoint file is half written (locally)",
    "mid_checkpoint_upload": "the checkpoint is half copied into the run's artifacts",
    "after_checkpoint": "an epoch's checkpoint is logged",
    "after_last_epoch": "every epoch is trained; the test split is not scored yet",
    "during_model_log": "test metrics are logged; the model is being logged",
    "before_run_end": "everything is logged; the run is not marked FINISHED yet",
    # harness.sweep
    "after_parent_run_created": "the sweep's parent run exists; the study does not know it yet",
    "after_trial_asked": "Optuna handed out a trial; its worker is not recorded yet",
    "before_trial_told": "the trial's run ended; Optuna has not been told its result (the run's final "
                         "tags are on their way meanwhile)",
    "after_trial_told": "Optuna knows the result; the trial's run may not be tagged with it yet",
    "after_trial_run_tagged": "the trial's run has its final tags; Optuna may not have been told yet",
}

_hits: dict[str, int] = {}


def _armed(point: str) -> bool:
    """Whether the next visit of ``point`` kills the process."""
    target = os.environ.get("HARNESS_FAILPOINT", "")
    name, _, nth = target.partition(":")
    return name == point and _hits.get(point, 0) + 1 >= int(nth or 1)


def torn_copy(path: Path, point: str) -> Path:
    """``path``, or, when the next visit of ``point`` kills the process, a copy of its first half under
    the same name: what a copy cut short by the kill leaves in the store."""
    if not _armed(point):
        return path
    torn = Path(tempfile.mkdtemp(prefix="harness-torn-")) / path.name
    data = path.read_bytes()
    torn.write_bytes(data[: len(data) // 2])
    return torn


def reach(point: str) -> None:
    """Die here if ``HARNESS_FAILPOINT`` names this point (and this is its n-th visit)."""
    target = os.environ.get("HARNESS_FAILPOINT")
    if not target:
        return
    name, _, nth = target.partition(":")
    if name not in POINTS:  # a typo would make a kill test pass without killing anything
        raise ValueError(f"HARNESS_FAILPOINT={target}: unknown point; choose one of {', '.join(POINTS)}")
    if name != point:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
