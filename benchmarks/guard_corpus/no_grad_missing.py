"""A correct train/eval mode discipline on scikit-learn's digits, but evaluation without
torch.no_grad(): the numbers are right, and every evaluation batch builds an autograd graph that
nothing uses (memory and time)."""
# guard-labels: grad_enabled_in_eval
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits

torch.manual_seed(0)
digits = load_digits()
X = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y = torch.tensor(digits.target)
X_train, y_train, X_test, y_test = X[:1400], y[:1400], X[1400:], y[1400:]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.bn1 = nn.BatchNorm1d(128)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc2(self.drop(F.relu(self.bn1(self.fc1(x)))))


net = MLP()
opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
for epoch in range(4):
    net.train()
    perm = torch.randperm(len(X_train))
    for i in range(0, len(X_train), 100):
        idx = perm[i:i + 100]
        opt.zero_grad()
        F.cross_entropy(net(X_train[idx]), y_train[idx]).backward()
        opt.step()
    net.eval()
    logits = net(X_test)  # no torch.no_grad(): a graph is built
    print(f"epoch {epoch + 1}: test acc {(logits.argmax(1) == y_test).float().mean():.3f}")
