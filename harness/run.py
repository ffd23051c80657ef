"""Composes one run from a spec: the only place that wires data, model, loop, guard, tracking and
checkpoints together. ``harness.train`` calls it for one run, ``harness.sweep`` for every trial and
``analysis.ablation`` for every arm and seed."""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import random
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from harness import checkpoint as ckpt
from harness import stores
from harness.cli import Terminated, sigterm_as_interrupt  # noqa: F401 (Terminated: public here)
from harness.data import Data, load_data
from harness.guard import ModeGuard, ModeGuardError
from harness.loop import Diverged, evaluate, sanity_check, train_one_epoch
from harness.models import build_model
from harness.modes import Correct, get_policy
from harness.spec import Spec, UserError
from harness.tracking import MlflowTracker, Tracker

log = logging.getLogger("harness.run")

EpochCallback = Callable[[int, dict], None]


class Stopped(Exception):
    """Raised by an ``on_epoch`` callback to end a run early on purpose (e.g. a pruned trial).
    The MLflow run keeps its partial curves and ends FINISHED with tag ``stopped_early``."""



@dataclass
class RunResult:
    run_id: str
    metrics: dict[str, float]  # the last epoch's train/val metrics and the final test/* metrics
    history: dict[str, list[float]] = field(default_factory=dict)  # per-epoch values, 1-based
    best: float | None = None  # best val/acc
    epochs: int = 0
    guard: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0


# -- environment -----------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else MPS, else CPU. Resolved once, at the entry point."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device={name}: CUDA is not available on this machine; use train.device=auto")
    return dev


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


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
    for name in spec.model.freeze:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise UserError(f"model.freeze: {type(model).__name__} has no submodule {name!r} "
                            f"(lenet and mlp have 'features' and 'classifier')") from None
    policy = get_policy(spec.mode_bug, spec.model.freeze, spec.train.mc_samples)
    policy.start_run(model)  # freezes declared submodules before the optimizer sees the parameters
    return Parts(device, data, model, build_optimizer(spec, model), policy)


# -- the MLflow run's life ---------------------------------------------------------------------------

@contextlib.contextmanager
def mlflow_run(*, experiment_id: str, run_name: str | None = None, parent_run_id: str | None = None,
               run_id: str | None = None, tags: dict | None = None,
               system_metrics: bool = False) -> Iterator[str]:
    """An MLflow run that always ends in a final state: FINISHED, FAILED on an exception, KILLED on
    Ctrl-C or SIGTERM. Never left RUNNING (short of SIGKILL, which the sweep cleans up, or a tracking
    server that is gone: the run stays RUNNING there for --resume)."""
    import mlflow

    with sigterm_as_interrupt():
        active = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id,
                                  run_name=None if run_id else run_name, parent_run_id=parent_run_id,
                                  nested=parent_run_id is not None, tags=tags,
                                  log_system_metrics=system_metrics)
        status = "FAILED"
        try:
            yield active.info.run_id
            status = "FINISHED"
        except Stopped:
            status = "FINISHED"
            raise
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            _end_run(status)


@contextlib.contextmanager
def _no_http_retries() -> Iterator[None]:
    keys = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _end_run(status: str) -> None:
    """``mlflow.end_run``; when a failed run's tracking server is gone, end it here at once (the
    server keeps it RUNNING until ``--resume``) instead of retrying for minutes over the first error."""
    import mlflow

    if status != "FINISHED" and stores.tracking_server_down():
        with _no_http_retries():
            try:
                mlflow.end_run(status)
            except Exception:  # the run is off this process's stack; the server could not be told
                pass
        return
    mlflow.end_run(status)


@contextlib.contextmanager
def _tracking_server_gone_is_clear() -> Iterator[dict]:
    """A run whose tracking server stopped answering (after MLflow's own retries, ~4 min by default:
    a server back within that window is not noticed) ends with one clear
    :class:`stores.TrackingServerGone`."""
    seen: dict = {}
    try:
        yield seen
    except (UserError, Stopped, Diverged):
        raise
    except Exception as e:
        if not stores.tracking_server_down():
            raise
        run_id = seen.get("run_id")
        if run_id is None:
            raise stores.server_gone_error("before the run started") from e
        raise stores.server_gone_error(
            f"during run {run_id} (what it logged before is kept there)",
            then=f"continue it with --resume {run_id} (a sweep: run the same command again)") from e


