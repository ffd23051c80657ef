"""Where MLflow keeps runs: the local default or a tracking server.

The local default follows MLflow's own convention, so a plain ``mlflow ui`` at the project root shows
everything: runs in ``sqlite:///mlflow.db``, artifacts under ``mlruns/``. ``MLFLOW_TRACKING_URI``
overrides it. (The Optuna side of a sweep is ``harness.sweep.storage``.)
"""
from __future__ import annotations

import logging
import os
import urllib.parse
import urllib.request
from pathlib import Path

from harness.errors import StoreError, TrackingServerGone, first_line, mask_url
from harness.tracking.sqlite_files import check_sqlite_file, create_once, sqlite_path

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
ARTIFACTS_DIR = "mlruns"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mssql", "http", "https", "databricks")


def check_tracking_uri(uri: str) -> None:
    """Refuse, in one line, a tracking URI that cannot work, before MLflow makes anything of it."""
    shown = f"MLFLOW_TRACKING_URI={mask_url(uri)}"
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    if scheme in ("", "file"):
        raise StoreError(f"{shown}: MLflow's old file store is not supported (MLflow 3.13+ refuses it); use "
                         f"sqlite:///mlflow.db (the default) or a tracking server http://...")
    if scheme not in _SCHEMES:
        raise StoreError(f"{shown}: unknown scheme {scheme!r}; use sqlite:///PATH, postgresql://..., "
                         f"mysql://... or http(s)://HOST (a tracking server)")
    if scheme == "sqlite":
        db = sqlite_path(uri)
        if db is None:
            raise StoreError(f"{shown}: names no file (an in-memory store loses every run as the command "
                             f"ends); use sqlite:///mlflow.db (the default) or sqlite:///PATH")
        check_sqlite_file(db, shown, "SQLite database")
    elif scheme not in ("http", "https", "databricks") and uri not in _answered:
        _check_database(uri, shown)
        _answered.add(uri)


_answered: set[str] = set()  # database URIs checked by this process (a sweep builds a tracker per trial)


def _check_database(uri: str, shown: str) -> None:
    """A database URI: the driver it names (or SQLAlchemy's default for its database) is installed, and
    the database answers (one connection, ~10 ms on this machine)."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

    try:
        make_url(uri).get_dialect().import_dbapi()
    except (ImportError, NoSuchModuleError) as e:
        hint = "pip install 'psycopg[binary]' or write postgresql+psycopg2://..." if uri.startswith("postgres") \
            else "install its driver"
        raise StoreError(f"{shown}: missing database driver ({first_line(e)}); {hint}") from None
    except ArgumentError as e:
        raise StoreError(f"{shown}: not a database URL ({first_line(e)})") from None
    timeout = {"connect_timeout": 10} if uri.startswith(("postgres", "mysql")) else {}
    engine = create_engine(uri, connect_args=timeout)
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as e:
        raise StoreError(f"{shown}: the database does not answer ({first_line(e.orig or e)}); start it, or check "
                         f"the host, port, user and password") from None
    finally:
        engine.dispose()


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


def keepalive_delay(uri: str, n: int = 5) -> float:
    """Seconds a request to tracking server ``uri`` waits on a kept-alive connection beyond one on a new
    connection (medians of ``n`` ``/health`` requests each). About 0.04 where the server's sockets lack
    TCP_NODELAY: uvicorn before 0.55 with ``--workers`` above 1, which ``mlflow server`` runs by default
    (4), bound its socket so that asyncio left Nagle's algorithm on (uvicorn issue #3149); each
    response's last segment then waits for the client's delayed ACK, 40 ms on Linux, at every request after a
    connection's first."""
    import statistics
    import time

    import requests

    url = split_credentials(uri)[0].rstrip("/") + "/health"

    def median_s(get) -> float:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            get().raise_for_status()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    with requests.Session() as s:
        s.get(url, timeout=5)  # opens the connection the timed requests reuse
        kept = median_s(lambda: s.get(url, timeout=5))
    fresh = median_s(lambda: requests.get(url, timeout=5, headers={"Connection": "close"}))
    return kept - fresh


