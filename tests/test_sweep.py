"""python -m harness.sweep: trials as nested MLflow runs, resume, parallel workers, stale trials after
SIGKILL, pruning, divergence, storage choices and user errors. Offline: digits, 2-3 epochs a trial."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import ROOT, TINY, all_runs, run_cli

SPEC = str(ROOT / "experiments" / "digits_lenet.yaml")
# One torch thread a trial: a tiny LeNet gains nothing from two, and on a shared 2-core machine two
# threads spin against other processes and run ~10x slower.
FAST = [*TINY, "train.checkpoint=false", "train.threads=1"]
JOURNAL = "mlruns/optuna.journal"


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def sweep(*args: str) -> int:
    """The CLI in this process (no interpreter start-up per call)."""
    from harness.sweep.cli import main

    return main([SPEC, *FAST, *args])


def the_study(storage: str = JOURNAL) -> optuna.Study:
    from harness.sweep.storage import optuna_storage

    st = optuna_storage(storage)
    names = optuna.get_all_study_names(st)
    assert len(names) == 1, names
    return optuna.load_study(study_name=names[0], storage=st)


def children_and_parent(uri: str):
    runs = all_runs(uri)
    parents = [r for r in runs if r.info.run_name.startswith("sweep:")]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.trials]


# -- the basic contract --------------------------------------------------------------------------------

def test_four_trials_make_one_parent_and_four_children_with_matching_params(fast_store, capsys):
    assert sweep("--n-trials", "4") == 0
    study = the_study()
    assert len(study.trials) == 4
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    parents, children = children_and_parent(fast_store)
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.run_name == f"sweep:{study.study_name}"
    assert parent.info.status == "FINISHED"
    assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    by_id = {r.info.run_id: r for r in children}
    for t in study.trials:
        run = by_id[t.user_attrs["mlflow_run_id"]]
        assert run.info.run_name == f"trial-{t.number}" + (" (pruned)" if t.state == TrialState.PRUNED else "")
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["optuna.study"] == study.study_name
        assert run.data.tags["optuna.trial_number"] == str(t.number)
        assert run.data.tags["optuna.state"] == t.state.name
        assert set(t.params) == {"optimizer.lr", "optimizer.momentum", "model.dropout"}
        for k, v in t.params.items():
            assert float(run.data.params[k]) == pytest.approx(v, rel=1e-12)
        assert "val/acc" in run.data.metrics
        assert t.intermediate_values  # every epoch was reported to the pruner
    # the summary: on the parent run and on stdout
    from mlflow import MlflowClient

    client = MlflowClient(fast_store)
    files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "best_params.json", "plots", "spec.yaml"} <= files
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/optimization_history.png" in plots
    best = study.best_trial
    best_run = best.user_attrs["mlflow_run_id"]
    assert parent.data.tags["best.trial_number"] == str(best.number)
    # the progress as curves, step = trial number: each complete trial's value and the best so far
    curve = {m.step: m.value for m in client.get_metric_history(parent.info.run_id, "best/val/acc")}
    values = {t.number: t.value for t in study.trials if t.state == TrialState.COMPLETE}
    assert {m.step: m.value for m in client.get_metric_history(parent.info.run_id, "trials/val/acc")} == values
    assert sorted(curve) == list(range(min(values), 4))
    assert curve == {n: max(v for k, v in values.items() if k <= n) for n in curve}
    assert curve[3] == pytest.approx(best.value)
    assert not [k for k in parent.data.metrics if k.startswith(("trials/complete", "epochs/"))]
    tags = parent.data.tags
    assert int(tags["sweep.trials_complete"]) + int(tags["sweep.trials_pruned"]) == 4
    assert tags["sweep.trials_failed"] == "0"
    # the description: the best trial first, linked to its run, and the command to paste
    note = tags["mlflow.note.content"]
    assert note.startswith(f"**Best: [trial-{best.number}](#/experiments/{parent.info.experiment_id}/runs/{best_run}")
    assert "python -m harness.train" in note and f"optimizer.lr={best.params['optimizer.lr']:.6g}" in note
    # the best trial's run, and only it, is tagged so it can be filtered
    marked = client.search_runs([parent.info.experiment_id], filter_string="tags.`sweep.best` = 'true'")
    assert [r.info.run_id for r in marked] == [best_run]
    # Optuna's dashboard: the objective's name, the spec and each trial's run as a link
    from optuna_dashboard import get_note

    assert study.metric_names == ["val/acc"]
    assert "```yaml" in get_note(study) and "name: digits-lenet" in get_note(study)
    assert f"/runs/{best_run}" in get_note(optuna.Trial(study, best._trial_id))
    out = capsys.readouterr().out
    assert out.count("trial ") >= 4 and "best trials" in out
    assert "python -m harness.train" in out and "optimizer.lr=" in out
    assert "mlflow ui --backend-store-uri" in out and f"optuna-dashboard {Path(JOURNAL).absolute()}" in out
    assert f"http://127.0.0.1:5000/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}" in out


def test_resume_adds_only_the_missing_trials(fast_store):
    assert sweep("--n-trials", "2") == 0
    first = {t.number: (t.params, t.value) for t in the_study().trials}
    assert sweep("--n-trials", "5") == 0
    study = the_study()
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3, 4]
    assert {n: (t.params, t.value) for n, t in ((t.number, t) for t in study.trials) if n < 2} == first
    assert sweep("--n-trials", "5") == 0  # nothing left to do: no new trial, no new parent
    assert len(the_study().trials) == 5
    parents, children = children_and_parent(fast_store)
    assert len(parents) == 1 and len(children) == 5
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    # three commands, one progress curve: each trial's step logged once
    from mlflow import MlflowClient

    steps = [m.step for m in MlflowClient(fast_store).get_metric_history(parents[0].info.run_id, "best/val/acc")]
    assert sorted(steps) == [0, 1, 2, 3, 4]


def test_same_seed_proposes_the_same_trials(fast_store, tmp_path):
    assert sweep("--n-trials", "2", "--sampler", "random", "--pruner", "none") == 0
    again = tmp_path / "again.journal"
    assert sweep("--n-trials", "2", "--sampler", "random", "--pruner", "none", "--storage", str(again),
                 "--study", "again") == 0
    a = [t.params for t in the_study().trials]
    b = [t.params for t in the_study(str(again)).trials]
    assert a == b and a[0] != a[1]


def test_per_trial_seeds_keep_parallel_workers_apart():
    from harness.spec import load_spec
    from harness.sweep.space import distributions, make_sampler

    spec = load_spec(SPEC)
    space = distributions(spec)
    study = optuna.create_study(direction="maximize")
    w0, w1 = make_sampler("random", spec, space), make_sampler("random", spec, space)
    seen = []
    for i in range(6):  # two workers, same seed, interleaved on one study
        study.sampler = (w0, w1)[i % 2]
        t = study.ask(fixed_distributions=space)
        seen.append(tuple(sorted(t.params.items())))
        study.tell(t, 0.5)
    assert len(set(seen)) == 6


# -- parallel workers and killed processes ------------------------------------------------------------------

def test_two_workers_end_with_exactly_n_trials_under_one_parent(fast_store, tmp_path):
    # Trials of ~2 s each (30 epochs, unpruned): the 6 of them outlast the few seconds by which one worker's
    # start-up can lag the other's on a loaded machine, so both workers get trials.
    long = ["train.epochs=30", "--pruner", "none"]
    r = run_cli("harness.sweep", SPEC, *FAST, *long, "--n-trials", "6", "--workers", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "database is locked" not in r.stderr
    study = the_study()
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == list(range(6))  # exactly N, no duplicate trial numbers
    assert all(s in ("COMPLETE", "PRUNED") for s in states(study))
    labels = {t.user_attrs["worker"]["label"] for t in study.trials}
    assert labels == {"w0", "w1"}  # both workers did trials
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 6
    parents, children = children_and_parent(fast_store)
    assert len(parents) == 1 and len(children) == 6
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert all(c.info.status == "FINISHED" for c in children)
    assert "[w0] trial" in r.stdout and "[w1] trial" in r.stdout and "best trials" in r.stdout


def test_sigkilled_sweep_leaves_a_stale_trial_that_the_next_start_fails_and_retries(fast_store, tmp_path):
    slow = ["train.epochs=40", "--n-trials", "2", "--pruner", "none"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "harness.sweep", SPEC, *FAST, *slow], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        victim = wait_for_a_trial_in_its_first_epochs(proc, tmp_path)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # The killed process left its trial RUNNING, and its MLflow run too.
    study = the_study()
    assert study.trials[victim.number].state == TrialState.RUNNING
    from mlflow import MlflowClient

    client = MlflowClient(fast_store)
    assert client.get_run(victim.user_attrs["mlflow_run_id"]).info.status == "RUNNING"

    from harness.sweep.cli import main

    assert main([SPEC, *FAST, *slow]) == 0
    study = the_study()
    stale = study.trials[victim.number]
    assert stale.state == TrialState.FAIL
    assert stale.user_attrs["failure_reason"].startswith("stale")
    run = client.get_run(victim.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["optuna.state"] == "FAIL"
    assert sum(s in ("COMPLETE", "PRUNED") for s in states(study)) == 2
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retried) == 1 and retried[0].params == victim.params
    assert retried[0].state == TrialState.COMPLETE
    assert not [r for r in all_runs(fast_store) if r.info.status == "RUNNING"]


def wait_for_a_trial_in_its_first_epochs(proc, tmp_path, timeout=240):
    """A trial RUNNING with its MLflow run id recorded (it finished an epoch), or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
        if not (tmp_path / JOURNAL).exists():
            continue
        try:
            study = the_study()
        except (AssertionError, KeyError):
            continue
        running = [t for t in study.trials
                   if t.state == TrialState.RUNNING and t.user_attrs.get("mlflow_run_id")]
        if running:
            return running[0]
    raise AssertionError("no trial got to its first epoch")


