"""The sweep's moving parts: the context every process opens (spec, study, parent MLflow run), the
worker loop (reserve a trial, run it as a child MLflow run, prune it, tell Optuna) and the MLflow side
of stale trials. ``harness.sweep`` is the CLI around it; ``harness.study`` the Optuna side.

How a trial ends, in Optuna and in MLflow:

=====================  ================  ===========================================================
what happened          Optuna state      MLflow run
=====================  ================  ===========================================================
trained every epoch    COMPLETE          FINISHED
pruned                 PRUNED            FINISHED, tag ``stopped_early``, partial curves
diverged (NaN loss)    PRUNED            FAILED, tag ``failure_reason`` (the sampler learns from it)
crashed (exception)    FAIL              FAILED
Ctrl-C / SIGTERM       FAIL              KILLED
worker SIGKILLed       FAIL (next start  KILLED (by the next start or the RDB heartbeat)
                       or heartbeat)
tracking server gone   FAIL, queued      FAILED (by the next start: the sweep stops with one line)
=====================  ================  ===========================================================

Every child run has the tag ``optuna.state`` with the final Optuna state, and the trial the user
attributes ``mlflow_run_id``, ``epochs``, ``seconds`` and ``failure_reason``.
"""
from __future__ import annotations

import logging
import math
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from harness import stores
from harness import study as st
from harness.spec import Spec, UserError, load_spec
from harness.study import default_study_name  # noqa: F401  (harness.doctor imports it from here)

log = logging.getLogger("harness.sweep")

PARENT_ATTR = "mlflow_parent_run_id"


@dataclass
class Context:
    """What every sweep process (the main one and each worker) resolves once."""
    spec: Spec
    spec_path: str
    overrides: list[str]
    space: dict
    study: optuna.Study
    study_name: str
    storage_url: str | None
    experiment_id: str
    n_trials: int
    timeout: float | None = None
    retry_failed: bool = False
    workers: int = 1
    sampler: str = "tpe"
    pruner: str = "median"
    label: str = ""
    quiet: bool = False
    parent_run_id: str = ""
    _data: dict = field(default_factory=dict)

    def lock(self):
        return stores.storage_lock(self.storage_url)


def open_context(args, label: str = "") -> Context:
    """Load the spec, open (or create) the study and set up MLflow; user mistakes are UserErrors."""
    spec = load_spec(args.spec, args.overrides)
    space = st.distributions(spec)
    n_trials = args.n_trials
    if args.sampler == "grid":
        n_trials = min(n_trials, st.grid_size(space))
    stores.setup_mlflow()
    exp_id = stores.experiment_id(spec.name)
    storage = stores.optuna_storage(
        args.storage, args.workers, heartbeat_interval=args.heartbeat or stores.HEARTBEAT_INTERVAL_S,
        on_stale=_on_stale)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = args.study or st.default_study_name(spec)
    with stores._quiet_experimental():
        study = st.open_study(name, storage, spec, st.make_sampler(args.sampler, spec, space),
                              st.make_pruner(args.pruner, spec))
    return Context(spec=spec, spec_path=str(args.spec), overrides=list(args.overrides), space=space,
                   study=study, study_name=name, storage_url=args.storage, experiment_id=exp_id,
                   n_trials=n_trials, timeout=args.timeout, retry_failed=args.retry_failed,
                   workers=args.workers,
                   sampler=args.sampler, pruner=args.pruner, label=label, quiet=args.quiet)


# -- the parent run ---------------------------------------------------------------------------------------

def ensure_parent_run(ctx: Context) -> str:
    """The study's one parent run ``sweep:<study>``: created by whichever process comes first (under
    the storage lock), its id kept in the study's user attributes, found there by everyone else."""
    from mlflow import MlflowClient

    client = MlflowClient()
    with ctx.lock():
        run_id = ctx.study.user_attrs.get(PARENT_ATTR)
        if run_id:
            _check_parent(client, ctx, run_id)
        else:
            run_id = _create_parent(client, ctx)
            ctx.study.set_user_attr(PARENT_ATTR, run_id)
    # Storages without a lock: two processes may both have created one; the last write wins.
    winner = ctx.study.user_attrs.get(PARENT_ATTR)
    if winner != run_id:
        client.delete_run(run_id)
        run_id = winner
    ctx.parent_run_id = run_id
    return run_id


