"""Safety on the scale-out path, without a server: tampered checkpoints are refused without running their
payload; passwords in store URLs never land in MLflow (params, tags) or in the logs.
(The same checks against a real PostgreSQL and mlflow server are in test_postgres.py.)"""
from __future__ import annotations

import builtins
import pickle
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY, run_cli
from harness.core import checkpoint as ckpt
from harness.errors import mask_url
from harness.tracking.store import mlflow_ui_command

SPEC = str(ROOT / "experiments" / "digits_lenet.yaml")


class Payload:
    """Unpickling this runs code: it writes ``marker``. What an attacker would put in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def _real_checkpoint(path: Path) -> Path:
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return ckpt.save_checkpoint(path, model=model, optimizer=opt, epoch=1, spec_hash="abc", best=0.5)


def _tamper(good: Path, bad: Path, marker: Path) -> Path:
    """The real checkpoint with one value swapped for the payload, saved as a full pickle."""
    state = torch.load(good, weights_only=True)
    state["epoch"] = Payload(marker)
    torch.save(state, bad)
    return bad


def test_the_payload_is_live(tmp_path):
    """Guard for the tests below: an unsafe load of the tampered file does run the payload."""
    marker = tmp_path / "pwned"
    bad = _tamper(_real_checkpoint(tmp_path / "good.pt"), tmp_path / "bad.pt", marker)
    torch.load(bad, weights_only=False)
    assert marker.read_text() == "pwned"


def test_tampered_checkpoint_is_refused_and_the_payload_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    good = _real_checkpoint(tmp_path / "good.pt")
    assert ckpt.load_checkpoint(good)["epoch"] == 1
    bad = _tamper(good, tmp_path / "bad.pt", marker)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_checkpoint(bad)
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg and "refused" in msg and "tampered" in msg
    assert not marker.exists()


def test_raw_pickle_posing_as_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "last.pt"
    bad.write_bytes(pickle.dumps({"model": {}, "epoch": Payload(marker)}))
    with pytest.raises(ckpt.CheckpointError, match="refused"):
        ckpt.load_checkpoint(bad)
    assert not marker.exists()


def test_tampered_checkpoint_in_the_store_is_refused_on_resume(fast_store, tmp_path):
    """The path a checkpoint from any store takes: an artifact downloaded by ``--resume``."""
    from mlflow import MlflowClient

    from harness.run import run
    from harness.spec import load_spec

    spec = load_spec(SPEC, [*TINY, "train.epochs=3", "name=security"])
    result = run(spec, progress=False)
    client = MlflowClient()
    marker = tmp_path / "pwned"
    # Overwrite checkpoints/last.pt in the run's artifacts with the tampered file.
    local = Path(client.download_artifacts(result.run_id, "checkpoints/last.pt", str(tmp_path / "dl")))
    (tmp_path / "evil").mkdir()
    bad = _tamper(local, tmp_path / "evil" / "last.pt", marker)
    client.log_artifact(result.run_id, str(bad), "checkpoints")
    out = run_cli("harness.train", SPEC, *TINY, "train.epochs=3", "name=security", "--resume",
                  result.run_id, cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "checkpoint refused" in lines[0], out.stderr
    assert "Traceback" not in out.stderr
    assert not marker.exists()
    assert client.get_run(result.run_id).info.status == "FINISHED"  # the original run is untouched


# -- secrets in URLs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("url, shown", [
    ("postgresql+psycopg2://alice:s3cret@db.lab:5432/optuna?sslmode=require",
     "postgresql+psycopg2://alice:***@db.lab:5432/optuna?sslmode=require"),
    ("postgresql://alice:p%40ss%3Aword@db.lab/optuna", "postgresql://alice:***@db.lab/optuna"),
    ("mysql+pymysql://bob:s3cret@[::1]:3306/optuna", "mysql+pymysql://bob:***@[::1]:3306/optuna"),
    ("http://alice:s3cret@mlflow.lab:5000", "http://alice:***@mlflow.lab:5000"),
    ("postgresql://db.lab/optuna?user=alice&password=s3cret", "postgresql://db.lab/optuna?user=alice&password=***"),
    ("postgresql+psycopg2://alice@127.0.0.1:5433/optuna", "postgresql+psycopg2://alice@127.0.0.1:5433/optuna"),
    ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
    ("mlruns/optuna.journal", "mlruns/optuna.journal"),
])
def test_mask_url(url, shown):
    assert mask_url(url) == shown


def test_browse_hint_points_at_a_server_and_masks_its_password(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:s3cret@mlflow.lab:5000")
    hint = mlflow_ui_command()
    assert hint.startswith("open http://alice:***@mlflow.lab:5000") and "s3cret" not in hint
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    assert mlflow_ui_command().startswith("mlflow ui --backend-store-uri sqlite:///mlflow.db")


def test_storage_password_is_masked_in_a_real_sweep(fast_store, tmp_path, monkeypatch, capsys, caplog):
    """A sweep given a PostgreSQL URL with a password: its MLflow runs (params, tags, text artifacts)
    and its output never show the password. No database here, so the storage object behind the URL is
    a journal file; every path that logs the URL (tags, header, summary, logs) sees the real string."""
    import logging

    from mlflow import MlflowClient
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from harness.sweep import cli as sweep
    from harness.sweep import storage

    secret = "s3cret-Pw"
    url = f"postgresql+psycopg2://alice:{secret}@db.lab.invalid:5432/optuna"
    journal = JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    monkeypatch.setattr(storage, "optuna_storage", lambda *a, **k: journal)
    monkeypatch.setattr(storage, "storage_lock", lambda url: __import__("contextlib").nullcontext())
    caplog.set_level(logging.DEBUG)
    rc = sweep.main([SPEC, "train.epochs=2", "train.log_model=false", "train.sanity_check=false",
                     "--n-trials", "2", "--storage", url, "--study", "secret-study"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    text = out.out + out.err + caplog.text
    assert secret not in text
    assert "alice:***@db.lab.invalid" in out.out

    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 3  # the parent and 2 trials
    for i, r in enumerate(runs):
        assert r.data.tags["optuna.storage"] == url.replace(secret, "***")
        values = [*r.data.params.values(), *r.data.tags.values()]
        local = Path(client.download_artifacts(r.info.run_id, "", str(tmp_path / f"a{i}")))
        values += [f.read_text(errors="replace") for f in local.rglob("*")
                   if f.is_file() and f.suffix in (".yaml", ".json", ".csv", ".txt", ".html")]
        assert not [v for v in values if secret in v], r.info.run_name


def test_unreachable_storage_and_server_errors_are_masked(tmp_path):
    """The one-line errors for a database or tracking server that does not answer show no password."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    secret = "s3cret-Pw"
    out = run_cli("harness.sweep", SPEC, "--n-trials", "1", "--storage",
                  f"postgresql+psycopg2://alice:{secret}@127.0.0.1:{port}/optuna", cwd=tmp_path,
                  env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}, timeout=120)
    assert out.returncode == 2 and secret not in out.stdout + out.stderr, out.stderr
    assert "alice:***@127.0.0.1" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("harness.train", SPEC, *TINY, cwd=tmp_path, timeout=120,
                  env={"MLFLOW_TRACKING_URI": f"http://alice:{secret}@127.0.0.1:{port}"})
    assert out.returncode == 2 and secret not in out.stdout + out.stderr, out.stderr
    assert "alice:***@127.0.0.1" in out.stderr and "Traceback" not in out.stderr
