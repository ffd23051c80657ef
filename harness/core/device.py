"""The device a run trains on, resolved once at the entry point and passed down; and the CPU threads of
torch, chosen by one policy for a single run, each worker of a sweep and each worker of an ablation.

The thread policy, measured on a 2-core machine (README "Speed", ``benchmarks/shared.py``): torch's
threads collapse beside another CPU-bound process (OpenMP threads spin while they wait for a core the
other process holds: 3-6x slower epochs), while on an idle machine spinning is what makes small ops fast
(sleeping threads cost 5-25% there), so

- when, as the process starts, other processes keep running on the cores its threads need, OpenMP's
  waiting threads sleep (``OMP_WAIT_POLICY=PASSIVE``); on an idle machine OpenMP's default (spin, then
  sleep) is kept. Set before torch loads; it changes no number (only how idle threads wait), so it may
  follow the load. The probe reads the number of runnable tasks (``/proc/loadavg``) a few times over
  ~20 ms; where it cannot, the threads sleep;
- a process's share of the cores is cores // workers (the workers of one sweep or ablation split them).

By default the count follows the load too: the share is cut to the cores the rest of the machine
leaves free, measured once per process over its own start-up (from ``prepare_threads`` to its first
run: CPU time other processes used on this process's cores, from ``/proc/stat``; beside one busy
process on 2 cores, 1 thread; on an idle machine, the whole share). Two threads that share one free
core wait for each other: beside one busy process they took 1.6-1.8x their quiet time, one thread
1.0-1.5x. Thread counts change float summation order, so the numbers of a spec and seed then depend on
the load at start: ``train.deterministic=true`` keeps the share whatever the load (the same numbers
whenever it runs), as does any count the user sets. The count is recorded with the run (params
``train.threads_used``, ``train.cores_busy_at_start``, ``train.omp_wait_policy``,
``train.others_running_at_start``), a resume reuses it and an ablation chooses it once for all its runs.
What a user sets explicitly wins: a number in ``train.threads``, ``OMP_NUM_THREADS``, ``OMP_WAIT_POLICY``
or ``GOMP_SPINCOUNT``.

This module imports torch only inside functions: :func:`prepare_threads` must run before torch is
imported, since OpenMP reads its wait policy once, when torch's library loads.
"""
from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from harness.errors import UserError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("harness.threads")

WAIT_POLICY = "PASSIVE"
RUNNABLE_READS, RUNNABLE_GAP_S = 10, 0.002  # the start-up probe of the wait policy: ~20 ms
_share = {"workers": 1}  # worker processes this machine's cores are split between (this one included)
_probe: dict = {}  # "start": CPU counters at prepare_threads; "busy": what the probe measured, once
WORKER_GIB = 0.65  # a sweep worker on digits: its proportional share of memory (PSS), measured here
PROBE_MIN_S = 0.2  # a shorter window than this is extended by a sleep: too few clock ticks to tell


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


