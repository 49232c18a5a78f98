"""Exact invariants of LRP: conservation, LRP-0 = gradient x input, batch = single samples."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lrp
from architectures import (Concatenating, Conv1dNet, Hyperspectral, Residual, Sequential2d, SharedWeights,
                           TabularMLP, bias_free_models)
from device_lane import float32_rel

CONSERVING = {
    "lrp0": (lambda: lrp.composite("lrp0"), 1e-8),
    "epsilon": (lambda: lrp.composite("epsilon"), 1e-4),
    "epsilon-plus": (lambda: lrp.composite("epsilon-plus"), 1e-4),
    "epsilon-plus-flat": (lambda: lrp.composite("epsilon-plus-flat"), 1e-4),
    "epsilon-gamma-box": (lambda: lrp.composite("epsilon-gamma-box", low=-4.0, high=4.0), 1e-4),
    # the layered recipe uses a large epsilon (0.25) on purpose; with a stabilizer-sized one it conserves
    "layered": (lambda: lrp.composite("layered", low=-4.0, high=4.0, epsilon=1e-6), 1e-4),
    "maxpool-average": (lambda: lrp.composite("epsilon-plus", maxpool="average"), 1e-4),
}


@pytest.mark.parametrize("composite", list(CONSERVING))
@pytest.mark.parametrize("arch", [name for name, _, _ in bias_free_models()])
def test_bias_free_networks_conserve_relevance(arch, composite, device):
    _, model, x = next(item for item in bias_free_models() if item[0] == arch)
    model, x = model.double().to(device), x.double().to(device)  # float64: exact on every device
    make, tol = CONSERVING[composite]
    res = lrp.explain(model, x, composite=make())
    start = res.start.sum(1)
    assert (start.abs() > 1e-3).all(), "test set-up: logits should be of order one"
    total = res.relevance.reshape(len(x), -1).sum(1)
    torch.testing.assert_close(total, start, rtol=tol, atol=0.0)
    torch.testing.assert_close(res.conservation["input"], torch.ones_like(start), rtol=tol, atol=0.0)


def test_alpha_beta_runs_and_differs_from_z_plus():
    # alpha-beta conserves only where every unit has both positive and negative contributions, so it is not in
    # the conservation test; here it must run and its beta term must matter
    _, model, x = bias_free_models()[0]
    model, x = model.double(), x.double()
    ab = lrp.explain(model, x, composite="epsilon-alpha2-beta1").relevance
    zplus = lrp.explain(model, x, composite="epsilon-plus").relevance
    assert torch.isfinite(ab).all()
    assert (ab - zplus).norm() > 0.1 * zplus.norm()


class ReLUWithBatchNorm(nn.Module):
    """ReLU network with biases, max pooling, BatchNorm after convs and a standalone BatchNorm."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        )
        self.norm = nn.BatchNorm2d(8)  # after a ReLU: no layer to merge into, treated as a linear map
        self.fc = nn.Linear(8 * 4 * 4, 6)
        self.bn_fc = nn.BatchNorm1d(6)

    def forward(self, x):
        h = self.norm(self.features(x))
        return self.bn_fc(self.fc(h.flatten(1)))


def _randomize_batchnorm(model):
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model


def _grad_times_input(model, x, target):
    x = x.clone().requires_grad_(True)
    out = model(x)
    (g,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), x)
    return g * x


@pytest.mark.parametrize("make", [lambda: _randomize_batchnorm(ReLUWithBatchNorm()), lambda: Sequential2d(),
                                  lambda: Residual(), lambda: Concatenating(), lambda: Conv1dNet(),
                                  lambda: Hyperspectral()])
def test_lrp0_equals_gradient_times_input_on_relu_networks(make, device):
    torch.manual_seed(0)
    model = make().double().eval()
    shapes = {Conv1dNet: (4, 2, 32), Hyperspectral: (4, 1, 6, 8, 8), ReLUWithBatchNorm: (4, 3, 8, 8),
              Concatenating: (4, 3, 8, 8)}
    x = torch.randn(*shapes.get(type(model), (4, 3, 16, 16)), dtype=torch.float64).to(device)
    model.to(device)
    res = lrp.explain(model, x, composite="lrp0")
    expected = _grad_times_input(model, x, res.target)
    torch.testing.assert_close(res.relevance, expected, rtol=1e-6, atol=1e-9)


def test_batchnorm_after_layers_is_merged_and_output_unchanged():
    model = _randomize_batchnorm(ReLUWithBatchNorm()).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    res = lrp.explain(model, x, composite="epsilon-plus")
    torch.testing.assert_close(res.output, model(x))
    # the composite's rules apply to the merged layers (conv+BN), the standalone BN is a linear map
    assert set(res.rules) == {"features.0", "features.4", "fc"}


@pytest.mark.parametrize("composite", ["epsilon-plus-flat", "epsilon-alpha2-beta1", "lrp0"])
def test_batch_explains_like_single_samples(composite, device):
    _, model, x = bias_free_models()[1]
    model, x = model.double().to(device), x.double().to(device)
    x[1] = x[1].abs()  # one sample with only positive inputs takes the fast path alone
    batch = lrp.explain(model, x, composite=composite)
    for i in range(len(x)):
        single = lrp.explain(model, x[i:i + 1], composite=composite)
        torch.testing.assert_close(single.relevance[0], batch.relevance[i], rtol=1e-10, atol=1e-12)


def test_gamma_box_batch_equals_single():
    model = Sequential2d().double()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    comp = lrp.composite("epsilon-gamma-box", low=-4.0, high=4.0)
    batch = lrp.explain(model, x, composite=comp)
    for i in range(len(x)):
        torch.testing.assert_close(lrp.explain(model, x[i:i + 1], composite=comp).relevance[0],
                                   batch.relevance[i], rtol=1e-10, atol=1e-12)


def test_per_layer_conservation_on_sequential_model(device):
    model = Sequential2d(bias=False).double().to(device)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64).to(device)
    res = lrp.explain(model, x, composite="lrp0", record_layers=True)
    assert list(res.layers) == ["0", "3", "7", "10"]
    for name, ratio in res.conservation.items():
        torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=1e-8, atol=0.0, msg=name)
    assert res.layers["7"].shape == (2, 32)


def test_float32_runs_and_is_close_to_float64(device):
    model = Residual().to(device)
    x = torch.randn(2, 3, 8, 8).to(device)
    r32 = lrp.explain(model, x).relevance
    r64 = lrp.explain(model.double(), x.double()).relevance
    assert r32.dtype == torch.float32 and r32.device == x.device
    # CUDA runs float32 convolutions in TF32 by default (tests/device_lane.py): a looser bound there only
    limit = 1e-4 if device.type == "cpu" else float32_rel(device)
    assert ((r32.double() - r64).norm() / r64.norm()) < limit
