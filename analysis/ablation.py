"""python -m analysis.ablation SPEC [key=value ...] [--seeds N] [--arms a,b] [--workers N] [--resume ID]

A paired ablation study: every arm (a mode bug, or another axis such as ``model.dropout`` or
``data.val_batch_size``) runs over the same seeds as its control, so arm and control share initial
weights, data order and validation split, and the per-seed difference is the unit of analysis.

- Arms that change training get their own MLflow runs (``harness.run.run``).
- Arms that change only evaluation (``no_eval``, ``mc_dropout``, ``no_grad_missing``, validation batch
  size, MC samples) are scored on the control's own checkpoints (``checkpoints/last.pt``), no
  retraining, with a per-example McNemar test besides the seed-level comparison. Each scoring is an
  MLflow run too (tag ``ablation.scored_on`` names the control run it used).

Every run is a child of one ``ablation:<name>`` parent run. The statistics (``analysis.stats``), a
printed table, ``report.md``, CSVs and plots go to ``--out`` (default ``reports/<experiment>/``) and are
logged as artifacts of the parent run. This module runs the plan (``analysis.plan``: the ablation spec
and its arms) and is the command line; the checkpoint scoring is in ``analysis.scoring``, reading the
runs back in ``analysis.runs``, the per-arm table and the report in ``analysis.report``.
"""
from __future__ import annotations

from harness.core import device

if __name__ == "__main__":  # before the imports below load torch: OpenMP reads its wait policy once
    device.prepare_threads()

import argparse
import contextlib
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from analysis.effects import analyse, finite
from analysis.plan import Ablation, load_ablation
from analysis.report import display_table, parent_note, write_report
from analysis.runs import collect, existing_children, report_dir, reuse
from analysis.scoring import run_scoring
from analysis.training import run_training
from harness.cli import Parser, exit_with, positive_int, run_id
from harness.errors import UserError

log = logging.getLogger("analysis.ablation")


# -- running ---------------------------------------------------------------------------------------

@dataclass
class AblationResult:
    parent_run_id: str
    table: pd.DataFrame  # one row per arm: summaries, paired effects, verdicts, costs
    runs: pd.DataFrame  # one row per arm x seed
    files: dict[str, Path] = field(default_factory=dict)
    wall_seconds: float = 0.0
    failures: list[str] = field(default_factory=list)


def run_ablation(ab: Ablation, *, workers: int | None = None, out: str | Path | None = None,
                 resume: str | None = None, echo=print) -> AblationResult:
    """Run every arm x seed (skipping what a resumed parent already has), analyse, report."""
    import torch

    threads = torch.get_num_threads()  # building a run sets it from the spec: give it back after
    try:
        return _run_ablation(ab, workers=workers, out=out, resume=resume, echo=echo)
    finally:
        torch.set_num_threads(threads)


def _run_ablation(ab: Ablation, *, workers, out, resume, echo) -> AblationResult:
    from harness.tracking import store
    from harness.tracking.mlflow_tracker import MlflowTracker

    t0 = time.perf_counter()
    workers = workers or ab.spec.workers
    _preflight(ab, workers)
    store.setup_mlflow()
    if resume:
        _check_parent(resume, ab)
    out = report_dir(ab.experiment, out)  # a folder that cannot be written: one line, before any run
    exp_id = store.experiment_id(ab.experiment)
    parent_tags = {"ablation": ab.spec.name, "ablation.role": "parent"}
    failures: list[str] = []
    tracker = MlflowTracker(resume)
    with _quiet_guard(), tracker.start(experiment=ab.experiment, run_name=f"ablation:{ab.spec.name}",
                                       tags=parent_tags, resume=resume is not None):
        parent = tracker.run_id
        _log_parent_start(tracker, ab, resume is not None)
        done = existing_children(exp_id, parent)
        train_tasks = []
        # Seed by seed, every arm in turn: a busy neighbour or an interruption hits all arms alike.
        for seed in ab.seeds:
            for arm in ab.arms.values():
                if arm.scored != "train":
                    continue
                spec = ab.arm_spec(arm.name, seed)
                if reuse(done, arm.name, seed, spec):
                    continue
                train_tasks.append((arm, seed, spec))
        n_ck = sum(len(ab.seeds) for a in ab.arms.values() if a.scored == "checkpoint")
        echo(f"ablation {ab.spec.name}: {len(ab.arms)} arms x {len(ab.seeds)} seeds -> "
             f"{len(train_tasks)} training runs to do, {n_ck} checkpoint scorings; parent run {parent} "
             f"in experiment {ab.experiment!r}")
        failures += run_training(train_tasks, parent, ab, exp_id, workers, echo)
        done = existing_children(exp_id, parent)
        failures += run_scoring(ab, parent, done, echo)
        runs = collect(exp_id, parent, ab)
        table = analyse(ab, runs)
        wall = time.perf_counter() - t0
        files = write_report(ab, table, runs, out, parent_run_id=parent, wall_seconds=wall,
                             failures=failures)
        _log_parent_end(tracker, ab, table, files, wall, experiment_id=exp_id,
                        n_runs=int((runs["status"] != "missing").sum()), failures=failures)
    return AblationResult(parent, table, runs, files, wall, failures)