def check_workers(workers: int, available: float | None = None) -> None:
    """Before ``workers`` worker processes start: refuse a count the machine's memory cannot hold (each
    imports torch and MLflow: at least :data:`WORKER_GIB`; ``available`` GiB, by default what
    ``/proc/meminfo`` says); more workers than cores is kept, with a warning."""
    free = available_gib() if available is None else available
    if workers > 1 and free is not None and workers * WORKER_GIB > free:
        fits = max(1, int(free // WORKER_GIB))
        raise UserError(f"--workers {workers}: each worker process holds at least ~{WORKER_GIB} GiB (torch, "
                        f"MLflow, the data; more for a bigger model), {workers} need ~{workers * WORKER_GIB:.0f} "
                        f"GiB and this machine has {free:.1f} GiB available: at most --workers {fits} fits "
                        f"(--workers {cores()} already keeps its {cores()} core(s) busy)")
    if workers > cores():
        log.warning("--workers %d is more than the %d core(s) of this machine: the workers take turns on them, "
                    "one torch thread each, and each holds its own memory", workers, cores())


def available_gib(path: str = "/proc/meminfo") -> float | None:
    """Memory the machine can still give to new processes (``MemAvailable``), in GiB; None if unknown."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return None


def prepare_threads(workers: int = 1) -> None:
    """At an entry point, before torch is imported: this process is one of ``workers`` sharing the
    cores, and, unless the user chose a wait policy or spin count, OpenMP's waiting threads sleep when
    other processes already run on the cores this one's threads need (:func:`sleep_while_waiting`).
    Child processes inherit the wait policy through the environment."""
    share_cores(workers)
    if not _user_wait_policy() and "others" not in _probe:
        _probe["others"] = others_running()
        # A spec may ask for more threads than the default (known later): decide for 2 or more.
        if sleep_while_waiting(_probe["others"], max(2, default_threads())):
            os.environ["OMP_WAIT_POLICY"] = WAIT_POLICY
    _probe.setdefault("start", _cpu_counters())


def sleep_while_waiting(others: float | None, threads: int, n_cores: int | None = None) -> bool:
    """Whether ``threads`` OpenMP threads should sleep, not spin, while they wait: yes when the
    ``others`` tasks running elsewhere (None: unknown) leave fewer free cores than threads."""
    return others is None or (n_cores or cores()) - others < threads - 0.5


def others_running(path: str = "/proc/loadavg") -> float | None:
    """Tasks other than this one that are running or waiting to run on the machine, averaged over
    ~20 ms (the 4th field of ``/proc/loadavg``, ``running/total``); None where that file does not exist
    or cannot be right (a sandbox's that counts no running task while this one reads it)."""
    counts = []
    for i in range(RUNNABLE_READS):
        try:
            with open(path) as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, IndexError, ValueError):
            return None
        if running < 1:
            return None
        counts.append(running - 1)  # minus this reader
        if i + 1 < RUNNABLE_READS:
            time.sleep(RUNNABLE_GAP_S)
    return sum(counts) / len(counts)


def others_at_start() -> str:
    """What the wait-policy probe measured, as recorded with a run: ``"1.0"`` tasks, or ``"not
    measured"`` (the user set the wait policy, or the process did not start at an entry point)."""
    others = _probe.get("others")
    return "not measured" if others is None else f"{others:.1f}"


def share_cores(workers: int) -> None:
    """This process is one of ``workers`` on this machine: its default is cores // workers threads."""
    _share["workers"] = max(1, int(workers))


def default_threads() -> int:
    """The count when neither the spec nor the load decides: ``OMP_NUM_THREADS`` if the user set it,
    else this process's share of the cores."""
    return user_threads() or share()


def user_threads() -> int | None:
    """The count the user set in ``OMP_NUM_THREADS`` (its first level), if any."""
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(env) if env.isdigit() and int(env) > 0 else None


def resolve_threads(requested: int | str | None, deterministic: bool = False) -> int:
    """The count for the spec's ``train.threads``: a number as given; ``"auto"``, this process's share
    cut to the cores other processes leave free; None, ``OMP_NUM_THREADS`` if the user set it, else the
    share as it is for a ``deterministic`` run (the same numbers whatever the load), else as ``"auto"``."""
    if requested == "auto" or (requested is None and not deterministic and user_threads() is None):
        busy = cores_busy()
        n = share() if busy is None else threads_left(share(), busy)
        if n < share() and not _probe.get("told"):  # once per process: the count changes the numbers
            _probe["told"] = True
            log.info("%d torch thread(s), not %d: other processes kept %.1f of %d cores busy as this one "
                     "started (recorded as train.threads_used; train.deterministic=true keeps %d whatever "
                     "the load)", n, share(), busy, cores(), share())
        return n
    n = int(requested) if requested else default_threads()
    if n > cores() and not _probe.get("warned"):  # as asked, but an epoch can take many times longer
        _probe["warned"] = True
        source = f"train.threads={n}" if requested else f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
        log.warning("%s is more than the %d core(s) this process may run on: its threads will wait on "
                    "each other and an epoch can take many times longer; kept as asked (train.threads=auto "
                    "fits the count to the machine)", source, cores())
    return n


def share() -> int:
    """This process's share of the cores: cores // workers."""
    return threads_for(_share["workers"])


def threads_left(share: int, busy: float, n_cores: int | None = None) -> int:
    """This process's share of threads, cut to the cores other processes leave free (at least 1)."""
    return max(1, min(share, int((n_cores or cores()) - busy + 0.5)))


def cores_busy() -> float | None:
    """Cores the machine's other processes kept busy (of those this process may run on) between
    :func:`prepare_threads` and the first call, measured once per process; None when unknown (no
    ``/proc/stat``, or ``prepare_threads`` never ran: then the process's share is used as it is)."""
    if "busy" not in _probe:
        start = _probe.get("start")
        now = _cpu_counters()
        if start is not None and now is not None and now[0] - start[0] < PROBE_MIN_S:
            time.sleep(PROBE_MIN_S - (now[0] - start[0]))
            now = _cpu_counters()
        if start is None or now is None:
            _probe["busy"] = None
        else:
            (w0, all0, own0), (w1, all1, own1) = start, now
            _probe["busy"] = max(0.0, ((all1 - all0) - (own1 - own0)) / (w1 - w0))
    return _probe["busy"]


def busy_at_start() -> str:
    """What the probe measured, as recorded with a run: ``"1.0"`` cores, or ``"not measured"`` (the
    load did not choose the count)."""
    busy = _probe.get("busy")
    return "not measured" if busy is None else f"{busy:.1f}"


def _cpu_counters() -> tuple[float, float, float] | None:
    """(monotonic wall seconds, CPU seconds used on this process's cores by everyone, by this process)."""
    mine = {f"cpu{i}" for i in os.sched_getaffinity(0)} if hasattr(os, "sched_getaffinity") else None
    try:
        with open("/proc/stat") as f:
            lines = [line.split() for line in f if line.startswith("cpu") and not line.startswith("cpu ")]
    except OSError:
        return None
    ticks = 0
    for name, user, nice, system, _idle, _iowait, irq, softirq, *_ in lines:
        if mine is None or name in mine:
            ticks += int(user) + int(nice) + int(system) + int(irq) + int(softirq)
    t = os.times()
    return time.monotonic(), ticks / os.sysconf("SC_CLK_TCK"), t.user + t.system


def apply_threads(requested: int | str | None, deterministic: bool = False) -> int:
    """Set torch's intra-op threads for ``requested`` (the spec's ``train.threads``, or a resumed run's
    recorded count; see :func:`resolve_threads`); returns the count now in use."""
    import torch

    n = resolve_threads(requested, deterministic)
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
