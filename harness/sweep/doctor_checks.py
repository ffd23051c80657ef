"""The storage doctor's checks (``harness.sweep.doctor``): each store reachable, its schema absent
(and creatable) or at this Optuna / MLflow version, no trial stale in state RUNNING, the two tools not
sharing one database. Each check returns a :class:`Report`; nothing is written to either store."""
from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from harness.errors import first_line, mask_url
from harness.sweep import storage as sto
from harness.sweep.study import worker_alive

# The sweep's heartbeat on RDB storages: a trial whose heartbeat is older than the grace period (3
# intervals, as harness.sweep.storage sets it) is stale: its worker died; the sweep fails it, ends its
# MLflow run KILLED and queues its params again.
GRACE_PERIOD_S = sto.grace_period()
# Without a heartbeat (journal file) a RUNNING trial cannot be told from one that is still running
# elsewhere, unless its worker recorded host and pid and that process is gone. Past this age it is
# reported as probably stale.
STALE_AFTER_S = 6 * 3600

OPTUNA_TABLES = {"studies", "trials", "trial_values", "trial_params", "version_info"}
MLFLOW_TABLES = {"experiments", "runs", "metrics", "params", "tags"}
CONNECT_TIMEOUT_S = 5


@dataclass
class Report:
    ok: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def extend(self, other: "Report") -> "Report":
        self.ok += other.ok
        self.warnings += other.warnings
        self.problems += other.problems
        return self


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///...`` URL (None for in-memory)."""
    from sqlalchemy.engine import make_url

    db = make_url(url).database
    return None if not db or db == ":memory:" else Path(db)


def _engine(url: str):
    import sqlalchemy

    connect_args = {}
    if url.startswith(("postgresql", "mysql")):
        connect_args["connect_timeout"] = CONNECT_TIMEOUT_S
    return sqlalchemy.create_engine(url, connect_args=connect_args, poolclass=sqlalchemy.pool.NullPool)


def _can_create_tables(conn, url: str) -> bool | None:
    if not url.startswith("postgresql"):
        return None
    import sqlalchemy

    return bool(conn.execute(sqlalchemy.text(
        "SELECT has_schema_privilege(current_user, 'public', 'CREATE')")).scalar())


# -- a tool's database (Optuna's RDB storage, MLflow's SQL store) ------------------------------------

@dataclass(frozen=True)
class Schema:
    """What the database check of Optuna and of MLflow differs in."""
    tool: str                   # "Optuna" / "MLflow"
    tables: frozenset[str]      # tables that show the tool's schema is there
    other_tool: str             # the tool that must not share the database
    other_tables: frozenset[str]
    creator: str                # what creates the database and the tables: "sweep" / "run"
    cannot_create: str          # the problem when there are no tables and this user may not create them
    upgrade: str                # the command that upgrades an old schema
    versions: Callable          # engine -> (head revision, current revision)


