"""The "feature extraction" recipe of the torchvision fine-tuning tutorial: every backbone parameter
gets requires_grad=False, a new head is trained, and the phase loop calls model.train() for training
and model.eval() for validation. model.train() also puts the frozen backbone's BatchNorm layers in
training mode, so their running statistics drift with every training batch although their weights
are frozen (the harness's partial_freeze bug)."""
# guard-labels: frozen_in_train_mode
import torch
import torch.nn as nn

torch.manual_seed(0)


def set_parameter_requires_grad(model, feature_extracting):
    if feature_extracting:
        for param in model.parameters():
            param.requires_grad = False


model_ft = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 1000))
set_parameter_requires_grad(model_ft, True)
model_ft[-1] = nn.Linear(32, 5)  # reshape the classifier for our 5 classes
params_to_update = [p for p in model_ft.parameters() if p.requires_grad]
optimizer_ft = torch.optim.SGD(params_to_update, lr=0.001, momentum=0.9)
criterion = nn.CrossEntropyLoss()
data = {"train": (torch.randn(256, 3, 16, 16), torch.randint(0, 5, (256,))),
        "val": (torch.randn(64, 3, 16, 16), torch.randint(0, 5, (64,)))}

for epoch in range(3):
    for phase in ["train", "val"]:
        if phase == "train":
            model_ft.train()  # Set model to training mode
        else:
            model_ft.eval()   # Set model to evaluate mode
        running_corrects = 0
        inputs_all, labels_all = data[phase]
        for i in range(0, len(labels_all), 32):
            inputs, labels = inputs_all[i:i + 32], labels_all[i:i + 32]
            optimizer_ft.zero_grad()
            with torch.set_grad_enabled(phase == "train"):
                outputs = model_ft(inputs)
                loss = criterion(outputs, labels)
                _, preds = torch.max(outputs, 1)
                if phase == "train":
                    loss.backward()
                    optimizer_ft.step()
            running_corrects += torch.sum(preds == labels.data).item()
        print(f"epoch {epoch + 1} {phase} acc {running_corrects / len(labels_all):.3f}")
