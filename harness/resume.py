"""Continuing a run that stopped (``--resume RUN_ID``): from its last checkpoint, else its best, else
from the start — whichever is whole — with the numbers an uninterrupted run would have logged.

Any point works because a run is deterministic given its checkpoint (model, optimizer, RNG states and
module modes): the epochs retrained after the checkpoint produce what they produced before the process
died, and whatever the run already logged (per metric key, up to its last step) is not logged again.
A changed spec is refused when the change alters the numbers, naming the fields; more epochs and
changes to what is logged or watched are accepted and recorded in the tag ``resume.changes``.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field

from harness.core import checkpoint as ckpt
from harness.errors import CheckpointError, UserError
from harness.spec import Spec
from harness.tracking.tracker import Tracker, param_str

CHECKPOINTS = ("checkpoints/last.pt", "checkpoints/best.pt")  # newest first
# Spec keys a resume may change: they decide how long, what is logged and what is watched, never what
# the epochs already trained computed.
FREE_TO_CHANGE = frozenset({
    "name", "train.epochs", "guard", "train.log_every", "train.log_model", "train.checkpoint", "train.upload_every_s",
    "train.sanity_check", "data.root", "data.download", "data.num_workers",
})


@dataclass
class ResumePoint:
    start_epoch: int
    best: float | None = None
    history: dict = field(default_factory=dict)
    logged: dict[str, int] = field(default_factory=dict)  # per metric key, the last step already logged
    has_model: bool = False  # the final model is logged already (killed after logging it)
    source: str = "the start"
    threads: int | None = None  # torch's threads when the run started (param train.threads_used)
    resumed: bool = False  # a run that existed (False: a new run)
    has_params: bool = False  # its params are logged already
    changes: dict[str, tuple[str, str]] = field(default_factory=dict)


def resume_point(tracker: Tracker, spec: Spec, model, optimizer, scaler=None) -> ResumePoint:
    """Load the newest whole checkpoint of ``tracker``'s run into ``model`` and ``optimizer`` (nothing
    when there is none: the run starts over, as it started the first time) and say where to go on."""
    run_id = tracker.run_id
    try:
        snap = tracker.snapshot()
    except Exception:
        raise UserError(f"--resume {run_id}: no such run in the store MLFLOW_TRACKING_URI points at; check "
                        f"it and the run id") from None
    state, source, torn = _newest_checkpoint(tracker)
    old = {k: str(v) for k, v in (state.get("spec") or {}).items()} if state else {}
    old = old or {k: v for k, v in snap.params.items()}
    changes = _changes(old, spec)
    if not old and state and state["spec_hash"] != spec.hash():  # a checkpoint from before specs were kept
        raise UserError(f"--resume {run_id}: the checkpoint was made by a different spec (hash "
                        f"{state['spec_hash']} != {spec.hash()}); pass the same spec and overrides")
    fixed = sorted(k for k in changes if k not in FREE_TO_CHANGE)
    if fixed:
        shown = "; ".join(f"{k}: {changes[k][0]} -> {changes[k][1]}" for k in fixed[:4])
        raise UserError(f"--resume {run_id}: the run was trained with other values of {', '.join(fixed)} "
                        f"({shown}); these change its numbers: pass the spec and overrides it started with")
    point = ResumePoint(start_epoch=1, logged=dict(snap.last_steps), changes=changes, has_model=snap.has_model,
                        resumed=True, has_params=bool(snap.params))
    if str(snap.params.get("train.threads_used", "")).isdigit():
        point.threads = int(snap.params["train.threads_used"])
    if state is not None:
        epoch = state["epoch"]
        if epoch > spec.train.epochs:
            raise UserError(f"--resume {run_id}: its checkpoint is at epoch {epoch}, past train.epochs="
                            f"{spec.train.epochs}; pass train.epochs={epoch} or more")
        if epoch == spec.train.epochs and snap.status == "FINISHED" and "test/acc" in snap.last_steps:
            raise UserError(f"--resume {run_id}: the run already finished all {epoch} epochs; to train "
                            f"on, pass train.epochs={epoch + 1} or more")
        ckpt.restore(state, model, optimizer, where=f"--resume {run_id}: {source}", scaler=scaler)
        point.start_epoch, point.best = epoch + 1, state["best"]
        point.history, point.source = dict(state.get("history") or {}), source
    if torn:
        point.source += f" ({torn} was torn and skipped)"
    return point


def _newest_checkpoint(tracker: Tracker) -> tuple[dict | None, str, str]:
    """The newest checkpoint that loads whole, its name, and the name of a newer one that did not
    (a kill while it was being copied into the store tears it)."""
    torn = ""
    with tempfile.TemporaryDirectory(prefix="harness-resume-") as tmp:  # removed once loaded
        for name in CHECKPOINTS:
            try:
                local = tracker.download_artifact(name, tmp)
            except UserError:
                continue  # not logged (yet)
            try:
                return ckpt.load_checkpoint(local), name, torn
            except CheckpointError as e:
                if not e.torn:  # tampered with, or not ours: refuse rather than look elsewhere
                    raise CheckpointError(f"--resume {tracker.run_id}: {name}: {str(e).split(': ', 1)[1]}") \
                        from None
                torn = torn or name
    return None, "the start", torn


def _changes(old: dict[str, str], spec: Spec) -> dict[str, tuple[str, str]]:
    """The spec keys whose value differs from what the run was started with (as the store keeps them)."""
    new = {k: param_str(v) for k, v in spec.params().items()}
    return {k: (old[k], v) for k, v in new.items() if k in old and old[k] != v}
