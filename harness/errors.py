"""The mistakes a user can fix, as exception types, and the two helpers every error line needs.

Every entry point turns a :class:`UserError` into one line on stderr and exit status 2
(``harness.cli.user_errors``). This module is a leaf: it imports nothing of ours, so any layer may
raise these without pulling in pydantic, torch, MLflow or Optuna.
"""
from __future__ import annotations

import errno
import os
import re


class UserError(Exception):
    """A mistake the user can fix (bad spec, missing data, unreachable store): one line, exit status 2."""


class SpecError(UserError):
    """The experiment spec, an override or an ablation spec is wrong; the message names the field."""


class DataError(UserError):
    """The data cannot be loaded as the spec asks (missing files, bad contents)."""


class CheckpointError(UserError):
    """A checkpoint is missing, damaged, foreign or refused by ``torch.load(weights_only=True)``;
    ``torn``: it was cut short (a kill mid-copy), not tampered with."""

    torn = False


class StoreError(UserError):
    """An MLflow store or Optuna storage cannot be used (unreachable, wrong kind, shared)."""


class TrackingServerGone(StoreError):
    """The tracking server stopped answering mid-command: MLflow can be told nothing more for now."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (a driver's own first line for SQLAlchemy errors,
    which append the SQL and a link), password masked; the type name when the message is empty."""
    text = str(getattr(e, "orig", None) or e).strip().splitlines()
    return mask_url(text[0][:limit]) if text else type(e).__name__


_QUERY_PASSWORD = re.compile(r"([?&](?:password|passwd|pwd|pass)=)[^&#]*", re.IGNORECASE)


def mask_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (for logs, params, tags and error lines)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    # libpq and most drivers also take the password as a query parameter (?password=...), which
    # SQLAlchemy's rendering keeps as it is.
    url = _QUERY_PASSWORD.sub(r"\1***", url)
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # not a URL SQLAlchemy can parse (a path, a bare host...)
        return re.sub(r"(//[^:/@]+:)[^@]*@", r"\1***@", url)
    return url if parsed.password is None else parsed.render_as_string(hide_password=True)


_DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied"}
_SQLITE_TEXTS = {"database or disk is full": "no space left on device",
                 "attempt to write a readonly database": "read-only database",
                 "unable to open database file": "cannot open the database file"}


def disk_problem(e: BaseException, database: str | None = None) -> str | None:
    """One line for an exception a full, read-only or unwritable disk caused (anywhere in its chain:
    MLflow and SQLAlchemy wrap them), naming the path (SQLite names no file: ``database``, by default
    the local MLflow database); None for anything else."""
    if database is None:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
        database = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else "the database"
    seen = 0
    while e is not None and seen < 12:
        if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
            where = e.filename or database
            return (f"{where}: {_DISK_ERRNOS[e.errno]}; free some space (or fix its permissions) and "
                    f"run the same command again: what finished before is kept")
        text = str(e).lower()
        for needle, what in _SQLITE_TEXTS.items():
            if needle in text:
                return (f"{database}: {what}; free some space (or fix its permissions) and run the same "
                        f"command again: what finished before is kept")
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None
