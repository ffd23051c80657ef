"""A LightningModule as the Lightning docs write one: a classifier with BatchNorm and Dropout,
training_step / validation_step / configure_optimizers, fitted by a Trainer on scikit-learn's digits,
then tested. Lightning switches train/eval modes and gradients itself. Correct."""
# guard-labels: none
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class LitClassifier(pl.LightningModule):
    def __init__(self, lr=1e-2):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Dropout(0.3),
                                 nn.Linear(128, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


if __name__ == "__main__":
    pl.seed_everything(0)
    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    train = DataLoader(TensorDataset(X[:1200], y[:1200]), batch_size=100, shuffle=True)
    val = DataLoader(TensorDataset(X[1200:1500], y[1200:1500]), batch_size=300)
    test = DataLoader(TensorDataset(X[1500:], y[1500:]), batch_size=300)
    trainer = pl.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    model = LitClassifier()
    trainer.fit(model, train, val)
    trainer.test(model, test)
