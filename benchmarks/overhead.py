"""Harness overhead: seconds per epoch of the harness vs a plain tutorial loop vs the tutorial's DataLoader.

    python benchmarks/overhead.py [--train 10000] [--val 2000] [--epochs 4] [--rounds 3] [--threads N] [--keep]
    python benchmarks/overhead.py --data-root ~/data     # real MNIST files: <root>/MNIST/raw/*-ubyte

Three ways to train the same model, the harness's ``lenet`` (conv 6@5x5 -> pool -> conv 12@5x5 -> pool ->
120 -> 60 -> 10), from the same initial weights, with SGD (lr 0.05, momentum 0.9) and batch size 100, on
the same MNIST-sized data: generated 28x28 uint8 images (each class a fixed random stroke pattern, shifted,
scaled, plus noise: random but learnable), written as MNIST idx files to a temporary directory, or real
MNIST files with ``--data-root`` (the first ``--train`` training examples after the validation split,
``--val`` held out), split into the same train/validation examples for every arm, each arm reading the
files itself:

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

Printed while it runs: a line per epoch (each arm's seconds). Per round: the median seconds per epoch of
each arm; harness/plain (goal <= 1.05) and loader/harness (goal >= 3) as the median of per-epoch ratios,
each taken between epochs that ran back to back so a noisy neighbour hits both sides alike; the same
ratios for the training pass alone (the harness's own ``time/train_epoch_s``) and in CPU time of the main
thread (``time.thread_time``: robust on a shared machine, but blind to I/O waits such as SQLite's fsync,
so the wall figure is the one that counts); and the harness's per-epoch extras beyond training and
validation, in ms. At the end: every figure as the median over rounds with its min-max, the load average
at the start and the end. Ctrl-C or SIGTERM stops it cleanly (the rounds done so far are reported, the
temporary files removed). The process uses the harness's thread policy (harness/core/device.py) for
every arm; OMP_WAIT_POLICY / --threads override it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
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


def idx_count(path: Path) -> int:
    """The number of items an idx file says it holds."""
    with open(path, "rb") as f:
        return struct.unpack(">II", f.read(8))[1]


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/overhead.py", description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=10_000, help="training examples (default 10000)")
    p.add_argument("--val", type=int, default=2_000, help="validation examples (default 2000)")
    p.add_argument("--epochs", type=int, default=4, help="timed epochs per round, after one warm-up (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="rounds: fresh run and models each (default 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for every arm (default: the harness's policy, one per core, as "
                        "harness.train runs; --threads 1 isolates the single-core case, where the model's "
                        "compute dominates every arm)")
    p.add_argument("--data-root", help="read real MNIST-format files from <root>/MNIST/raw instead of "
                                       "generating them (every arm reads them)")
    p.add_argument("--keep", action="store_true", help="keep the temporary MLflow store and data")
    p.add_argument("--set", nargs="*", default=[], metavar="key=value",
                   help="extra spec overrides for the harness arm, e.g. guard=off train.checkpoint=false")
    args = p.parse_args(argv)
    from harness.core.device import prepare_threads, wait_policy

    prepare_threads()  # before torch loads, as harness.train does
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops it like Ctrl-C
    work = Path(tempfile.mkdtemp(prefix="harness-overhead-"))
    rounds: list[list[dict]] = []
    t_start = time.perf_counter()
    try:
        _benchmark(args, work, rounds, wait_policy())
    except KeyboardInterrupt:
        print(f"overhead.py: interrupted after {len(rounds)} whole round(s)", file=sys.stderr, flush=True)
    finally:
        os.chdir(ROOT)
        if rounds:
            _summary(rounds)
        print(f"{load()} at the end; benchmark took {time.perf_counter() - t_start:.0f}s", flush=True)
        if args.keep:
            print(f"store: mlflow ui --backend-store-uri sqlite:///{work / 'mlflow.db'}  (in {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if rounds else 130


def _benchmark(args, work: Path, rounds: list[list[dict]], policy: str) -> None:
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
    os.chdir(work)  # mlruns/ (artifacts, checkpoints) lands here
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    if args.data_root:
        root = Path(args.data_root).expanduser().resolve()
        if not (root / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
            sys.exit(f"overhead.py: --data-root {root}: no MNIST/raw/train-images-idx3-ubyte in it")
        n_trval = idx_count(root / "MNIST" / "raw" / "train-labels-idx1-ubyte")
        what = f"MNIST files in {root}"
    else:
        root, n_trval, what = work / "data", args.train + args.val, "generated MNIST-format files"
        make_idx_files(root, n_trval, 1000)
    spec = load_spec(None, {
        "name": "overhead", "data.dataset": "mnist", "data.root": str(root), "data.download": False,
        "data.val_fraction": args.val / n_trval, "data.limit_train": args.train, "train.epochs": args.epochs + 1,
        "train.threads": args.threads, "train.device": "cpu", "train.log_model": False, "model.arch": "lenet",
    }).with_overrides(parse_overrides(args.set))
    data = load_data(spec.data, spec.seed, torch.device("cpu"))  # (b)'s tensors, loaded once
    bs = spec.data.batch_size
    # (a) trains on the very same tensors (already normalised) as the harness.
    x, y = data.train.split.x, data.train.split.y
    xv, yv = data.val.split.x, data.val.split.y
    # (c) reads the same files through torchvision, with the same train/val examples (same split seed).
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    mnist = datasets.MNIST(str(root), train=True, download=False, transform=tf)
    val_idx, train_idx = _split(len(mnist), spec.data.val_fraction, spec.data.split_seed)
    train_idx = train_idx[:args.train]
    assert len(train_idx) == len(y) and len(val_idx) == len(yv)

    print(f"LeNet, {len(y)} train / {len(yv)} val 28x28 images ({what}), batch {bs}, SGD lr "
          f"{spec.optimizer.lr} momentum {spec.optimizer.momentum}, {args.threads} thread(s), OpenMP wait "
          f"{policy}, torch {torch.__version__}; {args.rounds} round(s) x {args.epochs} timed epochs (+1 "
          f"warm-up each); {load()}" + (f"; harness overrides: {' '.join(args.set)}" if args.set else ""),
          flush=True)
    from harness.tracking import store

    store.setup_mlflow()
    store.experiment_id(spec.name)  # create the store before timing anything

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
            print(f"  round {rnd} epoch {epoch}{' (warm-up)' if epoch == 1 else ''}: plain {e['plain']['wall']:.3f} s, "
                  f"loader {e['loader']['wall']:.3f} s (harness: train {e['harness']['train']:.3f} s + val "
                  f"{e['harness']['val']:.3f} s)", flush=True)

        run(spec_r, data=data, on_epoch=on_epoch, progress=False, run_name=f"overhead-round-{rnd}")
        for k in range(1, len(marks)):  # epoch k+1 of the harness ran between callbacks k and k+1
            (w_in, c_in), _ = marks[k]
            _, (w_out, c_out) = marks[k - 1]
            epochs[k]["harness"].update(wall=w_in - w_out, cpu=c_in - c_out)
        timed = epochs[1:]  # epoch 1 is the warm-up (and its harness time includes the run's setup)
        rounds.append(timed)
        _report(f"round {rnd}", _figures(timed))
    last = rounds[-1][-1]
    print(f"final val/acc: plain {last['plain']['acc']:.3f}, harness {last['harness']['acc']:.3f}, "
          f"loader {last['loader']['acc']:.3f} (same task, same initial weights)")


def _figures(rows: list[dict]) -> dict[str, float]:
    """One round's figures: medians of per-epoch seconds and of per-epoch ratios (back-to-back epochs)."""
    def med(arm, k):
        return statistics.median(r[arm][k] for r in rows)

    def ratio(a, b, k):
        return statistics.median(r[a][k] / r[b][k] for r in rows)

    extras = statistics.median(r["harness"]["wall"] - r["harness"]["train"] - r["harness"]["val"] for r in rows)
    return {"plain s/epoch": med("plain", "wall"), "harness s/epoch": med("harness", "wall"),
            "loader s/epoch": med("loader", "wall"),
            "harness/plain": ratio("harness", "plain", "wall"), "harness/plain train": ratio("harness", "plain", "train"),
            "harness/plain cpu": ratio("harness", "plain", "cpu"),
            "loader/harness": ratio("loader", "harness", "wall"), "loader/harness train": ratio("loader", "harness", "train"),
            "loader/harness cpu": ratio("loader", "harness", "cpu"),
            "extras ms": extras * 1000, "extras %": extras / med("plain", "wall") * 100}


