"""Mean teacher (semi-supervised): a student with Dropout and BatchNorm trained by the optimizer, and
a teacher that is an exponential moving average of the student (torch.optim.swa_utils.AveragedModel),
called under torch.no_grad() in training mode on purpose (its dropout is part of the consistency
target). The teacher is never trained by an optimizer; both are evaluated in eval mode at the end.
Correct."""
# guard-labels: none
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

torch.manual_seed(0)
X = torch.randn(512, 20)
y = (X[:, 0] + X[:, 1] > 0).long()
labelled = torch.arange(64)  # only the first 64 examples have labels
student = nn.Sequential(nn.Linear(20, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 2))
teacher = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(0.99), use_buffers=True)
optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)

for epoch in range(4):
    student.train()
    teacher.train()
    for i in range(0, 512, 64):
        xb = X[i:i + 64]
        noisy = xb + 0.1 * torch.randn_like(xb)
        logits = student(noisy)
        with torch.no_grad():
            target = F.softmax(teacher(xb + 0.1 * torch.randn_like(xb)), dim=1)
        consistency = F.mse_loss(F.softmax(logits, dim=1), target)
        supervised = F.cross_entropy(student(X[labelled]), y[labelled])
        optimizer.zero_grad()
        (supervised + consistency).backward()
        optimizer.step()
        teacher.update_parameters(student)
    student.eval()
    teacher.eval()
    with torch.no_grad():
        acc_s = (student(X).argmax(1) == y).float().mean().item()
        acc_t = (teacher(X).argmax(1) == y).float().mean().item()
    print(f"epoch {epoch + 1}: student acc {acc_s:.3f}, teacher acc {acc_t:.3f}")
