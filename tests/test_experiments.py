"""Every experiment spec in experiments/*.yaml loads, validates and builds.

(Ablation specs live in experiments/ablations/ and have their own format and tests.)"""
from __future__ import annotations

import pytest
import torch

from conftest import ROOT
from harness.spec import Spec, load_spec

SPECS = sorted([*(ROOT / "experiments").glob("*.yaml"), *(ROOT / "experiments").glob("*.yml")])


def test_there_are_experiment_specs():
    assert any(p.name == "digits_lenet.yaml" for p in SPECS)


@pytest.mark.parametrize("path", SPECS, ids=[p.name for p in SPECS])
def test_experiment_spec_loads_and_builds(path):
    from harness.core.models import build_model
    from harness.run import build

    spec = load_spec(path)
    assert isinstance(spec, Spec)
    assert spec.name != "default", "give every experiment its own MLflow experiment name"
    assert load_spec(path).hash() == spec.hash()
    if spec.data.dataset == "digits":  # offline: build everything and push one batch through
        parts = build(spec.with_overrides({"train.device": "cpu"}))
        x, y = next(iter(parts.data.train))
        assert parts.model(x).shape == (len(y), parts.data.num_classes)
    else:  # downloaded sets are not downloaded in tests: build the model for the shape they have
        shape, classes = {"cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100)}.get(
            spec.data.dataset, ((1, 28, 28), 10))
        model = build_model(spec.model, shape, classes).eval()
        assert model(torch.zeros(2, *shape)).shape == (2, classes)
