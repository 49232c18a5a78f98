"""The same function, written in different ways, gets the same relevance (issue 12).

A heatmap must depend on the function a model computes and on the layers the rules see, not on how the forward
happens to spell it. Three defects broke this silently:

1. sign tracking: ``relu(h) + p`` was taken as non-negative after looking only at the operands that need
   gradients, so a negative (frozen) parameter or buffer let z+, alpha-beta and gamma take their non-negative
   fast path on a signed input; ``relu(h) - (-p)`` took the general path and gave another heatmap;
2. BatchNorm merging: a layer output that also fed an identity-rule op (tanh, GELU, ...), max-as-average pooling,
   a module rule or the model output still had its BatchNorm merged into the layer;
3. the per-call cache of weight-derived tensors was keyed without the op, so one weight used at two dilations
   (strides, paddings) under flat, w^2 or z^B got the other call's tensor.

Each has a regression test below; ``test_equivalent_forms_give_the_same_relevance`` then checks pairs of
equivalent models under every named composite (and the ``maxpool`` / ``attention`` options where they apply).
Only pairs whose rules must see exactly the same layers with the same weights and inputs are included; each
comment says why the pair must be equal. Pairs that legitimately differ are left out, e.g.:

* a BatchNorm merged into the layer before it vs the same affine map written by hand with ``mul``/``add``: the
  merged layer's rule (z+, gamma, ...) sees ``s W``, ``s b + t``, while a hand-written affine map is a separate
  linear map (LRP-0) after the layer. What must be equal instead (and is tested): conv + BatchNorm vs one conv
  with the folded weights and bias, and an unmerged BatchNorm (one not right after a layer, or one whose layer
  output is used elsewhere too) vs its affine map written by hand;
* ``x @ W.T + b`` vs ``F.linear``: a matmul with one input-dependent operand is a linear map (LRP-0), not a layer;
* ``amax`` vs (adaptive) max pooling under ``maxpool="average"``: only pooling ops are redistributed as averages.

Everything runs in float64 with fixed seeds; results are compared with ``rtol=1e-9``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lrp
from lrp.composites import COMPOSITES
from lrp.engine.capture import Trace
from lrp.engine.propagate import Propagation

C = 6  # channels of the small convolution nets below
BOUNDS = dict(low=-4.0, high=4.0)  # for z^B; the inputs are clamped to [-3, 3]


def _image(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64).clamp(-3, 3)


def _randomize_batchnorm(bn: nn.modules.batchnorm._BatchNorm, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(bn.num_features, generator=g))
        bn.bias.copy_(torch.randn(bn.num_features, generator=g))


def _bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)`` with ``bn(x) = s x + t`` in eval mode."""
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return s.detach(), (bn.bias - bn.running_mean * s).detach()


class Tanh(nn.Module):
    """An elementwise module given the ``Pass`` module rule (opaque: its inner ops are not inspected)."""

    def forward(self, x):
        return torch.tanh(x)


class PiecewiseLinear(nn.Module):
    """A module given the ``Gradient`` module rule (its inner ops run unchecked)."""

    def forward(self, x):
        return F.relu(x) - 0.5 * F.relu(-x)


MODULE_RULES = {Tanh: lrp.rules.Pass(), PiecewiseLinear: lrp.rules.Gradient()}


class Net(nn.Module):
    """``x -> conv1 -> mid -> conv2 -> relu -> 2x2 average pool -> fc``; ``mid(net, z)`` gets conv1's output.

    Every net is built with the same seed and the same parameters and buffers (whether its ``mid`` uses them
    or not), so two nets that differ only in ``mid`` have equal weights.
    """

    def __init__(self, mid, seed: int = 0, functional_conv2: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, C, 3, padding=1)
        self.conv2 = nn.Conv2d(C, C, 3, padding=1)
        self.fc = nn.Linear(C * 4, 5)
        p = torch.randn(C, 1, 1)
        p[0], p[1] = -1.0, 1.0  # both signs, for sure
        self.p = nn.Parameter(p)
        self.bn = nn.BatchNorm2d(C)
        _randomize_batchnorm(self.bn, seed + 1)
        self.register_buffer("neg", -torch.rand(1, 2, 8, 8) - 0.1)  # a negative buffer
        self.register_buffer("mask", torch.rand(1, C, 8, 8) > 0.4)
        self.relu = nn.ReLU(inplace=True)
        self.flatten = nn.Flatten()
        self.maxpool = nn.MaxPool2d(2)
        self.tanh_module = Tanh()
        self.piecewise = PiecewiseLinear()
        self.mid = mid  # a plain function, not a module
        self.functional_conv2 = functional_conv2

    @property
    def bn_scale(self):  # bn(h) = bn_scale * h + bn_shift, in the net's dtype
        return _bn_affine(self.bn)[0].reshape(C, 1, 1)

    @property
    def bn_shift(self):
        return _bn_affine(self.bn)[1].reshape(C, 1, 1)

    def forward(self, x):
        h = self.mid(self, self.conv1(x))
        if self.functional_conv2:
            h = F.conv2d(h, self.conv2.weight, self.conv2.bias, padding=1)
        else:
            h = self.conv2(h)
        h = F.adaptive_avg_pool2d(F.relu(h), 2)
        return self.fc(h.flatten(1))


