"""A Siamese network with a contrastive loss: the same encoder (BatchNorm + Dropout) is called twice,
on both items of a pair, and one backward pass goes through both calls. Evaluation embeds the pairs in
eval mode under torch.no_grad(). Correct: two forwards per step is not an evaluation."""
# guard-labels: none
import torch
import torch.nn as nn
import torch.nn.functional as F

torch.manual_seed(0)
a, b = torch.randn(512, 24), torch.randn(512, 24)
same = (torch.rand(512) < 0.5)
b[same] = a[same] + 0.1 * torch.randn(int(same.sum()), 24)
encoder = nn.Sequential(nn.Linear(24, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 16))
optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-3)


def contrastive_loss(z1, z2, same, margin=1.0):
    d = F.pairwise_distance(z1, z2)
    return torch.where(same, d.pow(2), F.relu(margin - d).pow(2)).mean()


for epoch in range(4):
    encoder.train()
    for i in range(0, 448, 32):
        z1 = encoder(a[i:i + 32])
        z2 = encoder(b[i:i + 32])
        loss = contrastive_loss(z1, z2, same[i:i + 32])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    encoder.eval()
    with torch.no_grad():
        d = F.pairwise_distance(encoder(a[448:]), encoder(b[448:]))
    acc = ((d < 0.5) == same[448:]).float().mean().item()
    print(f"epoch {epoch + 1}: loss {loss.item():.3f}, pair accuracy {acc:.3f}")
