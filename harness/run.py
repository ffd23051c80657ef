"""Composes one run from a spec: the only place that wires data, model, loop, guard, tracker and
checkpoints together. ``harness.train`` calls it for one run, ``harness.sweep`` for every trial and
``analysis.ablation`` for every arm and seed."""
from __future__ import annotations

import logging
import math
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from harness.core import checkpoint as ckpt
from harness.core.data import Data, load_data
from harness.core.device import resolve_device
from harness.core.loop import Diverged, Precision, Stopped, evaluate, sanity_check, train_one_epoch
from harness.core.models import build_model, check_submodules, has_batchnorm
from harness.core.modes import Correct, get_policy
from harness.core.rng import seed_everything, set_rng_state
from harness.errors import UserError
from harness.guard import ModeGuard, ModeGuardError
from harness.spec import Spec
from harness.tracking.tracker import Tracker

log = logging.getLogger("harness.run")

EpochCallback = Callable[[int, dict], None]


@dataclass
class RunResult:
    run_id: str
    metrics: dict[str, float]  # the last epoch's train/val metrics and the final test/* metrics
    history: dict[str, list[float]] = field(default_factory=dict)  # per-epoch values, 1-based
    best: float | None = None  # best val/acc
    epochs: int = 0
    guard: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def build_optimizer(spec: Spec, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = spec.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)


@dataclass
class Parts:
    """Everything a run trains: built from the spec in a fixed order, so a seed fixes the weights."""
    device: torch.device
    data: Data
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    policy: Correct


def build(spec: Spec, device: torch.device | None = None, data: Data | None = None) -> Parts:
    device = device or resolve_device(spec.train.device)
    if spec.train.threads:
        torch.set_num_threads(spec.train.threads)
    data = data or load_data(spec.data, spec.seed, device)
    seed_everything(spec.seed, spec.train.deterministic)
    model = build_model(spec.model, data.input_shape, data.num_classes).to(device)
    if spec.train.channels_last:  # 4-d weights (convolutions) only; the same numbers up to rounding
        model = model.to(memory_format=torch.channels_last)
    policy = get_policy(spec.mode_bug, spec.model.freeze, spec.train.mc_samples)
    check_submodules(model, policy.frozen, "model.freeze" if spec.model.freeze else f"mode_bug={spec.mode_bug}")
    if spec.data.batch_size == 1 and has_batchnorm(model):
        raise UserError("data.batch_size=1: the model has BatchNorm layers, which cannot train on batches of "
                        "one example; use a batch size of 2 or more")
    if device.type == "cuda":  # autotuned convolution algorithms: faster, not bit-reproducible
        torch.backends.cudnn.benchmark = not spec.train.deterministic
    policy.precision = Precision(spec.train.amp, device)  # read by train_one_epoch and evaluate
    policy.start_run(model)  # freezes declared submodules before the optimizer sees the parameters
    return Parts(device, data, model, build_optimizer(spec, model), policy)