def alembic_revision(engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def check_database(url: str, name: str, schema: Schema, local: bool,
                    ready: Callable[[], Report]) -> Report:
    """Reachable, not shared with the other tool, schema absent (and creatable) or at this version's
    head; ``ready()`` adds the checks of a ready schema."""
    import sqlalchemy

    r = Report()
    if local:
        path = sqlite_path(url)
        if path is not None and not path.exists():
            if not path.parent.exists():
                r.problems.append(f"{name}: directory {path.parent} does not exist")
            else:
                r.ok.append(f"{name}: not created yet (the first {schema.creator} creates it)")
            return r
    try:
        engine = _engine(url)
        with engine.connect() as conn:
            tables = set(sqlalchemy.inspect(conn).get_table_names())
            creatable = _can_create_tables(conn, url)
    except Exception as e:
        r.problems.append(f"{name}: not reachable ({first_line(e)})")
        return r
    if tables & schema.other_tables:
        r.problems.append(f"{name}: this database also holds {schema.other_tool}'s tables; Optuna and "
                          f"MLflow both keep an alembic_version table: give each its own database")
        return r
    if not tables & schema.tables:
        if creatable is False:
            r.problems.append(f"{name}: {schema.cannot_create}")
        else:
            r.ok.append(f"{name}: reachable, empty (the first {schema.creator} creates "
                        f"{schema.tool}'s tables)")
        return r
    head, current = schema.versions(engine)
    if current != head:
        r.problems.append(f"{name}: schema version {current} is not this {schema.tool}'s ({head}); back "
                          f"it up and run `{schema.upgrade}`")
        return r
    return r.extend(ready())


# -- Optuna ------------------------------------------------------------------------------------------

def check_optuna(storage: str | None, *, workers: int = 1, study: str | None = None,
                 grace_period: int = GRACE_PERIOD_S, stale_after: int = STALE_AFTER_S) -> Report:
    storage = storage or sto.DEFAULT_OPTUNA_JOURNAL
    kind = sto.optuna_storage_kind(storage)
    name = f"Optuna storage {mask_url(storage)}"
    if kind == "sqlite" and workers > 1:
        r = Report(problems=[f"{name}: SQLite with --workers {workers}: SQLite locks under several "
                             f"writers; use the journal file (the default, one machine) or PostgreSQL "
                             f"(several machines)"])
        return r.extend(_check_rdb(storage, name, study, grace_period, stale_after, local=True))
    if kind == "journal":
        return _check_journal(Path(storage), name, study, stale_after)
    if kind == "redis":
        return Report(ok=[f"{name}: not checked (Redis journal)"])
    return _check_rdb(storage, name, study, grace_period, stale_after, local=kind == "sqlite")


def _check_journal(path: Path, name: str, study: str | None, stale_after: int) -> Report:
    r = Report()
    if not path.exists():
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.exists():
            r.problems.append(f"{name}: directory {parent} does not exist; create it or pass another "
                              f"--storage")
        elif not os.access(parent, os.W_OK):
            r.problems.append(f"{name}: directory {parent} is not writable")
        else:
            r.ok.append(f"{name}: not created yet (the first sweep creates it)")
        return r
    if not os.access(path, os.R_OK | os.W_OK):
        r.problems.append(f"{name}: not readable and writable by this user")
        return r
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    try:
        st = JournalStorage(JournalFileBackend(str(path)))
        studies = st.get_all_studies()
    except Exception as e:  # a torn or foreign file
        r.problems.append(f"{name}: cannot be read as an Optuna journal ({first_line(e)})")
        return r
    r.ok.append(f"{name}: readable, {len(studies)} stud{'y' if len(studies) == 1 else 'ies'}")
    now = dt.datetime.now()
    for s in studies:
        if study and s.study_name != study:
            continue
        for t in st.get_all_trials(s._study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            why = _journal_stale(t, now, stale_after)
            if why:
                r.problems.append(f"{name}: study {s.study_name!r} trial {t.number} is RUNNING but "
                                  f"{why}; the next sweep start marks it FAIL (and retries it)")
    return r


def _journal_stale(trial, now: dt.datetime, stale_after: int) -> str | None:
    """Why a RUNNING trial without heartbeat looks stale, or None when it may still be running.
    The sweep records its worker (host, pid, process start time) in the trial's user attributes."""
    worker = trial.user_attrs.get("worker") or {}
    alive = worker_alive(worker)
    if alive is False:
        return f"its worker (pid {worker.get('pid')} on this host) is gone"
    if alive is None and trial.datetime_start and (now - trial.datetime_start).total_seconds() > stale_after:
        return f"started {_ago(now - trial.datetime_start)} ago"
    return None


def _ago(delta: dt.timedelta) -> str:
    s = int(delta.total_seconds())
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _check_rdb(url: str, name: str, study: str | None, grace_period: int, stale_after: int,
               local: bool) -> Report:
    return check_database(url, name, OPTUNA_SCHEMA, local,
                           ready=lambda: _stale_rdb(url, name, study, grace_period, stale_after))


def _optuna_schema(engine) -> tuple[str, str | None]:
    import optuna.storages._rdb as rdb
    from alembic.script import ScriptDirectory

    head = ScriptDirectory(os.path.join(os.path.dirname(rdb.__file__), "alembic")).get_current_head()
    return head, alembic_revision(engine)


OPTUNA_SCHEMA = Schema(
    tool="Optuna", tables=frozenset(OPTUNA_TABLES),
    other_tool="MLflow", other_tables=frozenset(MLFLOW_TABLES), creator="sweep",
    cannot_create="reachable, no Optuna tables yet, and this user may not create tables in schema public "
                  "(GRANT CREATE ON SCHEMA public, or make the user the database owner)",
    upgrade="optuna storage upgrade --storage <URL>", versions=_optuna_schema)


def _stale_rdb(url: str, name: str, study: str | None, grace_period: int, stale_after: int) -> Report:
    import warnings

    import optuna
    import sqlalchemy
    from optuna.storages import RDBStorage

    r = Report()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heartbeat_interval is "experimental"
        # The tables exist and are at head, so opening it writes nothing.
        st = RDBStorage(url, engine_kwargs={"poolclass": sqlalchemy.pool.NullPool},
                        skip_table_creation=True, heartbeat_interval=sto.HEARTBEAT_INTERVAL_S,
                        grace_period=grace_period)
    try:
        studies = st.get_all_studies()
        if study and study not in {s.study_name for s in studies}:
            r.ok.append(f"{name}: reachable, schema ready; study {study!r} not created yet")
            return r
        r.ok.append(f"{name}: reachable, schema ready, {len(studies)} "
                    f"stud{'y' if len(studies) == 1 else 'ies'}")
        now = dt.datetime.now()
        for s in studies:
            if study and s.study_name != study:
                continue
            running = st.get_all_trials(s._study_id, deepcopy=False,
                                        states=(optuna.trial.TrialState.RUNNING,))
            if not running:
                continue
            stale = set(st._get_stale_trial_ids(s._study_id))
            with_heartbeat = _trials_with_heartbeat(st, [t._trial_id for t in running])
            for t in running:
                if t._trial_id in stale:
                    why = f"its heartbeat stopped more than {grace_period}s ago (its worker died)"
                elif t._trial_id not in with_heartbeat:
                    why = _journal_stale(t, now, stale_after)
                    if why:
                        why += " and it has no heartbeat"
                else:
                    why = None
                if why:
                    r.problems.append(f"{name}: study {s.study_name!r} trial {t.number} is RUNNING but "
                                      f"{why}; the next sweep start marks it FAIL (and retries it)")
    finally:
        st.engine.dispose()
    return r


def _trials_with_heartbeat(st, trial_ids: list[int]) -> set[int]:
    import sqlalchemy

    if not trial_ids:
        return set()
    with st.engine.connect() as conn:
        rows = conn.execute(sqlalchemy.text("SELECT trial_id FROM trial_heartbeats WHERE trial_id IN "
                                            f"({','.join(str(int(i)) for i in trial_ids)})"))
        return {row[0] for row in rows}
