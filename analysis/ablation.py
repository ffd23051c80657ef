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
logged as artifacts of the parent run. The ablation spec (YAML)::

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
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from analysis import stats
from harness.spec import Spec, SpecError, UserError, load_spec

log = logging.getLogger("analysis.ablation")

METRICS = ("val/acc", "test/acc", "val/loss", "test/loss")
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


def _child_tags(ab: Ablation, arm: Arm, seed: int) -> dict[str, str]:
    return {"ablation": ab.spec.name, "ablation.arm": arm.name, "ablation.seed": str(seed),
            "ablation.scored": arm.scored, "ablation.control": arm.control or "",
            "ablation.task": f"{arm.name}/{seed}"}


def _run_training(tasks, parent: str, ab: Ablation, exp_id: str, workers: int, echo) -> list[str]:
    failures: list[str] = []
    if not tasks:
        return failures
    total = len(tasks)
    payloads = [(spec.model_dump(mode="json"), f"{arm.name}-s{seed}", parent, _child_tags(ab, arm, seed))
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


# -- scoring evaluation-only arms on the control's checkpoints ------------------------------------

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


def score_on_checkpoint(arm_spec: Spec, control_spec: Spec, checkpoint: str | Path, *,
                        repeats: int = 5) -> dict:
    """Evaluate one trained model (``checkpoint``) the control's way and the arm's way, on val and
    test, with a mode guard watching each. Returns per side and split the metrics, the per-example
    correctness, the best-of-``repeats`` evaluation time, and the arm's guard verdict and ledger.

    The weights are reloaded before every pass (an evaluation in training mode changes BatchNorm
    statistics), and every pass starts from the same seed, so MC dropout and the like are repeatable."""
    import torch

    from harness.checkpoint import load_checkpoint
    from harness.guard import ModeGuard
    from harness.loop import evaluate
    from harness.run import build

    state = load_checkpoint(checkpoint)
    sides = {"control": control_spec, "arm": arm_spec}
    parts = {side: build(spec) for side, spec in sides.items()}
    guards = {side: ModeGuard(p.model, frozen=p.policy.frozen,
                              allow_stochastic_eval=p.policy.allows_stochastic_eval)
              for side, p in parts.items()}
    out: dict[str, dict[str, Any]] = {side: {} for side in sides}
    for split in ("val", "test"):
        times: dict[str, list[float]] = {side: [] for side in sides}
        for rep in range(repeats):
            for side, p in parts.items():  # interleaved, so a busy neighbour slows both alike
                p.model.load_state_dict(state["model"])
                torch.manual_seed(sides[side].seed)
                first = rep == 0  # watched and kept; the timing is the best of the repeats
                r = evaluate(p.model, getattr(p.data, split), p.device, policy=p.policy,
                             guard=guards[side] if first else None, prefix=split, keep_predictions=first)
                times[side].append(r[f"{split}/seconds"])
                if first:
                    out[side][f"{split}_correct"] = (r.pop("predictions") == r.pop("targets")).numpy()
                    out[side][split] = r
        for side in sides:
            out[side][split][f"{split}/seconds"] = min(times[side])
    for side, guard in guards.items():
        report = guard.end_epoch(state["epoch"])
        guard.close()
        out[side].update(guard=guard.summary(), guard_count=report["count"], ledger=guard.ledger)
    return out


def score_arm(ab: Ablation, arm: Arm, seed: int, control_run_id: str, parent: str, exp_id: str) -> dict:
    """Score ``arm`` on the control run's last checkpoint and log it as a child run; its metrics."""
    import mlflow

    from harness.run import git_commit, mlflow_run
    from harness.tracking import MlflowTracker

    spec, cspec = ab.arm_spec(arm.name, seed), ab.arm_spec(arm.control, seed)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory(prefix="ablation-") as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=control_run_id,
                                                   artifact_path="checkpoints/last.pt", dst_path=tmp)
        s = score_on_checkpoint(spec, cspec, path)
    c, a = s["control"], s["arm"]
    epoch = spec.train.epochs
    metrics: dict[str, float] = {}
    for split in ("val", "test"):
        metrics.update({k: v for k, v in a[split].items()})
        metrics[f"cost/control_{split}_seconds"] = c[split][f"{split}/seconds"]
        mc = stats.mcnemar(c[f"{split}_correct"], a[f"{split}_correct"])
        metrics.update({f"mcnemar/{split}_b": mc.b, f"mcnemar/{split}_c": mc.c, f"mcnemar/{split}_p": mc.p_value})
        metrics[f"control/{split}_acc_rescored"] = c[split][f"{split}/acc"]
    metrics["mode_guard/findings"] = a["guard_count"]
    tags = {**_child_tags(ab, arm, seed), "ablation.scored_on": control_run_id,
            "checkpoint": f"runs:/{control_run_id}/checkpoints/last.pt", "spec_hash": spec.hash(),
            "mode_bug": spec.mode_bug, "git_commit": git_commit(), "torch_version": _torch_version()}
    tags.update({f"mode_guard.{k}": ",".join(v) for k, v in a["guard"].items()})
    with mlflow_run(experiment_id=exp_id, run_name=f"{arm.name}-s{seed}", parent_run_id=parent,
                    tags=tags) as run_id:
        t = MlflowTracker(run_id)
        t.log_params(spec.params())
        t.log_metrics(metrics, step=epoch)
        t.flush()
        t.log_dict({str(k): v for k, v in a["ledger"].items()}, "mode_guard/ledger.json")
        t.log_dict({split: {"control_correct": c[f"{split}_correct"].astype(int).tolist(),
                            "arm_correct": a[f"{split}_correct"].astype(int).tolist()}
                    for split in ("val", "test")}, "predictions.json")
    if c["guard"]:
        log.warning("the control's own evaluation was flagged by the mode guard: %s", c["guard"])
    return metrics


