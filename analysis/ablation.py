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
logged as artifacts of the parent run. This module reads the spec, plans and runs the arms and collects
the runs; the checkpoint scoring is in ``analysis.scoring``, the per-arm table and the report in
``analysis.report``. The ablation spec (YAML)::

    name: digits-mode-bugs          # also the MLflow experiment, unless `experiment:` is given
    base: ../digits_lenet_modes.yaml   # an experiment spec, relative to this file
    overrides: {train.epochs: 10}   # applied to the base for every arm (optional)
    seeds: 10                       # or a list of seeds
    control: none                   # the default control arm (added with no changes if not listed)
    metric: test/acc                # the headline metric
    arms:
      - name: no_eval
        set: {mode_bug: no_eval}
      - name: partial_freeze
        set: {mode_bug: partial_freeze, model.freeze: [features]}
        control: frozen_features    # an arm's own control
        score: auto                 # auto | train | checkpoint
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import logging
import math
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from analysis.report import METRICS, analyse, display_table, finite, write_report
from analysis.scoring import child_tags, score_arm
from harness.cli import positive_int
from harness.spec import Spec, SpecError, UserError, load_spec

log = logging.getLogger("analysis.ablation")

# Spec keys that change only how a trained model is evaluated: arms that differ from their control
# only here (and whose mode policy changes only evaluation) can be scored on the control's checkpoints.
EVAL_KEYS = frozenset({"mode_bug", "data.val_batch_size", "train.mc_samples", "guard"})
# The ablation needs checkpoints and guard verdicts, and has no use for the final model artifact.
FORCED = {"train.checkpoint": True, "train.log_model": False, "guard": "warn"}
HISTORY = ("val/acc", "train/loss", "time/train_epoch_s", "val/seconds", "val/autograd_mb")


# -- the ablation spec -----------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ArmSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    set: dict[str, Any] = Field(default_factory=dict)  # dotted spec overrides, e.g. {mode_bug: no_eval}
    control: str | None = None  # None: the ablation's control (the control arm itself has none)
    score: Literal["auto", "train", "checkpoint"] = "auto"
    note: str = ""


class AblationSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    base: str
    experiment: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)
    seeds: int | list[int] = 10
    control: str = "none"
    metric: Literal["test/acc", "val/acc", "test/loss", "val/loss"] = "test/acc"
    workers: int = Field(1, ge=1)
    arms: list[ArmSpec] = Field(min_length=1)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v):
        if isinstance(v, int):
            if v < 1:
                raise ValueError("seeds must be >= 1 (a count) or a list of seeds")
        elif not v or len(set(v)) != len(v):
            raise ValueError("a list of seeds must be non-empty and without repeats")
        return v


@dataclass
class Arm:
    name: str
    spec: Spec  # with the base seed; the seed is replaced per run
    control: str | None
    scored: str  # "train" | "checkpoint"
    note: str = ""

    @property
    def is_control(self) -> bool:
        return self.control is None


@dataclass
class Ablation:
    spec: AblationSpec
    path: Path
    base: Spec
    arms: dict[str, Arm]
    seeds: list[int]

    @property
    def experiment(self) -> str:
        return self.spec.experiment or self.spec.name

    def arm_spec(self, arm: str, seed: int) -> Spec:
        return self.arms[arm].spec.with_overrides({"seed": seed, "name": self.experiment})


