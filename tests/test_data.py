"""Data: fixed, disjoint splits; reproducible shuffling; MNIST through the real torchvision class from
MNIST-format files written here (no network); a clear error when the files are missing."""
from __future__ import annotations

import math
import struct
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import all_runs, run_cli
from fakedata import write_idx
from harness.core.data import Batches, load_data
from harness.core.loop import train_one_epoch
from harness.errors import DataError, UserError
from harness.spec import DataSpec, load_spec

CPU = torch.device("cpu")


# -- digits ----------------------------------------------------------------------------------------

def _rows(x) -> list[bytes]:
    x = x.numpy() if isinstance(x, torch.Tensor) else x
    return [r.tobytes() for r in x.reshape(len(x), -1)]


def _digits_raw_and_labels():
    from sklearn.datasets import load_digits

    d = load_digits()
    return {r.astype(np.int64).tobytes(): int(t) for r, t in zip(d.images.reshape(len(d.images), -1), d.target)}


def _unnormalise(data, x: torch.Tensor) -> np.ndarray:
    # Every split is normalised with the same (mean, std); digits pixels are k/16 with k in 0..16 and the
    # training split holds both 0 and 16, so its min and max give the map back to the raw integers.
    lo, hi = float(data.train.split.x.min()), float(data.train.split.x.max())
    raw = np.rint((x.reshape(len(x), -1).numpy() - lo) / (hi - lo) * 16).astype(np.int64)
    return raw


def test_digits_splits_are_a_partition_with_aligned_labels():
    data = load_data(DataSpec(dataset="digits", val_fraction=0.2), seed=0, device=CPU)
    splits = {"train": data.train.split, "val": data.val.split, "test": data.test.split}
    rows = {k: set(_rows(s.x)) for k, s in splits.items()}
    assert sum(len(s.y) for s in splits.values()) == 1797
    assert all(len(rows[k]) == len(splits[k].y) for k in splits)
    assert not rows["train"] & rows["val"]
    assert not rows["train"] & rows["test"]
    assert not rows["val"] & rows["test"]
    assert data.sizes == {k: len(s.y) for k, s in splits.items()}
    assert data.sizes["test"] == round(1797 * 0.2) and data.sizes["val"] == round((1797 - 359) * 0.2)
    # Every example lands exactly once, with its own label.
    labels = _digits_raw_and_labels()
    seen = Counter()
    for s in splits.values():
        for raw, y in zip(_unnormalise(data, s.x), s.y.tolist()):
            key = raw.tobytes()
            assert labels[key] == y
            seen[key] += 1
    assert len(seen) == 1797 and set(seen.values()) == {1}
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10


def test_train_split_is_normalised_with_its_own_statistics():
    data = load_data(DataSpec(), seed=0, device=CPU)
    x = data.train.split.x
    assert x.dtype == torch.float32
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3


def test_splits_do_not_depend_on_the_run_seed():
    a = load_data(DataSpec(), seed=0, device=CPU)
    b = load_data(DataSpec(batch_size=32), seed=1234, device=CPU)
    for k in ("train", "val", "test"):
        assert torch.equal(getattr(a, k).split.x, getattr(b, k).split.x)
        assert torch.equal(getattr(a, k).split.y, getattr(b, k).split.y)


def test_val_split_depends_only_on_split_seed():
    base = load_data(DataSpec(split_seed=0), seed=0, device=CPU)
    other = load_data(DataSpec(split_seed=1), seed=0, device=CPU)
    limited = load_data(DataSpec(split_seed=0, limit_train=200), seed=5, device=CPU)
    # limit_train shrinks training only: the val and test examples stay the very same.
    assert set(_rows(_unnormalise(limited, limited.val.split.x))) == set(_rows(_unnormalise(base, base.val.split.x)))
    assert torch.equal(limited.val.split.y, base.val.split.y)
    assert limited.sizes["train"] == 200
    # Another split seed: another validation set (same size), and the test split is untouched.
    va = set(_rows(_unnormalise(base, base.val.split.x)))
    vb = set(_rows(_unnormalise(other, other.val.split.x)))
    assert len(va) == len(vb) and va != vb
    assert set(_rows(_unnormalise(base, base.test.split.x))) == set(_rows(_unnormalise(other, other.test.split.x)))


def _order(batches, epoch):
    batches.set_epoch(epoch)
    return torch.cat([y for _, y in batches]), torch.cat([x.reshape(len(x), -1) for x, _ in batches])


