"""Models: lenet and mlp for 8x8 and 28x28 inputs, their options, and the registry."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.core.models import MODELS, GaussianNoise, build_model, register
from harness.errors import SpecError
from harness.spec import ModelSpec, load_spec

SHAPES = [(1, 8, 8), (1, 28, 28)]


def _count(model: nn.Module, kind) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize("arch", ["lenet", "mlp"])
@pytest.mark.parametrize("shape", SHAPES, ids=["8x8", "28x28"])
def test_builds_and_predicts(arch, shape):
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch=arch), shape, 10)
    x = torch.randn(5, *shape)
    out = model(x)
    assert out.shape == (5, 10) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    # Submodules a user can freeze by name.
    assert isinstance(model.get_submodule("features"), nn.Module)
    assert isinstance(model.get_submodule("classifier"), nn.Module)


@pytest.mark.parametrize("shape, flat", [((1, 28, 28), 12 * 4 * 4), ((1, 8, 8), 12 * 2 * 2)],
                         ids=["28x28", "8x8"])
def test_lenet_is_the_classic_architecture(shape, flat):
    model = build_model(ModelSpec(arch="lenet"), shape, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1, 6, (5, 5)), (6, 12, (5, 5))]
    assert _count(model, nn.MaxPool2d) == 2
    assert [(m.in_features, m.out_features) for m in linears] == [(flat, 120), (120, 60), (60, 10)]


def test_mlp_adapts_to_the_input_size():
    small = build_model(ModelSpec(arch="mlp"), (1, 8, 8), 10)
    big = build_model(ModelSpec(arch="mlp"), (1, 28, 28), 10)
    first = lambda m: next(x for x in m.modules() if isinstance(x, nn.Linear))  # noqa: E731
    assert first(small).in_features == 64 and first(big).in_features == 784


@pytest.mark.parametrize("arch", ["lenet", "mlp"])
def test_dropout_option(arch):
    assert _count(build_model(ModelSpec(arch=arch), (1, 28, 28), 10), nn.Dropout) == 0
    model = build_model(ModelSpec(arch=arch, dropout=0.4), (1, 28, 28), 10)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(d.p == 0.4 for d in drops)
    x = torch.randn(8, 1, 28, 28)
    model.train()
    assert not torch.equal(model(x), model(x))  # stochastic in training mode
    model.eval()
    assert torch.equal(model(x), model(x))  # deterministic in eval mode


@pytest.mark.parametrize("arch, norm", [("lenet", nn.BatchNorm2d), ("mlp", nn.BatchNorm1d)])
def test_batchnorm_option(arch, norm):
    assert _count(build_model(ModelSpec(arch=arch), (1, 8, 8), 10), nn.modules.batchnorm._BatchNorm) == 0
    model = build_model(ModelSpec(arch=arch, batchnorm=True), (1, 8, 8), 10)
    assert _count(model, norm) >= 1
    # Building the model must not feed BatchNorm anything: its running statistics start untouched.
    for bn in (m for m in model.modules() if isinstance(m, norm)):
        assert int(bn.num_batches_tracked) == 0
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
    model.train()
    model(torch.randn(16, 1, 8, 8))
    bn = next(m for m in model.modules() if isinstance(m, norm))
    assert int(bn.num_batches_tracked) == 1  # running statistics update in training mode


def test_noise_option():
    assert _count(build_model(ModelSpec(arch="lenet"), (1, 8, 8), 10), GaussianNoise) == 0
    model = build_model(ModelSpec(arch="lenet", noise_std=0.5), (1, 8, 8), 10)
    noise = [m for m in model.modules() if isinstance(m, GaussianNoise)]
    assert len(noise) == 1 and noise[0].std == 0.5 and noise[0].mode_dependent
    x = torch.randn(4, 1, 8, 8)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_registry_extension_without_touching_the_loop():
    from harness.core.loop import evaluate, train_one_epoch
    from harness.run import build

    name = "test_tiny_linear"
    with pytest.raises(SpecError, match="model.arch"):
        load_spec(None, [f"model.arch={name}"])

    @register(name)
    def tiny(spec, input_shape, num_classes):
        c, h, w = input_shape
        return nn.Sequential(nn.Flatten(), nn.Dropout(spec.dropout), nn.Linear(c * h * w, num_classes))

    try:
        spec = load_spec(None, [f"model.arch={name}", "model.dropout=0.1", "data.limit_train=300"])
        parts = build(spec)
        assert isinstance(parts.model, nn.Sequential)
        assert parts.model[2].in_features == 64 and parts.model[1].p == 0.1
        before = evaluate(parts.model, parts.data.val, parts.device)
        for epoch in (1, 2, 3):
            parts.data.train.set_epoch(epoch)
            train_one_epoch(parts.model, parts.data.train, parts.optimizer, parts.device, epoch=epoch)
        after = evaluate(parts.model, parts.data.val, parts.device)
        assert after["val/loss"] < before["val/loss"] and after["val/acc"] > 0.5
    finally:
        MODELS.pop(name, None)
    with pytest.raises(SpecError):
        load_spec(None, [f"model.arch={name}"])


# -- any channel count and image size; the ResNets ------------------------------------------------------

@pytest.mark.parametrize("arch", ["lenet", "mlp", "resnet20"])
@pytest.mark.parametrize("shape", [(3, 32, 32), (3, 8, 8), (4, 20, 12), (1, 5, 5)], ids=str)
def test_any_channel_count_and_image_size(arch, shape):
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch=arch), shape, 7)
    model.train()
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 7) and torch.isfinite(out).all()


def test_lenet_refuses_images_too_small_for_its_pools():
    with pytest.raises(SpecError, match="lenet needs images of at least 4x4 pixels, got 3x3; use mlp"):
        build_model(ModelSpec(arch="lenet"), (1, 3, 3), 10)


def test_lenet_on_cifar_is_the_tutorial_shape():
    model = build_model(ModelSpec(arch="lenet"), (3, 32, 32), 10)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    fc = next(m for m in model.modules() if isinstance(m, nn.Linear))
    assert first.in_channels == 3 and fc.in_features == 12 * 5 * 5


@pytest.mark.parametrize("arch, params, blocks", [("resnet18", 11_173_962, 8), ("resnet20", 272_474, 9)])
def test_resnets_are_batchnorm_networks_for_small_images(arch, params, blocks):
    from torchvision.models.resnet import BasicBlock as TorchvisionBlock

    from harness.core.resnet import BasicBlock

    torch.manual_seed(0)
    model = build_model(ModelSpec(arch=arch), (3, 32, 32), 10)
    assert sum(p.numel() for p in model.parameters()) == params
    assert sum(isinstance(m, (BasicBlock, TorchvisionBlock)) for m in model.modules()) == blocks
    assert _count(model, nn.BatchNorm2d) >= 2 * blocks and _count(model, nn.MaxPool2d) == 0
    stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)  # the small-image stem
    # The last stage still sees 4x4 (resnet18) or 8x8 (resnet20) maps of a 32x32 input.
    model.eval()
    maps = []
    last = [m for m in model.modules() if isinstance(m, (BasicBlock, TorchvisionBlock))][-1]
    last.register_forward_hook(lambda m, i, o: maps.append(o.shape[-1]))
    model(torch.zeros(1, 3, 32, 32))
    assert maps == [4 if arch == "resnet18" else 8]
    # Its options: dropout before the last layer and input noise; BatchNorm is always there.
    drop = build_model(ModelSpec(arch=arch, dropout=0.2, noise_std=0.1), (3, 32, 32), 10)
    assert _count(drop, nn.Dropout) == 1 and _count(drop, GaussianNoise) == 1
    with pytest.raises(SpecError, match="model.batchnorm: .* has no such option"):
        load_spec(None, [f"model.arch={arch}", "model.batchnorm=true"])


def test_freeze_takes_any_submodule_path():
    from harness.run import build

    spec = load_spec(None, ["model.arch=resnet20", "model.freeze=[features.3, features.0]", "data.limit_train=64"])
    parts = build(spec)
    frozen = parts.model.get_submodule("features.3")
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
    assert all(p.requires_grad for p in parts.model.get_submodule("features.4").parameters())
    assert all(p.requires_grad for p in parts.model.classifier.parameters())
    with pytest.raises(SpecError, match=r"model.freeze: Net has no submodule 'features.99'; its submodules are "
                                        r"noise, features, classifier"):
        build(spec.with_overrides({"model.freeze": ["features.99"]}))