def load_ablation(path: str | Path, overrides: list[str] | dict | None = None, *, seeds: int | None = None,
                  only: Sequence[str] | None = None) -> Ablation:
    """Read and check an ablation spec: every arm's experiment spec is built and validated here, so a
    mistake stops the study before the first run. ``overrides`` apply to the base spec of every arm;
    ``seeds`` replaces the seed list with ``range(seeds)``; ``only`` keeps those arms (and their
    controls)."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{p}: ablation spec not found (see experiments/ablations/)")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise SpecError(f"{p}: malformed YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{p}: an ablation spec is a YAML mapping (name, base, seeds, arms)")
    try:
        ab = AblationSpec.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        raise SpecError(f"{p}: {where}: {msg}") from None

    base_path = (p.parent / ab.base).resolve()
    if not base_path.is_file():
        raise SpecError(f"{p}: base: experiment spec {ab.base!r} not found (relative to {p.parent})")
    base = load_spec(base_path, {**ab.overrides, **_as_dict(overrides)})
    base = base.with_overrides(FORCED)
    if base.train.threads is None:
        # One torch thread per run unless the spec says otherwise: small models gain nothing from more,
        # and on shared cores a multi-threaded run slows down ten-fold when a neighbour is busy.
        base = base.with_overrides({"train.threads": 1})

    arm_specs = list(ab.arms)
    if ab.control not in {a.name for a in arm_specs}:
        arm_specs.insert(0, ArmSpec(name=ab.control))
    names = [a.name for a in arm_specs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise SpecError(f"{p}: arms: duplicate arm name(s) {sorted(dup)}")

    arms: dict[str, Arm] = {}
    for i, a in enumerate(arm_specs):
        try:
            spec = base.with_overrides(a.set)
        except SpecError as e:
            raise SpecError(f"{p}: arms[{a.name}].set: {str(e).removeprefix('overrides: ')}") from None
        control = None if a.name == ab.control else (a.control or ab.control)
        if control is not None and control not in names:
            raise SpecError(f"{p}: arms[{a.name}].control: no arm named {control!r}")
        if control == a.name:
            raise SpecError(f"{p}: arms[{a.name}].control: an arm cannot be its own control")
        arms[a.name] = Arm(a.name, spec, control, a.score, a.note)

    for a in arms.values():
        a.scored = _scoring(p, a, arms)
    if only:
        unknown = [n for n in only if n not in arms]
        if unknown:
            raise SpecError(f"--arms: unknown arm(s) {unknown}; arms: {', '.join(arms)}")
        keep = set(only)
        for n in list(keep):
            c = arms[n].control
            while c is not None:  # an arm needs its control, and that control its own
                keep.add(c)
                c = arms[c].control
        arms = {n: a for n, a in arms.items() if n in keep}
    seed_list = list(range(seeds)) if seeds else (
        list(range(ab.seeds)) if isinstance(ab.seeds, int) else list(ab.seeds))
    return Ablation(ab, p, base, arms, seed_list)


def _scoring(path: Path, arm: Arm, arms: dict[str, Arm]) -> str:
    """``checkpoint`` when the arm changes only evaluation relative to its control, else ``train``."""
    from harness.modes import get_policy

    if arm.control is None or arm.scored == "train":
        return "train"
    control = arms[arm.control]
    a, c = arm.spec.params(), control.spec.params()
    differ = sorted(k for k in set(a) | set(c) if a.get(k) != c.get(k))
    problems = []
    if any(k not in EVAL_KEYS for k in differ):
        problems.append(f"it changes {', '.join(k for k in differ if k not in EVAL_KEYS)}, which "
                        f"training sees")
    if get_policy(arm.spec.mode_bug).scope == "train":
        problems.append(f"mode_bug={arm.spec.mode_bug} changes training")
    if get_policy(control.spec.mode_bug).scope != "none":
        problems.append(f"its control {control.name!r} is not trained with the correct loop")
    if control.control is not None and _scoring(path, control, arms) == "checkpoint":
        problems.append(f"its control {control.name!r} is itself scored on checkpoints")
    if not problems:
        return "checkpoint"
    if arm.scored == "checkpoint":
        raise SpecError(f"{path}: arms[{arm.name}].score: checkpoint is impossible: {'; '.join(problems)}")
    return "train"


def _as_dict(overrides) -> dict:
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    from harness.spec import parse_overrides

    return parse_overrides(list(overrides))


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
    from harness import stores
    from harness.run import mlflow_run

    t0 = time.perf_counter()
    workers = workers or ab.spec.workers
    stores.setup_mlflow()
    exp_id = stores.experiment_id(ab.experiment)
    parent_tags = {"ablation": ab.spec.name, "ablation.role": "parent"}
    if resume:
        _check_parent(resume, ab)
    out = Path(out) if out else Path("reports") / _safe(ab.experiment)
    failures: list[str] = []
    with _quiet_guard(), mlflow_run(experiment_id=exp_id, run_name=f"ablation:{ab.spec.name}",
                                    run_id=resume, tags=None if resume else parent_tags) as parent:
        _log_parent_start(parent, ab, resume is not None)
        done = _existing_children(exp_id, parent)
        train_tasks = []
        # Seed by seed, every arm in turn: a busy neighbour or an interruption hits all arms alike.
        for seed in ab.seeds:
            for arm in ab.arms.values():
                if arm.scored != "train":
                    continue
                spec = ab.arm_spec(arm.name, seed)
                if _reuse(done, arm.name, seed, spec):
                    continue
                train_tasks.append((arm, seed, spec))
        n_ck = sum(len(ab.seeds) for a in ab.arms.values() if a.scored == "checkpoint")
        echo(f"ablation {ab.spec.name}: {len(ab.arms)} arms x {len(ab.seeds)} seeds -> "
             f"{len(train_tasks)} training runs to do, {n_ck} checkpoint scorings; parent run {parent} "
             f"in experiment {ab.experiment!r}")
        failures += _run_training(train_tasks, parent, ab, exp_id, workers, echo)
        done = _existing_children(exp_id, parent)
        failures += _run_scoring(ab, parent, exp_id, done, echo)
        runs = collect(exp_id, parent, ab)
        table = analyse(ab, runs)
        wall = time.perf_counter() - t0
        files = write_report(ab, table, runs, out, parent_run_id=parent, wall_seconds=wall,
                             failures=failures)
        _log_parent_end(parent, ab, table, files, wall)
    return AblationResult(parent, table, runs, files, wall, failures)


def _log_parent_start(parent: str, ab: Ablation, resumed: bool) -> None:
    from harness.tracking import MlflowTracker

    t = MlflowTracker(parent)
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


def _existing_children(exp_id: str, parent: str) -> dict[tuple[str, int], Any]:
    """Finished (or diverged) children by (arm, seed); the latest one wins."""
    from mlflow import MlflowClient

    runs = MlflowClient().search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'",
                                      max_results=50_000, order_by=["attributes.start_time ASC"])
    out = {}
    for r in runs:
        tags = r.data.tags
        if "ablation.arm" not in tags:
            continue
        diverged = tags.get("failure_reason", "").startswith("diverged")
        if r.info.status == "FINISHED" or (r.info.status == "FAILED" and diverged):
            out[(tags["ablation.arm"], int(tags["ablation.seed"]))] = r
    return out


def _reuse(done: dict, arm: str, seed: int, spec: Spec) -> bool:
    r = done.get((arm, seed))
    if r is None:
        return False
    if r.data.tags.get("spec_hash") != spec.hash():
        raise UserError(f"--resume: run {r.info.run_id} (arm {arm}, seed {seed}) was made from a different "
                        f"spec; start a new ablation instead of resuming this one")
    return True


def _run_training(tasks, parent: str, ab: Ablation, exp_id: str, workers: int, echo) -> list[str]:
    failures: list[str] = []
    if not tasks:
        return failures
    total = len(tasks)
    payloads = [(spec.model_dump(mode="json"), f"{arm.name}-s{seed}", parent, child_tags(ab, arm, seed))
                for arm, seed, spec in tasks]
    labels = [(arm.name, seed) for arm, seed, _ in tasks]

    def report(i: int, res: dict) -> None:
        arm, seed = labels[i]
        if res["status"] == "ok":
            m = res["metrics"]
            echo(f"  [{report.n}/{total}] {arm} seed {seed}: val/acc {m['val/acc']:.4f} "
                 f"test/acc {m['test/acc']:.4f} ({res['seconds']:.1f}s)")
        else:
            echo(f"  [{report.n}/{total}] {arm} seed {seed}: {res['status'].upper()} {res['error']}")
            if res["status"] == "failed":
                failures.append(f"{arm} seed {seed}: {res['error']}")

    report.n = 0
    if workers <= 1:
        for i, payload in enumerate(payloads):
            report.n += 1
            report(i, _train_with_retry(exp_id, *payload))
        return failures
    ctx = multiprocessing.get_context("spawn")  # no forked torch/OpenMP state, no inherited MLflow run
    threads = max(1, (os.cpu_count() or 1) // workers)
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                initargs=(threads,)) as pool:
        futures = {pool.submit(_train_with_retry, exp_id, *p): i for i, p in enumerate(payloads)}
        try:
            for fut in cf.as_completed(futures):
                report.n += 1
                report(futures[fut], fut.result())
        except KeyboardInterrupt:
            for f in futures:
                f.cancel()
            raise
    return failures


def _init_worker(threads: int) -> None:
    import torch

    from harness.cli import setup_logging

    torch.set_num_threads(threads)
    setup_logging()
    logging.getLogger("harness.guard").setLevel(logging.ERROR)


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


def _train_with_retry(exp_id: str, spec_json: dict, run_name: str, parent: str, tags: dict,
                      attempts: int = 4) -> dict:
    """One training run; a locked SQLite store (several writers) is retried after removing the
    half-made run."""
    for attempt in range(attempts):
        res = _train_task(spec_json, run_name, parent, tags)
        if res["status"] != "failed" or "database is locked" not in res["error"] or attempt == attempts - 1:
            return res
        _delete_unfinished(exp_id, parent, tags["ablation.task"])
        time.sleep(1.0 + attempt)
    return res


def _train_task(spec_json: dict, run_name: str, parent: str, tags: dict) -> dict:
    from harness.loop import Diverged
    from harness.run import run

    spec = Spec.model_validate(spec_json)
    t = time.perf_counter()
    try:
        r = run(spec, run_name=run_name, parent_run_id=parent, tags=tags, progress=False, system_metrics=False)
        return {"status": "ok", "run_id": r.run_id, "metrics": r.metrics, "seconds": r.seconds}
    except Diverged as e:
        return {"status": "diverged", "error": str(e), "seconds": time.perf_counter() - t}
    except Exception as e:  # one broken run must not end the study; it is reported
        return {"status": "failed", "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                "seconds": time.perf_counter() - t}


def _delete_unfinished(exp_id: str, parent: str, task: str) -> None:
    from mlflow import MlflowClient

    c = MlflowClient()
    try:
        for r in c.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent}' and "
                                                       f"tags.`ablation.task` = '{task}'"):
            if r.info.status != "FINISHED":
                c.delete_run(r.info.run_id)
    except Exception as e:  # the store is busy: the collection ignores unfinished runs anyway
        log.debug("could not delete the half-made run of %s: %s", task, e)


# -- scoring evaluation-only arms on the control's checkpoints (analysis.scoring) ------------------

def _run_scoring(ab: Ablation, parent: str, exp_id: str, done: dict, echo) -> list[str]:
    failures = []
    arms = [a for a in ab.arms.values() if a.scored == "checkpoint"]
    total = len(arms) * len(ab.seeds)
    n = 0
    for arm in arms:
        for seed in ab.seeds:
            n += 1
            spec = ab.arm_spec(arm.name, seed)
            if _reuse(done, arm.name, seed, spec):
                continue
            control = done.get((arm.control, seed))
            if control is None or control.info.status != "FINISHED":
                msg = f"{arm.name} seed {seed}: no finished {arm.control} run to score on"
                echo(f"  [{n}/{total}] {msg}")
                failures.append(msg)
                continue
            try:
                m = score_arm(ab, arm, seed, control.info.run_id, parent, exp_id)
            except Exception as e:
                msg = f"{arm.name} seed {seed}: scoring failed: {type(e).__name__}: {e}"
                echo(f"  [{n}/{total}] {msg}")
                failures.append(msg)
                continue
            echo(f"  [{n}/{total}] {arm.name} seed {seed} (on {arm.control}'s checkpoint): "
                 f"val/acc {m['val/acc']:.4f} test/acc {m['test/acc']:.4f}, McNemar on test: "
                 f"b={int(m['mcnemar/test_b'])} c={int(m['mcnemar/test_c'])}")
    return failures


# -- collecting the runs; the report goes to the parent run (analysis.report) ----------------------

def collect(exp_id: str, parent: str, ab: Ablation) -> pd.DataFrame:
    """One row per arm x seed from MLflow (so a resumed or re-reported study reads the same numbers):
    final metrics, status, guard findings, costs and per-epoch histories (training runs)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    done = _existing_children(exp_id, parent)
    rows = []
    for arm in ab.arms.values():
        for seed in ab.seeds:
            r = done.get((arm.name, seed))
            row: dict[str, Any] = {"arm": arm.name, "seed": seed, "scored": arm.scored,
                                   "control": arm.control or "", "run_id": r.info.run_id if r else "",
                                   "status": "missing"}
            if r is not None:
                tags, m = r.data.tags, r.data.metrics
                diverged = r.info.status == "FAILED"
                row["status"] = "diverged" if diverged else "ok"
                for k in METRICS:
                    row[k] = math.nan if diverged else m.get(k, math.nan)
                row["guard"] = ";".join(sorted(k[len("mode_guard."):] for k in tags if k.startswith("mode_guard.")))
                row["seconds"] = ((r.info.end_time or 0) - (r.info.start_time or 0)) / 1000
                if arm.scored == "checkpoint":
                    for k, v in m.items():
                        if k.startswith(("mcnemar/", "cost/", "control/")) or k.endswith(
                                ("/seconds", "/autograd_mb", "/peak_mem_mb")):
                            row[k] = v
                else:
                    hist = {k: _history(client, r.info.run_id, k) for k in HISTORY}
                    row["history"] = hist
                    # Timings: the best epoch of the run (noise on a shared machine only adds time);
                    # memory: the largest.
                    for k, how in (("time/train_epoch_s", "min"), ("val/seconds", "min"),
                                   ("val/autograd_mb", "max"), ("val/peak_mem_mb", "max")):
                        vals = hist.get(k) or _history(client, r.info.run_id, k)
                        row[f"{how}:{k}"] = float(getattr(pd.Series(vals[1], dtype=float), how)()) \
                            if vals and vals[1] else math.nan
            rows.append(row)
    return pd.DataFrame(rows)


