"""The mode guard: watches module modes per phase and finds mode bugs at run time, in anyone's loop.

    guard = ModeGuard(model, frozen=["features"])
    with guard.phase("train"): ...train one epoch...
    with guard.phase("val"): ...evaluate...
    report = guard.end_epoch(epoch)      # findings of this epoch + the mode ledger
    guard.close()

One forward pre-hook on the root module reads the ``training`` flags of the watched modules: the root,
the mode-sensitive modules (Dropout, BatchNorm, custom layers marked ``mode_dependent`` such as
GaussianNoise, which is treated exactly like Dropout) and the declared-frozen submodules. The tuple of
flags is compared with the states already seen in this phase, so a clean step costs a few attribute
reads and one tiny device-side check of a gradient (for missing ``zero_grad``), with no host sync.

What it finds (``FINDINGS``): evaluation forwards with any watched module in training mode (dropout-like
modules are allowed when the policy says so, as MC dropout does), evaluation with autograd on,
BatchNorm running statistics that changed during evaluation, training steps with modules in eval mode
that are not frozen, frozen modules put back in training mode, and gradients carried over between
training steps.
"""
from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from typing import Iterator, Sequence

import torch
from torch import nn

from harness.errors import UserError
from harness.guard.layers import is_batchnorm, is_mode_sensitive, is_stochastic

log = logging.getLogger("harness.guard")

FINDINGS = {
    "eval_in_train_mode": "evaluation forward with modules in training mode (call model.eval() first)",
    "grad_enabled_in_eval": "evaluation forward with autograd on (wrap it in torch.no_grad())",
    "bn_stats_changed_in_eval": "BatchNorm running statistics changed during evaluation",
    "train_in_eval_mode": "training step with modules in eval mode that are not frozen "
                          "(call model.train() at the start of every epoch)",
    "frozen_in_train_mode": "training step with frozen modules in training mode "
                            "(put them back in eval() after model.train())",
    "missing_zero_grad": "gradients carried over between training steps (call optimizer.zero_grad())",
}
ROOT = "(model)"
TRAIN = "train"


class ModeGuardError(UserError):
    """Raised with ``action="raise"`` at the first finding; ``kind`` and ``modules`` say what it was."""

    def __init__(self, message: str, kind: str, modules: Sequence[str]):
        super().__init__(message)
        self.kind = kind
        self.modules = list(modules)


