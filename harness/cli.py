"""What every entry point shares: logging set-up and turning user errors into one line + exit 2."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Callable, Iterator, NoReturn

from harness.errors import UserError, disk_problem


def setup_logging(verbose: bool = False) -> None:
    # MLflow sets its own logger's level when first imported (later, lazily): tell it through its variable.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "DEBUG" if verbose else "WARNING")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "mlflow", "urllib3", "git", "optuna"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class Parser(argparse.ArgumentParser):
    """argparse whose mistakes are one line, like every other user error: what is wrong, and where to
    read the usage (argparse's default prints the whole usage block above it)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive(cast: type, what: str):
    """An argparse type: ``cast(text)`` that must be > 0, else argparse's one-line usage error (exit 2)."""
    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return v
    return parse


positive_int = positive(int, "a whole number")
MAX_NAME = 250  # characters of an MLflow run name (PostgreSQL refuses more; SQLite does not check)


def run_id(text: str) -> str:
    """An argparse type: an MLflow run id, not blank (``--resume $RUN`` with the variable unset must not
    quietly start a new run)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected an MLflow run id, got a blank one (an unset shell variable?)")
    return text.strip()


def name_of(limit: int = MAX_NAME):
    """An argparse type: a name, not blank and at most ``limit`` characters."""
    def parse(text: str) -> str:
        if not text.strip() or len(text) > limit:
            got = f"{len(text)} characters" if text.strip() else "a blank one"
            raise argparse.ArgumentTypeError(f"expected a name of 1 to {limit} characters, got {got}")
        return text
    return parse


@contextlib.contextmanager
def user_errors(prog: str) -> Iterator[None]:
    """Bad input -> ``prog: error: <one line>`` on stderr and exit status 2, no traceback."""
    try:
        yield
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:
        problem = disk_problem(e)
        if problem is None:
            raise
        print(f"{prog}: error: {problem}", file=sys.stderr)
        raise SystemExit(2) from None



class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so it is handled like Ctrl-C (runs end KILLED)."""


_pending: list[int] = []  # a signal whose exception Python swallowed inside the block


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (and Ctrl-C ``KeyboardInterrupt``, as ever);
    outside the main thread, a no-op. Either raised while the garbage collector runs a finalizer is
    swallowed by Python ("Exception ignored", and the program goes on as if no signal had come): it is
    kept, and raised by :func:`check_interrupt` or, at the latest, as the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(f"signal {signum}")

    def unraisable(u) -> None:
        if isinstance(u.exc_value, KeyboardInterrupt):
            _pending.append(signal.SIGTERM if isinstance(u.exc_value, Terminated) else signal.SIGINT)
        else:
            hook(u)

    previous = signal.signal(signal.SIGTERM, handler)
    hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield
    except BaseException:
        _pending.clear()  # the block ends on an exception anyway
        raise
    finally:
        sys.unraisablehook = hook
        signal.signal(signal.SIGTERM, previous)
    check_interrupt()  # swallowed where nothing checked: it takes effect as the block ends


def check_interrupt() -> None:
    """Raise, once, for a Ctrl-C or SIGTERM that Python swallowed (see :func:`sigterm_as_interrupt`).
    Called where a run can stop cleanly: every training batch, and before a run ends FINISHED."""
    if _pending:
        signum = _pending[0]
        _pending.clear()
        if signum == signal.SIGTERM:
            raise Terminated(f"signal {signum}")
        raise KeyboardInterrupt


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Ctrl-C (SIGINT) or SIGTERM arriving inside the block takes effect when the block ends, so a
    write to the store (a database transaction, a checkpoint upload) is not cut in half; a second one
    takes effect at once (a store that does not answer must not hold the user). Outside the main
    thread, a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    kinds = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in kinds}

    def deliver(signum: int) -> None:
        handler = previous[signum]
        if callable(handler):
            handler(signum, None)  # raises KeyboardInterrupt or Terminated
        elif handler == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    def hold(signum, frame):
        if caught:
            for s, h in previous.items():
                signal.signal(s, h)
            deliver(signum)
        caught.append(signum)

    for s in kinds:
        if previous[s] != signal.SIG_IGN:
            signal.signal(s, hold)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if caught:
        deliver(caught[0])


@contextlib.contextmanager
def temp_env(**values: str) -> Iterator[None]:
    """Environment variables set for the block and restored after it (a library reads them per call)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def exit_with(main: Callable[[], int | None]) -> NoReturn:
    """Run a command's ``main()`` and exit with its status. Python's shutdown walks every object torch
    and MLflow made (1-2.5 s measured, after the command's work is done); frozen first, they are left to
    the operating system. atexit handlers and the joins of non-daemon threads still run."""
    import gc

    try:
        code = main()
    finally:
        gc.freeze()
    sys.exit(code)