def _preflight(ab: Ablation, workers: int) -> None:
    """Build every arm once (its data, model and optimizer) before the parent run exists: a broken
    model or dataset factory, or a freeze path an arm gets wrong, is one line and no half-made study."""
    from harness.core.data import load_data
    from harness.run import build

    device.check_workers(workers)  # and no more worker processes than the memory holds
    loaded: dict[str, object] = {}
    for arm in ab.arms.values():
        spec = ab.arm_spec(arm.name, ab.seeds[0])
        key = spec.data.model_dump_json()
        if key not in loaded:
            loaded[key] = load_data(spec.data, spec.seed, device.resolve_device(spec.train.device))
        build(spec, data=loaded[key])


def _log_parent_start(t, ab: Ablation, resumed: bool) -> None:
    if resumed:
        t.set_tags({"ablation.resumed": "true"})
        return
    t.log_params({
        "ablation.name": ab.spec.name, "ablation.base": ab.spec.base, "ablation.control": ab.spec.control,
        "ablation.metric": ab.spec.metric, "ablation.seeds": json.dumps(ab.seeds),
        "ablation.arms": json.dumps(list(ab.arms))[:6000], "train.epochs": ab.base.train.epochs,
        "data.dataset": ab.base.data.dataset, "model.arch": ab.base.model.arch,
    })
    t.log_text(ab.path.read_text(), "ablation/ablation_spec.yaml")
    t.log_text(ab.base.to_yaml(), "ablation/base_spec.yaml")


def _check_parent(run_id: str, ab: Ablation) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        r = MlflowClient().get_run(run_id)
    except MlflowException:
        raise UserError(f"--resume {run_id}: no such run in this store") from None
    if r.data.tags.get("ablation") != ab.spec.name or r.data.tags.get("ablation.role") != "parent":
        raise UserError(f"--resume {run_id}: not the parent run of ablation {ab.spec.name!r}")


def resume_plan(run_id: str, spec_path: str | Path) -> Ablation:
    """The plan an ablation's parent run recorded when it started (its spec, the base spec with the
    overrides it was given, its seeds and arms): ``--resume`` goes on with exactly that, whatever
    overrides the first command had."""
    import tempfile

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from harness.spec import load_spec
    from harness.tracking import store
    from harness.tracking.mlflow_tracker import MlflowTracker

    store.setup_mlflow()
    try:
        store.require_existing(store.tracking_uri())
        parent = MlflowClient().get_run(run_id)
    except (MlflowException, UserError):
        raise UserError(f"--resume {run_id}: no such run in this store ({store.tracking_uri()})") from None
    tags, params = parent.data.tags, parent.data.params
    name = load_ablation_name(spec_path)
    if tags.get("ablation.role") != "parent" or tags.get("ablation") != name:
        raise UserError(f"--resume {run_id}: not the parent run of ablation {name!r}")
    tracker = MlflowTracker(run_id)
    with tempfile.TemporaryDirectory(prefix="ablation-resume-") as tmp:
        spec_file = tracker.download_artifact("ablation/ablation_spec.yaml", tmp)
        base = load_spec(tracker.download_artifact("ablation/base_spec.yaml", tmp))
        return load_ablation(spec_file, base=base, seeds=json.loads(params["ablation.seeds"]),
                             only=json.loads(params["ablation.arms"]))