# -- one run ---------------------------------------------------------------------------------------

def run(
    spec: Spec,
    *,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: dict | None = None,
    on_epoch: EpochCallback | None = None,
    resume_run_id: str | None = None,
    progress: bool = True,
    data: Data | None = None,
    system_metrics: bool | None = None,
) -> RunResult:
    """Train and validate ``spec`` as one MLflow run; returns its id and numbers.

    ``on_epoch(epoch, metrics)`` is called after each epoch's metrics are logged; raising
    :class:`Stopped` there ends the run early (its curves stay). Divergence raises
    :class:`~harness.loop.Diverged` after marking the run FAILED with the reason as a tag."""
    import mlflow

    stores.setup_mlflow()
    parts = build(spec, data=data)
    device, model, optimizer, policy = parts.device, parts.model, parts.optimizer, parts.policy
    start_epoch, best, history = 1, None, {}
    if resume_run_id:
        start_epoch, best, history = _restore(resume_run_id, spec, parts)
    exp_id = stores.experiment_id(spec.name)
    base_tags = {
        "git_commit": git_commit(),
        "spec_hash": spec.hash(),
        "torch_version": torch.__version__,
        "device": str(device),
        "host": platform.node(),
        "mode_bug": spec.mode_bug,
        **(tags or {}),
    }
    base_tags = {k: str(v) for k, v in base_tags.items()}  # a tracking server takes strings only
    if system_metrics is None:
        system_metrics = not os.environ.get("PYTEST_CURRENT_TEST")
    guard = None
    if spec.guard != "off":
        guard = ModeGuard(model, frozen=policy.frozen, allow_stochastic_eval=policy.allows_stochastic_eval,
                          action=spec.guard)
    t0 = time.perf_counter()
    with _tracking_server_gone_is_clear() as seen, \
            mlflow_run(experiment_id=exp_id, run_name=run_name, parent_run_id=parent_run_id,
                       run_id=resume_run_id, tags=None if resume_run_id else base_tags,
                       system_metrics=system_metrics) as run_id:
        seen["run_id"] = run_id
        tracker = MlflowTracker(run_id)
        try:
            if not resume_run_id:
                _log_start(tracker, spec, parts)
            else:
                tracker.set_tags({"resumed_from_epoch": start_epoch - 1})
            result = _train(spec, parts, tracker, guard, run_id, start_epoch, best, history,
                            on_epoch, progress)
            test = evaluate(model, parts.data.test, device, policy=policy, guard=guard, prefix="test")
            if guard is not None:  # the test phase joins the last epoch's ledger and findings
                _log_guard(tracker, guard, guard.end_epoch(result.epochs))
                result.guard = guard.summary()
        except ModeGuardError as e:  # guard: raise
            tracker.flush()
            tracker.set_tags({"failure_reason": str(e), f"mode_guard.{e.kind}": ",".join(e.modules)})
            raise
        except Diverged as e:
            tracker.flush()
            tracker.set_tags({"failure_reason": f"diverged: {e}"})
            raise
        except Stopped as e:
            tracker.flush()
            tracker.set_tags({"stopped_early": str(e) or "stopped"})
            raise
        except BaseException:
            if not stores.tracking_server_down():
                tracker.flush()  # what was measured before the failure is kept
            raise
        finally:
            if guard is not None:
                guard.close()
        test = {k: v for k, v in test.items() if k in ("test/loss", "test/acc")}
        tracker.log_metrics(test, step=result.epochs)
        tracker.flush()
        result.metrics.update(test)
        if spec.train.log_model:
            _log_model(model, parts.data)
        result.seconds = time.perf_counter() - t0
        return result


def _log_start(tracker: Tracker, spec: Spec, parts: Parts) -> None:
    import mlflow

    tracker.log_params(spec.params())
    tracker.log_text(spec.to_yaml(), "spec.yaml")
    d = parts.data
    tracker.log_params({f"data.size.{k}": v for k, v in d.sizes.items()})
    try:
        x, y = next(iter(d.val))
        ds = mlflow.data.from_numpy(x[:64].cpu().numpy(), targets=y[:64].cpu().numpy(),
                                    name=f"{d.name}-val-sample")
        mlflow.log_input(ds, context="validation")
    except Exception as e:  # the dataset input is a nicety: never fail a run for it
        log.debug("dataset input not logged: %s", e)
    if spec.train.sanity_check:
        problems = sanity_check(parts.model, next(iter(d.train)), parts.optimizer)
        for p in problems:
            log.warning("sanity check: %s", p)
        tracker.set_tags({"sanity_check": "; ".join(problems) or "ok"})