def slow_keepalive(uri: str, threshold_s: float = 0.02) -> str | None:
    """One line when tracking server ``uri`` delays requests on kept-alive connections (see
    :func:`keepalive_delay`), else None (also for local stores, and when the probe cannot run)."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        delay = keepalive_delay(uri)
        if delay >= threshold_s:  # measured again: a busy machine's hiccup is not a finding
            delay = min(delay, keepalive_delay(uri))
    except Exception:  # unreachable or refusing /health: other checks say so
        return None
    if delay < threshold_s:
        return None
    return (f"the tracking server {mask_url(uri)} answers every request on a kept-alive connection "
            f"{1000 * delay:.0f} ms late (its sockets run without TCP_NODELAY: e.g. `mlflow server "
            f"--workers N` with N > 1 on uvicorn before 0.55, uvicorn issue #3149); the harness opens a new "
            f"connection for each request instead; across a network, better: start it with --workers 1, as "
            f"scripts/servers.sh does")


def choose_connections(uri: str) -> None:
    """Once per command (its worker processes inherit the answer): against a tracking server that
    answers kept-alive connections late, MLflow's requests each open a new one
    (:mod:`harness.tracking.connections`). ``HARNESS_MLFLOW_NEW_CONNECTIONS`` set by the user wins."""
    from harness.tracking.connections import ENV

    if not uri.startswith(("http://", "https://")) or ENV in os.environ:
        return
    slow = slow_keepalive(uri)
    os.environ[ENV] = "1" if slow else "0"
    if slow:
        logging.getLogger("harness.tracking").warning("%s", slow)


def tracking_server_down() -> bool:
    """True when the tracking URI is a server that does not answer /health now (a local store: never)."""
    try:
        check_tracking_server(tracking_uri(), timeout=3)
    except StoreError:
        return True
    return False


def server_gone_error(doing: str, then: str = "run the same command again") -> TrackingServerGone:
    return TrackingServerGone(f"the tracking server {mask_url(tracking_uri())} stopped answering {doing}; "
                              f"once it is back, {then}")


def setup_mlflow() -> str:
    """Point MLflow at the configured store (checked reachable) and return its URI."""
    import mlflow

    uri = tracking_uri()
    check_tracking_uri(uri)
    check_tracking_server(uri)
    choose_connections(uri)
    if "DATABRICKS_RUNTIME_VERSION" not in os.environ:
        # Off Databricks, MLflow's lookup of a Databricks job to resume imports IPython at every
        # start_run (~0.5 s of each command's start-up) to find nothing.
        os.environ.setdefault("MLFLOW_ENABLE_SGC_RUN_RESUMPTION_FOR_DATABRICKS_JOBS", "false")
    # MLflow reads a run back from a tracking server at its end only to print a "View run" link: a
    # request per run (a sweep's trial pays it on its critical path); the commands print where to browse.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    bare, user, password = split_credentials(uri)
    if password is not None:
        # MLflow's own way to pass them; the URI it prints ("View run at ...") and puts in its error
        # messages then carries no password.
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", user or "")
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", password)
    mlflow.set_tracking_uri(bare)
    return uri


def require_existing(uri: str) -> None:
    """For commands that only read: a local store that does not exist yet is one line, not a new empty
    database (MLflow creates one on first contact)."""
    db = sqlite_path(uri) if uri.startswith("sqlite") else None
    if db is not None and not db.exists():
        raise StoreError(f"MLFLOW_TRACKING_URI={mask_url(uri)}: no MLflow store at {db} (nothing was run "
                         f"here yet); run from the folder you trained in, or set MLFLOW_TRACKING_URI")


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """An ``http(s)://user:password@host`` URI -> (the URI without them, user, password)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or parts.password is None:
        return uri, None, None
    bare = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return bare, urllib.parse.unquote(parts.username or ""), urllib.parse.unquote(parts.password)


_known: dict[tuple[str, str, str], str] = {}  # (tracking URI, cwd, experiment name) -> id, in this process


def experiment_id(name: str, *, again: bool = False) -> str:
    """The id of experiment ``name``, created if missing (artifacts under ./mlruns for local stores).
    Safe when several processes create it at once. Looked up once per process (each lookup is a request
    to a tracking server: once per trial otherwise); ``again``: look it up anew, as when a run could not
    be created in the id known (the experiment was deleted since)."""
    key = (tracking_uri(), os.getcwd(), name)  # a relative sqlite:/// path depends on the cwd
    if again or key not in _known:
        _known[key] = _lookup_experiment(name)
    return _known[key]


def _lookup_experiment(name: str) -> str:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    create_once(tracking_uri())
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


def mlflow_ui_command() -> str:
    """How to see this store's runs: a server is already a UI; a local store needs ``mlflow ui``."""
    uri = mask_url(tracking_uri())
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser (the tracking server is the UI)"
    return f"mlflow ui --backend-store-uri {uri}  (then open http://127.0.0.1:5000)"


