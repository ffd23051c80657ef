"""Monte Carlo dropout on purpose: after training, the model is put in eval mode (BatchNorm uses its
running statistics) and only its Dropout layers are switched back to training mode, then the
softmax is averaged over 20 stochastic passes under torch.no_grad(). Run it with
--allow mc_dropout: dropout at evaluation is the point here, not a bug."""
# guard-labels: none
# guard-allow: mc_dropout
import torch
import torch.nn as nn
import torch.nn.functional as F

torch.manual_seed(0)
X = torch.randn(600, 16)
y = (X[:, :3].sum(1) > 0).long()
model = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.5),
                      nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 2))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
for epoch in range(5):
    model.train()
    for i in range(0, 500, 50):
        optimizer.zero_grad()
        F.cross_entropy(model(X[i:i + 50]), y[i:i + 50]).backward()
        optimizer.step()


def enable_dropout(model):
    for m in model.modules():
        if m.__class__.__name__.startswith("Dropout"):
            m.train()


model.eval()
enable_dropout(model)
with torch.no_grad():
    probs = torch.stack([F.softmax(model(X[500:]), dim=1) for _ in range(20)])
mean, std = probs.mean(0), probs.std(0)
print(f"MC dropout accuracy {(mean.argmax(1) == y[500:]).float().mean():.3f}, "
      f"mean predictive std {std.mean():.3f}")
