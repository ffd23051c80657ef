"""Links into the MLflow UI: relative ones (``#/experiments/...``) for Markdown that MLflow itself renders
(a run's description), absolute ones for everything else (the terminal, Optuna's dashboard).

Every link opens the "Model training" side of MLflow 3's UI (``workflowType=machine_learning``): its
default, the GenAI side, shows no runs."""
from __future__ import annotations

import urllib.parse

from harness.tracking import store

LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store by default
ML_VIEW = "workflowType=machine_learning"


def ui_base() -> str:
    """The UI's address: a tracking server is its own UI; a local store is served by ``mlflow ui``."""
    uri = store.tracking_uri()
    if uri.startswith(("http://", "https://")):
        return store.split_credentials(uri)[0].rstrip("/")
    return LOCAL_UI


def run_path(experiment_id: str, run_id: str, artifact: str | None = None) -> str:
    """``#/experiments/<id>/runs/<run>`` (its artifact ``artifact`` opened in the Artifacts tab)."""
    tail = f"/artifacts/{artifact}" if artifact else ""
    return f"#/experiments/{experiment_id}/runs/{run_id}{tail}?{ML_VIEW}"


def runs_path(experiment_id: str, search_filter: str = "", order_by: str = "", ascending: bool = False) -> str:
    """The experiment's runs table, filtered (an MLflow filter string) and sorted (``metrics.`val/acc```)."""
    query = {"searchFilter": search_filter, **({"orderByKey": order_by, "orderByAsc": str(ascending).lower()}
                                              if order_by else {})}
    return (f"#/experiments/{experiment_id}/runs?"
            f"{urllib.parse.urlencode(query, quote_via=urllib.parse.quote)}&{ML_VIEW}")


def absolute(path: str) -> str:
    return f"{ui_base()}/{path}"