def test_batches_shuffle_reproducibly_per_seed_and_epoch():
    split = load_data(DataSpec(), seed=0, device=CPU).train.split
    a = Batches(split, 100, shuffle=True, seed=3)
    b = Batches(split, 100, shuffle=True, seed=3)
    ya1, xa1 = _order(a, 1)
    torch.manual_seed(999)
    torch.rand(1000)  # consuming the global RNG must not change the data order
    yb1, xb1 = _order(b, 1)
    assert torch.equal(xa1, xb1) and torch.equal(ya1, yb1)
    _, xa2 = _order(a, 2)
    assert not torch.equal(xa1, xa2)  # another epoch, another order
    _, xc1 = _order(Batches(split, 100, shuffle=True, seed=4), 1)
    assert not torch.equal(xa1, xc1)  # another seed, another order
    # Each epoch visits every example exactly once, in batches of the requested size.
    assert sorted(_rows(xa2)) == sorted(_rows(split.x.reshape(len(split.x), -1)))
    sizes = [len(y) for _, y in a]
    assert sizes[:-1] == [100] * (len(sizes) - 1) and sum(sizes) == len(split.y) and len(a) == len(sizes)


def test_eval_batches_are_in_fixed_order():
    data = load_data(DataSpec(val_batch_size=50), seed=0, device=CPU)
    ys = torch.cat([y for _, y in data.val])
    assert torch.equal(ys, data.val.split.y)
    assert all(len(y) <= 50 for _, y in data.val)


# -- MNIST-format files, read by the real torchvision classes -------------------------------------------

