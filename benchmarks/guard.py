"""Mode guard cost: epoch time (train + validation) with the guard on vs off, measured side by side.

    python benchmarks/guard.py [SPEC] [--pairs 40] [--threads 1]

Epochs alternate on/off (the order flipped every pair) on the same model and data, so a noisy neighbour
on a shared machine hits both arms alike. Epochs are timed in this process's CPU time, which busy
neighbours on a shared machine barely touch (one torch thread by default), and on the wall clock; the
headline figure is the median of the per-pair CPU-time ratios. The "on" epochs pay for everything a run pays per epoch
(a guard built, the hook on every forward, BatchNorm statistics compared around validation, the
ledger). Last, the hook's own cost per training forward against a training step. The issue's
budget: guard on / off <= 1.03.
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
    from harness.core.loop import evaluate, train_one_epoch
    from harness.run import build
    from harness.spec import load_spec

    torch.set_num_threads(args.threads)
    spec = load_spec(args.spec, {"train.device": "cpu"})
    parts = build(spec)
    model, opt, policy, data, device = parts.model, parts.optimizer, parts.policy, parts.data, parts.device
    epoch = 0

    def one_epoch(guarded: bool) -> tuple[float, float]:
        nonlocal epoch
        epoch += 1
        data.train.set_epoch(epoch)
        t, c = time.perf_counter(), time.process_time()
        guard = None
        if guarded:
            guard = ModeGuard(model, frozen=policy.frozen,
                              allow_stochastic_eval=policy.allows_stochastic_eval)
        train_one_epoch(model, data.train, opt, device, epoch=epoch, policy=policy, guard=guard)
        evaluate(model, data.val, device, policy=policy, guard=guard)
        if guard is not None:
            guard.end_epoch(epoch)
            guard.close()
        return time.process_time() - c, time.perf_counter() - t

    for _ in range(args.warmup):
        one_epoch(True), one_epoch(False)
    on, off, ratios, wall_ratios = [], [], [], []
    for i in range(args.pairs):
        if i % 2:
            b, a = one_epoch(False), one_epoch(True)
        else:
            a, b = one_epoch(True), one_epoch(False)
        on.append(a[0]), off.append(b[0]), ratios.append(a[0] / b[0]), wall_ratios.append(a[1] / b[1])
    ratio = statistics.median(ratios)
    steps = len(data.train)
    hook_us, step_us = _hook_cost(model, opt, policy, data, device)
    print(f"spec {Path(args.spec).name}: {steps} training steps + {len(data.val)} validation batches "
          f"per epoch, {args.pairs} on/off pairs, {args.threads} thread(s)")
    print(f"CPU time per epoch: guard off median {statistics.median(off) * 1e3:.1f} ms, "
          f"guard on median {statistics.median(on) * 1e3:.1f} ms")
    print(f"guard on / off epoch time: {ratio:.3f} (CPU time, median of per-pair ratios; budget <= 1.030) "
          f"{'OK' if ratio <= 1.03 else 'OVER BUDGET'}")
    print(f"  same on wall-clock time: {statistics.median(wall_ratios):.3f} (noisy when neighbours are busy); "
          f"best CPU epoch on / off: {min(on) / min(off):.3f}")
    print(f"the guard's hook alone: {hook_us:.1f} us per training forward, {step_us:.0f} us per training "
          f"step ({hook_us / step_us:.2%} of a step)")
    return 0


def _hook_cost(model, opt, policy, data, device, n: int = 2000) -> tuple[float, float]:
    """Best-of-5 time of the guard's pre-forward hook in a training phase with a gradient to check
    (its per-step work), and of one plain training step, in microseconds."""
    import torch

    from harness.guard import ModeGuard
    from harness.core.loop import train_one_epoch

    x, y = next(iter(data.train))
    guard = ModeGuard(model, frozen=policy.frozen, allow_stochastic_eval=policy.allows_stochastic_eval)
    model.train()
    torch.nn.functional.cross_entropy(model(x), y).backward()  # a gradient for the zero_grad check
    hook = []
    with guard.phase("train"):
        guard._pre_forward(model, (x,))  # the first call sees a new state: not the steady cost
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(n):
                guard._pre_forward(model, (x,))
            hook.append((time.perf_counter() - t) / n)
        guard._carried = None
    guard.close()
    opt.zero_grad()
    step = []
    for _ in range(5):
        t = time.perf_counter()
        train_one_epoch(model, [(x, y)] * 20, opt, device, policy=policy)
        step.append((time.perf_counter() - t) / 20)
    return min(hook) * 1e6, min(step) * 1e6


if __name__ == "__main__":
    sys.exit(main())