# --------------------------------------------------------------------------- composites


def _composites(maxpool: tuple = ("max",), attention: tuple = ("attnlrp",)) -> list:
    """``(id, factory)`` for every named composite (with z^B bounds where it needs them or can use them: the
    layered composite has z^B with bounds and w^2 without), for each ``maxpool`` and ``attention`` option."""
    found, seen = [], set()
    for name in COMPOSITES:
        for params in ({}, BOUNDS):
            try:
                comp = lrp.composite(name, **params)
            except ValueError:  # needs bounds
                continue
            if repr(comp) in seen:  # the bounds change nothing for this composite
                continue
            seen.add(repr(comp))
            for pool in maxpool:
                for attn in attention:
                    label = (name + ("-bounds" if params else "") + (f"-maxpool={pool}" if pool != "max" else "")
                             + (f"-attention={attn}" if attn != "attnlrp" else ""))
                    found.append((label, lambda name=name, params=params, pool=pool, attn=attn: lrp.composite(
                        name, maxpool=pool, attention=attn, **params)))
    return found


def test_every_named_composite_is_covered():
    labels = [label for label, _ in _composites()]
    assert {label.split("-bounds")[0] for label in labels} == set(COMPOSITES)
    assert "epsilon-gamma-box-bounds" in labels and "layered" in labels and "layered-bounds" in labels


def _explain(model, x, comp, target=None):
    comp.module_rules = dict(MODULE_RULES)
    return lrp.explain(model, x, target=target, composite=comp)


