"""Where MLflow keeps runs: the local default or a tracking server.

The local default follows MLflow's own convention, so a plain ``mlflow ui`` at the project root shows
everything: runs in ``sqlite:///mlflow.db``, artifacts under ``mlruns/``. ``MLFLOW_TRACKING_URI``
overrides it. (The Optuna side of a sweep is ``harness.sweep.storage``.)
"""
from __future__ import annotations

import os
import urllib.parse
import urllib.request
from pathlib import Path

from harness.errors import StoreError, TrackingServerGone, mask_url
from harness.locks import file_lock

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
ARTIFACTS_DIR = "mlruns"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


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
    _create_once(bare)
    return uri


_ready: set[str] = set()


def _create_once(uri: str) -> None:
    """Create (or migrate) a local SQLite store under a file lock: two commands started at once on a
    fresh store would otherwise both run MLflow's schema migration, and one dies in alembic."""
    if uri in _ready or not uri.startswith("sqlite:///"):
        return
    from mlflow import MlflowClient

    db = Path(uri[len("sqlite:///"):])
    with file_lock(db.with_name(db.name + ".harness-lock")):
        MlflowClient(uri).search_experiments(max_results=1)
    _ready.add(uri)


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


def mlflow_ui_command() -> str:
    """How to see this store's runs: a server is already a UI; a local store needs ``mlflow ui``."""
    uri = mask_url(tracking_uri())
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser (the tracking server is the UI)"
    return f"mlflow ui --backend-store-uri {uri}  (then open http://127.0.0.1:5000)"
