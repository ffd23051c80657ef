"""Each mode policy, phase by phase: which modules are in which mode, whether autograd is on during
evaluation, whether gradients are cleared, what is frozen. Driven through the real loop functions."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.core.loop import evaluate, train_one_epoch
from harness.core.models import GaussianNoise, build_model
from harness.core.modes import POLICIES, Correct, get_policy
from harness.guard.layers import is_batchnorm, is_stochastic
from harness.spec import ModelSpec

DEVICE = torch.device("cpu")


def make_model(**kw) -> nn.Module:
    spec = ModelSpec(arch=kw.pop("arch", "lenet"), **{"dropout": 0.3, "batchnorm": True, "noise_std": 0.1, **kw})
    torch.manual_seed(0)
    return build_model(spec, (1, 8, 8), 10)


def batches(n: int = 3, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 8, 8, generator=g), torch.randint(0, 10, (size,), generator=g))
            for _ in range(n)]


def kind(name: str, m: nn.Module) -> str | None:
    if name == "":
        return "root"
    if is_batchnorm(m):
        return "features_bn" if name.startswith("features.") else "bn"
    if is_stochastic(m):
        return "noise" if isinstance(m, GaussianNoise) else "dropout"
    if name == "features":
        return "features"
    return None


class Recorder:
    """Per phase label: the modes seen per module kind, autograd on/off, forwards counted."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.label = "?"
        self.modes: dict[str, dict[str, set[bool]]] = {}
        self.grad: dict[str, set[bool]] = {}
        self.forwards: dict[str, int] = {}
        self.carried: dict[str, list[bool]] = {}
        self._probe = [p for p in model.parameters() if p.requires_grad][-1]
        model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        modes = self.modes.setdefault(self.label, {})
        for name, m in self.model.named_modules():
            k = kind(name, m)
            if k:
                modes.setdefault(k, set()).add(m.training)
        self.grad.setdefault(self.label, set()).add(torch.is_grad_enabled())
        self.forwards[self.label] = self.forwards.get(self.label, 0) + 1
        g = self._probe.grad
        self.carried.setdefault(self.label, []).append(g is not None and bool(g.ne(0).any()))


