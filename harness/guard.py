"""The mode guard: watches module modes per phase and finds mode bugs at run time, in anyone's loop.

    guard = ModeGuard(model)
    with guard.phase("train"): ...train one epoch...
    with guard.phase("val"): ...evaluate...
    report = guard.end_epoch(epoch)      # findings of this epoch + the mode ledger

One forward pre-hook on the root module reads the ``training`` flags of the mode-sensitive modules
(Dropout, BatchNorm, custom layers marked ``mode_dependent``) and of the root; a tuple of booleans is
compared with the states already seen in this phase, so a clean step costs a few attribute reads.
"""
from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from typing import Iterator, Sequence

import torch
from torch import nn

from harness.modes import is_batchnorm, is_mode_sensitive, is_stochastic

log = logging.getLogger("harness.guard")

FINDINGS = {
    "eval_in_train_mode": "evaluation forward with modules in training mode (call model.eval() first)",
    "grad_enabled_in_eval": "evaluation forward with autograd on (wrap it in torch.no_grad())",
    "bn_stats_changed_in_eval": "BatchNorm running statistics changed during evaluation",
    "train_in_eval_mode": "training step with modules in eval mode that were not declared frozen "
                          "(call model.train() at the start of every epoch)",
    "frozen_in_train_mode": "training step with declared-frozen modules in training mode "
                            "(put them back in eval() after model.train())",
    "missing_zero_grad": "gradients carried over between training steps (call optimizer.zero_grad())",
}
ROOT = "(model)"


class ModeGuardError(RuntimeError):
    pass


class ModeGuard:
    def __init__(self, model: nn.Module, *, frozen: Sequence[str] = (),
                 allow_stochastic_eval: bool = False, action: str = "warn"):
        if action not in ("warn", "raise"):
            raise ValueError(f"action must be warn or raise, got {action!r}")
        self.action = action
        self.allow_stochastic_eval = allow_stochastic_eval
        self.watched: list[tuple[str, nn.Module]] = [(ROOT, model)] + [
            (name, m) for name, m in model.named_modules() if name and is_mode_sensitive(m)
        ]
        self._frozen = [self._is_frozen(name, frozen) for name, _ in self.watched]
        self._stochastic = [is_stochastic(m) for _, m in self.watched]
        self._bns = [m for _, m in self.watched if is_batchnorm(m) and m.track_running_stats]
        trainable = [p for p in model.parameters() if p.requires_grad]
        self._probe = trainable[-1] if trainable else None  # last bias: carried gradients show up here
        self._phase: str | None = None
        self._seen: dict[str, set[tuple[bool, ...]]] = defaultdict(set)
        self._carried: torch.Tensor | None = None
        self._epoch_findings: dict[str, set[str]] = defaultdict(set)
        self.findings: dict[str, set[str]] = defaultdict(set)  # over the whole run
        self.ledger: dict[int, dict[str, dict[str, str]]] = {}
        self._hook = model.register_forward_pre_hook(self._pre_forward)

    @staticmethod
    def _is_frozen(name: str, frozen: Sequence[str]) -> bool:
        return any(name == f or name.startswith(f + ".") for f in frozen)

    def close(self) -> None:
        self._hook.remove()

    # -- phases ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """``train`` for training steps; any other name (``val``, ``test``) is an evaluation phase."""
        self._phase = name
        before = self._bn_state() if name != "train" else None
        try:
            yield
        finally:
            self._phase = None
        if before is not None and self._bn_changed(before):
            names = [n for (n, m) in self.watched if m in self._changed_bns]
            self._found("bn_stats_changed_in_eval", names)
        if name == "train" and self._carried is not None and bool(self._carried):
            self._found("missing_zero_grad", ["optimizer"])
        self._carried = None

    def _pre_forward(self, module: nn.Module, args) -> None:
        phase = self._phase
        if phase is None:
            return
        if phase == "train":
            g = self._probe.grad if self._probe is not None else None
            if g is not None:  # accumulate on the device: no sync per step
                hit = g.detach().ne(0).any()
                self._carried = hit if self._carried is None else self._carried | hit
        elif torch.is_grad_enabled():
            self._found("grad_enabled_in_eval", [ROOT])
        state = tuple(m.training for _, m in self.watched)
        seen = self._seen[phase]
        if state in seen:
            return
        seen.add(state)
        self._check_state(phase, state)

    def _check_state(self, phase: str, state: tuple[bool, ...]) -> None:
        names = [n for n, _ in self.watched]
        if phase == "train":
            wrong = [n for n, t, fr in zip(names, state, self._frozen) if not t and not fr]
            self._found("train_in_eval_mode", wrong)
            self._found("frozen_in_train_mode",
                        [n for n, t, fr in zip(names, state, self._frozen) if t and fr])
        else:
            allowed = self._stochastic if self.allow_stochastic_eval else [False] * len(names)
            wrong = [n for n, t, ok in zip(names, state, allowed) if t and not ok]
            # the root's own flag changes nothing when every sensitive module is allowed
            if wrong == [ROOT] and self.allow_stochastic_eval:
                wrong = []
            self._found("eval_in_train_mode", wrong)

    def _bn_state(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(bn.num_batches_tracked.clone(), bn.running_mean.clone()) for bn in self._bns]

    def _bn_changed(self, before) -> bool:
        self._changed_bns = [bn for bn, (n, mean) in zip(self._bns, before)
                             if not torch.equal(bn.num_batches_tracked, n)
                             or not torch.equal(bn.running_mean, mean)]
        return bool(self._changed_bns)

    def _found(self, kind: str, modules: list[str]) -> None:
        new = [m for m in modules if m not in self._epoch_findings[kind]]
        if not new:
            return
        first_time = kind not in self.findings
        self._epoch_findings[kind].update(new)
        self.findings[kind].update(new)
        msg = f"mode guard: {FINDINGS[kind]}: {', '.join(sorted(new))}"
        if self.action == "raise":
            raise ModeGuardError(msg)
        if first_time:
            log.warning(msg)

    # -- reporting -------------------------------------------------------------------------------
    def end_epoch(self, epoch: int) -> dict:
        """Close the epoch: its findings ``{kind: [modules]}``, their count, and the mode ledger."""
        names = [n for n, _ in self.watched]
        entry: dict[str, dict[str, str]] = {}
        for phase, states in self._seen.items():
            entry[phase] = {
                n: "+".join(sorted({"train" if s[i] else "eval" for s in states}))
                for i, n in enumerate(names)
            }
        self.ledger[epoch] = entry
        found = {k: sorted(v) for k, v in self._epoch_findings.items() if v}
        self._seen.clear()
        self._epoch_findings.clear()
        return {"epoch": epoch, "count": sum(len(v) for v in found.values()), "findings": found,
                "ledger": entry}

    def summary(self) -> dict[str, list[str]]:
        return {k: sorted(v) for k, v in self.findings.items() if v}