def run(
    spec: Spec,
    *,
    tracker: Tracker | None = None,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: dict | None = None,
    on_epoch: EpochCallback | None = None,
    resume_run_id: str | None = None,
    progress: bool = True,
    data: Data | None = None,
    system_metrics: bool | None = False,
) -> RunResult:
    """Train and validate ``spec`` as one tracked run; returns its id and numbers.

    ``tracker``: where the run is recorded (default: a new MLflow run, or the run ``resume_run_id``
    continues from its last checkpoint). ``on_epoch(epoch, metrics)`` is called after each epoch's
    metrics are logged; raising :class:`~harness.core.loop.Stopped` there ends the run early (its
    curves stay). Divergence raises :class:`~harness.core.loop.Diverged` after marking the run FAILED
    with the reason as a tag. ``system_metrics`` None: MLflow's own switch decides."""
    if tracker is None:
        from harness.tracking.mlflow_tracker import MlflowTracker

        tracker = MlflowTracker(resume_run_id)
    elif resume_run_id:
        tracker.run_id = resume_run_id
    parts = build(spec, data=data)
    start_epoch, best, history = 1, None, {}
    if resume_run_id:
        start_epoch, best, history = _restore(tracker, spec, parts)
    base_tags = {"git_commit": git_commit(), "spec_hash": spec.hash(), "torch_version": torch.__version__,
                 "device": str(parts.device), "host": platform.node(), "mode_bug": spec.mode_bug,
                 **(tags or {})}
    guard = None
    if spec.guard != "off":
        guard = ModeGuard(parts.model, frozen=parts.policy.frozen,
                          allow_stochastic_eval=parts.policy.allows_stochastic_eval, action=spec.guard)
    t0 = time.perf_counter()
    with tracker.start(experiment=spec.name, run_name=run_name, parent_run_id=parent_run_id,
                       tags=base_tags, resume=bool(resume_run_id), system_metrics=system_metrics):
        try:
            if resume_run_id:
                tracker.set_tags({"resumed_from_epoch": start_epoch - 1})
            else:
                _log_start(tracker, spec, parts)
            result = _train(spec, parts, tracker, guard, start_epoch, best, history, on_epoch, progress)
            test = evaluate(parts.model, parts.data.test, parts.device, policy=parts.policy, guard=guard,
                            prefix="test")
            if guard is not None:  # the test phase joins the last epoch's ledger and findings
                _log_guard(tracker, guard, guard.end_epoch(result.epochs))
                result.guard = guard.summary()
        except Diverged as e:
            e.args = (_divergence_reason(e, guard),)
            _record_failure(tracker, e)
            _score_diverged(tracker, parts, step=len(history.get("train/loss", [])) + 1)
            raise
        except BaseException as e:
            _record_failure(tracker, e)
            raise
        finally:
            if guard is not None:
                guard.close()
        test = {k: v for k, v in test.items() if k in ("test/loss", "test/acc")}
        tracker.log_metrics(test, step=result.epochs)
        tracker.flush()
        result.metrics.update(test)
        if spec.train.log_model:
            model = parts.model.to("cpu").eval()
            tracker.log_model(model, parts.data.example_input(2).cpu().numpy())
        result.seconds = time.perf_counter() - t0
        return result


def _divergence_reason(e: Diverged, guard: ModeGuard | None) -> str:
    """The loss went NaN; when the guard saw gradients carried over, that is the cause to name."""
    if guard is not None and "missing_zero_grad" in guard.summary():
        return (f"{e}: gradients were never cleared between steps (optimizer.zero_grad() missing: the "
                f"mode guard found missing_zero_grad), so each step used the sum of all gradients so far")
    return f"{e}; lower optimizer.lr"


def _score_diverged(tracker: Tracker, parts: Parts, step: int) -> None:
    """A diverged run is a result, not a missing one: measure the model it ended with on val and test
    (its accuracy, whatever it is). Weights that are no longer finite predict nothing: tag them, and
    the analysis scores such a run at chance level."""
    if not all(torch.isfinite(p).all() for p in parts.model.parameters()):
        tracker.set_tags({"diverged.weights": "non-finite"})
        return
    metrics = {}
    for split in ("val", "test"):
        m = evaluate(parts.model, getattr(parts.data, split), parts.device, policy=parts.policy,
                     prefix=split)
        metrics.update({k: v for k, v in m.items() if k in (f"{split}/acc", f"{split}/loss")})
    tracker.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=step)
    tracker.flush()
    tracker.set_tags({"diverged.weights": "finite"})


def _record_failure(tracker: Tracker, e: BaseException) -> None:
    """What was measured before the run ended is kept; the reason goes to a tag."""
    if isinstance(e, ModeGuardError):  # guard: raise
        tags = {"failure_reason": str(e), f"mode_guard.{e.kind}": ",".join(e.modules)}
    elif isinstance(e, Diverged):
        tags = {"failure_reason": f"diverged: {e}"}
    elif isinstance(e, Stopped):
        tags = {"stopped_early": str(e) or "stopped"}
    else:
        tags = {}
    if tracker.reachable():
        tracker.flush()
        if tags:
            tracker.set_tags(tags)


def _log_start(tracker: Tracker, spec: Spec, parts: Parts) -> None:
    tracker.log_params(spec.params())
    tracker.log_text(spec.to_yaml(), "spec.yaml")
    d = parts.data
    tracker.log_params({**{f"data.size.{k}": v for k, v in d.sizes.items()},
                        "data.num_classes": d.num_classes})
    x, y = next(iter(d.val))
    tracker.log_dataset(x[:64].cpu().numpy(), y[:64].cpu().numpy(), name=f"{d.name}-val-sample",
                        source=d.source, context="validation")
    if spec.train.sanity_check:
        problems = sanity_check(parts.model, next(iter(d.train)), parts.optimizer)
        for p in problems:
            log.warning("sanity check: %s", p)
        tracker.set_tags({"sanity_check": "; ".join(problems) or "ok"})


