"""Two commands at once on a fresh store, a kill while a command creates a fresh store, and a disk that
fills up or turns read-only under a sweep: each ends the way the README says (both succeed; one line
naming the path, exit 2, nothing half-written, and the same command finishes the job once there is
room)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, all_runs, run_cli
from test_kill import check_sweep

DIGITS = str(ROOT / "experiments" / "digits_lenet.yaml")
TINY = ["train.epochs=2", "data.limit_train=300", "train.sanity_check=false", "train.log_model=false"]


def _start(module: str, *args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)  # the default store, created by whichever comes first
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("module, args", [
    ("harness.train", [DIGITS, *TINY, "--quiet"]),
    pytest.param("harness.sweep", [DIGITS, *TINY, "--n-trials", "3", "--sampler", "random", "--study", "killed",
                                   "--quiet"], marks=pytest.mark.slow),
])
def test_two_commands_at_once_on_a_fresh_store_both_succeed(tmp_path, module, args):
    procs = [_start(module, *args, cwd=tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "Traceback" not in err
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    if module == "harness.train":
        assert [r.info.status for r in all_runs(uri)] == ["FINISHED", "FINISHED"]
    else:  # two sweeps of one study share it: 3 trials in all, one parent
        check_sweep(uri, tmp_path)


@pytest.fixture()
def small_disk(tmp_path):
    """A 64 MB file system of its own (tmpfs; needs root, as CI runs)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()[:80]}): needs root")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path, leave_bytes: int) -> Path:
    """Ballast that leaves about ``leave_bytes`` free on the disk."""
    free = shutil.disk_usage(disk).free
    ballast = disk / "ballast"
    with open(ballast, "wb") as f:
        f.truncate(0)
        remaining = max(0, free - leave_bytes)
        chunk = b"\0" * (1 << 20)
        while remaining > 0:
            f.write(chunk[: min(len(chunk), remaining)])
            remaining -= len(chunk)
    return ballast


SWEEP = [DIGITS, *TINY, "--sampler", "random", "--pruner", "none", "--study", "killed", "--quiet"]


@pytest.mark.slow  # ~30-60 s; CI's slow pass runs it
def test_a_full_disk_stops_the_sweep_with_one_line_and_the_sweep_resumes_once_there_is_room(small_disk):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{small_disk / 'mlflow.db'}"}
    first = run_cli("harness.sweep", *SWEEP, "--n-trials", "1", cwd=small_disk, env=env)
    assert first.returncode == 0, first.stderr
    ballast = _fill(small_disk, leave_bytes=600_000)  # less than the next trial's checkpoints need

    full = run_cli("harness.sweep", *SWEEP, "--n-trials", "4", cwd=small_disk, env=env)
    assert full.returncode == 2, full.stdout + full.stderr
    errors = [line for line in full.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "no space left on device" in errors[0], full.stderr
    assert str(small_disk) in errors[0] or "mlflow.db" in errors[0]
    assert "Traceback" not in full.stderr
    assert not list(small_disk.rglob("*.tmp")), "a half-written file was left behind"

    ballast.unlink()
    again = run_cli("harness.sweep", *SWEEP, "--n-trials", "4", cwd=small_disk, env=env)
    assert again.returncode == 0, again.stderr
    check_sweep(env["MLFLOW_TRACKING_URI"], small_disk, n=4)


def test_a_read_only_store_is_one_line_and_no_run(small_disk):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{small_disk / 'mlflow.db'}"}
    ok = run_cli("harness.train", DIGITS, *TINY, "--quiet", cwd=small_disk, env=env)
    assert ok.returncode == 0, ok.stderr
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        r = run_cli("harness.train", DIGITS, *TINY, "--quiet", cwd=small_disk, env=env)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    assert r.returncode == 2, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert ("read-only" in line or "readonly" in line) and "Traceback" not in r.stderr
    assert [x.info.status for x in all_runs(env["MLFLOW_TRACKING_URI"])] == ["FINISHED"]  # no new run


# MLflow's schema migrations of a new SQLite store rebuild tables through _alembic_tmp_<table>: the
# signal is sent from inside the first such statement, the most unlucky instant there is.
SIGNAL_IN_MIGRATION = """
import os, runpy, signal, sys
from sqlalchemy import event
from sqlalchemy.engine import Engine

@event.listens_for(Engine, "{when}_cursor_execute")
def signal_once(conn, cursor, statement, *args):
    if "_alembic_tmp_" in statement and not os.environ.get("SIGNALLED"):
        os.environ["SIGNALLED"] = "1"
        open("signalled", "w").close()  # for the test's message: the signal was sent
        os.kill(os.getpid(), signal.{name})

{then}
"""
TRAIN = f"sys.argv = ['harness.train', {DIGITS!r}, *{TINY!r}, '--quiet']; runpy.run_module('harness.train', run_name='__main__')"


def _signalled_in_migration(tmp_path: Path, name: str, when: str = "before", then: str = TRAIN):
    code = SIGNAL_IN_MIGRATION.format(name=name, when=when, then=then)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("SIGNALLED", None)
    # A shell's background job (CI started with '&') inherits SIGINT ignored, and Python keeps it so: the
    # command starts as under a terminal, where Ctrl-C is SIGINT.
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, text=True, capture_output=True,
                          timeout=300, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.parametrize("name", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_a_kill_while_a_command_creates_a_fresh_store_leaves_none_and_the_next_command_makes_it(tmp_path, name):
    first = _signalled_in_migration(tmp_path, name)
    assert first.returncode != 0, (f"signal sent: {(tmp_path / 'signalled').exists()}; stdout: "
                                   f"{first.stdout[-1500:]}; stderr: {first.stderr[-3000:]}")
    assert not (tmp_path / "mlflow.db").exists()  # no store rather than half of one
    uri = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    again = run_cli("harness.train", DIGITS, *TINY, "--quiet", cwd=tmp_path, env=uri)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [r.info.status for r in all_runs(uri["MLFLOW_TRACKING_URI"])] == ["FINISHED"]
    assert not list(tmp_path.glob(".mlflow.db.creating-*"))  # what the killed one was making is gone


def test_a_store_another_tool_left_half_made_is_one_line(tmp_path):
    """MLflow itself (mlflow ui, a script) killed while it creates a store: the next command says so."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = _signalled_in_migration(tmp_path, "SIGKILL", when="after",
                                    then=f"from mlflow import MlflowClient; MlflowClient({uri!r}).search_experiments()")
    assert first.returncode == -9 and (tmp_path / "mlflow.db").exists()
    r = run_cli("harness.train", DIGITS, *TINY, "--quiet", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    (line,) = r.stderr.strip().splitlines()
    assert "is half made" in line and "_alembic_tmp_" in line and f"delete {tmp_path / 'mlflow.db'}" in line
    (tmp_path / "mlflow.db").unlink()  # as the line says
    r = run_cli("harness.train", DIGITS, *TINY, "--quiet", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri})
    assert r.returncode == 0, r.stderr[-3000:]
