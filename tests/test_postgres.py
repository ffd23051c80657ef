"""The scale-out path against real servers: PostgreSQL for Optuna and an `mlflow server` backed by
PostgreSQL, as `scripts/servers.sh start` sets them up (CI: `.ci/run`). Every test is marked
`postgres` and needs the environment that `eval "$(scripts/servers.sh env)"` exports:

    HARNESS_PG_URL         the Optuna database, e.g. postgresql+psycopg2://harness@127.0.0.1:5433/harness_optuna
    HARNESS_MLFLOW_URL     the shared tracking server, e.g. http://127.0.0.1:5055
    HARNESS_MLFLOW_DB_URL  its backend database (tests that stop a server start their own on it)
    PGPASSFILE             the password file libpq reads (no password in any URL)
    HARNESS_SERVERS_DIR    the servers' state (scripts/servers.sh restart-postgres uses it)

    python -m pytest -m postgres
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from conftest import ROOT, TINY, run_cli

pytestmark = [pytest.mark.postgres, pytest.mark.filterwarnings("ignore")]

SPEC = str(ROOT / "experiments" / "digits_lenet.yaml")
SERVERS = ROOT / "scripts" / "servers.sh"
NEEDED = ("HARNESS_PG_URL", "HARNESS_MLFLOW_URL", "HARNESS_MLFLOW_DB_URL", "PGPASSFILE")


@pytest.fixture(scope="session")
def servers() -> dict[str, str]:
    """The servers' URLs; fails (never skips) when they are missing: a CI run of `-m postgres`
    without servers must not pass."""
    missing = [k for k in NEEDED if not os.environ.get(k)]
    if missing:
        pytest.fail(f"{', '.join(missing)} not set: start the servers with "
                    f"eval \"$(scripts/servers.sh start)\" before python -m pytest -m postgres")
    env = {k: os.environ[k] for k in NEEDED}
    _wait_http(env["HARNESS_MLFLOW_URL"] + "/health", 60)
    return env


@pytest.fixture()
def server_env(servers, tmp_path, monkeypatch) -> dict[str, str]:
    """This process and its CLI subprocesses log to the shared tracking server, from tmp_path."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", servers["HARNESS_MLFLOW_URL"])
    mlflow.set_tracking_uri(servers["HARNESS_MLFLOW_URL"])
    yield {"MLFLOW_TRACKING_URI": servers["HARNESS_MLFLOW_URL"], "PGPASSFILE": servers["PGPASSFILE"]}
    while mlflow.active_run() is not None:
        mlflow.end_run()


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {seconds}s")


def _pg_password() -> str:
    line = Path(os.environ["PGPASSFILE"]).read_text().splitlines()[0]
    return line.split(":", 4)[4]


