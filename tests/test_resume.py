"""Resuming: a run killed after epoch k and resumed ends with the same numbers as an uninterrupted one;
a different spec or a tampered checkpoint is refused; checkpoints load with weights_only=True."""
from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import torch
from torch import nn

from conftest import ROOT, all_runs, run_cli
from harness.core.checkpoint import load_checkpoint, save_checkpoint
from harness.core.rng import set_rng_state
from harness.errors import CheckpointError

DIGITS = str(ROOT / "experiments" / "digits_lenet.yaml")
# Small batches make epochs long enough to kill one mid-run; one thread keeps the arithmetic identical
# between processes (and is kind to a shared machine). Dropout makes the RNG state part of the story.
# Every epoch uploaded (train.upload_every_s=0), so the test sees the epochs come in and kills mid-run.
ARGS = [DIGITS, "train.epochs=8", "data.batch_size=25", "model.dropout=0.2", "train.threads=1",
        "train.log_model=false", "train.upload_every_s=0"]
FINAL = ("train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc")


def _last_per_step(client, run_id, key):
    out = {}
    for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp)):
        out[m.step] = m.value
    return out


def _artifact_file(run, path: str) -> Path:
    return Path(unquote(urlparse(run.info.artifact_uri).path)) / path


def _one_error_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("harness.train: error: ") and "Traceback" not in r.stderr
    return lines[0]


