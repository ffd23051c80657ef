"""One run end to end on CPU, as a user starts it: ``python -m harness.train experiments/digits_lenet.yaml``.

What must land in MLflow: the flattened params, per-epoch train/* and val/* curves (step = epoch),
the running loss (step = global batch index), test/* at the end, the reproducibility tags, the resolved
spec, checkpoints, and a model that loads back and predicts. Runs always end in a final state."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY, all_runs, run_cli, tiny_digits_spec
from harness.errors import UserError
from harness.spec import load_spec

DIGITS = str(ROOT / "experiments" / "digits_lenet.yaml")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, _migrated_mlflow_db):
    """The issue's done criterion, run once for the module: the shipped spec, unchanged, via the CLI."""
    from mlflow import MlflowClient

    work = tmp_path_factory.mktemp("digits-run")
    shutil.copyfile(_migrated_mlflow_db, work / "mlflow.db")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    t = time.perf_counter()
    r = run_cli("harness.train", DIGITS, "--quiet", cwd=work, env={"MLFLOW_TRACKING_URI": uri}, timeout=600)
    seconds = time.perf_counter() - t
    assert r.returncode == 0, r.stderr
    (run,) = all_runs(uri)
    return {"uri": uri, "work": work, "run": run, "client": MlflowClient(uri), "stdout": r.stdout,
            "stderr": r.stderr, "seconds": seconds}


def _history(client, run_id, key):
    return client.get_metric_history(run_id, key)


def test_done_criterion_val_acc_at_least_095(digits_run):
    run, client = digits_run["run"], digits_run["client"]
    assert run.info.status == "FINISHED"
    val_acc = sorted(_history(client, run.info.run_id, "val/acc"), key=lambda m: m.step)
    assert len(val_acc) == 20
    assert val_acc[-1].step == 20 and val_acc[-1].value >= 0.95, [m.value for m in val_acc]
    assert f"val/acc {val_acc[-1].value:.4f}" in digits_run["stdout"]
    assert "Traceback" not in digits_run["stderr"]


def test_params_are_the_flattened_spec(digits_run):
    params = digits_run["run"].data.params
    spec = load_spec(DIGITS)
    for key, value in spec.params().items():
        expected = json.dumps(list(value)) if isinstance(value, (list, tuple)) else str(value)
        assert params[key] == expected, key
    assert params["optimizer.lr"] == "0.05" and params["optimizer.momentum"] == "0.9"
    assert params["model.dropout"] == "0.0" and params["mode_bug"] == "none"
    assert params["seed"] == "0" and params["data.dataset"] == "digits"
    assert params["data.size.train"] == "1150" and params["data.size.val"] == "288"


def test_per_epoch_curves_step_is_the_epoch(digits_run):
    run, client = digits_run["run"], digits_run["client"]
    for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
        hist = _history(client, run.info.run_id, key)
        assert sorted(m.step for m in hist) == list(range(1, 21)), key
        assert all(math.isfinite(m.value) for m in hist)
    acc = [m.value for m in sorted(_history(client, run.info.run_id, "train/acc"), key=lambda m: m.step)]
    loss = [m.value for m in sorted(_history(client, run.info.run_id, "train/loss"), key=lambda m: m.step)]
    assert all(0 <= a <= 1 for a in acc) and loss[-1] < loss[0] / 5  # it learned


def test_running_loss_step_is_the_global_batch_index(digits_run):
    run, client = digits_run["run"], digits_run["client"]
    spec = load_spec(DIGITS)
    n_batches = math.ceil(int(run.data.params["data.size.train"]) / spec.data.batch_size)
    every = spec.train.log_every
    expected = [(e - 1) * n_batches + i for e in range(1, spec.train.epochs + 1)
                for i in range(every, n_batches + 1, every)]
    steps = sorted(m.step for m in _history(client, run.info.run_id, "train/running_loss"))
    assert steps == expected


def test_test_metrics_at_the_end(digits_run):
    run, client = digits_run["run"], digits_run["client"]
    for key in ("test/loss", "test/acc"):
        (m,) = _history(client, run.info.run_id, key)
        assert m.step == 20
    assert run.data.metrics["test/acc"] > 0.9


