"""What the MLflow tracker asks the store, and when: the experiment looked up once per process, requests
sent in the background while a run trains (in order, waited for at the run's end, their errors not
lost), on a real SQLite store."""
from __future__ import annotations

import os
import signal
import threading

import pytest

from conftest import all_runs, tiny_digits_spec


def test_a_run_after_its_experiment_was_deleted_lands_in_it_restored(fast_store):
    """A process looks the experiment up once (a request per run to a tracking server otherwise): when a
    user deletes the experiment between two runs of one process, the next run finds it again, restored."""
    from mlflow import MlflowClient

    from harness.run import run

    spec = tiny_digits_spec()
    first = run(spec, progress=False).run_id
    client = MlflowClient(fast_store)
    exp_id = client.get_run(first).info.experiment_id
    client.delete_experiment(exp_id)
    second = run(spec, progress=False).run_id
    assert client.get_run(second).info.experiment_id == exp_id
    assert client.get_experiment(exp_id).lifecycle_stage == "active"
    assert {r.info.status for r in all_runs(fast_store)} == {"FINISHED"}


def test_requests_sent_in_the_background_land_in_order_before_the_next_one(fast_store):
    from mlflow import MlflowClient

    from harness.tracking.mlflow_tracker import MlflowTracker

    t = MlflowTracker()
    with t.start(experiment="bg"):
        with t.in_background():
            t.log_params({"a": 1})
            t.set_tags({"first": "1"})
            t.log_text("x: 1\n", "spec.yaml")
            t.log_text("{}", ".notes/a.json")  # a folder whose name starts with a dot keeps it
            t.set_tags({"first": "2"})  # the same tag again: the later write must win
        snap = t.snapshot()  # a request made outside waits for the background ones
        assert snap.params == {"a": "1"} and snap.tags["first"] == "2"
    run = MlflowClient(fast_store).get_run(t.run_id)
    assert run.info.status == "FINISHED"
    client = MlflowClient(fast_store)
    assert sorted(f.path for f in client.list_artifacts(t.run_id)) == [".notes", "spec.yaml"]
    assert [f.path for f in client.list_artifacts(t.run_id, ".notes")] == [".notes/a.json"]


def test_a_failed_background_request_fails_the_run_at_its_end(fast_store):
    """MLflow refuses to change a logged param: sent in the background, the refusal is raised at the run's
    end (not lost), and the run ends FAILED with what it logged before."""
    from mlflow.exceptions import MlflowException

    from harness.tracking.mlflow_tracker import MlflowTracker

    t = MlflowTracker()
    with pytest.raises(MlflowException, match="(?i)param"):
        with t.start(experiment="bg"):
            t.log_params({"a": 1})
            with t.in_background():
                t.log_params({"a": 2})
            t.log_metrics({"m": 1.0}, step=1)
    (r,) = all_runs(fast_store)
    assert r.info.status == "FAILED" and r.data.params == {"a": "1"}


def test_a_run_failing_on_its_own_keeps_its_error_over_a_background_one(fast_store):
    from harness.tracking.mlflow_tracker import MlflowTracker

    t = MlflowTracker()
    with pytest.raises(ZeroDivisionError):
        with t.start(experiment="bg"):
            t.log_params({"a": 1})
            with t.in_background():
                t.log_params({"a": 2})
            1 / 0
    (r,) = all_runs(fast_store)
    assert r.info.status == "FAILED"


def test_a_new_run_logs_params_spec_and_datasets_from_the_background(fast_store):
    """The run's start logs in the background: all of it is in the store when the run ends."""
    from mlflow import MlflowClient

    from harness.run import run

    rid = run(tiny_digits_spec(), progress=False).run_id
    c = MlflowClient(fast_store)
    r = c.get_run(rid)
    assert r.data.params["train.epochs"] == "2" and r.data.params["data.num_classes"] == "10"
    assert {d.dataset.name.split("-")[-1] for d in r.inputs.dataset_inputs} == {"val", "test"}
    assert "spec.yaml" in [f.path for f in c.list_artifacts(rid)]


def test_sigterm_while_the_end_waits_for_the_background_ends_the_run_killed(fast_store):
    """The run's end waits for its background requests; a SIGTERM (a Ctrl-C alike) meanwhile still ends it,
    KILLED. SIGTERM, because a shell's background job, as CI may run pytest, ignores SIGINT."""
    from harness.tracking.mlflow_tracker import MlflowTracker

    t = MlflowTracker()
    release = threading.Event()
    try:
        with pytest.raises(KeyboardInterrupt):
            with t.start(experiment="bg"):
                with t.in_background():
                    t._send(release.wait, 30)  # a request that hangs, as to a server that stopped answering
                    t.log_params({"dropped": 1})  # not begun when the Ctrl-C comes: dropped
                threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    finally:
        release.set()
    (r,) = all_runs(fast_store)
    assert r.info.status == "KILLED" and "dropped" not in r.data.params


def test_a_child_run_names_its_parent_without_reading_it(fast_store):
    """A child run (a sweep's trial) carries MLflow's parent tag without a read of the parent first (a
    request per trial to a tracking server); a parent deleted meanwhile no longer stops its children:
    they land under it, and the sweep's next start restores it."""
    from mlflow import MlflowClient

    from harness.tracking.mlflow_tracker import MlflowTracker

    client = MlflowClient(fast_store)
    parent = MlflowTracker()
    with parent.start(experiment="family"):
        pass
    child = MlflowTracker()
    with child.start(experiment="family", parent_run_id=parent.run_id, tags={"role": "child"}):
        child.log_metrics({"m": 1.0}, step=1)
        child.flush()
    run = client.get_run(child.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id and run.data.tags["role"] == "child"
    assert run.info.status == "FINISHED" and run.data.metrics == {"m": 1.0}
    client.delete_run(parent.run_id)
    orphan = MlflowTracker()
    with orphan.start(experiment="family", parent_run_id=parent.run_id):
        pass
    assert client.get_run(orphan.run_id).data.tags["mlflow.parentRunId"] == parent.run_id
    assert client.get_run(orphan.run_id).info.status == "FINISHED"


def test_a_wait_interrupted_by_ctrl_c_still_waits_at_the_end():
    """A Ctrl-C while waiting for a background request must not forget it: the run's (or trial's) end
    waits for it again, or its write could land after the end was written."""
    from harness.tracking.sender import Sender

    send, landed, release = Sender(), [], threading.Event()

    def slow_request():
        release.wait(10)
        landed.append("request")

    with send.background():
        send(slow_request)

    def ctrl_c(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, ctrl_c)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(KeyboardInterrupt):
            send.wait()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert landed == []
    threading.Timer(0.3, release.set).start()
    assert send.settle(quietly=True) is None
    assert landed == ["request"]
