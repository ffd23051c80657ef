"""A shared machine: seconds per epoch of ``python -m harness.train`` alone and beside one competing
CPU-bound process, with the harness's thread policy, with a fixed count and with torch's defaults.

    python benchmarks/shared.py                       # 3 rounds, ~6 min on 2 cores
    python benchmarks/shared.py --rounds 5 --candidates
    python benchmarks/shared.py --data-root ~/data    # real MNIST files (<root>/MNIST/raw/*-ubyte)

Every measurement is the real command on MNIST-sized data (generated MNIST-format files, 10,000 train /
2,000 validation 28x28 images, or your own with ``--data-root``), LeNet, batch 100, in a fresh
temporary SQLite store. An epoch is the run's own ``time/train_epoch_s + val/seconds``; the first
epoch is a warm-up and is not counted; start-up is not counted (see ``benchmarks/startup.py``).
"Beside" means one ``python -c 'while True: pass'`` started by this script just before the command
and stopped after it, the kind of neighbour a laptop's browser tab or another sweep is.

Settings ("arms"), each a way a user could run the same command:

  policy    the harness's default: one torch thread per core, cut to the cores other processes
            leave free (measured over the run's start-up); OpenMP's waiting threads asleep
            (OMP_WAIT_POLICY=PASSIVE) when other processes run as it starts, else OpenMP's default;
            see harness/core/device.py
  fixed     one thread per core whatever the load (train.threads=<cores>), with the same wait
            policy: the harness's default before, and the count of a train.deterministic=true run
  torch     what the harness did first: torch's defaults, i.e. one thread per core (train.threads=
            <cores>) with OpenMP's default wait policy (spin ~300,000 times, then sleep), set as GOMP_SPINCOUNT=300000,
            libgomp's documented default, which the policy leaves alone as a user's setting
  --candidates adds: ``1 thread`` (train.threads=1, the policy's wait), ``spin 1000``
            (GOMP_SPINCOUNT=1000: a short spin, then sleep) and ``active`` (OMP_WAIT_POLICY=ACTIVE)

Printed: every run as it ends; then per arm the median seconds per epoch alone and beside, with
min-max over rounds; beside/alone per arm (goal for the policy: <= 1.5); and the policy's cost alone
against the fixed count alone (the default before; goal: <= 1.02), each a median of per-round ratios
between runs made back to back. The load average is printed at the start, every round and at the end: the "alone" runs
share the machine with whatever else runs on it.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SPEC = ROOT / "experiments" / "digits_lenet.yaml"

from harness.core.device import cores  # noqa: E402  (imports no torch)

CORES = cores()  # the cores this process may run on, as the thread policy counts them
ARMS = {  # name: (environment, spec overrides)
    "policy": ({}, []),
    "fixed": ({}, [f"train.threads={CORES}"]),
    "torch": ({"GOMP_SPINCOUNT": "300000"}, [f"train.threads={CORES}"]),
}
CANDIDATES = {
    "1 thread": ({}, ["train.threads=1"]),
    "spin 1000": ({"GOMP_SPINCOUNT": "1000"}, []),
    "active": ({"OMP_WAIT_POLICY": "ACTIVE"}, []),
}
CONDITIONS = ("alone", "beside")
COMPETITOR = [sys.executable, "-c", "while True: pass"]


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    """``median (min-max)``."""
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def per_epoch(uri: str, run_id: str) -> list[float]:
    """Seconds of each epoch after the first: training + validation, as the run logged them."""
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    train = {m.step: m.value for m in c.get_metric_history(run_id, "time/train_epoch_s")}
    val = {m.step: m.value for m in c.get_metric_history(run_id, "val/seconds")}
    return [train[s] + val[s] for s in sorted(train) if s > 1]


def run_once(work: Path, data_args: list[str], env_extra: dict, overrides: list[str], beside: bool,
             epochs: int, tag: str) -> tuple[float, str]:
    """One ``python -m harness.train``; its median seconds per epoch (warm-up epoch left out), and the
    threads and OpenMP wait policy it ran with."""
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                                            "OMP_NUM_THREADS")}
    env.update(PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=uri, MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false",
               **env_extra)
    cmd = [sys.executable, "-m", "harness.train", str(SPEC), *data_args, f"train.epochs={epochs + 1}",
           "train.log_model=false", *overrides, "--quiet", "--run-name", tag]
    competitor = subprocess.Popen(COMPETITOR) if beside else None
    try:
        out = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    found = re.search(r"^run (\w+):", out.stdout, re.M)
    if out.returncode != 0 or not found:
        sys.exit(f"shared.py: {tag} failed (exit {out.returncode}):\n{out.stdout[-1500:]}\n{out.stderr[-3000:]}")
    from mlflow import MlflowClient

    params = MlflowClient(uri).get_run(found.group(1)).data.params
    threads, wait = params.get("train.threads_used", "?"), params.get("train.omp_wait_policy", "?")
    chosen = f"{threads} thread(s), wait policy {wait}"
    return statistics.median(per_epoch(uri, found.group(1))), chosen


def data_overrides(args, work: Path) -> list[str]:
    """MNIST-format files: the user's (--data-root) or generated ones, MNIST-sized."""
    if args.data_root:
        root = Path(args.data_root).expanduser()
        if not (root / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
            sys.exit(f"shared.py: --data-root {root}: no MNIST/raw/train-images-idx3-ubyte in it")
        return ["data.dataset=mnist", f"data.root={root}", "data.download=false", "data.val_fraction=0.1666667"]
    from overhead import make_idx_files

    make_idx_files(work / "data", args.train + args.val, 1000)
    frac = args.val / (args.train + args.val)
    return ["data.dataset=mnist", f"data.root={work / 'data'}", "data.download=false", f"data.val_fraction={frac}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/shared.py", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds over every arm and condition (default 3)")
    p.add_argument("--epochs", type=int, default=4, help="timed epochs per run, after one warm-up (default 4)")
    p.add_argument("--train", type=int, default=10_000, help="generated training examples (default 10000)")
    p.add_argument("--val", type=int, default=2_000, help="generated validation examples (default 2000)")
    p.add_argument("--data-root", help="real MNIST files instead of generated ones (<root>/MNIST/raw)")
    p.add_argument("--candidates", action="store_true", help="also measure the other candidate settings")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM ends like Ctrl-C: cleaned up
    arms = {**ARMS, **(CANDIDATES if args.candidates else {})}
    print(f"{len(arms)} arm(s) x {len(CONDITIONS)} conditions x {args.rounds} round(s), {args.epochs} timed "
          f"epochs each, LeNet on {'MNIST files in ' + args.data_root if args.data_root else 'generated MNIST-sized data'}; "
          f"{CORES} cores; {load()}", flush=True)
    times: dict[tuple[str, str], list[float]] = {(a, c): [] for a in arms for c in CONDITIONS}
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="harness-shared-") as tmp:
            work = Path(tmp)
            data_args = data_overrides(args, work)
            for rnd in range(1, args.rounds + 1):
                print(f"round {rnd}/{args.rounds} ({load()})", flush=True)
                order = [(a, c) for c in CONDITIONS for a in arms]
                for arm, cond in (order if rnd % 2 else order[::-1]):  # drifting load hits all alike
                    env, overrides = arms[arm]
                    s, chosen = run_once(work, data_args, env, overrides, cond == "beside", args.epochs,
                                         f"{arm}-{cond}-{rnd}")
                    times[(arm, cond)].append(s)
                    print(f"  {arm:10s} {cond:6s} {s:6.3f} s/epoch  [{time.perf_counter() - t0:4.0f} s]  "
                          f"{chosen}", flush=True)
    except KeyboardInterrupt:
        print("shared.py: interrupted; the results so far:", file=sys.stderr, flush=True)
    report(arms, times, args.rounds)
    print(f"{load()} at the end; benchmark took {time.perf_counter() - t0:.0f} s")
    return 0


def report(arms: dict, times: dict, rounds: int) -> None:
    done = min(len(v) for v in times.values())
    if done == 0:
        return
    print(f"\nseconds per epoch over {done} round(s): median (min-max)")
    print(f"  {'arm':10s} {'alone':>22s} {'beside one CPU-bound process':>30s} {'beside/alone':>22s}")
    for a in arms:
        alone, beside = times[(a, "alone")][:done], times[(a, "beside")][:done]
        ratio = [b / s for b, s in zip(beside, alone)]
        print(f"  {a:10s} {spread(alone):>22s} {spread(beside):>30s} {spread(ratio, '{:.2f}x'):>22s}")
    ratio = {a: [b / s for b, s in zip(times[(a, "beside")][:done], times[(a, "alone")][:done])] for a in arms}
    cost = [s / f for s, f in zip(times[("policy", "alone")][:done], times[("fixed", "alone")][:done])]
    r, c = statistics.median(ratio["policy"]), statistics.median(cost)
    print(f"RESULT policy beside/alone = {r:.2f}x (goal <= 1.5: {'met' if r <= 1.5 else 'NOT met'}); "
          f"policy/fixed alone = {c:.3f} (goal <= 1.02: {'met' if c <= 1.02 else 'NOT met'}); beside/alone "
          f"with the fixed count {statistics.median(ratio['fixed']):.2f}x, torch's defaults "
          f"{statistics.median(ratio['torch']):.2f}x")


if __name__ == "__main__":
    sys.exit(main())
