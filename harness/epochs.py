"""The epochs of a tracked run: train, validate, log the metrics, checkpoint, log what the mode guard
saw, call back. ``harness.run`` composes the run around it."""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from harness import failpoints
from harness.core import checkpoint as ckpt
from harness.core.loop import evaluate, train_one_epoch
from harness.tracking.tracker import Tracker, param_str

if TYPE_CHECKING:
    from harness.guard import ModeGuard
    from harness.resume import ResumePoint
    from harness.run import Parts
    from harness.spec import Spec

EpochCallback = Callable[[int, dict], None]
# What every epoch logs (step = epoch); on CUDA also train/peak_mem_mb and val/peak_mem_mb.
EPOCH_METRICS = ("train/loss", "train/acc", "val/loss", "val/acc", "val/seconds", "val/autograd_mb",
                 "time/train_epoch_s", "mode_guard/findings", "train/peak_mem_mb", "val/peak_mem_mb")


@dataclass
class RunResult:
    run_id: str
    metrics: dict[str, float]  # the last epoch's train/val metrics and the final test/* metrics
    history: dict[str, list[float]] = field(default_factory=dict)  # per-epoch values, 1-based
    best: float | None = None  # best val/acc
    epochs: int = 0
    guard: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0


class MetricLog:
    """Logs metrics to the tracker, except the steps the run already holds: a resumed run retrains the
    epochs after its checkpoint, whose numbers it logged before it stopped (per key, up to its last
    step), and logs each step once."""

    def __init__(self, tracker: Tracker, logged: dict[str, int] | None = None):
        self.tracker, self.logged = tracker, dict(logged or {})

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        new = {k: v for k, v in metrics.items() if step > self.logged.get(k, 0)}
        if new:
            self.tracker.log_metrics(new, step)


def train_epochs(spec: Spec, parts: Parts, log: MetricLog, guard: ModeGuard | None, point: ResumePoint,
                 on_epoch: EpochCallback | None, progress: bool) -> RunResult:
    """Epochs ``point.start_epoch .. spec.train.epochs``; the result holds every epoch's history."""
    from tqdm.auto import tqdm

    tracker = log.tracker
    model, optimizer, data = parts.model, parts.optimizer, parts.data
    epochs, best, history = spec.train.epochs, point.best, point.history
    n_batches = len(data.train)
    metrics: dict[str, float] = {k: v[-1] for k, v in history.items() if v}
    bar = tqdm(range(point.start_epoch, epochs + 1), desc=spec.name, unit="epoch", disable=not progress,
               initial=point.start_epoch - 1, total=epochs, leave=True)
    # Checkpoints are written here, logged as artifacts, then removed: the store keeps the one copy.
    with tempfile.TemporaryDirectory(prefix="harness-checkpoints-") as ckpt_dir:
        for epoch in bar:
            data.train.set_epoch(epoch)
            t = time.perf_counter()
            metrics = train_one_epoch(
                model, data.train, optimizer, parts.device, epoch=epoch, policy=parts.policy, guard=guard,
                log_every=spec.train.log_every, step_offset=(epoch - 1) * n_batches,
                on_running_loss=lambda step, v: log({"train/running_loss": v}, step),
            )
            metrics["time/train_epoch_s"] = time.perf_counter() - t
            metrics.update(evaluate(model, data.val, parts.device, policy=parts.policy, guard=guard,
                                    prefix="val"))
            if guard is not None:
                metrics["mode_guard/findings"] = log_guard(tracker, guard, guard.end_epoch(epoch), epoch)
            log(metrics, step=epoch)
            tracker.flush()
            failpoints.reach("after_epoch_metrics")
            for k, v in metrics.items():
                history.setdefault(k, []).append(v)
            improved = best is None or metrics["val/acc"] > best
            best = metrics["val/acc"] if improved else best
            if spec.train.checkpoint:
                _checkpoint(spec, parts, tracker, Path(ckpt_dir), epoch, best, history, improved)
            bar.set_postfix({"loss": f"{metrics['train/loss']:.3f}", "val/acc": f"{metrics['val/acc']:.3f}"})
            if on_epoch is not None:
                on_epoch(epoch, metrics)
    bar.close()
    return RunResult(run_id=str(tracker.run_id), metrics=dict(metrics), history=history, best=best,
                     epochs=epochs, guard=guard.summary() if guard is not None else {})


def _checkpoint(spec: Spec, parts: Parts, tracker: Tracker, folder: Path, epoch: int, best: float | None,
                history: dict, improved: bool) -> None:
    """``last.pt`` every epoch, ``best.pt`` on improvement. A copy torn by a kill is found on resume (it
    does not load) and the older whole one is used."""
    path = ckpt.save_checkpoint(folder / "last.pt", model=parts.model, optimizer=parts.optimizer,
                                epoch=epoch, spec_hash=spec.hash(), best=best, history=history,
                                spec={k: param_str(v) for k, v in spec.params().items()},
                                grads=parts.policy.carries_gradients, scaler=_scaler(parts))
    tracker.log_artifact(failpoints.torn_copy(path, "mid_checkpoint_upload"), "checkpoints")
    failpoints.reach("mid_checkpoint_upload")
    if improved:
        tracker.log_artifact(path.replace(path.with_name("best.pt")), "checkpoints")
    failpoints.reach("after_checkpoint")


def log_guard(tracker: Tracker, guard: ModeGuard, report: dict, epoch: int) -> int:
    """Tags ``mode_guard.<kind>`` (every module found so far) and this epoch's page of the mode ledger,
    ``mode_guard/ledger/epoch-NNNN.json``; returns the epoch's count of findings."""
    if report["findings"]:
        run_wide = guard.summary()
        tracker.set_tags({f"mode_guard.{k}": ",".join(run_wide[k]) for k in report["findings"]})
    tracker.log_dict(guard.ledger.get(epoch, {}), f"mode_guard/ledger/epoch-{epoch:04d}.json")
    return report["count"]


def _scaler(parts: Parts):
    precision = getattr(parts.policy, "precision", None)
    return precision.scaler if precision is not None else None
