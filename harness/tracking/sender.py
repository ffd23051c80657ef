"""Requests to a store, made now or in the background: a run's start logs its params, spec and datasets
(~40 ms of requests to a tracking server here) while its first epoch trains.

Requests sent in the background go out on one thread, in the order they were made; a request made
outside waits for them first, so the store sees every run's writes in the order the run made them, and a
kill at any instant leaves it holding a prefix of them, as before. The run's end waits for them too.
"""
from __future__ import annotations

import contextlib
import logging
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator

log = logging.getLogger("harness.tracking")


class Sender:
    """Calls ``fn(*args)`` now, or inside :meth:`background` on its thread, in order."""

    def __init__(self, name: str = "harness-tracking") -> None:
        self._name = name  # of its thread
        self._later = False
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []

    @contextlib.contextmanager
    def background(self) -> Iterator[None]:
        self._later = True
        try:
            yield
        finally:
            self._later = False

    def __call__(self, fn: Callable, *args, **kwargs) -> None:
        if self._later:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix=self._name)
            self._pending.append(self._pool.submit(fn, *args, **kwargs))
            return
        self.wait()
        fn(*args, **kwargs)

    def wait(self) -> None:
        """Every request sent in the background has landed; the first one that failed raises here."""
        futures.wait(self._pending)  # interrupted here, they are still pending: settle() waits again
        pending, self._pending = self._pending, []
        for f in pending:
            if f.exception() is not None:
                raise f.exception()

    def settle(self, quietly: bool) -> BaseException | None:
        """At the run's end: :meth:`wait`, returning the error instead of raising it (only logged if
        ``quietly``: the run is ending on an error of its own), and the thread let go. A Ctrl-C or
        SIGTERM while it waits is returned too (the run still ends, KILLED); requests not yet begun are
        dropped then."""
        try:
            self.wait()
        except BaseException as e:
            if quietly:
                log.debug("a request sent in the background failed: %s", e)
            return e
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
        return None