class MlflowServer:
    """A private `mlflow server` on the shared backend database, which a test may stop and restart."""

    def __init__(self, db_url: str, artifacts: Path, log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db_url, self.artifacts, self.log = db_url, artifacts, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> "MlflowServer":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.db_url,
             "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        _wait_http(self.url + "/health", 120)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


@pytest.fixture()
def own_server(servers, tmp_path):
    srv = MlflowServer(servers["HARNESS_MLFLOW_DB_URL"], tmp_path / "artifacts", tmp_path / "mlflow.log")
    srv.start()
    yield srv
    srv.stop()


def _history(client, run_id: str, key: str = "val/acc") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _wait_for_epochs(client, experiment: str, n: int, proc: subprocess.Popen, seconds: float = 180):
    """The run id of the only run in ``experiment`` once it has logged ``n`` epochs."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs and len(_history(client, runs[0].info.run_id)) >= n:
            return runs[0].info.run_id
        time.sleep(0.3)
    raise AssertionError(f"no run in {experiment} reached {n} epochs in {seconds}s")


# -- the servers themselves ---------------------------------------------------------------------------

def test_doctor_is_happy_with_the_servers(servers, tmp_path):
    # Scoped to a new study: other tests leave stale trials behind on purpose.
    out = run_cli("harness.doctor", "--storage", servers["HARNESS_PG_URL"], "--workers", "3",
                  "--study", _unique("doctor-ok"), cwd=tmp_path,
                  env={"MLFLOW_TRACKING_URI": servers["HARNESS_MLFLOW_URL"]}, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "problem:" not in out.stdout
    assert "reachable, schema ready" in out.stdout or "reachable, empty" in out.stdout, out.stdout
    assert "tracking server reachable, its backend store answers" in out.stdout


def test_doctor_reports_a_stopped_tracking_server_and_a_wrong_password(servers, own_server, tmp_path):
    own_server.stop()
    bad = servers["HARNESS_PG_URL"].replace("harness@", "harness:not-the-password@")
    out = run_cli("harness.doctor", "--storage", bad, cwd=tmp_path,
                  env={"MLFLOW_TRACKING_URI": own_server.url}, timeout=60)
    assert out.returncode == 2
    problems = [line for line in out.stdout.splitlines() if line.startswith("problem:")]
    assert len(problems) == 2, out.stdout
    assert "password authentication failed" in problems[0] and "harness:***@" in problems[0]
    assert own_server.url in problems[1] and "not reachable" in problems[1]
    assert "not-the-password" not in out.stdout + out.stderr


def test_doctor_finds_a_stale_running_trial_in_postgres(servers):
    import optuna

    from harness import doctor

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(servers["HARNESS_PG_URL"], heartbeat_interval=1)
    name = _unique("doctor-stale")
    study = optuna.create_study(storage=storage, study_name=name)
    trial = study.ask()
    storage.record_heartbeat(trial._trial_id)
    time.sleep(3)
    r = doctor.check_optuna(servers["HARNESS_PG_URL"], study=name, grace_period=2)
    assert len(r.problems) == 1 and f"trial {trial.number} is RUNNING" in r.problems[0], r
    study.tell(trial, 1.0)
    assert doctor.check_optuna(servers["HARNESS_PG_URL"], study=name, grace_period=2).problems == []


# -- one run on the tracking server -------------------------------------------------------------------

def test_run_killed_and_resumed_through_the_tracking_server(server_env, tmp_path):
    """A run logs everything to the server (artifacts through its proxy); SIGKILLed mid-run, it is
    continued with --resume, which loads the checkpoint back from the server (weights_only)."""
    from mlflow import MlflowClient

    name = _unique("pg-run")
    args = [SPEC, *TINY, "train.epochs=12", f"name={name}", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "harness.train", *args], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **server_env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = MlflowClient()
    run_id = _wait_for_epochs(client, name, 3, proc)
    proc.kill()
    proc.wait()
    run = client.get_run(run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert {"optimizer.lr", "model.dropout", "seed"} <= set(run.data.params)
    assert "checkpoints/last.pt" in {f.path for f in client.list_artifacts(run_id, "checkpoints")}
    out = run_cli("harness.train", *args, "--resume", run_id, cwd=tmp_path, env=server_env)
    assert out.returncode == 0, out.stderr
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "resumed_from_epoch" in run.data.tags
    assert set(_history(client, run_id)) == set(range(1, 13))
    assert "test/acc" in run.data.metrics


def test_tracking_server_back_within_the_retry_window_the_run_goes_on(servers, own_server, tmp_path):
    """The tracking server stops mid-run and comes back 8 s later: MLflow's client retries, the run
    finishes FINISHED with every epoch logged, nothing lost."""
    from mlflow import MlflowClient

    name = _unique("pg-blip")
    env = {"MLFLOW_TRACKING_URI": own_server.url, "PGPASSFILE": servers["PGPASSFILE"]}
    proc = subprocess.Popen([sys.executable, "-m", "harness.train", SPEC, *TINY, "train.epochs=12",
                             "train.checkpoint=false", f"name={name}", "--quiet"], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = MlflowClient(own_server.url)
    run_id = _wait_for_epochs(client, name, 3, proc)
    own_server.stop()
    time.sleep(8)
    own_server.start()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert _history(client, run_id) == list(range(1, 13))
    assert "test/acc" in run.data.metrics


def test_tracking_server_gone_the_run_fails_clearly_and_keeps_what_was_logged(servers, own_server,
                                                                               tmp_path):
    """The tracking server stops mid-run and stays down (retries shortened for the test): the run
    ends with one clear line naming the server and how to continue, exit status 2, no traceback;
    once the server is back, every epoch logged before the stop is there and --resume finishes it."""
    from mlflow import MlflowClient

    name = _unique("pg-gone")
    env = {"MLFLOW_TRACKING_URI": own_server.url, "PGPASSFILE": servers["PGPASSFILE"],
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    args = [SPEC, *TINY, "train.epochs=12", f"name={name}", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "harness.train", *args], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = MlflowClient(own_server.url)
    run_id = _wait_for_epochs(client, name, 3, proc)
    logged = _history(client, run_id)
    own_server.stop()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("harness.train: error: ") and own_server.url in last, err
    assert "--resume " + run_id in last, last

    own_server.start()
    kept = _history(client, run_id)
    assert kept[:len(logged)] == logged and kept == list(range(1, len(kept) + 1))  # nothing lost
    out = run_cli("harness.train", *args, "--resume", run_id, cwd=tmp_path,
                  env={"MLFLOW_TRACKING_URI": own_server.url, "PGPASSFILE": servers["PGPASSFILE"]},
                  timeout=300)
    assert out.returncode == 0, out.stderr
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert set(_history(client, run_id)) == set(range(1, 13))
