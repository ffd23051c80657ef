"""The thread policy (harness/core/device.py): by default a process's share of the cores cut to the
cores other processes leave free, measured over the run's start-up (as train.threads=auto); with
train.deterministic=true the share whatever the load (the same spec and seed, the same numbers); waiting
threads sleep when other processes run as it starts (which changes no number); what a user sets
explicitly wins; the choice is recorded with the run and a resume reuses it; an ablation makes it once
for all its runs."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from conftest import ROOT, all_runs
from harness.core import device

DIGITS = str(ROOT / "experiments" / "digits_lenet.yaml")
QUICK = ["train.epochs=1", "data.limit_train=200", "train.sanity_check=false", "train.log_model=false"]


@pytest.mark.parametrize("share, busy, n_cores, expected", [
    (2, 0.0, 2, 2), (2, 0.4, 2, 2),  # a little noise leaves both cores
    (2, 0.6, 2, 1), (2, 1.0, 2, 1), (2, 1.6, 2, 1), (2, 7.0, 2, 1),  # at least one thread, always
    (8, 3.0, 16, 8),  # never more than the share of the workers
    (16, 5.2, 16, 11), (1, 0.0, 16, 1)])
def test_threads_left_is_the_share_cut_to_the_free_cores(share, busy, n_cores, expected):
    assert device.threads_left(share, busy, n_cores) == expected


@pytest.mark.parametrize("others, threads, n_cores, sleeps", [
    (0.0, 2, 2, False), (0.4, 2, 2, False),  # an idle machine (a little noise): OpenMP's spin is kept
    (0.6, 2, 2, True), (1.0, 2, 2, True), (5.0, 2, 2, True),  # a core taken: the threads sleep
    (None, 2, 2, True),  # unknown: sleeping is the safe choice
    (3.0, 2, 2, True), (3.0, 8, 16, False), (9.0, 8, 16, True),
    (0.0, 3, 2, True)])  # more threads than cores
def test_waiting_threads_sleep_when_other_tasks_leave_too_few_free_cores(others, threads, n_cores, sleeps):
    assert device.sleep_while_waiting(others, threads, n_cores) is sleeps


@pytest.mark.parametrize("text, expected", [
    ("1.20 1.31 1.40 3/213 4242\n", 2.0),  # this reader and two others
    ("0.00 0.01 0.05 1/98 77\n", 0.0),
    ("0.00 0.00 0.00 0/0 0\n", None),  # a sandbox that counts nothing: unknown, so the threads sleep
    ("garbage\n", None), ("", None)])
def test_the_probe_reads_the_running_tasks_of_proc_loadavg(tmp_path, text, expected):
    (tmp_path / "loadavg").write_text(text)
    assert device.others_running(str(tmp_path / "loadavg")) == expected
    assert device.others_running(str(tmp_path / "missing")) is None


def test_the_probe_sees_a_busy_neighbour_at_once():
    """A process started just before: no lag (the load averages would take a minute to notice it)."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let it start spinning
        assert device.others_running() >= 0.9
    finally:
        spinner.kill()
        spinner.wait()


