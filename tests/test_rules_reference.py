"""Every layer rule of ``lrp.rules`` against a deliberately naive reference of its formula.

Each reference is a plain-Python double-precision loop over inputs ``i`` and outputs ``j`` of a layer
``z_j = sum_i w_ij a_i + b_j`` (no autograd, nothing from lrp). Convolutions are first unfolded into their
explicit dense ``(out_units x in_units)`` matrix, zero padding included, so one dense formula serves all
layers. The formulas are those of Zennit 0.5.1 (see the docstrings of ``lrp.rules``):

    s(t) = t + eps * sign(t), sign(0) = +1;   w+ = max(w, 0), w- = min(w, 0), a+ / a- / b+ / b- likewise.

The relevance at the output is what ``lrp.explain`` starts from: ``one_hot(target) * z`` for
``start="score"``, ``one_hot(target)`` for ``start="unit"``, or the given tensor.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import lrp
from lrp import rules

BATCH = 2
TOL = dict(rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- the layer as a dense matrix


@dataclass(frozen=True)
class Dense:
    """One layer, one sample: ``z_j = sum_i W[j][i] a_i + b[j]``; ``C[j][i] = 1`` where ``a_i`` feeds ``z_j``."""

    W: list  # out_units x in_units
    b: list  # out_units
    C: list  # out_units x in_units connectivity (0.0 / 1.0)
    channel_of: list  # input unit -> input channel (for per-channel box bounds)
    channels: int


def conv2d_as_dense(weight: list, in_shape: tuple, stride: int, padding: int, dilation: int, groups: int) -> list:
    """The ``(out_units x in_units)`` matrix of ``F.conv2d`` on one sample of shape ``in_shape``.

    ``weight[o][c_local][ky][kx]`` (nested lists). Output unit ``j = (o, oy, ox)`` reads input unit
    ``(c, iy, ix)`` with ``iy = oy*stride - padding + ky*dilation``; taps that land in the zero padding
    read nothing and are dropped. Units are numbered in C order (as ``flatten`` does).
    """
    c_out, c_in_g, kh, kw = len(weight), len(weight[0]), len(weight[0][0]), len(weight[0][0][0])
    c_in, h, w = in_shape
    oh = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    ow = (w + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    c_out_g = c_out // groups
    M = [[0.0] * (c_in * h * w) for _ in range(c_out * oh * ow)]
    for o in range(c_out):
        group = o // c_out_g
        for oy in range(oh):
            for ox in range(ow):
                j = (o * oh + oy) * ow + ox
                for cl in range(c_in_g):
                    c = group * c_in_g + cl
                    for ky in range(kh):
                        for kx in range(kw):
                            iy = oy * stride - padding + ky * dilation
                            ix = ox * stride - padding + kx * dilation
                            if 0 <= iy < h and 0 <= ix < w:
                                M[j][(c * h + iy) * w + ix] += weight[o][cl][ky][kx]
    return M


def dense_of(layer: nn.Module, in_shape: tuple) -> Dense:
    """Unfold ``nn.Linear`` / ``nn.Conv2d`` into a :class:`Dense` (bias repeated over output positions)."""
    if isinstance(layer, nn.Linear):
        W = layer.weight.tolist()
        ones = [[1.0] * layer.in_features for _ in range(layer.out_features)]
        return Dense(W, layer.bias.tolist(), ones, list(range(layer.in_features)), layer.in_features)
    conv = dict(stride=layer.stride[0], padding=layer.padding[0], dilation=layer.dilation[0], groups=layer.groups)
    W = conv2d_as_dense(layer.weight.tolist(), in_shape, **conv)
    C = conv2d_as_dense(torch.ones_like(layer.weight).tolist(), in_shape, **conv)
    per_channel = len(W) // layer.out_channels
    b = [layer.bias[j // per_channel].item() for j in range(len(W))]
    c_in, h, w = in_shape
    return Dense(W, b, C, [i // (h * w) for i in range(c_in * h * w)], c_in)


# --------------------------------------------------------------------------- naive references, one per rule


def s(t: float, eps: float) -> float:
    """Stabilised denominator ``t + eps * sign(t)`` with ``sign(0) = +1``."""
    return t + eps if t >= 0 else t - eps


def pos(t: float) -> float:
    return max(t, 0.0)


def neg(t: float) -> float:
    return min(t, 0.0)


def forward(a: list, L: Dense) -> list:
    """``z_j = sum_i w_ij a_i + b_j``."""
    return [sum(L.W[j][i] * a[i] for i in range(len(a))) + L.b[j] for j in range(len(L.W))]


def lrp_0(a: list, R: list, L: Dense) -> list:
    """``R_i = sum_j a_i w_ij R_j / z_j``."""
    z = forward(a, L)
    return [sum(a[i] * L.W[j][i] * R[j] / z[j] for j in range(len(R))) for i in range(len(a))]


def lrp_epsilon(a: list, R: list, L: Dense, eps: float) -> list:
    """``R_i = sum_j a_i w_ij R_j / s(z_j)``."""
    z = forward(a, L)
    return [sum(a[i] * L.W[j][i] * R[j] / s(z[j], eps) for j in range(len(R))) for i in range(len(a))]


def lrp_zplus(a: list, R: list, L: Dense, eps: float) -> list:
    """``R_i = sum_j (a+_i w+_ij + a-_i w-_ij) R_j / s(z+_j)``, ``z+_j = sum_i (a+_i w+_ij + a-_i w-_ij) + b+_j``."""
    n_in, n_out = len(a), len(R)
    out = [0.0] * n_in
    for j in range(n_out):
        c = [pos(a[i]) * pos(L.W[j][i]) + neg(a[i]) * neg(L.W[j][i]) for i in range(n_in)]
        zp = sum(c) + pos(L.b[j])
        for i in range(n_in):
            out[i] += c[i] * R[j] / s(zp, eps)
    return out


def lrp_alpha_beta(a: list, R: list, L: Dense, alpha: float, beta: float, eps: float) -> list:
    """``R_i = sum_j (alpha c+_ij / s(z+_j) - beta c-_ij / s(z-_j)) R_j`` with
    ``c+_ij = a+_i w+_ij + a-_i w-_ij``, ``z+_j = sum_i c+_ij + b+_j``,
    ``c-_ij = a+_i w-_ij + a-_i w+_ij``, ``z-_j = sum_i c-_ij + b-_j``."""
    n_in, n_out = len(a), len(R)
    out = [0.0] * n_in
    for j in range(n_out):
        cp = [pos(a[i]) * pos(L.W[j][i]) + neg(a[i]) * neg(L.W[j][i]) for i in range(n_in)]
        cn = [pos(a[i]) * neg(L.W[j][i]) + neg(a[i]) * pos(L.W[j][i]) for i in range(n_in)]
        zp = sum(cp) + pos(L.b[j])
        zn = sum(cn) + neg(L.b[j])
        for i in range(n_in):
            out[i] += alpha * cp[i] * R[j] / s(zp, eps) - beta * cn[i] * R[j] / s(zn, eps)
    return out


def lrp_gamma(a: list, R: list, L: Dense, gamma: float, eps: float) -> list:
    """Generalised gamma. For ``z_j > 0``: ``c_ij = a+_i (w + gamma w+)_ij + a-_i (w + gamma w-)_ij``,
    ``d_j = sum_i c_ij + b_j + gamma b+_j``; for ``z_j < 0`` the same with ``+``/``-`` swapped on ``w`` and
    ``b``; ``R_i = sum_j c_ij R_j / s(d_j)``; outputs with ``z_j = 0`` pass nothing down."""
    n_in, n_out = len(a), len(R)
    z = forward(a, L)
    out = [0.0] * n_in
    for j in range(n_out):
        if z[j] > 0:
            up, down = pos, neg  # emphasis added to the weights acting on a+ / on a-
        elif z[j] < 0:
            up, down = neg, pos
        else:
            continue
        c = [pos(a[i]) * (L.W[j][i] + gamma * up(L.W[j][i])) + neg(a[i]) * (L.W[j][i] + gamma * down(L.W[j][i]))
             for i in range(n_in)]
        d = sum(c) + L.b[j] + gamma * up(L.b[j])
        for i in range(n_in):
            out[i] += c[i] * R[j] / s(d, eps)
    return out


def lrp_flat(a: list, R: list, L: Dense, eps: float) -> list:
    """``R_i = sum_j c_ij R_j / s(n_j)``, ``c_ij = 1`` where ``i`` feeds ``j``, ``n_j = sum_i c_ij``."""
    n_in, n_out = len(a), len(R)
    n = [sum(L.C[j][i] for i in range(n_in)) for j in range(n_out)]
    return [sum(L.C[j][i] * R[j] / s(n[j], eps) for j in range(n_out)) for i in range(n_in)]


def lrp_wsquare(a: list, R: list, L: Dense, eps: float) -> list:
    """``R_i = sum_j w_ij^2 R_j / s(sum_i w_ij^2 + b_j^2)``."""
    n_in, n_out = len(a), len(R)
    d = [sum(L.W[j][i] ** 2 for i in range(n_in)) + L.b[j] ** 2 for j in range(n_out)]
    return [sum(L.W[j][i] ** 2 * R[j] / s(d[j], eps) for j in range(n_out)) for i in range(n_in)]


def lrp_zbox(a: list, R: list, L: Dense, low, high, eps: float) -> list:
    """``R_i = sum_j q_ij R_j / s(sum_i q_ij)``, ``q_ij = a_i w_ij - l_i w+_ij - h_i w-_ij``;
    ``low``/``high``: a scalar or one value per input channel."""
    n_in, n_out = len(a), len(R)
    l = [low[L.channel_of[i]] if isinstance(low, list) else low for i in range(n_in)]
    h = [high[L.channel_of[i]] if isinstance(high, list) else high for i in range(n_in)]
    out = [0.0] * n_in
    for j in range(n_out):
        q = [a[i] * L.W[j][i] - l[i] * pos(L.W[j][i]) - h[i] * neg(L.W[j][i]) for i in range(n_in)]
        d = sum(q)
        for i in range(n_in):
            out[i] += q[i] * R[j] / s(d, eps)
    return out


def _bounds(channels: int) -> tuple[list, list]:
    """Per-channel box bounds (distinct per channel, wide enough for the test inputs)."""
    return ([-3.0 - 0.25 * c for c in range(channels)], [3.5 + 0.5 * c for c in range(channels)])


# name -> (rule for a layer with `channels` input channels, reference (a, R, L) -> R_in)
CASES = {
    "lrp0": (lambda ch: rules.LRP0(), lrp_0),
    "epsilon": (lambda ch: rules.Epsilon(0.25), functools.partial(lrp_epsilon, eps=0.25)),
    "epsilon-default": (lambda ch: rules.Epsilon(), functools.partial(lrp_epsilon, eps=1e-6)),
    "zplus": (lambda ch: rules.ZPlus(0.1), functools.partial(lrp_zplus, eps=0.1)),
    "alpha2-beta1": (lambda ch: rules.AlphaBeta(2.0, 1.0, 0.1),
                     functools.partial(lrp_alpha_beta, alpha=2.0, beta=1.0, eps=0.1)),
    "alpha1.5-beta0.75": (lambda ch: rules.AlphaBeta(1.5, 0.75, 1e-6),
                          functools.partial(lrp_alpha_beta, alpha=1.5, beta=0.75, eps=1e-6)),
    "gamma0.25": (lambda ch: rules.Gamma(0.25, 0.1), functools.partial(lrp_gamma, gamma=0.25, eps=0.1)),
    "gamma2": (lambda ch: rules.Gamma(2.0, 1e-6), functools.partial(lrp_gamma, gamma=2.0, eps=1e-6)),
    "flat": (lambda ch: rules.Flat(0.1), functools.partial(lrp_flat, eps=0.1)),
    "wsquare": (lambda ch: rules.WSquare(0.1), functools.partial(lrp_wsquare, eps=0.1)),
    "zbox-scalar": (lambda ch: rules.ZBox(-3.0, 3.5, 0.1),
                    functools.partial(lrp_zbox, low=-3.0, high=3.5, eps=0.1)),
    "zbox-per-channel": (
        lambda ch: rules.ZBox(torch.tensor(_bounds(ch)[0], dtype=torch.float64),
                              torch.tensor(_bounds(ch)[1], dtype=torch.float64), 0.1),
        lambda a, R, L: lrp_zbox(a, R, L, *_bounds(L.channels), eps=0.1)),
}


# --------------------------------------------------------------------------- layers, inputs, start relevance


@dataclass
class Setup:
    model: nn.Module  # the layer, flattened to (batch, units) for convolutions
    in_shape: tuple
    dense: Dense


LAYERS = {
    "linear": (lambda: nn.Linear(5, 4), (5,)),
    "conv-stride2-pad1": (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 7, 7)),
    "conv-groups2-dilation2": (lambda: nn.Conv2d(4, 6, 3, padding=1, dilation=2, groups=2), (4, 5, 5)),
}


@functools.lru_cache(maxsize=None)
def setup(name: str) -> Setup:
    make, in_shape = LAYERS[name]
    layer = make().double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g, dtype=torch.float64) * 0.5)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g, dtype=torch.float64) * 0.5)
    model = layer if isinstance(layer, nn.Linear) else nn.Sequential(layer, nn.Flatten())
    return Setup(model.eval(), in_shape, dense_of(layer, in_shape))


def make_input(kind: str, in_shape: tuple) -> torch.Tensor:
    """``mixed``: both samples have negative entries (signed-input path); ``nonneg``: all entries >= 0,
    some exactly 0 (fast path); ``nonneg+mixed``: sample 0 >= 0, sample 1 signed (signed path for both)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn((BATCH,) + in_shape, generator=g, dtype=torch.float64)
    flat = x.view(BATCH, -1)
    flat[:, 1] = 0.0
    if kind == "nonneg":
        x = x.abs()
        x.view(BATCH, -1)[:, ::7] = 0.0
        assert bool((x >= 0).all())
    elif kind == "nonneg+mixed":
        x[0] = x[0].abs()
    assert kind == "nonneg" or all(bool((x[n] < 0).any()) for n in range(1 if kind == "nonneg+mixed" else 0, BATCH))
    return x