def _check_parent(client, ctx: Context, run_id: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise stores.StoreError(
            f"study {ctx.study_name}: its parent run {run_id} is not in the MLflow store "
            f"{stores.mask_url(stores.tracking_uri())}; point MLFLOW_TRACKING_URI at the store the study "
            f"was started with, or choose a new --study name") from None
    if run.info.lifecycle_stage == "deleted":
        client.restore_run(run_id)


def _create_parent(client, ctx: Context) -> str:
    from harness.tracking import MlflowTracker

    tags = {"mlflow.runName": f"sweep:{ctx.study_name}", "optuna.study": ctx.study_name,
            "optuna.storage": stores.optuna_storage_display(ctx.storage_url),
            "spec_hash": ctx.spec.hash(), "sweep.metric": ctx.spec.search.metric,
            "sweep.direction": ctx.spec.search.direction}
    run = client.create_run(ctx.experiment_id, run_name=f"sweep:{ctx.study_name}", tags=tags)
    tracker = MlflowTracker(run.info.run_id)
    # The base spec, but the searched keys as their ranges: each trial logs its own values.
    params = {k: v for k, v in ctx.spec.params().items() if k not in ctx.space}
    params.update({f"search.{k}": _describe(p) for k, p in ctx.spec.search.params.items()})
    tracker.log_params(params)
    tracker.log_text(ctx.spec.to_yaml(), "spec.yaml")
    return run.info.run_id


def _describe(p) -> str:
    if p.type == "categorical":
        return f"categorical{list(p.choices)}"
    text = f"{p.type}[{p.low:g}, {p.high:g}]"
    return text + (" log" if p.log else "") + (f" step {p.step:g}" if p.step else "")


def set_parent_status(ctx: Context, status: str) -> None:
    from mlflow import MlflowClient

    if stores.tracking_server_down():  # one line now, not minutes of MLflow's retries and a traceback
        raise stores.server_gone_error(f"before the parent run sweep:{ctx.study_name} could be marked "
                                       f"{status}")
    client = MlflowClient()
    client.set_tag(ctx.parent_run_id, "sweep.sampler", ctx.sampler)
    client.set_tag(ctx.parent_run_id, "sweep.pruner", ctx.pruner)
    if status == "RUNNING":
        client.update_run(ctx.parent_run_id, status="RUNNING")
    else:
        client.set_terminated(ctx.parent_run_id, status)


# -- stale and failed trials --------------------------------------------------------------------------------

def _on_stale(study: optuna.Study, trial: FrozenTrial) -> None:
    """A trial whose worker died (found by pid here, or by the RDB heartbeat): its MLflow run ends
    KILLED and its params are queued again (a killed trial says nothing about its params)."""
    # Heartbeat-stale trials are FAIL already and can take no attribute: the reason goes to MLflow.
    reason = trial.user_attrs.get("failure_reason") or "stale: its worker stopped sending heartbeats"
    run_id = find_trial_run(study.study_name, trial)
    if run_id:
        _end_run(run_id, "KILLED", {"optuna.state": "FAIL", "failure_reason": reason})
    st.retry(study, trial)
    log.warning("trial %d was left RUNNING (%s): marked FAIL%s, queued again with the same params",
                trial.number, reason, f", its MLflow run {run_id} KILLED" if run_id else "")


def retry_failed_trials(ctx: Context) -> int:
    """--retry-failed: queue the params of every FAIL trial not queued before; how many."""
    return sum(st.retry(ctx.study, t)
               for t in ctx.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))


def cleanup_stale(ctx: Context) -> None:
    """At start: fail the RUNNING trials of dead local workers (and heartbeat-stale ones), then end
    the MLflow runs still RUNNING of trials that are over."""
    with ctx.lock():
        for t in st.stale_trials(ctx.study):
            if st.fail_trial(ctx.study, t, st.stale_reason(t)):
                _on_stale(ctx.study, ctx.study._storage.get_trial(t._trial_id))
        st.fail_heartbeat_stale(ctx.study)
    end_orphan_runs(ctx)


# The MLflow status an orphan run gets for its trial's final Optuna state.
ORPHAN_STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "FINISHED", TrialState.FAIL: "FAILED"}


