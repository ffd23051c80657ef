"""The worker loop of a sweep: reserve a trial, run it as a child MLflow run, report each epoch to the
pruner, tell Optuna; and what happens to the trials of workers that died.

How a trial ends, in Optuna and in MLflow:

=====================  ================  ===========================================================
what happened          Optuna state      MLflow run
=====================  ================  ===========================================================
trained every epoch    COMPLETE          FINISHED
pruned                 PRUNED            FINISHED, named ``trial-<n> (pruned)``, tag ``stopped_early``,
                                         partial curves, no test/*
diverged (NaN loss)    PRUNED            FAILED, named ``trial-<n> (diverged)``, tag ``failure_reason``
                                         (the sampler learns from it)
crashed (exception)    FAIL              FAILED
Ctrl-C / SIGTERM       FAIL              KILLED
worker SIGKILLed       FAIL (next start  KILLED (by the next start or the RDB heartbeat)
                       or heartbeat)
tracking server gone   FAIL, queued      FAILED (by the next start: the sweep stops with one line)
=====================  ================  ===========================================================

Every child run has the tag ``optuna.state`` with the final Optuna state, and the trial the user
attributes ``mlflow_run_id``, ``epochs``, ``seconds``, ``failure_reason`` (failed or diverged) and
``stopped_early`` (pruned).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from harness import failpoints
from harness.errors import StoreError, TrackingServerGone, UserError, disk_problem
from harness.spec import Spec
from harness.sweep import parent
from harness.sweep import storage as sto
from harness.sweep import study as st
from harness.sweep.context import Context, data_key
from harness.tracking.sender import Sender

log = logging.getLogger("harness.sweep")

MAX_CONSECUTIVE_FAILURES = 3  # crashes (not divergence) in a row: a bug, not bad luck; stop the worker


def on_stale(study: optuna.Study, trial: FrozenTrial) -> None:
    """A trial whose worker died (found by pid here, or by the RDB heartbeat): its MLflow run ends
    KILLED and its params are queued again (a killed trial says nothing about its params)."""
    # Heartbeat-stale trials are FAIL already and can take no attribute: the reason goes to MLflow.
    reason = trial.user_attrs.get("failure_reason") or "stale: its worker stopped sending heartbeats"
    run_id = parent.find_trial_run(study.study_name, trial)
    if run_id:
        # Named as a failed trial: a kill while its end was told may have renamed it "(pruned)" already.
        parent.end_run(run_id, "KILLED", {"optuna.state": "FAIL", "failure_reason": reason},
                       name=parent.trial_run_name(trial.number, TrialState.FAIL))
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
        for t in st.stale_trials(ctx.study, sto.locks_across_processes(ctx.storage_url)):
            if st.fail_trial(ctx.study, t, st.stale_reason(t)):
                on_stale(ctx.study, ctx.study._storage.get_trial(t._trial_id))
        st.fail_heartbeat_stale(ctx.study)
    parent.end_orphan_runs(ctx)


@dataclass
class Outcome:
    state: TrialState
    value: float | None
    epochs: int
    seconds: float
    run_id: str | None
    trial: FrozenTrial  # as the storage holds it once told (no read-back on a database)
    reason: str = ""


def run_worker(ctx: Context, on_trial: Callable[[FrozenTrial, Outcome], None] | None = None) -> int:
    """Run trials until the study has ``n_trials`` (or --timeout). Exit status: 0, or 1 after
    :data:`MAX_CONSECUTIVE_FAILURES` crashes in a row."""
    worker = st.this_worker(ctx.label)
    t0 = time.monotonic()
    failures = 0
    while ctx.timeout is None or time.monotonic() - t0 < ctx.timeout:
        trial = st.reserve(ctx.study, ctx.space, ctx.n_trials, ctx.lock, worker, on_stale,
                           locked=sto.locks_across_processes(ctx.storage_url))
        if trial is None:
            break
        outcome = run_trial(ctx, trial)
        if on_trial is not None:
            on_trial(outcome.trial, outcome)
        failures = failures + 1 if outcome.state == TrialState.FAIL else 0
        if failures >= MAX_CONSECUTIVE_FAILURES:
            log.error("%d trials in a row failed (last: %s); stopping this worker", failures,
                      outcome.reason)
            return 1
    return 0


def run_trial(ctx: Context, trial: optuna.Trial) -> Outcome:
    """Train one trial as a child MLflow run; report each epoch to the pruner; tell Optuna."""
    from harness.core.loop import Diverged, Stopped
    from harness.run import run
    from harness.tracking.mlflow_tracker import MlflowTracker

    metric, n = ctx.spec.search.metric, trial.number
    tags = {"optuna.study": ctx.study_name, "optuna.trial_number": n, "optuna.state": "RUNNING",
            "optuna.storage": sto.optuna_storage_display(ctx.storage_url)}
    last_epoch = int(trial.params.get("train.epochs", ctx.spec.train.epochs))
    seen: dict[str, Any] = {"epochs": 0}
    tracker: MlflowTracker | None = None
    # The trial's Optuna writes that nothing reads before its end (the empty attributes every trial holds,
    # the run id, the reports no pruner reads) go out on a thread of their own, in order, while it trains:
    # each is a transaction (2-7 ms on PostgreSQL). Its end waits for them; a kill leaves a prefix.
    writes = Sender(f"optuna-trial-{n}")
    with writes.background():
        for key, v in st.ASKED_WITH.items():
            writes(trial.set_user_attr, key, v)

    def on_epoch(epoch: int, metrics: dict) -> None:
        if metric not in metrics:
            raise UserError(f"search.metric {metric!r} is not a per-epoch metric of this run; "
                            f"choose one of {sorted(k for k in metrics if '/' in k)}")
        value = float(metrics[metric])
        # The last epoch is never pruned: it is already paid for, and a whole curve teaches more.
        prunable = epoch < last_epoch and ctx.pruner != "none"
        with writes.background() if not prunable else contextlib.nullcontext():
            if seen["epochs"] == 0:
                writes(trial.set_user_attr, "mlflow_run_id", tracker.run_id)
                seen["run_id"] = tracker.run_id
            seen["epochs"] = epoch
            if not math.isfinite(value):
                raise Diverged(f"{metric} is {value} at epoch {epoch}")
            writes(trial.report, value, epoch)  # with a pruner: after the writes before it
        # (should_prune reads the trial back from the storage: a query per epoch, for no pruner too)
        if prunable and trial.should_prune():
            raise Stopped(f"pruned by the {ctx.pruner} pruner at epoch {epoch}")

    created_name = parent.trial_run_name(n, TrialState.RUNNING)
    t0 = time.perf_counter()
    state, value, reason = TrialState.FAIL, None, ""
    retry_params = False
    interrupted: BaseException | None = None
    beat = st.Heartbeat(ctx.study, trial)
    try:
        # A model per trial costs a dozen requests to a tracking server (MLflow links it to every
        # metric): trials keep their checkpoints, and the best params' harness.train line logs one.
        spec = ctx.spec.with_overrides({**trial.params, **({} if ctx.log_models else {"train.log_model": False})})
        tracker = MlflowTracker()
        result = run(spec, tracker=tracker, run_name=created_name,
                     parent_run_id=ctx.parent_run_id, tags=tags, on_epoch=on_epoch, progress=False,
                     data=_data(ctx, spec), system_metrics=None)
        writes.wait()  # a write that failed fails the trial as it would have in its epoch
        value = float(result.metrics[metric])
        if math.isfinite(value):
            state = TrialState.COMPLETE
        else:
            state, reason = TrialState.PRUNED, f"diverged: {metric} is {value}"
    except Stopped as e:
        state, reason = TrialState.PRUNED, str(e)
    except Diverged as e:
        state, reason = TrialState.PRUNED, f"diverged: {e}"
    except TrackingServerGone as e:
        # The tracking server is gone: tell Optuna (its own storage), queue the params again and stop
        # with one line; the next start ends this trial's MLflow run (end_orphan_runs).
        reason, retry_params, interrupted = f"StoreError: {e}", True, e
    except UserError as e:
        reason = f"{type(e).__name__}: {e}"
        interrupted = e  # the same mistake would fail every trial: stop the sweep with one line
    except KeyboardInterrupt as e:
        reason = "interrupted"
        interrupted = e
    except optuna.exceptions.UpdateFinishedTrialError as e:
        # Another worker failed this trial as stale while it ran (its heartbeat lost in a long stall, such
        # as a database restart) and queued its params again: stop here, in one line.
        reason = f"failed as stale by another worker while it ran ({str(e).splitlines()[0]})"
        log.warning("trial %d: %s", n, reason)
    except Exception as e:  # a crash in one trial (e.g. out of memory) must not end the sweep
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        full = disk_problem(e)
        if full:
            # A full or read-only disk fails every trial alike: stop with one line; its params run again
            # once there is room (the next start mends what could not be written now).
            reason, retry_params, interrupted = f"disk: {full}", True, StoreError(full)
        elif _store_busy(e):
            # SQLite's lock held past MLflow's 20 s busy timeout: not the params' fault, run them again.
            retry_params = True
            log.warning("trial %d: the MLflow store was busy (%s); its params are queued again", n, e)
        else:
            log.error("trial %d crashed:\n%s", n, traceback.format_exc())
    finally:
        writes.settle(quietly=True)  # before the trial's end is written; ended on an error of its own
        beat.stop()
    seconds = time.perf_counter() - t0
    mlflow_gone = isinstance(interrupted, TrackingServerGone)
    run_id = tracker.run_id if tracker is not None else None
    tagged = Sender(f"mlflow-trial-{n}")  # the run's final tags, sent while Optuna is told

    def tag_run(state: TrialState) -> None:
        name = parent.trial_run_name(n, state, reason)  # renamed only when it says more (a rename: 2 requests)
        parent.end_run(run_id, "KILLED" if reason == "interrupted" else None, parent.trial_tags(state, reason),
                       name=name if name != created_name else None)
        failpoints.reach("after_trial_run_tagged")

    planned = state
    if run_id and not mlflow_gone:
        # Optuna's writes and this request go to different servers: at once, not one after the other. A
        # kill before Optuna is told leaves a run tagged with a state its trial never got: the next start
        # fails the trial as stale and tags its run FAIL (on_stale), as it does an untagged one.
        with tagged.background():
            tagged(tag_run, planned)
    try:
        try:
            pruned = state == TrialState.PRUNED and not reason.startswith("diverged")
            attrs = {"mlflow_run_id": run_id or "", "epochs": seen["epochs"], "seconds": round(seconds, 2),
                     "failure_reason": "" if pruned else reason, "stopped_early": reason if pruned else ""}
            # What the trial already holds (st.ASKED_WITH since it was asked for, the run id since epoch 1)
            # is not written again, nor an empty stopped_early: each attribute is a transaction of its own
            # on a database storage.
            held = {**st.ASKED_WITH, "mlflow_run_id": seen.get("run_id", ""), "stopped_early": ""}
            for key, v in attrs.items():
                if key not in held or held[key] != v:
                    trial.set_user_attr(key, v)
            failpoints.reach("before_trial_told")
            told = ctx.study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
            failpoints.reach("after_trial_told")
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError, RuntimeError) as e:
            # Another process failed this trial as stale while it ran (a heartbeat lost to a long stall).
            log.warning("trial %d could not be told %s (%s); its MLflow run keeps the result",
                        n, state.name, str(e).splitlines()[0])
            told = ctx.study._storage.get_trial(trial._trial_id)
            state = told.state
        tagged.wait()
    finally:
        tagged.settle(quietly=True)  # the thread let go; if Optuna's side raised, its error is the one to report
    if run_id and not mlflow_gone and state != planned:
        tag_run(state)  # the state the trial really ended in
    if state == TrialState.FAIL and (retry_params or reason == "interrupted"):
        # Interrupted (Ctrl-C, SIGTERM) or the store was busy: nothing was learned about the params.
        st.retry(ctx.study, told)
    if interrupted is not None:
        raise interrupted
    return Outcome(state, value if state == TrialState.COMPLETE else None, seen["epochs"], seconds,
                   run_id, told, reason)


def _store_busy(e: BaseException) -> bool:
    text = f"{e} {e.__cause__ or ''}".lower()
    return "database is locked" in text or "database table is locked" in text


def _data(ctx: Context, spec: Spec):
    """Trials that share the data settings share the loaded data (one load per worker)."""
    from harness.core.data import load_data
    from harness.core.device import resolve_device

    key = data_key(spec)
    if key not in ctx._data:
        ctx._data.clear()
        ctx._data[key] = load_data(spec.data, spec.seed, resolve_device(spec.train.device))
    return ctx._data[key]
