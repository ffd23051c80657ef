"""Gradient accumulation on purpose: the loss of each micro-batch divided by the accumulation steps,
backward() on every micro-batch, optimizer.step() and zero_grad() once every 4 micro-batches (an
effective batch 4x larger than memory allows). Correct: not a missing zero_grad."""
# guard-labels: none
import torch
from torch import nn

torch.manual_seed(0)
X = torch.randn(640, 32)
y = (X[:, :4].sum(1) > 0).long()
model = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 2))
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
loss_fn = nn.CrossEntropyLoss()
accumulation_steps = 4
micro_batch = 16

for epoch in range(3):
    model.train()
    optimizer.zero_grad()
    for i, start in enumerate(range(0, len(X), micro_batch)):
        xb, yb = X[start:start + micro_batch], y[start:start + micro_batch]
        loss = loss_fn(model(xb), yb) / accumulation_steps
        loss.backward()
        if (i + 1) % accumulation_steps == 0:
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        acc = (model(X).argmax(1) == y).float().mean().item()
    print(f"epoch {epoch + 1}: train acc {acc:.3f}")