def _report(label: str, f: dict[str, float]) -> None:
    print(f"{label}: s/epoch (train+val) plain {f['plain s/epoch']:.3f}  harness {f['harness s/epoch']:.3f}  "
          f"loader {f['loader s/epoch']:.3f}")
    print(f"  harness/plain  {f['harness/plain']:.3f} wall per epoch (train pass only "
          f"{f['harness/plain train']:.3f}, CPU time {f['harness/plain cpu']:.3f})")
    print(f"  loader/harness {f['loader/harness']:.2f}x wall per epoch (train pass only "
          f"{f['loader/harness train']:.2f}x, CPU time {f['loader/harness cpu']:.2f}x)")
    print(f"  harness per-epoch extras beyond training and validation (metric flush, checkpoints, guard "
          f"ledger): {f['extras ms']:.0f} ms = {f['extras %']:.1f}% of a plain epoch", flush=True)


def _summary(rounds: list[list[dict]]) -> None:
    """Every figure as the median over rounds (min-max), then the two goals."""
    per_round = [_figures(r) for r in rounds]
    print(f"over {len(rounds)} round(s): median (min-max) of the per-round figures")
    for k in per_round[0]:
        v = [f[k] for f in per_round]
        print(f"  {k:22s} {statistics.median(v):8.3f} ({min(v):.3f}-{max(v):.3f})")
    hp = statistics.median(f["harness/plain"] for f in per_round)
    lh = statistics.median(f["loader/harness"] for f in per_round)
    print(f"RESULT harness/plain = {hp:.3f} per epoch (goal <= 1.05: {'met' if hp <= 1.05 else 'NOT met'}); "
          f"loader/harness = {lh:.2f}x (goal >= 3: {'met' if lh >= 3 else 'NOT met'}); medians of "
          f"{len(rounds)} round(s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