INPUTS = ["mixed", "nonneg", "nonneg+mixed"]
STARTS = ["score-argmax", "score-argmin", "score-target2", "unit-target2", "tensor"]


def start_relevance(mode: str, z: list[list], n_out: int):
    """``(target, start)`` for ``lrp.explain`` and the output relevance ``R[n][j]`` they mean."""
    one_hot = lambda t: [1.0 if j == t else 0.0 for j in range(n_out)]  # noqa: E731
    if mode == "score-argmax":
        targets = [max(range(n_out), key=lambda j: zn[j]) for zn in z]
        return None, "score", [[oh * zj for oh, zj in zip(one_hot(t), zn)] for t, zn in zip(targets, z)]
    if mode == "score-argmin":  # negative outputs: the z_j < 0 branches
        targets = [min(range(n_out), key=lambda j: zn[j]) for zn in z]
        assert all(zn[t] < 0 for t, zn in zip(targets, z))
        return targets, "score", [[oh * zj for oh, zj in zip(one_hot(t), zn)] for t, zn in zip(targets, z)]
    if mode == "score-target2":
        return 2, "score", [[oh * zj for oh, zj in zip(one_hot(2), zn)] for zn in z]
    if mode == "unit-target2":
        return 2, "unit", [one_hot(2) for _ in z]
    g = torch.Generator().manual_seed(2)  # "tensor": relevance on every output unit, of both signs
    start = torch.randn(len(z), n_out, generator=g, dtype=torch.float64)
    return None, start, start.tolist()


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("layer", LAYERS)
def test_dense_unfolding_reproduces_the_layer(layer):
    """The reference's dense matrix computes what the layer computes (padding, stride, groups, dilation)."""
    st = setup(layer)
    x = make_input("mixed", st.in_shape)
    z = [forward(x[n].reshape(-1).tolist(), st.dense) for n in range(BATCH)]
    torch.testing.assert_close(st.model(x).detach(), torch.tensor(z, dtype=torch.float64), **TOL)


