"""Models: the registry (``lenet``, the classic 2-conv CNN; ``mlp``; ``resnet18``, ``resnet20``) and a
researcher's own factory, named in the spec as ``model.arch: package.module:function``.

A factory's contract: ``factory(input_shape=(C, H, W), num_classes=K, **model.args) -> nn.Module`` whose
forward maps a ``(N, C, H, W)`` float batch to ``(N, K)`` logits. The harness adds nothing to it (no
dropout, BatchNorm or noise: those options belong to the built-in models that declare them).

Register a built-in without touching the loop::

    @register("mynet", options=("dropout",))
    def mynet(spec: ModelSpec, input_shape, num_classes) -> nn.Module: ...

The built-ins expose ``features`` and ``classifier`` submodules; ``model.freeze`` takes any submodule
path of any model (``features``, ``backbone.layer4``).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from harness.core import imports
from harness.core.resnet import cifar_resnet20, small_image_resnet18
from harness.errors import SpecError

Builder = Callable[..., nn.Module]
MODELS: dict[str, Builder] = {}


def register(name: str, options: Sequence[str] = ("dropout", "batchnorm", "noise_std")
             ) -> Callable[[Builder], Builder]:
    """Make ``builder(spec, input_shape, num_classes)`` selectable as ``model.arch: name``; ``options``:
    the spec's model options it honours (any other one set in a spec is refused)."""
    def deco(fn: Builder) -> Builder:
        fn.options = tuple(options)  # type: ignore[attr-defined]
        MODELS[name] = fn
        return fn

    return deco


def build_model(spec, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The model the spec names, for ``input_shape`` images and ``num_classes`` classes."""
    if spec.arch in MODELS:
        return MODELS[spec.arch](spec, tuple(input_shape), num_classes)
    try:
        fn = imports.resolve(spec.arch)
    except imports.FactoryError as e:
        raise SpecError(f"model.arch: {e}") from None
    model = imports.call("model.arch", spec.arch, fn, input_shape=tuple(input_shape), num_classes=num_classes,
                         **spec.args)
    if not isinstance(model, nn.Module):
        raise SpecError(f"model.arch: {spec.arch} returned {imports.short(model, 60)} ({type(model).__name__}), "
                        f"not a torch.nn.Module")
    _probe(model, spec.arch, input_shape, num_classes)
    return model


def _probe(model: nn.Module, arch: str, input_shape: tuple[int, int, int], num_classes: int) -> None:
    """One forward of two zero images in eval mode (no statistics move, no random numbers drawn): the
    output must be ``(2, num_classes)`` logits. Catches a wrong head before any run exists."""
    modes = {m: m.training for m in model.modules()}
    shape = (2, *input_shape)
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.eval()
            out = model(torch.zeros(shape))
    except Exception as e:
        raise SpecError(f"model.arch: {arch}'s forward on a batch of shape {shape} raised "
                        f"{type(e).__name__}: {imports._first_line(e)}") from None
    finally:
        for m, training in modes.items():
            m.training = training
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise SpecError(f"model.arch: {arch} maps a batch of shape {shape} to {got}; it must return logits of "
                        f"shape (batch, {num_classes}) for this dataset's {num_classes} classes")


def check_submodules(model: nn.Module, paths: Sequence[str], field: str = "model.freeze") -> None:
    """Every path names a submodule (``get_submodule`` syntax), else one line listing what there is."""
    for path in paths:
        try:
            model.get_submodule(path)
        except AttributeError:
            names = [n for n, _ in model.named_children()]
            raise SpecError(f"{field}: {type(model).__name__} has no submodule {path[:60]!r}; its submodules "
                            f"are {', '.join(names[:12]) or 'none'} (dotted paths such as "
                            f"{names[0] if names else 'features'}.0 reach deeper)") from None


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class GaussianNoise(nn.Module):
    """Adds N(0, std^2) noise in training mode only: the classic custom module that reads ``self.training``.
    The mode guard treats it like Dropout."""

    mode_dependent = True  # the guard's marker for custom layers whose forward depends on the mode

    def __init__(self, std: float):
        super().__init__()
        self.std = std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.std > 0:
            return x + torch.randn_like(x) * self.std
        return x

    def extra_repr(self) -> str:
        return f"std={self.std}"


def _head(in_features: int, hidden: list[int], num_classes: int, spec) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers.append(nn.Linear(in_features, width))
        if spec.batchnorm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(nn.ReLU())
        if spec.dropout > 0:
            layers.append(nn.Dropout(spec.dropout))
        in_features = width
    layers.append(nn.Linear(in_features, num_classes))
    return nn.Sequential(*layers)


class Net(nn.Module):
    def __init__(self, features: nn.Module, classifier: nn.Module, noise_std: float = 0.0):
        super().__init__()
        self.noise = GaussianNoise(noise_std) if noise_std > 0 else nn.Identity()
        self.features = features
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(self.noise(x)), 1))


@register("lenet")
def lenet(spec, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """conv 6@5x5 -> pool -> conv 12@5x5 -> pool -> fc 120 -> fc 60 -> classes, for any channel count.

    Images of 16 pixels or more use unpadded convolutions as in the tutorial; smaller ones (digits'
    8x8) pad by 2 so both pools still fit."""
    c, h, w = input_shape
    if min(h, w) < 4:
        raise SpecError(f"model.arch: lenet needs images of at least 4x4 pixels, got {h}x{w}; use mlp")
    pad = 0 if min(h, w) >= 16 else 2
    layers: list[nn.Module] = []
    for cin, cout in ((c, 6), (6, 12)):
        layers.append(nn.Conv2d(cin, cout, 5, padding=pad))
        if spec.batchnorm:
            layers.append(nn.BatchNorm2d(cout))
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
    features = nn.Sequential(*layers)
    # Probe the flattened size in eval mode: in training mode BatchNorm would fold this dummy batch
    # of zeros into its running statistics before training starts.
    features.eval()
    with torch.no_grad():
        flat = features(torch.zeros(1, c, h, w)).numel()
    features.train()
    return Net(features, _head(flat, [120, 60], num_classes, spec), spec.noise_std)


@register("mlp")
def mlp(spec, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    c, h, w = input_shape
    features = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 256), nn.ReLU())
    return Net(features, _head(256, [128], num_classes, spec), spec.noise_std)


def _resnet_head(width: int, num_classes: int, spec) -> nn.Sequential:
    return nn.Sequential(*([nn.Dropout(spec.dropout)] if spec.dropout > 0 else []), nn.Linear(width, num_classes))


@register("resnet18", options=("dropout", "noise_std"))
def resnet18(spec, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """torchvision's ResNet-18 for small images (3x3 stem, no max-pool); BatchNorm throughout."""
    features, width = small_image_resnet18(input_shape[0])
    return Net(features, _resnet_head(width, num_classes, spec), spec.noise_std)


@register("resnet20", options=("dropout", "noise_std"))
def resnet20(spec, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """He et al.'s CIFAR ResNet-20 (3 stages of 3 basic blocks, 16/32/64 channels, 0.27M parameters)."""
    features, width = cifar_resnet20(input_shape[0])
    return Net(features, _resnet_head(width, num_classes, spec), spec.noise_std)
