"""The storage doctor on local stores (no server): one clear line per problem, exit 2, nothing written.
The same checks against real PostgreSQL and an mlflow server are in test_postgres.py."""
from __future__ import annotations

import contextlib
import platform
import socket
import sqlite3
import pytest

from conftest import run_cli
from harness.sweep import doctor

pytestmark = pytest.mark.filterwarnings("ignore")  # Optuna's "experimental" heartbeat, SQLAlchemy deprecations


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quiet_optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def test_fresh_project_is_fine_and_nothing_is_created(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "mlruns").mkdir()
    r = doctor.check(workers=2)
    assert r.problems == [] and r.warnings == []
    assert any("optuna.journal: not created yet" in line for line in r.ok)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlruns"]
    assert list((tmp_path / "mlruns").iterdir()) == []


def test_cli_exit_status_and_one_line_per_problem(tmp_path):
    port = _free_port()
    out = run_cli("harness.doctor", "--storage", f"sqlite:///{tmp_path}/optuna.db", "--workers", "3",
                  cwd=tmp_path, env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}, timeout=60)
    assert out.returncode == 2, out.stderr
    problems = [line for line in out.stdout.splitlines() if line.startswith("problem: ")]
    assert len(problems) == 2, out.stdout
    assert "SQLite with --workers 3" in problems[0]
    assert f"http://127.0.0.1:{port}" in problems[1] and "not reachable" in problems[1]
    assert out.stdout.rstrip().endswith("storage doctor: 2 problems")
    assert "Traceback" not in out.stderr


def test_cli_ok(tmp_path):
    (tmp_path / "mlruns").mkdir()
    out = run_cli("harness.doctor", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": ""}, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "storage doctor: no problems" in out.stdout


def test_unreachable_database_is_one_line_with_the_password_masked(tmp_path):
    port = _free_port()
    url = f"postgresql+psycopg2://alice:hunter2-secret@127.0.0.1:{port}/optuna"
    r = doctor.check(url, f"sqlite:///{tmp_path}/mlflow.db")
    assert len(r.problems) == 1
    assert "not reachable" in r.problems[0] and "alice:***@" in r.problems[0]
    assert "hunter2" not in repr(r)
    assert any("local to this machine" in w for w in r.warnings)  # shared Optuna, local MLflow


def test_old_file_store_is_a_problem(tmp_path):
    r = doctor.check_mlflow(str(tmp_path / "mlruns"))
    assert len(r.problems) == 1 and "file store" in r.problems[0]


def test_optuna_schema_too_old_names_the_upgrade_command(tmp_path):
    optuna = _quiet_optuna()
    url = f"sqlite:///{tmp_path}/optuna.db"
    optuna.create_study(storage=url, study_name="s")
    with sqlite3.connect(tmp_path / "optuna.db") as c:
        c.execute("UPDATE alembic_version SET version_num = 'v3.0.0.a'")
    r = doctor.check_optuna(url)
    assert len(r.problems) == 1
    assert "schema version v3.0.0.a" in r.problems[0] and "optuna storage upgrade" in r.problems[0]


def test_one_database_for_both_tools_is_a_problem(tmp_path):
    from mlflow import MlflowClient

    url = f"sqlite:///{tmp_path}/both.db"
    MlflowClient(url).search_experiments()  # creates MLflow's tables
    r = doctor.check_optuna(url)
    assert len(r.problems) == 1 and "MLflow's tables" in r.problems[0]


def test_stale_heartbeat_trial_is_reported(tmp_path):
    optuna = _quiet_optuna()
    url = f"sqlite:///{tmp_path}/optuna.db"
    storage = optuna.storages.RDBStorage(url, heartbeat_interval=1)
    study = optuna.create_study(storage=storage, study_name="hb")
    alive, dead = study.ask(), study.ask()
    study.tell(study.ask(), 1.0)
    storage.record_heartbeat(alive._trial_id)
    storage.record_heartbeat(dead._trial_id)
    with sqlite3.connect(tmp_path / "optuna.db") as c:  # the dead worker's last beat: an hour ago
        c.execute("UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, '-1 hour') "
                  "WHERE trial_id = ?", (dead._trial_id,))
    storage.engine.dispose()
    r = doctor.check_optuna(url, study="hb")
    assert len(r.problems) == 1, r
    assert f"trial {dead.number} is RUNNING" in r.problems[0] and "heartbeat stopped" in r.problems[0]


def test_running_journal_trial_of_a_dead_local_worker_is_reported(tmp_path):
    """The sweep records its worker (host, pid, process start time) on each trial, as here."""
    import os

    import psutil

    optuna = _quiet_optuna()
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = tmp_path / "optuna.journal"
    storage = JournalStorage(JournalFileBackend(str(path)))
    study = optuna.create_study(storage=storage, study_name="j")
    mine, gone, elsewhere = study.ask(), study.ask(), study.ask()
    me = {"host": platform.node(), "pid": os.getpid(), "started": psutil.Process().create_time()}
    mine.set_user_attr("worker", me)
    gone.set_user_attr("worker", {**me, "started": me["started"] - 1000})  # the pid was reused
    elsewhere.set_user_attr("worker", {**me, "host": "another-machine"})
    r = doctor.check_optuna(str(path))
    assert len(r.problems) == 1, r
    assert f"trial {gone.number} is RUNNING" in r.problems[0] and "is gone" in r.problems[0]
    # A trial of another machine's worker is only reported once it is very old.
    r = doctor.check_optuna(str(path), stale_after=0)
    assert [f"trial {t.number} is RUNNING" in " ".join(r.problems) for t in (mine, gone, elsewhere)] \
        == [False, True, True]


@pytest.mark.parametrize("workers", [1, 4])
def test_journal_with_workers_is_fine(tmp_path, workers):
    r = doctor.check_optuna(str(tmp_path / "optuna.journal"), workers=workers)
    assert r.problems == []


def test_sweep_check_storage_runs_the_doctor(tmp_path):
    """`python -m harness.sweep ... --check-storage`: the doctor on the sweep's stores and study."""
    bad = run_cli("harness.sweep", "--check-storage", "--storage", f"sqlite:///{tmp_path}/o.db",
                  "--workers", "2", "train.epochs=3", cwd=tmp_path,
                  env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}, timeout=120)
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "problem: " in bad.stdout and "SQLite with --workers 2" in bad.stdout
    (tmp_path / "mlruns").mkdir()
    good = run_cli("harness.sweep", "--check-storage", "--workers", "2", cwd=tmp_path,
                   env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}, timeout=120)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "storage doctor: no problems" in good.stdout
    assert not (tmp_path / "mlflow.db").exists()  # the doctor writes nothing


