"""LRP-0 equals gradient x input on every ReLU-only torchvision classification model (as in docs/coverage.md)."""

import sys
from pathlib import Path

import pytest
import torch

import lrp

torchvision = pytest.importorskip("torchvision")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from coverage import input_size, randomize_head, relu_only  # noqa: E402

NAMES = torchvision.models.list_models(module=torchvision.models)


def _relu_only_models():
    names = []
    for name in NAMES:
        torch.manual_seed(0)
        try:
            with torch.device("meta"):  # no memory, no init cost: only the module types are looked at
                model = torchvision.models.get_model(name, weights=None)
        except NotImplementedError:  # an initialiser that copies data: build it for real
            model = torchvision.models.get_model(name, weights=None)
        if relu_only(model, name):
            names.append(name)
    return names


RELU_ONLY = _relu_only_models()


def test_some_models_are_relu_only():
    assert {"vgg16", "resnet50", "densenet161", "googlenet", "inception_v3", "alexnet"} <= set(RELU_ONLY)


@pytest.mark.parametrize("name", RELU_ONLY)
def test_lrp0_equals_gradient_times_input(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).double().eval()
    randomize_head(model)
    size = input_size(name)
    x = torch.rand(1, 3, size, size, dtype=torch.float64) * 2 - 1
    res = lrp.explain(model, x, composite="lrp0")
    x_ = x.clone().requires_grad_(True)
    out = model(x_)
    (g,) = torch.autograd.grad(out[0, res.target[0]], x_)
    torch.testing.assert_close(res.output, out.detach())
    assert ((res.relevance - g * x).norm() / (g * x).norm()) < 1e-6
