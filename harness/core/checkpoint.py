"""Full-state checkpoints: model, optimizer, every module's train/eval mode, epoch, RNG states, and the
spec that made them. Written atomically, read with ``torch.load(weights_only=True)`` onto the CPU first
(a checkpoint from a GPU machine resumes anywhere), and checked against the model they are loaded into,
so a checkpoint from any store can neither run code nor half-load."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from harness import failpoints
from harness.core.rng import rng_state, set_rng_state
from harness.errors import CheckpointError

_REQUIRED = ("model", "optimizer", "epoch", "spec_hash", "rng")


def save_checkpoint(path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    epoch: int, spec_hash: str, best: float | None, history: dict | None = None,
                    spec: dict | None = None, grads: bool = False, scaler=None) -> Path:
    """Write atomically (temp file + rename): a kill mid-write never leaves a torn checkpoint.
    ``spec``: the flattened spec, so a resume can name the fields it was given differently.
    ``grads``: keep the parameters' gradients too (a loop that never clears them carries them on).
    ``scaler``: fp16's GradScaler, whose scale decides which of the next steps are skipped."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        # model.train()/eval() is state too: a loop that calls model.train() only once trains its next
        # epoch in whatever mode the last evaluation left behind
        "modes": {name: m.training for name, m in model.named_modules()},
        "epoch": epoch,
        "spec_hash": spec_hash,
        "spec": spec or {},
        "best": best,
        "history": history or {},
        "rng": rng_state(),
    }
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    if grads:
        state["grads"] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        torch.save(state, tmp)
        failpoints.reach("mid_checkpoint_write")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or an interrupt leaves no half-written file behind
        raise
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load onto the CPU with ``weights_only=True``; anything that is not plain tensors and containers,
    or not a harness checkpoint, is refused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except Exception as e:  # a damaged file fails in many ways: zip, pickle, EOF, OSError, UnicodeDecode...
        first = (str(e).strip().splitlines() or [""])[0][:160]
        # A file cut short (a kill mid-copy) has no zip directory at its end: torn, not tampered with.
        torn = isinstance(e, EOFError) or "central directory" in first or "failed reading zip" in first
        err = CheckpointError(f"{path}: checkpoint refused: it is not a plain weights file (it may have "
                              f"been tampered with or truncated): {type(e).__name__}: {first}")
        err.torn = torn
        raise err from None
    missing = [k for k in _REQUIRED if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint refused: not a harness checkpoint (missing "
                              f"{', '.join(missing)})")
    if not isinstance(state["epoch"], int) or state["epoch"] < 0 or not isinstance(state["model"], dict):
        raise CheckpointError(f"{path}: checkpoint refused: its epoch or model entry is not what a harness "
                              f"checkpoint holds")
    return state


def restore(state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            where: str = "the checkpoint", scaler=None) -> None:
    """Put a loaded checkpoint into ``model`` and ``optimizer`` (on whatever device they live) and
    restore the RNGs and module modes; a checkpoint that does not fit is one CheckpointError line."""
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, KeyError) as e:
        raise CheckpointError(f"{where} does not fit this model: {_first(e)}") from None
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{where}: its optimizer state does not fit: {_first(e)}") from None
    try:
        set_rng_state(state["rng"])
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{where}: its RNG state is damaged: {_first(e)}") from None
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    grads = state.get("grads") or {}
    for name, p in model.named_parameters():
        if name in grads:
            p.grad = grads[name].to(p.device)
    modes = state.get("modes") or {}
    for name, m in model.named_modules():
        if name in modes:
            m.training = bool(modes[name])


def _first(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
