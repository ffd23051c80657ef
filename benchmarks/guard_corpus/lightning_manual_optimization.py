"""Lightning's manual optimization (automatic_optimization = False) as people first write it:
self.manual_backward(loss) and opt.step(), but no opt.zero_grad(), which Lightning no longer does
for you in this mode: gradients pile up across steps."""
# guard-labels: missing_zero_grad
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Manual(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 2))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.manual_backward(loss)
        opt.step()
        self.log("train_loss", loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


if __name__ == "__main__":
    pl.seed_everything(0)
    X = torch.randn(512, 16)
    y = (X[:, 0] > 0).long()
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(Manual(), DataLoader(TensorDataset(X, y), batch_size=64))
