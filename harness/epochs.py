"""The epochs of a tracked run: train, validate, log the metrics, checkpoint, log what the mode guard
saw, call back. ``harness.run`` composes the run around it."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from harness.core import checkpoint as ckpt
from harness.core.loop import evaluate, train_one_epoch
from harness.tracking.tracker import Tracker, param_str
from harness.uploads import Uploads

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
                 on_epoch: EpochCallback | None, progress: bool, uploads: Uploads) -> RunResult:
    """Epochs ``point.start_epoch .. spec.train.epochs``; the result holds every epoch's history. What
    the epochs log goes to the store through ``uploads``, every ``train.upload_every_s`` seconds; the
    last epoch's with the run's end (``harness.run``), after the test phase joins its ledger."""
    from tqdm.auto import tqdm

    tracker = log.tracker
    model, optimizer, data = parts.model, parts.optimizer, parts.data
    epochs, best, history = spec.train.epochs, point.best, point.history
    n_batches = len(data.train)
    metrics: dict[str, float] = {k: v[-1] for k, v in history.items() if v}
    bar = tqdm(range(point.start_epoch, epochs + 1), desc=spec.name, unit="epoch", disable=not progress,
               initial=point.start_epoch - 1, total=epochs, leave=True)
    for epoch in bar:
        data.train.set_epoch(epoch)
        t = time.perf_counter()
        metrics = train_one_epoch(
            model, data.train, optimizer, parts.device, epoch=epoch, policy=parts.policy, guard=guard,
            log_every=spec.train.log_every, step_offset=(epoch - 1) * n_batches,
            on_running_loss=lambda step, v: log({"train/running_loss": v}, step),
        )
        metrics["time/train_epoch_s"] = time.perf_counter() - t
        metrics.update(evaluate(model, data.val, parts.device, policy=parts.policy, guard=guard, prefix="val"))
        if guard is not None:
            metrics["mode_guard/findings"] = uploads.guard_epoch(epoch)
        log(metrics, step=epoch)
        for k, v in metrics.items():
            history.setdefault(k, []).append(v)
        improved = best is None or metrics["val/acc"] > best
        best = metrics["val/acc"] if improved else best
        if spec.train.checkpoint:
            uploads.checkpoint(_checkpoint(spec, parts, uploads.folder, epoch, best, history), improved)
        if epoch < epochs and uploads.due():
            uploads.send()
        bar.set_postfix({"loss": f"{metrics['train/loss']:.3f}", "val/acc": f"{metrics['val/acc']:.3f}"})
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    bar.close()
    return RunResult(run_id=str(tracker.run_id), metrics=dict(metrics), history=history, best=best,
                     epochs=epochs, guard=guard.summary() if guard is not None else {})


def _checkpoint(spec: Spec, parts: Parts, folder: Path, epoch: int, best: float | None, history: dict) -> Path:
    """``last.pt`` of this epoch, written locally (atomically); ``harness.uploads`` sends it."""
    return ckpt.save_checkpoint(folder / "last.pt", model=parts.model, optimizer=parts.optimizer,
                                epoch=epoch, spec_hash=spec.hash(), best=best, history=history,
                                spec={k: param_str(v) for k, v in spec.params().items()},
                                grads=parts.policy.carries_gradients, scaler=_scaler(parts))


def _scaler(parts: Parts):
    precision = getattr(parts.policy, "precision", None)
    return precision.scaler if precision is not None else None