def _train(spec: Spec, parts: Parts, tracker: Tracker, guard: ModeGuard | None, run_id: str,
           start_epoch: int, best: float | None, history: dict, on_epoch: EpochCallback | None,
           progress: bool) -> RunResult:
    from tqdm.auto import tqdm

    device, model, optimizer, policy, data = (parts.device, parts.model, parts.optimizer, parts.policy,
                                              parts.data)
    epochs = spec.train.epochs
    n_batches = len(data.train)
    ckpt_dir = Path(stores.ARTIFACTS_DIR) / ".checkpoints" / run_id
    metrics: dict[str, float] = {}
    bar = tqdm(range(start_epoch, epochs + 1), desc=spec.name, unit="epoch", disable=not progress,
               initial=start_epoch - 1, total=epochs, leave=True)
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
            path = ckpt.save_checkpoint(ckpt_dir / "last.pt", model=model, optimizer=optimizer, epoch=epoch,
                                        spec_hash=spec.hash(), best=best, history=history)
            tracker.log_artifact(path, "checkpoints")
            if improved:
                tracker.log_artifact(_copy(path, ckpt_dir / "best.pt"), "checkpoints")
        bar.set_postfix({"loss": f"{metrics['train/loss']:.3f}", "val/acc": f"{metrics['val/acc']:.3f}"})
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    bar.close()
    return RunResult(run_id=run_id, metrics=dict(metrics), history=history, best=best, epochs=epochs,
                     guard=guard.summary() if guard is not None else {})


def _log_guard(tracker: Tracker, guard: ModeGuard, report: dict) -> int:
    """Tags ``mode_guard.<kind>`` (every module found so far) and the ledger; the epoch's count."""
    if report["findings"]:
        run_wide = guard.summary()
        tracker.set_tags({f"mode_guard.{k}": ",".join(run_wide[k]) for k in report["findings"]})
    tracker.log_dict({str(k): v for k, v in guard.ledger.items()}, "mode_guard/ledger.json")
    return report["count"]


def _copy(src: Path, dst: Path) -> Path:
    """Copy atomically (a kill mid-copy leaves the previous ``dst`` whole)."""
    tmp = dst.with_suffix(dst.suffix + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return dst


def _restore(run_id: str, spec: Spec, parts: Parts) -> tuple[int, float | None, dict]:
    """Load the run's ``checkpoints/last.pt`` (from any store) into the parts; next epoch to train."""
    import mlflow
    from mlflow.exceptions import MlflowException

    # No download progress bar: a refused resume must leave exactly one line on stderr.
    bar = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        with tempfile.TemporaryDirectory(prefix="harness-resume-") as tmp:  # removed once loaded
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoints/last.pt",
                                                        dst_path=tmp)
            state = ckpt.load_checkpoint(local, map_location=parts.device)
    except MlflowException as e:
        raise UserError(f"--resume {run_id}: no checkpoint found in that run "
                        f"({str(e).splitlines()[0][:100]})") from None
    finally:
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar
    if state["spec_hash"] != spec.hash():
        raise UserError(f"--resume {run_id}: the checkpoint was made by a different spec "
                        f"(hash {state['spec_hash']} != {spec.hash()}); pass the same spec and overrides")
    parts.model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    ckpt.set_rng_state(state["rng"])
    if state["epoch"] >= spec.train.epochs:
        raise UserError(f"--resume {run_id}: the run already finished all {spec.train.epochs} epochs")
    return state["epoch"] + 1, state["best"], dict(state.get("history") or {})


def _log_model(model: torch.nn.Module, data: Data) -> None:
    import mlflow

    example = data.example_input(2).cpu()
    model_cpu = model.to("cpu").eval()
    with warnings_quiet():
        # Explicit requirements: MLflow's inference of them imports the model in a subprocess (~6 s).
        mlflow.pytorch.log_model(model_cpu, name="model", input_example=example.numpy(),
                                 serialization_format="pickle",
                                 pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])


@contextlib.contextmanager
def warnings_quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
