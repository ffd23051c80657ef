"""The Optuna side of a sweep: the study, the trial slots that several workers share, stale trials of
dead workers, the heartbeat of a running trial, and the ranking of finished trials. No MLflow here (``harness.sweep.parent`` and
``harness.sweep.worker`` link the two).

What counts toward ``--n-trials``: trials that finished with a result, COMPLETE and PRUNED (a diverged
trial is PRUNED). FAIL trials (a crash, a killed worker) do not count, so a study always ends with
``--n-trials`` informative trials; RUNNING trials count as reserved while their worker lives.
"""
from __future__ import annotations

import logging
import math
import os
import platform
import threading
import warnings
from collections import Counter
from typing import Any, Callable, ContextManager

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from harness import failpoints
from harness.errors import StoreError
from harness.spec import Spec

log = logging.getLogger("harness.sweep")

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
RESERVED = COUNTED + (TrialState.RUNNING,)


def default_study_name(spec: Spec) -> str:
    """Same spec and overrides -> same study, so re-running a command resumes it."""
    return f"{spec.name}-{spec.hash()[:8]}"


def open_study(name: str, storage, spec: Spec, sampler: BaseSampler,
               pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """Create the study or join it; a study made for another spec is refused (its trials would not be
    comparable)."""
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                direction=spec.search.direction, load_if_exists=True)
    if study.direction.name.lower() != spec.search.direction:
        raise StoreError(f"--study {name}: that study {study.direction.name.lower()}s, the spec's "
                         f"search.direction is {spec.search.direction}; use another --study name")
    attrs = study.user_attrs
    if "spec_hash" not in attrs:
        study.set_user_attr("spec_hash", spec.hash())
        study.set_user_attr("spec_name", spec.name)
        study.set_user_attr("metric", spec.search.metric)
        study.set_user_attr("spec_yaml", spec.to_yaml())
    elif attrs["spec_hash"] != spec.hash():
        raise StoreError(f"--study {name}: that study was made for another spec (hash "
                         f"{attrs['spec_hash']}, this one is {spec.hash()}); pass the same spec and "
                         f"overrides to resume it, or choose a new --study name")
    if study.metric_names != [spec.search.metric]:  # optuna-dashboard shows it, not "Objective 0"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([spec.search.metric])
    return study


def counts(study: optuna.Study) -> Counter:
    """Trials per state name (COMPLETE, PRUNED, FAIL, RUNNING, WAITING)."""
    return Counter(t.state.name for t in study.get_trials(deepcopy=False))


def n_counted(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=COUNTED))


# -- workers and stale trials ---------------------------------------------------------------------------

def this_worker(label: str = "") -> dict[str, Any]:
    """Who runs a trial (its user attribute ``worker``): host, pid and the process start time, so a
    reused pid is not mistaken for the worker. ``harness.doctor`` reads the same record."""
    import psutil

    return {"host": platform.node(), "pid": os.getpid(),
            "started": round(psutil.Process().create_time(), 2), "label": label}


def worker_alive(worker: dict[str, Any] | None) -> bool | None:
    """Whether a recorded worker is alive: True/False on this host, None when it cannot be told from
    here (another host, or no worker recorded)."""
    import psutil

    if not worker or worker.get("host") != platform.node() or not worker.get("pid"):
        return None
    try:
        proc = psutil.Process(int(worker["pid"]))
        started = float(worker.get("started") or proc.create_time())
        return abs(proc.create_time() - started) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, ValueError):
        return False
    except psutil.AccessDenied:
        return None


