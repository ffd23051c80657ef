"""Scaling out, measured on this machine: trials per minute of the same sweep with 1, 2 and 3 workers
against PostgreSQL (Optuna) + an `mlflow server` (backed by PostgreSQL), and the per-trial overhead of
those servers against the local stores (Optuna journal file + MLflow SQLite).

    eval "$(scripts/servers.sh start)"          # PostgreSQL + mlflow server on 127.0.0.1
    python benchmarks/scale.py                  # ~5 min on 2 cores
    python benchmarks/scale.py --repeat 3 --trials 24 --local-workers 1,2,3   # steadier, ~25 min
    scripts/servers.sh stop

Every configuration runs the same sweep (random sampler seeded by the spec, no pruner, so every
trial trains the same params for the same number of epochs) as a fresh study, through the real CLI
(`python -m harness.sweep`). Two rates are printed: over the whole command (start-up, the parent
run, the summary and its plots included) and steady-state (trials / time from the first trial's
start to the last trial's end, from Optuna's timestamps). Ratios are taken side by side in one run;
absolute numbers depend on the machine and on whatever else runs on it.

Bookkeeping per trial (the 2x goal) is everything a worker does that is not training or validation
(the trials' own timing metrics): workers x steady span, minus the trials' training and validation,
over the trials. It counts what happens between one trial's end in Optuna and the next one's start (the
MLflow run's final tags, finding stale trials, counting, asking) as well as inside a trial; the inside
alone (each trial's Optuna duration minus its training and validation) is printed beside it.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "experiments" / "digits_lenet.yaml"


@dataclass
class Result:
    name: str
    workers: int
    trials: int
    wall_s: float
    span_s: float
    trial_s: float  # median duration of one trial (start to end in Optuna)
    overhead_s: float  # median of (trial duration - its training and validation time)
    between_s: float  # (workers x span - all trials' training and validation) / trials: with the gaps

    @property
    def per_min_wall(self) -> float:
        return 60 * self.trials / self.wall_s

    @property
    def per_min_steady(self) -> float:
        return 60 * self.trials / self.span_s


def sweep(name: str, workers: int, storage: str | None, tracking_uri: str, workdir: Path,
          args: argparse.Namespace) -> Result:
    study = f"scale-{name}-w{workers}-{uuid.uuid4().hex[:6]}"
    cmd = [sys.executable, "-m", "harness.sweep", str(args.spec), "--n-trials", str(args.trials),
           "--workers", str(workers), "--study", study, "--sampler", "random", "--pruner", "none",
           "--quiet", f"train.epochs={args.epochs}", *args.overrides]
    if storage:
        cmd += ["--storage", storage]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"scale.py: {name} with {workers} worker(s) failed (exit {out.returncode}):\n"
                 f"{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    trials = _finished_trials(storage or str(workdir / "mlruns" / "optuna.journal"), study)
    if len(trials) != args.trials:
        sys.exit(f"scale.py: {name}: expected {args.trials} finished trials, found {len(trials)}")
    span = (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials]
    computes = [_compute_s(tracking_uri, t.user_attrs["mlflow_run_id"]) for t in trials]
    overheads = [d - c for d, c in zip(durations, computes)]
    return Result(name, workers, len(trials), wall, span, statistics.median(durations),
                  statistics.median(overheads), (workers * span - sum(computes)) / len(trials))


def _compute_s(tracking_uri: str, run_id: str) -> float:
    """Seconds a trial spent training and validating (its per-epoch timing metrics): the rest of its
    duration is bookkeeping: MLflow logging, checkpoints, the model, Optuna's reports."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    return sum(m.value for key in ("time/train_epoch_s", "val/seconds")
               for m in client.get_metric_history(run_id, key))


