"""Normalisations by what they compute, not by class name (issue 13, item 1).

A normalisation divides or multiplies the signal by a statistic of it (a root of a mean of squares, a variance,
a norm). lrp holds the statistic fixed, as AttnLRP holds LayerNorm's standard deviation fixed, so relevance
passes through the signal. Hand-written forms (Llama's and Gemma's RMSNorm, T5's LayerNorm, a LayerNorm written
out, a norm in the denominator) must give what the built-in forms give (``F.rms_norm``, ``F.layer_norm``,
``F.normalize``, which lrp already holds fixed), and a power or root that is not part of such a statistic still
stops ``explain`` with an error naming it.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lrp

from architectures import LastToken

D = 8


COMPUTE = torch.float64  # Hugging Face computes these in float32; the tests run in float64 throughout


class LlamaRMSNorm(nn.Module):
    """As in Hugging Face's Llama/Qwen/Mistral: the statistic in float32 (here ``COMPUTE``), then back to the
    input's dtype."""

    def __init__(self, weight: torch.Tensor, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(weight.clone()), eps

    def forward(self, x):
        dtype = x.dtype
        h = x.to(COMPUTE)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.eps)
        return self.weight * h.to(dtype)


class GemmaRMSNorm(nn.Module):
    """As in Gemma: ``x * rsqrt(mean(x * x) + eps) * (1 + w)``."""

    def __init__(self, weight: torch.Tensor, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(weight.clone() - 1.0), eps

    def forward(self, x):
        norm = x * torch.rsqrt(x.to(COMPUTE).square().mean(-1, keepdim=True) + self.eps)
        return (norm * (1.0 + self.weight.to(COMPUTE))).type_as(x)


class InPlaceRMSNorm(nn.Module):
    """The statistic applied in place: ``x *= rsqrt(mean(x**2) + eps)``."""

    def __init__(self, weight: torch.Tensor, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(weight.clone()), eps

    def forward(self, x):
        h = x.clone()
        h *= torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return h * self.weight


class BuiltinRMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(weight.clone()), eps

    def forward(self, x):
        return F.rms_norm(x, (D,), self.weight, self.eps)


class LayerNormByHand(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, how: str, eps: float = 1e-5):
        super().__init__()
        self.weight, self.bias, self.how, self.eps = nn.Parameter(weight.clone()), nn.Parameter(bias.clone()), how, eps

    def forward(self, x):
        if self.how == "builtin":
            return F.layer_norm(x, (D,), self.weight, self.bias, self.eps)
        if self.how == "var_mean":  # timm's LayerNorm2d
            var, mean = torch.var_mean(x, -1, unbiased=False, keepdim=True)
            return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias
        centred = x - x.mean(-1, keepdim=True)
        if self.how == "var":
            var = x.var(-1, keepdim=True, unbiased=False)
        else:
            var = (centred ** 2).mean(-1, keepdim=True)
        return centred / torch.sqrt(var + self.eps) * self.weight + self.bias


class Net(nn.Module):
    """fc -> norm -> relu -> fc, in float64."""

    def __init__(self, norm: nn.Module, bias: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.norm = nn.Linear(5, D, bias=bias), nn.Linear(D, 3, bias=bias), norm

    def forward(self, x):
        return self.fc2(F.relu(self.norm(self.fc1(x))))


def _weight(seed: int = 1) -> torch.Tensor:
    return torch.rand(D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5


def _x() -> torch.Tensor:
    return torch.randn(4, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def _relevance(norm: nn.Module, composite: str, bias: bool = True) -> torch.Tensor:
    model = Net(norm, bias).double().eval()
    return lrp.explain(model, _x(), target=0, composite=composite).relevance


@pytest.mark.parametrize("composite", ["lrp0", "epsilon", "epsilon-plus"])
@pytest.mark.parametrize("written", [LlamaRMSNorm, GemmaRMSNorm, InPlaceRMSNorm])
def test_hand_written_rmsnorm_equals_the_builtin(written, composite):
    ours = _relevance(written(_weight()), composite)
    ref = _relevance(BuiltinRMSNorm(_weight()), composite)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("how", ["var", "moments", "var_mean"])
def test_a_layernorm_written_out_equals_the_builtin(how):
    bias = torch.linspace(-0.3, 0.3, D, dtype=torch.float64)
    ours = _relevance(LayerNormByHand(_weight(), bias, how), "epsilon")
    ref = _relevance(LayerNormByHand(_weight(), bias, "builtin"), "epsilon")
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


class NormDivide(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def forward(self, x):
        if self.how == "builtin":
            return F.normalize(x, dim=-1, eps=1e-12)
        if self.how == "norm":
            return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        if self.how == "linalg.norm":
            return x / torch.linalg.norm(x, dim=-1, keepdim=True).clamp_min(1e-12)
        return x * torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12).reciprocal()


@pytest.mark.parametrize("how", ["norm", "vector_norm", "linalg.norm"])
def test_dividing_by_a_norm_equals_f_normalize(how):
    ours = _relevance(NormDivide(how), "epsilon")
    ref = _relevance(NormDivide("builtin"), "epsilon")
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


class SumNormalised(nn.Module):
    """Relevance-like weights renormalised by their sum (as ConViT's attention): the sum held fixed."""

    def __init__(self, detach: bool):
        super().__init__()
        self.detach = detach

    def forward(self, x):
        a = F.relu(x) + 0.1
        total = a.sum(-1, keepdim=True)
        return a / (total.detach() if self.detach else total)


def test_division_by_a_sum_of_the_signal_holds_the_sum_fixed():
    ours = _relevance(SumNormalised(False), "epsilon")
    ref = _relevance(SumNormalised(True), "epsilon")
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_a_bias_free_network_with_rmsnorm_conserves_relevance():
    # held fixed, the normalisation is a linear map without bias: LRP-0 conserves relevance exactly
    model = Net(LlamaRMSNorm(_weight()), bias=False).double().eval()
    res = lrp.explain(model, _x(), target=0, composite="lrp0")
    torch.testing.assert_close(res.conservation["input"], torch.ones(4, dtype=torch.float64), rtol=1e-9, atol=1e-9)


class Cubed(nn.Module):
    def forward(self, x):
        return x * x.pow(2)


class PlusEnergy(nn.Module):
    def forward(self, x):
        return x + x.pow(2).sum(-1, keepdim=True)


class RootFeatures(nn.Module):
    def forward(self, x):
        return torch.sqrt(F.relu(x) + 1.0)


class PowerBeside(nn.Module):
    def forward(self, x):
        return torch.cat([x, x.pow(2)], -1)[..., :D]


class PowerAdded(nn.Module):
    def forward(self, x):
        return x + 0.1 * x.pow(3)


@pytest.mark.parametrize("module, match", [
    (PlusEnergy, "pow"),  # a statistic added to the signal, not scaling it
    (PowerBeside, "'pow'.*'cat'"),  # a power beside the signal: neither a gate nor reduced
    (RootFeatures, "statistics"),  # the next layer reads only values held fixed
    (PowerAdded, "statistics"),  # x + x**3 is no linear map of x: held fixed, it is all the next layer reads
])
def test_a_power_that_is_no_normalisation_statistic_or_gate_is_an_error(module, match):
    with pytest.raises(lrp.UnsupportedOperationError, match=match):
        lrp.explain(Net(module()).double().eval(), _x(), target=0)


class TanhGELU(nn.Module):
    """Hugging Face's ``NewGELUActivation`` (GPT-2), written out as there."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class BuiltinTanhGELU(nn.Module):
    def forward(self, x):
        return F.gelu(x, approximate="tanh")


@pytest.mark.parametrize("composite", ["lrp0", "epsilon", "epsilon-plus"])
def test_hand_written_tanh_gelu_equals_the_builtin(composite):
    # the power inside is a gate of the signal, held fixed: the identity rule that F.gelu gets
    ours = _relevance(TanhGELU(), composite)
    ref = _relevance(BuiltinTanhGELU(), composite)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_the_signal_times_a_power_of_it_is_gated_by_the_power():
    # x * x**2 is read as an elementwise activation: the power held fixed, relevance passes (identity rule),
    # exactly as registering lrp.rules.Pass() for the module gives
    ours = _relevance(Cubed(), "epsilon")
    comp = lrp.composite("epsilon")
    comp.module_rules = {Cubed: lrp.rules.Pass()}
    ref = lrp.explain(Net(Cubed()).double().eval(), _x(), target=0, composite=comp).relevance
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_type_as_passes_relevance():
    class Cast(nn.Module):
        def forward(self, x):
            return F.relu(x).type_as(x)

    ours = _relevance(Cast(), "epsilon")
    ref = _relevance(nn.ReLU(), "epsilon")
    torch.testing.assert_close(ours, ref)


FAMILIES = ["Llama", "Qwen2", "Mistral", "Gemma"]


@pytest.mark.parametrize("family", FAMILIES)
def test_language_models_need_no_registration_for_their_rmsnorm(family):
    # the hand-written RMSNorm of these families held fixed gives exactly the identity rule that registering
    # lrp.rules.Pass() for the RMSNorm class gives (the way that agrees with LXT)
    transformers = pytest.importorskip("transformers")
    config = getattr(transformers, f"{family}Config")(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = LastToken(getattr(transformers, f"{family}ForCausalLM")(config)).double().eval()
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    res = lrp.explain(model, ids, composite="epsilon")
    norm = type(model.lm.model.norm)
    comp = lrp.composite("epsilon")
    comp.module_rules = {norm: lrp.rules.Pass()}
    ref = lrp.explain(model, ids, composite=comp)
    assert res.relevance.shape == (2, 10) and torch.isfinite(res.relevance).all()
    # these RMSNorms compute in float32 also in a float64 model, and the gradient through their casts is
    # rounded to float32 (Pass() skips them): agreement to float32's precision
    scale = ref.relevance.abs().max().item()
    torch.testing.assert_close(res.relevance, ref.relevance, rtol=1e-4, atol=1e-6 * scale)


class Expression(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


NOT_NORMALISATIONS = {
    # a statistic that scales the signal up: x * mean(x**2) is cubic in x, x * |x| quadratic
    "x * mean(x**2)": lambda x: x * x.pow(2).mean(-1, keepdim=True),
    "x * norm(x)": lambda x: x * x.norm(dim=-1, keepdim=True),
    "x / rsqrt(var)": lambda x: x / torch.rsqrt(x.var(-1, keepdim=True) + 1e-5),
    # a constant over a reduced signal, then added or alone
    "x + 1 / sum(x)": lambda x: x + torch.ones_like(x) / F.relu(x).sum(-1, keepdim=True),
    "1 / sum(x) alone": lambda x: torch.ones_like(x) / (F.relu(x).sum(-1, keepdim=True) + 1.0),
    # a "mean" over a dimension of size 1 reduces nothing: this is x / x
    "x / mean over size 1": lambda x: x / (x[..., :1].mean(-1, keepdim=True) + 10.0),
    # division with rounding: piecewise constant
    "floor division": lambda x: torch.div(x, 2.0, rounding_mode="floor"),
}


@pytest.mark.parametrize("name", list(NOT_NORMALISATIONS))
def test_what_only_looks_like_a_normalisation_is_an_error(name):
    with pytest.raises(lrp.UnsupportedOperationError):
        lrp.explain(Net(Expression(NOT_NORMALISATIONS[name])).double().eval(), _x(), target=0)


def test_a_ratio_of_statistics_may_scale_the_signal():
    # ConvNeXt-V2's GlobalResponseNorm: x * (g / mean(g)), g = ||x||: a dimensionless gain, held fixed
    def grn(x, fixed=False):
        g = x.norm(dim=-1, keepdim=True)
        gain = g / (g.mean(0, keepdim=True) + 1e-6)
        return x + x * (gain.detach() if fixed else gain)

    ours = _relevance(Expression(grn), "epsilon")
    ref = _relevance(Expression(lambda x: grn(x, fixed=True)), "epsilon")
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


class GatesAnotherSignal(nn.Module):
    """A power of one signal multiplied into another: no elementwise activation of either."""

    def __init__(self, how: str):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.how = nn.Linear(D, D), nn.Linear(D, D), how

    def forward(self, h):
        v = self.b(h)
        if self.how == "square":
            return h.square() * v
        if self.how == "sum-then-tanh":
            return torch.tanh(h + 0.0 * h.pow(3)) * v
        if self.how == "through a layer":  # RWKV's channel mix: sigmoid(r(x)) * value(relu(key(x))**2)
            return torch.sigmoid(v) * self.a(F.relu(h) ** 2)
        return h * (h.pow(2) @ torch.full((D, D), 1.0 / D, dtype=h.dtype))  # a mean written as a matmul


@pytest.mark.parametrize("how", ["square", "sum-then-tanh", "through a layer", "matmul mean"])
def test_a_power_gates_only_the_signal_it_was_computed_from(how):
    with pytest.raises(lrp.UnsupportedOperationError, match="gate of the signal it was computed from"):
        lrp.explain(Net(GatesAnotherSignal(how)).double().eval(), _x(), target=0)