def end_orphan_runs(ctx: Context) -> None:
    """Child runs left RUNNING although their trial is over: the tracking server went away before the
    worker could end them (Optuna was told; MLflow could not be). Ended as the trial's state says."""
    from mlflow import MlflowClient

    client = MlflowClient()
    runs = client.search_runs(
        [ctx.experiment_id], max_results=1000,
        filter_string=f"tags.mlflow.parentRunId = '{ctx.parent_run_id}' and attributes.status = 'RUNNING'")
    trials = {t.number: t for t in ctx.study.get_trials(deepcopy=False)}
    for r in runs:
        number = r.data.tags.get("optuna.trial_number", "")
        t = trials.get(int(number)) if number.isdigit() else None
        if t is None or t.state not in ORPHAN_STATUS:
            continue  # still running somewhere (another machine's worker): not ours to end
        reason = t.user_attrs.get("failure_reason", "")
        _end_run(r.info.run_id, ORPHAN_STATUS[t.state],
                 {"optuna.state": t.state.name, "failure_reason": reason})
        log.warning("trial %d is %s but its MLflow run %s was left RUNNING (%s): ended %s", t.number,
                    t.state.name, r.info.run_id, reason or "its worker could not reach MLflow",
                    ORPHAN_STATUS[t.state])


def find_trial_run(study_name: str, trial: FrozenTrial) -> str | None:
    """The MLflow run of a trial: from its user attributes, else by its tags."""
    from mlflow import MlflowClient

    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id:
        return run_id
    client = MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        exps, filter_string=f"tags.`optuna.study` = '{study_name}' and "
                            f"tags.`optuna.trial_number` = '{trial.number}'", max_results=1)
    return runs[0].info.run_id if runs else None


def _end_run(run_id: str, status: str | None, tags: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    for k, v in tags.items():
        if v not in (None, ""):
            client.set_tag(run_id, k, str(v)[:5000])
    if status and client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status)


# -- the worker loop -------------------------------------------------------------------------------------

@dataclass
class Outcome:
    state: TrialState
    value: float | None
    epochs: int
    seconds: float
    run_id: str | None
    reason: str = ""


def run_worker(ctx: Context, on_trial: Callable[[FrozenTrial, Outcome], None] | None = None) -> int:
    """Run trials until the study has ``n_trials`` (or --timeout). Exit status: 0, or 1 after
    :data:`MAX_CONSECUTIVE_FAILURES` crashes in a row."""
    from harness.sweep import MAX_CONSECUTIVE_FAILURES

    worker = st.this_worker(ctx.label)
    t0 = time.monotonic()
    failures = 0
    while ctx.timeout is None or time.monotonic() - t0 < ctx.timeout:
        trial = st.reserve(ctx.study, ctx.space, ctx.n_trials, ctx.lock, worker, _on_stale)
        if trial is None:
            break
        outcome = run_trial(ctx, trial)
        frozen = ctx.study._storage.get_trial(trial._trial_id)
        if on_trial is not None:
            on_trial(frozen, outcome)
        failures = failures + 1 if outcome.state == TrialState.FAIL else 0
        if failures >= MAX_CONSECUTIVE_FAILURES:
            log.error("%d trials in a row failed (last: %s); stopping this worker", failures,
                      outcome.reason)
            return 1
    return 0


