"""Kill a run and a sweep at every failpoint of harness/failpoints.py (SIGKILL: nothing can clean up)
and at random instants, run the documented recovery, and check what the README promises: no finished
trial lost, the study ends with exactly N trials, one parent run, nothing left RUNNING, and a resumed
run logs every step once, with the numbers of an uninterrupted run."""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from conftest import ROOT, all_runs, run_cli
from harness import failpoints

DIGITS = str(ROOT / "experiments" / "digits_lenet.yaml")
# Every epoch uploaded (train.upload_every_s=0), so the per-epoch points are reached in every epoch;
# test_a_run_killed_before_its_first_upload covers the default, time-based uploads.
RUN = [DIGITS, "train.epochs=3", "data.limit_train=300", "train.sanity_check=false", "train.log_every=2",
       "train.upload_every_s=0"]
CURVES = ("train/loss", "train/acc", "val/loss", "val/acc", "train/running_loss", "test/acc", "test/loss")
KILLED = -signal.SIGKILL
SLOW = pytest.mark.slow  # every point runs in CI's slow pass; the default run keeps a representative few
RUN_POINTS = [  # point[:which visit]: per-epoch points die in the second epoch
    "after_run_created", "after_epoch_metrics:2", pytest.param("mid_checkpoint_write:2", marks=SLOW),
    "mid_checkpoint_upload:2", pytest.param("after_checkpoint:2", marks=SLOW),
    pytest.param("after_last_epoch", marks=SLOW), "during_model_log", pytest.param("before_run_end", marks=SLOW)]


def _name(p) -> str:
    return (p.values[0] if hasattr(p, "values") else p).split(":")[0]


def test_every_failpoint_is_tested():
    assert {_name(p) for p in RUN_POINTS + SWEEP_POINTS} == set(failpoints.POINTS)


@pytest.fixture(scope="module")
def reference():
    """The uninterrupted run's numbers, per metric key and step."""
    from harness.run import run
    from harness.spec import load_spec
    from harness.tracking.tracker import MemoryTracker

    tracker = MemoryTracker()
    run(load_spec(RUN[0], RUN[1:]), tracker=tracker, progress=False)
    return {k: dict(tracker.metrics[k]) for k in CURVES}


def _curves(client, run_id: str) -> dict[str, dict[int, float]]:
    out = {}
    for key in CURVES:
        hist = client.get_metric_history(run_id, key)
        steps = [m.step for m in hist]
        assert len(steps) == len(set(steps)), f"{key} logged a step twice: {sorted(steps)}"
        out[key] = {m.step: m.value for m in hist}
    return out


@pytest.mark.parametrize("point", RUN_POINTS)
def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_numbers(point, fast_store, tmp_path, reference):
    from mlflow import MlflowClient

    from harness.run import run
    from harness.spec import load_spec

    victim = run_cli("harness.train", *RUN, "--quiet", cwd=tmp_path, env={"HARNESS_FAILPOINT": point})
    assert victim.returncode == KILLED, victim.stderr
    (killed,) = all_runs(fast_store)
    assert killed.info.status == "RUNNING"  # what SIGKILL leaves; --resume mends it

    result = run(load_spec(RUN[0], RUN[1:]), resume_run_id=killed.info.run_id, progress=False)
    client = MlflowClient(fast_store)
    resumed = client.get_run(killed.info.run_id)
    assert resumed.info.status == "FINISHED" and result.run_id == killed.info.run_id
    assert _curves(client, killed.info.run_id) == reference
    models = client.search_logged_models([resumed.info.experiment_id])
    assert [str(getattr(m.status, "value", m.status)) for m in models] == ["READY"]  # one model, whole
    assert len(all_runs(fast_store)) == 1


@pytest.mark.parametrize("point, source", [
    ("after_last_epoch", "the start"),
    ("mid_checkpoint_upload", "checkpoints/best.pt (checkpoints/last.pt was torn and skipped)")])