def test_sigterm_ends_the_trial_killed_and_queues_its_params_again(fast_store, tmp_path):
    slow = ["train.epochs=50", "--n-trials", "1", "--pruner", "none"]
    proc = subprocess.Popen([sys.executable, "-m", "harness.sweep", SPEC, *FAST, *slow], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        victim = wait_for_a_trial_in_its_first_epochs(proc, tmp_path)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    study = the_study()
    t = study.trials[victim.number]
    assert t.state == TrialState.FAIL and t.user_attrs["failure_reason"] == "interrupted"
    assert [w.params for w in study.trials if w.state == TrialState.WAITING] == [victim.params]
    from mlflow import MlflowClient

    client = MlflowClient(fast_store)
    run = client.get_run(victim.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["optuna.state"] == "FAIL"
    parent = children_and_parent(fast_store)[0][0]
    assert parent.info.status == "KILLED"
    from harness.sweep.cli import main

    assert main([SPEC, *FAST, *slow]) == 0  # resumes: the queued params run, the study completes
    study = the_study()
    assert [s for s in states(study)] == ["FAIL", "COMPLETE"]
    assert study.trials[1].params == victim.params
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


@pytest.mark.parametrize("instant", ["harness.sweep.worker.cleanup_stale", "harness.sweep.report.summarize"])
def test_sigterm_before_or_after_the_trials_leaves_no_parent_run_running(fast_store, tmp_path, instant):
    """A SIGTERM while the sweep starts (its parent run just made) or sums up: exit 130 in one line, and the
    parent run ended, never RUNNING (the signal's default action ended the process on the spot)."""
    module, name = instant.rsplit(".", 1)
    code = (f"import os, signal, sys, {module} as m\n"
            f"real = m.{name}\n"
            f"def at_the_instant(*a, **k):\n"
            f"    os.kill(os.getpid(), signal.SIGTERM)\n"
            f"    return real(*a, **k)\n"
            f"m.{name} = at_the_instant\n"
            f"from harness.sweep.cli import main\n"
            f"sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", code, SPEC, *FAST, "--n-trials", "1"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "interrupted" in proc.stderr
    (parent,) = children_and_parent(fast_store)[0]
    assert parent.info.status == ("KILLED" if "cleanup" in name else "FINISHED")


def test_retry_failed_queues_the_params_of_crashed_trials(fast_store):
    from harness.spec import load_spec
    from harness.sweep.space import distributions

    assert sweep("--n-trials", "1") == 0
    study = the_study()
    space = distributions(load_spec(SPEC, FAST))
    crashed = {"optimizer.lr": 0.02, "optimizer.momentum": 0.5, "model.dropout": 0.1}
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, params=crashed,
                                              distributions=space, user_attrs={"failure_reason": "boom"}))
    assert sweep("--n-trials", "2") == 0  # without the flag: a fresh trial, the crash stays as it was
    assert sweep("--n-trials", "3", "--retry-failed") == 0
    study = the_study()
    assert states(study) == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert study.trials[2].params != crashed
    assert study.trials[3].params == crashed and study.trials[3].system_attrs["failed_trial"] == 1


def test_optuna_database_lost_mid_trial_ends_the_sweep_with_its_parent_run_failed(fast_store, monkeypatch,
                                                                                 capsys):
    """A StoreError that is not about the tracking server (here dbretry giving up on the Optuna database
    at the trial's first report): one line, exit 2, and MLflow, still there, has the parent run FAILED."""
    from harness.errors import StoreError

    def database_gone(self, value, step):
        raise StoreError("the Optuna storage: the database has not answered for 60 s; run the same "
                         "command again once it is back")

    monkeypatch.setattr(optuna.trial.Trial, "report", database_gone)
    with pytest.raises(SystemExit) as e:
        sweep("--n-trials", "2")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("harness.sweep: error: the Optuna storage"), err
    (parent,), children = children_and_parent(fast_store)
    assert parent.info.status == "FAILED"
    assert [c.info.status for c in children] == ["FAILED"]


# -- pruning and divergence --------------------------------------------------------------------------------

def test_pruned_trial_keeps_its_curve_and_state_tag(fast_store, monkeypatch):
    import harness.sweep.space

    # A pruner that stops every trial at epoch 2 of 3: deterministic, unlike the median's verdicts.
    monkeypatch.setattr(harness.sweep.space, "make_pruner",
                        lambda name, spec: optuna.pruners.ThresholdPruner(lower=2.0, n_warmup_steps=2))
    assert sweep("--n-trials", "2", "train.epochs=3") == 0
    study = the_study()
    assert states(study) == ["PRUNED", "PRUNED"]
    from mlflow import MlflowClient

    client = MlflowClient(fast_store)
    for t in study.trials:
        assert sorted(t.intermediate_values) == [1, 2]
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert run.info.run_name == f"trial-{t.number} (pruned)"  # where a user looks first
        assert run.data.tags["optuna.state"] == "PRUNED"
        assert "pruned" in run.data.tags["stopped_early"]
        assert "failure_reason" not in run.data.tags  # pruned is not failed
        assert run.data.tags["mlflow.note.content"].startswith("**Pruned** by the median pruner at epoch 2")
        assert not t.user_attrs["failure_reason"] and "pruned" in t.user_attrs["stopped_early"]
        assert not [k for k in run.data.metrics if k.startswith("test/")]  # never tested, nothing made up
        curve = client.get_metric_history(run.info.run_id, "val/acc")
        assert [m.step for m in curve] == [1, 2]
        assert [m.value for m in curve] == [t.intermediate_values[1], t.intermediate_values[2]]
    parent = children_and_parent(fast_store)[0][0]
    assert parent.data.tags["sweep.trials_pruned"] == "2"
    assert "no trial has completed yet" in parent.data.tags["mlflow.note.content"].lower()
    assert "best/val/acc" not in parent.data.metrics


def test_without_a_pruner_reports_go_out_in_the_background_and_land_before_the_trial_ends(fast_store,
                                                                                        monkeypatch):
    """No pruner reads a trial's reports: they leave the main thread (a transaction each on a database
    storage) and the trial's end waits for them, even when the storage is slow."""
    import threading

    from optuna.storages import JournalStorage

    report = JournalStorage.set_trial_intermediate_value
    threads = []

    def slow_report(self, trial_id, step, value):
        threads.append(threading.current_thread().name)
        time.sleep(0.3)
        return report(self, trial_id, step, value)

    monkeypatch.setattr(JournalStorage, "set_trial_intermediate_value", slow_report)
    assert sweep("--n-trials", "2", "--pruner", "none", "train.epochs=3") == 0
    study = the_study()
    assert states(study) == ["COMPLETE", "COMPLETE"]
    for t in study.trials:
        assert sorted(t.intermediate_values) == [1, 2, 3] and t.value == t.intermediate_values[3]
        assert t.user_attrs["mlflow_run_id"] and t.user_attrs["failure_reason"] == ""
        assert t.user_attrs["epochs"] == 3
    assert len(threads) == 6 and "MainThread" not in threads


def test_median_and_hyperband_pruners_run(fast_store):
    assert sweep("--n-trials", "3", "--pruner", "hyperband", "--sampler", "random") == 0
    assert sweep("--n-trials", "3", "--pruner", "median", "--study", "median") == 0


def test_diverging_trial_is_recorded_and_the_sweep_goes_on(fast_store, tmp_path, capsys):
    spec = tmp_path / "diverge.yaml"
    spec.write_text(Path(SPEC).read_text() + (
        "search:\n"
        "  params:\n"
        "    optimizer.lr: {type: categorical, choices: [100000000.0, 0.05]}\n"))
    from harness.sweep.cli import main

    # grid: exactly the two values, whatever the seed; --n-trials is capped at the grid's size
    assert main([str(spec), *FAST, "--sampler", "grid", "--n-trials", "10"]) == 0
    study = the_study()
    by_lr = {t.params["optimizer.lr"]: t for t in study.trials}
    assert len(study.trials) == 2 and set(by_lr) == {1e8, 0.05}
    bad, good = by_lr[1e8], by_lr[0.05]
    assert bad.state == TrialState.PRUNED and bad.user_attrs["failure_reason"].startswith("diverged")
    assert good.state == TrialState.COMPLETE
    from mlflow import MlflowClient

    run = MlflowClient(fast_store).get_run(bad.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.info.run_name == f"trial-{bad.number} (diverged)"
    assert run.data.tags["optuna.state"] == "PRUNED"
    assert run.data.tags["failure_reason"].startswith("diverged")
    assert "diverged" in capsys.readouterr().out


def test_timeout_stops_starting_trials(fast_store):
    assert sweep("--n-trials", "50", "--timeout", "0.01") == 0
    assert 1 <= len(the_study().trials) < 50


# -- storages -------------------------------------------------------------------------------------------

def test_storage_choices(tmp_path, monkeypatch):
    from optuna.storages import JournalStorage, RDBStorage

    from harness.errors import StoreError
    from harness.sweep.storage import check_optuna_storage, optuna_storage, optuna_storage_kind

    monkeypatch.chdir(tmp_path)
    assert isinstance(optuna_storage(None), JournalStorage)
    assert (tmp_path / JOURNAL).exists()
    assert isinstance(optuna_storage("other/study.journal", workers=4), JournalStorage)
    rdb = optuna_storage(f"sqlite:///{tmp_path / 'o.db'}")
    assert isinstance(rdb, RDBStorage) and rdb.get_heartbeat_interval() == 10
    assert optuna_storage_kind("postgresql+psycopg2://u@h/db") == "rdb"
    with pytest.raises(StoreError, match="SQLite"):
        check_optuna_storage("sqlite:///o.db", 2)
    with pytest.raises(StoreError) as e:
        optuna_storage("postgresql+psycopg2://u:s3cret@127.0.0.1:1/db")
    assert "s3cret" not in str(e.value) and "***" in str(e.value) and "not reachable" in str(e.value)


def test_sqlite_storage_with_two_workers_is_refused(store, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sweep("--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--workers", "2")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SQLite" in err[0] and "--workers 2" in err[0]
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()


def test_sqlite_storage_with_one_worker_works(fast_store, tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert sweep("--storage", url, "--n-trials", "2") == 0
    assert len(the_study(url).trials) == 2


@pytest.mark.filterwarnings("ignore:Heartbeat")
def test_rdb_heartbeat_fails_a_silent_trial_of_another_host_and_retries_it(fast_store, tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert sweep("--storage", url, "--n-trials", "1") == 0
    study = the_study(url)
    from harness.spec import load_spec
    from harness.sweep.space import distributions

    # A worker on another machine took a trial, beat once, and died.
    ghost = study.ask(fixed_distributions=distributions(load_spec(SPEC, FAST)))
    ghost.set_user_attr("worker", {"host": "elsewhere", "pid": 1, "started": 0, "label": ""})
    study._storage.record_heartbeat(ghost._trial_id)
    # --heartbeat 1: stale after more than 3 s of silence (SQLite keeps whole seconds)
    time.sleep(4.2)
    assert sweep("--storage", url, "--n-trials", "2", "--heartbeat", "1") == 0
    study = the_study(url)
    assert states(study) == ["COMPLETE", "FAIL", "COMPLETE"]
    assert study.trials[2].params == ghost.params
    assert study.trials[2].system_attrs["failed_trial"] == ghost.number


# -- user errors and the CLI itself ---------------------------------------------------------------------

@pytest.mark.parametrize("override, words", [
    ("search.params.model.dropout.high=1.0", "search.params.model.dropout"),
    ("search.params.optimizer.lr.step=0.1", "search.params.optimizer.lr"),
    ("search.params.nope.key={low: 0, high: 1}", "nope.key"),
    ("search.metric=test/acc", "search.metric"),
])
def test_bad_search_block_is_one_line_and_exit_2(store, tmp_path, capsys, override, words):
    with pytest.raises(SystemExit) as e:
        sweep(override)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "mlflow.db").exists()


def test_grid_needs_steps(store, capsys):
    with pytest.raises(SystemExit) as e:
        sweep("--sampler", "grid")
    assert e.value.code == 2 and "grid" in capsys.readouterr().err


def test_a_study_made_for_another_spec_is_refused(fast_store, capsys):
    assert sweep("--n-trials", "1", "--study", "mine") == 0
    with pytest.raises(SystemExit) as e:
        sweep("--n-trials", "1", "--study", "mine", "model.dropout=0.5")
    assert e.value.code == 2 and "another spec" in capsys.readouterr().err


def test_help_is_fast_and_imports_nothing_heavy(tmp_path):
    t = time.perf_counter()
    r = run_cli("harness.sweep", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "--n-trials" in r.stdout and "--workers" in r.stdout
    assert time.perf_counter() - t < 10
    probe = ("import sys; from harness.sweep.cli import parse_args; parse_args(['--n-trials', '3']); "
             "print(sorted(m for m in ('torch', 'mlflow', 'optuna', 'pandas') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


@pytest.mark.parametrize("args, words", [
    (["--n-trials", "0"], "--n-trials: must be positive, got 0"),
    (["--workers", "1.5"], "--workers: expected a whole number, got '1.5'"),
    (["--timeout", "soon"], "--timeout: expected seconds, got 'soon'"),
    (["--heartbeat", "-3"], "--heartbeat: must be positive, got -3"),
])
def test_bad_option_values_are_one_line_and_exit_2(capsys, args, words):
    from harness.sweep.cli import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert words in err[-1], err


def test_options_and_overrides_mix_in_any_order():
    from harness.sweep.cli import parse_args

    a = parse_args(["s.yaml", "train.epochs=2", "--n-trials", "3", "model.dropout=0.1"])
    assert a.spec == "s.yaml" and a.overrides == ["train.epochs=2", "model.dropout=0.1"]
    b = parse_args(["train.epochs=2", "--workers", "2"])
    assert b.spec is None and b.overrides == ["train.epochs=2"] and b.workers == 2


def test_check_storage_runs_the_doctor(fast_store, tmp_path):
    (tmp_path / "mlruns").mkdir()  # as in a clone (mlruns/.gitkeep)
    r = run_cli("harness.sweep", SPEC, "--check-storage", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "storage doctor" in r.stdout


def test_a_trial_failed_as_stale_by_another_worker_stops_in_one_line(store, tmp_path, caplog):
    """While a trial trains, another worker may fail it as stale (its heartbeat lost in a long stall,
    such as a database restart) and queue its params again. The trial's own worker then stops it with a
    warning, not a crash report with a traceback, and its MLflow run is ended, not left RUNNING."""
    import logging

    from harness.sweep.cli import parse_args
    from harness.sweep.context import open_context
    from harness.sweep.worker import run_trial

    ctx = open_context(parse_args([SPEC, *FAST, "--n-trials", "1",
                                   "--storage", str(tmp_path / "optuna.journal")]))
    trial = ctx.study.ask()
    ctx.study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)  # the other worker
    with caplog.at_level(logging.WARNING, logger="harness.sweep"):
        outcome = run_trial(ctx, trial)
    assert outcome.state == TrialState.FAIL and "failed as stale by another worker" in outcome.reason
    assert "crashed" not in caplog.text and "Traceback" not in caplog.text
    (r,) = all_runs(store)
    assert r.info.status != "RUNNING" and r.data.tags["optuna.state"] == "FAIL"
