"""Where MLflow and Optuna keep things: the local defaults or a server / database.

Local defaults follow MLflow's own convention, so a plain ``mlflow ui`` at the project root shows
everything: runs in ``sqlite:///mlflow.db``, artifacts under ``mlruns/``, Optuna studies in the journal
file ``mlruns/optuna.journal``. ``MLFLOW_TRACKING_URI`` and ``--storage`` override them.
"""
from __future__ import annotations

import contextlib
import os
import re
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator

from harness.spec import UserError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
ARTIFACTS_DIR = "mlruns"
DEFAULT_OPTUNA_JOURNAL = "mlruns/optuna.journal"


class StoreError(UserError):
    pass


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def mask_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (for logs, params and tags)."""
    # libpq and most drivers also take the password as a query parameter (?password=...).
    url = re.sub(r"([?&](?:password|passwd|pwd|pass)=)[^&#]*", r"\1***", url, flags=re.IGNORECASE)
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return re.sub(r"(//[^:/@]+:)[^@]*@", r"\1***@", url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


def check_tracking_server(uri: str, timeout: float = 5.0) -> None:
    """Fail fast with one clear line when an ``http(s)://`` tracking server does not answer
    (MLflow's own client would retry for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        bare = split_credentials(uri)[0]  # urllib cannot take user:password@ in a URL
        with urllib.request.urlopen(bare.rstrip("/") + "/health", timeout=timeout) as r:
            if r.status == 200:
                return
            problem = f"HTTP {r.status}"
    except Exception as e:  # URLError, timeout, connection refused
        problem = str(getattr(e, "reason", e))
    raise StoreError(f"MLFLOW_TRACKING_URI={mask_url(uri)}: tracking server not reachable ({problem}); "
                     f"start it (see README 'Scaling out') or unset MLFLOW_TRACKING_URI")


def tracking_server_down() -> bool:
    """True when the tracking URI is a server that does not answer /health now (a local store: never)."""
    try:
        check_tracking_server(tracking_uri(), timeout=3)
    except StoreError:
        return True
    return False


class TrackingServerGone(StoreError):
    """The tracking server stopped answering mid-command: MLflow can be told nothing more for now."""


def server_gone_error(doing: str, then: str = "run the same command again") -> TrackingServerGone:
    return TrackingServerGone(f"the tracking server {mask_url(tracking_uri())} stopped answering {doing}; "
                              f"once it is back, {then}")


def setup_mlflow() -> str:
    """Point MLflow at the configured store (checked reachable) and return its URI."""
    import mlflow

    uri = tracking_uri()
    check_tracking_server(uri)
    bare, user, password = split_credentials(uri)
    if password is not None:
        # MLflow's own way to pass them; the URI it prints ("View run at ...") and puts in its error
        # messages then carries no password.
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", user or "")
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", password)
    mlflow.set_tracking_uri(bare)
    return uri


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """An ``http(s)://user:password@host`` URI -> (the URI without them, user, password)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or parts.password is None:
        return uri, None, None
    bare = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return bare, urllib.parse.unquote(parts.username or ""), urllib.parse.unquote(parts.password)


def experiment_id(name: str) -> str:
    """The id of experiment ``name``, created if missing (artifacts under ./mlruns for local stores).
    Safe when several processes create it at once."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = None
    if not tracking_uri().startswith(("http://", "https://", "databricks")):
        location = (Path(ARTIFACTS_DIR).resolve()).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # another process created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# -- Optuna storage --------------------------------------------------------------------------------
# The local default is one journal file that several processes on this machine append to under a lock.
# Any other value of --storage is either a journal file path (no "://") or an Optuna RDB URL
# (sqlite:///..., postgresql://..., mysql://...). RDB storages get Optuna's heartbeat, so a trial whose
# process died (on any machine) is failed after the grace period and handed to ``on_stale``.

HEARTBEAT_INTERVAL_S = 10
HEARTBEAT_GRACE_S = 30  # a RUNNING trial silent this long is stale (3 missed heartbeats)


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
    if optuna_storage_kind(url) == "sqlite" and workers > 1:
        raise StoreError(
            f"--storage {mask_url(url or '')} with --workers {workers}: SQLite takes one writer at a "
            f"time and Optuna's trials would fail with 'database is locked'; use the default journal "
            f"file (drop --storage), a journal file (--storage mlruns/study.journal) or PostgreSQL")


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
            path = Path(url or DEFAULT_OPTUNA_JOURNAL)
            path.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(journal.JournalFileBackend(str(path)))
        if kind == "redis":
            return optuna.storages.JournalStorage(journal.JournalRedisBackend(url))
        grace = grace_period or 3 * heartbeat_interval
        with _quiet_experimental():
            if on_stale is None:
                on_stale = optuna.storages.RetryHeartbeatStaleTrialCallback()
            from harness.dbretry import RetryingRDBStorage  # rides out a database restart

            return RetryingRDBStorage(
                url, heartbeat_interval=heartbeat_interval, grace_period=grace,
                heartbeat_stale_trial_callback=on_stale,
                engine_kwargs=_rdb_engine_kwargs(url))
    except ImportError as e:
        hint = ("pip install 'psycopg[binary]' or write postgresql+psycopg2://"
                if kind == "rdb" and url and url.startswith("postgres") else "install its driver")
        raise StoreError(f"--storage {shown}: missing database driver ({e}); {hint}") from None
    except (OSError, ValueError) as e:
        raise StoreError(f"--storage {shown}: cannot open it ({_first_line(e)})") from None
    except Exception as e:  # sqlalchemy OperationalError (unreachable, auth), redis ConnectionError
        raise StoreError(f"--storage {shown}: not reachable ({_first_line(e)}); check the URL and "
                         f"that the server is running") from None


def _rdb_engine_kwargs(url: str) -> dict:
    if url.startswith("sqlite"):
        # Wait for the lock instead of failing at once when a second process writes (one sweep at a
        # time per SQLite file is still the rule; this covers the summary/doctor reading beside it).
        return {"connect_args": {"timeout": 30}}
    return {"pool_pre_ping": True}  # a restarted database server: reconnect instead of failing


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return mask_url(text[0][:200]) if text else type(e).__name__


@contextlib.contextmanager
def _quiet_experimental() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*experimental.*")
        yield


@contextlib.contextmanager
def storage_lock(url: str | None) -> Iterator[None]:
    """A short exclusive section across every process that uses this Optuna storage: the sweep
    counts trials and reserves the next one inside it, so N workers end with exactly N trials.

    Journal files and SQLite: an ``flock`` on a file beside them (one machine). PostgreSQL: an
    advisory lock; MySQL: ``GET_LOCK``. Anything else: no lock (the sweep then re-checks its count
    after reserving)."""
    kind = optuna_storage_kind(url)
    if kind == "journal":
        path = Path(url or DEFAULT_OPTUNA_JOURNAL)
        with _file_lock(path.with_name(path.name + ".harness-lock")):
            yield
        return
    if kind == "sqlite":
        db = url.split(":///", 1)[1] if url and ":///" in url else ""
        if db and db != ":memory:":
            with _file_lock(Path(db).with_name(Path(db).name + ".harness-lock")):
                yield
            return
        yield
        return
    if kind == "rdb" and url and url.split("+", 1)[0].split(":", 1)[0] in ("postgresql", "postgres", "mysql"):
        with _db_lock(url):
            yield
        return
    yield


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Windows: no flock; the journal's own lock still keeps the file consistent
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


_LOCK_ENGINES: dict[str, object] = {}
_LOCK_KEY = 0x6861726E  # "harn": one advisory-lock id for every sweep on the database


@contextlib.contextmanager
def _db_lock(url: str) -> Iterator[None]:
    import sqlalchemy

    engine = _LOCK_ENGINES.get(url)
    if engine is None:
        engine = _LOCK_ENGINES[url] = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    if engine.dialect.name == "postgresql":  # type: ignore[attr-defined]
        from harness.dbretry import pg_advisory_lock  # taken through a database restart

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


def mlflow_ui_command() -> str:
    """How to see this store's runs: a server is already a UI; a local store needs ``mlflow ui``."""
    uri = mask_url(tracking_uri())
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser (the tracking server is the UI)"
    return f"mlflow ui --backend-store-uri {uri}  (then open http://127.0.0.1:5000)"


def optuna_dashboard_command(url: str | None) -> str:
    return f"optuna-dashboard {optuna_storage_display(url)}"