def test_killed_run_resumes_to_the_same_numbers(fast_store, tmp_path):
    from mlflow import MlflowClient

    from harness.run import run
    from harness.errors import UserError
    from harness.spec import load_spec

    client = MlflowClient(fast_store)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": fast_store}

    # The victim: SIGKILLed (no handler can run) once it has logged two epochs.
    proc = subprocess.Popen([sys.executable, "-m", "harness.train", *ARGS, "--quiet"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"finished before it could be killed: {proc.communicate()[1]}"
            assert time.monotonic() < deadline
            runs = all_runs(fast_store)
            if runs and len(client.get_metric_history(runs[0].info.run_id, "val/acc")) >= 2:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (victim,) = all_runs(fast_store)
    run_id = victim.info.run_id
    assert victim.info.status == "RUNNING"  # SIGKILL leaves it so; resuming finishes it
    logged = len(client.get_metric_history(run_id, "val/acc"))
    assert 2 <= logged < 8

    # A spec that changes the numbers is refused, naming the field, and the refusal leaves the run
    # untouched.
    r = run_cli("harness.train", *ARGS, "optimizer.lr=0.01", "--resume", run_id, "--quiet", cwd=tmp_path)
    assert r.returncode == 2
    assert "other values of optimizer.lr (optimizer.lr: 0.05 -> 0.01)" in _one_error_line(r)
    assert client.get_run(run_id).info.status == "RUNNING"

    # The newest checkpoint torn, as a kill mid-copy leaves it: the resume goes back to the older whole
    # one (best.pt) and, the run being deterministic, still ends with the uninterrupted numbers.
    ckpt = _artifact_file(victim, "checkpoints/last.pt")
    good = ckpt.read_bytes()
    ckpt.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(ckpt)

    # The resume proper, then an uninterrupted run of the same spec for reference.
    scratch = tmp_path / "tmpdir"  # the resume's own temporary files, all removed when it ends
    scratch.mkdir()
    r = run_cli("harness.train", *ARGS, "--resume", run_id, "--quiet", cwd=tmp_path, env={"TMPDIR": str(scratch)})
    assert r.returncode == 0, r.stderr
    # (torch's own compile cache and the empty folder of run locks may stay)
    left = [p for p in scratch.rglob("*") if not p.name.startswith(("torchinductor", "harness-locks"))
            and "torchinductor" not in str(p)]
    assert not left, left
    assert "checkpoints/last.pt was torn and skipped" in client.get_run(run_id).data.tags["resumed_from"]
    r = run_cli("harness.train", *ARGS, "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    resumed = client.get_run(run_id)
    (reference,) = [x for x in all_runs(fast_store) if x.info.run_id != run_id]
    assert resumed.info.status == "FINISHED" and reference.info.status == "FINISHED"
    resumed_from = int(resumed.data.tags["resumed_from_epoch"])
    assert 0 <= resumed_from <= logged
    for key in FINAL:
        assert resumed.data.metrics[key] == pytest.approx(reference.data.metrics[key], abs=1e-6), key
    # Not only the end: every epoch's curve matches, the killed part and the resumed part.
    for key in ("train/loss", "val/loss", "val/acc"):
        a, b = _last_per_step(client, run_id, key), _last_per_step(client, reference.info.run_id, key)
        assert sorted(a) == sorted(b) == list(range(1, 9))
        assert all(a[s] == pytest.approx(b[s], abs=1e-6) for s in a), key
    a = _last_per_step(client, run_id, "train/running_loss")
    b = _last_per_step(client, reference.info.run_id, "train/running_loss")
    assert sorted(a) == sorted(b) and all(a[s] == pytest.approx(b[s], abs=1e-6) for s in a)

    # A finished run cannot be resumed again.
    with pytest.raises(UserError, match="already finished"):
        run(load_spec(ARGS[0], ARGS[1:]), resume_run_id=run_id, progress=False)
    assert client.get_run(run_id).info.status == "FINISHED"


def test_resume_of_an_unknown_run_is_a_user_error(fast_store, tmp_path):
    from harness.run import run
    from harness.errors import UserError
    from harness.spec import load_spec

    with pytest.raises(UserError, match="--resume 0123456789abcdef"):
        run(load_spec(DIGITS, ["train.epochs=2", "train.log_model=false"]),
            resume_run_id="0123456789abcdef", progress=False)
    assert all_runs(fast_store) == []


# -- checkpoint files ----------------------------------------------------------------------------------

def _state(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(16, 4)).sum().backward()
    opt.step()
    path = save_checkpoint(tmp_path / "ck" / "last.pt", model=model, optimizer=opt, epoch=3, spec_hash="abc",
                           best=0.5, history={"val/acc": [0.1, 0.3, 0.5]})
    return model, opt, path


def test_checkpoint_round_trip_restores_everything(tmp_path):
    model, opt, path = _state(tmp_path)
    assert not list(path.parent.glob("*.tmp"))  # written via a temp file and a rename
    # The RNG states at save time come back: the next random numbers are the same.
    expected = (torch.rand(3), np.random.rand(3), random.random())
    state = load_checkpoint(path)
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    set_rng_state(state["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]
    assert state["epoch"] == 3 and state["spec_hash"] == "abc" and state["best"] == 0.5
    assert state["history"] == {"val/acc": [0.1, 0.3, 0.5]}
    fresh = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    fresh.load_state_dict(state["model"])
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(state["optimizer"])
    buf = [opt.state[p]["momentum_buffer"] for p in model.parameters()]
    buf2 = [opt2.state[p]["momentum_buffer"] for p in fresh.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(buf, buf2))


class _Payload:
    """A pickle that runs code when loaded without weights_only: it creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tamper(kind: str, good: bytes, path: Path, marker: Path) -> None:
    if kind == "code":
        torch.save({"model": {}, "epoch": 1, "evil": _Payload(marker)}, path)
    elif kind == "module":  # a whole pickled module instead of a state dict
        torch.save({"model": nn.Linear(2, 2), "epoch": 1}, path)
    elif kind == "plain-pickle":
        path.write_bytes(pickle.dumps({"epoch": 1, "evil": _Payload(marker)}))
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 3])
    elif kind == "garbage":
        path.write_bytes(os.urandom(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "not-a-checkpoint":  # a valid weights file, but a bare state dict
        torch.save(nn.Linear(2, 2).state_dict(), path)


@pytest.mark.parametrize("kind", ["code", "module", "plain-pickle", "truncated", "garbage", "empty",
                                  "not-a-checkpoint"])
def test_tampered_checkpoint_is_refused(tmp_path, kind):
    _, _, path = _state(tmp_path)
    marker = tmp_path / "pwned"
    _tamper(kind, path.read_bytes(), path, marker)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    assert not marker.exists()  # the payload never ran


def test_missing_checkpoint_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_damaged_checkpoints_never_escape_as_other_errors(tmp_path):
    # Truncation at any length and random byte flips: torch.load fails in a dozen different ways (zip,
    # pickle, EOF, OSError, UnicodeDecodeError, KeyError ...); every one must become a CheckpointError.
    _, _, path = _state(tmp_path)
    good = path.read_bytes()
    rng = random.Random(0)
    damaged = [good[:n] for n in range(0, len(good), max(1, len(good) // 60))]
    for _ in range(60):
        b = bytearray(good)
        for _ in range(20):
            b[rng.randrange(len(b))] = rng.randrange(256)
        damaged.append(bytes(b))
    refused = 0
    for blob in damaged:
        path.write_bytes(blob)
        try:
            state = load_checkpoint(path)
        except CheckpointError:
            refused += 1
        else:  # a flip inside tensor data can leave a loadable file: then it is still a full checkpoint
            assert {"model", "optimizer", "epoch", "spec_hash", "rng"} <= set(state)
    assert refused > len(damaged) // 2


# -- exact resume in every mode, and what a resume may change ---------------------------------------------

MODES_SPEC = ROOT / "experiments" / "digits_lenet_modes.yaml"
MODES_ARGS = ["train.epochs=4", "data.limit_train=200", "train.sanity_check=false", "train.log_model=false"]


def _interrupted(spec, stop_after: int):
    """Ctrl-C after epoch ``stop_after`` (its checkpoint logged): the tracker of the KILLED run."""
    from harness.run import run
    from harness.tracking.tracker import MemoryTracker

    def stop(epoch, metrics):
        if epoch == stop_after:
            raise KeyboardInterrupt

    tracker = MemoryTracker()
    with pytest.raises(KeyboardInterrupt):
        run(spec, tracker=tracker, on_epoch=stop, progress=False)
    assert tracker.status == "KILLED"
    return tracker


def _interrupted_then_resumed(spec, stop_after: int):
    """Ctrl-C after epoch ``stop_after``, then --resume: the tracker of the run."""
    from harness.run import run

    tracker = _interrupted(spec, stop_after)
    run(spec, tracker=tracker, resume_run_id=tracker.run_id, progress=False)
    assert tracker.status == "FINISHED"
    return tracker


@pytest.mark.parametrize("mode_bug", ["none", "no_eval", "train_once", "no_grad_missing", "no_zero_grad",
                                      "mc_dropout", "partial_freeze"])
def test_every_mode_policy_resumes_to_the_uninterrupted_numbers(mode_bug):
    """Module modes are state: train_once trains its next epoch in whatever mode the last evaluation
    left, so a resume must restore them (it did not: train/loss 2.301035 vs 2.303234 at epoch 3)."""
    from harness.core.modes import POLICIES
    from harness.run import run
    from harness.spec import load_spec
    from harness.tracking.tracker import MemoryTracker

    assert mode_bug in POLICIES
    extra = ["optimizer.lr=0.001"] if mode_bug == "no_zero_grad" else []
    spec = load_spec(MODES_SPEC, [*MODES_ARGS, f"mode_bug={mode_bug}", *extra])
    whole = MemoryTracker()
    run(spec, tracker=whole, progress=False)
    resumed = _interrupted_then_resumed(spec, stop_after=2)
    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "train/running_loss", "test/acc"):
        assert resumed.metrics[key] == whole.metrics[key], key  # every step once, the very same numbers


def test_a_resume_may_add_epochs_and_change_the_guard_but_not_the_numbers():
    from harness.run import run
    from harness.spec import load_spec
    from harness.tracking.tracker import MemoryTracker
    from harness.errors import UserError

    spec = load_spec(MODES_SPEC, MODES_ARGS)
    tracker = MemoryTracker()
    run(spec, tracker=tracker, progress=False)
    with pytest.raises(UserError, match="already finished all 4 epochs; to train on, pass train.epochs=5"):
        run(spec, tracker=tracker, resume_run_id=tracker.run_id, progress=False)
    with pytest.raises(UserError, match=r"other values of model.dropout, optimizer.lr \("):
        run(spec.with_overrides({"optimizer.lr": 0.01, "model.dropout": 0.1}), tracker=tracker,
            resume_run_id=tracker.run_id, progress=False)
    longer = spec.with_overrides({"train.epochs": 6, "guard": "off"})
    run(longer, tracker=tracker, resume_run_id=tracker.run_id, progress=False)
    assert tracker.tags["resume.changes"] == "guard: warn -> off; train.epochs: 4 -> 6"
    assert [s for s, _ in tracker.metrics["val/acc"]] == [1, 2, 3, 4, 5, 6]
    whole = MemoryTracker()
    run(spec.with_overrides({"train.epochs": 6}), tracker=whole, progress=False)
    assert tracker.metrics["val/acc"] == whole.metrics["val/acc"]  # 4 + 2 epochs = 6 epochs


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_the_start_in_the_same_run():
    spec = __import__("harness.spec", fromlist=["load_spec"]).load_spec(MODES_SPEC, MODES_ARGS)
    from harness.run import run
    from harness.tracking.tracker import MemoryTracker

    tracker = MemoryTracker()
    with pytest.raises(KeyboardInterrupt):
        run(spec.with_overrides({"train.checkpoint": False}), tracker=tracker,
            on_epoch=lambda e, m: (_ for _ in ()).throw(KeyboardInterrupt), progress=False)
    run(spec, tracker=tracker, resume_run_id=tracker.run_id, progress=False)
    whole = MemoryTracker()
    run(spec, tracker=whole, progress=False)
    assert tracker.tags["resumed_from"] == "the start" and tracker.status == "FINISHED"
    assert tracker.metrics["val/acc"] == whole.metrics["val/acc"]


@pytest.mark.gpu
def test_a_cuda_run_resumes_on_cuda_and_its_checkpoint_loads_on_a_cpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    from harness.run import build
    from harness.spec import load_spec

    spec = load_spec(MODES_SPEC, [*MODES_ARGS, "train.device=cuda", "train.deterministic=true"])
    resumed = _interrupted_then_resumed(spec, stop_after=2)
    assert [s for s, _ in resumed.metrics["val/acc"]] == [1, 2, 3, 4]
    path = tmp_path / "last.pt"
    path.write_bytes(resumed.artifacts["checkpoints/last.pt"])
    from harness.core.checkpoint import restore

    cpu = build(spec.with_overrides({"train.device": "cpu"}))
    restore(load_checkpoint(path), cpu.model, cpu.optimizer)
    assert next(cpu.model.parameters()).device.type == "cpu"


@pytest.mark.parametrize("damage, words", [
    (lambda s: s["model"].update({k: torch.zeros(3) for k in list(s["model"])[:1]}), "does not fit this model"),
    (lambda s: s["optimizer"]["param_groups"].clear(), "optimizer state does not fit"),
    (lambda s: s["rng"].update(torch=torch.zeros(3, dtype=torch.float32)), "RNG state is damaged"),
    (lambda s: s.update(epoch="three"), "not what a harness checkpoint holds"),
    (lambda s: s.pop("rng"), "missing rng"),
])
def test_a_checkpoint_that_loads_but_does_not_fit_is_one_line_and_the_run_untouched(tmp_path, damage, words):
    """Safe to unpickle, yet inconsistent: wrong shapes, wrong types, a bad RNG state. Refused by name
    (not skipped as torn), before the run is touched."""
    import io

    from harness.errors import UserError
    from harness.run import run
    from harness.spec import load_spec

    spec = load_spec(MODES_SPEC, MODES_ARGS)
    tracker = _interrupted(spec, stop_after=2)
    for name in ("checkpoints/last.pt", "checkpoints/best.pt"):
        state = torch.load(io.BytesIO(tracker.artifacts[name]), weights_only=True)
        damage(state)
        buf = io.BytesIO()
        torch.save(state, buf)
        tracker.artifacts[name] = buf.getvalue()
    logged = {k: list(v) for k, v in tracker.metrics.items()}
    with pytest.raises(UserError) as e:
        run(spec, tracker=tracker, resume_run_id=tracker.run_id, progress=False)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert tracker.status == "KILLED" and tracker.metrics == logged  # untouched