def drive(policy: Correct, model: nn.Module | None = None, epochs: int = 2) -> Recorder:
    model = model if model is not None else make_model()
    policy.start_run(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    rec = Recorder(model)
    data = batches()
    for epoch in range(1, epochs + 1):
        rec.label = f"train{epoch}"
        train_one_epoch(model, data, opt, DEVICE, epoch=epoch, policy=policy)
        rec.label = f"val{epoch}"
        evaluate(model, data[:2], DEVICE, policy=policy)
    return rec


def single(rec: Recorder, label: str) -> dict[str, bool]:
    """The one mode each module kind had during ``label`` (fails when it was mixed)."""
    out = {}
    for k, seen in rec.modes[label].items():
        assert len(seen) == 1, f"{label}: {k} was in both modes"
        out[k] = next(iter(seen))
    return out


ALL_TRAIN = {"root": True, "features": True, "features_bn": True, "bn": True, "dropout": True, "noise": True}
ALL_EVAL = {k: False for k in ALL_TRAIN}


def test_every_spec_mode_bug_has_a_policy():
    assert set(POLICIES) == set(tuple(POLICIES))
    for name in tuple(POLICIES):
        p = get_policy(name)
        assert p.name == name and p.scope in ("none", "eval", "train")
    with pytest.raises(ValueError, match="unknown mode_bug"):
        get_policy("no_such_bug")


def test_correct_is_the_textbook():
    rec = drive(get_policy("none"))
    for e in (1, 2):
        assert single(rec, f"train{e}") == ALL_TRAIN
        assert single(rec, f"val{e}") == ALL_EVAL
        assert rec.grad[f"val{e}"] == {False}
        assert rec.grad[f"train{e}"] == {True}
        assert not any(rec.carried[f"train{e}"])  # zero_grad before every step


def test_no_eval_keeps_everything_in_training_mode_and_updates_bn_stats():
    model = make_model()
    rec = drive(get_policy("no_eval"), model, epochs=1)
    assert single(rec, "val1") == ALL_TRAIN
    assert rec.grad["val1"] == {False}
    bn = model.classifier[1]
    before = bn.running_mean.clone()
    evaluate(model, batches(1, seed=5), DEVICE, policy=get_policy("no_eval"))
    assert not torch.equal(before, bn.running_mean)  # validation data leaked into the statistics


def test_train_once_trains_in_eval_mode_after_the_first_validation():
    rec = drive(get_policy("train_once"), epochs=3)
    assert single(rec, "train1") == ALL_TRAIN
    assert single(rec, "val1") == ALL_EVAL
    assert single(rec, "train2") == ALL_EVAL  # the bug: model.train() never called again
    assert single(rec, "train3") == ALL_EVAL


def test_no_grad_missing_only_turns_autograd_on_in_evaluation():
    rec = drive(get_policy("no_grad_missing"))
    assert single(rec, "train2") == ALL_TRAIN and single(rec, "val2") == ALL_EVAL
    assert rec.grad["val1"] == {True}


def test_no_grad_missing_gives_the_same_numbers_and_builds_a_graph():
    model, data = make_model(), batches()
    model.eval()
    ok = evaluate(model, data, DEVICE, policy=get_policy("none"), keep_predictions=True)
    bug = evaluate(model, data, DEVICE, policy=get_policy("no_grad_missing"), keep_predictions=True)
    assert ok["val/loss"] == bug["val/loss"] and ok["val/acc"] == bug["val/acc"]
    assert torch.equal(ok["predictions"], bug["predictions"])
    assert ok["val/autograd_mb"] == 0 and bug["val/autograd_mb"] > 0


def test_no_zero_grad_carries_gradients_over():
    rec = drive(get_policy("no_zero_grad"))
    carried = rec.carried["train1"] + rec.carried["train2"]
    assert carried[0] is False and all(carried[1:])
    assert single(rec, "train2") == ALL_TRAIN and single(rec, "val2") == ALL_EVAL


def test_mc_dropout_keeps_only_dropout_like_layers_stochastic_and_averages_passes():
    policy = get_policy("mc_dropout", mc_samples=4)
    rec = drive(policy, epochs=1)
    assert single(rec, "val1") == {**ALL_EVAL, "dropout": True, "noise": True}
    assert rec.forwards["val1"] == 2 * 4  # two batches, four passes each
    model = make_model()
    policy.start_eval(model)
    with torch.no_grad():
        logp = policy.predict(model, batches(1)[0][0])
    assert torch.allclose(logp.exp().sum(1), torch.ones(logp.shape[0]), atol=1e-5)


def test_mc_dropout_is_deterministic_under_a_seed_and_isolated_from_training_rng():
    model, data = make_model(), batches()
    torch.manual_seed(3)
    a = evaluate(model, data, DEVICE, policy=get_policy("mc_dropout"))
    after_a = torch.rand(1)
    torch.manual_seed(3)
    b = evaluate(model, data, DEVICE, policy=get_policy("mc_dropout"))
    assert a["val/loss"] == b["val/loss"]
    torch.manual_seed(3)
    assert torch.equal(after_a, torch.rand(1))  # fork_rng: evaluation consumed none of the stream


def test_declared_freeze_keeps_the_features_in_eval_mode():
    model = make_model()
    rec = drive(get_policy("none", frozen=["features"]), model)
    for e in (1, 2):
        assert single(rec, f"train{e}") == {**ALL_TRAIN, "features_bn": False, "features": False}
    assert not any(p.requires_grad for p in model.features.parameters())


def test_partial_freeze_undoes_the_eval_of_the_frozen_features():
    model = make_model()
    frozen_bn = model.features[1]
    before = frozen_bn.running_mean.clone()
    rec = drive(get_policy("partial_freeze"), model)
    assert get_policy("partial_freeze").frozen == ("features",)  # its default
    for e in (1, 2):
        assert single(rec, f"train{e}") == ALL_TRAIN  # the bug: features back in training mode
        assert single(rec, f"val{e}")["features_bn"] is False
    assert not any(p.requires_grad for p in model.features.parameters())  # weights still frozen
    assert not torch.equal(before, frozen_bn.running_mean)  # ...but the statistics drifted


def test_gaussian_noise_is_active_only_in_training_mode():
    layer = GaussianNoise(0.5)
    x = torch.zeros(4, 3)
    assert not torch.equal(layer.train()(x), x)
    assert torch.equal(layer.eval()(x), x)
    assert is_stochastic(layer) and layer.mode_dependent