def stale_trials(study: optuna.Study, locked: bool) -> list[FrozenTrial]:
    """RUNNING trials whose worker on this machine is gone (killed, crashed). Trials of workers on
    other machines are left to the RDB heartbeat.

    ``locked``: the caller holds the storage's cross-process lock. Trials are asked for, and their
    worker recorded, inside that lock, so a RUNNING trial with no worker found under it was asked for
    by a process that died before it could record itself (the lock died with it): stale too."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if worker_alive(t.user_attrs.get("worker")) is False
            or (locked and "worker" not in t.user_attrs)]


def stale_reason(trial: FrozenTrial) -> str:
    w = trial.user_attrs.get("worker")
    if not w:
        return "stale: the process that asked for it died before recording itself"
    return f"stale: its worker {w.get('host')}:{w.get('pid')} is gone"


def fail_trial(study: optuna.Study, trial: FrozenTrial, reason: str) -> bool:
    """Mark a RUNNING trial FAIL with a reason; False if another process finished it first."""
    try:
        # The reason first: a finished trial's attributes can no longer be written.
        optuna.Trial(study, trial._trial_id).set_user_attr("failure_reason", reason)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Trial n failed with value None": the reason is recorded
        return study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True).state == TrialState.FAIL


MAX_RETRIES = 3  # params that kill their worker every time are not queued forever
ASKED_WITH = {"mlflow_run_id": "", "failure_reason": ""}  # user attributes every trial holds, empty at first


def retried_numbers(study: optuna.Study) -> set[int]:
    """Numbers of the trials already queued again (Optuna's retry records them in the new trial)."""
    return {n for t in study.get_trials(deepcopy=False)
            for n in t.system_attrs.get("retry_history", [])}


def retry(study: optuna.Study, trial: FrozenTrial) -> bool:
    """Queue a FAIL trial's params again (Optuna's own retry callback), unless already queued."""
    if not trial.params or trial.number in retried_numbers(study):
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)(study, trial)
    return True


def reserve(study: optuna.Study, space: dict[str, BaseDistribution], n_trials: int,
            lock: Callable[[], ContextManager], worker: dict[str, Any],
            on_stale: Callable[[optuna.Study, FrozenTrial], None], locked: bool = True) -> optuna.Trial | None:
    """The next trial for this worker, or None when ``n_trials`` are finished or reserved.

    Counting and asking happen under the storage's lock, so concurrent workers never overshoot; stale
    trials (dead local workers; heartbeat-stale ones on RDB) are failed first and handed to
    ``on_stale``. The trial's params (the spec overrides) are sampled here, in ``trial.params``."""
    with lock():
        for t in stale_trials(study, locked):
            if fail_trial(study, t, stale_reason(t)):
                on_stale(study, study._storage.get_trial(t._trial_id))
        fail_heartbeat_stale(study)
        if len(study.get_trials(deepcopy=False, states=RESERVED)) >= n_trials:
            return None
        with warnings.catch_warnings():
            # "Heartbeat ... supposed to be used with Study.optimize": the sweep beats itself.
            warnings.filterwarnings("ignore", message=".*Heartbeat.*", category=UserWarning)
            trial = study.ask(fixed_distributions=space)
        failpoints.reach("after_trial_asked")
        # Inside the lock: until it is written, another worker could take the trial for stale. (The
        # worker writes ASKED_WITH itself, in the background while the trial starts.)
        trial.set_user_attr("worker", worker)
    return trial


def fail_heartbeat_stale(study: optuna.Study) -> None:
    """RDB storages: fail the trials whose heartbeat stopped; the storage's callback handles each."""
    storage = study._storage
    if getattr(storage, "get_heartbeat_interval", lambda: None)():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)


def finished_value(trial: FrozenTrial) -> float | None:
    """The value a trial is ranked by: its result, or for a pruned one its last reported value."""
    if trial.state == TrialState.COMPLETE:
        return trial.value
    if trial.intermediate_values:
        return trial.intermediate_values[max(trial.intermediate_values)]
    return None


def best_trials(study: optuna.Study, k: int = 5) -> list[FrozenTrial]:
    """The ``k`` best COMPLETE trials, best first."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and not math.isnan(t.value)]
    done.sort(key=lambda t: t.value, reverse=study.direction.name == "MAXIMIZE")  # type: ignore[arg-type]
    return done[:k]


def fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def override_line(params: dict[str, Any]) -> str:
    """``optimizer.lr=0.0123 model.dropout=0.2``: paste after a spec path on the command line."""
    def one(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return f"{v:.6g}"
        return str(v)

    return " ".join(f"{k}={one(v)}" for k, v in params.items())


class Heartbeat:
    """Optuna's heartbeat for RDB storages during an ask-and-tell trial (optimize() does it itself)."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial):
        storage = study._storage
        interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
        self._stop = threading.Event()
        self._thread = None
        if interval:
            def beat() -> None:
                while True:
                    try:
                        storage.record_heartbeat(trial._trial_id)
                    except Exception as e:  # a dropped connection: keep trying, the trial goes on
                        log.warning("heartbeat for trial %d failed: %s", trial.number, e)
                    if self._stop.wait(interval):
                        return

            self._thread = threading.Thread(target=beat, daemon=True, name=f"heartbeat-{trial.number}")
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
