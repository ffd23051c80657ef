"""What pruning and parallel workers buy a sweep, measured with the real command side by side.

    python benchmarks/sweep.py                      # both parts (~10 min on a quiet 2-core laptop)
    python benchmarks/sweep.py --part pruning --trials 20 --epochs 30
    python benchmarks/sweep.py --part workers --worker-trials 40 --worker-epochs 20

(1) pruning: the same sweep with ``--pruner median`` and ``--pruner none``. The random sampler is used
    by default: the sweep seeds it per trial from (spec seed, trial number), so both sweeps propose the
    very same trials and the only difference is pruning. Prints the fraction of epochs saved
    (goal >= 40%) and both best val/acc (goal: within 0.5 points).
(2) workers: the same sweep (no pruning, so every trial costs the same) with ``--workers 1`` and
    ``--workers 2``. Prints trials per minute end to end (the command's wall time, process start-up
    included) and in steady state (first trial start to last trial end), and the ratio (goal >= 1.6x
    on 2 cores). One worker gets all the cores' torch threads, two workers half each; a third run, one
    worker with one thread, separates what processes buy from what threads cost.

Every sweep runs in a fresh temporary directory (its own mlflow.db and journal), offline, on digits.
Absolute times depend on the machine and its load; the ratios are the result.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "experiments" / "digits_lenet.yaml"


def run_sweep(workdir: Path, study: str, args: list[str]) -> float:
    """Run ``python -m harness.sweep`` in workdir; its wall time in seconds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}
    cmd = [sys.executable, "-m", "harness.sweep", str(SPEC), "--study", study, "--quiet", *args]
    print("  $ " + " ".join(["python -m harness.sweep", str(SPEC.relative_to(ROOT)), "--study", study,
                             "--quiet", *args]), flush=True)
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"sweep failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return wall


def load(workdir: Path, study: str):
    import optuna

    from harness.sweep.storage import optuna_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    journal = workdir / "mlruns" / "optuna.journal"
    return optuna.load_study(study_name=study, storage=optuna_storage(str(journal)))


def epochs_trained(study) -> int:
    return sum(int(t.user_attrs.get("epochs") or len(t.intermediate_values)) for t in study.trials
               if t.state.name in ("COMPLETE", "PRUNED"))


def pruning(tmp: Path, trials: int, epochs: int, sampler: str) -> None:
    print(f"\n(1) pruning: {trials} trials x {epochs} epochs, {sampler} sampler, median pruner vs none")
    # One torch thread: the epoch counts do not depend on it, and on a shared machine two threads of a
    # tiny model spin against other processes (10x slower) and drown the wall times in noise.
    common = ["--n-trials", str(trials), "--sampler", sampler, f"train.epochs={epochs}", "train.threads=1"]
    wall = {p: run_sweep(tmp, f"prune-{p}", [*common, "--pruner", p]) for p in ("median", "none")}
    pruned, full = load(tmp, "prune-median"), load(tmp, "prune-none")
    e_pruned, e_full = epochs_trained(pruned), epochs_trained(full)
    saved = 1 - e_pruned / e_full
    n_pruned = sum(t.state.name == "PRUNED" for t in pruned.trials)
    diff = 100 * (full.best_value - pruned.best_value)
    print(f"  epochs trained: {e_pruned} with pruning, {e_full} without -> {saved:.0%} saved "
          f"({n_pruned} of {trials} trials pruned)  [goal >= 40%: {'met' if saved >= 0.4 else 'NOT met'}]")
    print(f"  best val/acc: {pruned.best_value:.4f} with pruning (trial {pruned.best_trial.number}), "
          f"{full.best_value:.4f} without (trial {full.best_trial.number}) -> {diff:+.2f} points  "
          f"[goal within 0.5: {'met' if abs(diff) <= 0.5 else 'NOT met'}]")
    print(f"  wall time: {wall['median']:.0f}s with pruning, {wall['none']:.0f}s without "
          f"({1 - wall['median'] / wall['none']:.0%} saved)")


def steady_rate(study) -> float:
    """Trials per minute from the first trial's start to the last trial's end."""
    done = [t for t in study.trials if t.datetime_complete is not None]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    return 60 * len(done) / span


def workers(tmp: Path, trials: int, epochs: int) -> None:
    print(f"\n(2) workers: {trials} trials x {epochs} epochs, no pruning, 1 worker vs 2 "
          f"({os.cpu_count()} cores)")
    common = ["--n-trials", str(trials), "--sampler", "random", "--pruner", "none", f"train.epochs={epochs}"]
    runs = {"1 worker": ("w1", ["--workers", "1"]),
            "2 workers": ("w2", ["--workers", "2"]),
            "1 worker, 1 thread": ("w1t1", ["--workers", "1", "train.threads=1"])}
    rows = {}
    for label, (study, extra) in runs.items():
        wall = run_sweep(tmp, study, [*common, *extra])
        rows[label] = (60 * trials / wall, steady_rate(load(tmp, study)), wall)
    for label, (e2e, steady, wall) in rows.items():
        print(f"  {label:<20} {e2e:6.1f} trials/min end to end ({wall:.0f}s), "
              f"{steady:6.1f} in steady state")
    r_e2e = rows["2 workers"][0] / rows["1 worker"][0]
    r_steady = rows["2 workers"][1] / rows["1 worker"][1]
    r_t1 = rows["2 workers"][1] / rows["1 worker, 1 thread"][1]
    print(f"  2 workers / 1 worker: {r_e2e:.2f}x end to end, {r_steady:.2f}x steady state  "
          f"[goal >= 1.6x: {'met' if r_e2e >= 1.6 else 'NOT met'}]")
    print(f"  2 workers / 1 worker with 1 thread: {r_t1:.2f}x steady state (processes alone)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("pruning", "workers", "all"), default="all")
    p.add_argument("--trials", type=int, default=20, help="trials of the pruning sweep (default 20)")
    p.add_argument("--epochs", type=int, default=30, help="epochs a trial, pruning sweep (default 30)")
    p.add_argument("--sampler", choices=("random", "tpe"), default="random",
                   help="pruning sweep's sampler (default random: identical proposals in both sweeps)")
    p.add_argument("--worker-trials", type=int, default=40,
                   help="trials of the workers sweep (default 40)")
    p.add_argument("--worker-epochs", type=int, default=20,
                   help="epochs a trial, workers sweep (default 20)")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    print(f"benchmarks/sweep.py on {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} "
          f"(other processes on the machine skew absolute times)")
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as d:
        tmp = Path(d)
        # Create MLflow's tables once, so no timed sweep pays for the schema migrations.
        subprocess.run([sys.executable, "-c", "import sys, mlflow; mlflow.MlflowClient(sys.argv[1])"
                        ".search_experiments()", f"sqlite:///{tmp / 'mlflow.db'}"],
                       check=True, capture_output=True)
        if args.part in ("pruning", "all"):
            pruning(tmp, args.trials, args.epochs, args.sampler)
        if args.part in ("workers", "all"):
            workers(tmp, args.worker_trials, args.worker_epochs)


if __name__ == "__main__":
    main()
