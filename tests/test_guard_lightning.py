"""The mode guard as a Lightning callback, with the real pytorch-lightning and a real MLflow store:
the harness's mode_guard.* tags and mode_guard/findings metric on the MLflow run, the same in any
other logger's hyperparameters, nothing on a clean run, and the findings of a fit that dies."""
from __future__ import annotations

import shutil

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from pytorch_lightning.loggers import CSVLogger, MLFlowLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from harness.guard.lightning import ModeGuardCallback


class Lit(pl.LightningModule):
    """A classifier whose "pretrained" encoder may come in eval mode (Lightning keeps submodule modes)."""

    def __init__(self, encoder_eval=False, manual=False, die_at=None):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2))
        self.head = nn.Linear(16, 2)
        if encoder_eval:
            self.encoder.eval()
        self.automatic_optimization = not manual
        self.die_at = die_at

    def forward(self, x):
        return self.head(self.encoder(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        self.manual_backward(loss)  # no opt.zero_grad(): gradients pile up
        opt.step()
        if self.global_step == self.die_at:
            raise FloatingPointError("loss is nan")

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=16)


def _fit(model, logger, epochs=2) -> ModeGuardCallback:
    guard = ModeGuardCallback()
    trainer = pl.Trainer(max_epochs=epochs, logger=logger, callbacks=[guard], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, _loader(), _loader())
    return guard


@pytest.fixture()
def mlflow_uri(tmp_path, _migrated_mlflow_db):
    shutil.copy(_migrated_mlflow_db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _metric(client, run_id):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, "mode_guard/findings"),
                                              key=lambda m: m.step)]


def test_findings_become_the_harness_tags_and_metric_on_the_mlflow_run(mlflow_uri, tmp_path):
    logger = MLFlowLogger(experiment_name="lit", tracking_uri=mlflow_uri, save_dir=str(tmp_path))
    guard = _fit(Lit(encoder_eval=True), logger)
    assert guard.summary == {"train_in_eval_mode": ["encoder.1", "encoder.3"]}
    client = MlflowClient(mlflow_uri)
    run = client.get_run(logger.run_id)
    assert run.data.tags["mode_guard.train_in_eval_mode"] == "encoder.1,encoder.3"
    assert _metric(client, logger.run_id) == [(1, 2.0), (2, 2.0)]  # modules flagged per epoch, step = epoch

    clean = MLFlowLogger(experiment_name="lit", tracking_uri=mlflow_uri, save_dir=str(tmp_path))
    assert _fit(Lit(), clean).summary == {}
    assert _metric(client, clean.run_id) == [(1, 0.0), (2, 0.0)]
    assert not any(k.startswith("mode_guard.") for k in client.get_run(clean.run_id).data.tags)


def test_another_logger_gets_the_findings_as_hyperparameters(tmp_path):
    logger = CSVLogger(tmp_path)
    _fit(Lit(encoder_eval=True), logger, epochs=1)
    hparams = (tmp_path / "lightning_logs" / "version_0" / "hparams.yaml").read_text()
    assert "mode_guard.train_in_eval_mode: encoder.1,encoder.3" in hparams
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "mode_guard/findings" in metrics.splitlines()[0]


def test_a_fit_that_dies_still_records_what_the_guard_saw(mlflow_uri, tmp_path):
    logger = MLFlowLogger(experiment_name="lit", tracking_uri=mlflow_uri, save_dir=str(tmp_path))
    with pytest.raises(FloatingPointError):
        _fit(Lit(manual=True, die_at=3), logger)
    client = MlflowClient(mlflow_uri)
    assert client.get_run(logger.run_id).data.tags["mode_guard.missing_zero_grad"] == "opt"  # its name in training_step
    assert _metric(client, logger.run_id) == [(1, 1.0)]
