"""Memory at a gradient's (issue 12): what ``explain`` keeps for the backward, and that keeping less changes
no heatmap.

A layer's output is not saved: the layer record holds the cheapest tensor with the same relevance (the layer
output, a merged BatchNorm's output, or the ReLU output autograd keeps anyway); identity-rule activations save
only their input; dense layers under epsilon / LRP-0 keep no input. The tests count the bytes of every tensor
autograd saves during the forward (``saved_tensors_hooks``) plus the tensors the layer records hold, for
``explain`` and for a plain gradient of the same model, parameters and the input excluded; and they check that
turning the savings off gives the same relevance, to the last bit in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import lrp
from lrp.engine.capture import Trace
from lrp.engine.propagate import Propagation
from lrp.rules import Epsilon, LayerRule

from test_equivalence import BOUNDS, BatchNormNet, Net, _composites, _image  # noqa: F401  (shared models)


def _storages(model: nn.Module, x: torch.Tensor) -> set:
    return {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), x]}


def kept_bytes(model: nn.Module, x: torch.Tensor, composite=None) -> int:
    """Bytes kept for the backward by ``explain(model, x, composite=composite)``, or by a plain gradient when
    ``composite`` is None (parameters, buffers and the input not counted; each storage once)."""
    skip = _storages(model, x)
    seen: dict[int, int] = {}

    def count(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        count(t)
        return t

    if composite is None:
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x.detach().requires_grad_(True))
        return sum(seen.values())
    start = Propagation.__init__

    def held(self, trace, *args, **kwargs):
        for layer in trace.layers:
            if layer.held is not None:
                count(layer.held)
        start(self, trace, *args, **kwargs)

    Propagation.__init__ = held  # type: ignore[method-assign]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lrp.explain(model, x, composite=composite)
    finally:
        Propagation.__init__ = start  # type: ignore[method-assign]
    return sum(seen.values())


@pytest.mark.parametrize("name, bound", [("resnet18", 0.8), ("vgg11", 1.05), ("mobilenet_v2", 0.8)])
def test_a_convolutional_network_keeps_no_more_than_its_gradient(name, bound):
    # the gradient keeps every BatchNorm's input and every ReLU's output; explain keeps the ReLU outputs and the
    # inputs of its convolutions, no layer output of its own (before: about 2x the gradient)
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    grad, ours = kept_bytes(model, x), kept_bytes(model, x, "epsilon-plus-flat")
    assert ours <= bound * grad, f"{name}: explain keeps {ours / 1e6:.2f} MB, the gradient {grad / 1e6:.2f} MB"


def test_a_transformer_keeps_its_attention_weights_and_little_else():
    # AttnLRP's softmax rule needs the attention weights (heads x T x T), which a fused attention's gradient
    # does not keep; everything else stays near the gradient's (before: 2.2x)
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                 hidden_dim=64, mlp_dim=256, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    grad, ours = kept_bytes(model, x), kept_bytes(model, x, "epsilon")
    assert ours <= 1.6 * grad, f"explain keeps {ours / 1e6:.3f} MB, the gradient {grad / 1e6:.3f} MB"


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3 = nn.Linear(20, 64), nn.Linear(64, 64), nn.Linear(64, 3)

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(F.relu(self.fc1(x)))))


def test_epsilon_keeps_no_input_of_a_dense_layer():
    # epsilon and LRP-0 read W^T u only: no layer input is kept; z+ on the same layers must keep them
    model = Mlp().eval()
    x = torch.randn(16, 20)
    grad, logits = kept_bytes(model, x), 16 * 3 * 4
    assert kept_bytes(model, x, "epsilon") <= grad + logits  # fc1's ReLU output, fc2's GELU input, the logits
    plus = lrp.Composite(default=lrp.rules.ZPlus())
    assert kept_bytes(model, x, plus) > kept_bytes(model, x, "epsilon")


class Reads(LayerRule):
    """A rule of one's own that reads the layer input without overriding ``needs_input``, and whose
    stabiliser is 0 at ``z = 0`` (``sign(0) = 0``): it must get the input and the raw layer output (a ReLU
    output for ``z`` would give 0 / 0 where ``z < 0``)."""

    def backward(self, ctx, g, R):
        return ctx.vjp(R / (ctx.z + 1e-6 * ctx.z.sign()), ctx.weight) + 0 * ctx.a


def test_a_rule_of_ones_own_gets_the_input_and_the_raw_output_by_default():
    model = Mlp().eval().double()
    x = torch.randn(3, 20, dtype=torch.float64)
    ours = lrp.explain(model, x, composite=lrp.Composite(default=Reads()))
    ref = lrp.explain(model, x, composite=lrp.Composite(default=Epsilon(1e-6)))
    torch.testing.assert_close(ours.relevance, ref.relevance)


# --------------------------------------------------------------------------- same relevance without the savings

class ResidualBlock(nn.Module):
    """conv-BN-relu, conv-BN, + identity, relu; a conv output used twice; a BN output used twice."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.conv3 = nn.Conv2d(6, 6, 1)
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(6), nn.BatchNorm2d(6), nn.BatchNorm2d(6)
        for i, bn in enumerate((self.bn1, self.bn2, self.bn3)):
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                bn.running_mean.normal_(generator=g)
                bn.running_var.uniform_(0.5, 1.5, generator=g)
                bn.weight.normal_(generator=g)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)) + h)
        z = self.conv3(h)
        u = F.relu(z)  # the ReLU comes first, then a second use of z: z must come back
        h = u + 0.5 * z
        b = self.bn3(self.conv3(h))
        v = F.relu(b)  # then a second use of the BatchNorm output
        h = v - 0.25 * b
        return self.fc(h.mean((2, 3)))