def test_reproducibility_tags(digits_run):
    tags = digits_run["run"].data.tags
    assert re.fullmatch(r"[0-9a-f]{40}", tags["git_commit"])
    assert tags["spec_hash"] == load_spec(DIGITS).hash()
    assert tags["torch_version"] == torch.__version__
    assert tags["device"] == "cpu"
    assert tags["sanity_check"] == "ok"
    inputs = {d.dataset.name: d for d in digits_run["run"].inputs.dataset_inputs}
    assert set(inputs) == {"digits-val", "digits-test"}  # the splits val/* and test/* were measured on
    profile = json.loads(inputs["digits-val"].dataset.profile)
    assert profile["targets_shape"] == [int(digits_run["run"].data.params["data.size.val"])]
    # the source is the file scikit-learn read the digits from, not the code that ran
    source = json.loads(inputs["digits-test"].dataset.source)["uri"]
    assert source.startswith("file://") and source.endswith("sklearn/datasets/data/digits.csv.gz")


def test_run_is_named_from_its_spec(digits_run):
    assert digits_run["run"].info.run_name == "digits-lenet/lenet-s0"


def test_resolved_spec_artifact(digits_run, tmp_path):
    from mlflow.artifacts import download_artifacts

    run = digits_run["run"]
    path = download_artifacts(run_id=run.info.run_id, artifact_path="spec.yaml", dst_path=str(tmp_path),
                              tracking_uri=digits_run["uri"])
    spec = load_spec(path)
    assert spec == load_spec(DIGITS)
    assert spec.hash() == run.data.tags["spec_hash"]


def test_checkpoints_last_and_best(digits_run, tmp_path):
    from mlflow.artifacts import download_artifacts

    from harness.core.checkpoint import load_checkpoint

    run, client = digits_run["run"], digits_run["client"]
    names = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert names == {"checkpoints/last.pt", "checkpoints/best.pt"}
    get = lambda name: load_checkpoint(download_artifacts(  # noqa: E731
        run_id=run.info.run_id, artifact_path=f"checkpoints/{name}", dst_path=str(tmp_path / name),
        tracking_uri=digits_run["uri"]))
    last, best = get("last.pt"), get("best.pt")
    val_acc = [m.value for m in sorted(_history(client, run.info.run_id, "val/acc"), key=lambda m: m.step)]
    assert last["epoch"] == 20 and last["spec_hash"] == run.data.tags["spec_hash"]
    assert last["history"]["val/acc"] == val_acc
    assert best["epoch"] == val_acc.index(max(val_acc)) + 1 and best["best"] == max(val_acc)
    assert set(last) >= {"model", "optimizer", "epoch", "rng", "spec_hash"}


def test_logged_model_loads_and_predicts(digits_run, tmp_path):
    import mlflow

    from harness.core.data import load_data
    from harness.core.loop import evaluate
    from harness.core.models import build_model

    run = digits_run["run"]
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(digits_run["uri"])
    try:
        models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                             filter_string=f"source_run_id = '{run.info.run_id}'")
        assert len(models) == 1 and models[0].name == "digits-lenet-lenet-s0"  # after its run
        assert run.outputs.model_outputs[0].model_id == models[0].model_id
        # the final metrics are the model's too, each with the split it was measured on, so the
        # Models page ranks models; the run's own curves gain no point by it
        linked = {m.key: m for m in models[0].metrics}
        assert set(linked) == {"val/acc", "val/loss", "test/acc", "test/loss"}
        for key, m in linked.items():
            assert m.value == run.data.metrics[key] and m.step == 20
            assert m.dataset_name == f"digits-{key.split('/')[0]}"
        assert len(digits_run["client"].get_metric_history(run.info.run_id, "test/acc")) == 1
        assert models[0].params["optimizer.lr"] == "0.05"
        model = mlflow.pytorch.load_model(f"models:/{models[0].model_id}")
    finally:
        mlflow.set_tracking_uri(previous)
    spec = load_spec(DIGITS)
    data = load_data(spec.data, spec.seed, torch.device("cpu"))
    x, _ = next(iter(data.val))
    assert model(x).shape == (len(x), 10)
    # It is the final model: its accuracy on the validation split is the last val/acc logged.
    m = evaluate(model, data.val, torch.device("cpu"))
    assert m["val/acc"] == pytest.approx(run.data.metrics["val/acc"], abs=1.5 / data.sizes["val"])
    # ... and the same weights as the last checkpoint.
    from mlflow.artifacts import download_artifacts

    from harness.core.checkpoint import load_checkpoint

    state = load_checkpoint(download_artifacts(run_id=run.info.run_id, artifact_path="checkpoints/last.pt",
                                               dst_path=str(tmp_path), tracking_uri=digits_run["uri"]))
    fresh = build_model(spec.model, data.input_shape, data.num_classes)
    fresh.load_state_dict(state["model"])
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x).argmax(1), model(x).argmax(1))


# -- final states, in process --------------------------------------------------------------------------

