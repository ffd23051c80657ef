"""The storage doctor: checks the Optuna storage and the MLflow store a sweep would use, before it starts.

    python -m harness.doctor [--storage URL] [--workers K] [--study NAME]
    python -m harness.sweep --check-storage ...     (the same checks, the sweep's own options)

Checks, one clear line per problem: each store is reachable; its schema is ready (or absent and
creatable: the first sweep creates it) and of this Optuna / MLflow version; SQLite is not used with
several workers; no trial is left stale in state RUNNING; Optuna and MLflow do not share one database.
Exit status 0 when all is well, 2 when there are problems. Nothing is written to either store.
URLs are printed with their passwords masked.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from harness.stores import HEARTBEAT_INTERVAL_S, optuna_storage_kind

# The sweep's heartbeat on RDB storages: a trial whose heartbeat is older than the grace period (3
# intervals, as harness.stores.optuna_storage sets it) is stale: its worker died; the sweep fails it,
# ends its MLflow run KILLED and queues its params again.
GRACE_PERIOD_S = 3 * HEARTBEAT_INTERVAL_S
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


def mask(url: str) -> str:
    from harness.stores import mask_url

    return mask_url(url)


def default_storage() -> str:
    from harness import stores

    return stores.DEFAULT_OPTUNA_JOURNAL


def storage_kind(storage: str) -> str:
    """``journal`` (a file path), ``sqlite``, ``redis`` (Optuna's Redis journal) or ``rdb`` (a database
    server: postgresql, mysql...), as the sweep reads ``--storage``."""
    return optuna_storage_kind(storage)


def journal_path(storage: str) -> Path:
    return Path(storage)


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


def _first_line(e: BaseException) -> str:
    # SQLAlchemy appends a background link and the SQL; the driver's first line says what went wrong.
    text = str(getattr(e, "orig", None) or e).strip()
    return (text.splitlines() or [type(e).__name__])[0][:200]


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


def _alembic_revision(engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _check_database(url: str, name: str, schema: Schema, local: bool,
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
        r.problems.append(f"{name}: not reachable ({_first_line(e)})")
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
    storage = storage or default_storage()
    kind = storage_kind(storage)
    name = f"Optuna storage {mask(storage)}"
    if kind == "sqlite" and workers > 1:
        r = Report(problems=[f"{name}: SQLite with --workers {workers}: SQLite locks under several "
                             f"writers; use the journal file (the default, one machine) or PostgreSQL "
                             f"(several machines)"])
        return r.extend(_check_rdb(storage, name, study, grace_period, stale_after, local=True))
    if kind == "journal":
        return _check_journal(journal_path(storage), name, study, stale_after)
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
        r.problems.append(f"{name}: cannot be read as an Optuna journal ({_first_line(e)})")
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
    alive = _worker_alive(worker)
    if alive is False:
        return f"its worker (pid {worker.get('pid')} on this host) is gone"
    if alive is None and trial.datetime_start and (now - trial.datetime_start).total_seconds() > stale_after:
        return f"started {_ago(now - trial.datetime_start)} ago"
    return None


def _worker_alive(worker: dict) -> bool | None:
    """True/False for a worker on this host (pid alive and started when recorded); None elsewhere."""
    import platform

    import psutil

    if not worker or worker.get("host") != platform.node() or not worker.get("pid"):
        return None
    try:
        proc = psutil.Process(int(worker["pid"]))
        started = worker.get("started")
        same = started is None or abs(proc.create_time() - float(started)) < 1.0
        return same and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, ValueError):
        return False
    except psutil.AccessDenied:
        return None


def _ago(delta: dt.timedelta) -> str:
    s = int(delta.total_seconds())
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _check_rdb(url: str, name: str, study: str | None, grace_period: int, stale_after: int,
               local: bool) -> Report:
    return _check_database(url, name, OPTUNA_SCHEMA, local,
                           ready=lambda: _stale_rdb(url, name, study, grace_period, stale_after))


def _optuna_schema(engine) -> tuple[str, str | None]:
    import optuna.storages._rdb as rdb
    from alembic.script import ScriptDirectory

    head = ScriptDirectory(os.path.join(os.path.dirname(rdb.__file__), "alembic")).get_current_head()
    return head, _alembic_revision(engine)


OPTUNA_SCHEMA = Schema(
    tool="Optuna", tables=frozenset(OPTUNA_TABLES),
    other_tool="MLflow", other_tables=frozenset(MLFLOW_TABLES), creator="sweep",
    cannot_create="reachable, no Optuna tables yet, and this user may not create tables in schema public "
                  "(GRANT CREATE ON SCHEMA public, or make the user the database owner)",
    upgrade="optuna storage upgrade --storage <URL>", versions=_optuna_schema)


def _stale_rdb(url: str, name: str, study: str | None, grace_period: int, stale_after: int) -> Report:
    import warnings

    import optuna
    from optuna.storages import RDBStorage

    r = Report()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heartbeat_interval is "experimental"
        # The tables exist and are at head, so opening it writes nothing.
        st = RDBStorage(url, engine_kwargs={"poolclass": __import__("sqlalchemy").pool.NullPool},
                        skip_table_creation=True, heartbeat_interval=HEARTBEAT_INTERVAL_S,
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


# -- MLflow ------------------------------------------------------------------------------------------

def check_mlflow(uri: str | None = None) -> Report:
    from harness import stores

    uri = uri or stores.tracking_uri()
    name = f"MLflow store {mask(uri)}"
    r = Report()
    if uri.startswith(("http://", "https://")):
        return _check_mlflow_server(uri, name)
    if uri.startswith("file:") or "://" not in uri:
        r.problems.append(f"{name}: the old file store; MLflow 3.13+ refuses it: use sqlite:///mlflow.db "
                          f"(the default) or a tracking server")
        return r
    if uri.startswith("databricks"):
        r.ok.append(f"{name}: not checked (Databricks)")
        return r
    return _check_database(uri, name, MLFLOW_SCHEMA, local=uri.startswith("sqlite"),
                           ready=lambda: Report(ok=[f"{name}: reachable, schema ready"]))


def _mlflow_schema(engine) -> tuple[str, str | None]:
    from mlflow.store.db.utils import _get_latest_schema_revision

    current = _alembic_revision(engine)
    return _get_latest_schema_revision(), current


MLFLOW_SCHEMA = Schema(
    tool="MLflow", tables=frozenset(MLFLOW_TABLES),
    other_tool="Optuna", other_tables=frozenset(OPTUNA_TABLES), creator="run",
    cannot_create="no MLflow tables yet, and this user may not create tables in schema public",
    upgrade="mlflow db upgrade <URI>", versions=_mlflow_schema)


def _check_mlflow_server(uri: str, name: str) -> Report:
    from harness import stores

    r = Report()
    try:
        stores.check_tracking_server(uri)
    except stores.StoreError:
        r.problems.append(f"{name}: tracking server not reachable (no answer on /health); start it "
                          f"(scripts/servers.sh start) or fix MLFLOW_TRACKING_URI")
        return r
    # /health answers without the database; a real API call also checks the server's backend store.
    import requests

    try:
        resp = requests.post(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search",
                             json={"max_results": 1}, timeout=15, auth=_basic_auth(uri))
    except requests.RequestException as e:
        r.problems.append(f"{name}: the tracking server does not answer API calls ({type(e).__name__})")
        return r
    if resp.status_code in (401, 403):
        r.problems.append(f"{name}: the tracking server refuses our credentials (HTTP {resp.status_code}); "
                          f"set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")
    elif resp.status_code != 200:
        r.problems.append(f"{name}: the tracking server answers /health but its API fails "
                          f"(HTTP {resp.status_code}): is its backend database up?")
    else:
        r.ok.append(f"{name}: tracking server reachable, its backend store answers")
    return r


def _basic_auth(uri: str):
    import urllib.parse

    parts = urllib.parse.urlsplit(uri)
    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or parts.username
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD") or parts.password
    return (user, password) if user and password else None


# -- together ----------------------------------------------------------------------------------------

def check(storage: str | None = None, tracking_uri: str | None = None, *, workers: int = 1,
          study: str | None = None, grace_period: int = GRACE_PERIOD_S,
          stale_after: int = STALE_AFTER_S) -> Report:
    """Every check; nothing is written to either store."""
    from harness import stores

    storage = storage or default_storage()
    tracking_uri = tracking_uri or stores.tracking_uri()
    r = check_optuna(storage, workers=workers, study=study, grace_period=grace_period,
                     stale_after=stale_after)
    r.extend(check_mlflow(tracking_uri))
    if storage_kind(storage) == "rdb" and not tracking_uri.startswith(("http://", "https://",
                                                                       "postgresql", "mysql")):
        r.warnings.append(f"the Optuna storage is shared but the MLflow store {mask(tracking_uri)} is "
                          f"local to this machine: workers on other machines cannot log under the same "
                          f"parent run; set MLFLOW_TRACKING_URI to the team's mlflow server")
    if storage_kind(storage) == "rdb" and storage == tracking_uri:
        r.problems.append("the Optuna storage and the MLflow store are the same database; give each "
                          "its own")
    return r


def print_report(r: Report, file=sys.stdout) -> None:
    for line in r.ok:
        print(f"ok: {line}", file=file)
    for line in r.warnings:
        print(f"warning: {line}", file=file)
    for line in r.problems:
        print(f"problem: {line}", file=file)
    n = len(r.problems)
    print(f"storage doctor: {'no problems' if not n else f'{n} problem' + ('s' if n > 1 else '')}",
          file=file)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m harness.doctor",
        description="Check the Optuna storage and the MLflow store (MLFLOW_TRACKING_URI) before a sweep: "
                    "reachable, schema ready, SQLite not used with several workers, no stale RUNNING "
                    "trials. Exit status 2 when there are problems. Writes nothing. "
                    "Also: python -m harness.sweep [SPEC] [options] --check-storage.")
    p.add_argument("spec", nargs="?", help="the sweep's spec: only its study's trials are looked at "
                                           "(default: every study in the storage)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="the sweep's spec overrides")
    p.add_argument("--storage", help="Optuna storage URL or journal file (default mlruns/optuna.journal)")
    p.add_argument("--workers", type=int, default=1, help="workers the sweep will run on this machine")
    p.add_argument("--study", help="only look at this study's trials")
    p.add_argument("--heartbeat", type=int, default=None, metavar="S",
                   help="the sweep's heartbeat interval; stale after 3x (default "
                        f"{HEARTBEAT_INTERVAL_S}, i.e. {GRACE_PERIOD_S} s)")
    p.add_argument("--grace-period", type=int, default=None, metavar="S",
                   help="seconds without heartbeat before a RUNNING trial is stale")
    p.add_argument("--stale-after", type=int, default=STALE_AFTER_S, metavar="S",
                   help="a RUNNING trial without heartbeat whose worker cannot be checked from here is "
                        f"reported after S seconds (default {STALE_AFTER_S})")
    # The sweep's other options, so `python -m harness.sweep ... --check-storage` can hand over its argv.
    for opt in ("--n-trials", "--timeout", "--pruner", "--sampler", "--worker-index"):
        p.add_argument(opt, help=argparse.SUPPRESS)
    for flag in ("--retry-failed", "--quiet"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    args = p.parse_intermixed_args(argv)
    if args.spec is not None and "=" in args.spec and not args.spec.endswith((".yaml", ".yml")):
        args.overrides.insert(0, args.spec)
        args.spec = None
    if args.grace_period is None:
        args.grace_period = 3 * args.heartbeat if args.heartbeat else GRACE_PERIOD_S
    return args


def _study_of(spec_path: str, overrides: list[str]) -> str | None:
    """The study a sweep of this spec uses by default (``<spec name>-<spec hash>``)."""
    from harness.spec import load_spec
    from harness.study import default_study_name

    return default_study_name(load_spec(spec_path, overrides))


def main(argv: list[str] | None = None) -> int:
    """``python -m harness.doctor``; returns 0 (all well) or 2 (problems)."""
    args = parse_args(argv)
    import logging

    from harness.cli import setup_logging, user_errors

    setup_logging()
    logging.getLogger("sqlalchemy").setLevel(logging.ERROR)
    with user_errors("harness.doctor"):
        study = args.study or (_study_of(args.spec, args.overrides) if args.spec else None)
        report = check(args.storage, workers=args.workers, study=study, grace_period=args.grace_period,
                       stale_after=args.stale_after)
    print_report(report)
    return 2 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
