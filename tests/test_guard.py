"""The mode guard: its verdict on every arm (each bug flagged, the correct loop and MC dropout never),
custom mode-dependent layers treated like Dropout, frozen modules, the ledger, warn/raise/off, and
what a run logs to MLflow."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

from harness.guard import FINDINGS, ROOT, ModeGuard, ModeGuardError
from harness.core.loop import evaluate, train_one_epoch
from harness.core.modes import get_policy
from harness.core.modes import POLICIES
from harness.errors import UserError
from harness.spec import load_spec
from conftest import ROOT as REPO, TINY
from test_modes import batches, make_model

DEVICE = torch.device("cpu")

# The verdict the guard must reach on each arm: every bug flagged, by the kind that names it.
EXPECTED = {
    "none": set(),
    "mc_dropout": set(),
    "no_eval": {"eval_in_train_mode", "bn_stats_changed_in_eval"},
    "train_once": {"train_in_eval_mode"},
    "no_grad_missing": {"grad_enabled_in_eval"},
    "no_zero_grad": {"missing_zero_grad"},
    "partial_freeze": {"frozen_in_train_mode"},
}


def guarded_run(policy, model=None, epochs: int = 2, action: str = "warn", zero_grad=None):
    """Train/val/test like harness.run does, under a guard; returns the guard and per-epoch reports."""
    model = model if model is not None else make_model()
    policy.start_run(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    if zero_grad is not None:
        policy.zero_grad = zero_grad
    guard = ModeGuard(model, frozen=policy.frozen, allow_stochastic_eval=policy.allows_stochastic_eval,
                      action=action)
    data, reports = batches(), []
    for epoch in range(1, epochs + 1):
        train_one_epoch(model, data, opt, DEVICE, epoch=epoch, policy=policy, guard=guard)
        evaluate(model, data[:2], DEVICE, policy=policy, guard=guard, prefix="val")
        reports.append(guard.end_epoch(epoch))
    evaluate(model, data[2:], DEVICE, policy=policy, guard=guard, prefix="test")
    reports.append(guard.end_epoch(epochs))
    guard.close()
    return guard, reports


def test_expected_covers_every_mode_bug():
    assert set(EXPECTED) == set(tuple(POLICIES))


@pytest.mark.parametrize("arm", tuple(POLICIES))
def test_verdict_on_each_arm(arm):
    """Model with dropout + batchnorm + Gaussian noise: each bug flagged, none and mc_dropout never."""
    guard, reports = guarded_run(get_policy(arm))
    assert set(guard.summary()) == EXPECTED[arm]
    if not EXPECTED[arm]:
        assert all(r["count"] == 0 and r["findings"] == {} for r in reports)


def test_verdict_names_the_modules():
    guard, _ = guarded_run(get_policy("no_eval"))
    found = guard.summary()
    assert {"noise", "classifier.3", "classifier.7", "features.1", ROOT} <= set(found["eval_in_train_mode"])
    assert set(found["bn_stats_changed_in_eval"]) == {"features.1", "features.5", "classifier.1",
                                                       "classifier.5"}
    guard, _ = guarded_run(get_policy("partial_freeze"))
    assert set(guard.summary()["frozen_in_train_mode"]) == {"features", "features.1", "features.5"}


def test_correct_loop_with_declared_freeze_is_clean():
    guard, _ = guarded_run(get_policy("none", frozen=["features"]))
    assert guard.summary() == {}


@pytest.mark.parametrize("arm", ["train_once", "partial_freeze"])
def test_training_bugs_show_from_the_second_epoch(arm):
    _, reports = guarded_run(get_policy(arm), epochs=2)
    if arm == "train_once":
        assert reports[0]["count"] == 0 and reports[1]["count"] > 0  # epoch 1 still trains correctly
    else:
        assert reports[0]["count"] > 0 and reports[1]["count"] > 0


def test_gaussian_noise_alone_is_treated_like_dropout():
    model = make_model(dropout=0.0, batchnorm=False, noise_std=0.2)  # the noise is the only such layer
    guard, _ = guarded_run(get_policy("no_eval"), model)
    assert guard.summary()["eval_in_train_mode"] == [ROOT, "noise"]
    guard, _ = guarded_run(get_policy("mc_dropout"), make_model(dropout=0.0, batchnorm=False, noise_std=0.2))
    assert guard.summary() == {}


def test_any_module_marked_mode_dependent_is_watched():
    class Jitter(nn.Module):
        mode_dependent = True

        def forward(self, x):
            return x + 0.1 * torch.randn_like(x) if self.training else x

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), Jitter())
    guard = ModeGuard(model)
    model.train()
    with guard.phase("val"), torch.no_grad():
        model(torch.zeros(2, 1, 8, 8))
    assert guard.end_epoch(1)["findings"] == {"eval_in_train_mode": [ROOT, "2"]}


def test_partial_freeze_is_flagged_without_batchnorm():
    """The frozen submodule itself is watched: the bug shows even when it holds no BatchNorm."""
    guard, _ = guarded_run(get_policy("partial_freeze"), make_model(batchnorm=False))
    assert guard.summary() == {"frozen_in_train_mode": ["features"]}


def test_undeclared_frozen_batchnorm_may_stay_in_eval_mode():
    model = make_model()
    bn = model.classifier[1]
    bn.requires_grad_(False)
    policy = get_policy("none")
    orig = policy.start_epoch

    def start_epoch(m, epoch):  # a common fine-tuning idiom: frozen BatchNorm kept in eval mode
        orig(m, epoch)
        bn.eval()

    policy.start_epoch = start_epoch
    guard, _ = guarded_run(policy, model)
    assert guard.summary() == {}


def test_zero_grad_to_zeros_is_not_a_finding():
    guard, _ = guarded_run(get_policy("none"), zero_grad=lambda opt: opt.zero_grad(set_to_none=False))
    assert guard.summary() == {}


def test_ledger_lists_each_phase_and_the_test_phase_joins_the_last_epoch():
    guard, reports = guarded_run(get_policy("train_once"), epochs=2)
    assert set(guard.ledger) == {1, 2}
    assert set(guard.ledger[1]) == {"train", "val"}
    assert set(guard.ledger[2]) == {"train", "val", "test"}
    assert guard.ledger[1]["train"]["noise"] == "train"
    assert guard.ledger[2]["train"]["noise"] == "eval"
    assert guard.ledger[2]["val"]["features.1"] == "eval"
    json.dumps(guard.ledger)  # serialisable as the run's artifact


def test_ledger_shows_mixed_modes_within_a_phase():
    model = make_model()
    guard = ModeGuard(model)
    x = torch.zeros(4, 1, 8, 8)
    with guard.phase("train"):
        model.train()
        model(x)
        model.eval()
        model(x)
    report = guard.end_epoch(1)
    assert report["ledger"]["train"]["classifier.3"] == "eval+train"


def test_count_is_the_number_of_flagged_modules_per_epoch():
    _, reports = guarded_run(get_policy("no_zero_grad"), epochs=2)
    assert [r["count"] for r in reports[:2]] == [1, 1]
    assert reports[0]["findings"] == {"missing_zero_grad": ["optimizer"]}


@pytest.mark.parametrize("action", ["warn", "raise"])
def test_a_no_zero_grad_run_that_diverges_in_its_first_epoch_is_flagged(action):
    """The NaN raises out of the training phase; the phase's checks still run, and the run's own
    exception (not a ModeGuardError) is what the caller sees."""
    from harness.core.loop import Diverged

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e6)
    guard = ModeGuard(model, action=action)
    with pytest.raises(Diverged):
        train_one_epoch(model, batches(n=8), opt, DEVICE, policy=get_policy("no_zero_grad"),
                        guard=guard, log_every=4)
    assert guard.summary() == {"missing_zero_grad": ["optimizer"]}
    guard = ModeGuard(make_model(), action=action)  # a clean phase that fails: nothing to report
    with pytest.raises(KeyboardInterrupt), guard.phase("train"):
        raise KeyboardInterrupt
    assert guard.summary() == {}


def test_raise_stops_at_the_first_finding():
    with pytest.raises(ModeGuardError) as info:
        guarded_run(get_policy("no_eval"), action="raise")
    assert info.value.kind == "eval_in_train_mode" and ROOT in info.value.modules
    assert isinstance(info.value, UserError)  # one line and exit status 2 from the CLIs
    with pytest.raises(ModeGuardError, match="gradients carried over"):
        guarded_run(get_policy("no_zero_grad"), action="raise")
    guarded_run(get_policy("none"), action="raise")  # clean: nothing raised
    with pytest.raises(ValueError):
        ModeGuard(make_model(), action="ignore")


def test_warn_logs_each_kind_once(caplog):
    with caplog.at_level(logging.WARNING, logger="harness.guard"):
        guarded_run(get_policy("no_eval"), epochs=3)
    messages = [r.getMessage() for r in caplog.records]
    assert sum(FINDINGS["eval_in_train_mode"] in m for m in messages) == 1
    assert sum(FINDINGS["bn_stats_changed_in_eval"] in m for m in messages) == 1


def test_close_removes_the_hook():
    model = make_model()
    guard = ModeGuard(model)
    guard.close()
    model.train()
    with guard.phase("val"):
        model(torch.zeros(2, 1, 8, 8))
    assert guard.end_epoch(1)["findings"] == {}


# -- what a run logs ---------------------------------------------------------------------------------

BASE = REPO / "experiments" / "digits_lenet_modes.yaml"


def _run(spec_overrides):
    from harness.run import run
    from harness.tracking.tracker import MemoryTracker

    spec = load_spec(BASE, TINY + spec_overrides)
    tracker = MemoryTracker()
    try:
        return run(spec, tracker=tracker, progress=False), tracker
    finally:
        _run.last = tracker


def test_run_logs_findings_tags_metric_and_ledger_unless_off():
    bug, t = _run(["mode_bug=no_eval"])
    assert set(t.tags["mode_guard.eval_in_train_mode"].split(",")) >= {ROOT, "noise"}
    assert "mode_guard.bn_stats_changed_in_eval" in t.tags
    assert [v for _, v in t.metrics["mode_guard/findings"]] == [12, 12]
    pages = {k: v for k, v in t.artifacts.items() if k.startswith("mode_guard/ledger/")}
    assert set(pages) == {"mode_guard/ledger/epochs-0001-0002.json"}  # sent once, at the end
    (ledger,) = pages.values()
    assert set(ledger["2"]) == {"train", "val", "test"}  # the test phase joins the last epoch
    assert ledger["1"]["val"]["classifier.3"] == "train"
    assert set(bug.guard) == EXPECTED["no_eval"]
    clean, tc = _run(["mode_bug=none"])
    assert not any(k.startswith("mode_guard.") for k in tc.tags)
    assert [v for _, v in tc.metrics["mode_guard/findings"]] == [0, 0]
    assert clean.guard == {}
    off, to = _run(["mode_bug=no_eval", "guard=off"])  # guard: off logs nothing of the kind
    assert off.guard == {} and "mode_guard/findings" not in to.metrics
    assert not any(k.startswith("mode_guard.") for k in to.tags)


def test_guard_raise_fails_the_run_with_the_finding_as_tags():
    with pytest.raises(ModeGuardError):
        _run(["mode_bug=no_zero_grad", "guard=raise"])
    t = _run.last
    assert t.status == "FAILED"
    assert t.tags["mode_guard.missing_zero_grad"] == "optimizer"
    assert "gradients carried over" in t.tags["failure_reason"]
