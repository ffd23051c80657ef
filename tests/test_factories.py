"""A researcher's own model and dataset, named in the spec as package.module:function: the contract,
and every way to break it as one line naming the spec field (exit status 2 and no run through the CLI)."""
from __future__ import annotations

import itertools
import textwrap

import pytest
import torch
from torch import nn

from conftest import all_runs, run_cli
from harness.core.data import load_data
from harness.errors import SpecError, UserError
from harness.spec import load_spec

CPU = torch.device("cpu")
_ids = itertools.count()

PROJECT = '''
import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

CONSTANT = 3

def net(input_shape, num_classes, width=8):
    c, h, w = input_shape
    return Net(nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, width), nn.BatchNorm1d(width), nn.ReLU()),
               nn.Linear(width, num_classes))

class Net(nn.Module):
    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head
    def forward(self, x):
        return self.head(self.backbone(x))

def raises(input_shape, num_classes):
    raise ValueError("width must be even")

def not_a_module(input_shape, num_classes):
    return {"layers": 3}

def wrong_head(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), 3))

def bad_forward(input_shape, num_classes):
    return nn.Linear(5, num_classes)

class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()
    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("this layer has no backward")

class NoBackward(nn.Module):
    def forward(self, x):
        return _NoBackward.apply(x)

def bad_backward(input_shape, num_classes):
    return nn.Sequential(net(input_shape, num_classes), NoBackward())

def blobs(n=240, classes=3, channels=2, size=6, labels_offset=0, seed=0, nan=False, as_numpy=False):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.normal(0, 1, (n, channels, size, size)).astype(np.float32) + y[:, None, None, None]
    if nan:
        x[3, 0, 0, 0] = np.nan
    y = y + labels_offset
    if as_numpy:
        return (x[: n * 3 // 4], y[: n * 3 // 4]), (x[n * 3 // 4:], y[n * 3 // 4:])
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    return (t(x[: n * 3 // 4]), t(y[: n * 3 // 4])), (t(x[n * 3 // 4:]), t(y[n * 3 // 4:]))

class Items(Dataset):
    classes = ["a", "b", "c", "d"]
    def __init__(self, n, seed, item="ok"):
        self.x, self.y = blobs(n, classes=4, seed=seed)[0]
        self.item = item
    def __len__(self):
        return len(self.y)
    def __getitem__(self, i):
        if self.item == "pil":
            return [[0] * 6] * 6, int(self.y[i])
        if self.item == "raise" and i > 5:
            raise IndexError(f"no example {i}")
        return self.x[i], int(self.y[i])

def datasets(n=200, item="ok"):
    return Items(n, 0, item), Items(n // 2, 1)

def one_thing():
    return blobs()[0]

def bare_tensor():
    return torch.zeros(10, 1, 4, 4)

def three_things():
    return (*blobs(), 4)

def mismatched():
    (x, y), test = blobs()
    return (x, y[:-2]), test

def float_labels():
    (x, y), test = blobs()
    return (x, y.float()), test

def other_shapes():
    (x, y), (xt, yt) = blobs()
    return (x, y), (xt[:, :, :4, :4], yt)

def one_class():
    (x, y), (xt, yt) = blobs()
    return (x, y * 0), (xt, yt * 0)

def data_raises():
    raise FileNotFoundError("/data/my_set.h5")

def empty():
    return Items(0, 0), Items(10, 1)
'''


@pytest.fixture()
def project(tmp_path):
    """A module beside a spec file; its name is unique so each test imports its own."""
    name = f"userproj_{next(_ids)}_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(PROJECT)

    def spec(*overrides: str, arch: str = "net", dataset: str = "blobs"):
        path = tmp_path / "spec.yaml"
        path.write_text(f"name: byo\nmodel:\n  arch: {name}:{arch}\ndata:\n  dataset: {name}:{dataset}\n"
                        f"  batch_size: 32\ntrain:\n  epochs: 2\n  log_model: false\n")
        return load_spec(path, [o.replace("MOD", name) for o in overrides])

    spec.name = name
    spec.dir = tmp_path
    return spec


def test_own_model_and_data_train(project):
    from harness.run import run
    from harness.tracking.tracker import MemoryTracker

    s = project("model.args.width=16", "data.args={classes: 4}", "train.epochs=6")
    t = MemoryTracker()
    r = run(s, tracker=t, progress=False)
    assert t.status == "FINISHED" and r.metrics["val/acc"] > 0.6
    assert t.params["model.args.width"] == 16 and t.params["data.args.classes"] == 4
    assert t.params["data.num_classes"] == 4  # largest label + 1, logged by the run
    assert t.datasets[0]["source"] == f"{project.name}:blobs(classes=4)"


