"""The local SQLite files of the stores (MLflow's ``mlflow.db``, an Optuna ``--storage sqlite:///``):
what an existing one must be (a SQLite database, not the other tool's, not left half made), and a new
MLflow store made whole or not at all. The rest of where runs go is ``harness.tracking.store``.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from harness.errors import StoreError
from harness.locks import file_lock

SQLITE_HEADER = b"SQLite format 3\x00"


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///PATH`` URI (None: in memory)."""
    path = uri.split(":///", 1)[1] if ":///" in uri else ""
    return None if not path or path.startswith(":memory:") else Path(path.split("?", 1)[0])


MLFLOW_TABLES = frozenset({"experiments", "runs", "metrics", "params"})
OPTUNA_TABLES = frozenset({"studies", "trials", "trial_values", "trial_params"})


def check_sqlite_file(db: Path, shown: str, what: str, foreign: frozenset[str] = OPTUNA_TABLES,
                      foreign_tool: str = "Optuna") -> None:
    """A SQLite file that exists must be one, and not the other tool's (Optuna and MLflow both keep an
    alembic_version table: sharing a file breaks both); one that does not exist must have a directory
    it can go in."""
    if db.is_dir():
        raise StoreError(f"{shown}: {db} is a directory; name a {what} file in it, e.g. {db / 'mlflow.db'}")
    if db.exists():
        try:
            with open(db, "rb") as f:
                head = f.read(len(SQLITE_HEADER))
        except OSError as e:
            raise StoreError(f"{shown}: cannot read {db} ({e.strerror}); check its permissions") from None
        if head and head != SQLITE_HEADER:
            raise StoreError(f"{shown}: {db} is not a SQLite database (another kind of file); point it at a "
                             f"new file name or an existing {what}")
        tables = _tables(db) if head else set()
        if tables & foreign:
            raise StoreError(f"{shown}: {db} holds {foreign_tool}'s tables; give each tool its own "
                             f"database file")
        leftover = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
        if leftover:
            n = _rows(db, "runs" if "runs" in tables else "trials")
            then = f"it holds no runs: delete {db} and run again" if not n else \
                f"it holds {n} run(s) or trial(s): move it aside and start a new store, or restore a backup"
            raise StoreError(f"{shown}: {db} is half made: a process was killed while it created or upgraded "
                             f"its tables (left over: {leftover[0]}); {then}")
        return
    parent = db.parent if str(db.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"{shown}: cannot create the directory {parent} ({e.strerror}); choose a path you "
                         f"can write") from None


_ready: set[str] = set()


def create_once(uri: str) -> None:
    """Create (or migrate) a local SQLite store under a file lock: two commands started at once on a
    fresh store would otherwise both run MLflow's schema migration, and one dies in alembic."""
    if uri in _ready or not uri.startswith("sqlite:///"):
        return
    from mlflow import MlflowClient

    db = sqlite_path(uri)
    if db is None:
        return
    with file_lock(db.with_name(db.name + ".harness-lock")):
        if not db.exists():
            _create(db)
        MlflowClient(uri).search_experiments(max_results=1)
    _ready.add(uri)


def _create(db: Path) -> None:
    """A new store, made in a file beside ``db`` and renamed into place: MLflow's schema migrations on
    SQLite are not atomic (a kill halfway left a store no command could open), a rename is."""
    from mlflow import MlflowClient

    for stray in db.parent.glob(f".{db.name}.creating-*"):  # from a process killed while it made one
        stray.unlink(missing_ok=True)
    part = db.with_name(f".{db.name}.creating-{os.getpid()}")
    try:
        MlflowClient(f"sqlite:///{part}").search_experiments(max_results=1)
        os.replace(part, db)
    finally:
        part.unlink(missing_ok=True)


def _rows(db: Path, table: str) -> int | None:
    """Rows in ``table`` of a SQLite file (None: no such table, or unreadable)."""
    found = _query(db, f'SELECT count(*) FROM "{table}"')
    return found[0][0] if found else None


def _tables(db: Path) -> set[str]:
    return {r[0] for r in _query(db, "SELECT name FROM sqlite_master WHERE type = 'table'") or []}


def _query(db: Path, sql: str) -> list[tuple] | None:
    """``sql``'s rows, read from the file without writing to it; None where it cannot be read."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            return conn.execute(sql).fetchall()
    except sqlite3.Error:
        return None