def _train(tmp_path, *args: str, env: dict, busy_neighbours: int = 0, stderr: list | None = None):
    """``python -m harness.train`` on digits, beside ``busy_neighbours`` processes that spin from
    before it starts to after it ends; the environment is the test's without OMP_* settings, plus env.
    What it printed on stderr is appended to ``stderr``, if given."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    full = {**base, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri, **env}
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy_neighbours)]
    try:
        out = subprocess.run([sys.executable, "-m", "harness.train", DIGITS, *QUICK, *args, "--quiet"],
                             cwd=tmp_path, env=full, capture_output=True, text=True, timeout=300)
    finally:
        for s in spinners:
            s.kill()
            s.wait()
    assert out.returncode == 0, out.stderr[-2000:]
    if stderr is not None:
        stderr.append(out.stderr)
    (r,) = all_runs(uri)
    return r


@pytest.mark.parametrize("requested, deterministic, omp, busy, expected", [
    (None, False, None, 0.0, 2), (None, False, None, 1.0, 1),  # by default, the cores left free
    ("auto", False, None, 1.0, 1), ("auto", True, None, 1.0, 1),  # auto asked for: auto
    (None, True, None, 1.0, 2), (None, True, None, None, 2),  # deterministic: the share, whatever the load
    (None, False, "2", 1.0, 2), (None, False, "1", 0.0, 1), (3, False, None, 1.0, 3),  # the user's count
    (None, False, None, None, 2)])  # load unknown: the share
def test_the_count_follows_the_load_unless_deterministic_or_set(monkeypatch, requested, deterministic, omp,
                                                                 busy, expected):
    monkeypatch.setattr(device, "cores", lambda: 2)
    monkeypatch.setattr(device, "_share", {"workers": 1})
    monkeypatch.setattr(device, "_probe", {"busy": busy})
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    assert device.resolve_threads(requested, deterministic) == expected


def test_by_default_beside_processes_that_keep_every_core_busy_a_run_takes_one_thread(tmp_path):
    stderr: list[str] = []
    params = _train(tmp_path, env={}, busy_neighbours=device.cores(), stderr=stderr).data.params
    # the run said so, once, with what keeps the count whatever the load
    told = [line for line in stderr[0].splitlines() if "torch thread(s), not" in line]
    assert len(told) == 1 and "train.deterministic=true" in told[0], stderr[0][-2000:]
    assert params["train.threads_used"] == "1" and params["train.threads"] == "None"
    assert float(params["train.cores_busy_at_start"]) >= 0.8 * (device.cores() - 1)


def test_a_deterministic_run_keeps_its_share_whatever_the_load(tmp_path):
    """Beside processes that keep every core busy, a train.deterministic run still takes its share of
    the cores: its numbers must not change with what else the machine runs."""
    params = _train(tmp_path, "train.deterministic=true", env={}, busy_neighbours=device.cores()).data.params
    assert params["train.threads_used"] == str(device.cores())
    assert params["train.cores_busy_at_start"] == "not measured"
    # ... and its waiting threads sleep, since the spinning neighbours were there when it started
    assert float(params["train.others_running_at_start"]) >= device.cores() - 0.5
    assert params["train.omp_wait_policy"] == "PASSIVE"


def test_auto_beside_processes_that_keep_every_core_busy_takes_one_thread(tmp_path):
    params = _train(tmp_path, "train.threads=auto", env={}, busy_neighbours=device.cores()).data.params
    assert params["train.threads_used"] == "1" and params["train.threads"] == "auto"
    assert float(params["train.cores_busy_at_start"]) >= 0.8 * (device.cores() - 1)
    assert params["train.omp_wait_policy"] == "PASSIVE"


def test_what_the_user_sets_wins_over_the_policy(tmp_path):
    """train.threads, OMP_NUM_THREADS and OMP_WAIT_POLICY are kept as given, even beside busy
    processes, and then nothing is measured."""
    params = _train(tmp_path, "train.threads=2", env={"OMP_WAIT_POLICY": "active"}, busy_neighbours=1).data.params
    assert params["train.threads_used"] == "2" and params["train.cores_busy_at_start"] == "not measured"
    assert params["train.omp_wait_policy"] == "ACTIVE" and params["train.others_running_at_start"] == "not measured"
    (tmp_path / "b").mkdir()
    stderr: list[str] = []
    params = _train(tmp_path / "b", env={"OMP_NUM_THREADS": str(device.cores() + 1)}, stderr=stderr).data.params
    # more threads than cores: they wait for each other's cores, so they sleep whatever the load
    assert params["train.threads_used"] == str(device.cores() + 1) and params["train.omp_wait_policy"] == "PASSIVE"
    # ... and the run says, once, that the count is more than the machine has
    warned = [line for line in stderr[0].splitlines() if "is more than the" in line]
    assert len(warned) == 1 and f"OMP_NUM_THREADS={device.cores() + 1}" in warned[0], stderr[0][-2000:]


@pytest.mark.parametrize("requested, omp, expected", [
    (3, None, 3), (64, None, 64), (None, "3", 3), (None, "3,1", 3),  # more threads than cores
    (2, None, 2), (None, "2", 2), ("auto", None, 2), (None, None, 2), (1, "8", 1)])
def test_a_count_above_the_cores_is_kept_but_warned_about_once(monkeypatch, caplog, requested, omp, expected):
    monkeypatch.setattr(device, "cores", lambda: 2)
    monkeypatch.setattr(device, "_share", {"workers": 1})
    monkeypatch.setattr(device, "_probe", {"busy": 0.0})
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    with caplog.at_level("WARNING", logger="harness.threads"):
        counts = [device.resolve_threads(requested) for _ in range(3)]
    assert counts == [expected] * 3
    warned = [r.getMessage() for r in caplog.records if "is more than the 2 core(s)" in r.getMessage()]
    assert len(warned) == (1 if expected > 2 else 0), warned


def test_the_wait_policy_changes_no_number(tmp_path):
    """Sleeping or spinning is only how idle threads wait: two threads that sleep and two that spin
    give the same curve bit for bit, so the policy may follow the load at start."""
    from mlflow import MlflowClient

    curves = []
    for i, wait in enumerate(({"OMP_WAIT_POLICY": "PASSIVE"}, {"OMP_WAIT_POLICY": "ACTIVE"})):
        (tmp_path / str(i)).mkdir()
        r = _train(tmp_path / str(i), "train.epochs=2", env={"OMP_NUM_THREADS": "2", **wait})
        assert r.data.params["train.threads_used"] == "2"
        client = MlflowClient(f"sqlite:///{tmp_path / str(i) / 'mlflow.db'}")
        curves.append([(m.step, m.value) for key in ("train/loss", "val/loss", "val/acc")
                       for m in client.get_metric_history(r.info.run_id, key)])
    assert len(curves[0]) == 6 and curves[0] == curves[1]


def test_a_resumed_run_trains_with_the_threads_it_started_with(tmp_path, store):
    """Killed with 3 threads (OMP_NUM_THREADS=3), resumed in a process whose own count is 1: the
    resumed epochs use 3 again, so they add up their floats as the first ones did."""
    import torch
    from mlflow import MlflowClient

    from harness.run import run
    from harness.spec import load_spec

    args = [DIGITS, "train.epochs=3", "data.limit_train=200", "train.sanity_check=false", "train.log_model=false",
            "train.upload_every_s=0"]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    victim = subprocess.run([sys.executable, "-m", "harness.train", *args, "--quiet"], cwd=tmp_path, text=True,
                            env={**base, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "3",
                                 "HARNESS_FAILPOINT": "after_checkpoint:2"}, capture_output=True, timeout=300)
    assert victim.returncode < 0, victim.stderr[-2000:]
    (killed,) = all_runs(store)
    assert killed.data.params["train.threads_used"] == "3"
    before = torch.get_num_threads()
    try:
        result = run(load_spec(args[0], args[1:]), resume_run_id=killed.info.run_id, progress=False)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert MlflowClient().get_run(result.run_id).info.status == "FINISHED"


@pytest.mark.parametrize("setting, env, expected", [
    ([], {"OMP_NUM_THREADS": "2"}, "2"),  # the policy's count (here the user's OMP_NUM_THREADS)
    (["train.threads=auto"], {}, None)])  # the probe's count, whatever it is, once
def test_an_ablation_chooses_the_thread_count_once_and_records_it_in_its_plan(tmp_path, setting, env,
                                                                              expected):
    """Every run of an ablation gets the same train.threads (written into the base spec the parent
    records, which --resume reads back): pairs differ only by their arm, at any load."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    out = subprocess.run([sys.executable, "-m", "analysis.ablation",
                          str(ROOT / "experiments" / "ablations" / "mode_bugs.yaml"), *setting, "--dry-run"],
                         cwd=tmp_path, env={**base, "PYTHONPATH": str(ROOT), **env},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    found = re.search(r"every run trains with train.threads=(\d+)", out.stdout)
    assert found and (expected is None or found.group(1) == expected), out.stdout[:500]
    assert "'train.threads'" not in out.stdout  # the same for every arm: no arm shows it as its change


