"""The device a run trains on, resolved once at the entry point and passed down; and the CPU threads of
torch, chosen by one policy for a single run, each worker of a sweep and each worker of an ablation.

The thread policy, measured on a 2-core machine (README "Speed"): OpenMP threads that spin while they
wait make torch collapse beside any other CPU-bound process (5-10x slower epochs), so the harness sets
``OMP_WAIT_POLICY=PASSIVE`` (waiting threads sleep) and uses one thread per core, split between the
workers of one machine. It is load-independent, so the same spec gives the same numbers at any load;
the count is recorded as the param ``train.threads_used`` and a resume reuses it. What a user sets
explicitly wins: ``train.threads``, ``OMP_NUM_THREADS``, ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``.

This module imports torch only inside functions: :func:`prepare_threads` must run before torch is
imported, since OpenMP reads its wait policy once, when torch's library loads.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from harness.errors import UserError

if TYPE_CHECKING:
    import torch

WAIT_POLICY = "PASSIVE"
_share = {"workers": 1}  # worker processes this machine's cores are split between (this one included)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else MPS, else CPU."""
    import torch

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


def prepare_threads(workers: int = 1) -> None:
    """At an entry point, before torch is imported: OpenMP's waiting threads sleep instead of spinning
    (unless the user chose a wait policy or spin count), and this process is one of ``workers`` sharing
    the cores. Child processes inherit the wait policy through the environment."""
    if not _user_wait_policy():
        os.environ["OMP_WAIT_POLICY"] = WAIT_POLICY
    share_cores(workers)


def share_cores(workers: int) -> None:
    """This process is one of ``workers`` on this machine: its default is cores // workers threads."""
    _share["workers"] = max(1, int(workers))


def default_threads() -> int:
    """The policy's count when the spec names none: ``OMP_NUM_THREADS`` if the user set it, else this
    process's share of the cores."""
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return threads_for(_share["workers"])


def apply_threads(requested: int | None) -> int:
    """Set torch's intra-op threads to ``requested`` (the spec's ``train.threads``, or a resumed run's
    recorded count) or the policy's default; returns the count now in use."""
    import torch

    n = requested or default_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def wait_policy() -> str:
    """How OpenMP threads wait in this process, as recorded with a run."""
    if os.environ.get("GOMP_SPINCOUNT"):
        return f"GOMP_SPINCOUNT={os.environ['GOMP_SPINCOUNT']}"
    return os.environ.get("OMP_WAIT_POLICY", "").upper() or "OpenMP default"


def _user_wait_policy() -> bool:
    return bool(os.environ.get("OMP_WAIT_POLICY") or os.environ.get("GOMP_SPINCOUNT"))
