"""CIFAR-shaped speed: seconds per epoch of the harness vs a plain tutorial loop vs the tutorial's
torchvision DataLoader with augmentation, on generated 3x32x32 data.

    python benchmarks/cifar.py [--train 10000] [--val 1000] [--epochs 4] [--rounds 3] [--arch lenet]
                               [--augment] [--threads N] [--device cpu|cuda] [--set key=value ...]

The data: generated uint8 3x32x32 images (each class a fixed random colour pattern, shifted, plus
noise: random but learnable), written as CIFAR-10 python batches to a temporary directory, so every arm
reads the same files and the same train/validation examples (the harness's split seed). Three arms
train the same model (``--arch``: the harness's ``lenet``, the tutorial's size of network; or
``resnet20``) from the same initial weights, with SGD (lr 0.05, momentum 0.9) and batch size 100:

  (a) plain:   the tutorial's loop over the very tensors the harness trains on (normalised, in memory, on
               the device), batched by hand (randperm + indexing) in the harness's order for the epoch,
               ``loss.item()`` each batch for the running loss, ``model.eval()`` + ``torch.no_grad()`` to
               validate. No augmentation. Without ``--augment`` it computes the very numbers the harness
               does (the final line says whether they agree): any time between them is the harness's.
  (b) harness: ``harness.run.run`` with MLflow tracking into a temporary SQLite store (metrics flushed
               every epoch, running loss), the mode guard and its ledger, checkpoints logged as
               artifacts. With ``--augment``: ``data.augment`` (random crop with 4-pixel padding +
               horizontal flip, drawn per example, applied per batch on the device).
  (c) loader:  the tutorial's ``torchvision.datasets.CIFAR10`` (its own reading code; the md5 check is
               skipped for the generated files) + ``transforms.RandomCrop(32, padding=4)``,
               ``RandomHorizontalFlip()``, ``ToTensor()``, ``Normalize`` + ``DataLoader(shuffle=True,
               num_workers=0)``: per-sample PIL conversion, transforms and collation.

Timing follows ``benchmarks/overhead.py``: all arms in one process with the same threads, alternating
epoch by epoch inside the harness run's ``on_epoch`` callback (order flipped every epoch); a harness
epoch is the time between two callbacks (its training, validation, flush, guard, checkpoint); the
first epoch of each round is a warm-up. Ratios are medians of per-epoch ratios between epochs that ran
back to back. Goal: harness/plain <= 1.02 per epoch (run without ``--augment``: the same work in both).
loader/harness is reported (with ``--augment`` both arms augment).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def make_cifar_files(root: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """``root/cifar-10-batches-py``: five training batches and a test batch of generated images."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(seed)
    templates = rng.uniform(0, 1, (10, 3, 8, 8)).repeat(4, axis=2).repeat(4, axis=3)  # 32x32 colour blocks

    def draw(n):
        y = rng.integers(0, 10, n)
        x = np.empty((n, 3, 32, 32), np.float32)
        shifts = rng.integers(-3, 4, (n, 2))
        for i in range(n):
            x[i] = np.roll(templates[y[i]], tuple(shifts[i]), axis=(1, 2))
        x = np.clip(x * rng.uniform(0.6, 1.0, (n, 1, 1, 1)) + rng.normal(0, 0.3, x.shape), 0, 1)
        return (x * 255).astype(np.uint8).reshape(n, -1), y.tolist()

    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    per = -(-n_train // 5)
    for i in range(5):
        x, y = draw(min(per, n_train - i * per))
        (base / f"data_batch_{i + 1}").write_bytes(pickle.dumps({"data": x, "labels": y}, protocol=2))
    x, y = draw(n_test)
    (base / "test_batch").write_bytes(pickle.dumps({"data": x, "labels": y}, protocol=2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/cifar.py", description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=10_000, help="training examples (default 10000)")
    p.add_argument("--val", type=int, default=1_000, help="validation examples (default 1000)")
    p.add_argument("--epochs", type=int, default=4, help="timed epochs per round, after one warm-up")
    p.add_argument("--rounds", type=int, default=3, help="rounds: fresh run and models each (default 3)")
    p.add_argument("--arch", default="lenet", help="lenet (default) or resnet20, resnet18")
    p.add_argument("--augment", action="store_true", help="the harness augments on the device (data.augment)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--set", nargs="*", default=[], metavar="key=value", help="extra overrides for the harness arm")
    args = p.parse_args(argv)

    import torch
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    from harness.cli import setup_logging
    from harness.core.data import _split, load_data
    from harness.run import build, run
    from harness.spec import load_spec, parse_overrides
    from harness.tracking import store
    from overhead import _clocks, same_model, tutorial_epoch

    setup_logging()
    args.threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="harness-cifar-"))
    os.chdir(work)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    n_trval = args.train + args.val
    make_cifar_files(work / "data", n_trval, 1000)

    spec = load_spec(None, {
        "name": "cifar-speed", "data.dataset": "cifar10", "data.root": str(work / "data"), "data.download": False,
        "data.val_fraction": args.val / n_trval, "data.augment": args.augment, "train.epochs": args.epochs + 1,
        "train.threads": args.threads, "train.device": args.device, "train.log_model": False,
        "model.arch": args.arch, "optimizer.lr": 0.05,
    }).with_overrides(parse_overrides(args.set))
    data = load_data(spec.data, spec.seed, dev)
    bs = spec.data.batch_size
    x, y = data.train.split.x, data.train.split.y  # (a) trains on the harness's own tensors
    xv, yv = data.val.split.x, data.val.split.y

    class TutorialCIFAR10(datasets.CIFAR10):
        def _check_integrity(self) -> bool:  # the generated files have no published md5
            return True

        def _load_meta(self) -> None:  # (the class names, md5-checked too)
            self.classes = [f"class{k}" for k in range(10)]

    stats = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))  # the usual CIFAR-10 figures
    train_tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), transforms.Normalize(*stats)])
    val_tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(*stats)])
    train_set = TutorialCIFAR10(str(work / "data"), train=True, transform=train_tf)
    val_set = TutorialCIFAR10(str(work / "data"), train=True, transform=val_tf)
    val_idx, train_idx = _split(len(train_set), spec.data.val_fraction, spec.data.split_seed)
    assert len(train_idx) == len(y) and len(val_idx) == len(yv)

    def to_dev(batches):
        for xb, yb in batches:
            yield xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)

    def plain_batches(shuffle: bool, size: int, seed: int = 0, epoch: int = 0):
        # The harness's order for this (seed, epoch): both models take the very same steps, so they stay
        # in the same numerical regime (a model drifting into subnormal floats runs ~2x slower on CPU).
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(y), generator=g).to(dev) if shuffle else None
        src_x, src_y = (x, y) if shuffle else (xv, yv)
        for i in range(0, len(src_y), size):
            idx = order[i:i + size] if shuffle else slice(i, i + size)
            yield src_x[idx], src_y[idx]

    print(f"{args.arch}, {len(y)} train / {len(yv)} val 3x32x32 images, batch {bs}, SGD lr {spec.optimizer.lr} "
          f"momentum {spec.optimizer.momentum}, {args.threads} thread(s), {dev}, torch {torch.__version__}; "
          f"harness augmentation {'on (device)' if args.augment else 'off'}; loader: RandomCrop+Flip per sample; "
          f"{args.rounds} round(s) x {args.epochs} timed epochs (+1 warm-up each)")
    store.setup_mlflow()
    store.experiment_id(spec.name)
    t_start = time.perf_counter()
    rows = []
    for rnd in range(1, args.rounds + 1):
        spec_r = spec.with_overrides({"seed": rnd})
        init = build(spec_r, data=data).model
        sgd = dict(lr=spec.optimizer.lr, momentum=spec.optimizer.momentum)
        plain_model = same_model(init)
        plain_opt = torch.optim.SGD(plain_model.parameters(), **sgd)
        loader_model = same_model(init)
        loader_opt = torch.optim.SGD(loader_model.parameters(), **sgd)
        train_loader = DataLoader(Subset(train_set, train_idx.tolist()), batch_size=bs, shuffle=True,
                                  pin_memory=dev.type == "cuda")
        val_loader = DataLoader(Subset(val_set, val_idx.tolist()), batch_size=1000)
        marks, epochs = [], []

        def on_epoch(epoch: int, metrics: dict) -> None:
            t_in = _clocks()
            e = {"harness": {"train": metrics["time/train_epoch_s"], "val": metrics["val/seconds"],
                             "acc": metrics["val/acc"]}}
            arms = [("plain", lambda: tutorial_epoch(plain_model, plain_opt, plain_batches(True, bs, data.train.seed, epoch),
                                                     plain_batches(False, 1000))),
                    ("loader", lambda: tutorial_epoch(loader_model, loader_opt, to_dev(train_loader),
                                                      to_dev(val_loader)))]
            for name, fn in (arms if epoch % 2 else arms[::-1]):
                e[name] = fn()
            epochs.append(e)
            marks.append((t_in, _clocks()))

        run(spec_r, data=data, on_epoch=on_epoch, progress=False, run_name=f"cifar-round-{rnd}")
        for k in range(1, len(marks)):
            (w_in, c_in), _ = marks[k]
            _, (w_out, c_out) = marks[k - 1]
            epochs[k]["harness"].update(wall=w_in - w_out, cpu=c_in - c_out)
        rows += epochs[1:]
        _report(f"round {rnd}", epochs[1:])
    _report(f"all {len(rows)} epochs", rows, final=True, augment=args.augment)
    last = rows[-1]
    same = all(r["plain"]["acc"] == r["harness"]["acc"] for r in rows)
    print(f"final val/acc: plain {last['plain']['acc']:.4f}, harness {last['harness']['acc']:.4f}, "
          f"loader {last['loader']['acc']:.4f}; plain and harness val/acc equal every epoch: "
          f"{'yes' if same else 'no'}; benchmark took {time.perf_counter() - t_start:.0f}s")
    os.chdir(ROOT)
    shutil.rmtree(work, ignore_errors=True)
    return 0


