"""System metrics of a run (``system/cpu_utilization_percentage``, ``system/system_memory_usage_*``, disk,
network; ``system/gpu_*`` when NVIDIA's management library is present): MLflow's own monitor, sampled
every :data:`SAMPLING_INTERVAL_S` so that a trial of a few seconds gets a curve, and with the tail of
the run logged too (MLflow's monitor drops the samples taken after its last full interval, so a run
shorter than one interval got none at all).

``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` overrides the interval, ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=
false`` turns sampling off (MLflow's own switches).
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, Iterator

from harness.tracking import store

log = logging.getLogger("harness.tracking")

# Measured with benchmarks/system_metrics.py (README 'What lands in MLflow'): a sample costs a psutil
# read, a get_run and a log_batch in a background thread.
SAMPLING_INTERVAL_S = 1.0
JOIN_TIMEOUT_S = 5.0  # a gone tracking server must not hold the end of a run
MIN_TAIL_S = 0.2


def enabled(requested: bool | None) -> bool:
    """``requested`` None: on, unless MLflow's switch says ``false``."""
    if requested is not None:
        return requested
    return os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").lower() != "false"


def _monitor_class():
    import time

    import psutil
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class RunMonitor(SystemMetricsMonitor):
        """MLflow's monitors (CPU, memory, disk, network, GPU) and its batched logging, in a simpler
        loop: sample ``n`` (step ``n``, from 1) covers the n-th interval since the start (psutil's CPU
        utilisation is measured between two readings), and finishing logs the tail since the last full
        interval. No ``get_run`` per sample: the tracker that started it always finishes it."""

        def start(self) -> None:
            self._last = time.monotonic()
            self._log_tail = True
            self._logging_step = max(self._logging_step, 1)  # step 0 is where models link metrics
            super().start()

        def monitor(self) -> None:
            # psutil measures CPU use between two readings of the same thread: every sample is taken
            # here, the tail too, after this first reference reading.
            psutil.cpu_percent()
            while not self._shutdown_event.wait(self.sampling_interval):
                if not self._sample():
                    return
            # The tail since the last full interval, unless too short for a CPU reading to mean anything.
            if self._log_tail and time.monotonic() - self._last >= MIN_TAIL_S:
                self._sample()

        def _sample(self) -> bool:
            try:
                self.collect_metrics()
                self._last = time.monotonic()
                self.publish_metrics(self.aggregate_metrics())
                return True
            except Exception as e:  # a nicety: never fails the run it describes
                log.debug("system metrics: sampling stopped: %s", e)
                return False

        def stop(self, log_tail: bool = True) -> None:
            """The monitor takes its last sample (unless ``log_tail`` is false) and sends it on its own
            thread: the run's end goes on meanwhile."""
            if self._process is not None and not self._shutdown_event.is_set():
                self._log_tail = log_tail
                self._shutdown_event.set()

        def finish(self, log_tail: bool = True) -> None:
            if self._process is None:
                return
            self.stop(log_tail)
            self._process.join(timeout=JOIN_TIMEOUT_S)
            alive, self._process = self._process.is_alive(), None
            if not self._log_tail or alive:  # a store that does not answer: leave the thread (a daemon) be
                return
            try:
                self.mlflow_logger.flush()
            except Exception as e:
                log.debug("system metrics: the last samples were not logged: %s", e)

    return RunMonitor


@contextlib.contextmanager
def sampling(run_id: str, *, on: bool | None = None, resume: bool = False,
             interval: float = SAMPLING_INTERVAL_S) -> Iterator[Callable[[], None]]:
    """Sample system metrics into run ``run_id`` (RUNNING) while the block runs. ``resume``: go on from
    the run's last system-metrics step (a resumed run, a sweep's parent run started again).

    Yields ``last_sample``: called as the run ends, the last sample is taken and sent on the monitor's
    thread while the run's end goes on (a request to a tracking server saved from the end of every run);
    the block's exit waits for it. Not called, the exit takes it."""
    if not enabled(on):
        yield lambda: None
        return
    monitor = None
    try:
        monitor = _monitor_class()(run_id, sampling_interval=interval, resume_logging=resume)
        monitor.start()
    except Exception as e:
        log.debug("system metrics not sampled: %s", e)
        monitor = None
    try:
        yield monitor.stop if monitor is not None else (lambda: None)
    except BaseException:
        if monitor is not None:  # a gone tracking server would hold the end for minutes of retries
            monitor.finish(log_tail=not store.tracking_server_down())
        raise
    if monitor is not None:
        monitor.finish()
