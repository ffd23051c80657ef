"""Harness overhead: seconds per epoch of the harness vs a plain tutorial loop vs the tutorial's DataLoader.

    python benchmarks/overhead.py [--train 10000] [--val 2000] [--epochs 4] [--rounds 3] [--threads N] [--keep]

Three ways to train the same model, the harness's ``lenet`` (conv 6@5x5 -> pool -> conv 12@5x5 -> pool ->
120 -> 60 -> 10), from the same initial weights, with SGD (lr 0.05, momentum 0.9) and batch size 100, on
the same MNIST-sized data: generated 28x28 uint8 images (each class a fixed random stroke pattern, shifted,
scaled, plus noise: random but learnable), written as MNIST idx files to a temporary directory and split
into the same train/validation examples for every arm:

  (a) plain:   the tutorial's loop over tensors held in memory, batched by hand (randperm + slicing),
               ``loss.item()`` for the running loss, ``model.eval()`` + ``torch.no_grad()`` to validate.
               It trains on the very tensors the harness trains on.
  (b) harness: ``harness.run.run`` with everything a real run does per epoch: MLflow tracking into a
               temporary SQLite store (metrics batched and flushed every epoch, running loss), the mode
               guard and its ledger, checkpoints (``last``/``best`` written and logged as artifacts).
  (c) loader:  the tutorial's ``torchvision.datasets.MNIST`` + ``transforms.ToTensor()/Normalize`` +
               ``DataLoader(shuffle=True)`` loop (num_workers=0): per-sample PIL conversion, transforms
               and collation, over the same files.

How the time per epoch is measured, fairly: all arms run in one process with the same
``torch.set_num_threads(--threads)`` and alternate epoch by epoch. The harness run calls ``on_epoch``
after each of its epochs; inside that callback one plain epoch and one DataLoader epoch run (their order
flipped every epoch), each timed on its own. A harness epoch is the time from the end of one callback to
the start of the next: its training, validation, metric flush, guard ledger, checkpoint save and artifact
logging, i.e. everything the harness does per epoch and nothing of the other arms. One-time costs are
excluded from every arm: imports, data loading, the MLflow experiment/run creation, params, the sanity
check and the final test evaluation (model logging is off: it happens once per run). Each round is a new
run with new models; its first epoch is a warm-up and is not counted. An epoch is training plus
validation in every arm.

Printed per round and over all epochs: the median seconds per epoch of each arm; harness/plain (goal
<= 1.05) and loader/harness (goal >= 3) as the median of per-epoch ratios, each taken between epochs that
ran back to back so a noisy neighbour hits both sides alike; the same ratios for the training pass alone
(the harness's own ``time/train_epoch_s``) and in CPU time of the main thread (``time.thread_time``: robust
on a shared machine, but blind to I/O waits such as SQLite's fsync, so the wall figure is the one that
counts); and the harness's per-epoch extras beyond training and validation, in ms.
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


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


def tutorial_epoch(model, opt, train_batches, val_batches) -> dict:
    """One tutorial epoch (train, then validate) over any iterables of ``(inputs, labels)`` batches.

    Arms (a) and (c) both run this very code; only where their batches come from differs."""
    import torch

    loss_fn = torch.nn.CrossEntropyLoss()
    w0, c0 = _clocks()
    model.train()
    running_loss = 0.0
    for inputs, labels in train_batches:
        opt.zero_grad()
        loss = loss_fn(model(inputs), labels)
        loss.backward()
        opt.step()
        running_loss += loss.item()
    train = time.perf_counter() - w0
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for inputs, labels in val_batches:
            correct += (model(inputs).argmax(1) == labels).sum().item()
            total += len(labels)
    w1, c1 = _clocks()
    return {"train": train, "wall": w1 - w0, "cpu": c1 - c0, "acc": correct / total}


def tensor_batches(x, y, bs: int, shuffle: bool):
    """(a)'s batches: in-memory tensors sliced by hand (a fresh ``randperm`` per epoch when shuffling)."""
    import torch

    order = torch.randperm(len(y)) if shuffle else torch.arange(len(y))
    for i in range(0, len(y), bs):
        idx = order[i:i + bs]
        yield x[idx], y[idx]


