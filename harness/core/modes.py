"""Mode policies: the correct loop and each injected mode bug, in ONE place.

The loop calls a policy at five points (run start, epoch start, evaluation start, the gradient
context of evaluation, zero_grad) and for each prediction. :class:`Correct` is the textbook; every bug
is a subclass that overrides the few lines it gets wrong, marked ``# BUG``.

A policy is registered under its ``name`` with :func:`register`; the spec's ``mode_bug`` accepts exactly
the registered names, and the ablation reads ``scope`` (what it changes: an evaluation-only policy is
scored on the control's checkpoints) and ``expects_findings`` (whether the mode guard should flag it)
from the class. A new bug is one subclass here (or in any module imported before the spec is read).
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn

from harness.guard.layers import is_stochastic


POLICIES: dict[str, type["Correct"]] = {}


def register(cls: type["Correct"]) -> type["Correct"]:
    """Class decorator: make a policy selectable as ``mode_bug: <cls.name>``."""
    if cls.scope not in ("none", "eval", "train"):
        raise ValueError(f"policy {cls.__name__}: scope must be none, eval or train, got {cls.scope!r}")
    POLICIES[cls.name] = cls
    return cls


@register
class Correct:
    """The textbook loop: ``model.train()`` every epoch, ``model.eval()`` + ``no_grad`` to evaluate."""

    name = "none"
    allows_stochastic_eval = False  # the guard accepts dropout at evaluation only when this is True
    # What the policy changes relative to the textbook: "none", "eval" (only evaluation: an ablation
    # may score it on the control's checkpoints) or "train" (needs its own training runs).
    scope = "none"
    # Whether gradients live on from one step to the next (then they are training state a checkpoint
    # must keep: a resume that started from zero gradients would train differently).
    carries_gradients = False

    def __init__(self, frozen: Sequence[str] = (), mc_samples: int = 10):
        self.frozen = tuple(frozen)
        self.mc_samples = mc_samples

    @classmethod
    def expects_findings(cls) -> bool:
        """Whether the mode guard must flag a run of this policy: every real bug, never the textbook
        loop nor a deliberate stochastic evaluation (MC dropout)."""
        return cls.scope != "none" and not cls.allows_stochastic_eval

    def start_run(self, model: nn.Module) -> None:
        """Once, before the first epoch: freeze the declared submodules (no gradients, eval mode)."""
        for name in self.frozen:
            sub = model.get_submodule(name)
            sub.requires_grad_(False)
            sub.eval()

    def start_epoch(self, model: nn.Module, epoch: int) -> None:
        model.train()
        self._keep_frozen_in_eval(model)

    def start_eval(self, model: nn.Module) -> None:
        model.eval()

    def eval_context(self) -> contextlib.AbstractContextManager:
        return torch.no_grad()

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x)

    def _keep_frozen_in_eval(self, model: nn.Module) -> None:
        # model.train() flips every submodule, frozen ones too: put them back.
        for name in self.frozen:
            model.get_submodule(name).eval()


@register
class NoEval(Correct):
    """Validation without ``model.eval()``: dropout stays on, BatchNorm uses and updates batch stats."""

    name = "no_eval"
    scope = "eval"

    def start_eval(self, model: nn.Module) -> None:
        pass  # BUG: model.eval() forgotten


@register
class TrainOnce(Correct):
    """``model.train()`` once before the epoch loop: after the first validation, training runs in eval mode."""

    name = "train_once"
    scope = "train"

    def start_run(self, model: nn.Module) -> None:
        super().start_run(model)
        model.train()  # BUG: the only call, before the epoch loop
        self._keep_frozen_in_eval(model)

    def start_epoch(self, model: nn.Module, epoch: int) -> None:
        pass  # BUG: no model.train() at the start of each epoch


@register
class NoGradMissing(Correct):
    """Validation without ``torch.no_grad()``: same numbers, an autograd graph built for nothing."""

    name = "no_grad_missing"
    scope = "eval"

    def eval_context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # BUG: no torch.no_grad()


@register
class NoZeroGrad(Correct):
    """``optimizer.zero_grad()`` forgotten: every step uses the sum of all gradients so far."""

    name = "no_zero_grad"
    scope = "train"
    carries_gradients = True

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        pass  # BUG: gradients accumulate across steps


@register
class MCDropout(Correct):
    """The deliberate counterpart of ``no_eval``: dropout on at evaluation, BatchNorm in eval mode,
    softmax averaged over ``mc_samples`` passes. Not a bug; the guard allows it."""

    name = "mc_dropout"
    scope = "eval"
    allows_stochastic_eval = True

    def start_eval(self, model: nn.Module) -> None:
        model.eval()
        for m in model.modules():
            if is_stochastic(m):
                m.train()

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([torch.softmax(model(x), dim=1) for _ in range(self.mc_samples)]).mean(0)
        # log of the mean probability: cross-entropy on it is the predictive NLL.
        return torch.log(probs.clamp_min(1e-12))


@register
class PartialFreeze(Correct):
    """A frozen feature extractor put in ``eval()`` once, silently undone by every ``model.train()``:
    its BatchNorm statistics drift with the training batches although its weights are frozen."""

    name = "partial_freeze"
    scope = "train"

    def __init__(self, frozen: Sequence[str] = (), mc_samples: int = 10):
        super().__init__(frozen or ("features",), mc_samples)

    def start_epoch(self, model: nn.Module, epoch: int) -> None:
        model.train()  # BUG: also flips the frozen features back to training mode


def get_policy(name: str, frozen: Sequence[str] = (), mc_samples: int = 10) -> Correct:
    """The policy for spec field ``mode_bug`` (``none`` is the textbook loop)."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown mode_bug {name!r}; choose one of {sorted(POLICIES)}") from None
    return cls(frozen, mc_samples)