def run_trial(ctx: Context, trial: optuna.Trial) -> Outcome:
    """Train one trial as a child MLflow run; report each epoch to the pruner; tell Optuna."""
    import mlflow

    from harness.loop import Diverged
    from harness.run import Stopped, run

    metric, n = ctx.spec.search.metric, trial.number
    tags = {"optuna.study": ctx.study_name, "optuna.trial_number": n, "optuna.state": "RUNNING",
            "optuna.storage": stores.optuna_storage_display(ctx.storage_url)}
    last_epoch = int(trial.params.get("train.epochs", ctx.spec.train.epochs))
    seen: dict[str, Any] = {"epochs": 0, "run_id": None}

    def on_epoch(epoch: int, metrics: dict) -> None:
        if seen["run_id"] is None:
            seen["run_id"] = mlflow.active_run().info.run_id
            trial.set_user_attr("mlflow_run_id", seen["run_id"])
        seen["epochs"] = epoch
        if metric not in metrics:
            raise UserError(f"search.metric {metric!r} is not a per-epoch metric of this run; "
                            f"choose one of {sorted(k for k in metrics if '/' in k)}")
        value = float(metrics[metric])
        if not math.isfinite(value):
            raise Diverged(f"{metric} is {value} at epoch {epoch}")
        trial.report(value, epoch)
        # The last epoch is never pruned: it is already paid for, and a whole curve teaches more.
        if epoch < last_epoch and trial.should_prune():
            raise Stopped(f"pruned by the {ctx.pruner} pruner at epoch {epoch}")

    t0 = time.perf_counter()
    state, value, reason = TrialState.FAIL, None, ""
    retry_params = False
    interrupted: BaseException | None = None
    beat = _Heartbeat(ctx.study, trial)
    try:
        spec = ctx.spec.with_overrides(trial.params)
        result = run(spec, run_name=f"trial-{n}", parent_run_id=ctx.parent_run_id, tags=tags,
                     on_epoch=on_epoch, progress=False, data=_data(ctx, spec), system_metrics=False)
        seen["run_id"] = result.run_id
        value = float(result.metrics[metric])
        if math.isfinite(value):
            state = TrialState.COMPLETE
        else:
            state, reason = TrialState.PRUNED, f"diverged: {metric} is {value}"
    except Stopped as e:
        state, reason = TrialState.PRUNED, str(e)
    except Diverged as e:
        state, reason = TrialState.PRUNED, f"diverged: {e}"
    except stores.TrackingServerGone as e:
        # The tracking server is gone: tell Optuna (its own storage), queue the params again and stop
        # with one line; the next start ends this trial's MLflow run (end_orphan_runs).
        reason, retry_params, interrupted = f"StoreError: {e}", True, e
    except UserError as e:
        reason = f"{type(e).__name__}: {e}"
        interrupted = e  # the same mistake would fail every trial: stop the sweep with one line
    except KeyboardInterrupt as e:
        reason = "interrupted"
        interrupted = e
    except Exception as e:  # a crash in one trial (e.g. out of memory) must not end the sweep
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if _store_busy(e):
            # SQLite's lock held past MLflow's 20 s busy timeout: not the params' fault, run them again.
            retry_params = True
            log.warning("trial %d: the MLflow store was busy (%s); its params are queued again", n, e)
        else:
            log.error("trial %d crashed:\n%s", n, traceback.format_exc())
    finally:
        beat.stop()
    seconds = time.perf_counter() - t0
    mlflow_gone = isinstance(interrupted, stores.TrackingServerGone)
    run_id = seen["run_id"] or (None if mlflow_gone else _last_run_of(ctx, n))
    try:
        for key, v in {"mlflow_run_id": run_id or "", "epochs": seen["epochs"],
                       "seconds": round(seconds, 2), "failure_reason": reason}.items():
            trial.set_user_attr(key, v)
        ctx.study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
    except (optuna.exceptions.UpdateFinishedTrialError, ValueError, RuntimeError) as e:
        # Another process failed this trial as stale while it ran (a heartbeat lost to a long stall).
        log.warning("trial %d could not be told %s (%s); its MLflow run keeps the result",
                    n, state.name, str(e).splitlines()[0])
        state = ctx.study._storage.get_trial(trial._trial_id).state
    if run_id and not mlflow_gone:
        _end_run(run_id, "KILLED" if reason == "interrupted" else None,
                 {"optuna.state": state.name, "failure_reason": reason})
    if state == TrialState.FAIL and (retry_params or reason == "interrupted"):
        # Interrupted (Ctrl-C, SIGTERM) or the store was busy: nothing was learned about the params.
        st.retry(ctx.study, ctx.study._storage.get_trial(trial._trial_id))
    if interrupted is not None:
        raise interrupted
    return Outcome(state, value if state == TrialState.COMPLETE else None, seen["epochs"], seconds,
                   run_id, reason)


def _store_busy(e: BaseException) -> bool:
    text = f"{e} {e.__cause__ or ''}".lower()
    return "database is locked" in text or "database table is locked" in text


def _last_run_of(ctx: Context, number: int) -> str | None:
    """The run a trial started before its first epoch ended (it failed early), if any."""
    import mlflow

    last = mlflow.last_active_run()
    if last is not None and last.data.tags.get("optuna.study") == ctx.study_name \
            and last.data.tags.get("optuna.trial_number") == str(number):
        return last.info.run_id
    return None


def _data(ctx: Context, spec: Spec):
    """Trials that share the data settings share the loaded data (one load per worker)."""
    from harness.data import load_data
    from harness.run import resolve_device

    key = (spec.data.model_dump_json(), spec.seed, spec.train.device)
    if key not in ctx._data:
        ctx._data.clear()
        ctx._data[key] = load_data(spec.data, spec.seed, resolve_device(spec.train.device))
    return ctx._data[key]


class _Heartbeat:
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
