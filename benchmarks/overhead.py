"""Harness overhead: seconds per epoch of the harness vs a plain tutorial loop vs the tutorial's DataLoader.

    python benchmarks/overhead.py [--train 10000] [--val 2000] [--epochs 4] [--rounds 3] [--threads 1] [--keep]

Three ways to train the same LeNet (conv 6@5x5 -> pool -> conv 12@5x5 -> pool -> 120 -> 60 -> 10) with SGD
(lr 0.05, momentum 0.9), batch size 100, on the same MNIST-sized data: generated 28x28 uint8 images
(each class a fixed random stroke pattern plus noise: random but learnable), written as MNIST idx files
to a temporary directory, split into the same train/validation examples for every arm:

  (a) plain:   the tutorial's loop over tensors held in memory, batched by hand (randperm + slicing),
               ``loss.item()`` for the running loss, ``model.eval()`` + ``torch.no_grad()`` to validate.
  (b) harness: ``harness.run.run`` with everything a real run does per epoch: MLflow tracking into a
               temporary SQLite store (metrics batched and flushed every epoch, running loss), the mode
               guard, checkpoints (``last``/``best``, written and logged as artifacts), progress off.
  (c) loader:  the tutorial's ``torchvision.datasets.MNIST`` + ``transforms.ToTensor()/Normalize`` +
               ``DataLoader(shuffle=True)`` loop: per-sample PIL conversion and transforms, collation.

Fair per-epoch timing, all in one process with ``torch.set_num_threads(--threads)`` for every arm:
arms alternate epoch by epoch. The harness run calls ``on_epoch`` after each of its epochs; inside that
callback one plain epoch and one DataLoader epoch run (their order flipped every epoch), timed on their
own. A harness epoch is the wall time from the end of one callback to the start of the next: its training,
validation, metric flush, guard ledger, checkpoint save and artifact logging, i.e. everything the harness
does per epoch, and nothing of the other arms. One-time costs are excluded from every arm: imports, the
MLflow experiment/run creation, params, the sanity check and the test evaluation at the end (model logging
is switched off: it is once per run). Each round is a fresh run and fresh models; its first epoch is a
warm-up and is not counted. An epoch is training plus validation in every arm; ``train`` columns time the
training pass alone (the harness's own ``time/train_epoch_s``).

Printed: the median seconds per epoch of each arm, the ratio harness/plain (goal <= 1.05) and
loader/harness (goal >= 3), per round and over all epochs (median of per-epoch ratios, each ratio taken
between epochs that ran back to back, so a noisy neighbour hits both sides alike).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_idx_files(root: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """MNIST-format files under ``root/MNIST/raw``: class templates (random strokes) + noise, uint8."""
    import numpy as np

    rng = np.random.default_rng(seed)
    templates = np.zeros((10, 28, 28), np.float32)
    for k in range(10):
        for _ in range(4):  # four thick random strokes per class
            r0, c0 = rng.integers(4, 24, 2)
            dr, dc = rng.integers(-1, 2, 2)
            for t in range(10):
                r, c = np.clip([r0 + dr * t, c0 + dc * t], 2, 25)
                templates[k, r - 1:r + 2, c - 1:c + 2] = 1.0

    def draw(n):
        y = rng.integers(0, 10, n)
        shift = rng.integers(-2, 3, (n, 2))
        x = np.empty((n, 28, 28), np.float32)
        for i in range(n):
            x[i] = np.roll(templates[y[i]], tuple(shift[i]), axis=(0, 1))
        x = np.clip(x * rng.uniform(0.6, 1.0, (n, 1, 1)) + rng.normal(0, 0.25, x.shape), 0, 1)
        return (x * 255).astype(np.uint8), y.astype(np.uint8)

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x, y = draw(n)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x0803, n, 28, 28) + x.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x0801, n) + y.tobytes())


def tutorial_net():
    """The tutorial's LeNet, written the tutorial's way (functional relu/pool), same shapes as ``lenet``."""
    import torch.nn.functional as F
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 6, 5)
            self.conv2 = nn.Conv2d(6, 12, 5)
            self.fc1 = nn.Linear(12 * 4 * 4, 120)
            self.fc2 = nn.Linear(120, 60)
            self.fc3 = nn.Linear(60, 10)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.conv1(x)), 2)
            x = F.max_pool2d(F.relu(self.conv2(x)), 2)
            x = x.flatten(1)
            return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))

    return Net()


def plain_epoch(model, opt, x, y, xv, yv, bs: int) -> tuple[float, float, float]:
    """(a) One tutorial epoch over in-memory tensors: returns (train seconds, epoch seconds, val acc)."""
    import torch

    loss_fn = torch.nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    model.train()
    perm = torch.randperm(len(y))
    running_loss = 0.0
    for i in range(0, len(y), bs):
        idx = perm[i:i + bs]
        inputs, labels = x[idx], y[idx]
        opt.zero_grad()
        loss = loss_fn(model(inputs), labels)
        loss.backward()
        opt.step()
        running_loss += loss.item()
    t_train = time.perf_counter() - t0
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(yv), 1000):
            correct += (model(xv[i:i + 1000]).argmax(1) == yv[i:i + 1000]).sum().item()
    return t_train, time.perf_counter() - t0, correct / len(yv)


def loader_epoch(model, opt, train_loader, val_loader) -> tuple[float, float, float]:
    """(c) One tutorial epoch through torchvision + ToTensor + DataLoader."""
    import torch

    loss_fn = torch.nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    model.train()
    running_loss = 0.0
    for inputs, labels in train_loader:
        opt.zero_grad()
        loss = loss_fn(model(inputs), labels)
        loss.backward()
        opt.step()
        running_loss += loss.item()
    t_train = time.perf_counter() - t0
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for inputs, labels in val_loader:
            correct += (model(inputs).argmax(1) == labels).sum().item()
            total += len(labels)
    return t_train, time.perf_counter() - t0, correct / total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/overhead.py", description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=10_000, help="training examples (default 10000)")
    p.add_argument("--val", type=int, default=2_000, help="validation examples (default 2000)")
    p.add_argument("--epochs", type=int, default=4, help="timed epochs per round, after one warm-up (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="rounds: fresh run and models each (default 3)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads for every arm (default 1: on a shared machine more threads than "
                        "free cores make every arm erratic)")
    p.add_argument("--keep", action="store_true", help="keep the temporary MLflow store and data")
    args = p.parse_args(argv)

    import logging

    import torch
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    from harness.data import _split, load_data
    from harness.run import run
    from harness.spec import load_spec

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="harness-overhead-"))
    os.chdir(work)  # mlruns/ (artifacts, checkpoints) lands here
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    n_trval = args.train + args.val
    make_idx_files(work / "data", n_trval, 1000)

    spec = load_spec(None, {
        "name": "overhead", "data.dataset": "mnist", "data.root": str(work / "data"), "data.download": False,
        "data.val_fraction": args.val / n_trval, "train.epochs": args.epochs + 1, "train.threads": args.threads,
        "train.device": "cpu", "train.log_model": False, "model.arch": "lenet",
    })
    data = load_data(spec.data, spec.seed, torch.device("cpu"))  # (b)'s tensors, loaded once
    bs = spec.data.batch_size
    # (a) trains on the very same tensors (already normalised) as the harness.
    x, y = data.train.split.x, data.train.split.y
    xv, yv = data.val.split.x, data.val.split.y
    # (c) reads the same files through torchvision, with the same train/val examples (same split seed).
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    mnist = datasets.MNIST(str(work / "data"), train=True, download=False, transform=tf)
    val_idx, train_idx = _split(len(mnist), spec.data.val_fraction, spec.data.split_seed)
    assert len(train_idx) == len(y) and len(val_idx) == len(yv)

    print(f"LeNet, {len(y)} train / {len(yv)} val 28x28 images, batch {bs}, SGD lr {spec.optimizer.lr} "
          f"momentum {spec.optimizer.momentum}, {args.threads} thread(s), torch {torch.__version__}; "
          f"{args.rounds} round(s) x {args.epochs} timed epochs (+1 warm-up each)")
    from harness import stores

    stores.setup_mlflow()
    stores.experiment_id(spec.name)  # create the store before timing anything

    rows = []  # per timed epoch: dict of times
    for rnd in range(1, args.rounds + 1):
        torch.manual_seed(rnd)
        plain_model = tutorial_net()
        plain_opt = torch.optim.SGD(plain_model.parameters(), lr=spec.optimizer.lr, momentum=spec.optimizer.momentum)
        loader_model = tutorial_net()
        loader_opt = torch.optim.SGD(loader_model.parameters(), lr=spec.optimizer.lr,
                                     momentum=spec.optimizer.momentum)
        train_loader = DataLoader(Subset(mnist, train_idx.tolist()), batch_size=bs, shuffle=True)
        val_loader = DataLoader(Subset(mnist, val_idx.tolist()), batch_size=1000)
        marks: list[tuple[float, float]] = []
        epochs: list[dict] = []

        def on_epoch(epoch: int, metrics: dict) -> None:
            t_in = time.perf_counter()
            e = {"harness_train": metrics["time/train_epoch_s"], "harness_acc": metrics["val/acc"]}
            arms = [("plain", lambda: plain_epoch(plain_model, plain_opt, x, y, xv, yv, bs)),
                    ("loader", lambda: loader_epoch(loader_model, loader_opt, train_loader, val_loader))]
            for name, fn in (arms if epoch % 2 else arms[::-1]):
                e[f"{name}_train"], e[name], e[f"{name}_acc"] = fn()
            epochs.append(e)
            marks.append((t_in, time.perf_counter()))

        run(spec.with_overrides({"seed": rnd}), data=data, on_epoch=on_epoch, progress=False,
            run_name=f"overhead-round-{rnd}")
        for k in range(1, len(marks)):  # epoch k+1 of the harness ran between callbacks k and k+1
            epochs[k]["harness"] = marks[k][0] - marks[k - 1][1]
        timed = epochs[1:]  # epoch 1 is the warm-up (and its harness time includes the run's setup)
        for e in timed:
            e["round"] = rnd
        rows += timed
        _report(f"round {rnd}", timed)
    _report(f"all {len(rows)} epochs", rows, final=True)
    last = rows[-1]
    print(f"final val/acc: plain {last['plain_acc']:.3f}, harness {last['harness_acc']:.3f}, "
          f"loader {last['loader_acc']:.3f}  (all three learn the same task)")
    if args.keep:
        print(f"store: mlflow ui --backend-store-uri {os.environ['MLFLOW_TRACKING_URI']}  (in {work})")
    else:
        os.chdir(ROOT)
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _report(label: str, rows: list[dict], final: bool = False) -> None:
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    hp = statistics.median(r["harness"] / r["plain"] for r in rows)
    lh = statistics.median(r["loader"] / r["harness"] for r in rows)
    hp_train = statistics.median(r["harness_train"] / r["plain_train"] for r in rows)
    lh_train = statistics.median(r["loader_train"] / r["harness_train"] for r in rows)
    print(f"{label}: s/epoch (train+val) plain {med('plain'):.3f}  harness {med('harness'):.3f}  "
          f"loader {med('loader'):.3f} | train only: plain {med('plain_train'):.3f}  "
          f"harness {med('harness_train'):.3f}  loader {med('loader_train'):.3f}")
    print(f"{label}: harness/plain {hp:.3f} per epoch (train only {hp_train:.3f}); "
          f"loader/harness {lh:.2f}x (train only {lh_train:.2f}x)")
    if final:
        print(f"RESULT harness/plain = {hp:.3f} per epoch (goal <= 1.05): "
              f"{'met' if hp <= 1.05 else 'NOT met'}; loader/harness = {lh:.2f}x (goal >= 3): "
              f"{'met' if lh >= 3 else 'NOT met'}")


if __name__ == "__main__":
    sys.exit(main())
