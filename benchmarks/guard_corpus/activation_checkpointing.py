"""Activation checkpointing to save memory: each residual block runs under
torch.utils.checkpoint.checkpoint, which recomputes the block's forward during backward (with
autograd on, outside any optimizer step). Training and evaluation are otherwise the textbook loop.
Correct: recomputation is not an evaluation."""
# guard-labels: none
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

torch.manual_seed(0)


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.bn = nn.BatchNorm1d(width)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return x + self.drop(F.relu(self.bn(self.fc(x))))


class DeepNet(nn.Module):
    def __init__(self, width=64, depth=4):
        super().__init__()
        self.inp = nn.Linear(16, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.training else block(x)
        return self.out(x)


X = torch.randn(600, 16)
y = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()
model = DeepNet()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
for epoch in range(3):
    model.train()
    for i in range(0, 512, 64):
        optimizer.zero_grad()
        F.cross_entropy(model(X[i:i + 64]), y[i:i + 64]).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        acc = (model(X[512:]).argmax(1) == y[512:]).float().mean().item()
    print(f"epoch {epoch + 1}: val acc {acc:.3f}")
