"""Mixed precision: ``explain`` under ``torch.autocast`` and on models held in bfloat16 / float16.

The rules never compute in half precision (``lrp.engine.precision.working_dtype``): their backward runs in float32
with autocast off for the tensors' device and casts back, clamped to the activation dtype's finite range.
The explanations of half-precision forwards are compared with the float32 explanation of the same model.

Models use random weights with fixed seeds. BatchNorm statistics are calibrated on random images (as a
trained network's would be): with arbitrary running statistics a random CNN is so ill-conditioned that a
2**-9 relative perturbation of the input alone moves its float32 gradient x input to a cosine of ~0.99, so a
bfloat16 forward, which rounds every activation that much, says nothing about the rules.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lrp
from lrp.rules import AlphaBeta, Epsilon, Flat, Gamma, Pass, WSquare, ZBox, ZPlus

from architectures import LastToken

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
HALF = [torch.bfloat16, torch.float16]
MIN_COSINE = 0.99


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().flatten().cpu(), b.detach().double().flatten().cpu()
    return float(a @ b / (a.norm() * b.norm()))


@functools.lru_cache(maxsize=None)
def _half_supported(device: str, dtype: torch.dtype) -> bool:
    """Whether this torch runs the ops involved in ``dtype`` on ``device``, held and under autocast."""
    try:
        x = torch.rand(1, 2, 6, 6, device=device)
        conv = nn.Conv2d(2, 2, 3).to(device)
        conv.to(dtype)(x.to(dtype))
        with torch.autocast(device, dtype=dtype):
            ok = nn.Conv2d(2, 2, 3).to(device)(x).dtype == dtype and torch.matmul(x, x).dtype == dtype
        return bool(ok)
    except (RuntimeError, TypeError):
        return False


def _need(device: str, dtype: torch.dtype) -> None:
    if not _half_supported(device, dtype):
        pytest.skip(f"this torch does not run {dtype} on {device}")


# --------------------------------------------------------------------------- models


def _calibrate(model: nn.Module, seed: int, shape: tuple) -> nn.Module:
    """BatchNorm running statistics of random images (cumulative average), then eval mode."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.rand(shape, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