def _torch_version() -> str:
    import torch

    return torch.__version__


# -- collecting and analysing ---------------------------------------------------------------------

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


def analyse(ab: Ablation, runs: pd.DataFrame) -> pd.DataFrame:
    """Per arm: mean ± std of every metric, the paired difference from its control (bootstrap CI,
    paired t and Wilcoxon p, d_z), McNemar over examples (checkpoint arms), guard verdict, costs."""
    from harness.modes import get_policy

    rows = []
    for arm in ab.arms.values():
        mine = runs[runs["arm"] == arm.name].set_index("seed")
        row: dict[str, Any] = {"arm": arm.name, "scored": arm.scored, "control": arm.control or "",
                               "mode_bug": arm.spec.mode_bug, "note": arm.note,
                               "n": int((mine["status"] == "ok").sum()),
                               "diverged": int((mine["status"] == "diverged").sum()),
                               "missing": int((mine["status"] == "missing").sum())}
        for k in METRICS:
            s = stats.summarize(mine[k] if k in mine else [])
            row[f"{k} mean"], row[f"{k} std"] = s.mean, s.std
        if arm.control is not None:
            ctrl = runs[runs["arm"] == arm.control].set_index("seed")
            seeds = [s for s in ab.seeds if s in mine.index and s in ctrl.index]
            for k in METRICS:
                if k not in mine or k not in ctrl:
                    continue
                p = stats.paired_difference(mine.loc[seeds, k].to_numpy(float), ctrl.loc[seeds, k].to_numpy(float))
                row.update({f"{k} diff": p.mean_diff, f"{k} ci_low": p.ci_low, f"{k} ci_high": p.ci_high,
                            f"{k} p": p.p_value, f"{k} p_wilcoxon": p.p_wilcoxon, f"{k} d_z": p.d_z,
                            f"{k} pairs": p.n})
            row.update(_costs(arm, mine, ctrl))
            if arm.scored == "checkpoint":
                row.update(_mcnemar_summary(mine))
        # the verdict
        flagged = mine["guard"].fillna("").astype(str) if "guard" in mine else pd.Series(dtype=str)
        finished = mine[mine["status"] != "missing"]
        kinds = sorted({k for g in flagged for k in g.split(";") if k})
        n_flagged = int((flagged != "").sum())
        row["guard kinds"] = ",".join(kinds)
        row["guard flagged"] = n_flagged
        row["guard runs"] = len(finished)
        expected_flag = get_policy(arm.spec.mode_bug).name not in ("none", "mc_dropout")
        row["guard as expected"] = (n_flagged == len(finished)) if expected_flag else (n_flagged == 0)
        rows.append(row)
    return pd.DataFrame(rows)