def _train(spec: Spec, parts: Parts, tracker: Tracker, guard: ModeGuard | None, start_epoch: int,
           best: float | None, history: dict, on_epoch: EpochCallback | None,
           progress: bool) -> RunResult:
    from tqdm.auto import tqdm

    device, model, optimizer, policy, data = (parts.device, parts.model, parts.optimizer, parts.policy,
                                              parts.data)
    epochs = spec.train.epochs
    n_batches = len(data.train)
    metrics: dict[str, float] = {}
    bar = tqdm(range(start_epoch, epochs + 1), desc=spec.name, unit="epoch", disable=not progress,
               initial=start_epoch - 1, total=epochs, leave=True)
    # Checkpoints are written here, logged as artifacts, then removed: the store keeps the one copy.
    with tempfile.TemporaryDirectory(prefix="harness-checkpoints-") as ckpt_dir:
        for epoch in bar:
            data.train.set_epoch(epoch)
            t = time.perf_counter()
            metrics = train_one_epoch(
                model, data.train, optimizer, device, epoch=epoch, policy=policy, guard=guard,
                log_every=spec.train.log_every, step_offset=(epoch - 1) * n_batches,
                on_running_loss=lambda step, v: tracker.log_metrics({"train/running_loss": v}, step),
            )
            metrics["time/train_epoch_s"] = time.perf_counter() - t
            metrics.update(evaluate(model, data.val, device, policy=policy, guard=guard, prefix="val"))
            if guard is not None:
                metrics["mode_guard/findings"] = _log_guard(tracker, guard, guard.end_epoch(epoch))
            tracker.log_metrics(metrics, step=epoch)
            tracker.flush()
            for k, v in metrics.items():
                history.setdefault(k, []).append(v)
            improved = best is None or metrics["val/acc"] > best
            best = metrics["val/acc"] if improved else best
            if spec.train.checkpoint:
                path = ckpt.save_checkpoint(Path(ckpt_dir) / "last.pt", model=model, optimizer=optimizer,
                                            epoch=epoch, spec_hash=spec.hash(), best=best, history=history)
                tracker.log_artifact(path, "checkpoints")
                if improved:
                    tracker.log_artifact(path.replace(path.with_name("best.pt")), "checkpoints")
            bar.set_postfix({"loss": f"{metrics['train/loss']:.3f}", "val/acc": f"{metrics['val/acc']:.3f}"})
            if on_epoch is not None:
                on_epoch(epoch, metrics)
    bar.close()
    return RunResult(run_id=str(tracker.run_id), metrics=dict(metrics), history=history, best=best,
                     epochs=epochs, guard=guard.summary() if guard is not None else {})


def _log_guard(tracker: Tracker, guard: ModeGuard, report: dict) -> int:
    """Tags ``mode_guard.<kind>`` (every module found so far) and the ledger; the epoch's count."""
    if report["findings"]:
        run_wide = guard.summary()
        tracker.set_tags({f"mode_guard.{k}": ",".join(run_wide[k]) for k in report["findings"]})
    tracker.log_dict({str(k): v for k, v in guard.ledger.items()}, "mode_guard/ledger.json")
    return report["count"]


def _restore(tracker: Tracker, spec: Spec, parts: Parts) -> tuple[int, float | None, dict]:
    """Load the run's ``checkpoints/last.pt`` (from any store) into the parts; next epoch to train."""
    run_id = tracker.run_id
    with tempfile.TemporaryDirectory(prefix="harness-resume-") as tmp:  # removed once loaded
        try:
            local = tracker.download_artifact("checkpoints/last.pt", tmp)
        except UserError as e:
            raise UserError(f"--resume {run_id}: no checkpoint found in that run ({e})") from None
        state = ckpt.load_checkpoint(local, map_location=parts.device)
    if state["spec_hash"] != spec.hash():
        raise UserError(f"--resume {run_id}: the checkpoint was made by a different spec "
                        f"(hash {state['spec_hash']} != {spec.hash()}); pass the same spec and overrides")
    parts.model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    if state["epoch"] >= spec.train.epochs:
        raise UserError(f"--resume {run_id}: the run already finished all {spec.train.epochs} epochs")
    return state["epoch"] + 1, state["best"], dict(state.get("history") or {})

