"""Keep the best weights, then test them: the training loop is correct (model.train() / model.eval()
+ no_grad), and the state_dict of the best validation epoch is kept. At the end a fresh model is
built and the best weights loaded into it, and the test set is scored without calling eval() on it:
a new module is in training mode, so dropout drops and BatchNorm normalises with test batches."""
# guard-labels: eval_in_train_mode, bn_stats_changed_in_eval
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

torch.manual_seed(0)
X = torch.randn(900, 20)
y = (X[:, :5].sum(1) > 0).long()
X_train, y_train, X_val, y_val, X_test, y_test = X[:600], y[:600], X[600:750], y[600:750], X[750:], y[750:]


def make_model():
    return nn.Sequential(nn.Linear(20, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.4), nn.Linear(64, 2))


model = make_model()
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
best_acc, best_state = 0.0, None
for epoch in range(5):
    model.train()
    for i in range(0, 600, 50):
        optimizer.zero_grad()
        F.cross_entropy(model(X_train[i:i + 50]), y_train[i:i + 50]).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        acc = (model(X_val).argmax(1) == y_val).float().mean().item()
    if acc > best_acc:
        best_acc, best_state = acc, copy.deepcopy(model.state_dict())
    print(f"epoch {epoch + 1}: val acc {acc:.3f}")

best_model = make_model()
best_model.load_state_dict(best_state)
with torch.no_grad():
    correct = sum((best_model(X_test[i:i + 50]).argmax(1) == y_test[i:i + 50]).sum().item()
                  for i in range(0, 150, 50))
print(f"test acc of the best epoch: {correct / 150:.3f}")
