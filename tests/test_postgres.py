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
    """The run id of the only run in ``experiment`` once it has logged ``n`` epochs (the run must send
    every epoch: train.upload_every_s=0)."""
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

    from harness.sweep import doctor

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
    args = [SPEC, *TINY, "train.epochs=12", "train.upload_every_s=0", f"name={name}", "--quiet"]
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
                             "train.upload_every_s=0",
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
    args = [SPEC, *TINY, "train.epochs=12", "train.upload_every_s=0", f"name={name}", "--quiet"]
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


# -- sweeps: several workers, a killed worker, a restarted database -----------------------------------

# How a trial's MLflow run may end for each final Optuna state (harness/trials.py's table).
ALLOWED = {"COMPLETE": {"FINISHED"}, "PRUNED": {"FINISHED", "FAILED"}, "FAIL": {"FAILED", "KILLED"}}
SWEEP_TINY = ["train.epochs=3", "train.log_model=false", "train.sanity_check=false"]


def _sweep_cmd(servers, study: str, n: int, *extra: str, storage: str | None = None) -> list[str]:
    return [sys.executable, "-m", "harness.sweep", SPEC, *SWEEP_TINY, "--n-trials", str(n),
            "--study", study, "--storage", storage or servers["HARNESS_PG_URL"], "--quiet", *extra]