class VGGLike(nn.Module):
    """conv/BN/ReLU blocks with max-pooling, then a dense classifier."""

    def __init__(self):
        super().__init__()

        def block(i: int, o: int) -> list:
            return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*block(3, 16), *block(16, 16), nn.MaxPool2d(2),
                                      *block(16, 32), *block(32, 32), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Dropout(),
                                        nn.Linear(64, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class ResNetLike(nn.Module):
    """Stem conv + BN (merged), max-pool, two residual blocks with BN merged into their convs, global pool."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(BasicBlock(16), BasicBlock(16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = self.layer1(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _vgg() -> nn.Module:
    torch.manual_seed(1)
    return _calibrate(VGGLike(), 11, (64, 3, 32, 32))


def _resnet() -> nn.Module:
    torch.manual_seed(2)
    return _calibrate(ResNetLike(), 12, (64, 3, 32, 32))


def _vit() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(3)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.2)  # torchvision starts the head at zero
    nn.init.normal_(model.heads.head.bias, std=0.1)
    return model.eval()


def _llama(attention: str = "sdpa") -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(4)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config._attn_implementation = attention
    return LastToken(transformers.LlamaForCausalLM(config)).eval()


def _llama_composite(name: str) -> lrp.Composite:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    comp = lrp.composite(name)
    comp.module_rules = {LlamaRMSNorm: Pass()}  # RMSNorm written out with rsqrt: not this test's subject
    return comp


def _image(device: str) -> torch.Tensor:
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)


def _tokens(device: str) -> torch.Tensor:
    return torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(0)).to(device)


_MODELS = {"vgg": _vgg, "resnet": _resnet, "vit": _vit, "llama": _llama}
# composites per model: image models get both; the tiny Llama reads token ids (no pixels, no input bounds)
_CASES = [(m, c) for m in ("vgg", "resnet", "vit") for c in ("epsilon-plus-flat", "epsilon-gamma-box")] + \
         [("llama", "epsilon-plus-flat"), ("llama", "epsilon")]


def _composite(model_name: str, name: str) -> lrp.Composite:
    if model_name == "llama":
        return _llama_composite(name)
    if name == "epsilon-gamma-box":
        return lrp.composite(name, low=0.0, high=1.0)  # the input range of torch.rand images
    return lrp.composite(name)


@functools.lru_cache(maxsize=None)
def _model(name: str, device: str) -> nn.Module:
    return _MODELS[name]().to(device)


def _input(name: str, device: str) -> torch.Tensor:
    return _tokens(device) if name == "llama" else _image(device)


@functools.lru_cache(maxsize=None)
def _reference(model_name: str, comp_name: str, device: str) -> lrp.Explanation:
    model = _model(model_name, device)
    res = lrp.explain(model, _input(model_name, device), composite=_composite(model_name, comp_name))
    return res


def _check_reference(res: lrp.Explanation) -> None:
    """The float32 explanation must be worth comparing: finite, not ~0, and not one value everywhere."""
    r = res.relevance.reshape(res.relevance.shape[0], -1).double()
    assert bool(torch.isfinite(r).all())
    start = res.start.reshape(res.start.shape[0], -1).double().abs().sum(1)
    assert bool((start > 1e-3).all()), start
    assert bool((r.abs().sum(1) > 0.05 * start).all()), (r.abs().sum(1), start)
    assert bool((r.std(1) > 1e-4 * r.abs().max(1).values).all())


def _explain_half(model_name: str, comp_name: str, device: str, dtype: torch.dtype, mode: str):
    model = _model(model_name, device)
    x = _input(model_name, device)
    comp = _composite(model_name, comp_name)
    target = _reference(model_name, comp_name, device).target  # the same class as the float32 explanation
    if mode == "autocast":
        with torch.autocast(x.device.type, dtype=dtype):
            return lrp.explain(model, x, target, comp)
    held = copy.deepcopy(model).to(dtype)
    return lrp.explain(held, x.to(dtype) if x.is_floating_point() else x, target, comp)


# --------------------------------------------------------------------------- explanations of whole models


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_name, comp_name", _CASES)
def test_float32_reference_is_not_degenerate(model_name, comp_name, device):
    _check_reference(_reference(model_name, comp_name, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["autocast", "held"])
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("model_name, comp_name", _CASES)
def test_half_precision_explanation_matches_float32(model_name, comp_name, dtype, mode, device):
    _need(device, dtype)
    ref = _reference(model_name, comp_name, device)
    res = _explain_half(model_name, comp_name, device, dtype, mode)
    assert res.relevance.dtype == torch.float32  # documented: half-precision inputs give float32 relevance
    assert res.relevance.shape == ref.relevance.shape
    assert bool(torch.isfinite(res.relevance).all()), "inf/nan in the relevance"
    for name, ratio in res.conservation.items():
        assert bool(torch.isfinite(ratio).all()), f"inf/nan in the relevance at {name}"
    if mode == "held":
        assert res.output.dtype == dtype  # the model ran in its own precision
    cosine = _cos(res.relevance, ref.relevance)
    assert cosine >= MIN_COSINE, f"{model_name} {comp_name} {dtype} {mode}: cosine {cosine:.4f}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_name", ["vgg", "vit"])
def test_autocast_inside_the_model(model_name, device):
    """A model that enables autocast in its own forward: the backward runs without the autocast state, as on
    CUDA, whose autograd worker threads do not see it (the rules' convolutions then mixed bfloat16
    activations with float32 weights: "Input type (CUDABFloat16Type) and weight type ... should be the
    same")."""
    _need(device, torch.bfloat16)

    class Autocasted(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                return self.inner(x)

    for comp_name in ("epsilon-plus-flat", "epsilon-gamma-box"):
        ref = _reference(model_name, comp_name, device)
        res = lrp.explain(Autocasted(_model(model_name, device)), _image(device), ref.target,
                          _composite(model_name, comp_name))
        assert res.output.dtype == torch.bfloat16
        assert _cos(res.relevance, ref.relevance) >= MIN_COSINE


@pytest.mark.parametrize("device", DEVICES)
def test_llama_eager_attention_in_bfloat16(device):
    _need(device, torch.bfloat16)
    model = _llama("eager").to(device)
    ids, comp = _tokens(device), _llama_composite("epsilon")
    ref = lrp.explain(model, ids, composite=comp)
    _check_reference(ref)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16):
        mixed = lrp.explain(model, ids, ref.target, comp)
    held = lrp.explain(copy.deepcopy(model).to(torch.bfloat16), ids, ref.target, comp)
    for res in (mixed, held):
        assert res.relevance.dtype == torch.float32
        assert _cos(res.relevance, ref.relevance) >= MIN_COSINE


# --------------------------------------------------------------------------- the model is left as it was


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["autocast", "held"])
def test_model_is_left_as_it_was(mode, device):
    _need(device, torch.bfloat16)
    model = copy.deepcopy(_model("resnet", device))
    if mode == "held":
        model.to(torch.bfloat16)
    model.layer1.train()  # a mixed state, to see that it is restored as it was
    model.fc.weight.requires_grad_(False)
    before = {k: (v.dtype, v.requires_grad, v.clone()) for k, v in model.state_dict(keep_vars=True).items()}
    modes = {name: m.training for name, m in model.named_modules()}
    x, comp = _image(device), lrp.composite("epsilon-gamma-box", low=0.0, high=1.0)
    if mode == "held":
        lrp.explain(model, x.to(torch.bfloat16), composite=comp)
    else:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            lrp.explain(model, x, composite=comp)
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    for key, (dtype, requires_grad, value) in before.items():
        assert after[key].dtype == dtype, key
        assert after[key].requires_grad == requires_grad, key
        assert torch.equal(after[key], value), key
        assert after[key].grad is None, key
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# --------------------------------------------------------------------------- rules in half precision


def _dense(weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


_RULES = {"epsilon": Epsilon(), "zplus": ZPlus(), "alpha2beta1": AlphaBeta(), "gamma": Gamma(),
          "flat": Flat(), "wsquare": WSquare(), "zbox": ZBox(-1.0, 1.0)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("signed", [False, True], ids=["x>=0", "signed-x"])
@pytest.mark.parametrize("scale", [3e-5, 60.0], ids=["tiny-z", "large-w"])
@pytest.mark.parametrize("rule", list(_RULES))
def test_rules_in_float16_do_not_overflow(rule, scale, signed, device):
    """Outputs far below float16's normal range (1/s(z) would overflow: inf * R, inf * 0 = nan) and weights
    whose squares sum past float16's maximum (w^2): the rules divide in float32 and match float64."""
    _need(device, torch.float16)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(6, 24, generator=g) * scale
    b = torch.randn(6, generator=g) * scale * 0.1
    x = torch.rand(3, 24, generator=g)
    if signed:
        x = x * 2 - 1
    model = _dense(w, b).to(device, torch.float16)
    x16 = x.to(device, torch.float16)
    comp = lrp.Composite(default=_RULES[rule])
    res = lrp.explain(model, x16, composite=comp, target=0)
    exact = lrp.explain(copy.deepcopy(model).double(), x16.double(), composite=comp, target=0)
    assert res.relevance.dtype == torch.float32
    assert bool(torch.isfinite(res.relevance).all())
    assert _cos(res.relevance, exact.relevance) >= 0.999
    assert torch.allclose(res.relevance.double().sum(1), exact.relevance.sum(1), rtol=2e-2,
                          atol=1e-2 * float(exact.relevance.abs().sum(1).max()))


@pytest.mark.parametrize("device", DEVICES)
def test_identity_rule_near_zero_in_float16(device):
    """``g y / x`` of a sigmoid at x ~ 0 exceeds float16's range: clamped, not inf (inf * 0 = nan)."""
    _need(device, torch.float16)
    model = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 2)).to(device)
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4) * 1e-7)
        model[0].bias.zero_()
    x = torch.tensor([[0.0, 1.0, -1.0, 0.5]], device=device)
    res = lrp.explain(model.to(torch.float16), x.to(torch.float16), target=0, composite="epsilon")
    assert bool(torch.isfinite(res.relevance).all())


@pytest.mark.parametrize("device", DEVICES)
def test_start_relevance_at_tiny_float16_logits(device):
    """``start='prob'`` divides the start relevance by the logits: in float32, clamped where they are tiny."""
    _need(device, torch.float16)
    model = nn.Linear(4, 3).to(device)
    with torch.no_grad():
        model.weight.mul_(1e-4)
        model.bias.zero_()
    x = torch.rand(2, 4, device=device)
    res = lrp.explain(model.to(torch.float16), x.to(torch.float16), start="prob", composite="epsilon")
    assert bool(torch.isfinite(res.relevance).all())


@pytest.mark.parametrize("device", DEVICES)
def test_float64_stays_float64(device):
    model = _dense(torch.randn(3, 5), torch.randn(3)).double().to(device)
    res = lrp.explain(model, torch.randn(2, 5, dtype=torch.float64, device=device))
    assert res.relevance.dtype == torch.float64
