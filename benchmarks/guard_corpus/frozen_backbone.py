"""Fine-tuning a new head on a frozen feature extractor kept in eval mode on purpose: the backbone's
parameters have requires_grad=False and after every model.train() the backbone is put back in eval
mode, so its BatchNorm keeps the "pretrained" statistics; only the head (with Dropout) trains.
Correct: a frozen backbone in eval mode during training is deliberate, not a mode bug."""
# guard-labels: none
import torch
import torch.nn as nn
import torch.nn.functional as F

torch.manual_seed(0)


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(32, 5))

    def forward(self, x):
        return self.head(self.backbone(x))


model = Classifier()
# "pretrained" weights: pretend the backbone was trained elsewhere; freeze it
for p in model.backbone.parameters():
    p.requires_grad = False
images, labels = torch.randn(320, 3, 16, 16), torch.randint(0, 5, (320,))
optimizer = torch.optim.SGD(model.head.parameters(), lr=0.1, momentum=0.9)

for epoch in range(3):
    model.train()
    model.backbone.eval()  # keep the frozen BatchNorm statistics
    for i in range(0, 256, 32):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images[i:i + 32]), labels[i:i + 32])
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        acc = (model(images[256:]).argmax(1) == labels[256:]).float().mean().item()
    print(f"epoch {epoch + 1}: loss {loss.item():.3f}, val acc {acc:.3f}")
