"""Agreement with Zennit 0.5.1 on torchvision VGG16 and ResNet18 (random weights, float64)."""

import pytest
import torch

import lrp

zennit = pytest.importorskip("zennit")
torchvision = pytest.importorskip("torchvision")
from zennit.attribution import Gradient  # noqa: E402
from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlusFlat  # noqa: E402
from zennit.torchvision import ResNetCanonizer, VGGCanonizer  # noqa: E402


def _randomize_bn(model):
    """Give BatchNorm layers non-trivial statistics so that merging them is actually tested."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            # Zennit's canonizer merges a BatchNorm into the conv before it and then leaves the BatchNorm as
            # x / sqrt(1 + eps), so its canonized model no longer computes the original output (a relative drift of
            # ~1e-3 in ResNet18's heatmaps). With eps = 0 its merge is exact and the two tools can be compared.
            m.eps = 0.0


@pytest.fixture(scope="module", params=["vgg16", "resnet18"])
def model_and_canonizer(request):
    torch.manual_seed(0)
    model = getattr(torchvision.models, request.param)(weights=None).double().eval()
    _randomize_bn(model)
    canonizer = VGGCanonizer() if request.param == "vgg16" else ResNetCanonizer()
    return request.param, model, canonizer


COMPOSITES = {
    "epsilon-plus-flat": (lambda c: EpsilonPlusFlat(canonizers=[c]), {}),
    "epsilon-gamma-box": (lambda c: EpsilonGammaBox(low=-3.0, high=3.0, canonizers=[c]), {"low": -3.0, "high": 3.0}),
    "epsilon-alpha2-beta1": (lambda c: EpsilonAlpha2Beta1(canonizers=[c]), {}),
}


@pytest.mark.parametrize("name", list(COMPOSITES))
def test_agrees_with_zennit(model_and_canonizer, name):
    arch, model, canonizer = model_and_canonizer
    make_zennit, params = COMPOSITES[name]
    # one image: the agreement is per layer and rule, which a second image would check again at twice the cost
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ours = lrp.explain(model, x, composite=lrp.composite(name, **params))
    target = ours.target
    with Gradient(model=model, composite=make_zennit(canonizer)) as attributor:
        out, theirs = attributor(x, lambda o: torch.zeros_like(o).scatter_(1, target[:, None], 1.0) * o)
    assert torch.allclose(out, ours.output, rtol=1e-10, atol=1e-10)
    rel = ((ours.relevance - theirs).norm() / theirs.norm()).item()
    assert rel <= 1e-4, f"{arch} {name}: relative L2 difference {rel:.2e}"
