"""Missing ``zero_grad``, told apart from gradient accumulation, per optimizer.

The bug is a step whose gradients still hold what earlier backward passes left before the previous
step. Accumulating over k micro-batches is not that: the gradients are cleared once after a step, then
k backward passes add up. So between two steps of an optimizer, at least one backward pass must find
its parameters' gradients cleared (``None`` after ``zero_grad()``, zeros after
``zero_grad(set_to_none=False)`` or ``p.grad.zero_()``). One or two small "probe" parameters per
optimizer carry a gradient hook that looks at ``p.grad`` just before each backward adds to it. A GAN's
generator step that leaves gradients in the discriminator is fine as long as the discriminator's
gradients are cleared before its own next step, and that is what this checks.

Zeros are checked on the device and summed there: no host sync per step (one when the report is read).
"""
from __future__ import annotations

import weakref
from collections import Counter

import torch

from harness.guard.sites import Site

PROBES = 2  # the smallest parameters that got a gradient in the first step: cheap to check


class StepWatch:
    """One optimizer: how often it stepped, where, and in how many steps gradients were carried over."""

    def __init__(self, optimizer: torch.optim.Optimizer, name: str):
        self.ref = weakref.ref(optimizer)
        self.name = name
        self.cls = type(optimizer).__name__
        self.param_ids = frozenset(id(p) for g in optimizer.param_groups for p in g["params"])
        self.models: list[str] = []  # the models whose parameters it updates
        self.steps = 0
        self.sites: Counter[Site] = Counter()
        self.checked = 0  # steps with a backward pass seen since the previous step
        self._carried = 0
        self._carried_dev: torch.Tensor | None = None
        self.mark = (0, 0, 0)  # counts() at the last end_epoch()
        self._handles: list = []
        self._reset()

    def _reset(self) -> None:
        self._touched = False
        self._cleared = False
        self._cleared_dev: torch.Tensor | None = None

    def before_step(self, optimizer: torch.optim.Optimizer, site: Site) -> None:
        self.steps += 1
        self.sites[site] += 1
        if not self._handles:
            self._probe(optimizer)
        elif self._touched:
            self.checked += 1
            if self._cleared:
                pass
            elif self._cleared_dev is None:
                self._carried += 1
            else:
                carried = self._cleared_dev.logical_not().to(torch.int64)
                self._carried_dev = carried if self._carried_dev is None else self._carried_dev + carried

    def after_step(self) -> None:
        self._reset()  # a backward pass inside step(closure) belongs to this step, not the next

    def _probe(self, optimizer: torch.optim.Optimizer) -> None:
        got = [p for g in optimizer.param_groups for p in g["params"]
               if p.requires_grad and p.grad is not None]
        for p in sorted(reversed(got), key=torch.Tensor.numel)[:PROBES]:
            self._handles.append(p.register_hook(self._hook(weakref.ref(p))))

    def _hook(self, ref: weakref.ref):
        @torch.utils.hooks.unserializable_hook  # torch.save(model) need not warn about it
        def before_accumulation(grad: torch.Tensor) -> None:
            self._touched = True
            p = ref()
            if self._cleared or p is None:
                return
            g = p.grad
            if g is None or g.is_sparse:  # sparse: not checked, never flagged
                self._cleared = True
            else:
                zero = g.detach().eq(0).all()
                self._cleared_dev = zero if self._cleared_dev is None else self._cleared_dev.logical_or(zero)
        return before_accumulation

    def carried(self) -> int:
        """Steps whose gradients were carried over from before the previous step (syncs the device)."""
        return self._carried + (int(self._carried_dev) if self._carried_dev is not None else 0)

    def counts(self) -> tuple[int, int, int]:
        """``(steps, checked, carried)`` so far."""
        return self.steps, self.checked, self.carried()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def forget(self, ref=None) -> None:
        """The optimizer is gone: its probes' hooks go too (the counts stay)."""
        self.remove()
        self._reset()