def test_a_run_killed_before_its_first_upload_resumes_to_the_uninterrupted_numbers(point, source, fast_store,
                                                                                   tmp_path, reference):
    """The default cadence: a short run uploads its metrics and checkpoints once, at its end. Killed
    before that upload, the store holds the run and its params and the resume starts over from epoch 1;
    killed in the middle of it (best.pt goes first, last.pt is torn), it goes on from best.pt. Either
    way every step is logged once, with the uninterrupted numbers."""
    from mlflow import MlflowClient

    from harness.run import run
    from harness.spec import load_spec

    default = [a for a in RUN if not a.startswith("train.upload_every_s")]
    victim = run_cli("harness.train", *default, "--quiet", cwd=tmp_path, env={"HARNESS_FAILPOINT": point})
    assert victim.returncode == KILLED, victim.stderr
    (killed,) = all_runs(fast_store)
    client = MlflowClient(fast_store)
    assert "optimizer.lr" in killed.data.params
    if point == "after_last_epoch":
        assert client.get_metric_history(killed.info.run_id, "val/acc") == []  # nothing sent yet
    result = run(load_spec(default[0], default[1:]), resume_run_id=killed.info.run_id, progress=False)
    resumed = client.get_run(result.run_id)
    assert resumed.info.status == "FINISHED" and resumed.data.tags["resumed_from"] == source
    assert _curves(client, killed.info.run_id) == reference


@pytest.mark.slow  # ~30-60 s; CI's slow pass runs it
def test_a_second_resume_at_once_is_refused(fast_store, tmp_path):
    """Two --resume of one run at once: the second is refused in one line while the first trains."""
    from mlflow import MlflowClient

    victim = run_cli("harness.train", *RUN, "--quiet", cwd=tmp_path, env={"HARNESS_FAILPOINT": "after_epoch_metrics"})
    assert victim.returncode == KILLED
    (killed,) = all_runs(fast_store)
    args = [*RUN, "train.epochs=200", "--quiet", "--resume", killed.info.run_id]
    first = subprocess.Popen([sys.executable, "-m", "harness.train", *args], cwd=tmp_path,
                             env={**_env(), "MLFLOW_TRACKING_URI": fast_store},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        client = MlflowClient(fast_store)
        deadline = time.monotonic() + 120
        while "resumed_from" not in client.get_run(killed.info.run_id).data.tags:
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.stderr else ""
            time.sleep(0.1)
        second = run_cli("harness.train", *args, cwd=tmp_path)
        assert second.returncode == 2
        (line,) = second.stderr.strip().splitlines()
        assert "is being trained by another process on this machine" in line and "pid" in line
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)
    assert client.get_run(killed.info.run_id).info.status == "KILLED"  # SIGTERM: a final state


# -- sweeps ----------------------------------------------------------------------------------------------

SWEEP = [DIGITS, "train.epochs=2", "data.limit_train=300", "train.sanity_check=false", "train.log_model=false",
         "--n-trials", "3", "--sampler", "random", "--pruner", "none", "--study", "killed"]
SWEEP_POINTS = [pytest.param("after_parent_run_created", marks=SLOW), "after_trial_asked:2",
                pytest.param("after_run_created:2", marks=SLOW), pytest.param("after_epoch_metrics:3", marks=SLOW),
                pytest.param("before_trial_told:2", marks=SLOW), pytest.param("after_trial_told:2", marks=SLOW),
                pytest.param("after_trial_run_tagged:2", marks=SLOW)]


def _env() -> dict:
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT)}


