"""A LightningModule that fine-tunes a "pretrained" encoder loaded the way inference code loads it:
with .eval() at the end. Its parameters stay trainable, but Lightning keeps the submodule modes it
finds (it only warns once at fit start), so the encoder's BatchNorm and Dropout train in eval mode
for the whole fit."""
# guard-labels: train_in_eval_mode
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def load_pretrained_encoder():
    encoder = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Dropout(0.2),
                            nn.Linear(128, 64), nn.ReLU())
    return encoder.eval()  # as copied from an inference snippet


class FineTuner(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.encoder = load_pretrained_encoder()
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.encoder(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


if __name__ == "__main__":
    pl.seed_everything(0)
    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(FineTuner(), DataLoader(TensorDataset(X[:1200], y[:1200]), batch_size=100, shuffle=True),
                DataLoader(TensorDataset(X[1200:], y[1200:]), batch_size=300))
