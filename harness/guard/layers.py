"""Which layers behave differently in training and evaluation mode: the modules the guard watches and
the mode policies (``harness.core.modes``) act on."""
from __future__ import annotations

from torch import nn


def is_stochastic(m: nn.Module) -> bool:
    """Dropout, layers with dropout inside (LSTM/GRU between layers, MultiheadAttention on its weights),
    RReLU, and custom layers that flag themselves ``mode_dependent`` (e.g. GaussianNoise)."""
    if isinstance(m, (nn.modules.dropout._DropoutNd, nn.RReLU)) or getattr(m, "mode_dependent", False):
        return True
    return isinstance(m, (nn.RNNBase, nn.MultiheadAttention)) and m.dropout > 0


def is_batchnorm(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def is_mode_sensitive(m: nn.Module) -> bool:
    return is_stochastic(m) or is_batchnorm(m)