def _assert_same_relevance(models: list, x: torch.Tensor, make) -> None:
    ref = _explain(models[0], x, make())
    assert torch.isfinite(ref.relevance).all()
    scale = ref.relevance.abs().max().item()
    assert scale > 0
    for i, model in enumerate(models[1:], 1):
        res = _explain(model, x, make(), target=ref.target)
        # the variants compute the same function (a test set-up check)
        torch.testing.assert_close(res.output, ref.output, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(res.relevance, ref.relevance, rtol=1e-9, atol=1e-12 * scale,
                                   msg=lambda m: f"variant {i} differs from variant 0: {m}")


# --------------------------------------------------------------------------- 1. sign tracking


def _conv2_input_known_nonnegative(mid, comp=None) -> bool:
    """Whether the capture marks the input of ``conv2`` (``mid``'s output) as known to be >= 0."""
    model = Net(mid).double().eval()
    for p in model.parameters():
        p.requires_grad_(False)  # as during explain
    leaf = _image().requires_grad_(True)
    trace = Trace(model, comp or lrp.composite("epsilon-plus"), leaf)
    try:
        with torch.enable_grad(), trace.capture():
            model(leaf)
        (layer,) = [layer for layer in trace.layers if layer.name == "conv2"]
        return layer.nonnegative_input
    finally:
        trace.release()


def _r(m, z):
    return F.relu(z)


SIGNS = {
    # (mid, is conv2's input non-negative?)
    "relu": (lambda m, z: F.relu(z), True),
    "conv output": (lambda m, z: z, False),
    "relu + negative parameter": (lambda m, z: _r(m, z) + m.p, False),
    "negative parameter + relu": (lambda m, z: m.p + _r(m, z), False),
    "relu += negative parameter": (lambda m, z: _r(m, z).__iadd__(m.p), False),
    "relu + non-negative parameter": (lambda m, z: _r(m, z) + m.p.abs(), True),
    "add, alpha=-1": (lambda m, z: torch.add(_r(m, z), m.p.abs(), alpha=-1), False),
    "add, negative scalar": (lambda m, z: _r(m, z) + (-0.5), False),
    "add, negative scalar first": (lambda m, z: -0.5 + _r(m, z), False),
    "relu - non-positive constant": (lambda m, z: _r(m, z) - (-m.p.abs()), True),
    "relu - non-negative constant": (lambda m, z: _r(m, z) - m.p.abs(), False),
    "relu - relu": (lambda m, z: _r(m, z) - _r(m, -z), False),
    "sub, alpha=-1": (lambda m, z: torch.sub(_r(m, z), m.p.abs(), alpha=-1), True),
    "cat with a negative buffer": (
        lambda m, z: torch.cat([_r(m, z)[:, :4], m.neg.expand(len(z), -1, -1, -1)], 1), False),
    "cat with a non-negative buffer": (
        lambda m, z: torch.cat([_r(m, z)[:, :4], m.neg.abs().expand(len(z), -1, -1, -1)], 1), True),
    "stack with a negative constant": (
        lambda m, z: torch.stack([_r(m, z), m.neg[:, :1].expand_as(z)]).sum(0), False),
    "cat, dim=-3": (lambda m, z: torch.cat([_r(m, z)[:, :3], _r(m, z)[:, 3:]], -3), True),
    "where, negative other": (lambda m, z: torch.where(m.mask, _r(m, z), -1.0), False),
    "where, zero other": (lambda m, z: torch.where(m.mask, _r(m, z), 0.0), True),
    "where, negative tensor": (lambda m, z: torch.where(m.mask, _r(m, z), m.p), False),
    "masked_fill, negative": (lambda m, z: _r(m, z).masked_fill(~m.mask, -1.0), False),
    "masked_fill, zero": (lambda m, z: _r(m, z).masked_fill(~m.mask, 0.0), True),
    "index_fill, negative": (lambda m, z: _r(m, z).index_fill(1, torch.tensor([0, 2]), -1.0), False),
    "pad, negative value": (lambda m, z: F.pad(_r(m, z), (1, 1, 1, 1), value=-1.0), False),
    "pad, zero": (lambda m, z: F.pad(_r(m, z), (1, 1, 1, 1)), True),
    "pad, cropping": (lambda m, z: F.pad(_r(m, z), (-1, -1, -1, -1)), True),
    "pad, replicate": (lambda m, z: F.pad(_r(m, z), (1, 1, 1, 1), mode="replicate"), True),
    "mean": (lambda m, z: _r(m, z).mean(1, keepdim=True).expand_as(z), True),
    "mean of a shifted relu": (lambda m, z: (_r(m, z) + m.p).mean(1, keepdim=True).expand_as(z), False),
    "max pool": (lambda m, z: F.max_pool2d(_r(m, z), 3, 1, 1), True),
    "max pool of a shifted relu": (lambda m, z: F.max_pool2d(_r(m, z) + m.p, 3, 1, 1), False),
    "avg pool": (lambda m, z: F.avg_pool2d(_r(m, z), 3, 1, 1), True),
    "avg pool, negative divisor": (lambda m, z: F.avg_pool2d(_r(m, z), 3, 1, 1, divisor_override=-9), False),
    "interpolate, bilinear": (
        lambda m, z: F.interpolate(_r(m, z)[..., ::2, ::2], scale_factor=2, mode="bilinear"), True),
    "interpolate, bicubic (overshoots)": (
        lambda m, z: F.interpolate(_r(m, z)[..., ::2, ::2], scale_factor=2, mode="bicubic"), False),
    "view(n, -1)": (lambda m, z: _r(m, z).view(len(z), -1).view_as(z), True),
    "times a positive scalar": (lambda m, z: _r(m, z) * 2, True),
    "times a negative scalar": (lambda m, z: _r(m, z) * -2, False),
    "times a signed parameter": (lambda m, z: _r(m, z) * m.p, False),
    "divided by a positive scalar": (lambda m, z: _r(m, z) / 4, True),
    "divided by a negative scalar": (lambda m, z: _r(m, z) / -4, False),
    "relu + relu": (lambda m, z: _r(m, z) + _r(m, -z), True),
    "relu, then written into in place": (lambda m, z: _setitem(_r(m, z), -1.0), False),
}


def _setitem(t, value):
    t[:, 0] = value
    return t


@pytest.mark.parametrize("case", list(SIGNS))
def test_sign_tracking_looks_at_every_operand(case):
    mid, expected = SIGNS[case]
    assert _conv2_input_known_nonnegative(mid) is expected


def test_max_pool_as_average_keeps_the_sign():
    comp = lrp.composite("epsilon-plus", maxpool="average")
    assert _conv2_input_known_nonnegative(lambda m, z: F.max_pool2d(F.relu(z), 3, 1, 1), comp)
    assert not _conv2_input_known_nonnegative(lambda m, z: F.max_pool2d(F.relu(z) + m.p, 3, 1, 1), comp)


@pytest.mark.parametrize("composite", ["epsilon-plus", "epsilon-alpha2-beta1", "epsilon-gamma-box"])
def test_a_frozen_negative_operand_does_not_give_the_nonnegative_fast_path(composite):
    # z+, alpha-beta and gamma must see conv2's signed input; before the fix the first form took the fast path
    forms = [lambda m, z: F.relu(z) + m.p, lambda m, z: F.relu(z) - (-m.p),
             lambda m, z: torch.cat([F.relu(z)[:, :4], m.neg.expand(len(z), -1, -1, -1)], 1),
             lambda m, z: F.pad(F.relu(z)[:, :4], (0, 0, 0, 0, 0, 2)) + F.pad(m.neg, (0, 0, 0, 0, 4, 0))]
    models = [Net(form).double().eval() for form in forms]
    params = BOUNDS if composite == "epsilon-gamma-box" else {}
    _assert_same_relevance(models[:2], _image(), lambda: lrp.composite(composite, **params))
    _assert_same_relevance(models[2:], _image(), lambda: lrp.composite(composite, **params))


# --------------------------------------------------------------------------- 2. BatchNorm merging


def _conv1_merged(mid, output=None, comp=None) -> bool:
    """Whether the BatchNorm ``mid`` applies to conv1's output is merged into conv1."""
    model = Net(mid).double().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    leaf = _image().requires_grad_(True)
    comp = comp or lrp.composite("epsilon-plus")
    comp.module_rules = dict(MODULE_RULES)
    trace = Trace(model, comp, leaf)
    try:
        with torch.enable_grad(), trace.capture():
            (output or model)(leaf)
        Propagation(trace)
        return trace.layers[0].bn is not None
    finally:
        trace.release()


SECOND_USES = {
    # a second consumer of conv1's output z, besides m.bn(z)
    "tanh (identity rule)": lambda m, z: torch.tanh(z),
    "gelu (identity rule)": lambda m, z: F.gelu(z),
    "sigmoid gate": lambda m, z: z * torch.sigmoid(z),
    "max pool": lambda m, z: F.max_pool2d(z, 3, 1, 1),
    "softmax": lambda m, z: torch.softmax(z, 1),
    "layer norm": lambda m, z: F.layer_norm(z, z.shape[1:]),
    "group norm": lambda m, z: F.group_norm(z, 2),
    "module with a Pass rule": lambda m, z: m.tanh_module(z),
    "module with a Gradient rule": lambda m, z: m.piecewise(z),
    "iteration": lambda m, z: torch.stack(list(z)),
    "setitem": lambda m, z: _setitem(torch.zeros_like(z), z[:, 0]),
    "relu": lambda m, z: F.relu(z),
}


@pytest.mark.parametrize("maxpool", ["max", "average"])
@pytest.mark.parametrize("use", list(SECOND_USES))
def test_batchnorm_is_merged_only_when_the_layer_output_feeds_nothing_else(use, maxpool):
    second = SECOND_USES[use]
    comp = lrp.composite("epsilon-plus", maxpool=maxpool)
    assert not _conv1_merged(lambda m, z: F.relu(m.bn(z) + second(m, z)), comp=comp)
    # the BatchNorm is z's only use that relevance can flow through: merged (looking at z's shape, or at its
    # values outside autograd, is no such use)
    assert _conv1_merged(lambda m, z: F.relu(m.bn(z) + second(m, z.detach())).view(z.shape), comp=comp)
    assert _conv1_merged(lambda m, z: F.relu(m.bn(z)).reshape(z.size(0), *z.shape[1:]), comp=comp)


class Out(dict):
    """A model output with ``.logits`` (as Hugging Face models return)."""

    def __getattr__(self, key):
        return self[key]


class ReturnsBoth(nn.Module):
    """Returns the logits and, unused by explain, a BatchNorm of them."""

    def __init__(self, net: Net, extra: bool):
        super().__init__()
        self.net, self.extra = net, extra
        self.bn_out = nn.BatchNorm1d(5)
        _randomize_batchnorm(self.bn_out, 7)

    def forward(self, x):
        z = self.net(x)
        return Out(logits=z, normed=self.bn_out(z)) if self.extra else Out(logits=z)


@pytest.mark.parametrize("composite", ["lrp0", "epsilon-plus"])
def test_the_model_output_is_a_use(composite):
    # explain starts at the logits; a BatchNorm of them that nothing explains must not be merged into fc
    net = Net(lambda m, z: F.relu(z)).double().eval()
    models = [ReturnsBoth(net, False).double().eval(), ReturnsBoth(net, True).double().eval()]
    _assert_same_relevance(models, _image(), lambda: lrp.composite(composite))


@pytest.mark.parametrize("maxpool", ["max", "average"])
@pytest.mark.parametrize("use", list(SECOND_USES))
def test_a_batchnorm_with_a_second_use_acts_as_its_affine_map(use, maxpool):
    # not merged, the BatchNorm is a linear map with bias (LRP-0), exactly as s z + t written by hand
    second = SECOND_USES[use]
    models = [Net(lambda m, z: F.relu(m.bn(z) + second(m, z))).double().eval(),
              Net(lambda m, z: F.relu(z * m.bn_scale + m.bn_shift + second(m, z))).double().eval()]
    _assert_same_relevance(models, _image(), lambda: lrp.composite("epsilon-plus", maxpool=maxpool))


# --------------------------------------------------------------------------- 3. the cache of weight-derived tensors


class OneWeightManyOps(nn.Module):
    """One 3x3 kernel read by four convolutions of the input, with different padding, dilation and stride (all
    give 8x8 maps); ``copies=True``: each convolution has its own copy of the (equal) weights."""

    def __init__(self, copies: bool, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(C, 3, 3, 3) * 0.3)
        self.bias = nn.Parameter(torch.randn(C) * 0.1)
        self.copies = nn.ParameterList(
            [nn.Parameter(self.weight.detach().clone()) for _ in range(4)] if copies else [])
        self.conv2 = nn.Conv2d(C, C, 3, padding=1)
        self.fc = nn.Linear(C * 4, 5)

    def forward(self, x):
        w = list(self.copies) if len(self.copies) else [self.weight] * 4
        h = (F.conv2d(x, w[0], self.bias, padding=1)
             + F.conv2d(x, w[1], self.bias, padding=2, dilation=2)
             + F.interpolate(F.conv2d(x, w[2], self.bias, stride=2, padding=1), scale_factor=2)
             + F.pad(F.conv2d(x, w[3], self.bias), (1, 1, 1, 1)))
        h = F.adaptive_avg_pool2d(F.relu(self.conv2(F.relu(h))), 2)
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("composite, params", [("epsilon-plus-flat", {}), ("layered", {}),
                                               ("layered", BOUNDS), ("epsilon-gamma-box", BOUNDS)])
def test_one_weight_at_several_dilations_strides_and_paddings(composite, params):
    # flat, w^2 and z^B build tensors from the weight *and the op* (how many inputs a unit sees, sum of w^2
    # over them, the box offset): a weight shared by several ops must not share them
    models = [OneWeightManyOps(copies=True).double().eval(), OneWeightManyOps(copies=False).double().eval()]
    res = _explain(models[0], _image(), lrp.composite(composite, **params))
    assert res.rules["conv2d"].split("(")[0] in ("Flat", "WSquare", "ZBox")
    _assert_same_relevance(models, _image(), lambda: lrp.composite(composite, **params))


def test_a_module_called_twice_still_builds_its_modified_weights_once(monkeypatch):
    # the finer key must not lose the sharing it is for: conv2 runs three times with the same op, rule and
    # input shape, so W+ is built once for it (and once for conv1)
    tables = []
    table = Propagation._table

    def recording(self, layer):
        found = table(self, layer)
        if all(found is not t for t in tables):
            tables.append(found)
        return found

    monkeypatch.setattr(Propagation, "_table", recording)
    res = lrp.explain(Net(_shared_conv2).double().eval(), _image(), composite="epsilon-plus")
    assert list(res.rules) == ["conv1", "conv2", "conv2#1", "conv2#2", "fc"]
    assert sum("W+" in str(key) for t in tables for key in t) == 2


# --------------------------------------------------------------------------- 4. equivalent forms, every composite


def _nets(*mids, **kwargs):
    return lambda: [Net(mid, **kwargs).double().eval() for mid in mids]


def _relu_inplace_module(m, z):
    return m.relu(z)


def _relu_functional_inplace(m, z):
    return F.relu(z, inplace=True)


def _relu_method_inplace(m, z):
    return z.relu_()


def _torch_relu_inplace(m, z):
    return torch.relu_(z)


def _shift_iadd(m, z):
    h = F.relu(z)
    h += m.p
    return h


def _cat_with_negative_buffer(m, z):
    return torch.cat([F.relu(z)[:, :4], m.neg.expand(len(z), -1, -1, -1)], 1)


def _pad_add_with_negative_buffer(m, z):
    return F.pad(F.relu(z)[:, :4], (0, 0, 0, 0, 0, 2)) + F.pad(m.neg, (0, 0, 0, 0, 4, 0))


def _pad_by_cat(m, z, value):
    """``F.pad(relu(z), (1, 1, 1, 1), value=value)`` built by concatenating zeros, plus a border constant."""
    h = F.relu(z)
    n, c, hh, ww = h.shape
    zeros_row = torch.zeros(n, c, 1, ww, dtype=h.dtype)
    h = torch.cat([zeros_row, h, zeros_row], 2)
    zeros_col = torch.zeros(n, c, hh + 2, 1, dtype=h.dtype)
    h = torch.cat([zeros_col, h, zeros_col], 3)
    border = F.pad(torch.zeros(1, c, hh, ww, dtype=h.dtype), (1, 1, 1, 1), value=value)
    return h + border


def _halves(m, z):
    r = F.relu(z)
    a, b = r.chunk(2, 1)
    return torch.cat([b, a], 1)


def _shared_conv2(m, z):
    # conv2 twice (weight sharing; the second call is conv2#1), then Net's own conv2 a third time
    return F.relu(m.conv2(F.relu(m.conv2(F.relu(z)))))


def _copied_conv2(m, z):
    return F.relu(m.copy_b(F.relu(m.copy_a(F.relu(z)))))


def _with_copies(net: Net) -> Net:
    # two more modules with conv2's weights: the same function as _shared_conv2 with copied weights
    net.copy_a = nn.Conv2d(C, C, 3, padding=1).double()
    net.copy_b = nn.Conv2d(C, C, 3, padding=1).double()
    for copy in (net.copy_a, net.copy_b):
        copy.load_state_dict(net.conv2.state_dict())
    return net


def _shared_vs_copied():
    return [Net(_shared_conv2).double().eval(), _with_copies(Net(_copied_conv2).double().eval())]


class FirstShared(nn.Module):
    """A 3->3 conv that reads the input and is applied again later (shared), or its copy (copied)."""

    def __init__(self, copied: bool, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv0 = nn.Conv2d(3, 3, 3, padding=1)
        self.conv0_copy = nn.Conv2d(3, 3, 3, padding=1)
        self.conv0_copy.load_state_dict(self.conv0.state_dict())
        self.copied = copied
        self.fc = nn.Linear(3 * 4, 5)

    def forward(self, x):
        h = F.relu(self.conv0(x))
        h = F.relu((self.conv0_copy if self.copied else self.conv0)(h))
        return self.fc(F.adaptive_avg_pool2d(h, 2).flatten(1))


class BatchNormNet(nn.Module):
    """conv1 -> BN -> relu -> conv2 (no bias) -> BN -> relu -> pool -> fc -> BN1d, or (``folded``) the same
    network with each BatchNorm folded into the layer before it: ``W' = s W``, ``b' = s b + t``."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, C, 3, padding=1)
        self.conv2 = nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.fc = nn.Linear(C * 4, 5)
        self.bns = nn.ModuleList([nn.BatchNorm2d(C), nn.BatchNorm2d(C), nn.BatchNorm1d(5)])
        for i, bn in enumerate(self.bns):
            _randomize_batchnorm(bn, seed + 10 + i)
        self.folded = False

    def fold(self) -> "BatchNormNet":
        """Fold each BatchNorm into its layer (call after ``.double()``, so that ``s`` and ``t`` are exact)."""
        with torch.no_grad():
            for layer, bn in zip((self.conv1, self.conv2, self.fc), self.bns):
                s, t = _bn_affine(bn)
                bias = t if layer.bias is None else layer.bias * s + t
                layer.weight.mul_(s.reshape((-1,) + (1,) * (layer.weight.ndim - 1)))
                layer.bias = nn.Parameter(bias.clone())
        self.folded = True
        return self

    def forward(self, x):
        norm = (lambda i, h: h) if self.folded else (lambda i, h: self.bns[i](h))
        h = F.relu(norm(0, self.conv1(x)))
        h = F.relu(norm(1, self.conv2(h)))
        h = F.adaptive_avg_pool2d(h, 2).flatten(1)
        return norm(2, self.fc(h))


class GlobalPoolNet(nn.Module):
    """conv1 -> relu -> conv2 -> relu -> ``pool(net, h)`` (to (n, C)) -> fc."""

    def __init__(self, pool, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, C, 3, padding=1)
        self.conv2 = nn.Conv2d(C, C, 3, padding=1)
        self.fc = nn.Linear(C, 5)
        self.adaptive_max = nn.AdaptiveMaxPool2d(1)
        self.flatten = nn.Flatten()
        self.pool = pool

    def forward(self, x):
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(self.pool(self, h))


class Attention(nn.Module):
    """Self-attention over tokens ``(n, T, E)``: ``nn.MultiheadAttention``, or the same weights through
    ``F.scaled_dot_product_attention``, or the same written out; then relu, mean over tokens, fc."""

    E, HEADS = 8, 2

    def __init__(self, kind: str, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.mha = nn.MultiheadAttention(self.E, self.HEADS, batch_first=True)
        with torch.no_grad():
            self.mha.in_proj_bias.normal_(0, 0.1)
            self.mha.out_proj.bias.normal_(0, 0.1)
        self.fc = nn.Linear(self.E, 3)
        self.kind = kind

    def forward(self, x):
        if self.kind == "mha":
            a = self.mha(x, x, x, need_weights=False)[0]
        else:
            n, t, e = x.shape
            d = e // self.HEADS
            w_q, w_k, w_v = self.mha.in_proj_weight.chunk(3)
            b_q, b_k, b_v = self.mha.in_proj_bias.chunk(3)
            q, k, v = (F.linear(x, w, b).view(n, t, self.HEADS, d).transpose(1, 2)
                       for w, b in ((w_q, b_q), (w_k, b_k), (w_v, b_v)))
            if self.kind == "sdpa":
                o = F.scaled_dot_product_attention(q, k, v)
            else:
                scores = torch.matmul(q * (1.0 / math.sqrt(d)), k.transpose(-2, -1))
                o = torch.matmul(torch.softmax(scores, dim=-1), v)
            o = o.transpose(1, 2).reshape(n, t, e)
            a = F.linear(o, self.mha.out_proj.weight, self.mha.out_proj.bias)
        return self.fc(F.relu(a).mean(1))


def _tokens(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, Attention.E, generator=g, dtype=torch.float64).clamp(-3, 3)


# name -> (models factory, input, maxpool options, attention options). Why each group must be equal:
PAIRS = {
    # a shift by a (signed) constant written as +p, -(-p), +=, torch.add/sub with alpha: the same add, whose
    # rule is the gradient; conv2 sees the same signed input (defect 1 made the first forms non-negative)
    "shift": (_nets(lambda m, z: F.relu(z) + m.p, lambda m, z: F.relu(z) - (-m.p), _shift_iadd,
                    lambda m, z: m.p + F.relu(z), lambda m, z: torch.add(F.relu(z), -m.p, alpha=-1),
                    lambda m, z: torch.sub(F.relu(z), m.p, alpha=-1)), _image, ("max",), ("attnlrp",)),
    # the same with a non-negative shift: conv2's input is >= 0 in all forms
    "positive shift": (_nets(lambda m, z: F.relu(z) + m.p.abs(), lambda m, z: F.relu(z) - (-m.p.abs()),
                             lambda m, z: torch.add(F.relu(z), m.p.abs())), _image, ("max",), ("attnlrp",)),
    # conv + BatchNorm is merged (canonisation): the layers' rules see s W, s b + t, which is exactly the conv
    # with the folded weights and bias, also for the input layer (flat, w^2, z^B) and a Linear + BatchNorm1d
    "batchnorm folded": (lambda: [BatchNormNet().double().eval(), BatchNormNet().double().eval().fold()],
                         _image, ("max",), ("attnlrp",)),
    # a BatchNorm that follows no layer is a linear map with bias (LRP-0 = gradient), as is s h + t by hand
    "batchnorm alone": (_nets(lambda m, z: m.bn(F.relu(z)), lambda m, z: F.relu(z) * m.bn_scale + m.bn_shift,
                              lambda m, z: F.batch_norm(F.relu(z), m.bn.running_mean, m.bn.running_var,
                                                        m.bn.weight, m.bn.bias, False, 0.0, m.bn.eps)),
                        _image, ("max",), ("attnlrp",)),
    # a BatchNorm of a layer output that also feeds a max-pooling (or tanh) is not merged: an affine map
    # (defect 2 merged it where the other use was max-as-average pooling or an identity-rule op)
    "batchnorm with a second use": (_nets(
        lambda m, z: F.relu(m.bn(z) + F.max_pool2d(z, 3, 1, 1) + torch.tanh(z)),
        lambda m, z: F.relu(z * m.bn_scale + m.bn_shift + F.max_pool2d(z, 3, 1, 1) + torch.tanh(z))),
        _image, ("max", "average"), ("attnlrp",)),
    # a module called twice vs two copies with equal weights: the same layers in the same positions with the
    # same weights and inputs; only their names differ, and no named composite chooses rules by name
    "shared vs copied weights": (_shared_vs_copied, _image, ("max",), ("attnlrp",)),
    "shared vs copied input layer": (lambda: [FirstShared(False).double().eval(), FirstShared(True).double().eval()],
                                     _image, ("max",), ("attnlrp",)),
    # one weight used by convolutions with other dilation / stride / padding vs a copy per convolution
    # (defect 3 gave them one cached flat count, w^2 sum or z^B offset)
    "one weight, several ops vs copies": (
        lambda: [OneWeightManyOps(copies=False).double().eval(), OneWeightManyOps(copies=True).double().eval()],
        _image, ("max",), ("attnlrp",)),
    # torch.cat vs zero padding plus add: both move each value to the same place (gradient); also with a
    # negative constant block (defect 1 made the cat non-negative)
    "cat vs pad + add": (_nets(lambda m, z: torch.cat([F.relu(z)[:, :3], F.relu(-z)[:, 3:]], 1),
                               lambda m, z: F.pad(F.relu(z)[:, :3], (0, 0, 0, 0, 0, 3))
                               + F.pad(F.relu(-z)[:, 3:], (0, 0, 0, 0, 3, 0))), _image, ("max",), ("attnlrp",)),
    "cat vs pad + add, negative constant": (_nets(_cat_with_negative_buffer, _pad_add_with_negative_buffer),
                                            _image, ("max",), ("attnlrp",)),
    # F.pad with a value vs concatenated zeros plus a border constant: the same values at the same places
    "pad value vs cat + border": (_nets(lambda m, z: F.pad(F.relu(z), (1, 1, 1, 1), value=-0.5),
                                       lambda m, z: _pad_by_cat(m, z, -0.5),
                                       lambda m, z: F.pad(F.relu(z), (1, 1, 1, 1)) + F.pad(
                                           torch.zeros_like(z[:1]), (1, 1, 1, 1), value=-0.5)),
                                  _image, ("max",), ("attnlrp",)),
    # pure reshapes (view, reshape, flatten/unflatten, nn.Flatten) move no value
    "view vs reshape vs flatten": (_nets(
        lambda m, z: F.relu(z),
        lambda m, z: F.relu(z).view(len(z), -1).view(z.shape),
        lambda m, z: F.relu(z).reshape(len(z), -1).reshape(z.shape),
        lambda m, z: torch.flatten(F.relu(z), 1).unflatten(1, z.shape[1:]),
        lambda m, z: m.flatten(F.relu(z)).view_as(z),
        lambda m, z: F.relu(z).flatten().reshape(z.shape)), _image, ("max",), ("attnlrp",)),
    # an in-place ReLU is run out of place: the same op
    "inplace relu": (_nets(lambda m, z: F.relu(z), _relu_inplace_module, _relu_functional_inplace,
                           _relu_method_inplace, _torch_relu_inplace, lambda m, z: torch.relu(z)),
                     _image, ("max",), ("attnlrp",)),
    # 2 h as a product with a constant or as a sum of two equal terms: gradient 2 g either way
    "x * 2 vs x + x": (_nets(lambda m, z: F.relu(z) * 2, lambda m, z: F.relu(z) + F.relu(z),
                             lambda m, z: 2 * F.relu(z), lambda m, z: torch.add(F.relu(z), F.relu(z)),
                             lambda m, z: F.relu(z).mul(2.0), lambda m, z: (lambda r: r + r)(F.relu(z))),
                       _image, ("max",), ("attnlrp",)),
    # stack + sum vs add: relevance moves to the same terms
    "stack + sum vs add": (_nets(lambda m, z: torch.stack([F.relu(z), 0.5 * F.relu(-z)]).sum(0),
                                 lambda m, z: F.relu(z) + 0.5 * F.relu(-z)), _image, ("max",), ("attnlrp",)),
    # chunk, split, slicing, roll and index_select all swap the two channel halves
    "chunk vs slices vs roll": (_nets(
        _halves, lambda m, z: torch.cat([F.relu(z)[:, 3:], F.relu(z)[:, :3]], 1),
        lambda m, z: torch.cat(torch.split(F.relu(z), 3, 1)[::-1], 1),
        lambda m, z: F.relu(z).roll(3, 1),
        lambda m, z: torch.index_select(F.relu(z), 1, torch.tensor([3, 4, 5, 0, 1, 2]))),
        _image, ("max",), ("attnlrp",)),
    # masking by where / masked_fill / a 0-1 factor: the gradient passes where the mask is set
    "masking": (_nets(lambda m, z: torch.where(m.mask, F.relu(z), 0.0),
                      lambda m, z: F.relu(z).masked_fill(~m.mask, 0.0),
                      lambda m, z: F.relu(z) * m.mask.double()), _image, ("max",), ("attnlrp",)),
    "masking with a negative fill": (_nets(
        lambda m, z: torch.where(m.mask, F.relu(z), -0.5),
        lambda m, z: F.relu(z).masked_fill(~m.mask, -0.5),
        lambda m, z: F.relu(z) * m.mask.double() + (~m.mask).double() * -0.5), _image, ("max",), ("attnlrp",)),
    # max pooling by module, function, keyword or with indices: the same pooling, also as an average
    "max pooling": (_nets(lambda m, z: F.interpolate(m.maxpool(F.relu(z)), scale_factor=2),
                          lambda m, z: F.interpolate(F.max_pool2d(F.relu(z), 2), scale_factor=2),
                          lambda m, z: F.interpolate(F.max_pool2d(F.relu(z), kernel_size=2, stride=2), scale_factor=2),
                          lambda m, z: F.interpolate(F.max_pool2d(F.relu(z), 2, return_indices=True)[0],
                                                     scale_factor=2)),
                    _image, ("max", "average"), ("attnlrp",)),
    # an affine map written with addcmul (timm's Affine) or with + and *: the same linear map
    "addcmul": (_nets(lambda m, z: F.relu(torch.addcmul(0.1 * m.p, m.p, z)),
                      lambda m, z: F.relu(0.1 * m.p + m.p * z)), _image, ("max",), ("attnlrp",)),
    # conv2 as a module or as F.conv2d with its weights: the same layer (named composites choose rules by the
    # op kind and position, not by module type or name)
    "module vs functional conv": (lambda: [Net(lambda m, z: F.relu(z)).double().eval(),
                                           Net(lambda m, z: F.relu(z), functional_conv2=True).double().eval()],
                                  _image, ("max",), ("attnlrp",)),
    # global average pooling in five spellings: the same linear map
    "global average pooling": (lambda: [GlobalPoolNet(pool).double().eval() for pool in (
        lambda m, h: h.mean((2, 3)), lambda m, h: F.adaptive_avg_pool2d(h, 1).flatten(1),
        lambda m, h: h.sum((2, 3)) / 64, lambda m, h: F.avg_pool2d(h, 8).flatten(1),
        lambda m, h: h.flatten(2).mean(-1))], _image, ("max", "average"), ("attnlrp",)),
    # global max pooling by adaptive pooling (module or function) or a full-size window: the same winner, or
    # with maxpool="average" the same average (amax is not a pooling op and is left out)
    "global max pooling": (lambda: [GlobalPoolNet(pool).double().eval() for pool in (
        lambda m, h: F.adaptive_max_pool2d(h, 1).flatten(1), lambda m, h: m.flatten(m.adaptive_max(h)),
        lambda m, h: F.max_pool2d(h, 8).flatten(1),
        lambda m, h: F.max_pool2d(h, 8, return_indices=True)[0].flatten(1))],
        _image, ("max", "average"), ("attnlrp",)),
    # nn.MultiheadAttention and F.scaled_dot_product_attention are written out in plain ops by lrp, the same
    # ops as the third form: the same layers (q, k, v, out projections) and the same AttnLRP / CP-LRP rules
    "attention": (lambda: [Attention(kind).double().eval() for kind in ("mha", "sdpa", "manual")],
                  _tokens, ("max",), ("attnlrp", "cp")),
}


def _cases():
    for pair, (_, _, maxpool, attention) in PAIRS.items():
        for label, make in _composites(maxpool, attention):
            yield pytest.param(pair, make, id=f"{pair}-{label}")


@pytest.mark.parametrize("pair, make", list(_cases()))
def test_equivalent_forms_give_the_same_relevance(pair, make):
    models, inputs, _, _ = PAIRS[pair]
    _assert_same_relevance(models(), inputs(), make)
