"""CIFAR-10/100 from files in the real format written here (no download), per-channel normalisation,
the device-side augmentation (checked against torchvision's own transforms), corrupt files refused in
one line, and a cifar10 + resnet18 spec run end to end through the CLI."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from conftest import ROOT, all_runs, run_cli
from fakedata import colour_images, write_cifar10, write_cifar100, write_cifar_batch
from harness.core.batches import Augment, Batches, Split
from harness.core.data import load_data
from harness.errors import DataError
from harness.spec import DataSpec

CPU = torch.device("cpu")


@pytest.fixture()
def cifar_root(tmp_path):
    root = tmp_path / "data"
    write_cifar10(root)
    return root


def _spec(root, **kw) -> DataSpec:
    return DataSpec(dataset="cifar10", root=str(root), download=False, **kw)


def test_cifar10_loads_with_per_channel_statistics_of_the_training_split(cifar_root):
    data = load_data(_spec(cifar_root, val_fraction=0.1, batch_size=32), seed=0, device=CPU)
    assert data.input_shape == (3, 32, 32) and data.num_classes == 10
    assert data.sizes == {"train": 180, "val": 20, "test": 60}
    assert data.source == str((cifar_root / "cifar-10-batches-py").resolve())  # the files it read
    x = data.train.split.x
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(x.std(dim=(0, 2, 3), correction=0), torch.ones(3), atol=1e-4)
    # Every split goes through the same per-channel map, fitted on the training split's pixels only.
    from harness.core.data import _split

    raw_trval = np.concatenate([colour_images(40, seed=i)[0] for i in range(1, 6)]).astype(np.float64) / 255
    _, train_idx = _split(200, 0.1, 0)
    mean = raw_trval[train_idx].mean(axis=(0, 2, 3))
    std = raw_trval[train_idx].std(axis=(0, 2, 3))
    raw_test, labels = colour_images(60, seed=99)
    assert torch.equal(data.test.split.y, torch.from_numpy(labels))  # the file's order
    expected = (raw_test / 255 - mean[None, :, None, None]) / std[None, :, None, None]
    assert np.allclose(data.test.split.x.numpy(), expected, atol=1e-5)


def test_cifar100_uses_the_fine_labels(tmp_path):
    write_cifar100(tmp_path / "data")
    data = load_data(DataSpec(dataset="cifar100", root=str(tmp_path / "data"), download=False), seed=0, device=CPU)
    assert data.num_classes == 100 and data.input_shape == (3, 32, 32)
    assert data.sizes["test"] == 50 and data.sizes["train"] + data.sizes["val"] == 150


def test_memory_and_dataloader_paths_agree(cifar_root):
    mem = load_data(_spec(cifar_root, loader="memory"), seed=0, device=CPU)
    dl = load_data(_spec(cifar_root, loader="dataloader", val_batch_size=30), seed=0, device=CPU)
    assert dl.sizes == mem.sizes and dl.input_shape == mem.input_shape
    xv = torch.cat([x for x, _ in dl.val])
    assert torch.allclose(xv, mem.val.split.x, atol=1e-5)  # same examples, same normalisation
    assert torch.equal(torch.cat([y for _, y in dl.test]), mem.test.split.y)


# -- corrupt files: one line naming the file -------------------------------------------------------

def _corrupt(base, how):
    x, y = colour_images(40, seed=1)
    path = base / "data_batch_1"
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:500])
    elif how == "label-out-of-range":
        write_cifar_batch(path, x, [*y[:-1].tolist(), 10], "labels")
    elif how == "length-mismatch":
        write_cifar_batch(path, x, y[:-3].tolist(), "labels")
    elif how == "not-a-pickle":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    elif how == "wrong-shape":
        write_cifar_batch(path, x[:, :, :16, :16], y.tolist(), "labels")
    return path


@pytest.mark.parametrize("how, words", [
    ("truncated", "not a readable CIFAR batch"),
    ("label-out-of-range", "label 10 at index 39 is out of range 0..9"),
    ("length-mismatch", "40 images but data_batch_1 holds 37 labels"),
    ("not-a-pickle", "not a readable CIFAR batch"),
    ("wrong-shape", "uint8 rows of 3072 pixels"),
])
def test_corrupt_cifar_file_is_one_line_naming_it(cifar_root, how, words):
    path = _corrupt(cifar_root / "cifar-10-batches-py", how)
    with pytest.raises(DataError) as e:
        load_data(_spec(cifar_root), seed=0, device=CPU)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(path)) and words in msg, msg


def test_a_pickle_that_would_run_code_is_refused_unrun(cifar_root, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return os.system, (f"touch {marker}",)

    (cifar_root / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({"data": Evil()}, protocol=2))
    with pytest.raises(DataError, match="refused to build"):
        load_data(_spec(cifar_root), seed=0, device=CPU)
    assert not marker.exists()


def test_missing_cifar_without_download_names_the_files(tmp_path):
    with pytest.raises(DataError) as e:
        load_data(_spec(tmp_path / "nowhere"), seed=0, device=CPU)
    msg = str(e.value)
    assert "cifar-10-batches-py" in msg and "data_batch_1" in msg and "data.download is false" in msg


# -- augmentation ----------------------------------------------------------------------------------

def test_augment_matches_torchvision_crop_and_flip():
    from torchvision.transforms.v2 import functional as F

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 32, 32, generator=g)
    fill = torch.tensor([-1.5, 0.25, 2.0])
    aug = Augment(4, fill)
    shifts, flips = aug.draw(16, g)
    assert flips.any() and not flips.all() and shifts.min() >= 0 and shifts.max() <= 8
    out = aug(x, shifts, flips)
    for i in range(16):
        padded = F.pad(x[i] - fill.view(3, 1, 1), [4], fill=0) + fill.view(3, 1, 1)  # pad with `fill`
        ref = F.crop(padded, int(shifts[i, 0]), int(shifts[i, 1]), 32, 32)
        ref = F.horizontal_flip(ref) if flips[i] else ref
        assert torch.allclose(out[i], ref, atol=1e-6), i


def test_augmentation_touches_training_batches_only_and_is_reproducible(cifar_root):
    plain = load_data(_spec(cifar_root, batch_size=50), seed=3, device=CPU)
    aug = load_data(_spec(cifar_root, batch_size=50, augment=True), seed=3, device=CPU)
    for split in ("val", "test"):  # never augmented
        for (xa, ya), (xb, yb) in zip(getattr(plain, split), getattr(aug, split)):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)

    def epoch(data, e):
        data.train.set_epoch(e)
        return [(x.clone(), y.clone()) for x, y in data.train]

    a1, p1 = epoch(aug, 1), epoch(plain, 1)
    assert [torch.equal(ya, yp) for (_, ya), (_, yp) in zip(a1, p1)] == [True] * len(p1)  # same order
    assert not torch.equal(a1[0][0], p1[0][0])  # but other pixels
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a1, epoch(aug, 1)))  # same seed, same epoch
    assert not torch.equal(a1[0][0], epoch(aug, 2)[0][0])


def test_a_last_training_batch_of_one_is_dropped():
    split = Split(torch.randn(101, 1, 4, 4), torch.arange(101) % 10)
    train = Batches(split, 50, shuffle=True)
    assert len(train) == 2 and [len(y) for _, y in train] == [50, 50]
    assert [len(y) for _, y in Batches(split, 50)] == [50, 50, 1]  # evaluation keeps every example
    assert [len(y) for _, y in Batches(split, 1, shuffle=True)][:2] == [1, 1]  # unless batches are of one


# -- the done criterion: a spec naming cifar10 + resnet18 runs --------------------------------------

def test_cifar10_resnet18_spec_runs_through_the_cli(fast_store, tmp_path):
    root = tmp_path / "data"
    write_cifar10(root, n_per_batch=12, n_test=20)
    r = run_cli("harness.train", str(ROOT / "experiments" / "cifar10_resnet18.yaml"), "--quiet",
                f"data.root={root}", "data.download=false", "train.epochs=1", "data.batch_size=25",
                "data.val_batch_size=50", "train.log_model=false", "train.sanity_check=false",
                "train.threads=1", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    (run,) = all_runs(fast_store)
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["data.dataset"] == "cifar10" and p["model.arch"] == "resnet18" and p["data.augment"] == "True"
    assert p["data.size.train"] == "54" and p["data.size.test"] == "20"
    assert 0 <= run.data.metrics["test/acc"] <= 1
