"""An evaluation-only script: build the model, load its trained weights, score the test set under
torch.no_grad(), and forget model.eval(): both Dropout layers keep dropping units. Nothing is
trained here, so every model called is a model being evaluated."""
# guard-labels: eval_in_train_mode
import io

import torch
import torch.nn as nn

torch.manual_seed(0)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Dropout(0.5),
                                  nn.Linear(128, 128), nn.ReLU(), nn.Dropout(0.5))
        self.out = nn.Linear(128, 4)

    def forward(self, x):
        return self.out(self.body(x))


checkpoint = io.BytesIO()  # stands in for the file a training run saved
torch.save(Net().state_dict(), checkpoint)
checkpoint.seek(0)

model = Net()
model.load_state_dict(torch.load(checkpoint, weights_only=True))
X, y = torch.randn(400, 32), torch.randint(0, 4, (400,))
correct = 0
with torch.no_grad():
    for i in range(0, 400, 100):
        correct += (model(X[i:i + 100]).argmax(1) == y[i:i + 100]).sum().item()
print(f"test accuracy: {correct / 400:.3f}")