def _costs(arm: Arm, mine: pd.DataFrame, ctrl: pd.DataFrame) -> dict:
    out: dict[str, float] = {}
    if arm.scored == "checkpoint":
        a = mine.get("val/seconds", pd.Series(dtype=float)) + mine.get("test/seconds", pd.Series(dtype=float))
        c = mine.get("cost/control_val_seconds", pd.Series(dtype=float)) + mine.get(
            "cost/control_test_seconds", pd.Series(dtype=float))
        out["eval time ratio"] = stats.ratio_of_medians(a.to_numpy(float), c.to_numpy(float))
        out["train time ratio"] = math.nan
        out["autograd MB"] = float(pd.concat([mine.get("val/autograd_mb", pd.Series(dtype=float)),
                                              mine.get("test/autograd_mb", pd.Series(dtype=float))]).max())
        return out

    def col(df, k):
        return df[k].to_numpy(float) if k in df else []

    out["train time ratio"] = stats.ratio_of_medians(col(mine, "min:time/train_epoch_s"),
                                                     col(ctrl, "min:time/train_epoch_s"))
    out["eval time ratio"] = stats.ratio_of_medians(col(mine, "min:val/seconds"), col(ctrl, "min:val/seconds"))
    vals = col(mine, "max:val/autograd_mb")
    out["autograd MB"] = float(pd.Series(vals, dtype=float).max()) if len(vals) else math.nan
    if "max:val/peak_mem_mb" in mine and "max:val/peak_mem_mb" in ctrl:
        out["eval peak MB extra"] = float(mine["max:val/peak_mem_mb"].median() - ctrl["max:val/peak_mem_mb"].median())
    return out


def _mcnemar_summary(mine: pd.DataFrame) -> dict:
    out = {}
    for split in ("val", "test"):
        b, c, p = (mine.get(f"mcnemar/{split}_{x}") for x in ("b", "c", "p"))
        if b is None:
            continue
        ok = p.notna()
        out[f"mcnemar {split} b"] = int(b[ok].sum())
        out[f"mcnemar {split} c"] = int(c[ok].sum())
        out[f"mcnemar {split} median p"] = float(p[ok].median()) if ok.any() else math.nan
        out[f"mcnemar {split} significant"] = int((p[ok] < 0.05).sum())
        out[f"mcnemar {split} seeds"] = int(ok.sum())
    return out


# -- reporting -------------------------------------------------------------------------------------

def _verdict(row) -> str:
    if row["guard runs"] == 0:
        return "n/a"
    kinds = row["guard kinds"]
    text = f"flagged {row['guard flagged']}/{row['guard runs']}: {kinds}" if kinds else \
        f"clean {row['guard runs']}/{row['guard runs']}"
    return text if row["guard as expected"] else f"{text} (UNEXPECTED)"


def _cost(row) -> str:
    parts = []
    if row["scored"] == "checkpoint":
        parts.append("no training")
    elif _finite(row.get("train time ratio")):
        parts.append(f"train epoch ×{row['train time ratio']:.2f}")
    if _finite(row.get("eval time ratio")):
        parts.append(f"eval ×{row['eval time ratio']:.2f}")
    if _finite(row.get("autograd MB")) and row["autograd MB"] > 0:
        parts.append(f"+{row['autograd MB']:.2f} MB autograd graph in eval")
    if _finite(row.get("eval peak MB extra")) and row["eval peak MB extra"] > 0:
        parts.append(f"+{row['eval peak MB extra']:.1f} MB CUDA peak")
    return ", ".join(parts)


def _mcnemar_text(row, split: str) -> str:
    if row["scored"] != "checkpoint" or not _finite(row.get(f"mcnemar {split} b")):
        return "—"
    return (f"b={int(row[f'mcnemar {split} b'])} c={int(row[f'mcnemar {split} c'])}; p<0.05 in "
            f"{int(row[f'mcnemar {split} significant'])}/{int(row[f'mcnemar {split} seeds'])} seeds "
            f"(median p {stats.fmt_p(row[f'mcnemar {split} median p'])})")


