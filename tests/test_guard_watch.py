"""The phase-inferring mode guard (harness.guard.watch) on plain loops with no phase markers: the same
verdict as the marked guard on every harness arm, gradient accumulation told apart from a missing
zero_grad, the patterns it must stay silent on (GANs, target networks, frozen backbones, two forwards
per step, checkpointing, torch's own update_bn), where it says a bug is, and that it never breaks or
outlives the script it watches."""
from __future__ import annotations

import copy
import dataclasses
import inspect
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.core.loop import Diverged, evaluate, train_one_epoch
from harness.core.modes import POLICIES, get_policy
from harness.guard import Watcher, watch
from test_guard import EXPECTED
from test_modes import batches, make_model

DEVICE = torch.device("cpu")


def mlp(dropout=0.3, bn=True) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(8, 16)] + ([nn.BatchNorm1d(16)] if bn else []) + [nn.ReLU(), nn.Dropout(dropout),
                                                                          nn.Linear(16, 3)]
    return nn.Sequential(*layers)


def data(n=6, size=8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 8, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(n)]


def plain_loop(model, opt, epochs=2, *, train_call=True, eval_call=True, no_grad=True, zero_grad="every",
               accumulate=1):
    """The textbook loop, each line a switch a tired researcher can get wrong."""
    for epoch in range(epochs):
        if train_call or epoch == 0 and train_call is None:
            model.train()
        if zero_grad == "epoch":
            opt.zero_grad()
        for i, (x, y) in enumerate(data()):
            if zero_grad == "every" and i % accumulate == 0:
                opt.zero_grad()
            (F.cross_entropy(model(x), y) / accumulate).backward()
            if (i + 1) % accumulate == 0:
                opt.step()
        if eval_call:
            model.eval()
        ctx = torch.no_grad() if no_grad else torch.enable_grad()
        with ctx:
            for x, y in data(2):
                out = model(x)
                _ = (out.argmax(1) == y).float().mean().item()


def verdict(**kw) -> dict:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with watch(model) as guard:
        plain_loop(model, opt, **kw)
    return guard.summary()


@pytest.mark.parametrize("arm", tuple(POLICIES))
def test_same_verdict_as_the_marked_guard_on_every_harness_arm(arm):
    """The harness's own loop run without phase markers: every bug flagged by the kind the marked guard
    uses, the correct loop and MC dropout (allowed) never."""
    policy = get_policy(arm)
    model = make_model()
    policy.start_run(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    with watch(model, allow=["mc_dropout"] if policy.allows_stochastic_eval else []) as guard:
        for epoch in (1, 2):
            train_one_epoch(model, batches(), opt, DEVICE, epoch=epoch, policy=policy)
            evaluate(model, batches()[:2], DEVICE, policy=policy)
    assert set(guard.summary()) == EXPECTED[arm]


def test_each_classic_bug_in_a_plain_loop():
    assert verdict() == {}
    assert verdict(eval_call=False) == {"eval_in_train_mode": ["model.1", "model.3"],
                                        "bn_stats_changed_in_eval": ["model.1"]}
    assert verdict(train_call=None) == {"train_in_eval_mode": ["model.1", "model.3"]}  # train() once
    assert verdict(no_grad=False) == {"grad_enabled_in_eval": ["model"]}
    assert verdict(zero_grad="never") == {"missing_zero_grad": ["opt"]}


def test_gradient_accumulation_is_not_a_missing_zero_grad():
    assert verdict(accumulate=3) == {}
    assert verdict(accumulate=3, zero_grad="epoch") == {"missing_zero_grad": ["opt"]}


@pytest.mark.parametrize("clear", ["set_to_none", "zeros", "model.zero_grad", "grad = None", "grad.zero_"])
def test_every_way_of_clearing_gradients_counts(clear):
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with watch(model) as guard:
        for x, y in data():
            if clear == "set_to_none":
                opt.zero_grad()
            elif clear == "zeros":
                opt.zero_grad(set_to_none=False)
            elif clear == "model.zero_grad":
                model.zero_grad()
            else:
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad = None if clear == "grad = None" else p.grad.zero_()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert guard.summary() == {}


def test_the_report_says_where_and_how_often():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with watch(model) as guard:
        for x, y in data(4):
            F.cross_entropy(model(x), y).backward()
            opt.step()  # no zero_grad
        for x, _ in data(3):
            model(x)  # evaluation in training mode, with autograd on
    line = inspect.currentframe().f_lineno - 1
    found = {f.kind: f for f in guard.findings()}
    site = f"{__file__.rsplit('/', 1)[-1]}:{line}"
    assert [s.rsplit("/", 1)[-1] for s in found["eval_in_train_mode"].sites] == [site]
    assert found["eval_in_train_mode"].count == 3 and found["grad_enabled_in_eval"].count == 3
    assert found["missing_zero_grad"].count == 3 and found["missing_zero_grad"].of == 3
    assert [s.rsplit("/", 1)[-1] for s in found["missing_zero_grad"].sites] == [f"{site.split(':')[0]}:{line - 2}"]
    text = guard.format("train.py")
    assert f"at " in text and "3 forwards" in text and "carried over in 3 of 3 steps" in text
    report = guard.report()
    assert report["models"][0]["forwards"] == {"train": 4, "eval": 0, "eval_grad": 3}


def test_a_gan_with_two_models_and_two_optimizers_is_clean():
    torch.manual_seed(0)
    netG = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    netD = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Dropout(0.2), nn.Linear(16, 1))
    optD, optG = torch.optim.Adam(netD.parameters()), torch.optim.Adam(netG.parameters())
    bce = nn.BCEWithLogitsLoss()
    with watch() as guard:
        for _ in range(5):
            netD.zero_grad()
            real, fake = torch.randn(8, 2), netG(torch.randn(8, 4))
            (bce(netD(real), torch.ones(8, 1)) + bce(netD(fake.detach()), torch.zeros(8, 1))).backward()
            optD.step()
            netG.zero_grad()
            bce(netD(fake), torch.ones(8, 1)).backward()  # leaves gradients in D until its next zero_grad
            optG.step()
    assert guard.summary() == {}
    assert {m["name"]: m["updated_by"] for m in guard.report()["models"]} == {"netG": ["optG"], "netD": ["optD"]}