def load_ablation_name(path: str | Path) -> str:
    """The ``name:`` of an ablation spec file (checked by load_ablation in full)."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot read the ablation spec ({type(e).__name__})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise UserError(f"{path}: an ablation spec needs a name")
    return raw["name"]


@contextlib.contextmanager
def _quiet_guard():
    """Every bug arm would warn once per run: its verdict goes to the tags and the report instead."""
    logger = logging.getLogger("harness.guard")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# -- scoring evaluation-only arms on the control's checkpoints (analysis.scoring) ------------------

def _log_parent_end(t, ab: Ablation, table: pd.DataFrame, files: dict, wall: float, *, experiment_id: str,
                    n_runs: int, failures: list[str]) -> None:
    """The description (the effects, a link to the report), the effects as tags (one number per arm:
    no chart), the report's files."""
    tags = {"ablation.wall_seconds": f"{wall:.0f}",
            "mlflow.note.content": parent_note(ab, table, experiment_id=experiment_id, parent_run_id=t.run_id,
                                               n_runs=n_runs, failures=failures)}
    for _, r in table.iterrows():
        if r["control"] and finite(r.get(f"{ab.spec.metric} diff")):
            tags[f"effect.{r['arm']}.{ab.spec.metric.replace('/', '_')}"] = f"{r[f'{ab.spec.metric} diff']:.6g}"
    t.set_tags(tags)
    for path in files.values():
        t.log_artifact(path, "ablation")


# -- command line ----------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(
        prog="python -m analysis.ablation",
        description="Run a paired ablation study of mode bugs (and other axes) and report it.",
        epilog="example: python -m analysis.ablation experiments/ablations/mode_bugs.yaml "
               "train.epochs=5 --seeds 3 --arms no_eval,no_zero_grad")
    p.add_argument("spec", help="ablation spec (YAML), e.g. experiments/ablations/mode_bugs.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides of the base experiment spec, for every arm (e.g. train.epochs=5)")
    p.add_argument("--seeds", type=positive_int, help="use seeds 0..N-1 instead of the spec's")
    p.add_argument("--arms", help="comma-separated subset of arms (their controls are added)")
    p.add_argument("--workers", type=positive_int, help="parallel training processes (default: the spec's, 1); "
                                               "a local SQLite store is safest with 1")
    p.add_argument("--out", help="report folder (default reports/<experiment>/)")
    p.add_argument("--resume", metavar="PARENT_RUN_ID", type=run_id,
                   help="continue an interrupted ablation: runs it already has are kept")
    p.add_argument("--dry-run", action="store_true", help="print the plan (arms, scoring, runs) and stop")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from harness.cli import setup_logging, user_errors

    setup_logging()
    with user_errors("analysis.ablation"):
        only = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None
        if args.resume:
            if args.overrides or args.seeds or only:
                raise UserError("--resume goes on with the plan its parent run recorded: drop key=value, "
                                "--seeds and --arms (or start a new ablation without --resume)")
            ab = resume_plan(args.resume, args.spec)
        else:
            ab = load_ablation(args.spec, args.overrides, seeds=args.seeds, only=only)
            if ab.base.train.threads in (None, "auto"):  # one count for all runs, in the plan (resume)
                workers, train = args.workers or ab.spec.workers, ab.base.train
                n = device.threads_for(workers) if workers > 1 else \
                    device.resolve_threads(train.threads, train.deterministic)
                ab = ab.with_threads(n)
                print(f"every run trains with train.threads={n} (the thread policy's choice, made once: "
                      f"pairs differ only by their arm)")
        if args.dry_run:
            for a in ab.arms.values():
                what = "control" if a.is_control else f"vs {a.control}"
                changes = {k: v for k, v in a.spec.params().items() if ab.base.params().get(k) != v}
                print(f"{a.name:24s} {a.scored:10s} {what:22s} {changes}")
            n_train = sum(1 for a in ab.arms.values() if a.scored == "train") * len(ab.seeds)
            print(f"{n_train} training runs, seeds {ab.seeds}")
            return 0
        res = run_ablation(ab, workers=args.workers, out=args.out, resume=args.resume)
        with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_colwidth", 70):
            print()
            print(display_table(ab, res.table).to_string(index=False))
        print(f"\nwall time {res.wall_seconds:.0f} s; parent run {res.parent_run_id}")
        for path in res.files.values():
            print(f"wrote {path}")
        if res.failures:
            print(f"{len(res.failures)} run(s) failed: see the report", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    exit_with(main)