def _history(client, run_id: str, key: str) -> tuple[list[int], list[float]]:
    h = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return [m.step for m in h], [m.value for m in h]


def _log_parent_end(parent: str, ab: Ablation, table: pd.DataFrame, files: dict, wall: float) -> None:
    from harness.tracking import MlflowTracker

    t = MlflowTracker(parent)
    metrics = {"ablation/wall_seconds": wall}
    for _, r in table.iterrows():
        if r["control"] and finite(r.get(f"{ab.spec.metric} diff")):
            metrics[f"effect/{r['arm']}/{ab.spec.metric.replace('/', '_')}"] = r[f"{ab.spec.metric} diff"]
    t.log_metrics(metrics, step=0)
    t.flush()
    for path in files.values():
        t.log_artifact(path, "ablation")


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


# -- command line ----------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
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
    p.add_argument("--resume", metavar="PARENT_RUN_ID",
                   help="continue an interrupted ablation: runs it already has are kept")
    p.add_argument("--dry-run", action="store_true", help="print the plan (arms, scoring, runs) and stop")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from harness.cli import setup_logging, user_errors

    setup_logging()
    with user_errors("analysis.ablation"):
        only = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None
        ab = load_ablation(args.spec, args.overrides, seeds=args.seeds, only=only)
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
    sys.exit(main())
