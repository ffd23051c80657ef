"""Composes one run from a spec: the only place that wires data, model, loop, guard, tracker and
checkpoints together. ``harness.train`` calls it for one run, ``harness.sweep`` for every trial and
``analysis.ablation`` for every arm and seed."""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from harness import failpoints
from harness.cli import MAX_NAME, signals_deferred
from harness.core.data import Data, load_data
from harness.core.device import apply_threads, busy_at_start, others_at_start, resolve_device, wait_policy
from harness.core.loop import Diverged, Precision, Stopped, evaluate, sanity_check
from harness.core.models import build_model, check_submodules, has_batchnorm
from harness.core.modes import Correct, get_policy
from harness.core.rng import seed_everything
from harness.epochs import EpochCallback, MetricLog, RunResult, train_epochs
from harness.errors import UserError
from harness.guard import ModeGuard, ModeGuardError
from harness.locks import Busy, run_lock
from harness.resume import ResumePoint, resume_point
from harness.spec import Spec
from harness.tracking.tracker import Tracker
from harness.uploads import Uploads

log = logging.getLogger("harness.run")


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    """The commit of the code this process runs, read once (it loaded its modules when it started; a
    subprocess per trial or arm otherwise)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def default_run_name(spec: Spec) -> str:
    """``digits-lenet/lenet-s0``, ``digits-lenet/lenet-no_eval-s3``: what the run is, at a glance."""
    bug = f"-{spec.mode_bug}" if spec.mode_bug != "none" else ""
    tail = f"{bug}-s{spec.seed}"
    return f"{spec.name}/{spec.model.arch}"[:MAX_NAME - len(tail)] + tail  # a long factory path is cut


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
    threads: int = 1  # torch's CPU threads, as harness.core.device's policy chose them


def build(spec: Spec, device: torch.device | None = None, data: Data | None = None) -> Parts:
    device = device or resolve_device(spec.train.device)
    threads = apply_threads(spec.train.threads, spec.train.deterministic)
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
    return Parts(device, data, model, build_optimizer(spec, model), policy, threads)


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
    on_tested: Callable[[RunResult], None] | None = None,
) -> RunResult:
    """Train and validate ``spec`` as one tracked run; returns its id and numbers.

    ``tracker``: where the run is recorded (default: a new MLflow run, or the run ``resume_run_id``,
    continued as :mod:`harness.resume` says). ``on_epoch(epoch, metrics)`` is called after each
    epoch's metrics are logged; raising :class:`~harness.core.loop.Stopped` there ends the run early
    (its curves stay). Divergence raises :class:`~harness.core.loop.Diverged` after marking the run
    FAILED with the reason as a tag. ``system_metrics`` None: MLflow's own switch decides.
    ``on_tested(result)`` is called once the test metrics are in the store, before the model is logged. Only one
    process at a time trains a given run on a machine (a second ``--resume`` is refused)."""
    if tracker is None:
        from harness.tracking.mlflow_tracker import MlflowTracker

        tracker = MlflowTracker(resume_run_id)
    elif resume_run_id:
        tracker.run_id = resume_run_id
    with contextlib.ExitStack() as held:
        if resume_run_id:
            held.enter_context(_only_trainer(resume_run_id))
        parts = build(spec, data=data)
        point = ResumePoint(start_epoch=1)
        if resume_run_id:
            point = resume_point(tracker, spec, parts.model, parts.optimizer, parts.policy.precision.scaler)
            if point.threads and spec.train.threads in (None, "auto"):  # the count it started with
                parts.threads = apply_threads(point.threads)
        guard = None
        if spec.guard != "off":
            guard = ModeGuard(parts.model, frozen=parts.policy.frozen,
                              allow_stochastic_eval=parts.policy.allows_stochastic_eval, action=spec.guard)
        base_tags = {"git_commit": git_commit(), "spec_hash": spec.hash(), "torch_version": torch.__version__,
                     "device": str(parts.device), "host": platform.node(), "mode_bug": spec.mode_bug,
                     **(tags or {})}
        with tracker.start(experiment=spec.name, run_name=run_name or default_run_name(spec),
                           parent_run_id=parent_run_id,
                           tags=base_tags, resume=bool(resume_run_id), system_metrics=system_metrics):
            if not resume_run_id:
                held.enter_context(_only_trainer(tracker.run_id))
            return _tracked(spec, parts, tracker, guard, point, on_epoch, progress, on_tested)


def _tracked(spec: Spec, parts: Parts, tracker: Tracker, guard: ModeGuard | None, point: ResumePoint,
             on_epoch: EpochCallback | None, progress: bool,
             on_tested: Callable[[RunResult], None] | None = None) -> RunResult:
    """Everything a run does between the start and the end of its tracked run."""
    t0 = time.perf_counter()
    log = MetricLog(tracker, point.logged)
    with Uploads(tracker, guard, spec.train.upload_every_s) as uploads:
        try:
            if point.resumed:
                tracker.set_tags({"resumed_from_epoch": point.start_epoch - 1, "resumed_from": point.source,
                                  **({"resume.changes": "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in
                                                                 point.changes.items())} if point.changes else {})})
                if point.changes and point.has_params:
                    tracker.log_text(spec.to_yaml(), "spec.yaml")
            if not point.has_params:  # a new run, or one killed before it logged them
                with signals_deferred(), tracker.in_background():  # sent while the first epoch trains
                    _log_start(tracker, spec, parts)
            result = train_epochs(spec, parts, log, guard, point, on_epoch, progress, uploads)
            failpoints.reach("after_last_epoch")
            test = evaluate(parts.model, parts.data.test, parts.device, policy=parts.policy, guard=guard,
                            prefix="test")
            if guard is not None:  # the test phase joins the last epoch's ledger and findings
                uploads.guard_epoch(result.epochs)
                result.guard = guard.summary()
            test = {k: v for k, v in test.items() if k in ("test/loss", "test/acc")}
            log(test, step=result.epochs)
            uploads.send()  # the run's end: every metric, the ledger, the last checkpoints
        except Diverged as e:
            e.args = (_divergence_reason(e, guard),)
            _record_failure(uploads, e)
            if guard is not None and guard.summary():  # what the guard saw before the loss blew up
                tracker.set_tags({f"mode_guard.{k}": ",".join(v) for k, v in guard.summary().items()})
            _score_diverged(log, parts, step=len(point.history.get("train/loss", [])) + 1)
            raise
        except BaseException as e:
            _record_failure(uploads, e)
            raise
        finally:
            if guard is not None:
                guard.close()
    result.metrics.update(test)
    if on_tested is not None:
        result.seconds = time.perf_counter() - t0
        on_tested(result)
    failpoints.reach("during_model_log")
    if spec.train.log_model and not point.has_model:
        model = parts.model.to("cpu").eval()
        tracker.log_model(model, parts.data.example_input(2).cpu().numpy(), params=spec.params())
    failpoints.reach("before_run_end")
    result.seconds = time.perf_counter() - t0
    return result


@contextlib.contextmanager
def _only_trainer(run_id: str):
    try:
        with run_lock(run_id):
            yield
    except Busy as e:
        raise UserError(f"--resume {run_id}: the run is being trained by another process on this machine "
                        f"({e}); wait for it to end, or stop it first") from None


def _divergence_reason(e: Diverged, guard: ModeGuard | None) -> str:
    """The loss went NaN; when the guard saw gradients carried over, that is the cause to name."""
    if guard is not None and "missing_zero_grad" in guard.summary():
        return (f"{e}: gradients were never cleared between steps (optimizer.zero_grad() missing: the "
                f"mode guard found missing_zero_grad), so each step used the sum of all gradients so far")
    return f"{e}; lower optimizer.lr"


def _score_diverged(log: MetricLog, parts: Parts, step: int) -> None:
    """A diverged run is a result, not a missing one: measure the model it ended with on val and test
    (its accuracy, whatever it is). Weights that are no longer finite predict nothing: tag them, and
    the analysis scores such a run at chance level."""
    tracker = log.tracker
    if not all(torch.isfinite(p).all() for p in parts.model.parameters()):
        tracker.set_tags({"diverged.weights": "non-finite"})
        return
    metrics = {}
    for split in ("val", "test"):
        m = evaluate(parts.model, getattr(parts.data, split), parts.device, policy=parts.policy,
                     prefix=split)
        metrics.update({k: v for k, v in m.items() if k in (f"{split}/acc", f"{split}/loss")})
    log({k: v for k, v in metrics.items() if math.isfinite(v)}, step=step)
    tracker.flush()
    tracker.set_tags({"diverged.weights": "finite"})


def _record_failure(uploads: Uploads, e: BaseException) -> None:
    """What was measured before the run ended is kept (sent now, when the store answers); the reason
    goes to a tag."""
    if isinstance(e, ModeGuardError):  # guard: raise
        tags = {"failure_reason": str(e), f"mode_guard.{e.kind}": ",".join(e.modules)}
    elif isinstance(e, Diverged):
        tags = {"failure_reason": f"diverged: {e}"}
    elif isinstance(e, Stopped):
        tags = {"stopped_early": str(e) or "stopped"}
    else:
        tags = {}
    uploads.send_on_failure()
    if tags and uploads.tracker.reachable():
        uploads.tracker.set_tags(tags)


def _log_start(tracker: Tracker, spec: Spec, parts: Parts) -> None:
    d = parts.data
    tags = {}
    try:
        if spec.train.sanity_check:
            problems = sanity_check(parts.model, next(iter(d.train)), parts.optimizer)
            for p in problems:
                log.warning("sanity check: %s", p)
            tags["sanity_check"] = "; ".join(problems) or "ok"
    finally:  # a model that fails its first step still leaves a run with its params
        # One request for every param and tag: against a tracking server each is a round trip.
        tracker.log_params({**spec.params(), **{f"data.size.{k}": v for k, v in d.sizes.items()},
                            "data.num_classes": d.num_classes, "train.threads_used": parts.threads,
                            "train.omp_wait_policy": wait_policy(),
                            "train.cores_busy_at_start": busy_at_start(),
                            "train.others_running_at_start": others_at_start()}, tags)
    tracker.log_text(spec.to_yaml(), "spec.yaml")
    splits = []
    for split, context in (("val", "validation"), ("test", "test")):
        batches = getattr(d, split)
        whole = getattr(batches, "split", None)  # in memory: the whole split; else its first batch
        x, y = (whole.x, whole.y) if whole is not None else next(iter(batches))
        splits.append((f"{d.name}-{split}" + ("" if whole else "-sample"), x.cpu().numpy(), y.cpu().numpy(), context))
    tracker.log_datasets(splits, source=d.source)
