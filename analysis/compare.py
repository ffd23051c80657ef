"""python -m analysis.compare --experiment NAME [--group-by KEY[,KEY]] [--metric val/acc] [--out DIR]

Pulls the experiment's finished (and diverged) runs from MLflow (``mlflow.search_runs``) into pandas, groups them by
params or tags, prints mean, std, n and the best run per group, and writes ``compare.csv``,
``compare.md``, ``compare_runs.csv`` and ``compare_curves.png`` (learning curves per group) to ``--out``
(default ``reports/<experiment>/``).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd

from harness.cli import Parser
from harness.errors import UserError

NONE = "(unset)"


def default_direction(metric: str) -> str:
    return "min" if "loss" in metric or metric.endswith(("seconds", "_s", "_mb")) else "max"


def load_runs(experiment: str, metric: str, *, filter_string: str = "",
              include_stopped: bool = False) -> pd.DataFrame:
    """The experiment's finished runs with ``metric`` (its last value), with params and tags columns.

    Runs that diverged count, scored as what they measured when they stopped (chance-level accuracy
    when their weights were no longer finite; column ``diverged``); a diverged run's non-finite loss
    cannot be averaged and is left out, and so are runs that crashed, were killed or still run — the
    table's ``left out`` attribute counts each. Runs stopped early (pruned trials) are left out unless
    ``include_stopped``: their last value is from an earlier epoch than everyone else's."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from harness.tracking import store

    store.setup_mlflow()
    store.require_existing(store.tracking_uri())
    exp = MlflowClient().get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in MlflowClient().search_experiments())
        raise UserError(f"--experiment {experiment!r}: no such experiment in {store.tracking_uri()} "
                        f"(experiments: {', '.join(names) or 'none'})")
    try:
        df = mlflow.search_runs(experiment_ids=[exp.experiment_id], filter_string=filter_string,
                                output_format="pandas", max_results=50_000)
    except MlflowException as e:
        if not filter_string:
            raise
        raise UserError(f"--filter {filter_string!r}: {str(e).splitlines()[0][:150]}; write MLflow's search "
                        f"syntax, e.g. \"params.seed = '0' and metrics.`val/acc` > 0.9\"") from None
    col = f"metrics.{metric}"
    if df.empty or col not in df.columns:
        available = sorted(c[len("metrics."):] for c in df.columns if c.startswith("metrics."))
        raise UserError(f"--metric {metric}: no run in experiment {experiment!r} logged it "
                        f"(metrics: {', '.join(available) or 'none'})")
    reason = df["tags.failure_reason"].fillna("") if "tags.failure_reason" in df else pd.Series("", index=df.index)
    df["diverged"] = (df["status"] == "FAILED") & reason.str.startswith("diverged")
    left_out = df.loc[~((df["status"] == "FINISHED") | df["diverged"]), "status"].value_counts().to_dict()
    df = df[(df["status"] == "FINISHED") | df["diverged"]].copy()
    if not include_stopped and "tags.stopped_early" in df.columns:
        stopped = df["tags.stopped_early"].notna()
        left_out["stopped early"] = int(stopped.sum())
        df = df[~stopped]
    if metric.endswith("/acc"):
        classes = pd.to_numeric(df.get("params.data.num_classes", pd.Series(index=df.index, dtype=float)),
                                errors="coerce").fillna(10)
        chance = df["diverged"] & df[col].isna()
        df.loc[chance, col] = 1.0 / classes[chance]
    missing = df[col].isna()
    if missing.any():
        left_out[f"no finite {metric}"] = int(missing.sum())
    df = df[~missing].reset_index(drop=True)
    if df.empty:
        raise UserError(f"experiment {experiment!r}: no finished or diverged run logged {metric}")
    df.attrs["left out"] = {k: int(v) for k, v in left_out.items() if v}
    return df