def test_logging_the_model_does_not_load_lightning():
    """mlflow.pytorch imports Lightning (2.5-4 s) for an autologging callback the harness never uses;
    the tracker imports it without, and the callback still imports when someone asks for it."""
    pytest.importorskip("pytorch_lightning")
    code = ("import sys; from harness.tracking.logged_models import mlflow_pytorch; m = mlflow_pytorch(); "
            "assert callable(m.log_model) and callable(m.load_model); "
            "assert 'pytorch_lightning' not in sys.modules and 'lightning' not in sys.modules, 'loaded'; "
            "import mlflow.pytorch._lightning_autolog as cb; print(cb.MlflowModelCheckpointCallback.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "MlflowModelCheckpointCallback"


@pytest.mark.parametrize("exc, status", [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_an_exception_ends_the_run_in_a_final_state(fast_store, exc, status):
    import mlflow

    from harness.run import run

    def on_epoch(epoch, metrics):
        raise exc

    with pytest.raises(type(exc)):
        run(tiny_digits_spec(), on_epoch=on_epoch, progress=False)
    (r,) = all_runs(fast_store)
    assert r.info.status == status
    assert "val/acc" in r.data.metrics  # what was measured before the failure is kept
    assert mlflow.active_run() is None


def test_stopped_ends_finished_with_its_curves(fast_store):
    from harness.core.loop import Stopped
    from harness.run import run

    def on_epoch(epoch, metrics):
        raise Stopped("pruned at epoch 1")

    with pytest.raises(Stopped):
        run(tiny_digits_spec(), on_epoch=on_epoch, progress=False)
    (r,) = all_runs(fast_store)
    assert r.info.status == "FINISHED" and r.data.tags["stopped_early"] == "pruned at epoch 1"
    assert len(r.data.metrics) > 0 and "test/acc" not in r.data.metrics


def test_system_metrics_cover_a_run_shorter_than_one_sampling_interval(fast_store, monkeypatch):
    from mlflow import MlflowClient

    from harness.run import run

    # MLflow's own monitor logs nothing for a run shorter than its interval; here the tail counts.
    # Thirty epochs of all of digits: 1-3 s (0.4 s for twelve on a quiet machine was too close), longer
    # than the shortest tail worth a CPU reading (sysmetrics.MIN_TAIL_S), far shorter than 30 s.
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "30")
    from harness.tracking.sysmetrics import MIN_TAIL_S

    spec = load_spec(DIGITS, [*TINY, "train.checkpoint=false", "train.epochs=30"])
    result = run(spec, progress=False, system_metrics=True)
    assert 2 * MIN_TAIL_S < result.seconds < 20  # the premise
    client = MlflowClient(fast_store)
    cpu = client.get_metric_history(result.run_id, "system/cpu_utilization_percentage")
    memory = client.get_metric_history(result.run_id, "system/system_memory_usage_megabytes")
    assert len(cpu) >= 1 and len(memory) == len(cpu)
    assert sorted(m.step for m in cpu) == list(range(1, len(cpu) + 1))  # step 0 is where models link
    # a reading over the run (it trained: the CPU was busy), not psutil's meaningless first 0.0
    assert all(0 < m.value <= 100 for m in cpu) and all(m.value > 0 for m in memory)


def test_system_metrics_follow_mlflows_switch(fast_store):
    from harness.run import run

    result = run(tiny_digits_spec("train.epochs=1"), progress=False, system_metrics=None)  # conftest: false
    (r,) = all_runs(fast_store)
    assert r.info.run_id == result.run_id and not [k for k in r.data.metrics if k.startswith("system/")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_a_user_error_and_makes_no_run(fast_store):
    from harness.run import run

    with pytest.raises(UserError, match="train.device=cuda"):
        run(tiny_digits_spec("train.device=cuda"), progress=False)
    assert all_runs(fast_store) == []


def test_a_signal_during_a_store_write_takes_effect_after_it():
    """Uploads run under signals_deferred: a SIGTERM or Ctrl-C arriving mid-write lets the write finish,
    then ends the run; a second one does not wait (a store that hangs must not hold the user)."""
    from harness.cli import Terminated, signals_deferred, sigterm_as_interrupt

    done = []
    with sigterm_as_interrupt(), pytest.raises(Terminated):
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # a handler would have run by now
            done.append("write finished")
    assert done == ["write finished"]
    # Python's own Ctrl-C handler, as under a terminal (a shell's background job starts with it ignored)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                done.append("never")
        assert done == ["write finished"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers given back
    finally:
        signal.signal(signal.SIGINT, outer)


class _SignalsWhenDropped:
    """Sends a signal to this process from its finalizer: Python runs the handler inside the finalizer,
    where an exception is printed as "Exception ignored" and dropped, as when the garbage collector
    happens to run at the instant a SIGTERM comes."""

    def __init__(self, signum: int):
        self.signum = signum

    def __del__(self):
        os.kill(os.getpid(), self.signum)
        time.sleep(0.01)  # the handler runs here, inside the finalizer


@pytest.mark.parametrize("signum, raised", [(signal.SIGTERM, "Terminated"), (signal.SIGINT, "KeyboardInterrupt")])
def test_a_signal_python_swallows_in_a_finalizer_still_takes_effect(capfd, signum, raised):
    from harness.cli import check_interrupt, sigterm_as_interrupt

    outer = signal.signal(signal.SIGINT, signal.default_int_handler)  # as under a terminal
    went_on = []
    try:
        with pytest.raises(KeyboardInterrupt) as e:
            with sigterm_as_interrupt():
                _SignalsWhenDropped(signum)  # dropped at once
                went_on.append("the block went on")  # Python dropped the exception...
                check_interrupt()  # ... raised here, where a run can stop
                went_on.append("never")
        assert type(e.value).__name__ == raised and went_on == ["the block went on"]
        with pytest.raises(KeyboardInterrupt):  # nothing checked inside: the block's end raises it
            with sigterm_as_interrupt():
                _SignalsWhenDropped(signum)
        with sigterm_as_interrupt():  # raised once: nothing is left over for the next block
            check_interrupt()
    finally:
        signal.signal(signal.SIGINT, outer)
    assert "Exception ignored" not in capfd.readouterr().err


SWALLOWING_MODEL = """
import os, signal, time
from torch import nn


class Dropped:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)


class Net(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.fc = nn.Linear(input_shape[0] * input_shape[1] * input_shape[2], num_classes)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == int(os.environ["SIGNAL_AT_CALL"]):
            Dropped()
        return self.fc(x.flatten(1))


def net(input_shape, num_classes):
    return Net(input_shape, num_classes)
"""


def test_sigterm_swallowed_in_a_finalizer_still_ends_the_run_killed(fast_store, tmp_path):
    """A SIGTERM that reaches the process while a finalizer runs (Python drops the exception) stops the run
    at the next batch: before, the run trained on to FINISHED and exited 0, the signal lost."""
    (tmp_path / "swallowing.py").write_text(SWALLOWING_MODEL)
    r = run_cli("harness.train", DIGITS, "model.arch=swallowing:net", "model.dropout=0", "train.epochs=50",
                "train.sanity_check=false", "train.log_model=false", "--quiet", cwd=tmp_path,
                env={"MLFLOW_TRACKING_URI": fast_store, "SIGNAL_AT_CALL": "40",
                     "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"})
    assert r.returncode == 130 and "harness.train: interrupted" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr[-3000:]
    (run_,) = all_runs(fast_store)
    assert run_.info.status == "KILLED"
    from mlflow import MlflowClient

    assert len(MlflowClient(fast_store).get_metric_history(run_.info.run_id, "val/acc")) < 50


def test_sigterm_marks_the_run_killed(fast_store, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(fast_store)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": fast_store}
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.train", DIGITS, "train.epochs=5000", "train.log_model=false", "--quiet"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the run never started"
            runs = all_runs(fast_store)
            if runs and runs[0].info.status == "RUNNING" and client.get_metric_history(runs[0].info.run_id,
                                                                                       "val/acc"):
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode not in (0, None)
    assert "Traceback" not in err, err
    assert "harness.train: interrupted" in err
    (r,) = all_runs(fast_store)
    assert r.info.status == "KILLED"
    assert r.info.end_time is not None


def test_the_default_run_name_fits_what_mlflow_stores():
    """<name>/<arch>-s<seed>, cut in the middle where a factory path makes it longer than a run name may
    be (PostgreSQL refuses it; SQLite would keep it)."""
    from harness.cli import MAX_NAME
    from harness.run import default_run_name
    from harness.spec import load_spec

    spec = load_spec(DIGITS)
    assert default_run_name(spec) == f"{spec.name}/lenet-s0"
    long = spec.model_copy(update={"name": "n" * 200, "seed": 7,
                                   "model": spec.model.model_copy(update={"arch": "pkg." * 30 + "mod:net"})})
    name = default_run_name(long)
    assert len(name) == MAX_NAME and name.startswith("n" * 200 + "/pkg.") and name.endswith("-s7")