MODELS = {
    "residual": (lambda: ResidualBlock().double().eval(), lambda: _image()),
    "batchnorm": (lambda: BatchNormNet().double().eval(), lambda: _image()),
    "inplace relu": (lambda: Net(lambda m, z: m.relu(m.bn(z))).double().eval(), lambda: _image()),
    "mlp": (lambda: Mlp().double().eval(), lambda: torch.randn(3, 20, dtype=torch.float64)),
}


def _without_savings(monkeypatch) -> None:
    """Hold every layer's raw output and keep every input (merged BatchNorms applied in the backward)."""
    monkeypatch.setattr(Trace, "keep_less", False)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("composite", [c for c in _composites()], ids=[c[0] for c in _composites()])
def test_keeping_less_changes_no_relevance(model, composite, monkeypatch):
    make_model, make_input = MODELS[model]
    _, make = composite
    if model == "mlp" and make().by_position.get("first") is not None:
        pytest.skip("z^B bounds are for the image models")
    results = []
    for saving in (True, False):
        if not saving:
            _without_savings(monkeypatch)
        res = lrp.explain(make_model(), make_input(), composite=make(), record_layers=True)
        results.append(res)
    ours, before = results
    scale = before.relevance.abs().max().item()  # merged BatchNorms round differently in the last bits
    torch.testing.assert_close(ours.relevance, before.relevance, rtol=1e-9, atol=1e-12 * scale)
    assert ours.rules == before.rules
    for name in before.layers:
        torch.testing.assert_close(ours.layers[name], before.layers[name], rtol=1e-9,
                                   atol=1e-12 * before.layers[name].abs().max().item())
    for name in before.conservation:
        torch.testing.assert_close(ours.conservation[name], before.conservation[name], rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- what lrp cannot see

class Double(torch.autograd.Function):
    """A custom autograd function: ``apply`` does not pass through lrp's function mode."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


class HiddenUse(nn.Module):
    def __init__(self, custom: bool):
        super().__init__()
        torch.manual_seed(1)
        self.fc1, self.fc2, self.custom = nn.Linear(6, 8), nn.Linear(8, 3), custom

    def forward(self, x):
        z = self.fc1(x)
        other = Double.apply(z) if self.custom else z * 2
        return self.fc2(F.relu(z) + other)  # relevance reaches z where z <= 0 through the other path


@pytest.mark.parametrize("composite", ["epsilon", "epsilon-plus", "epsilon-alpha2-beta1"])
def test_a_use_inside_a_custom_autograd_function_counts(composite):
    x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    custom = lrp.explain(HiddenUse(True).double().eval(), x, composite=composite).relevance
    plain = lrp.explain(HiddenUse(False).double().eval(), x, composite=composite).relevance
    torch.testing.assert_close(custom, plain, rtol=1e-10, atol=1e-12)


class HalveInPlace(nn.Module):
    def forward(self, x):
        return x.mul_(0.5)


class SwishInPlace(nn.Module):
    def forward(self, x):
        return x.mul_(torch.sigmoid(x))


@pytest.mark.parametrize("module, rule", [(HalveInPlace, lrp.rules.Gradient()), (SwishInPlace, lrp.rules.Pass())])
@pytest.mark.parametrize("batchnorm", [False, True])
def test_a_layer_output_changed_in_place_by_a_module_lrp_trusts_is_an_error(module, rule, batchnorm):
    # code lrp runs as it is (a module with a Gradient() or Pass() rule) writes into what a rule needs: an
    # error that says so, never a rule reading the changed values
    torch.manual_seed(1)
    layers = [nn.Conv2d(3, 4, 3)] + ([nn.BatchNorm2d(4)] if batchnorm else []) + [module(), nn.Flatten(),
                                                                                    nn.Linear(4 * 36, 3)]
    model = nn.Sequential(*layers).double().eval()
    comp = lrp.composite("epsilon-plus")
    comp.module_rules = {module: rule}
    with pytest.raises(lrp.LRPError, match="in place"):
        lrp.explain(model, _image(), composite=comp)


class SignedEpsilon(Epsilon):
    """An epsilon rule of one's own that reads the layer input on dense layers."""

    def backward(self, ctx, g, R):
        return super().backward(ctx, g, R) * (ctx.a > 0)


def test_a_subclass_of_a_rule_that_reads_the_input_gets_it(monkeypatch):
    model = Mlp().double().eval()
    x = torch.randn(4, 20, dtype=torch.float64)
    res = lrp.explain(model, x, composite=lrp.Composite(default=SignedEpsilon()))
    monkeypatch.setattr(Trace, "keep_less", False)  # every input kept
    ref = lrp.explain(model, x, composite=lrp.Composite(default=SignedEpsilon()))
    torch.testing.assert_close(res.relevance, ref.relevance, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(res.relevance, lrp.explain(model, x, composite="epsilon").relevance)