class ModeGuard:
    """Watches ``model`` through one forward pre-hook; see the module docstring.

    ``frozen``: names of submodules declared frozen (eval mode, no gradients); BatchNorm layers whose
    parameters all have ``requires_grad=False`` count as frozen too. ``allow_stochastic_eval``: accept
    dropout-like modules in training mode during evaluation (MC dropout). ``action``: ``warn`` logs
    each new finding once, ``raise`` raises :class:`ModeGuardError` at the first one."""

    def __init__(self, model: nn.Module, *, frozen: Sequence[str] = (),
                 allow_stochastic_eval: bool = False, action: str = "warn"):
        if action not in ("warn", "raise"):
            raise ValueError(f"action must be warn or raise, got {action!r}")
        self.action = action
        self.allow_stochastic_eval = allow_stochastic_eval
        frozen = tuple(frozen)
        self.watched: list[tuple[str, nn.Module]] = [(ROOT, model)] + [
            (name, m) for name, m in model.named_modules()
            if name and (is_mode_sensitive(m) or name in frozen)
        ]
        self._names = [n for n, _ in self.watched]
        self._frozen = [self._is_frozen(name, m, frozen) for name, m in self.watched]
        self._stochastic = [is_stochastic(m) for _, m in self.watched]
        self._bns = [(n, m) for n, m in self.watched if is_batchnorm(m) and m.track_running_stats]
        trainable = [p for p in model.parameters() if p.requires_grad]
        self._probe = trainable[-1] if trainable else None  # last bias: carried gradients show up here
        self._phase: str | None = None
        self._seen: dict[str, set[tuple[bool, ...]]] = defaultdict(set)
        self._carried: torch.Tensor | None = None
        self._epoch_findings: dict[str, set[str]] = defaultdict(set)
        self.findings: dict[str, set[str]] = defaultdict(set)  # over the whole run
        self.ledger: dict[int, dict[str, dict[str, str]]] = {}
        self._closed = False
        self._hook = model.register_forward_pre_hook(self._pre_forward)

    @staticmethod
    def _is_frozen(name: str, module: nn.Module, frozen: Sequence[str]) -> bool:
        if any(name == f or name.startswith(f + ".") for f in frozen):
            return True
        params = list(module.parameters(recurse=False))
        return is_batchnorm(module) and bool(params) and not any(p.requires_grad for p in params)

    def close(self) -> None:
        """Remove the hook; later phases are not watched."""
        self._hook.remove()
        self._closed = True

    # -- phases ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """``train`` for training steps; any other name (``val``, ``test``) is an evaluation phase."""
        if self._closed:
            yield
            return
        self._phase = name
        self._carried = None
        before = self._bn_state() if name != TRAIN else None
        try:
            yield
        except BaseException:
            # A run that dies in the phase (a NaN loss, Ctrl-C) still gets the phase's findings: a
            # missing zero_grad is what makes a loss diverge. The phase's own exception goes on as it was.
            self._phase = None
            with contextlib.suppress(Exception):
                self._end_phase(name, before, quiet=True)
            raise
        self._phase = None
        self._end_phase(name, before)

    def _end_phase(self, name: str, before, quiet: bool = False) -> None:
        """The end-of-phase checks: BatchNorm statistics after an evaluation, gradients carried over
        in a training phase. ``quiet``: record the findings, never raise them (the phase failed)."""
        if before is not None:
            changed = [n for (n, bn), (count, mean) in zip(self._bns, before)
                       if not torch.equal(bn.num_batches_tracked, count)
                       or not torch.equal(bn.running_mean, mean)]
            self._found("bn_stats_changed_in_eval", changed, quiet)
        if name == TRAIN and self._carried is not None and bool(self._carried):  # one sync per phase
            self._found("missing_zero_grad", ["optimizer"], quiet)
        self._carried = None

    def _pre_forward(self, module: nn.Module, args) -> None:
        phase = self._phase
        if phase is None:
            return
        if phase == TRAIN:
            g = self._probe.grad if self._probe is not None else None
            if g is not None:  # a gradient left from the previous step; accumulated on the device
                hit = g.detach().ne(0).any()
                self._carried = hit if self._carried is None else self._carried.logical_or(hit)
        elif torch.is_grad_enabled():
            self._found("grad_enabled_in_eval", [ROOT])
        state = tuple(m.training for _, m in self.watched)
        seen = self._seen[phase]
        if state not in seen:
            seen.add(state)
            self._check_state(phase, state)

    def _check_state(self, phase: str, state: tuple[bool, ...]) -> None:
        names = self._names
        if phase == TRAIN:
            self._found("train_in_eval_mode",
                        [n for n, t, fr in zip(names, state, self._frozen) if not t and not fr])
            self._found("frozen_in_train_mode",
                        [n for n, t, fr in zip(names, state, self._frozen) if t and fr])
            return
        allowed = self._stochastic if self.allow_stochastic_eval else [False] * len(names)
        wrong = [n for n, t, ok in zip(names, state, allowed) if t and not ok]
        if wrong == [ROOT] and self.allow_stochastic_eval:
            wrong = []  # the root's own flag changes nothing when only dropout-like layers train
        self._found("eval_in_train_mode", wrong)

    def _bn_state(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(bn.num_batches_tracked.clone(), bn.running_mean.clone()) for _, bn in self._bns]

    def _found(self, kind: str, modules: list[str], quiet: bool = False) -> None:
        seen = self._epoch_findings[kind]
        new = [m for m in modules if m not in seen]
        if not new:
            return
        first_time = kind not in self.findings
        seen.update(new)
        self.findings[kind].update(new)
        msg = f"mode guard: {FINDINGS[kind]}: {', '.join(sorted(new))}"
        if self.action == "raise" and not quiet:
            raise ModeGuardError(f"{msg} [guard=raise; guard=warn only logs it]", kind, new)
        if first_time:
            log.warning(msg)

    # -- reporting -------------------------------------------------------------------------------
    def end_epoch(self, epoch: int) -> dict:
        """Close the epoch: its findings ``{kind: [modules]}``, their count, and the mode ledger
        ``{phase: {module: "train" | "eval" | "eval+train"}}``. Calling it again for the same epoch
        (e.g. after the final test evaluation) adds the new phases to that epoch's ledger."""
        entry: dict[str, dict[str, str]] = {}
        for phase, states in self._seen.items():
            entry[phase] = {
                n: "+".join(sorted({"train" if s[i] else "eval" for s in states}))
                for i, n in enumerate(self._names)
            }
        self.ledger.setdefault(epoch, {}).update(entry)
        found = {k: sorted(v) for k, v in self._epoch_findings.items() if v}
        self._seen.clear()
        self._epoch_findings.clear()
        return {"epoch": epoch, "count": sum(len(v) for v in found.values()), "findings": found,
                "ledger": entry}

    def summary(self) -> dict[str, list[str]]:
        """Every finding of the run so far: ``{kind: [modules]}`` (empty when clean)."""
        return {k: sorted(v) for k, v in self.findings.items() if v}
