"""Stochastic weight averaging as the torch.optim.swa_utils docs show it: an AveragedModel updated
after each epoch of the second half, SWALR, then update_bn() runs the averaged model in training
mode over the training data on purpose (to re-estimate its BatchNorm statistics), and the averaged
model is evaluated in eval mode under no_grad. Correct."""
# guard-labels: none
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(0)
X = torch.randn(512, 16)
y = (X[:, 0] * X[:, 1] > 0).long()
loader = DataLoader(TensorDataset(X[:448], y[:448]), batch_size=64, shuffle=True)
model = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 2))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
swa_model = AveragedModel(model)
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
swa_start, swa_scheduler = 5, SWALR(optimizer, swa_lr=0.05)

for epoch in range(10):
    model.train()
    for xb, yb in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    if epoch > swa_start:
        swa_model.update_parameters(model)
        swa_scheduler.step()
    else:
        scheduler.step()

update_bn(loader, swa_model)  # BatchNorm statistics for the averaged weights
swa_model.eval()
with torch.no_grad():
    acc = (swa_model(X[448:]).argmax(1) == y[448:]).float().mean().item()
print(f"SWA model accuracy {acc:.3f}")
