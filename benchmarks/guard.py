"""Mode guard cost: epoch time (train + validation) with the guard on vs off, measured side by side.

    python benchmarks/guard.py [SPEC] [--pairs 40] [--threads 1]

Epochs alternate on/off (the order flipped every pair) on the same model and data, so a noisy neighbour
on a shared machine hits both arms alike; the figure is the median of the per-pair ratios. The
issue's budget: guard on / off <= 1.03.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/guard.py", description=__doc__.splitlines()[0])
    p.add_argument("spec", nargs="?", default=str(ROOT / "experiments" / "digits_lenet_modes.yaml"))
    p.add_argument("--pairs", type=int, default=40, help="on/off epoch pairs (default 40)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)

    import torch

    from harness.guard import ModeGuard
    from harness.loop import evaluate, train_one_epoch
    from harness.run import build
    from harness.spec import load_spec

    torch.set_num_threads(args.threads)
    spec = load_spec(args.spec, {"train.device": "cpu"})
    parts = build(spec)
    model, opt, policy, data, device = parts.model, parts.optimizer, parts.policy, parts.data, parts.device
    epoch = 0

    def one_epoch(guarded: bool) -> float:
        nonlocal epoch
        epoch += 1
        data.train.set_epoch(epoch)
        t = time.perf_counter()
        guard = None
        if guarded:
            guard = ModeGuard(model, frozen=policy.frozen,
                              allow_stochastic_eval=policy.allows_stochastic_eval)
        train_one_epoch(model, data.train, opt, device, epoch=epoch, policy=policy, guard=guard)
        evaluate(model, data.val, device, policy=policy, guard=guard)
        if guard is not None:
            guard.end_epoch(epoch)
            guard.close()
        return time.perf_counter() - t

    for _ in range(args.warmup):
        one_epoch(True), one_epoch(False)
    on, off, ratios = [], [], []
    for i in range(args.pairs):
        if i % 2:
            b, a = one_epoch(False), one_epoch(True)
        else:
            a, b = one_epoch(True), one_epoch(False)
        on.append(a), off.append(b), ratios.append(a / b)
    ratio = statistics.median(ratios)
    steps = len(data.train)
    print(f"spec {Path(args.spec).name}: {steps} training steps + {len(data.val)} validation batches "
          f"per epoch, {args.pairs} on/off pairs, {args.threads} thread(s)")
    print(f"epoch time: guard off median {statistics.median(off) * 1e3:.1f} ms, "
          f"guard on median {statistics.median(on) * 1e3:.1f} ms")
    print(f"guard on / off epoch time: {ratio:.3f} (median of per-pair ratios; budget <= 1.030) "
          f"{'OK' if ratio <= 1.03 else 'OVER BUDGET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