@pytest.mark.parametrize("workers, available, refused", [
    (99, 21.0, "at most --workers 32 fits"), (33, 21.0, "at most --workers 32 fits"), (32, 21.0, None),
    (2, 1.0, "at most --workers 1 fits"), (1, 0.1, None),  # one process is never refused: nothing to share
])
def test_more_worker_processes_than_the_memory_holds_are_refused(monkeypatch, workers, available, refused):
    monkeypatch.setattr(device, "cores", lambda: 64)
    if refused is None:
        device.check_workers(workers, available=available)
        return
    with pytest.raises(device.UserError) as e:
        device.check_workers(workers, available=available)
    assert refused in str(e.value) and f"--workers {workers}:" in str(e.value)
    assert f"{available:.1f} GiB available" in str(e.value)


def test_more_workers_than_cores_are_kept_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(device, "cores", lambda: 2)
    with caplog.at_level("WARNING", logger="harness.threads"):
        device.check_workers(2, available=100.0)
        assert not caplog.records
        device.check_workers(3, available=100.0)
    (record,) = caplog.records
    assert "--workers 3 is more than the 2 core(s)" in record.getMessage()


def test_the_memory_available_is_read_from_meminfo(tmp_path):
    (tmp_path / "meminfo").write_text("MemTotal:       24000000 kB\nMemAvailable:   22020096 kB\n")
    assert device.available_gib(str(tmp_path / "meminfo")) == pytest.approx(21.0)
    (tmp_path / "old").write_text("MemTotal:       24000000 kB\nMemFree:   1 kB\n")  # kernels before 3.14
    assert device.available_gib(str(tmp_path / "old")) is None
    assert device.available_gib(str(tmp_path / "missing")) is None