def _report(label: str, rows: list[dict], final: bool = False, augment: bool = False) -> None:
    def med(arm, k):
        return statistics.median(r[arm][k] for r in rows)

    def ratio(a, b, k):
        return statistics.median(r[a][k] / r[b][k] for r in rows)

    print(f"{label}: s/epoch (train+val) plain {med('plain', 'wall'):.3f}  harness {med('harness', 'wall'):.3f}  "
          f"loader {med('loader', 'wall'):.3f}")
    print(f"  harness/plain  {ratio('harness', 'plain', 'wall'):.3f} wall per epoch (train pass only "
          f"{ratio('harness', 'plain', 'train'):.3f}, CPU time {ratio('harness', 'plain', 'cpu'):.3f})")
    print(f"  loader/harness {ratio('loader', 'harness', 'wall'):.2f}x wall per epoch (train pass only "
          f"{ratio('loader', 'harness', 'train'):.2f}x)")
    extras = statistics.median(r["harness"]["wall"] - r["harness"]["train"] - r["harness"]["val"] for r in rows)
    print(f"  harness per-epoch extras beyond training and validation (metric flush, checkpoints, guard "
          f"ledger): {extras * 1000:.0f} ms = {extras / med('plain', 'wall') * 100:.1f}% of a plain epoch")
    if final:
        hp, lh = ratio("harness", "plain", "wall"), ratio("loader", "harness", "wall")
        goal = "n/a: the harness augments and plain does not" if augment else \
            ("met" if hp <= 1.02 else "NOT met")
        print(f"RESULT harness/plain = {hp:.3f} per epoch (goal <= 1.02: {goal}); loader/harness = {lh:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
