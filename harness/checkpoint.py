"""Full-state checkpoints: model, optimizer, epoch, RNG states, spec hash. Written atomically, read
with ``torch.load(weights_only=True)`` so a checkpoint from any store cannot run code."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.spec import UserError


class CheckpointError(UserError):
    pass


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    return tuple(_tuples(i) for i in x) if isinstance(x, (list, tuple)) else x


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
