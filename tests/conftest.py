"""Shared fixtures: every test that touches MLflow gets its own temporary store (no network, ever)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# One torch thread in every test run, in this process and the CLI runs it starts (a subprocess inherits
# it): tests are small, and a machine busy with other jobs slows several threads far more than one.
# (A user's OMP_NUM_THREADS wins, as in the harness; tests/test_threads.py checks the policy itself.)
# Then the policy's wait policy in this process too, before any test module imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")
from harness.core.device import prepare_threads  # noqa: E402  (imports no torch)

prepare_threads()

# MLflow's own switch: no system-metrics sampler thread in the tests' runs, nor in the CLI runs they
# start (a subprocess inherits it). A test that checks system metrics turns it back on.
os.environ["MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"] = "false"


@pytest.fixture(autouse=True)
def _tracking_server_probed_per_test():
    """The harness records its probe of a tracking server in HARNESS_MLFLOW_NEW_CONNECTIONS for the
    command's child processes: one test's server must not decide for the next test's."""
    before = os.environ.pop("HARNESS_MLFLOW_NEW_CONNECTIONS", None)
    yield
    os.environ.pop("HARNESS_MLFLOW_NEW_CONNECTIONS", None)
    if before is not None:
        os.environ["HARNESS_MLFLOW_NEW_CONNECTIONS"] = before


# Tiny, fast settings for the offline digits set: a handful of quick epochs.
TINY = ["train.epochs=2", "train.log_model=false", "train.sanity_check=false", "guard=warn"]


def tiny_digits_spec(*extra: str):
    """The digits spec cut to a run of a few seconds in process: TINY, no checkpoints, 300 examples."""
    from harness.spec import load_spec

    return load_spec(str(ROOT / "experiments" / "digits_lenet.yaml"),
                     TINY + ["train.checkpoint=false", "data.limit_train=300", *extra])


@pytest.fixture()
def store(tmp_path, monkeypatch):
    """A fresh MLflow store + working directory (so mlruns/ and checkpoints land in tmp_path)."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()


def run_cli(module: str, *args: str, cwd: Path, env: dict | None = None, timeout: float = 300,
            **kw) -> subprocess.CompletedProcess:
    """``python -m module args`` in ``cwd`` with the test's environment, output captured as text."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout, **kw)


def all_runs(uri: str, experiment: str | None = None):
    """Every run in the store (all experiments unless one is named), as MLflow Run objects."""
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    exps = [e.experiment_id for e in c.search_experiments()
            if experiment is None or e.name == experiment]
    return c.search_runs(exps, max_results=10_000) if exps else []


@pytest.fixture(scope="session")
def _migrated_mlflow_db(tmp_path_factory) -> Path:
    """An empty MLflow SQLite database with its schema already created (the migrations take ~3 s)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture()
def fast_store(store, tmp_path, _migrated_mlflow_db):
    """Like ``store``, but the SQLite file starts as a copy of an already-migrated empty database, so
    neither this process nor a CLI subprocess pays for MLflow's schema migrations again."""
    import shutil

    shutil.copyfile(_migrated_mlflow_db, tmp_path / "mlflow.db")
    return store