def _write_idx(raw_dir, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    raw_dir.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    (raw_dir / f"{prefix}-images-idx3-ubyte").write_bytes(
        struct.pack(">IIII", 0x0803, n, h, w) + images.astype(np.uint8).tobytes())
    (raw_dir / f"{prefix}-labels-idx1-ubyte").write_bytes(
        struct.pack(">II", 0x0801, n) + labels.astype(np.uint8).tobytes())


def _fake_mnist(n: int, seed: int):
    """Learnable 28x28 uint8 images: class k lights up a bar whose position depends on k, plus noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    x = rng.integers(0, 60, (n, 28, 28))
    for i, k in enumerate(y):
        x[i, 2 + 2 * k: 4 + 2 * k, 4:24] = 255
    return x.astype(np.uint8), y.astype(np.uint8)


@pytest.fixture()
def mnist_root(tmp_path):
    root = tmp_path / "data"
    for cls in ("MNIST", "FashionMNIST"):
        x, y = _fake_mnist(300, 0)
        _write_idx(root / cls / "raw", "train", x, y)
        xt, yt = _fake_mnist(120, 1)
        _write_idx(root / cls / "raw", "t10k", xt, yt)
    return root


@pytest.mark.parametrize("dataset, cls", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_in_memory_from_idx_files(mnist_root, dataset, cls):
    spec = DataSpec(dataset=dataset, root=str(mnist_root), download=False, val_fraction=0.2, batch_size=64)
    data = load_data(spec, seed=0, device=CPU)
    assert data.source == str((mnist_root / cls / "raw").resolve())  # the files it read
    assert data.input_shape == (1, 28, 28)
    assert data.sizes == {"train": 240, "val": 60, "test": 120}
    x_train, y_train = _fake_mnist(300, 0)
    _, y_test = _fake_mnist(120, 1)
    assert Counter(data.train.split.y.tolist()) + Counter(data.val.split.y.tolist()) == Counter(y_train.tolist())
    assert torch.equal(data.test.split.y, torch.from_numpy(y_test.astype(np.int64)))  # test keeps file order
    # Pixels went through as written: the normalised images map back to the uint8 files exactly.
    x = data.train.split.x
    assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28)
    assert abs(float(x.mean())) < 1e-4
    lo, hi = float(x.min()), float(x.max())  # raw 0 and 255 both occur
    raw = np.rint((x.numpy() - lo) / (hi - lo) * 255).astype(np.uint8)[:, 0]
    files = {r.tobytes() for r in x_train}
    assert all(r.tobytes() in files for r in raw)
    xb, yb = next(iter(data.train))
    assert xb.shape == (64, 1, 28, 28) and yb.dtype == torch.int64


def test_mnist_dataloader_path(mnist_root):
    spec = DataSpec(dataset="mnist", root=str(mnist_root), download=False, loader="dataloader",
                    val_fraction=0.2, batch_size=50, val_batch_size=40)
    data = load_data(spec, seed=0, device=CPU)
    assert data.sizes == {"train": 240, "val": 60, "test": 120}
    assert len(data.train) == 5 and len(data.val) == 2 and len(data.test) == 3
    xs, ys = zip(*data.train)
    assert [len(y) for y in ys] == [50, 50, 50, 50, 40]
    assert xs[0].shape == (50, 1, 28, 28) and xs[0].dtype == torch.float32 and ys[0].dtype == torch.int64
    # Per-(seed, epoch) shuffling, reproducible like the in-memory path.
    data.train.set_epoch(1)
    e1 = torch.cat([y for _, y in data.train])
    data.train.set_epoch(1)
    assert torch.equal(e1, torch.cat([y for _, y in data.train]))
    data.train.set_epoch(2)
    e2 = torch.cat([y for _, y in data.train])
    assert not torch.equal(e1, e2) and sorted(e1.tolist()) == sorted(e2.tolist())
    # Both paths hold out the same validation examples (same split_seed), in the same order.
    mem = load_data(spec.model_copy(update={"loader": "memory"}), seed=0, device=CPU)
    assert torch.equal(torch.cat([y for _, y in data.val]), mem.val.split.y)
    assert torch.equal(torch.cat([y for _, y in data.test]), mem.test.split.y)


def test_missing_mnist_without_download_says_where_to_put_the_files(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(DataError) as e:
        load_data(DataSpec(dataset="mnist", root=str(root), download=False), seed=0, device=CPU)
    msg = str(e.value)
    assert "\n" not in msg
    assert str(root / "MNIST" / "raw") in msg
    assert "train-images-idx3-ubyte" in msg and "data.download is false" in msg


def test_missing_mnist_through_the_cli(store, tmp_path):
    spec = tmp_path / "m.yaml"
    spec.write_text("name: mnist-missing\ndata:\n  dataset: mnist\n  download: false\n  root: nowhere\n")
    r = run_cli("harness.train", str(spec), "--quiet", cwd=tmp_path, timeout=180)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("harness.train: error: data.dataset=mnist: files not found in nowhere/MNIST/raw")
    assert "train-images-idx3-ubyte" in lines[0] and "data.root" in lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    assert all_runs(store) == []


# -- corrupt MNIST-format files: one line naming the file --------------------------------------------

def _raw(root):
    return root / "MNIST" / "raw"


@pytest.mark.parametrize("how, file, words", [
    ("truncated-images", "train-images-idx3-ubyte", "truncated: its header says 300x28x28 (235216 bytes) but "
                                                    "the file holds 200016 bytes"),
    ("truncated-header", "t10k-labels-idx1-ubyte", "truncated (5 bytes, shorter than its 8-byte header)"),
    ("label-out-of-range", "train-labels-idx1-ubyte", "label 12 at index 7 is out of range 0..9"),
    ("length-mismatch", "train-images-idx3-ubyte", "300 images but train-labels-idx1-ubyte holds 290 labels"),
    ("gzipped", "t10k-images-idx3-ubyte", "not an idx3 file of unsigned bytes (magic 0x1f8b0800"),
])
def test_corrupt_idx_file_is_one_line_naming_it(mnist_root, how, file, words):
    raw = _raw(mnist_root)
    path = raw / file
    if how == "truncated-images":
        path.write_bytes(path.read_bytes()[:200_016])
    elif how == "truncated-header":
        path.write_bytes(path.read_bytes()[:5])
    elif how == "label-out-of-range":
        blob = bytearray(path.read_bytes())
        blob[8 + 7] = 12
        path.write_bytes(bytes(blob))
    elif how == "length-mismatch":
        x, y = _fake_mnist(300, 0)
        write_idx(raw, "train", x, y[:290])  # each file's header true to its own length
        path = raw / "train-images-idx3-ubyte"
    elif how == "gzipped":
        path.write_bytes(b"\x1f\x8b\x08\x00" + bytes(40))
    with pytest.raises(DataError) as e:
        load_data(DataSpec(dataset="mnist", root=str(mnist_root), download=False), seed=0, device=CPU)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(path)) and words in msg, msg


# -- splits that leave nothing to train on -------------------------------------------------------------

@pytest.mark.parametrize("kw, words", [
    ({"val_fraction": 0.9999}, "data.val_fraction=0.9999 leaves 0 training example(s) of 1438"),
    ({"val_fraction": 0.999}, "data.val_fraction=0.999 leaves 1 training example(s) of 1438"),
    ({"limit_train": 1}, "data.limit_train=1 leaves 1 training example"),
])
def test_a_split_without_training_data_is_refused(kw, words):
    with pytest.raises(UserError) as e:
        load_data(DataSpec(**kw), seed=0, device=CPU)
    assert words in str(e.value), str(e.value)


def test_a_last_batch_of_one_is_dropped_so_batchnorm_trains(tmp_path):
    # 1438 - 144 validation = 1294 training digits; batches of 431 leave exactly one example at the end.
    from harness.run import build

    spec = load_spec(None, ["data.batch_size=431", "model.batchnorm=true", "model.arch=mlp"])
    parts = build(spec)
    assert parts.data.sizes["train"] == 1294 and len(parts.data.train) == 3
    m = train_one_epoch(parts.model, parts.data.train, parts.optimizer, parts.device)
    assert math.isfinite(m["train/loss"])


def test_val_fraction_almost_one_never_trains_to_finished(fast_store, tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: nearly-all-val\ndata:\n  val_fraction: 0.9999\nmodel:\n  batchnorm: true\n")
    r = run_cli("harness.train", str(spec), "--quiet", cwd=tmp_path, timeout=180)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "data.val_fraction=0.9999 leaves 0 training example(s)" in r.stderr
    assert all_runs(fast_store) == []
