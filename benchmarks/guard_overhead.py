"""What ``python -m harness.guard`` costs a training script: epoch time with the watcher on vs off.

    python benchmarks/guard_overhead.py [--rounds 20] [--batches 40] [--threads 1] [--model mnist|lenet]

The script's loop is pytorch/examples' MNIST (its CNN with two Dropout layers, batch 64, Adadelta,
model.train() + zero_grad / forward / backward / step, then model.eval() + no_grad over a test set), on
random 28x28 images; ``--model lenet`` uses the harness's LeNet (BatchNorm, Dropout, GaussianNoise: 21
modules per forward) on 8x8 inputs, where a step is so small that the guard's fixed cost per step
shows. Each round runs one epoch per arm in a rotating order: unguarded, guarded (the watcher built
and closed inside the epoch, as the command's is around the script), and two empty global module
hooks (what PyTorch itself charges once any global hook exists: every module call takes its slow
path), so a noisy neighbour on a shared machine hits all arms alike. Epochs are timed in this
process's CPU time (busy neighbours barely touch it) and on the wall clock; the headline is the median
of the per-round CPU-time ratios. The issue's budget: guarded / unguarded <= 1.03 per epoch.
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
    p.add_argument("--rounds", type=int, default=20, help="rounds of one epoch per arm (default 20)")
    p.add_argument("--batches", type=int, default=40, help="training batches of 64 per epoch (default 40)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--model", choices=("mnist", "lenet"), default="mnist")
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    from harness.guard import Watcher

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, shape = _mnist_net() if args.model == "mnist" else _lenet()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    train = [(torch.randn(64, *shape), torch.randint(0, 10, (64,))) for _ in range(args.batches)]
    test = [(torch.randn(256, *shape), torch.randint(0, 10, (256,))) for _ in range(max(1, args.batches // 8))]

    def epoch(arm: str) -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        watcher = Watcher() if arm == "guarded" else None
        hooks = [register_module_forward_pre_hook(lambda m, a: None),
                 register_module_forward_hook(lambda m, a, o: None, always_call=True)] if arm == "hooks" else []
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
        for h in hooks:
            h.remove()
        if watcher is not None:
            watcher.close()
            assert not watcher.findings(), watcher.format()  # the loop is correct: nothing to report
        return time.process_time() - c, time.perf_counter() - t

    arms = ("unguarded", "guarded", "hooks")
    for _ in range(args.warmup):
        for arm in arms:
            epoch(arm)
    cpu = {a: [] for a in arms}
    wall = {a: [] for a in arms}
    for i in range(args.rounds):
        for arm in arms[i % 3:] + arms[:i % 3]:  # the order rotates every round
            c, w = epoch(arm)
            cpu[arm].append(c), wall[arm].append(w)

    def ratio(arm: str, times: dict) -> float:
        return statistics.median(x / y for x, y in zip(times[arm], times["unguarded"]))

    steps = len(train)
    r = ratio("guarded", cpu)
    extra = (r - 1) * statistics.median(cpu["unguarded"]) / steps * 1e6
    print(f"{args.model}: {steps} training steps of 64 + {len(test)} test batches of 256 per epoch, "
          f"{args.rounds} rounds, {args.threads} thread(s)")
    print(f"CPU time per epoch: unguarded median {statistics.median(cpu['unguarded']) * 1e3:.0f} ms, "
          f"guarded median {statistics.median(cpu['guarded']) * 1e3:.0f} ms")
    print(f"guarded / unguarded epoch time: {r:.3f} (CPU time, median of per-round ratios; budget <= 1.030) "
          f"{'OK' if r <= 1.03 else 'OVER BUDGET'}; {extra:+.0f} us per training step")
    print(f"  same on wall-clock time: {ratio('guarded', wall):.3f}; best CPU epoch guarded / unguarded: "
          f"{min(cpu['guarded']) / min(cpu['unguarded']):.3f}")
    print(f"  of which PyTorch's own cost of any global module hook (two empty hooks): "
          f"{ratio('hooks', cpu):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
