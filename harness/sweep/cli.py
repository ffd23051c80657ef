"""python -m harness.sweep [SPEC] [options] [key=value ...]: an Optuna search over the spec's ``search:``
block, every trial a nested MLflow run under one parent run per study; prunable, resumable, parallel.

The pieces: ``harness.sweep.context`` opens the spec, study and stores, ``harness.sweep.worker`` runs
trials (``harness.run`` is the objective), ``harness.sweep.report`` writes the end-of-sweep summary; this
module is the command line and the process fan-out of ``--workers``.
"""
from __future__ import annotations

import argparse
import os
import sys

from harness.cli import MAX_NAME, Parser, name_of, positive, positive_int, sigterm_as_interrupt

DEFAULT_SPEC = "experiments/digits_lenet.yaml"
# 30 trials x 20 epochs of LeNet on digits: ~1 s a trial on a laptop core, about a minute of training
# in all (less with pruning); TPE has 10 random startup trials and 20 guided ones.
DEFAULT_N_TRIALS = 30
SAMPLERS = ("tpe", "random", "grid")  # harness.sweep.space builds each
PRUNERS = ("median", "hyperband", "none")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(
        prog="python -m harness.sweep",
        description="Search the spec's search: block (default optimizer.lr, optimizer.momentum, "
                    "model.dropout) with Optuna; every trial is a child MLflow run under one parent run "
                    "'sweep:<study>'. Re-running the same command resumes the study.",
        epilog=f"examples:\n  python -m harness.sweep\n"
               f"  python -m harness.sweep {DEFAULT_SPEC} --n-trials 50 --workers 2 train.epochs=10\n"
               f"  python -m harness.sweep --storage postgresql+psycopg2://user@db/optuna --study team\n"
               "stores: MLFLOW_TRACKING_URI (default sqlite:///mlflow.db) and --storage (default the "
               "journal file mlruns/optuna.journal)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("spec", nargs="?", default=None,
                   help=f"experiment spec (YAML); default {DEFAULT_SPEC}")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="typed spec overrides applied to every trial, e.g. train.epochs=10")
    p.add_argument("--n-trials", type=positive_int, default=DEFAULT_N_TRIALS, metavar="N",
                   help=f"finished trials (COMPLETE + PRUNED) the study should have in total; a re-run "
                        f"only adds the missing ones (default {DEFAULT_N_TRIALS})")
    p.add_argument("--timeout", type=positive(float, "seconds"), metavar="S",
                   help="start no new trial after S seconds (running trials finish)")
    p.add_argument("--workers", type=positive_int, default=1, metavar="K",
                   help="worker processes on this machine sharing the study, each with cores/K threads")
    p.add_argument("--study", type=name_of(MAX_NAME - len("sweep:")),  # the parent run is sweep:<study>
                   help="study name (default <spec name>-<spec hash>, so the same spec and overrides resume "
                        "the same study)")
    p.add_argument("--storage", metavar="URL",
                   help="Optuna storage: a journal file path, sqlite:///..., postgresql://... "
                        "(default mlruns/optuna.journal)")
    p.add_argument("--pruner", choices=PRUNERS, default="median",
                   help="stop bad trials early from their per-epoch objective (default median)")
    p.add_argument("--sampler", choices=SAMPLERS, default="tpe",
                   help="how trials are proposed, seeded from the spec's seed (default tpe)")
    p.add_argument("--retry-failed", action="store_true",
                   help="also run again, with the same params, trials that FAILed by crashing "
                        "(trials of a killed worker are always queued again)")
    p.add_argument("--heartbeat", type=positive_int, default=None, metavar="S",
                   help="RDB storages: heartbeat interval; a trial silent 3x this long is stale "
                        "(default 10)")
    p.add_argument("--check-storage", action="store_true",
                   help="check the Optuna storage and the MLflow store, then exit")
    p.add_argument("--log-models", action="store_true",
                   help="log each trial's final model (default: trials keep their checkpoints; the best "
                        "params' harness.train line logs the model)")
    p.add_argument("--quiet", action="store_true", help="no per-trial lines")
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    # Intermixed: 'SPEC key=v --n-trials 3 key2=v' puts every key=value in overrides.
    args = p.parse_intermixed_args(argv)
    if args.spec is not None and "=" in args.spec and not args.spec.endswith((".yaml", ".yml")):
        args.overrides.insert(0, args.spec)  # 'python -m harness.sweep train.epochs=5'
        args.spec = None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from harness.cli import setup_logging, user_errors
    from harness.core.device import check_workers, prepare_threads

    # Before torch loads (OpenMP reads its wait policy once); a worker's share of the cores.
    prepare_threads(args.workers if args.worker_index is not None else 1)

    setup_logging()
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    with user_errors("harness.sweep"):
        if args.check_storage:
            return _check_storage(args)
        from harness.sweep.storage import check_optuna_storage

        check_optuna_storage(args.storage, args.workers)  # before anything slow
        if args.worker_index is None:  # the parent, before its workers take memory
            check_workers(args.workers)
        if args.spec is None:
            args.spec = _default_spec()
        if args.worker_index is not None:
            return _worker(args)
        return _sweep(args)
    return 2  # unreachable: user_errors exits