def check_sweep(uri: str, workdir, n: int = 3, study_name: str = "killed") -> None:
    """The invariants a sweep keeps whatever killed it before the re-run that finished it."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name=study_name, storage=JournalStorage(
        JournalFileBackend(str(workdir / "mlruns" / "optuna.journal"))))
    states = Counter(t.state.name for t in study.trials)
    assert states["COMPLETE"] + states["PRUNED"] == n and states["RUNNING"] == 0, states
    runs = all_runs(uri)
    assert not [r for r in runs if r.info.status == "RUNNING"], "a run was left RUNNING"
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert study.user_attrs["mlflow_parent_run_id"] == parents[0].info.run_id
    by_id = {r.info.run_id: r for r in runs}
    for t in study.trials:
        assert t.state.name != "RUNNING"
        if t.state.name == "COMPLETE":  # no finished trial lost: its run holds its result
            r = by_id[t.user_attrs["mlflow_run_id"]]
            assert r.info.status == "FINISHED" and r.data.tags["optuna.state"] == "COMPLETE"
            assert r.data.metrics["val/acc"] == pytest.approx(t.value)
            assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert not [r for r in runs if r.data.tags.get("optuna.state") == "RUNNING"]


@pytest.mark.parametrize("point", SWEEP_POINTS)
def test_a_sweep_killed_anywhere_finishes_with_exactly_n_trials(point, fast_store, tmp_path):
    victim = run_cli("harness.sweep", *SWEEP, "--quiet", cwd=tmp_path, env={"HARNESS_FAILPOINT": point})
    assert victim.returncode == KILLED, victim.stdout + victim.stderr
    again = run_cli("harness.sweep", *SWEEP, "--quiet", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    check_sweep(fast_store, tmp_path)


def _kill_at_random(module: str, args: list[str], seed: int, within: tuple[float, float], cwd, uri) -> None:
    """Start ``python -m module args`` and SIGKILL it at an instant drawn from ``within`` seconds."""
    proc = subprocess.Popen([sys.executable, "-m", module, *args, "--quiet"], cwd=cwd,
                            env={**_env(), "MLFLOW_TRACKING_URI": uri},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(random.Random(seed).uniform(*within))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def test_a_journal_lock_left_by_a_process_killed_while_it_wrote_does_not_hang_the_sweep(fast_store, tmp_path):
    """Optuna's journal lock is a symlink to the journal. A process that named the journal by a relative
    path (as ``optuna-dashboard mlruns/optuna.journal`` does) makes one that points nowhere, and once that
    process is killed while it holds it, Optuna waits forever: it judges a lock stale by the file the link
    points to. The sweep removes such a lock once 30 s old (made old here), in one warning line."""
    import os

    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal; from optuna.storages.journal import JournalFileSymlinkLock; "
        "os.makedirs('mlruns', exist_ok=True); open('mlruns/optuna.journal', 'a').close(); "
        "JournalFileSymlinkLock('mlruns/optuna.journal').acquire(); os.kill(os.getpid(), signal.SIGKILL)")],
        cwd=tmp_path, env=_env(), timeout=120)
    lock = tmp_path / "mlruns" / "optuna.journal.lock"
    assert killed.returncode == KILLED and lock.is_symlink() and not lock.exists()  # left, pointing nowhere
    old = time.time() - 40
    os.utime(lock, (old, old), follow_symlinks=False)
    again = run_cli("harness.sweep", *SWEEP, "--quiet", cwd=tmp_path, timeout=240)
    assert again.returncode == 0, again.stderr
    assert "a lock on the Optuna journal left behind" in again.stderr and not lock.is_symlink()
    check_sweep(fast_store, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_a_sweep_killed_at_a_random_instant_finishes_with_exactly_n_trials(seed, fast_store, tmp_path):
    _kill_at_random("harness.sweep", SWEEP, seed, (3.0, 12.0), tmp_path, fast_store)
    again = run_cli("harness.sweep", *SWEEP, "--quiet", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    check_sweep(fast_store, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_a_run_killed_at_a_random_instant_resumes_to_the_uninterrupted_numbers(seed, fast_store, tmp_path,
                                                                                 reference):
    from mlflow import MlflowClient

    _kill_at_random("harness.train", RUN, seed, (2.0, 9.0), tmp_path, fast_store)
    runs = all_runs(fast_store)
    if runs and runs[0].info.status != "FINISHED":
        r = run_cli("harness.train", *RUN, "--quiet", "--resume", runs[0].info.run_id, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    if runs:  # killed before the run existed: nothing to resume, and nothing was left behind
        assert _curves(MlflowClient(fast_store), runs[0].info.run_id) == reference
        assert all_runs(fast_store)[0].info.status == "FINISHED"