def same_model(harness_model):
    """The same model (the harness's ``lenet``) with the harness run's initial weights, for arms (a), (c),
    in the default memory format as the tutorial has it (whatever ``train.channels_last`` says for (b))."""
    import copy

    import torch

    return copy.deepcopy(harness_model).to(memory_format=torch.contiguous_format)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/overhead.py", description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=10_000, help="training examples (default 10000)")
    p.add_argument("--val", type=int, default=2_000, help="validation examples (default 2000)")
    p.add_argument("--epochs", type=int, default=4, help="timed epochs per round, after one warm-up (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="rounds: fresh run and models each (default 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for every arm (default: torch's own default, one per core, as a "
                        "researcher's script runs; --threads 1 isolates the single-core case, where the "
                        "model's compute dominates every arm)")
    p.add_argument("--keep", action="store_true", help="keep the temporary MLflow store and data")
    p.add_argument("--set", nargs="*", default=[], metavar="key=value",
                   help="extra spec overrides for the harness arm, e.g. guard=off train.checkpoint=false")
    args = p.parse_args(argv)

    import torch
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    from harness.cli import setup_logging
    from harness.core.data import _split, load_data
    from harness.run import build, run
    from harness.spec import load_spec, parse_overrides

    setup_logging()
    args.threads = args.threads or torch.get_num_threads()
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
    }).with_overrides(parse_overrides(args.set))
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
          f"{args.rounds} round(s) x {args.epochs} timed epochs (+1 warm-up each)"
          + (f"; harness overrides: {' '.join(args.set)}" if args.set else ""))
    from harness.tracking import store

    store.setup_mlflow()
    store.experiment_id(spec.name)  # create the store before timing anything

    t_start = time.perf_counter()
    rows = []  # per timed epoch: {arm: {"train", "wall", "cpu", "acc"}}
    for rnd in range(1, args.rounds + 1):
        spec_r = spec.with_overrides({"seed": rnd})
        init = build(spec_r, data=data).model  # the very weights run() will start from (same seed)
        sgd = dict(lr=spec.optimizer.lr, momentum=spec.optimizer.momentum)
        plain_model = same_model(init)
        plain_opt = torch.optim.SGD(plain_model.parameters(), **sgd)
        loader_model = same_model(init)
        loader_opt = torch.optim.SGD(loader_model.parameters(), **sgd)
        train_loader = DataLoader(Subset(mnist, train_idx.tolist()), batch_size=bs, shuffle=True)
        val_loader = DataLoader(Subset(mnist, val_idx.tolist()), batch_size=1000)
        marks: list[tuple[tuple[float, float], tuple[float, float]]] = []
        epochs: list[dict] = []

        def on_epoch(epoch: int, metrics: dict) -> None:
            t_in = _clocks()
            e = {"harness": {"train": metrics["time/train_epoch_s"], "val": metrics["val/seconds"],
                             "acc": metrics["val/acc"]}}
            arms = [("plain", lambda: tutorial_epoch(plain_model, plain_opt, tensor_batches(x, y, bs, True),
                                                     tensor_batches(xv, yv, 1000, False))),
                    ("loader", lambda: tutorial_epoch(loader_model, loader_opt, train_loader, val_loader))]
            for name, fn in (arms if epoch % 2 else arms[::-1]):
                e[name] = fn()
            epochs.append(e)
            marks.append((t_in, _clocks()))

        run(spec_r, data=data, on_epoch=on_epoch, progress=False, run_name=f"overhead-round-{rnd}")
        for k in range(1, len(marks)):  # epoch k+1 of the harness ran between callbacks k and k+1
            (w_in, c_in), _ = marks[k]
            _, (w_out, c_out) = marks[k - 1]
            epochs[k]["harness"].update(wall=w_in - w_out, cpu=c_in - c_out)
        timed = epochs[1:]  # epoch 1 is the warm-up (and its harness time includes the run's setup)
        rows += timed
        _report(f"round {rnd}", timed)
    _report(f"all {len(rows)} epochs", rows, final=True)
    last = rows[-1]
    print(f"final val/acc: plain {last['plain']['acc']:.3f}, harness {last['harness']['acc']:.3f}, "
          f"loader {last['loader']['acc']:.3f} (same task, same initial weights); "
          f"benchmark took {time.perf_counter() - t_start:.0f}s")
    if args.keep:
        print(f"store: mlflow ui --backend-store-uri {os.environ['MLFLOW_TRACKING_URI']}  (in {work})")
    else:
        os.chdir(ROOT)
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _report(label: str, rows: list[dict], final: bool = False) -> None:
    def med(arm, k):
        return statistics.median(r[arm][k] for r in rows)

    def ratio(a, b, k):  # median of per-epoch ratios between epochs that ran back to back
        return statistics.median(r[a][k] / r[b][k] for r in rows)

    print(f"{label}: s/epoch (train+val) plain {med('plain', 'wall'):.3f}  harness {med('harness', 'wall'):.3f}  "
          f"loader {med('loader', 'wall'):.3f}")
    print(f"  harness/plain  {ratio('harness', 'plain', 'wall'):.3f} wall per epoch "
          f"(train pass only {ratio('harness', 'plain', 'train'):.3f}, CPU time {ratio('harness', 'plain', 'cpu'):.3f})")
    print(f"  loader/harness {ratio('loader', 'harness', 'wall'):.2f}x wall per epoch "
          f"(train pass only {ratio('loader', 'harness', 'train'):.2f}x, CPU time {ratio('loader', 'harness', 'cpu'):.2f}x)")
    extras = statistics.median(r["harness"]["wall"] - r["harness"]["train"] - r["harness"]["val"] for r in rows)
    print(f"  harness per-epoch extras beyond training and validation (metric flush, checkpoints, guard "
          f"ledger): {extras * 1000:.0f} ms = {extras / med('plain', 'wall') * 100:.1f}% of a plain epoch")
    if final:
        hp, lh = ratio("harness", "plain", "wall"), ratio("loader", "harness", "wall")
        print(f"RESULT harness/plain = {hp:.3f} per epoch (goal <= 1.05: {'met' if hp <= 1.05 else 'NOT met'}); "
              f"loader/harness = {lh:.2f}x (goal >= 3: {'met' if lh >= 3 else 'NOT met'})")


if __name__ == "__main__":
    sys.exit(main())
