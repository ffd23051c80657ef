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
from harness import checkpoint as ckpt
from harness.stores import mask_url

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
