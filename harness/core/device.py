"""The device a run trains on, resolved once at the entry point and passed down."""
from __future__ import annotations

import os

import torch

from harness.errors import UserError


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else MPS, else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device={name}: CUDA is not available on this machine; use train.device=auto")
    return dev


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_for(workers: int) -> int:
    """Each of K worker processes gets cores // K torch threads, so K workers do not oversubscribe."""
    return max(1, cores() // workers)