def test_target_networks_and_ema_copies_under_no_grad_are_left_alone():
    """Never optimized while another model trains: not a model being evaluated, even in training mode."""
    online = mlp()
    target = copy.deepcopy(online)  # in training mode, dropout and BatchNorm on
    opt = torch.optim.SGD(online.parameters(), lr=0.05)
    with watch() as guard:
        for x, y in data():
            with torch.no_grad():
                soft = F.softmax(target(x), 1)
            opt.zero_grad()
            F.cross_entropy(online(x), soft).backward()
            opt.step()
            with torch.no_grad():
                for t, o in zip(target.parameters(), online.parameters()):
                    t.lerp_(o, 0.1)
        online.eval()
        with torch.no_grad():
            online(data(1)[0][0])
    assert guard.summary() == {}
    assert [m["updated_by"] for m in guard.report()["models"]] == [[], ["opt"]]


def test_a_copy_tested_after_training_without_eval_is_flagged():
    """...but a model tested after the last optimizer step is a model being evaluated."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with watch() as guard:
        plain_loop(model, opt)
        best = mlp()
        best.load_state_dict(model.state_dict())  # a fresh module: training mode
        with torch.no_grad():
            best(data(1)[0][0])
    assert guard.summary() == {"eval_in_train_mode": ["best.1", "best.3"], "bn_stats_changed_in_eval": ["best.1"]}


def test_a_script_that_trains_nothing_has_every_model_checked():
    model = mlp()
    with watch() as guard, torch.no_grad():
        model(torch.randn(4, 8))
    assert set(guard.summary()) == {"eval_in_train_mode", "bn_stats_changed_in_eval"}


def test_frozen_backbone_kept_in_eval_is_deliberate_but_frozen_batchnorm_in_training_mode_is_not():
    def run(keep_eval: bool) -> dict:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.2)),
                              nn.Dropout(0.3), nn.Linear(16, 3))
        model[0].requires_grad_(False)
        opt = torch.optim.SGD(model[2].parameters(), lr=0.1)
        with watch(model) as guard:
            for x, y in data():
                model.train()
                if keep_eval:
                    model[0].eval()
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        return guard.summary()

    assert run(keep_eval=True) == {}
    assert run(keep_eval=False) == {"frozen_in_train_mode": ["model.0.1"]}


def test_two_forwards_and_one_backward_are_both_training():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with watch(model) as guard:
        for x, _ in data():
            opt.zero_grad()
            z1, z2 = model(x), model(x + 0.1)  # a Siamese pair
            F.mse_loss(z1, z2).backward()
            opt.step()
    assert guard.summary() == {}
    assert guard.report()["models"][0]["forwards"]["train"] == 12


def test_outputs_in_a_tuple_a_dict_a_dataclass_or_a_dict_subclass():
    @dataclasses.dataclass
    class Out:
        logits: torch.Tensor

    class Odd(dict):
        pass

    class Multi(nn.Module):
        def __init__(self, kind):
            super().__init__()
            self.kind, self.body, self.drop = kind, nn.Linear(8, 3), nn.Dropout(0.2)

        def forward(self, x):
            y = self.drop(self.body(x))
            return {"tuple": lambda: (y, y.sum()), "dict": lambda: {"logits": y},
                    "dataclass": lambda: Out(y), "odd": lambda: Odd(logits=y)}[self.kind]()

    for kind in ("tuple", "dict", "dataclass", "odd"):
        model = Multi(kind)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with watch(model) as guard:
            for x, y in data(3):
                opt.zero_grad()
                out = model(x)
                logits = out[0] if kind == "tuple" else out.logits if kind == "dataclass" else out["logits"]
                F.cross_entropy(logits, y).backward()
                opt.step()
        assert guard.report()["models"][0]["forwards"] == {"train": 3, "eval": 0, "eval_grad": 0}, kind
        assert guard.summary() == {}, kind


def test_activation_checkpointing_and_update_bn_are_not_evaluations():
    from torch.optim.swa_utils import AveragedModel, update_bn
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.out = mlp(), nn.Linear(3, 3)

        def forward(self, x):
            return self.out(checkpoint(self.block, x, use_reentrant=False))

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    swa = AveragedModel(model)
    with watch() as guard:
        for x, y in data():
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            swa.update_parameters(model)
        update_bn([x for x, _ in data()], swa)
    assert guard.summary() == {}
    assert [m["name"] for m in guard.report()["models"]] == ["model"]


def test_recurrent_and_attention_dropout_are_watched():
    lstm = nn.LSTM(8, 8, num_layers=2, dropout=0.3)
    attn = nn.MultiheadAttention(8, 2, dropout=0.1)
    for module in (lstm, attn):
        with watch(module) as guard, torch.no_grad():
            x = torch.randn(5, 2, 8)
            module(x) if module is lstm else module(x, x, x)
        assert guard.summary()["eval_in_train_mode"], module


def test_a_diverging_loop_without_zero_grad_is_flagged_before_it_dies():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e6)
    guard = watch(model)
    with pytest.raises(Diverged):
        train_one_epoch(model, batches(n=8), opt, DEVICE, policy=get_policy("no_zero_grad"), log_every=4)
    guard.close()
    assert guard.summary() == {"missing_zero_grad": ["optimizer"]}  # its name where step() is called


def test_an_error_inside_the_guard_never_breaks_the_script(monkeypatch):
    from harness.guard.roots import Root

    def broken(self, site):
        raise RuntimeError("boom")

    monkeypatch.setattr(Root, "key", broken)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with watch(model) as guard:
        plain_loop(model, opt)  # runs to the end
    assert guard.error == "RuntimeError: boom"
    assert "stopped watching after an internal error" in guard.format()


def test_close_removes_every_hook_and_the_model_still_copies_and_saves():
    from torch.nn.modules import module as hooks

    before = (len(hooks._global_forward_pre_hooks), len(hooks._global_forward_hooks))
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = watch(model)
    plain_loop(model, opt)
    copy.deepcopy(model)(torch.randn(4, 8))  # a copy is not the watched model, and copies no hook
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "backward hook will not be serialized" warning
        torch.save(model, io.BytesIO())
    guard.close()
    assert (len(hooks._global_forward_pre_hooks), len(hooks._global_forward_hooks)) == before
    assert not any(p._backward_hooks for p in model.parameters())
    plain_loop(model, opt, eval_call=False)  # after close: nothing more is counted
    assert guard.summary() == {}


def test_watch_of_one_model_ignores_the_others_and_end_epoch_reports_each_epoch():
    model, other = mlp(), mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = watch(model)
    plain_loop(model, opt, epochs=1)
    assert guard.end_epoch() == {"count": 0, "findings": {}}
    with torch.no_grad():
        other(torch.randn(4, 8))  # another model in training mode: not watched
        model(torch.randn(4, 8))  # the watched one, evaluated in eval mode: fine
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 8))
    assert guard.end_epoch() == {"count": 3, "findings": {"eval_in_train_mode": ["model.1", "model.3"],
                                                          "bn_stats_changed_in_eval": ["model.1"]}}
    assert guard.end_epoch() == {"count": 0, "findings": {}}
    guard.close()
    assert [m["name"] for m in guard.report()["models"]] == ["model"]


def test_unknown_allow_kind_is_refused():
    with pytest.raises(ValueError, match="cannot allow mc_drop"):
        Watcher(allow=["mc_drop"])


def test_torch_compile_traces_the_hooks_as_no_ops():
    """torch.compile runs the global hooks through its tracer: the script must not break, and a model
    compiled with torch.compile(model) is still watched from outside."""
    model = mlp()
    compiled = torch.compile(model, backend="eager")  # the tracer without a C++ compiler
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with watch() as guard:
        for x, y in data(3):
            opt.zero_grad()
            F.cross_entropy(compiled(x), y).backward()
            opt.step()
        with torch.no_grad():
            compiled(data(1)[0][0])  # model.eval() forgotten
    assert guard.summary() == {"eval_in_train_mode": ["compiled._orig_mod.1", "compiled._orig_mod.3"],
                               "bn_stats_changed_in_eval": ["compiled._orig_mod.1"]}