def _popen(cmd: list[str], cwd: Path, env: dict, log: Path, prefix: list[str] = ()) -> subprocess.Popen:
    return subprocess.Popen([*prefix, *cmd], cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _study(servers, name: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=servers["HARNESS_PG_URL"])


def _check_study_and_runs(servers, name: str, n: int):
    """Exactly ``n`` finished trials with unique numbers; one parent run; one child run per trial
    number, all under the parent, none RUNNING, each ended as its Optuna state allows."""
    from mlflow import MlflowClient

    study = _study(servers, name)
    trials = study.get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") + states.count("PRUNED") == n, states
    assert "RUNNING" not in states and "WAITING" not in states, states
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # no duplicate numbers

    client = MlflowClient(servers["HARNESS_MLFLOW_URL"])
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, filter_string=f"tags.`optuna.study` = '{name}'", max_results=1000)
    parents = [r for r in runs if "optuna.trial_number" not in r.data.tags]
    children = [r for r in runs if "optuna.trial_number" in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    parent = parents[0]
    assert parent.info.run_name == f"sweep:{name}"
    assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    assert all(c.data.tags.get("mlflow.parentRunId") == parent.info.run_id for c in children)
    numbers = [int(c.data.tags["optuna.trial_number"]) for c in children]
    assert len(numbers) == len(set(numbers)), sorted(numbers)
    by_number = dict(zip(numbers, children))
    for t in trials:
        run = by_number.get(t.number)
        if t.state.name in ("COMPLETE", "PRUNED"):
            assert run is not None, f"trial {t.number} has no MLflow run"
        if run is None:
            continue
        assert run.info.run_name in (f"trial-{t.number}", f"trial-{t.number} (pruned)")
        assert run.info.run_name.endswith("(pruned)") == (t.state.name == "PRUNED"), run.info.run_name
        assert run.data.tags["optuna.state"] == t.state.name, (t.number, run.data.tags)
        assert run.info.status in ALLOWED[t.state.name], (t.number, t.state.name, run.info.status)
        if t.user_attrs.get("mlflow_run_id"):
            assert t.user_attrs["mlflow_run_id"] == run.info.run_id
    assert all(r.info.status != "RUNNING" for r in runs)
    return study, trials, by_number, parent


def test_three_workers_on_two_machines_complete_exactly_n_trials(servers, server_env, tmp_path):
    """`--workers 2` here and one more worker "on another machine" (a second command against the same
    --storage and tracking server): 3 worker processes, one study, one parent run, exactly N trials."""
    name, n = _unique("pg-sweep3"), 9

    def cmd(*extra):  # trials of ~3 s: longer than a worker's start-up, so one cannot take them all
        c = _sweep_cmd(servers, name, n, *extra)
        c[c.index("train.epochs=3")] = "train.epochs=30"
        return c

    a = _popen(cmd("--workers", "2"), tmp_path, server_env, tmp_path / "a.log")
    b = _popen(cmd(), tmp_path, server_env, tmp_path / "b.log")
    assert a.wait(600) == 0, (tmp_path / "a.log").read_text()[-3000:]
    assert b.wait(600) == 0, (tmp_path / "b.log").read_text()[-3000:]
    study, trials, runs, parent = _check_study_and_runs(servers, name, n)
    assert len(trials) == n  # nothing failed, nothing lost
    workers = {(t.user_attrs["worker"]["host"], t.user_attrs["worker"]["pid"]) for t in trials}
    assert len(workers) >= 2, workers  # the trials really were shared (usually by all 3)
    assert parent.info.status == "FINISHED"
    for log in ("a.log", "b.log"):
        text = (tmp_path / log).read_text()
        assert "Traceback" not in text, text[-3000:]


def _other_machine() -> list[str]:
    """A prefix that runs a command under another host name (a UTS namespace), so this host cannot
    tell by pid that its worker died: only Optuna's heartbeat can. Empty when not permitted."""
    prefix = ["unshare", "--uts", "sh", "-c", 'hostname harness-other-machine && exec "$0" "$@"']
    try:
        ok = subprocess.run([*prefix, "hostname"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    return prefix if ok.returncode == 0 and ok.stdout.strip() == "harness-other-machine" else []


def test_commands_of_one_sweep_tag_its_parent_run_at_once(server_env):
    """The sweep commands of one study start together and each marks the parent run RUNNING with its
    sampler and pruner tags. The server's set_tag reads, then inserts: the second of two at once died on
    a duplicate key (found by the three-worker test above). Eight at once, ten times: all succeed."""
    import threading
    import types

    from mlflow import MlflowClient

    from harness.sweep import parent

    client = MlflowClient()
    exp = client.get_experiment_by_name("tags-at-once") or client.get_experiment(
        client.create_experiment("tags-at-once"))
    errors = []

    def mark(ctx, start) -> None:
        start.wait()
        try:
            parent.set_parent_status(ctx, "RUNNING")
        except Exception as e:
            errors.append(e)

    for _ in range(10):  # the race's window is a few milliseconds: ten new parent runs
        run_id = client.create_run(exp.experiment_id).info.run_id
        ctx = types.SimpleNamespace(parent_run_id=run_id, study_name="tags-at-once", sampler="tpe",
                                    pruner="median")
        start = threading.Barrier(8)
        threads = [threading.Thread(target=mark, args=(ctx, start)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == []
        run = client.get_run(run_id)
        assert run.info.status == "RUNNING"
        assert (run.data.tags["sweep.sampler"], run.data.tags["sweep.pruner"]) == ("tpe", "median")


def test_the_sweep_lock_keeps_one_connection_and_never_stays_held(servers):
    """The sweep's advisory lock reuses one pooled connection (a new one costs ~10 ms a trial) and is
    free again however its section ends: normally, on an error, on Ctrl-C, or when the server killed
    its session between two uses (the pool's pre-ping replaces it)."""
    import sqlalchemy

    from harness.sweep import storage as sto

    url = servers["HARNESS_PG_URL"]
    probe = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    holders = "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objid = :k AND granted"
    key = {"k": sto._LOCK_KEY}

    def holder() -> list[int]:
        with probe.connect() as c:
            return [r[0] for r in c.execute(sqlalchemy.text(holders), key)]

    def free() -> bool:  # another session can take the lock at once
        with probe.connect() as c:
            got = c.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(:k)"), key).scalar()
            if got:
                c.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), key)
            return bool(got)

    pids = []
    for _ in range(3):
        with sto.storage_lock(url):
            pids.append(holder())
        assert free()
    assert len(pids[0]) == 1 and pids[0] == pids[1] == pids[2]  # one session, kept
    for error in (RuntimeError("a bug inside"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with sto.storage_lock(url):
                raise error
        assert free()
    with probe.connect() as c:  # the server ends the kept session (a restart, an idle timeout)
        c.execute(sqlalchemy.text("SELECT pg_terminate_backend(:p)"), {"p": pids[0][0]})
    with sto.storage_lock(url):
        now = holder()
    assert len(now) == 1 and now != pids[0] and free()


def test_sigkilled_worker_trial_goes_stale_is_retried_and_its_run_ends_killed(servers, server_env,
                                                                              tmp_path):
    """Worker A ("another machine") is SIGKILLed mid-trial. Its heartbeat stops; worker B fails the
    trial as stale, marks its MLflow run KILLED, queues its params again, and the study still ends
    with exactly N finished trials. The kill is an event, not a moment: A kills itself (a failpoint)
    once its first trial's metrics are in the store and before Optuna hears of its end, however slowly a
    loaded machine runs it; B starts once A's heartbeat is stale."""
    name, n = _unique("pg-kill"), 6
    other = _other_machine()
    cmd = _sweep_cmd(servers, name, n, "--heartbeat", "1")  # stale after 3 s
    a = _popen(cmd, tmp_path, {**server_env, "HARNESS_FAILPOINT": "after_epoch_metrics"}, tmp_path / "a.log",
               prefix=other)
    assert a.wait(300) == -signal.SIGKILL, (tmp_path / "a.log").read_text()[-3000:]
    (victim,) = [t for t in _study(servers, name).get_trials(deepcopy=False) if t.state.name == "RUNNING"]
    assert victim.user_attrs.get("mlflow_run_id"), victim.user_attrs  # its run had started
    time.sleep(4)  # past 3 heartbeats
    b = _popen(cmd, tmp_path, server_env, tmp_path / "b.log")
    assert b.wait(600) == 0, (tmp_path / "b.log").read_text()[-3000:]

    study, trials, runs, _ = _check_study_and_runs(servers, name, n)
    killed = study._storage.get_trial(victim._trial_id)
    assert killed.state.name == "FAIL"
    run = runs[killed.number]
    assert run.info.status == "KILLED" and run.data.tags["optuna.state"] == "FAIL"
    assert "stale" in run.data.tags.get("failure_reason", ""), run.data.tags
    if other:  # A looked like another machine: only the heartbeat could have found it
        assert killed.user_attrs["worker"]["host"] == "harness-other-machine"
        assert "heartbeat" in run.data.tags["failure_reason"], run.data.tags["failure_reason"]
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1, [t.system_attrs for t in trials]
    assert retries[0].state.name in ("COMPLETE", "PRUNED") and retries[0].params == killed.params
    assert "trial %d was left RUNNING" % killed.number in (tmp_path / "b.log").read_text()


def test_postgres_restarted_mid_sweep_the_sweep_recovers(servers, server_env, tmp_path):
    """PostgreSQL restarts (every open connection dropped) while 2 workers run trials and the tracking
    server writes to it too. The sweep rides it out (harness/dbretry.py: Optuna storage operations and
    the sweep's lock are retried; pool_pre_ping replaces dead connections; MLflow's client retries the
    server's 5xx): exit 0, no traceback, exactly N trials, runs consistent. A database away for longer
    than dbretry.RETRY_S ends the sweep with one line instead (test_dbretry.py)."""
    name, n = _unique("pg-restart"), 8
    cmd = _sweep_cmd(servers, name, n, "--workers", "2", "--heartbeat", "2")
    proc = _popen(cmd, tmp_path, server_env, tmp_path / "sweep.log")
    deadline = time.time() + 300
    while time.time() < deadline:
        assert proc.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]
        try:
            done = [t for t in _study(servers, name).get_trials(deepcopy=False) if t.state.is_finished()]
        except KeyError:
            done = []
        if len(done) >= 2:
            break
        time.sleep(0.5)
    restart = subprocess.run([str(SERVERS), "restart-postgres"], capture_output=True, text=True,
                             timeout=120)
    assert restart.returncode == 0, restart.stderr
    rc = proc.wait(900)
    log = (tmp_path / "sweep.log").read_text()
    assert rc == 0 and "Traceback" not in log, log[-4000:]
    _check_study_and_runs(servers, name, n)
    _wait_http(servers["HARNESS_MLFLOW_URL"] + "/health", 30)  # the shared server survived it too


def test_tracking_server_gone_mid_sweep_stops_it_with_one_line_and_the_next_start_mends_it(
        servers, own_server, tmp_path):
    """The tracking server stops mid-trial and stays down (retries shortened): the sweep ends with one
    line, exit 2, no traceback; Optuna has the trial FAIL with its params queued again. Once the server
    is back, the same command finishes the study: exactly N trials, and the interrupted trial's run,
    left RUNNING on the server, is ended FAILED (end_orphan_runs)."""
    name, n = _unique("pg-gone-sweep"), 2
    env = {"MLFLOW_TRACKING_URI": own_server.url, "PGPASSFILE": servers["PGPASSFILE"]}
    short = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    cmd = _sweep_cmd(servers, name, n)
    cmd[cmd.index("train.epochs=3")] = "train.epochs=60"  # long enough for the stop to land mid-trial
    proc = _popen(cmd, tmp_path, {**env, **short}, tmp_path / "a.log")
    deadline, victim = time.time() + 300, None
    while victim is None and time.time() < deadline:
        assert proc.poll() is None, (tmp_path / "a.log").read_text()[-3000:]
        try:
            running = _study(servers, name).get_trials(deepcopy=False)
        except KeyError:
            running = []
        victim = next((t for t in running if t.state.name == "RUNNING"
                       and t.user_attrs.get("mlflow_run_id")), None)
        time.sleep(0.5)
    assert victim is not None, "the sweep never got a trial going"
    own_server.stop()
    assert proc.wait(300) == 2, (tmp_path / "a.log").read_text()[-3000:]
    log = (tmp_path / "a.log").read_text()
    assert "Traceback" not in log, log[-3000:]
    last = log.strip().splitlines()[-1]
    assert last.startswith("harness.sweep: error: the tracking server ") and own_server.url in last, log
    failed = _study(servers, name)._storage.get_trial(victim._trial_id)
    assert failed.state.name == "FAIL" and "StoreError" in failed.user_attrs["failure_reason"]

    own_server.start()
    from mlflow import MlflowClient

    assert MlflowClient(own_server.url).get_run(victim.user_attrs["mlflow_run_id"]).info.status == "RUNNING"
    again = _popen(cmd, tmp_path, env, tmp_path / "b.log")
    assert again.wait(600) == 0, (tmp_path / "b.log").read_text()[-3000:]
    study, trials, runs, parent = _check_study_and_runs(servers, name, n)  # none left RUNNING
    run = runs[failed.number]
    assert run.info.status == "FAILED" and "StoreError" in run.data.tags["failure_reason"]
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == failed.number]
    assert len(retries) == 1 and retries[0].params == failed.params
    assert parent.info.status == "FINISHED"


# -- secrets ---------------------------------------------------------------------------------------------

def _texts_of_run(client, run_id: str, dst: Path) -> str:
    """Every param, tag and text artifact of a run, as one string."""
    run = client.get_run(run_id)
    parts = [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()]
    local = Path(client.download_artifacts(run_id, "", str(dst)))
    for f in local.rglob("*"):
        if f.is_file() and f.suffix in (".yaml", ".json", ".csv", ".txt", ".html", ".md", ""):
            parts.append(f.read_text(errors="replace"))
    return "\n".join(parts)


def test_passwords_in_urls_never_reach_mlflow_or_the_output(servers, tmp_path):
    """A sweep and a run given the database password in --storage and credentials in
    MLFLOW_TRACKING_URI (PGPASSFILE pointed away, so the URL's password is really the one used):
    the password is in no param, tag or text artifact of any run, and not in stdout/stderr; the
    storage shows up masked (tag optuna.storage)."""
    from mlflow import MlflowClient

    pw = _pg_password()
    storage = servers["HARNESS_PG_URL"].replace("harness@", f"harness:{pw}@")
    tracking = servers["HARNESS_MLFLOW_URL"].replace("http://", f"http://harness:{pw}@")
    env = {"MLFLOW_TRACKING_URI": tracking, "PGPASSFILE": str(tmp_path / "no-pgpass")}
    name = _unique("pg-secret")
    out = run_cli("harness.sweep", *_sweep_cmd(servers, name, 2, storage=storage)[3:], cwd=tmp_path,
                  env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert pw not in out.stdout + out.stderr
    assert "harness:***@" in out.stdout
    run = run_cli("harness.train", SPEC, *TINY, f"name={name}", cwd=tmp_path, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert pw not in run.stdout + run.stderr
    doctor = run_cli("harness.doctor", "--storage", storage, "--study", name, cwd=tmp_path, env=env)
    assert doctor.returncode == 0 and pw not in doctor.stdout + doctor.stderr, doctor.stdout

    client = MlflowClient(servers["HARNESS_MLFLOW_URL"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.`optuna.study` = '{name}'")
    runs += client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert len(runs) == 4  # parent, 2 trials, the single run
    masked = storage.replace(pw, "***")
    assert {r.data.tags.get("optuna.storage") for r in runs[:3]} == {masked}
    for i, r in enumerate(runs):
        assert pw not in _texts_of_run(client, r.info.run_id, tmp_path / f"art{i}"), r.info.run_name
