"""A small BatchNorm + Dropout CNN on scikit-learn's bundled digits, whose validate() computes the
validation loss straight after training: no model.eval() (dropout drops, BatchNorm normalises with
the batch and folds validation data into its running statistics) and no torch.no_grad() (an autograd
graph built for every validation batch)."""
# guard-labels: eval_in_train_mode, bn_stats_changed_in_eval, grad_enabled_in_eval
import torch
import torch.nn as nn
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(0)
digits = load_digits()
X = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
y = torch.tensor(digits.target)
train_loader = DataLoader(TensorDataset(X[:1200], y[:1200]), batch_size=64, shuffle=True)
val_loader = DataLoader(TensorDataset(X[1200:], y[1200:]), batch_size=128)

model = nn.Sequential(
    nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(16 * 4 * 4, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 10),
)
criterion = nn.CrossEntropyLoss()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)


def validate(model, loader):
    total, correct, loss = 0, 0, 0.0
    for xb, yb in loader:
        out = model(xb)
        loss += criterion(out, yb).item() * len(yb)
        correct += (out.argmax(1) == yb).sum().item()
        total += len(yb)
    return loss / total, correct / total


for epoch in range(3):
    model.train()
    for xb, yb in train_loader:
        optimizer.zero_grad()
        loss = criterion(model(xb), yb)
        loss.backward()
        optimizer.step()
    val_loss, val_acc = validate(model, val_loader)
    print(f"epoch {epoch + 1}: val loss {val_loss:.3f}, val acc {val_acc:.3f}")
