"""The sweep told where its researcher looks: the parent run's description (MLflow renders the tag
``mlflow.note.content`` as Markdown at the top of the run page) and notes in Optuna's dashboard (the
objective's name, the spec, each trial's MLflow run as a link)."""
from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from harness.sweep import study as st
from harness.tracking import links


def parent_note(ctx, s: dict[str, Any]) -> str:
    """Markdown: the best trial first (a link to its run), the counts, the top trials, the best params
    as a command to paste, and where to look next."""
    metric, exp = ctx.spec.search.metric, ctx.experiment_id
    c = s["counts"]
    best: list[FrozenTrial] = s["best"]
    ranked = links.runs_path(exp, f"tags.mlflow.parentRunId = '{ctx.parent_run_id}'",
                             order_by=f"metrics.`{metric}`", ascending=ctx.spec.search.direction == "minimize")
    lines = []
    if best:
        top = best[0]
        params = ", ".join(f"`{k}={st.fmt_value(v)}`" for k, v in top.params.items())
        lines += [f"**Best: {_trial_link(exp, top)}, {metric} {top.value:.4f}** · [Every trial, best first]"
                  f"({ranked})", "", f"Best params: {params}", ""]
    else:
        lines += [f"**No trial has completed yet** · [Every trial]({ranked})", ""]
    # The first lines are what shows before "Show more": the best trial, every trial, the counts.
    lines += [
        f"{s['finished']} of {ctx.n_trials} trials finished: **{c.get('COMPLETE', 0)} complete, "
        f"{c.get('PRUNED', 0)} pruned, {c.get('FAIL', 0)} failed**.", "",
        f"Study `{ctx.study_name}`: {ctx.spec.search.direction} `{metric}` over "
        f"{', '.join(f'`{k}`' for k in ctx.space)}; {s['epochs_run']} of {s['epochs_full']} epochs trained "
        f"({s['saved']:.0%} saved by pruning); sampler `{ctx.sampler}`, pruner `{ctx.pruner}`.", ""]
    if best:
        keys = list(ctx.space)
        lines += ["| rank | trial | " + " | ".join([metric, *_short(keys), "epochs"]) + " |",
                  "|---:|---|" + "---:|" * (len(keys) + 2)]
        for rank, t in enumerate(best, 1):
            cells = [f"{t.value:.4f}", *(st.fmt_value(t.params.get(k)) for k in keys), str(_epochs(t))]
            lines.append(f"| {rank} | {_trial_link(exp, t)} | " + " | ".join(cells) + " |")
        # One argument a line: a long line would widen the whole run page (code blocks do not wrap).
        args = [ctx.spec_path, *ctx.overrides, *st.override_line(best[0].params).split(" ")]
        lines += ["", "The best trial as one run, ready to paste:", "", "```",
                  " \\\n".join(["python -m harness.train", *(f"    {a}" for a in args)]), "```", ""]
    lines += [f"The best trial's run has the tag `sweep.best = true`; the `best/{metric}` chart is the "
              f"progress (step = trial number); Optuna's plots and `trials.csv` are under Artifacts."]
    return "\n".join(lines)


def _short(keys: list[str]) -> list[str]:
    """``optimizer.lr`` -> ``lr`` where no other key ends the same (MLflow's tables have no padding)."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return [s if last.count(s) == 1 else k for s, k in zip(last, keys)]


def _trial_link(experiment_id: str, t: FrozenTrial) -> str:
    run_id = t.user_attrs.get("mlflow_run_id")
    name = f"trial-{t.number}"
    return f"[{name}]({links.run_path(experiment_id, run_id)})" if run_id else name


def _epochs(t: FrozenTrial) -> int:
    return int(t.user_attrs.get("epochs") or len(t.intermediate_values))


# -- Optuna's dashboard ----------------------------------------------------------------------------------

def annotate_study(ctx) -> None:
    """Notes in optuna-dashboard: the study's (the spec, the parent run), and one per finished trial
    with a link to its MLflow run (written once each)."""
    from optuna_dashboard import get_note, save_note  # ~1.5 s to import: once, at the end of a sweep

    study = ctx.study
    exp = ctx.experiment_id
    if not get_note(study):
        parent = links.absolute(links.run_path(exp, ctx.parent_run_id))
        save_note(study, "\n".join([
            f"**MLflow**: [parent run sweep:{ctx.study_name}]({parent}) (experiment `{ctx.spec.name}`; a local "
            f"store needs `mlflow ui` running). Objective: {ctx.spec.search.direction} "
            f"`{ctx.spec.search.metric}`.", "", f"Spec (`{ctx.spec_path}` {' '.join(ctx.overrides)}):", "",
            "```yaml", ctx.spec.to_yaml().rstrip(), "```"]))
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        run_id = t.user_attrs.get("mlflow_run_id")
        if not run_id:
            continue
        trial = optuna.Trial(study, t._trial_id)
        if not get_note(trial):
            why = t.user_attrs.get("failure_reason") or t.user_attrs.get("stopped_early") or ""
            save_note(trial, f"**MLflow run**: [trial-{t.number}]({links.absolute(links.run_path(exp, run_id))})"
                             + (f"\n\n{t.state.name}: {why}" if why and t.state != TrialState.COMPLETE else ""))