def display_table(ab: Ablation, table: pd.DataFrame) -> pd.DataFrame:
    """The headline table, as text cells."""
    m = ab.spec.metric
    split = m.split("/")[0]
    rows = []
    for _, r in table.iterrows():
        paired = _paired_from_row(r, m)
        n = f"{r['n']}" + (f" (+{r['diverged']} diverged)" if r["diverged"] else "") + (
            f" ({r['missing']} missing)" if r["missing"] else "")
        rows.append({
            "arm": r["arm"] + (" (control)" if not r["control"] else ""),
            "scored": "checkpoint" if r["scored"] == "checkpoint" else "trained",
            "vs": r["control"] or "—",
            "n": n,
            "val/acc": stats.fmt_mean_std(r["val/acc mean"], r["val/acc std"]),
            "test/acc": stats.fmt_mean_std(r["test/acc mean"], r["test/acc std"]),
            f"Δ {m} [95% CI]": stats.fmt_diff(paired) if paired else "—",
            "p (paired t)": stats.fmt_p(paired.p_value) if paired else "—",
            "d_z": stats.fmt_num(paired.d_z, 2) if paired else "—",
            f"McNemar ({split})": _mcnemar_text(r, split),
            "mode guard": _verdict(r),
            "cost": _cost(r) if r["control"] else "",
        })
    return pd.DataFrame(rows)


