"""The mode guard for anyone's loop, with no phase markers: the phase of each forward is inferred.

    guard = watch(model)        # one model; Watcher() watches every model the process calls
    ...the script's own loop, unchanged...
    print(guard.format())       # or guard.summary() -> {kind: [modules]}; guard.close()

PyTorch's global hooks report every root forward (a module call not nested in another module's),
every ``optimizer.step()`` and, through a gradient hook on a forward's output, every backward pass that
reaches it. A forward under ``no_grad``/``inference_mode`` is evaluation; one with autograd on is
training once a backward pass reaches its output, and evaluation with autograd on when its output is
freed before any did (or is still unused at the end). Each forward is counted by its modules' modes and
its call site; ``verdict.py`` turns the counts into findings, ``grads.py`` watches ``zero_grad``.
"""
from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Mapping

import torch
import torch.optim.optimizer as optim_hooks
from torch import nn
from torch.compiler import is_compiling
from torch.nn.modules import module as module_hooks
from torch.utils._pytree import tree_leaves

from harness.guard import verdict
from harness.guard.detector import FINDINGS
from harness.guard.grads import StepWatch
from harness.guard.roots import EVAL, EVAL_GRAD, TRAIN, Root
from harness.guard.sites import caller, name_in, site_of

log = logging.getLogger("harness.guard")

ALLOWABLE = (verdict.MC_DROPOUT, *FINDINGS)


class _Pending:
    """A forward with autograd on whose phase is not known yet: a backward pass reaching any of its
    outputs makes it training. It lives as long as its outputs' gradient hooks, which live in the
    outputs and in the autograd graph behind them; when all of those are gone with no backward pass
    (``out = model(x)`` rebound in an evaluation loop), it was evaluation with autograd on."""

    __slots__ = ("watcher", "root", "key", "__weakref__")

    def __init__(self, watcher: "Watcher", root: Root, key: tuple):
        self.watcher, self.root, self.key = watcher, root, key

    def backward(self, grad) -> None:
        if self.root is not None:
            self.watcher._resolve(self, TRAIN)

    def __del__(self) -> None:
        if self.root is not None:
            self.watcher._resolve(self, EVAL_GRAD)


