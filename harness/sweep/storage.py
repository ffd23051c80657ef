"""Where a sweep keeps its Optuna study: the local journal file or a database, and the lock every
process of one study takes to count and reserve trials.

The local default is one journal file, ``mlruns/optuna.journal``, that several processes on this machine
append to under a lock. Any other value of ``--storage`` is either a journal file path (no "://") or an
Optuna RDB URL (``sqlite:///...``, ``postgresql://...``, ``mysql://...``). RDB storages get Optuna's
heartbeat, so a trial whose process died (on any machine) is failed after the grace period and handed
to ``on_stale``.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Iterator

from harness.errors import StoreError, first_line, mask_url
from harness.locks import file_lock

DEFAULT_OPTUNA_JOURNAL = "mlruns/optuna.journal"
HEARTBEAT_INTERVAL_S = 10
STALE_AFTER_HEARTBEATS = 3  # a RUNNING trial silent this many intervals is stale (its worker died)


def grace_period(heartbeat_interval: int | None = None) -> int:
    return STALE_AFTER_HEARTBEATS * (heartbeat_interval or HEARTBEAT_INTERVAL_S)
def optuna_storage_kind(url: str | None) -> str:
    """``journal`` (a file path or the default), ``sqlite``, ``rdb`` (another SQLAlchemy URL) or
    ``redis`` (Optuna's Redis journal backend)."""
    if not url:
        return "journal"
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if not scheme:
        return "journal"
    if scheme.startswith("sqlite"):
        return "sqlite"
    if scheme in ("redis", "rediss", "unix"):
        return "redis"
    return "rdb"


def optuna_storage_display(url: str | None) -> str:
    """The storage as the user should see it: its URL or path, password masked."""
    return mask_url(url) if url else DEFAULT_OPTUNA_JOURNAL


def check_optuna_storage(url: str | None, workers: int) -> None:
    """Refuse what cannot work before anything starts (cheap: no Optuna import)."""
    from harness.tracking import sqlite_files, store

    kind = optuna_storage_kind(url)
    shown = f"--storage {mask_url(url or '')}"
    if kind == "sqlite" and workers > 1:
        raise StoreError(
            f"{shown} with --workers {workers}: SQLite takes one writer at a time and Optuna's trials "
            f"would fail with 'database is locked'; use the default journal file (drop --storage), a "
            f"journal file (--storage mlruns/study.journal) or PostgreSQL")
    mlflow_db = sqlite_files.sqlite_path(store.tracking_uri()) if store.tracking_uri().startswith("sqlite") else None
    if kind == "sqlite" and url:
        db = sqlite_files.sqlite_path(url)
        if db is not None and mlflow_db is not None and db.resolve() == mlflow_db.resolve():
            raise StoreError(f"{shown}: that is the MLflow database (MLFLOW_TRACKING_URI); Optuna and MLflow "
                             f"each keep an alembic_version table and cannot share one: give the study "
                             f"its own file, e.g. --storage sqlite:///optuna.db")
        if db is not None:
            sqlite_files.check_sqlite_file(db, shown, "Optuna database", sqlite_files.MLFLOW_TABLES, "MLflow")
    if kind == "rdb" and url == store.tracking_uri():
        raise StoreError(f"{shown}: that is the MLflow database (MLFLOW_TRACKING_URI); give each its own")
    if kind == "journal":
        path = Path(url or DEFAULT_OPTUNA_JOURNAL)
        if path.is_dir():
            raise StoreError(f"{shown}: {path} is a directory; name a journal file, e.g. {path / 'optuna.journal'}")
        if path.is_file() and _head(path) == sqlite_files.SQLITE_HEADER:
            raise StoreError(f"{shown}: {path} is a SQLite database, not a journal file; write "
                             f"--storage sqlite:///{path}")


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(16)


def optuna_storage(url: str | None = None, workers: int = 1, *,
                   heartbeat_interval: int = HEARTBEAT_INTERVAL_S,
                   grace_period: int | None = None,
                   on_stale=None):
    """An Optuna storage for ``url`` (None: the journal file ``mlruns/optuna.journal``).

    RDB URLs get a heartbeat (``heartbeat_interval`` s; stale after ``grace_period`` s) and call
    ``on_stale(study, frozen_trial)`` for each trial the heartbeat found dead (default: Optuna's
    ``RetryHeartbeatStaleTrialCallback``). Errors the user can fix are :class:`StoreError`."""
    check_optuna_storage(url, workers)
    kind = optuna_storage_kind(url)
    shown = optuna_storage_display(url)
    import optuna
    from optuna.storages import journal

    try:
        if kind == "journal":
            path = journal_path(url)
            path.parent.mkdir(parents=True, exist_ok=True)
            _mend_journal_lock(path)
            return optuna.storages.JournalStorage(journal.JournalFileBackend(str(path)))
        if kind == "redis":
            return optuna.storages.JournalStorage(journal.JournalRedisBackend(url))
        grace = grace_period or STALE_AFTER_HEARTBEATS * heartbeat_interval
        with quiet_experimental():
            if on_stale is None:
                on_stale = optuna.storages.RetryHeartbeatStaleTrialCallback()
            from harness.sweep.dbretry import RetryingRDBStorage  # rides out a database restart

            return RetryingRDBStorage(
                url, heartbeat_interval=heartbeat_interval, grace_period=grace,
                heartbeat_stale_trial_callback=on_stale,
                engine_kwargs=_rdb_engine_kwargs(url))
    except ImportError as e:
        hint = ("pip install 'psycopg[binary]' or write postgresql+psycopg2://"
                if kind == "rdb" and url and url.startswith("postgres") else "install its driver")
        raise StoreError(f"--storage {shown}: missing database driver ({e}); {hint}") from None
    except (OSError, ValueError) as e:
        raise StoreError(f"--storage {shown}: cannot open it ({first_line(e)})") from None
    except Exception as e:  # sqlalchemy OperationalError (unreachable, auth), redis ConnectionError
        raise StoreError(f"--storage {shown}: not reachable ({first_line(e)}); check the URL and "
                         f"that the server is running") from None


def _rdb_engine_kwargs(url: str) -> dict:
    if url.startswith("sqlite"):
        # Wait for the lock instead of failing at once when a second process writes (one sweep at a
        # time per SQLite file is still the rule; this covers the summary/doctor reading beside it).
        return {"connect_args": {"timeout": 30}}
    return {"pool_pre_ping": True}  # a restarted database server: reconnect instead of failing


@contextlib.contextmanager
def quiet_experimental() -> Iterator[None]:
    """Optuna marks the heartbeat and the retry callback experimental: one warning per call is noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*experimental.*")
        yield


def journal_path(url: str | None) -> Path:
    """A journal storage's file by its absolute path (see :func:`_mend_journal_lock`)."""
    return Path(url or DEFAULT_OPTUNA_JOURNAL).absolute()


def _mend_journal_lock(path: Path, grace_s: float = 30.0) -> None:
    """Optuna's journal lock is a symlink ``<journal>.lock`` to the journal, and a process killed while
    it writes leaves it behind. Optuna releases such a lock once the file it points to has not changed
    for 30 s; but a process that named the journal by a relative path made a link that points nowhere
    (its target is resolved from the link's own folder), and Optuna then waits forever. Such a dangling
    lock, once 30 s old, is removed here; the harness names the journal by its absolute path."""
    import time

    lock = path.with_name(path.name + ".lock")
    while lock.is_symlink() and not lock.exists():
        try:
            age = time.time() - lock.lstat().st_mtime
        except FileNotFoundError:  # its owner, or another process mending it, removed it meanwhile
            return
        if age >= grace_s:
            lock.unlink(missing_ok=True)
            logging.getLogger("harness.sweep").warning(
                "removed %s: a lock on the Optuna journal left behind %.0f s ago by a process killed while "
                "it wrote", lock, age)
            return
        time.sleep(min(1.0, grace_s - age))


def _lock_file(url: str | None) -> Path | None:
    """The file whose ``flock`` guards a journal or a SQLite storage (None: not a file storage)."""
    kind = optuna_storage_kind(url)
    if kind == "journal":
        path = journal_path(url)
        return path.with_name(path.name + ".harness-lock")
    db = url.split(":///", 1)[1] if kind == "sqlite" and url and ":///" in url else ""
    return Path(db).with_name(Path(db).name + ".harness-lock") if db and db != ":memory:" else None


def _backend(url: str) -> str:
    """``postgresql`` for ``postgresql+psycopg2://...``: the database a URL names, without its driver."""
    return url.split("+", 1)[0].split(":", 1)[0]


def _lock_database(url: str | None) -> bool:
    return optuna_storage_kind(url) == "rdb" and bool(url) and _backend(url) in ("postgresql", "postgres", "mysql")


def locks_across_processes(url: str | None) -> bool:
    """Whether :func:`storage_lock` really excludes the other processes of a study (and dies with the
    process that holds it, as flock and database session locks do)."""
    return _lock_file(url) is not None or _lock_database(url)


@contextlib.contextmanager
def storage_lock(url: str | None) -> Iterator[None]:
    """A short exclusive section across every process that uses this Optuna storage: the sweep
    counts trials and reserves the next one inside it, so N workers end with exactly N trials.

    Journal files and SQLite: an ``flock`` on a file beside them (one machine). PostgreSQL: an
    advisory lock; MySQL: ``GET_LOCK``. Anything else: no lock (the sweep then re-checks its count
    after reserving)."""
    path = _lock_file(url)
    if path is not None:
        with file_lock(path):
            yield
    elif _lock_database(url):
        with _db_lock(url):
            yield
    else:
        yield


_LOCK_ENGINES: dict[str, object] = {}
_LOCK_KEY = 0x6861726E  # "harn": one advisory-lock id for every sweep on the database


@contextlib.contextmanager
def _db_lock(url: str) -> Iterator[None]:
    import sqlalchemy

    engine = _LOCK_ENGINES.get(url)
    if engine is None:
        # PostgreSQL: one connection kept for the lock (a new one is a server process forked and
        # authenticated, ~10 ms a trial), checked before each use, closed when its session could still
        # hold the lock (dbretry.pg_advisory_lock). Elsewhere a connection per lock.
        pooled = _backend(url) in ("postgresql", "postgres")
        engine = _LOCK_ENGINES[url] = sqlalchemy.create_engine(url, pool_size=1, pool_pre_ping=True) if pooled \
            else sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    if engine.dialect.name == "postgresql":  # type: ignore[attr-defined]
        from harness.sweep.dbretry import pg_advisory_lock  # taken through a database restart

        with pg_advisory_lock(engine, _LOCK_KEY):
            yield
        return
    with engine.connect() as conn:  # type: ignore[attr-defined]
        if conn.dialect.name in ("mysql", "mariadb"):
            conn.execute(sqlalchemy.text("SELECT GET_LOCK('harness_sweep', 60)"))
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT RELEASE_LOCK('harness_sweep')"))
        else:
            yield


def optuna_dashboard_command(url: str | None) -> str:
    """A journal by its absolute path: with a relative one, a dashboard killed while it writes leaves a lock
    that Optuna never releases (see _mend_journal_lock)."""
    if optuna_storage_kind(url) == "journal":
        import shlex

        return f"optuna-dashboard {shlex.quote(str(journal_path(url)))}"
    return f"optuna-dashboard {optuna_storage_display(url)}"