def loss_table(table: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, r in table.iterrows():
        row = {"arm": r["arm"]}
        for k in METRICS:
            row[k] = stats.fmt_mean_std(r[f"{k} mean"], r[f"{k} std"])
        for k in METRICS:
            p = _paired_from_row(r, k)
            row[f"Δ {k}"] = (stats.fmt_diff(p) + f" p={stats.fmt_p(p.p_value)}") if p else "—"
        rows.append(row)
    return pd.DataFrame(rows)


def _paired_from_row(r, k: str) -> stats.Paired | None:
    if not r.get("control") or f"{k} diff" not in r or pd.isna(r.get(f"{k} pairs")):
        return None
    return stats.Paired(int(r[f"{k} pairs"]), r[f"{k} diff"], r[f"{k} ci_low"], r[f"{k} ci_high"],
                        r[f"{k} p"], r[f"{k} p_wilcoxon"], r[f"{k} d_z"])


def write_report(ab: Ablation, table: pd.DataFrame, runs: pd.DataFrame, out: Path, *, parent_run_id: str,
                 wall_seconds: float, failures: Sequence[str] = ()) -> dict[str, Path]:
    from analysis.compare import to_markdown
    from analysis.plots import plot_curves, plot_effects
    from harness.stores import mask_url, tracking_uri

    out.mkdir(parents=True, exist_ok=True)
    files = {"report": out / "report.md", "arms": out / "arms.csv", "runs": out / "runs.csv",
             "effects": out / "effects.png", "curves": out / "curves.png"}
    table.to_csv(files["arms"], index=False)
    runs.drop(columns=["history"], errors="ignore").to_csv(files["runs"], index=False)

    effect_rows = []
    for _, r in table.iterrows():
        if not r["control"]:
            continue
        row = {"arm": f"{r['arm']} (vs {r['control']})", "style": "train" if r["scored"] == "train" else "checkpoint"}
        for k in ("val/acc", "test/acc"):
            row[k] = (r.get(f"{k} diff", math.nan), r.get(f"{k} ci_low", math.nan), r.get(f"{k} ci_high", math.nan))
        effect_rows.append(row)
    title = f"ablation {ab.spec.name}: {len(ab.seeds)} paired seeds"
    if effect_rows:
        plot_effects(effect_rows, files["effects"], metrics=["val/acc", "test/acc"], title=title)
    else:
        files.pop("effects")
    panels = []
    for key in ("val/acc", "train/loss"):
        groups = {}
        for arm in ab.arms.values():
            if arm.scored != "train":
                continue
            mine = runs[(runs["arm"] == arm.name) & runs["history"].notna()] if "history" in runs else runs.iloc[0:0]
            groups[arm.name] = [h[key] for h in mine["history"] if h and h.get(key)]
        panels.append((key, groups))
    plot_curves(panels, files["curves"], title=f"{title}: trained arms, mean ± std over seeds",
                log_metrics=("train/loss",))

    shown = display_table(ab, table)
    b = ab.base
    lines = [
        f"# Ablation `{ab.spec.name}`",
        "",
        f"- base spec: `{ab.spec.base}` ({b.data.dataset}, {b.model.arch}, dropout {b.model.dropout}, "
        f"batchnorm {b.model.batchnorm}, noise_std {b.model.noise_std}, {b.optimizer.name} lr {b.optimizer.lr}, "
        f"{b.train.epochs} epochs)",
        f"- seeds: {len(ab.seeds)} paired seeds ({ab.seeds[0]}..{ab.seeds[-1]}); every arm shares seed, "
        f"initial weights, data order and validation split with its control",
        f"- MLflow: experiment `{ab.experiment}`, parent run `{parent_run_id}` (`ablation:{ab.spec.name}`), "
        f"store `{mask_url(tracking_uri())}`",
        f"- wall time: {wall_seconds:.0f} s",
        "",
        f"## Effects on {ab.spec.metric}",
        "",
        "Δ is arm minus control, per seed, averaged; the 95% CI is a bootstrap (BCa) over seeds; p is the "
        "paired t-test (the Wilcoxon signed-rank p is in `arms.csv`); d_z is the mean difference over the "
        "standard deviation of the differences. Arms *scored on checkpoints* change only evaluation: "
        "they are evaluated on the control's own final checkpoint (no retraining), and McNemar's exact "
        "test compares the two evaluations example by example (b: examples only the control gets "
        "right, c: only the arm; counts summed over seeds, p per seed). The mode guard column is its "
        "verdict on that arm's runs. The cost column is the ratio to the control of the median over seeds "
        "of each run's best epoch time (trained arms) or of the best of 5 interleaved evaluations "
        "(checkpoint arms); the autograd graph is the memory a missing `torch.no_grad()` holds per "
        "validation batch (on CUDA, the extra peak memory).",
        "",
        to_markdown(shown),
        "## All metrics (mean ± std; Δ vs control with 95% CI and paired-t p)",
        "",
        to_markdown(loss_table(table)),
    ]
    if "effects" in files:
        lines += ["## Figures", "", "![effects](effects.png)", "", "![curves](curves.png)", ""]
    notes = [f"- **{r['arm']}**: {r['note']}" for _, r in table.iterrows() if r["note"]]
    if notes:
        lines += ["## Arms", "", *notes, ""]
    if failures:
        lines += ["## Failures", "", *[f"- {f}" for f in failures], ""]
    files["report"].write_text("\n".join(lines) + "\n")
    return files


def _log_parent_end(parent: str, ab: Ablation, table: pd.DataFrame, files: dict, wall: float) -> None:
    from harness.tracking import MlflowTracker

    t = MlflowTracker(parent)
    metrics = {"ablation/wall_seconds": wall}
    for _, r in table.iterrows():
        if r["control"] and _finite(r.get(f"{ab.spec.metric} diff")):
            metrics[f"effect/{r['arm']}/{ab.spec.metric.replace('/', '_')}"] = r[f"{ab.spec.metric} diff"]
    t.log_metrics(metrics, step=0)
    t.flush()
    for path in files.values():
        t.log_artifact(path, "ablation")


def _finite(x) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


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
    p.add_argument("--seeds", type=int, help="use seeds 0..N-1 instead of the spec's")
    p.add_argument("--arms", help="comma-separated subset of arms (their controls are added)")
    p.add_argument("--workers", type=int, help="parallel training processes (default: the spec's, 1); "
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
        if args.workers is not None and args.workers < 1:
            raise UserError("--workers must be >= 1")
        if args.seeds is not None and args.seeds < 1:
            raise UserError("--seeds must be >= 1")
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
