"""The loop: golden values for loss/accuracy, determinism, divergence, and the one-batch sanity check."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import ROOT, TINY, all_runs, run_cli
from harness.core.data import Batches, Split
from harness.core.loop import Diverged, evaluate, sanity_check, train_one_epoch
from harness.core.models import MODELS, register
from harness.spec import load_spec

CPU = torch.device("cpu")
DIGITS = str(ROOT / "experiments" / "digits_lenet.yaml")


def _logit_batches(n=23, batch_size=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    y[:7] = x[:7].argmax(1)  # at least 7 right answers, so the accuracy is not trivially 0 or chance
    return Split(x, y), Batches(Split(x, y), batch_size)


def test_evaluate_golden_values_over_uneven_batches():
    split, batches = _logit_batches()
    model = nn.Identity()  # the inputs are the logits
    model.train()
    m = evaluate(model, batches, CPU)
    # Mean over examples (not a mean of per-batch means: the last batch holds 3 of 23).
    assert m["val/loss"] == pytest.approx(float(F.cross_entropy(split.x, split.y)), rel=1e-6)
    assert m["val/acc"] == pytest.approx(float((split.x.argmax(1) == split.y).float().mean()))
    assert not model.training  # evaluate set eval mode itself


def test_evaluate_runs_without_autograd_and_keeps_predictions():
    split, batches = _logit_batches()
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(torch.is_grad_enabled())
            return x

    m = evaluate(Probe(), batches, CPU, prefix="test", keep_predictions=True)
    assert seen and not any(seen)
    assert torch.equal(m["predictions"], split.x.argmax(1)) and torch.equal(m["targets"], split.y)
    assert set(k for k in m if k.startswith("test/")) >= {"test/loss", "test/acc"}


def test_evaluate_does_not_shift_the_training_rng():
    _, batches = _logit_batches()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.5))
    model.train()
    evaluate(model, batches, CPU)
    assert torch.equal(torch.rand(3), expected)


def test_train_one_epoch_golden_values_and_running_loss():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(47, 6, generator=g)
    y = torch.randint(0, 3, (47,), generator=g)
    model = nn.Linear(6, 3)
    model.eval()  # the epoch must switch to training mode itself
    # lr=0: the weights never move, so the epoch's numbers are plain functions of the data.
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with torch.no_grad():
        out = model(x)
        per_example = F.cross_entropy(out, y, reduction="none")
    calls = []
    modes = []
    model.register_forward_pre_hook(lambda m, a: modes.append(m.training))
    m = train_one_epoch(model, Batches(Split(x, y), 4), opt, CPU, log_every=3, step_offset=100,
                        on_running_loss=lambda step, v: calls.append((step, v)))
    assert all(modes) and len(modes) == 12
    assert m["train/loss"] == pytest.approx(float(per_example.mean()), rel=1e-6)
    assert m["train/acc"] == pytest.approx(float((out.argmax(1) == y).float().mean()))
    # Running loss every 3 batches, the step being the global batch index, the value the window's mean.
    assert [s for s, _ in calls] == [103, 106, 109, 112]
    batch_means = [float(per_example[i:i + 4].mean()) for i in range(0, 47, 4)]
    for (step, v), k in zip(calls, range(0, 12, 3)):
        assert v == pytest.approx(sum(batch_means[k:k + 3]) / 3, rel=1e-6)
    assert all(p.grad is not None for p in model.parameters())


def test_train_one_epoch_is_the_textbook_loop_step_for_step():
    # Same weights, same batches: the harness's epoch and a hand-written textbook loop end with
    # bit-identical parameters and the same mean loss.
    from harness.core.models import build_model
    from harness.spec import ModelSpec

    torch.manual_seed(0)
    x = torch.randn(230, 1, 8, 8)
    y = torch.randint(0, 10, (230,))
    a = build_model(ModelSpec(arch="lenet", dropout=0.2), (1, 8, 8), 10)
    b = build_model(ModelSpec(arch="lenet", dropout=0.2), (1, 8, 8), 10)
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    batches = Batches(Split(x, y), 50, shuffle=True, seed=3)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in (1, 2):
        batches.set_epoch(epoch)
        torch.manual_seed(epoch)  # dropout draws the same masks in both
        m = train_one_epoch(a, batches, opt_a, CPU, epoch=epoch)
        torch.manual_seed(epoch)
        b.train()
        total = 0.0
        for xb, yb in batches:
            opt_b.zero_grad()
            loss = loss_fn(b(xb), yb)
            loss.backward()
            opt_b.step()
            total += loss.item() * len(yb)
        assert m["train/loss"] == pytest.approx(total / 230, rel=1e-6)
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa, pb)


def test_train_one_epoch_learns():
    torch.manual_seed(0)
    x = torch.randn(200, 2)
    y = (x[:, 0] > 0).long()
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = [train_one_epoch(model, Batches(Split(x, y), 20, shuffle=True), opt, CPU)["train/loss"]
              for _ in range(5)]
    assert losses[-1] < losses[0] / 2


@pytest.mark.parametrize("log_every", [1, 1000])  # caught at the running-loss check or at epoch end
def test_nan_loss_raises_diverged(log_every):
    torch.manual_seed(0)
    x = torch.randn(100, 4)
    y = torch.randint(0, 3, (100,))
    model = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 3))
    opt = torch.optim.SGD(model.parameters(), lr=1e12)
    with pytest.raises(Diverged, match="training loss is"):
        for epoch in range(1, 4):
            train_one_epoch(model, Batches(Split(x, y), 10), opt, CPU, epoch=epoch, log_every=log_every)


# -- determinism -------------------------------------------------------------------------------------

def test_same_spec_and_seed_give_identical_metrics():
    from harness.run import run
    from harness.tracking.tracker import MemoryTracker

    # Dropout and input noise make the run consume random numbers: the seed must pin them all.
    spec = load_spec(DIGITS, TINY + ["model.dropout=0.3", "model.noise_std=0.1", "data.limit_train=500",
                                     "train.checkpoint=false", "guard=off"])
    ta, tb = MemoryTracker(), MemoryTracker()
    a = run(spec, tracker=ta, progress=False)
    b = run(spec, tracker=tb, progress=False)
    c = run(spec.with_overrides({"seed": 1}), tracker=MemoryTracker(), progress=False)
    keys = ["train/loss", "train/acc", "val/loss", "val/acc"]
    assert a.run_id != b.run_id and ta.status == tb.status == "FINISHED"
    for k in keys:
        assert a.history[k] == b.history[k], k  # exactly equal, not approximately
        assert len(a.history[k]) == 2
    assert a.metrics["test/loss"] == b.metrics["test/loss"]
    assert a.history["train/loss"] != c.history["train/loss"]  # the seed matters, so the test can fail
    # What the tracker was given is the same numbers.
    for t in (ta, tb):
        assert [v for _, v in t.metrics["val/loss"]] == a.history["val/loss"]
    running_a = ta.metrics["train/running_loss"]
    assert running_a and running_a == tb.metrics["train/running_loss"]


def test_channels_last_gives_the_same_run_up_to_rounding():
    """train.channels_last changes only how conv weights are laid out in memory: deterministic, and
    the same curves as the default layout to float rounding."""
    from harness.run import build, run
    from harness.tracking.tracker import MemoryTracker

    spec = load_spec(DIGITS, TINY + ["data.limit_train=500", "train.checkpoint=false", "guard=off"])
    nhwc = spec.with_overrides({"train.channels_last": True})
    conv = [p for p in build(nhwc).model.parameters() if p.dim() == 4]
    assert conv and all(p.is_contiguous(memory_format=torch.channels_last) for p in conv)
    assert any(not p.is_contiguous() for p in conv)  # (a 1-channel conv is both layouts at once)
    tracker = MemoryTracker()
    a, b, c = (run(spec, tracker=MemoryTracker(), progress=False), run(nhwc, tracker=tracker, progress=False),
               run(nhwc, tracker=MemoryTracker(), progress=False))
    assert b.history["train/loss"] == c.history["train/loss"]  # deterministic in this layout too
    for k in ("train/loss", "val/loss", "val/acc"):
        assert b.history[k] == pytest.approx(a.history[k], rel=1e-4, abs=1e-4), k
    assert tracker.params["train.channels_last"] is True


# -- divergence ----------------------------------------------------------------------------------------

def test_divergence_fails_the_run_with_a_clear_message(fast_store, tmp_path):
    # options may come before the overrides too (intermixed parsing)
    r = run_cli("harness.train", DIGITS, "--quiet", "optimizer.lr=1e6", "train.epochs=3", "train.log_model=false",
                cwd=tmp_path, timeout=300)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("harness.train:")]
    assert len(lines) == 1, r.stderr
    assert "diverged" in lines[0] and "FAILED" in lines[0] and "optimizer.lr" in lines[0]
    (run,) = all_runs(fast_store)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"].startswith("diverged: training loss is nan")
    assert run.data.params["optimizer.lr"] == "1000000.0"


# -- the one-batch sanity check -----------------------------------------------------------------------------

@pytest.fixture()
def arch_with_dead_parameter():
    name = "test_dead_param"

    class DeadParam(nn.Module):
        def __init__(self, n_in, n_out):
            super().__init__()
            self.features = nn.Flatten()
            self.classifier = nn.Linear(n_in, n_out)
            self.unused = nn.Linear(3, 3)  # never called in forward: it can never learn

        def forward(self, x):
            return self.classifier(self.features(x))

    @register(name)
    def build(spec, input_shape, num_classes):
        c, h, w = input_shape
        return DeadParam(c * h * w, num_classes)

    yield name
    MODELS.pop(name, None)


def test_sanity_check_passes_a_healthy_setup():
    from harness.run import build

    parts = build(load_spec(None, ["data.limit_train=300"]))
    before = {k: v.clone() for k, v in parts.model.state_dict().items()}
    assert sanity_check(parts.model, next(iter(parts.data.train)), parts.optimizer) == []
    after = parts.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model itself is untouched


def test_sanity_check_finds_parameters_without_gradient(arch_with_dead_parameter):
    from harness.run import build

    parts = build(load_spec(None, [f"model.arch={arch_with_dead_parameter}", "data.limit_train=300"]))
    problems = sanity_check(parts.model, next(iter(parts.data.train)), parts.optimizer)
    assert len(problems) == 1
    assert "no gradient reaches" in problems[0] and "unused.weight" in problems[0] and "unused.bias" in problems[0]


def test_sanity_check_finds_a_step_that_does_not_lower_the_loss():
    from harness.run import build

    parts = build(load_spec(None, ["optimizer.lr=1000", "data.limit_train=300"]))
    problems = sanity_check(parts.model, next(iter(parts.data.train)), parts.optimizer)
    assert any("did not lower the loss" in p and "learning rate" in p for p in problems)


def test_broken_setup_warns_in_the_log_and_tags_the_run(arch_with_dead_parameter, caplog):
    from harness.run import run
    from harness.tracking.tracker import MemoryTracker

    spec = load_spec(DIGITS, TINY + [f"model.arch={arch_with_dead_parameter}", "train.sanity_check=true",
                                     "train.epochs=1", "train.checkpoint=false", "guard=off"])
    tracker = MemoryTracker()
    with caplog.at_level(logging.WARNING, logger="harness.run"):
        run(spec, tracker=tracker, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("sanity check" in w and "unused.weight" in w for w in warnings), warnings
    assert tracker.status == "FINISHED"  # a warning, not a failure
    assert "unused.weight" in tracker.tags["sanity_check"]
