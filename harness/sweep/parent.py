"""The MLflow side of a sweep: its one parent run ``sweep:<study>``, the child run of each trial, and
the runs a dead worker or a lost tracking server left RUNNING."""
from __future__ import annotations

import logging
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from harness import failpoints
from harness.errors import StoreError, mask_url
from harness.sweep import storage as sto
from harness.sweep.context import Context
from harness.tracking import store

log = logging.getLogger("harness.sweep")

PARENT_ATTR = "mlflow_parent_run_id"


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
            # A process killed between creating the run and recording it left one: adopt it.
            run_id = _find_parent(client, ctx) or _create_parent(client, ctx)
            failpoints.reach("after_parent_run_created")
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
        raise StoreError(
            f"study {ctx.study_name}: its parent run {run_id} is not in the MLflow store "
            f"{mask_url(store.tracking_uri())}; point MLFLOW_TRACKING_URI at the store the study "
            f"was started with, or choose a new --study name") from None
    if run.info.lifecycle_stage == "deleted":
        client.restore_run(run_id)


def _find_parent(client, ctx: Context) -> str | None:
    runs = client.search_runs(
        [ctx.experiment_id], max_results=1, order_by=["attributes.start_time ASC"],
        filter_string=f"tags.`optuna.study` = '{ctx.study_name}' and tags.`sweep.role` = 'parent'")
    return runs[0].info.run_id if runs else None


def _create_parent(client, ctx: Context) -> str:
    from harness.tracking.mlflow_tracker import MlflowTracker

    tags = {"mlflow.runName": f"sweep:{ctx.study_name}", "optuna.study": ctx.study_name, "sweep.role": "parent",
            "optuna.storage": sto.optuna_storage_display(ctx.storage_url),
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

    if store.tracking_server_down():  # one line now, not minutes of MLflow's retries and a traceback
        raise store.server_gone_error(f"before the parent run sweep:{ctx.study_name} could be marked "
                                       f"{status}")
    from mlflow.entities import RunTag

    client = MlflowClient()
    # log_batch, not set_tag: two commands of one sweep start together and tag the same parent run, and
    # a server's set_tag is a read then an insert (a duplicate-key error for the second); log_batch retries.
    client.log_batch(ctx.parent_run_id, tags=[RunTag("sweep.sampler", ctx.sampler),
                                              RunTag("sweep.pruner", ctx.pruner)], synchronous=True)
    if status == "RUNNING":
        client.update_run(ctx.parent_run_id, status="RUNNING")
    else:
        client.set_terminated(ctx.parent_run_id, status)


# The MLflow status an orphan run gets for its trial's final Optuna state.
ORPHAN_STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "FINISHED", TrialState.FAIL: "FAILED"}


def end_orphan_runs(ctx: Context) -> None:
    """Child runs left RUNNING, or tagged RUNNING, although their trial is over: the tracking server
    went away, or the worker died, before the run could be ended and tagged (Optuna was told; MLflow
    was not). Ended and tagged as the trial's state says."""
    from mlflow import MlflowClient

    client = MlflowClient()
    under = f"tags.mlflow.parentRunId = '{ctx.parent_run_id}'"
    runs = {r.info.run_id: r for filter_string in (f"{under} and attributes.status = 'RUNNING'",
                                                    f"{under} and tags.`optuna.state` = 'RUNNING'")
            for r in client.search_runs([ctx.experiment_id], max_results=1000, filter_string=filter_string)}
    trials = {t.number: t for t in ctx.study.get_trials(deepcopy=False)}
    for r in runs.values():
        number = r.data.tags.get("optuna.trial_number", "")
        t = trials.get(int(number)) if number.isdigit() else None
        if t is None or t.state not in ORPHAN_STATUS:
            continue  # still running somewhere (another machine's worker): not ours to end
        reason = t.user_attrs.get("failure_reason", "")
        end_run(r.info.run_id, ORPHAN_STATUS[t.state], trial_tags(t.state, reason),
                name=trial_run_name(t.number, t.state, reason))
        log.warning("trial %d is %s but its MLflow run %s was left %s (%s): ended %s", t.number,
                    t.state.name, r.info.run_id, r.info.status, reason or "its worker could not tell MLflow",
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


def trial_run_name(number: int, state: TrialState, reason: str = "") -> str:
    """``trial-7``; a pruned trial's run says so in its name, the first column of MLflow's runs table
    (its status is FINISHED like a complete one's, MLflow has no other)."""
    if state == TrialState.PRUNED:
        return f"trial-{number} ({'diverged' if reason.startswith('diverged') else 'pruned'})"
    return f"trial-{number}"


def trial_tags(state: TrialState, reason: str) -> dict[str, str]:
    """``optuna.state``; when the trial failed or diverged, ``failure_reason`` (a pruned trial did not
    fail: its run has ``stopped_early`` instead); and for any trial that did not complete, a description
    (shown at the top of its run page) saying what happened."""
    diverged = reason.startswith("diverged")
    failed = state == TrialState.FAIL or diverged
    if diverged:
        note = f"**Diverged** ({reason}). Optuna counts it PRUNED, so the sampler learns to avoid its region."
    elif state == TrialState.PRUNED:
        how = reason[len("pruned "):] if reason.startswith("pruned ") else "by the pruner"
        note = f"**Pruned** {how}: its curves stop there, and it was never tested (no `test/*`)."
    else:
        note = f"**Failed**: {reason}" if state == TrialState.FAIL and reason else ""
    return {"optuna.state": state.name, "failure_reason": reason if failed else "", "mlflow.note.content": note}


def end_run(run_id: str, status: str | None, tags: dict[str, Any], name: str | None = None) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import RunTag

    client = MlflowClient()
    items = [RunTag(k, str(v)[:5000]) for k, v in tags.items() if v not in (None, "")]
    if items:  # one request: against a tracking server each is a round trip (5-15 ms here, ~50 with a delayed ACK)
        client.log_batch(run_id, tags=items, synchronous=True)
    if name:
        client.update_run(run_id, name=name)
    if status and client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status)
