"""Full-state checkpoints: model, optimizer, epoch, RNG states, spec hash. Written atomically, read
with ``torch.load(weights_only=True)`` so a checkpoint from any store cannot run code."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from harness.core.rng import rng_state
from harness.errors import CheckpointError


def save_checkpoint(path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    epoch: int, spec_hash: str, best: float | None, history: dict | None = None) -> Path:
    """Write atomically (temp file + rename): a kill mid-write never leaves a torn checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "spec_hash": spec_hash,
        "best": best,
        "history": history or {},
        "rng": rng_state(),
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with ``weights_only=True``; anything that is not plain tensors and containers is refused."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except Exception as e:  # a damaged file fails in many ways: zip, pickle, EOF, OSError, UnicodeDecode...
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(f"{path}: checkpoint refused: it is not a plain weights file (it may have "
                              f"been tampered with or truncated): {type(e).__name__}: {first}") from None
    missing = [k for k in _REQUIRED if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint refused: not a harness checkpoint (missing "
                              f"{', '.join(missing)})")
    return state


_REQUIRED = ("model", "optimizer", "epoch", "spec_hash", "rng")
