"""The train/validate loop: plain functions over (model, batches, optimizer, device), metric dicts out.

The policy (harness.core.modes) decides the mode calls, so the correct loop reads like the textbook and a
bug is a policy passed in. Nothing here knows about MLflow: running losses go to a callback.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from typing import Callable, Iterable

import torch
from torch import nn

from harness.cli import check_interrupt
from harness.core.modes import Correct
from harness.guard import ModeGuard

CORRECT = Correct()


class Precision:
    """Mixed precision (``train.amp``): the forward pass and loss under ``torch.autocast`` in bf16 or fp16;
    fp16 also scales the loss (``GradScaler``) so small gradients survive, and skips steps whose
    gradients overflowed. ``off``: plain float32, no context entered."""

    DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

    def __init__(self, mode: str = "off", device: torch.device | str = "cpu"):
        if mode not in ("off", *self.DTYPES):
            raise ValueError(f"amp must be off, bf16 or fp16, got {mode!r}")
        self.mode, self.device_type = mode, torch.device(device).type
        self.scaler = torch.amp.GradScaler(self.device_type) if mode == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.mode == "off":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.DTYPES[self.mode])

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            loss.backward()
            optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)  # skipped when a gradient is inf/NaN; the scale then backs off
            self.scaler.update()


FP32 = Precision()


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


class Stopped(Exception):
    """Raised by an epoch callback to end a run early on purpose (e.g. a pruned trial). The run keeps
    its partial curves and ends FINISHED with tag ``stopped_early``."""


def _guarded(guard: ModeGuard | None, phase: str):
    return guard.phase(phase) if guard is not None else contextlib.nullcontext()


def train_one_epoch(
    model: nn.Module,
    batches: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    epoch: int = 1,
    policy: Correct = CORRECT,
    guard: ModeGuard | None = None,
    log_every: int = 10,
    on_running_loss: Callable[[int, float], None] | None = None,
    step_offset: int = 0,
    precision: Precision | None = None,
) -> dict[str, float]:
    """One epoch of training. ``on_running_loss(global_batch_index, mean_loss)`` every ``log_every``
    batches. Returns ``train/loss`` (mean over examples) and ``train/acc`` (and on CUDA the epoch's
    ``train/peak_mem_mb``). ``precision`` None: the one the run attached to the policy, else float32."""
    loss_fn = nn.CrossEntropyLoss()
    precision = precision or getattr(policy, "precision", FP32)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    policy.start_epoch(model, epoch)  # the textbook: model.train()
    total_loss = torch.zeros((), device=device)
    window_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    with _guarded(guard, "train"):
        for i, (x, y) in enumerate(batches, start=1):
            check_interrupt()  # a Ctrl-C or SIGTERM Python swallowed in a finalizer stops here
            policy.zero_grad(optimizer)  # the textbook: optimizer.zero_grad()
            with precision.autocast():
                out = model(x)
                loss = loss_fn(out, y)
            precision.backward_and_step(loss, optimizer)  # the textbook: loss.backward(); optimizer.step()
            n = y.shape[0]
            total_loss += loss.detach() * n
            window_loss += loss.detach()
            correct += (out.detach().argmax(1) == y).sum()
            seen += n
            if i % log_every == 0:
                running = float(window_loss) / log_every  # one sync per window, not per batch
                if not math.isfinite(running):
                    raise Diverged(f"training loss is {running} at epoch {epoch}, batch {i}")
                if on_running_loss is not None:
                    on_running_loss(step_offset + i, running)
                window_loss.zero_()
    mean_loss = float(total_loss) / max(seen, 1)
    if not math.isfinite(mean_loss):
        raise Diverged(f"training loss is {mean_loss} at epoch {epoch}")
    result = {"train/loss": mean_loss, "train/acc": float(correct) / max(seen, 1)}
    if device.type == "cuda":
        result["train/peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def evaluate(
    model: nn.Module,
    batches: Iterable,
    device: torch.device,
    *,
    policy: Correct = CORRECT,
    guard: ModeGuard | None = None,
    prefix: str = "val",
    keep_predictions: bool = False,
    precision: Precision | None = None,
) -> dict:
    """Loss and argmax accuracy over ``batches``. Runs in its own RNG stream (``fork_rng``), so dropout
    at evaluation never shifts the random numbers training sees next: arms stay paired.

    With ``keep_predictions`` the result also holds ``predictions`` and ``targets`` (CPU tensors) for
    per-example tests."""
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    precision = precision or getattr(policy, "precision", FP32)
    devices = [device] if device.type == "cuda" else []
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    preds, targets = [], []
    if devices:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=devices), _guarded(guard, prefix):
        policy.start_eval(model)  # the textbook: model.eval()
        with policy.eval_context(), _AutogradMemory() as graph:  # the textbook: torch.no_grad()
            for x, y in batches:
                with precision.autocast():
                    out = policy.predict(model, x)
                total_loss += loss_fn(out.float(), y).detach()
                p = out.detach().argmax(1)
                correct += (p == y).sum()
                seen += y.shape[0]
                if keep_predictions:
                    preds.append(p.cpu())
                    targets.append(y.cpu())
                graph.next_batch()
    result: dict = {
        f"{prefix}/loss": float(total_loss) / max(seen, 1),
        f"{prefix}/acc": float(correct) / max(seen, 1),
        f"{prefix}/seconds": time.perf_counter() - start,
        # what a missing torch.no_grad() costs: the largest batch's autograd graph (0 when off)
        f"{prefix}/autograd_mb": graph.peak_bytes / 2**20,
    }
    if devices:
        result[f"{prefix}/peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    if keep_predictions:
        result["predictions"] = torch.cat(preds)
        result["targets"] = torch.cat(targets)
    return result


class _AutogradMemory:
    """Bytes autograd saves for backward, per batch (distinct storages, via saved_tensors_hooks).
    Installs nothing when autograd is off, so a correct evaluation pays nothing for it."""

    def __init__(self) -> None:
        self.peak_bytes = 0
        self._storages: dict[int, int] = {}
        self._hooks: contextlib.AbstractContextManager | None = None

    def __enter__(self) -> "_AutogradMemory":
        if torch.is_grad_enabled():
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
            self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(*exc)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        self._storages[s.data_ptr()] = s.nbytes()
        return t

    def next_batch(self) -> None:
        if self._storages:
            self.peak_bytes = max(self.peak_bytes, sum(self._storages.values()))
            self._storages.clear()


def sanity_check(model: nn.Module, batch, optimizer: torch.optim.Optimizer) -> list[str]:
    """One optimizer step on one batch, on copies: the loss must fall and every trainable parameter
    must get a gradient. Returns the problems found (empty when healthy); the model is untouched."""
    x, y = batch
    probe = copy.deepcopy(model)
    opt = type(optimizer)([p for p in probe.parameters() if p.requires_grad], **optimizer.defaults)
    loss_fn = nn.CrossEntropyLoss()

    def eval_loss() -> float:
        probe.eval()  # deterministic: no dropout noise in the comparison
        with torch.no_grad():
            return float(loss_fn(probe(x), y))

    problems: list[str] = []
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        before = eval_loss()
        probe.train()
        opt.zero_grad()
        loss_fn(probe(x), y).backward()
        missing = [n for n, p in probe.named_parameters() if p.requires_grad and p.grad is None]
        if missing:
            problems.append(f"no gradient reaches {', '.join(missing)}")
        opt.step()
        after = eval_loss()
    if not math.isfinite(before):
        problems.append(f"the initial loss is {before}")
    elif not after < before:
        problems.append(f"one step did not lower the loss on its own batch ({before:.4f} -> "
                        f"{after:.4f}): check the learning rate")
    return problems
