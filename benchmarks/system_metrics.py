"""What sampling system metrics costs a sweep trial.

    python benchmarks/system_metrics.py [--pairs 8] [--epochs 20] [--intervals 1,0.5]

A sweep trial of the default spec (LeNet on digits, ``--epochs`` epochs, one torch thread, checkpoints
and model logging as in a real trial) is run as a real tracked run (``harness.run.run`` into a temporary
SQLite store), once with system metrics off and once with them sampled at each of ``--intervals``
seconds (``harness.tracking.sysmetrics``), in rotating order, ``--pairs`` times. The whole run is timed
(start to end of ``run()``: what a sweep waits for), in CPU time of the whole process (every thread:
the sampler's work, robust to a busy neighbour that makes wall times noisy) and the training epochs
alone (the runs' ``time/train_epoch_s``). Printed: per interval the median over pairs of each ratio
sampled/unsampled, between runs that ran back to back, and how many samples a run got.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one_run(spec, data, interval: float | None) -> dict:
    from mlflow import MlflowClient

    from harness.run import run

    if interval is not None:
        os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = str(interval)
    t, cpu = time.perf_counter(), time.process_time()
    result = run(spec, progress=False, data=data, system_metrics=interval is not None)
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    client = MlflowClient()
    epochs = [m.value for m in client.get_metric_history(result.run_id, "time/train_epoch_s")]
    samples = len(client.get_metric_history(result.run_id, "system/cpu_utilization_percentage"))
    return {"run_s": seconds, "cpu_s": cpu, "epoch_s": statistics.median(epochs), "samples": samples}


def sample_cost(n: int = 40) -> float:
    """Seconds one sample takes, sampled and flushed by hand into a run of its own (median of ``n``)."""
    import mlflow

    from harness.tracking import sysmetrics

    with mlflow.start_run() as active:
        monitor = sysmetrics._monitor_class()(active.info.run_id, sampling_interval=3600)
        monitor._last = time.monotonic()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            monitor._sample()
            monitor.mlflow_logger.flush()
            times.append(time.perf_counter() - t)
            time.sleep(0.05)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--intervals", default="1,0.5", help="sampling intervals to compare, seconds")
    args = p.parse_args()
    intervals = [float(x) for x in args.intervals.split(",")]
    from harness.cli import setup_logging

    setup_logging()  # MLflow's own INFO lines (one per monitor started) are not results
    with tempfile.TemporaryDirectory(prefix="bench-sysmetrics-") as tmp:
        os.chdir(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        import torch

        from harness.core.data import load_data
        from harness.spec import load_spec

        spec = load_spec(ROOT / "experiments" / "digits_lenet.yaml",
                         [f"train.epochs={args.epochs}", "train.threads=1"])
        data = load_data(spec.data, spec.seed, torch.device("cpu"))
        arms: list[float | None] = [None, *intervals]
        one_run(spec, data, None)  # warm-up: imports, the store's schema, the experiment
        rows: dict[float | None, list[dict]] = {a: [] for a in arms}
        for i in range(args.pairs):
            order = arms[i % len(arms):] + arms[:i % len(arms)]  # rotate: no arm always goes first
            for arm in order:
                rows[arm].append(one_run(spec, data, arm))
            print(f"pair {i + 1}: " + "  ".join(
                f"{'off' if a is None else f'{a:g} s'} {rows[a][-1]['run_s']:.2f}s" for a in arms), flush=True)
        per_sample = sample_cost()
    base = rows[None]
    print(f"\nsweep trial: digits LeNet, {args.epochs} epochs, 1 thread; {args.pairs} pairs; median run "
          f"{statistics.median(r['run_s'] for r in base):.2f} s unsampled")
    for a in intervals:
        run_ratio = statistics.median(x["run_s"] / b["run_s"] for x, b in zip(rows[a], base))
        cpu_ratio = statistics.median(x["cpu_s"] / b["cpu_s"] for x, b in zip(rows[a], base))
        epoch_ratio = statistics.median(x["epoch_s"] / b["epoch_s"] for x, b in zip(rows[a], base))
        samples = statistics.median(x["samples"] for x in rows[a])
        print(f"  sampled every {a:g} s: run time x{run_ratio:.3f}, CPU time of the process (every thread) "
              f"x{cpu_ratio:.3f}, training epoch x{epoch_ratio:.3f}; {samples:.0f} samples a run")
    print(f"  one sample (psutil readings + its log_batch into SQLite, flushed): median {per_sample * 1e3:.1f} ms "
          f"wall, i.e. {per_sample * 100:.1f}% of a second")


if __name__ == "__main__":
    main()