def _finished_trials(storage: str, study: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if "://" in storage:
        st = storage
    else:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        st = JournalStorage(JournalFileBackend(storage))
    s = optuna.load_study(study_name=study, storage=st)
    return s.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                optuna.trial.TrialState.PRUNED))


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/scale.py", description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", metavar="key=value", help="spec overrides for every trial")
    p.add_argument("--spec", default=str(SPEC))
    p.add_argument("--trials", type=int, default=12, help="trials per sweep (default 12)")
    p.add_argument("--epochs", type=int, default=5, help="epochs per trial (default 5)")
    p.add_argument("--workers", type=_ints, default=[1, 2, 3], help="worker counts on the servers (1,2,3)")
    p.add_argument("--local-workers", type=_ints, default=[1],
                   help="worker counts on the local stores (default 1: the overhead baseline)")
    p.add_argument("--repeat", type=int, default=1, help="rounds over every configuration; medians")
    args = p.parse_args(argv)
    pg, server = os.environ.get("HARNESS_PG_URL"), os.environ.get("HARNESS_MLFLOW_URL")
    if not pg or not server:
        sys.exit('scale.py: HARNESS_PG_URL / HARNESS_MLFLOW_URL not set: run eval "$(scripts/servers.sh '
                 'start)" first')
    from harness.core.device import cores
    from harness.errors import mask_url

    print(f"sweep of {args.trials} trials x {args.epochs} epochs ({Path(args.spec).name}, random sampler, "
          f"no pruner) on {cores()} cores; load average {os.getloadavg()[0]:.1f} at start")
    print(f"servers: optuna {mask_url(pg)}, mlflow {mask_url(server)}")
    from harness.tracking.store import keepalive_delay

    chosen = os.environ.get("HARNESS_MLFLOW_NEW_CONNECTIONS")
    print(f"mlflow server: a request on a kept-alive connection {1000 * keepalive_delay(server):+.0f} ms "
          f"against one on a new connection (~+40 ms: its uvicorn workers lack TCP_NODELAY); "
          + (f"HARNESS_MLFLOW_NEW_CONNECTIONS={chosen} set" if chosen else "the harness chooses"))
    print(f"command: python benchmarks/scale.py {' '.join(shlex.quote(a) for a in (argv or sys.argv[1:]))}",
          flush=True)
    configs = [("local", k) for k in args.local_workers] + [("servers", k) for k in args.workers]
    runs: dict[tuple[str, int], list[Result]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="harness-scale-") as tmp:
        for rep in range(args.repeat):  # round-robin, so drifting background load hits every config
            for name, k in configs:
                work = Path(tmp) / f"{name}-{k}-{rep}"
                work.mkdir()
                if name == "local":
                    r = sweep(name, k, None, f"sqlite:///{work / 'mlflow.db'}", work, args)
                else:
                    r = sweep(name, k, pg, server, work, args)
                runs[(name, k)].append(r)
                _row(r)
    results = [_median(rs) for rs in runs.values()]
    if args.repeat > 1:
        print(f"medians of {args.repeat} rounds:")
        for r in results:
            _row(r)
    _ratios(results)
    if ("servers", 1) in runs and ("local", 1) in runs:  # the goal: within 2x of the local stores
        pairs = list(zip(runs[("servers", 1)], runs[("local", 1)]))
        per_round = sorted(s.between_s / l.between_s for s, l in pairs)
        inside = sorted(s.overhead_s / l.overhead_s for s, l in pairs)
        print(f"bookkeeping per trial, servers / local stores (1 worker, goal <= 2x): "
              f"{statistics.median(per_round):.2f}x (rounds {per_round[0]:.2f}-{per_round[-1]:.2f}x); "
              f"inside a trial (ask to tell) only: {statistics.median(inside):.2f}x "
              f"({inside[0]:.2f}-{inside[-1]:.2f}x)")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


def _median(rs: list[Result]) -> Result:
    med = statistics.median
    return Result(rs[0].name, rs[0].workers, rs[0].trials, med(r.wall_s for r in rs),
                  med(r.span_s for r in rs), med(r.trial_s for r in rs), med(r.overhead_s for r in rs),
                  med(r.between_s for r in rs))


def _row(r: Result) -> None:
    label = "journal + SQLite" if r.name == "local" else "PostgreSQL + mlflow server"
    print(f"  {label:27s} {r.workers} worker(s): {r.per_min_steady:6.1f} trials/min steady "
          f"({r.per_min_wall:5.1f} over the whole command, {r.wall_s:4.0f} s); a trial: {r.trial_s:5.2f} s, "
          f"of which {r.overhead_s:5.2f} s not training; {r.between_s:5.2f} s with the gaps between trials",
          flush=True)


def _ratios(results: list[Result]) -> None:
    servers = {r.workers: r for r in results if r.name == "servers"}
    local = {r.workers: r for r in results if r.name == "local"}
    if 1 in servers:
        base = servers[1]
        for k, r in sorted(servers.items()):
            if k != 1:
                print(f"{k} workers / 1 worker on the servers: {r.per_min_steady / base.per_min_steady:.2f}x "
                      f"steady, {r.per_min_wall / base.per_min_wall:.2f}x over the whole command")
    for k, r in sorted(local.items()):
        if k != 1 and 1 in local:
            print(f"{k} workers / 1 worker on the local stores: "
                  f"{r.per_min_steady / local[1].per_min_steady:.2f}x steady")
    if 1 in servers and 1 in local:
        s, l = servers[1], local[1]
        extra = s.between_s - l.between_s
        print(f"per-trial overhead of PostgreSQL + mlflow server vs the local stores (1 worker): "
              f"{extra:+.2f} s a trial ({s.between_s:.2f} s vs {l.between_s:.2f} s of each trial spent "
              f"outside training and validation, the gaps between trials included); steady rate "
              f"{s.per_min_steady / l.per_min_steady:.2f}x of the local stores'")


if __name__ == "__main__":
    sys.exit(main())
