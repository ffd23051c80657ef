"""What ``python -m harness.guard`` costs a training script: epoch time with the watcher on vs off.

    python benchmarks/guard_overhead.py [--pairs 20] [--batches 40] [--threads 1] [--model mnist|lenet]

The script's loop is pytorch/examples' MNIST (its CNN with two Dropout layers, batch 64, Adadelta,
model.train() + zero_grad / forward / backward / step, then model.eval() + no_grad over a test set), on
random 28x28 images; ``--model lenet`` uses the harness's LeNet (BatchNorm, Dropout, GaussianNoise: more
mode-dependent modules to read per forward) on 8x8 inputs. Epochs alternate guarded / unguarded (the
order flipped every pair; the watcher is built and closed inside each guarded epoch, as the command's
is around the script), so a noisy neighbour on a shared machine hits both arms alike. Epochs are timed
in this process's CPU time (busy neighbours barely touch it) and on the wall clock; the headline is the
median of the per-pair CPU-time ratios. The issue's budget: guarded / unguarded <= 1.03 per epoch.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _mnist_net():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Net(nn.Module):  # pytorch/examples mnist/main.py
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 32, 3, 1)
            self.conv2 = nn.Conv2d(32, 64, 3, 1)
            self.dropout1 = nn.Dropout(0.25)
            self.dropout2 = nn.Dropout(0.5)
            self.fc1 = nn.Linear(9216, 128)
            self.fc2 = nn.Linear(128, 10)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
            x = F.relu(self.fc1(torch.flatten(self.dropout1(x), 1)))
            return F.log_softmax(self.fc2(self.dropout2(x)), dim=1)

    return Net(), (1, 28, 28)


def _lenet():
    from harness.core.models import build_model
    from harness.spec import ModelSpec

    return build_model(ModelSpec(arch="lenet", dropout=0.3, batchnorm=True, noise_std=0.1), (1, 8, 8), 10), (1, 8, 8)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/guard_overhead.py", description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=20, help="guarded/unguarded epoch pairs (default 20)")
    p.add_argument("--batches", type=int, default=40, help="training batches of 64 per epoch (default 40)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--model", choices=("mnist", "lenet"), default="mnist")
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from harness.guard import Watcher

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, shape = _mnist_net() if args.model == "mnist" else _lenet()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    train = [(torch.randn(64, *shape), torch.randint(0, 10, (64,))) for _ in range(args.batches)]
    test = [(torch.randn(256, *shape), torch.randint(0, 10, (256,))) for _ in range(max(1, args.batches // 8))]

    def epoch(guarded: bool) -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        watcher = Watcher() if guarded else None
        model.train()
        for data, target in train:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(data), target)
            loss.backward()
            optimizer.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for data, target in test:
                correct += int((model(data).argmax(1) == target).sum())
        if watcher is not None:
            watcher.close()
            assert not watcher.findings(), watcher.format()  # the loop is correct: nothing to report
        return time.process_time() - c, time.perf_counter() - t

    for _ in range(args.warmup):
        epoch(True), epoch(False)
    on, off, ratios, wall = [], [], [], []
    for i in range(args.pairs):
        if i % 2:
            b, a = epoch(False), epoch(True)
        else:
            a, b = epoch(True), epoch(False)
        on.append(a[0]), off.append(b[0]), ratios.append(a[0] / b[0]), wall.append(a[1] / b[1])
    ratio = statistics.median(ratios)
    print(f"{args.model}: {args.batches} training steps of 64 + {len(test)} test batches of 256 per epoch, "
          f"{args.pairs} guarded/unguarded pairs, {args.threads} thread(s)")
    print(f"CPU time per epoch: unguarded median {statistics.median(off) * 1e3:.0f} ms, "
          f"guarded median {statistics.median(on) * 1e3:.0f} ms")
    print(f"guarded / unguarded epoch time: {ratio:.3f} (CPU time, median of per-pair ratios; budget <= 1.030) "
          f"{'OK' if ratio <= 1.03 else 'OVER BUDGET'}")
    print(f"  same on wall-clock time: {statistics.median(wall):.3f}; best CPU epoch guarded / unguarded: "
          f"{min(on) / min(off):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
