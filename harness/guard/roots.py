"""The models the watcher has seen: their mode-dependent modules, which of those are frozen, and how
many forwards of each kind they made (by modes, frozen state, call site and inferred phase)."""
from __future__ import annotations

import weakref

from torch import nn

from harness.guard.detector import ROOT
from harness.guard.layers import is_batchnorm, is_mode_sensitive, is_stochastic

TRAIN, EVAL, EVAL_GRAD = "train", "eval", "eval_grad"


class Root:
    """One model the script calls (a module called outside any other module's forward)."""

    def __init__(self, module: nn.Module, name: str):
        self.name, self.cls = name, type(module).__name__
        self.ref = weakref.ref(module)
        named = [(n, m) for n, m in module.named_modules() if is_mode_sensitive(m)]
        # "model.features.1"; the harness's own names ("features.1", "(model)") when called ROOT
        self.names = [n or name if name == ROOT else f"{name}.{n}" if n else name for n, _ in named]
        self.mods = [m for _, m in named]
        self.classes = {**dict(zip(self.names, (type(m).__name__ for m in self.mods))), name: self.cls}
        self.stochastic = tuple(is_stochastic(m) for m in self.mods)
        self.bn = tuple(is_batchnorm(m) and m.track_running_stats for m in self.mods)
        # Frozen is judged per "governing block": the nearest enclosing module that has parameters
        # (a BatchNorm itself; the frozen backbone around a Dropout).
        self.gov = [_governing(module, n) for n, _ in named]
        self.reps = [next(module.get_submodule(g).parameters()) for g in dict.fromkeys(self.gov)]
        self.param_ids = frozenset(id(p) for p in module.parameters())
        self.optimizers: list[str] = []
        self.checked: set[int] = set()
        self.obs: dict[tuple, int] = {}   # ((flags, frozen signature, site), phase) -> forwards
        self.late: dict[tuple, int] = {}  # the evaluation part of obs since the last optimizer step
        self.mark: tuple = ({}, None, {})  # obs and late at the last end_epoch()
        self.frozen: dict[tuple, tuple[bool, ...]] = {}

    def key(self, site) -> tuple:
        return tuple([m.training for m in self.mods]), tuple([p.requires_grad for p in self.reps]), site

    def count(self, key: tuple, phase: str) -> None:
        k = (key, phase)
        self.obs[k] = self.obs.get(k, 0) + 1
        if phase != TRAIN:
            self.late[k] = self.late.get(k, 0) + 1
        elif key[:2] not in self.frozen:
            self.frozen[key[:2]] = self._frozen_now()

    def stepped(self) -> None:
        """An optimizer stepped: what came before it was not after training."""
        if self.late:
            self.late = {}

    def set_mark(self) -> None:
        self.mark = (dict(self.obs), self.late, dict(self.late))

    def counts(self, since: bool = False, late: bool = False):
        """``((key, phase), forwards)`` pairs: all of them (``late``: since the last optimizer step),
        after the last mark when ``since``."""
        source = self.late if late else self.obs
        mark = {}
        if since:
            mark = self.mark[2] if late and self.mark[1] is self.late else {} if late else self.mark[0]
        for k, n in source.items():
            n -= mark.get(k, 0)
            if n > 0:
                yield k, n

    def _frozen_now(self) -> tuple[bool, ...]:
        module = self.ref()
        if module is None:
            return (False,) * len(self.mods)
        blocks = {g: not any(p.requires_grad for p in module.get_submodule(g).parameters())
                  for g in set(self.gov)}
        return tuple(blocks[g] for g in self.gov)

    def release(self) -> None:
        """The model is gone: drop the references to its modules and parameters, keep the counts."""
        self.mods, self.reps = [], []


def _governing(root: nn.Module, name: str) -> str:
    parts = name.split(".") if name else []
    for k in range(len(parts), 0, -1):
        block = ".".join(parts[:k])
        if next(root.get_submodule(block).parameters(), None) is not None:
            return block
    return ""
