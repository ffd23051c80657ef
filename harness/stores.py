"""Where MLflow and Optuna keep things: the local defaults or a server / database.

Local defaults follow MLflow's own convention, so a plain ``mlflow ui`` at the project root shows
everything: runs in ``sqlite:///mlflow.db``, artifacts under ``mlruns/``, Optuna studies in the journal
file ``mlruns/optuna.journal``. ``MLFLOW_TRACKING_URI`` and ``--storage`` override them.
"""
from __future__ import annotations

import os
import re
import urllib.parse
import urllib.request
from pathlib import Path

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