@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("inputs", INPUTS)
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("case", CASES)
def test_rule_matches_naive_reference(case, layer, inputs, start):
    """``lrp.explain`` with one rule on a one-layer model equals the rule's formula, sample by sample."""
    make_rule, reference = CASES[case]
    st = setup(layer)
    x = make_input(inputs, st.in_shape)
    a = [x[n].reshape(-1).tolist() for n in range(BATCH)]
    z = [forward(a[n], st.dense) for n in range(BATCH)]
    target, start_arg, R = start_relevance(start, z, len(st.dense.W))

    res = lrp.explain(st.model, x, target=target, composite=lrp.Composite(default=make_rule(st.dense.channels)),
                      start=start_arg)

    assert res.relevance.shape == x.shape
    for n in range(BATCH):
        expected = torch.tensor(reference(a[n], R[n], st.dense), dtype=torch.float64)
        torch.testing.assert_close(res.relevance[n].reshape(-1), expected, **TOL,
                                   msg=lambda m: f"sample {n}: {m}")


def test_references_by_hand():
    """The references themselves, on a 2-input, 2-output layer worked out by hand.

    ``W = [[1, -2], [3, 0.5]]``, ``b = [0.5, -1]``, ``a = [2, -1]``: ``z = [4.5, 4.5]``; ``R = [1, 0]``.
    """
    L = Dense([[1.0, -2.0], [3.0, 0.5]], [0.5, -1.0], [[1.0, 1.0], [1.0, 1.0]], [0, 1], 2)
    a, R = [2.0, -1.0], [1.0, 0.0]
    assert forward(a, L) == [4.5, 4.5]
    close = functools.partial(pytest.approx, rel=1e-14, abs=1e-14)
    # LRP-0: a_i w_i0 / z_0 = [2, 2] / 4.5
    assert lrp_0(a, R, L) == close([2 / 4.5, 2 / 4.5])
    # epsilon 0.5: denominator 5
    assert lrp_epsilon(a, R, L, eps=0.5) == close([0.4, 0.4])
    # z+: c = [2*1, (-1)*(-2)] = [2, 2], z+ = 4 + b+ 0.5 = 4.5
    assert lrp_zplus(a, R, L, eps=0.0) == close([2 / 4.5, 2 / 4.5])
    # alpha-beta: c- = [2*0 + 0, (-1)*0] = [0, 0], z- = 0 + b- 0 -> s(0) = +eps
    assert lrp_alpha_beta(a, R, L, alpha=2.0, beta=1.0, eps=1e-3) == close([4 / 4.501, 4 / 4.501])
    # gamma 1 (z_0 > 0): a+ (w + w+) = 2*2 = 4, a- (w + w-) = -1 * -4 = 4, d = 8 + 0.5 + 0.5 = 9
    assert lrp_gamma(a, R, L, gamma=1.0, eps=0.0) == close([4 / 9, 4 / 9])
    # gamma 1 with a = [-2, 1], so z = [-3.5, -6.5] (z_0 < 0): input 0 is a-, weight w + w+ = 2 -> -4;
    # input 1 is a+, weight w + w- = -4 -> -4; d = -8 + b 0.5 + b- 0 = -7.5
    assert lrp_gamma([-2.0, 1.0], R, L, gamma=1.0, eps=0.0) == close([4 / 7.5, 4 / 7.5])
    # flat: two inputs feed output 0 -> [1/2, 1/2]
    assert lrp_flat(a, R, L, eps=0.0) == close([0.5, 0.5])
    # w^2: w_0 = [1, 4], b_0^2 = 0.25 -> d = 5.25
    assert lrp_wsquare(a, R, L, eps=0.0) == close([1 / 5.25, 4 / 5.25])
    # z^B, l = -1, h = 2: q = [2*1 - (-1)*1 - 0, (-1)(-2) - 0 - 2*(-2)] = [3, 6]
    assert lrp_zbox(a, R, L, low=-1.0, high=2.0, eps=0.0) == close([3 / 9, 6 / 9])
    # per-channel z^B, l = [-1, 0], h = [1, 3]: q = [2 + 1, 2 + 6] = [3, 8]
    assert lrp_zbox(a, R, L, low=[-1.0, 0.0], high=[1.0, 3.0], eps=0.0) == close([3 / 11, 8 / 11])


def test_stabilizer_is_applied_at_full_precision():
    """``s(t) = t + eps * sign(t)`` uses ``eps`` as given (here 0.1, not representable in float32).

    One weight 1, no bias: ``z = a`` and Epsilon(0.1) gives ``R = a * a / s(a)`` with ``R_out = z = a``.
    """
    layer = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        layer.weight.fill_(1.0)
    x = torch.tensor([[1.0], [-2.0]], dtype=torch.float64)
    res = lrp.explain(layer, x, target=0, composite=lrp.Composite(default=rules.Epsilon(0.1)))
    expected = torch.tensor([[a * a / s(a, 0.1)] for a in (1.0, -2.0)], dtype=torch.float64)
    torch.testing.assert_close(res.relevance, expected, **TOL)