def _sweep(args: argparse.Namespace) -> int:
    """The command: open the study and its parent run, clean up after dead workers, run the trials
    (here or in K worker processes), then print and log the summary."""
    import time

    from harness.sweep import parent, worker
    from harness.sweep import report as sweep_report
    from harness.sweep.context import open_context

    t0 = time.perf_counter()
    # SIGTERM is Ctrl-C from the study's opening to the summary's end: a parent run created, or marked
    # RUNNING, then ends KILLED instead of staying RUNNING (it was the default action, a silent exit).
    with sigterm_as_interrupt():
        ctx = open_context(args, on_stale=worker.on_stale)
        try:
            parent.ensure_parent_run(ctx)
            worker.cleanup_stale(ctx)
            if args.retry_failed:
                n = worker.retry_failed_trials(ctx)
                if n:
                    print(f"queued {n} failed trial(s) to run again with the same params", flush=True)
            _print_header(ctx)
            parent.set_parent_status(ctx, "RUNNING")
        except KeyboardInterrupt:
            if ctx.parent_run_id:
                parent.set_parent_status(ctx, "KILLED")
            raise
        rc = _trials(args, ctx)
        summary = sweep_report.summarize(ctx)
        sweep_report.print_summary(ctx, summary)
        sweep_report.log_to_parent(ctx, summary)
    print(f"sweep took {time.perf_counter() - t0:.0f}s", flush=True)
    if rc:
        print("harness.sweep: some trials crashed (see the errors above); fix the cause and run the same "
              "command again to resume", file=sys.stderr)
    return rc


def _trials(args: argparse.Namespace, ctx) -> int:
    """The trials, here or in K worker processes; the parent run ends with their outcome."""
    from harness.errors import TrackingServerGone
    from harness.sweep import parent, worker
    from harness.tracking import sysmetrics

    status: str | None = "FAILED"
    try:
        # The machine's load over the whole sweep, on the parent run (each trial has its own too).
        with sysmetrics.sampling(ctx.parent_run_id, resume=True):
            if args.workers == 1:
                rc = worker.run_worker(ctx, on_trial=_printer(ctx))
            else:
                rc = _run_workers(args, ctx)
        status = "FINISHED" if rc == 0 else "FAILED"
    except KeyboardInterrupt:
        status = "KILLED"
        print("harness.sweep: run the same command again to resume the study", file=sys.stderr)
        raise
    except TrackingServerGone:
        status = None  # MLflow is gone: the parent run is marked again by the next start
        raise
    finally:
        if status is not None:
            parent.set_parent_status(ctx, status)
    return rc