def resolve_keys(df: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    """``mode_bug`` -> ``params.mode_bug``; falls back to tags (``ablation.arm`` -> ``tags.ablation.arm``)."""
    cols = []
    for key in keys:
        for prefix in ("", "params.", "tags."):
            if prefix + key in df.columns and (prefix or key.startswith(("params.", "tags.", "metrics."))):
                cols.append(prefix + key)
                break
        else:
            params = sorted(c[len("params."):] for c in df.columns if c.startswith("params."))
            raise UserError(f"--group-by {key}: not a param or tag of these runs "
                            f"(params: {', '.join(params[:20])}{' ...' if len(params) > 20 else ''})")
    return cols


def summarize_groups(df: pd.DataFrame, metric: str, by: Sequence[str], direction: str = "max") -> pd.DataFrame:
    """One row per group: the group's keys, n, mean, std, min, max, best run id / name / value."""
    col = f"metrics.{metric}"
    work = df.copy()
    work[col] = work[col].astype(float)
    keys = list(by) or ["group"]
    if by:
        for c in by:
            work[c] = work[c].astype(object).where(work[c].notna(), NONE).astype(str)
    else:
        work["group"] = "all"
    if "tags.mlflow.runName" not in work:
        work["tags.mlflow.runName"] = ""
    groups = work.groupby(keys, sort=False, dropna=False)
    table = groups[col].agg(n="size", mean="mean", std="std", min="min", max="max")
    table["diverged"] = groups["diverged"].sum().astype(int) if "diverged" in work else 0
    best = work.loc[groups[col].idxmax() if direction == "max" else groups[col].idxmin()].set_index(keys)
    table["best"] = best[col]
    table["best_run_id"] = best["run_id"]
    table["best_run_name"] = best["tags.mlflow.runName"]
    table = table.reset_index().rename(columns={k: k.split(".", 1)[-1] for k in by})
    return table.sort_values("mean", ascending=(direction == "min"), kind="stable").reset_index(drop=True)


def compare(experiment: str, *, group_by: Sequence[str] = (), metric: str = "val/acc",
            direction: str | None = None, out: str | Path | None = None, filter_string: str = "",
            include_stopped: bool = False, plot: bool = True) -> dict:
    """Everything the CLI does, as a function: returns the summary table, the runs and the files."""
    from analysis.plots import plot_curves
    from analysis.runs import curves, report_dir
    from harness.errors import mask_url
    from harness.tracking.store import tracking_uri

    direction = direction or default_direction(metric)
    df = load_runs(experiment, metric, filter_string=filter_string, include_stopped=include_stopped)
    by = resolve_keys(df, group_by)
    table = summarize_groups(df, metric, by, direction)
    out = report_dir(experiment, out)
    # Named apart from an ablation's report files, which share the folder of the experiment.
    files = {"csv": out / "compare.csv", "md": out / "compare.md", "runs": out / "compare_runs.csv"}
    table.to_csv(files["csv"], index=False)
    keep = ["run_id", "tags.mlflow.runName", "status", "diverged", f"metrics.{metric}", *by]
    df[[c for c in dict.fromkeys(keep) if c in df.columns]].to_csv(files["runs"], index=False)
    title = f"{experiment}: {metric} by {', '.join(group_by) or 'all runs'} ({direction} is best)"
    left = df.attrs.get("left out", {})
    note = "; left out: " + ", ".join(f"{n} {why}" for why, n in left.items()) if left else ""
    files["md"].write_text(f"# {title}\n\n{len(df)} runs from {mask_url(tracking_uri())} (diverged runs "
                           f"count, scored as measured){note}\n\n"
                           f"{table.to_markdown(index=False, floatfmt='.4f')}\n"
                           + ("\n![learning curves](compare_curves.png)\n" if plot else ""))
    if plot:
        hist = curves(df["run_id"].tolist(), metric)
        groups: dict[str, list] = {}
        keys = [c.split(".", 1)[-1] for c in by]
        for _, row in df.iterrows():
            name = ", ".join(f"{k}={_val(row[c])}" for k, c in zip(keys, by)) if by else "all"
            groups.setdefault(name, []).append(hist[row["run_id"]])
        files["png"] = plot_curves([(metric, groups)], out / "compare_curves.png", title=title,
                                   xlabel="step")
    return {"table": table, "runs": df, "files": files, "title": title, "left out": left}


def _val(v) -> str:
    return NONE if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="python -m analysis.compare", description=__doc__.splitlines()[0],
                                epilog="example: python -m analysis.compare --experiment digits-lenet "
                                       "--group-by model.dropout --metric val/acc")
    p.add_argument("--experiment", required=True, help="MLflow experiment name (the spec's name)")
    p.add_argument("--group-by", default="", metavar="KEY[,KEY]",
                   help="params or tags to group by, e.g. mode_bug or model.dropout,optimizer.lr "
                        "(default: all runs in one group)")
    p.add_argument("--metric", default="val/acc", help="metric to compare (its last value per run)")
    p.add_argument("--direction", choices=["max", "min"], help="best is max or min (default: min for "
                                                                "losses and costs, else max)")
    p.add_argument("--filter", default="", metavar="MLFLOW_FILTER",
                   help="extra mlflow search filter, e.g. \"params.data.dataset = 'digits'\"")
    p.add_argument("--include-stopped", action="store_true", help="keep runs stopped early (pruned)")
    p.add_argument("--out", help="output folder (default reports/<experiment>/)")
    p.add_argument("--no-plot", action="store_true", help="skip the learning-curve plot")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from harness.cli import setup_logging, user_errors

    setup_logging()
    with user_errors("analysis.compare"):
        keys = [k.strip() for k in args.group_by.split(",") if k.strip()]
        res = compare(args.experiment, group_by=keys, metric=args.metric, direction=args.direction,
                      out=args.out, filter_string=args.filter, include_stopped=args.include_stopped,
                      plot=not args.no_plot)
        table = res["table"]
        with pd.option_context("display.width", 200, "display.max_columns", 20,
                               "display.float_format", "{:.4f}".format):
            print(res["title"])
            print(table.drop(columns=["best_run_name"]).to_string(index=False))
        if res["left out"]:
            print("left out: " + ", ".join(f"{n} {why}" for why, n in res["left out"].items()))
        for kind, path in res["files"].items():
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