def test_a_model_whose_first_step_fails_leaves_a_failed_run_with_its_params(project):
    """The first backward (the sanity step) raises: the run ends FAILED, and its params, the spec's
    and the run's own, are there to tell what was run."""
    from harness.run import run
    from harness.tracking.tracker import MemoryTracker

    t = MemoryTracker()
    with pytest.raises(RuntimeError, match="no backward"):
        run(project("train.sanity_check=true", arch="bad_backward"), tracker=t, progress=False)
    assert t.status == "FAILED"
    assert t.params["model.arch"].endswith(":bad_backward") and "train.threads_used" in t.params
    assert "sanity_check" not in t.tags


@pytest.mark.parametrize("loader", ["memory", "dataloader"])
def test_a_dataset_factory_through_both_paths(project, loader):
    s = project(f"data.loader={loader}", dataset="datasets")
    data = load_data(s.data, 0, CPU)
    assert data.num_classes == 4  # from the set's `classes`
    assert data.input_shape == (2, 6, 6) and data.sizes == {"train": 135, "val": 15, "test": 75}
    x, y = next(iter(data.train))
    assert x.shape == (32, 2, 6, 6) and x.dtype == torch.float32 and y.dtype == torch.int64
    xs = torch.cat([x for x, _ in data.val])
    assert abs(float(xs.mean())) < 0.5  # normalised with the training split's statistics


def test_numpy_arrays_and_auto_loader(project):
    data = load_data(project("data.args={as_numpy: true}").data, 0, CPU)
    assert isinstance(data.train.split.x, torch.Tensor) and data.num_classes == 3  # auto: it fits, memory


# (id, overrides, arch, dataset, the words of the one line)
BROKEN = [
    ("no-module", ["model.arch=nosuch_module_xyz:net"], "net", "blobs",
     "model.arch: no module named 'nosuch_module_xyz'"),
    ("no-attribute", [], "nope", "blobs", "has no attribute 'nope'"),
    ("not-callable", [], "CONSTANT", "blobs", "is a value of type int, not a function or class"),
    ("not-an-import-path", ["model.arch=my project:net"], "net", "blobs", "unknown architecture 'my project:net'"),
    ("unknown-arg", ["model.args={widht: 3}"], "net", "blobs", "model.args: MOD:net(input_shape, num_classes, "
                                                              "width=8) cannot be called with"),
    ("reserved-arg", ["model.args={num_classes: 3}"], "net", "blobs", "model.args: 'num_classes' is set by"),
    ("dropout-on-own-model", ["model.dropout=0.3"], "net", "blobs", "model.dropout: the harness adds no dropout"),
    ("search-dropout-of-own-model", ["search.params.model.dropout={low: 0, high: 0.5}"], "net", "blobs",
     "does nothing to your model"),
    ("data-no-attribute", [], "net", "nope", "data.dataset: 'MOD' ("),
    ("data-unknown-arg", ["data.args={size: 4, colour: red}"], "net", "blobs", "data.args: "),
]