@pytest.fixture(scope="module")
def http_servers(tmp_path_factory):
    """Two real servers of tests/http_app.py, {kind: URL}: "quick", uvicorn (TCP_NODELAY); "late", one
    whose sockets keep Nagle's algorithm, as uvicorn's multi-worker ones did before 0.55."""
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    here = Path(__file__).parent
    procs, urls = [], {}
    log = tmp_path_factory.mktemp("servers")
    try:
        for kind in ("quick", "late"):
            port = _free_port()
            cmd = [sys.executable, "-m", "uvicorn", "http_app:app", "--app-dir", str(here), "--host", "127.0.0.1",
                   "--port", str(port), "--log-level", "warning"] if kind == "quick" else \
                [sys.executable, str(here / "http_app.py"), str(port)]
            procs.append(subprocess.Popen(cmd, stdout=open(log / f"{kind}.log", "w"), stderr=subprocess.STDOUT,
                                          start_new_session=True))
            urls[kind] = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        for kind, url in urls.items():
            while True:
                try:
                    urllib.request.urlopen(url + "/health", timeout=2).read()
                    break
                except OSError:
                    assert time.monotonic() < deadline, (log / f"{kind}.log").read_text()
                    time.sleep(0.2)
        yield urls
    finally:
        import os
        import signal

        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=30)


def test_the_delay_of_a_server_whose_sockets_lack_tcp_nodelay_is_found(http_servers):
    """A server whose sockets keep Nagle's algorithm (uvicorn with --workers 2 before 0.55; mlflow server's
    default is 4) answers every request on a kept-alive connection after the client's delayed ACK, ~40 ms;
    uvicorn with TCP_NODELAY does not. The doctor says so in one warning line, and what to do."""
    from harness.tracking import store

    assert store.keepalive_delay(http_servers["late"]) > 0.03
    line = store.slow_keepalive(http_servers["late"])
    assert line is not None and "--workers 1" in line and "TCP_NODELAY" in line and "\n" not in line
    assert "new connection for each request" in line
    r = doctor.check_mlflow(http_servers["late"])
    assert r.problems == [] and len(r.warnings) == 1 and "kept-alive" in r.warnings[0], r
    # One worker: no delay. The least of three probes, so that a busy machine's hiccup is not a finding.
    assert min(store.keepalive_delay(http_servers["quick"]) for _ in range(3)) < 0.02
    assert doctor.check_mlflow(http_servers["quick"]).warnings == []


def test_a_local_store_or_a_dead_server_is_not_probed():
    from harness.tracking import store

    assert store.slow_keepalive("sqlite:///mlflow.db") is None
    assert store.slow_keepalive(f"http://127.0.0.1:{_free_port()}") is None


_PORTS = """
import os, sys
from mlflow.utils.rest_utils import MlflowHostCreds, http_request
from harness.tracking import store
store.setup_mlflow()  # probes the server once, as every command does
creds = MlflowHostCreds(os.environ["MLFLOW_TRACKING_URI"])
print(os.environ.get("HARNESS_MLFLOW_NEW_CONNECTIONS"), *(http_request(creds, "/p", "GET").text for _ in range(4)))
"""


@pytest.mark.parametrize("kind, preset, new_connections", [("late", None, True), ("quick", None, False),
                                                           ("late", "0", False)])
def test_requests_open_a_new_connection_only_against_a_server_that_delays_kept_alive_ones(
        http_servers, tmp_path, kind, preset, new_connections):
    """MLflow's own ``http_request`` in a new process pointed at the server: against the late server
    each request comes from a new client port (``Connection: close`` from the harness's MLflow
    plugin, registered by pyproject.toml's entry point), with one warning line at the start; against
    uvicorn, or when the user set ``HARNESS_MLFLOW_NEW_CONNECTIONS=0``, one kept-alive connection."""
    env = {"MLFLOW_TRACKING_URI": http_servers[kind]}
    if preset is not None:
        env["HARNESS_MLFLOW_NEW_CONNECTIONS"] = preset
    import os
    import subprocess
    import sys

    from conftest import ROOT

    out = subprocess.run([sys.executable, "-c", _PORTS], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=120)
    assert out.returncode == 0, out.stderr
    flag, *ports = out.stdout.split()
    assert flag == ("1" if new_connections else "0")
    assert len(set(ports)) == (4 if new_connections else 1), ports
    warned = [line for line in out.stderr.splitlines() if "kept-alive" in line]
    assert len(warned) == (1 if new_connections else 0), out.stderr