class Watcher:
    """Infers each forward's phase and counts what it sees; see the module docstring.

    ``model``: watch only that model (and its submodules called on their own) and the optimizers that
    update it; ``None``: every model and optimizer in the process. ``allow``: finding kinds to accept,
    and ``mc_dropout`` (dropout-like layers in training mode at evaluation, on purpose). ``name``: what
    to call ``model`` in the findings (else its variable name in the script); ``ROOT`` names its modules
    as ``ModeGuard`` does (``features.1``, ``(model)``)."""

    def __init__(self, model: nn.Module | None = None, *, allow=(), name: str | None = None):
        self.check_allow(allow)
        self.allow = frozenset(allow)
        self._scope = None if model is None else weakref.ref(model)  # read at first sights: layers
        # built later (Lightning's configure_model) belong to it too
        self._model_name = (id(model), name) if model is not None and name is not None else None
        self.models: list[Root] = []
        self.optimizers: list[StepWatch] = []
        self._roots: dict[int, tuple[weakref.ref, Root | None]] = {}
        self._opts: dict[int, tuple[weakref.ref, StepWatch | None]] = {}
        self._names: set[str] = set()
        self._pending: weakref.WeakSet[_Pending] = weakref.WeakSet()
        self._active = 0  # id() of the root module whose forward is running; an int, which the
        # tracer of torch.compile reads without fuss (it also runs these hooks, and must find no-ops)
        self._current: tuple | None = None
        self.error: str | None = None
        self._handles = [
            module_hooks.register_module_forward_pre_hook(self._pre),
            module_hooks.register_module_forward_hook(self._post, always_call=True),
            optim_hooks.register_optimizer_step_pre_hook(self._step),
            optim_hooks.register_optimizer_step_post_hook(self._stepped),
        ]

    @staticmethod
    def check_allow(allow) -> None:
        unknown = sorted(set(allow) - set(ALLOWABLE))
        if unknown:
            raise ValueError(f"cannot allow {', '.join(unknown)}; choose from {', '.join(ALLOWABLE)}")

    # -- the hooks: cheap on every module call, and never allowed to break the script -------------
    def _pre(self, module: nn.Module, args) -> None:
        if self._active or is_compiling():  # nested in a model's forward, or traced by torch.compile
            return
        self._active, self._current = id(module), None
        try:
            frame = caller()
            if frame is None:  # a forward torch runs on purpose (sites.DELIBERATE_*)
                return
            entry = self._roots.get(id(module))
            if entry is None or entry[0]() is not module:
                entry = self._first_sight(module, frame)
            root = entry[1]
            if root is None:
                return
            key = root.key((frame.f_code.co_filename, frame.f_lineno))
            if torch.is_grad_enabled():
                self._current = (root, key)
            else:  # no_grad or inference_mode: evaluation
                root.count(key, EVAL)
        except Exception as e:  # noqa: BLE001 - the guard must never break the script it watches
            self._fail(e)

    def _post(self, module: nn.Module, args, output) -> None:
        if id(module) != self._active or is_compiling():
            return
        self._active, current, self._current = 0, self._current, None
        if current is None:
            return
        try:
            root, key = current
            if type(output) is torch.Tensor:
                tensors, seen = ([output] if output.requires_grad else []), True
            else:
                if isinstance(output, Mapping):  # also dict subclasses pytree does not know (ModelOutput)
                    output = list(output.values())
                elif dataclasses.is_dataclass(output):
                    output = vars(output)
                leaves = tree_leaves(output)
                tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
                seen, tensors = bool(tensors), [t for t in tensors if t.requires_grad]
            if not tensors:
                if seen:  # autograd on but nothing to backpropagate: evaluation all the same
                    root.count(key, EVAL)
                return
            pending = _Pending(self, root, key)
            for t in tensors:
                t.register_hook(pending.backward)
            self._pending.add(pending)
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def _resolve(self, pending: _Pending, phase: str) -> None:
        try:
            pending.root.count(pending.key, phase)
        except Exception as e:  # noqa: BLE001
            self._fail(e)
        pending.root = None
        self._pending.discard(pending)

    def _step(self, optimizer, args, kwargs) -> None:
        if is_compiling():
            return
        self._active = 0  # a forward interrupted by Ctrl-C never ran its post hook
        try:
            entry = self._opts.get(id(optimizer))
            if entry is None or entry[0]() is not optimizer:
                entry = self._first_step(optimizer)
            sw = entry[1]
            if sw is None:
                return
            sw.before_step(optimizer, site_of(caller()))
            for root in self.models:
                root.stepped()
                if id(sw) not in root.checked:
                    root.checked.add(id(sw))
                    if not root.param_ids.isdisjoint(sw.param_ids):
                        root.optimizers.append(sw.name)
                        sw.models.append(root.name)
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def _stepped(self, optimizer, args, kwargs) -> None:
        entry = self._opts.get(id(optimizer))
        if entry is not None and entry[1] is not None:
            entry[1].after_step()

    # -- first sight of a model or an optimizer ----------------------------------------------------
    def _first_sight(self, module: nn.Module, frame) -> tuple:
        root = None
        scope = self._scope() if self._scope is not None else None
        in_scope = self._scope is None or scope is not None and any(m is module for m in scope.modules())
        if in_scope and next(module.parameters(), None) is not None:  # a loss or transform: not a model
            named = self._model_name is not None and self._model_name[0] == id(module)
            name = self._model_name[1] if named else name_in(frame, module, type(module).__name__)
            root = Root(module, self._unique(name))
            self.models.append(root)
        key = id(module)

        def gone(ref, key=key, root=root):
            if self._roots.get(key, (None,))[0] is ref:
                del self._roots[key]
            if root is not None:
                root.release()
        entry = (weakref.ref(module, gone), root)
        self._roots[key] = entry
        return entry

    def _first_step(self, optimizer) -> tuple:
        sw = StepWatch(optimizer, "")
        scope = self._scope() if self._scope is not None else None
        outside = scope is None or sw.param_ids.isdisjoint(id(p) for p in scope.parameters())
        if self._scope is not None and outside:
            sw = None
        else:
            # An optimizer built anew for the same parameters (in every epoch, even every step) goes
            # on counting as the one before it, instead of piling up gradient hooks and names.
            again = [s for s in self.optimizers if s.ref() is None and s.param_ids == sw.param_ids]
            if again:
                again[-1].ref = sw.ref
                sw = again[-1]
            else:
                sw.name = self._unique(name_in(caller(), optimizer, type(optimizer).__name__))
                self.optimizers.append(sw)
        entry = (weakref.ref(optimizer, sw.forget if sw is not None else None), sw)
        self._opts[id(optimizer)] = entry
        return entry

    def _unique(self, name: str) -> str:
        base, k = name, 1
        while name in self._names:
            k += 1
            name = f"{base}#{k}"
        self._names.add(name)
        return name

    def _fail(self, e: Exception) -> None:
        """An error in the guard itself: stop watching, say so, and let the script go on."""
        if self.error is None:
            self.error = f"{type(e).__name__}: {e}"
            log.warning("mode guard: stopped watching after an internal error (%s)", self.error)
        self._remove_hooks()

    # -- results -----------------------------------------------------------------------------------
    def findings(self) -> list[verdict.Finding]:
        """Every finding so far (syncs the device once for the zero_grad counts)."""
        return verdict.judge(self.models, self.optimizers, self.allow)

    def summary(self) -> dict[str, list[str]]:
        """``{kind: [modules]}`` over the whole run, as ``ModeGuard.summary()`` (empty when clean)."""
        return verdict.summarize(self.findings())

    def end_epoch(self) -> dict:
        """The findings since the previous call: ``{"count": ..., "findings": {kind: [modules]}}``,
        ``count`` being the number of modules flagged (as the harness's ``mode_guard/findings``)."""
        found = verdict.summarize(verdict.judge(self.models, self.optimizers, self.allow, since=True))
        for r in self.models:
            r.set_mark()
        for s in self.optimizers:
            s.mark = s.counts()
        return {"count": sum(len(v) for v in found.values()), "findings": found}

    def report(self) -> dict:
        """What it watched and what it found, JSON-ready."""
        return verdict.report(self.models, self.optimizers, self.findings(), self.allow, self.error)

    def format(self, script: str | None = None) -> str:
        """The report as text, for a terminal."""
        return verdict.format_report(self.report(), script)

    def close(self) -> None:
        """Stop watching. Forwards still waiting for a backward pass count as evaluation with autograd on."""
        self._remove_hooks()
        for p in list(self._pending):
            self._resolve(p, EVAL_GRAD)

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for s in self.optimizers:
            s.remove()

    def __enter__(self) -> "Watcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def watch(model: nn.Module | None = None, *, allow=(), name: str | None = None) -> Watcher:
    """Start watching ``model`` (every model when ``None``) in a plain loop; see :class:`Watcher`."""
    return Watcher(model, allow=allow, name=name)