@pytest.mark.parametrize("overrides, arch, dataset, words", [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_import_or_arguments_refused_with_the_spec(project, overrides, arch, dataset, words):
    with pytest.raises(SpecError) as e:
        project(*overrides, arch=arch, dataset=dataset)
    msg = str(e.value)
    assert "\n" not in msg and words.replace("MOD", project.name) in msg, msg


# Contract violations found when the factory is called (before any run exists).
CALLED = [
    ("model-raises", [], "raises", "blobs", "model.arch: MOD:raises raised ValueError: width must be even"),
    ("model-not-a-module", [], "not_a_module", "blobs", "returned {'layers': 3} (dict), not a torch.nn.Module"),
    ("model-wrong-head", [], "wrong_head", "blobs", "maps a batch of shape (2, 2, 6, 6) to (2, 3); it must return "
                                                    "logits of shape (batch, 4)"),
    ("model-bad-forward", [], "bad_forward", "blobs", "forward on a batch of shape (2, 2, 6, 6) raised RuntimeError"),
    ("freeze-missing", ["model.freeze=[features]"], "net", "blobs", "model.freeze: Net has no submodule 'features'; "
                                                                   "its submodules are backbone, head"),
    ("partial-freeze-default", ["mode_bug=partial_freeze"], "net", "blobs",
     "mode_bug=partial_freeze: Net has no submodule 'features'"),
    ("batchnorm-batch-of-one", ["data.batch_size=1"], "net", "blobs", "data.batch_size=1: the model has BatchNorm"),
    ("data-one-thing", [], "net", "one_thing", "training set is a single (180, 2, 6, 6) array; return "
                                               "((x_train, y_train), (x_test, y_test))"),
    ("data-three-things", [], "net", "three_things", "must return (train, test)"),
    ("data-bare-tensor", [], "net", "bare_tensor", "must return (train, test); it returned tensor([[[[0., 0., 0., 0.], "),
    ("data-raises", [], "net", "data_raises", "data.dataset: MOD:data_raises raised FileNotFoundError: /data/my_set.h5"),
    ("data-mismatched", [], "net", "mismatched", "training set has 180 images but 178 labels"),
    ("data-float-labels", [], "net", "float_labels", "labels must be a 1-d tensor of integer class indices"),
    ("data-other-shapes", [], "net", "other_shapes", "test images are (2, 4, 4), its training images (2, 6, 6)"),
    ("data-one-class", [], "net", "one_class", "every label is 0: a classifier needs at least 2 classes"),
    ("data-nan", ["data.args={nan: true}"], "net", "blobs", "training set: the images hold NaN or infinite values"),
    ("data-label-out-of-range", ["data.num_classes=3", "data.args={labels_offset: 1}"], "net", "blobs",
     "the training set has label 3 (example "),
    ("data-negative-label", ["data.args={labels_offset: -1}"], "net", "blobs", "label -1 (example"),
    ("data-pil-items", ["data.args={item: pil}"], "net", "datasets", "yields (list, int) as item 0"),
    ("data-item-raises", ["data.args={item: raise}"], "net", "datasets",
     "training set cannot be read into batches: IndexError: no example"),
    ("data-empty", [], "net", "empty", "training set is empty"),
]


@pytest.mark.parametrize("overrides, arch, dataset, words", [c[1:] for c in CALLED], ids=[c[0] for c in CALLED])
def test_a_factory_breaking_its_contract_is_one_line(project, overrides, arch, dataset, words):
    from harness.run import build

    extra = ["data.args={classes: 4}"] if dataset == "blobs" and not overrides else []  # 4 classes: head checks
    spec = project(*overrides, *extra, arch=arch, dataset=dataset)
    with pytest.raises(UserError) as e:
        build(spec)
    msg = str(e.value)
    assert "\n" not in msg and words.replace("MOD", project.name) in msg, msg


@pytest.mark.parametrize("arch, dataset, words", [("raises", "blobs", "raised ValueError: width must be even"),
                                                  ("net", "mismatched", "180 images but 178 labels")])
def test_through_the_cli_exit_2_and_no_run(fast_store, project, arch, dataset, words):
    project(arch=arch, dataset=dataset)
    r = run_cli("harness.train", str(project.dir / "spec.yaml"), "--quiet", cwd=project.dir, timeout=180)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert all_runs(fast_store) == []


def test_plain_models_py_beside_the_spec_needs_no_packaging(fast_store, tmp_path):
    # The researcher's folder: models.py and data.py next to spec.yaml, run from elsewhere.
    proj = tmp_path / "my_project"
    proj.mkdir()
    (proj / "models.py").write_text(textwrap.dedent("""
        from torch import nn
        def tiny(input_shape, num_classes, hidden=32):
            c, h, w = input_shape
            return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
    """))
    (proj / "data.py").write_text(textwrap.dedent("""
        import torch
        def stripes(n=300):
            g = torch.Generator().manual_seed(0)
            y = torch.randint(0, 3, (n,), generator=g)
            x = torch.rand(n, 1, 5, 5, generator=g) * 0.3
            x[torch.arange(n), 0, y] += 1.0
            return (x[:240], y[:240]), (x[240:], y[240:])
    """))
    (proj / "spec.yaml").write_text("name: plain\ndata:\n  dataset: data:stripes\nmodel:\n  arch: models:tiny\n"
                                    "  args: {hidden: 16}\ntrain:\n  epochs: 3\n  log_model: false\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = run_cli("harness.train", str(proj / "spec.yaml"), "--quiet", cwd=elsewhere, timeout=180)
    assert r.returncode == 0, r.stderr
    (run,) = all_runs(fast_store)
    assert run.data.params["model.arch"] == "models:tiny" and run.data.params["model.args.hidden"] == "16"
    assert run.data.metrics["val/acc"] > 0.8
