"""The end of a sweep: one line per finished trial while it runs, then the table of the best trials,
the best params as a ready-to-paste override line, the commands to browse it all, and the same summary
on the parent MLflow run (its description, progress curves, the best trial tagged, the trials table as
CSV, Optuna's plots as PNG)."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from harness.sweep import storage as sto
from harness.sweep import study as st
from harness.tracking import links, store

log = logging.getLogger("harness.sweep")

PLOTS = ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values")


def trial_line(t: FrozenTrial, outcome, metric: str, label: str = "") -> str:
    """``trial   7 COMPLETE val/acc=0.9722  optimizer.lr=0.0123 ...  20 epochs 1.9s``"""
    value = st.finished_value(t)
    shown = f"{value:.4f}" if value is not None else "-"
    why = f"  ({outcome.reason})" if outcome.reason and t.state != TrialState.COMPLETE else ""
    who = f"[{label}] " if label else ""
    return (f"{who}trial {t.number:>3} {t.state.name:<8} {metric}={shown}  "
            f"{st.override_line(t.params)}  {outcome.epochs} epoch{'s' * (outcome.epochs != 1)} "
            f"{outcome.seconds:.1f}s{why}")


def epochs_of(t: FrozenTrial) -> int:
    return int(t.user_attrs.get("epochs") or len(t.intermediate_values))


def summarize(ctx) -> dict[str, Any]:
    """The numbers of the study as it stands now (other machines may still add trials)."""
    study = ctx.study
    trials = study.get_trials(deepcopy=False)
    by_state = st.counts(study)
    counted = [t for t in trials if t.state in st.COUNTED]
    epochs_run = sum(epochs_of(t) for t in counted)
    epochs_full = sum(int(t.params.get("train.epochs", ctx.spec.train.epochs)) for t in counted)
    best = st.best_trials(study, 5)
    return {"trials": trials, "counts": by_state, "finished": len(counted), "best": best,
            "epochs_run": epochs_run, "epochs_full": epochs_full,
            "saved": 1 - epochs_run / epochs_full if epochs_full else 0.0}


def print_summary(ctx, s: dict[str, Any], out=print) -> None:
    metric = ctx.spec.search.metric
    c = s["counts"]
    out("")
    out(f"study {ctx.study_name}: {s['finished']} of {ctx.n_trials} trials finished "
        f"({c.get('COMPLETE', 0)} complete, {c.get('PRUNED', 0)} pruned; {c.get('FAIL', 0)} failed, "
        f"{c.get('RUNNING', 0)} running elsewhere); {s['epochs_run']} of {s['epochs_full']} epochs trained "
        f"({s['saved']:.0%} saved by pruning)")
    best: list[FrozenTrial] = s["best"]
    if not best:
        out("no trial completed yet: nothing to recommend")
    else:
        import pandas as pd

        keys = list(ctx.space)
        table = pd.DataFrame([{"trial": t.number, metric: f"{t.value:.4f}",
                               **{k: st.fmt_value(t.params.get(k)) for k in keys},
                               "epochs": epochs_of(t), "mlflow run": t.user_attrs.get("mlflow_run_id", "")}
                              for t in best])
        out(f"best trials ({ctx.spec.search.direction} {metric}):")
        for line in table.to_string(index=False).splitlines():
            out("  " + line)
        top = best[0]
        out(f"best params (trial {top.number}, {metric} {top.value:.4f}), ready to paste:")
        out(f"  {st.override_line(top.params)}")
        line = " ".join([ctx.spec_path, *ctx.overrides, st.override_line(top.params)])
        out(f"  python -m harness.train {line}")
    out("browse:")
    out(f"  {store.mlflow_ui_command()}; parent run sweep:{ctx.study_name}, id {ctx.parent_run_id}:")
    out(f"  {links.absolute(links.run_path(ctx.experiment_id, ctx.parent_run_id))}")
    out(f"  {sto.optuna_dashboard_command(ctx.storage_url)}")


def log_to_parent(ctx, s: dict[str, Any]) -> None:
    """The sweep on its parent run (rewritten by every sweep command that ends, so the last one to
    finish leaves the complete picture): the description (``harness.sweep.describe``), the counts and
    the best trial as tags, the best trial's run tagged ``sweep.best``, the progress curves, the trials
    table and Optuna's plots; and notes in Optuna's dashboard."""
    from mlflow import MlflowClient
    from mlflow.entities import RunTag

    from harness.sweep import describe

    client = MlflowClient()
    rid, metric, c = ctx.parent_run_id, ctx.spec.search.metric, s["counts"]
    tags = {"mlflow.note.content": describe.parent_note(ctx, s), "sweep.n_trials": ctx.n_trials,
            "sweep.trials_complete": c.get("COMPLETE", 0), "sweep.trials_pruned": c.get("PRUNED", 0),
            "sweep.trials_failed": c.get("FAIL", 0),
            "sweep.epochs_trained": f"{s['epochs_run']} of {s['epochs_full']} ({s['saved']:.0%} saved by pruning)"}
    best_run = ""
    if s["best"]:
        top = s["best"][0]
        best_run = str(top.user_attrs.get("mlflow_run_id", ""))
        tags.update({"best.trial_number": top.number, "best.value": f"{top.value:.6g}",
                     "best.params": json.dumps(top.params, sort_keys=True),
                     "best.overrides": st.override_line(top.params), "best.mlflow_run_id": best_run})
    client.log_batch(rid, metrics=_progress(ctx, client), tags=[RunTag(k, str(v)) for k, v in tags.items()],
                     synchronous=True)
    _mark_best(ctx, client, best_run)
    with tempfile.TemporaryDirectory(prefix="harness-sweep-") as tmp:
        d = Path(tmp)
        _trials_csv(ctx, d / "trials.csv")
        if s["best"]:
            top = s["best"][0]
            (d / "best_params.json").write_text(json.dumps(
                {"trial": top.number, metric: top.value, "params": top.params,
                 "overrides": st.override_line(top.params)}, indent=2, sort_keys=True))
        (d / "plots").mkdir()
        _plots(ctx, d / "plots")
        client.log_artifacts(rid, str(d))
    try:
        describe.annotate_study(ctx)
    except Exception as e:  # a nicety: the sweep's results are in both stores already
        log.warning("optuna-dashboard notes not written: %s", e)


def _progress(ctx, client) -> list:
    """The sweep's progress as curves, step = trial number: ``best/<metric>`` (the best so far) and
    ``trials/<metric>`` (each complete trial's value). Each step is logged once, when every trial up
    to it has ended (a trial still running elsewhere could change the best so far)."""
    from mlflow.entities import Metric

    metric = ctx.spec.search.metric
    done = {t.number: t for t in ctx.study.get_trials(deepcopy=False)}
    settled = -1
    while settled + 1 in done and done[settled + 1].state.is_finished():
        settled += 1
    logged = max((m.step for m in client.get_metric_history(ctx.parent_run_id, f"best/{metric}")), default=-1)
    better = max if ctx.spec.search.direction == "maximize" else min
    best, out, ts = None, [], int(time.time() * 1000)
    for n in range(settled + 1):
        t = done[n]
        value = t.value if t.state == TrialState.COMPLETE and t.value is not None else None
        if value is not None and math.isfinite(value):
            best = value if best is None else better(best, value)
            if n > logged:
                out.append(Metric(f"trials/{metric}", value, ts, n))
        if best is not None and n > logged:
            out.append(Metric(f"best/{metric}", best, ts, n))
    return out


def _mark_best(ctx, client, best_run: str) -> None:
    """Tag ``sweep.best = true`` on the best trial's run, and on no other (the best may change)."""
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException

    marked = client.search_runs([ctx.experiment_id], max_results=100, filter_string=(
        f"tags.mlflow.parentRunId = '{ctx.parent_run_id}' and tags.`sweep.best` = 'true'"))
    for r in marked:
        if r.info.run_id != best_run:
            with contextlib.suppress(MlflowException):  # already removed by another command's summary
                client.delete_tag(r.info.run_id, "sweep.best")
    if best_run and best_run not in {r.info.run_id for r in marked}:
        # log_batch, not set_tag: two commands' summaries may tag it at once (see parent.set_parent_status)
        client.log_batch(best_run, tags=[RunTag("sweep.best", "true")], synchronous=True)


def _trials_csv(ctx, path: Path) -> None:
    df = ctx.study.trials_dataframe(attrs=("number", "state", "value", "params", "user_attrs",
                                           "datetime_start", "duration"))
    drop = [c for c in df.columns if c in ("user_attrs_worker",)]
    df.drop(columns=drop).to_csv(path, index=False)


def _plots(ctx, folder: Path) -> list[str]:
    """Optuna's own plots as PNG (offline: no plotly.js needed to look at them). A plot that needs
    more trials than the study has is skipped with a debug line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    made = []
    for name in PLOTS:
        fn = getattr(ovm, f"plot_{name}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "experimental", tight-layout notes
                ax = fn(ctx.study)
                fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                fig.set_size_inches(10, 6)
                fig.savefig(folder / f"{name}.png", dpi=90, bbox_inches="tight")
            made.append(name)
        except Exception as e:  # e.g. importances with < 2 complete trials, no intermediate values
            log.debug("plot %s skipped: %s", name, e)
        finally:
            plt.close("all")
    return made