def _worker(args: argparse.Namespace) -> int:
    """One of K worker processes started by ``_sweep``: trials only, no summary; its share of the cores
    was set by ``main``."""
    from harness.sweep import parent, worker
    from harness.sweep.context import open_context

    ctx = open_context(args, label=f"w{args.worker_index}", on_stale=worker.on_stale)
    ctx.parent_run_id = ctx.study.user_attrs[parent.PARENT_ATTR]
    with sigterm_as_interrupt():
        return worker.run_worker(ctx, on_trial=_printer(ctx))


def _printer(ctx):
    from harness.sweep.report import trial_line

    def on_trial(trial, outcome) -> None:
        if not ctx.quiet:
            print(trial_line(trial, outcome, ctx.spec.search.metric, ctx.label if ctx.workers > 1 else ""),
                  flush=True)

    return on_trial


def _print_header(ctx) -> None:
    from harness.errors import mask_url
    from harness.sweep import study as st
    from harness.sweep.storage import optuna_storage_display
    from harness.tracking.store import tracking_uri

    c = st.counts(ctx.study)
    done = c.get("COMPLETE", 0) + c.get("PRUNED", 0)
    resumed = f", resuming with {done} finished" if done else ""
    print(f"sweep {ctx.study_name}: {ctx.n_trials} trials{resumed}; {ctx.sampler} sampler (seed "
          f"{ctx.spec.seed}), {ctx.pruner} pruner, {ctx.workers} worker(s)", flush=True)
    print(f"  {ctx.spec_path}: {ctx.spec.search.direction} {ctx.spec.search.metric} over "
          f"{', '.join(ctx.space)}; {ctx.spec.train.epochs} epochs a trial", flush=True)
    print(f"  optuna {optuna_storage_display(ctx.storage_url)}; mlflow {mask_url(tracking_uri())}, "
          f"experiment {ctx.spec.name}, parent run sweep:{ctx.study_name} ({ctx.parent_run_id})",
          flush=True)


def _run_workers(args: argparse.Namespace, ctx) -> int:
    """K copies of this command with --worker-index, sharing the study; the first bad exit status."""
    import signal
    import subprocess
    from pathlib import Path

    base = [sys.executable, "-m", "harness.sweep", ctx.spec_path, *ctx.overrides,
            "--n-trials", str(args.n_trials), "--workers", str(args.workers), "--study", ctx.study_name,
            "--pruner", args.pruner, "--sampler", args.sampler]
    for flag, value in (("--timeout", args.timeout), ("--storage", args.storage),
                        ("--heartbeat", args.heartbeat)):
        if value is not None:
            base += [flag, str(value)]
    base += ["--retry-failed"] * args.retry_failed + ["--quiet"] * args.quiet + ["--log-models"] * args.log_models
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    procs = [subprocess.Popen(base + ["--worker-index", str(i)], env=env) for i in range(args.workers)]

    def forward(signum, frame):  # SIGTERM to the sweep: every worker ends its trial as KILLED
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:  # Ctrl-C reached the workers too (same process group): let them finish
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    bad = [c for c in codes if c != 0]
    if any(c == 2 for c in bad):
        raise SystemExit(2)  # a user error; the worker printed its one line
    return bad[0] if bad else 0


def _default_spec() -> str:
    from pathlib import Path

    from harness.errors import SpecError

    if Path(DEFAULT_SPEC).is_file():
        return DEFAULT_SPEC
    packaged = Path(__file__).resolve().parents[2] / DEFAULT_SPEC
    if packaged.is_file():
        return str(packaged)
    raise SpecError(f"{DEFAULT_SPEC}: the default spec is not here; pass a spec path")


def _check_storage(args: argparse.Namespace) -> int:
    """``--check-storage``: the storage doctor (harness.sweep.doctor) on this sweep's stores and study."""
    from harness.sweep import doctor

    study = args.study
    if study is None:
        from harness.spec import load_spec
        from harness.sweep.study import default_study_name

        study = default_study_name(load_spec(args.spec or _default_spec(), args.overrides))
    argv = ["--workers", str(args.workers), "--study", study]
    if args.storage:
        argv += ["--storage", args.storage]
    if args.heartbeat:
        argv += ["--grace-period", str(3 * args.heartbeat)]
    return int(doctor.main(argv) or 0)

