"""``lrp.Explainer``: repeated calls give what ``lrp.explain`` gives, and nothing kept from an earlier call is
used once the model has changed (issue 12).

The explainer keeps the tensors rules build from the weights (``W+``, merged BatchNorm weights, flat counts,
w^2 sums, z^B offsets) between calls. Each test changes the model in one way an application does (weights
edited in place, a state dict loaded, a parameter replaced, new BatchNorm statistics, a branch taken on the
input's values, another input shape, train mode) and checks the next call against a fresh ``lrp.explain`` of
the model as it now is.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lrp

from test_equivalence import BOUNDS, _composites, _image  # noqa: F401  (shared inputs and composites)


class Net(nn.Module):
    """conv -> BN -> relu -> conv (called twice, shared weights) -> relu -> pool -> fc."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4, 5)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            self.bn.running_mean.normal_(generator=g)
            self.bn.running_var.uniform_(0.5, 1.5, generator=g)
            self.bn.weight.normal_(generator=g)

    def forward(self, x):
        h = F.relu(self.bn(self.conv1(x)))
        h = F.relu(self.conv2(F.relu(self.conv2(h))))
        return self.fc(F.adaptive_avg_pool2d(h, 2).flatten(1))


def _same(res, ref):
    torch.testing.assert_close(res.relevance, ref.relevance, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.output, ref.output)
    assert res.rules == ref.rules
    assert torch.equal(res.target, ref.target)


COMPOSITES = [c for c in _composites()]


@pytest.mark.parametrize("make", [c[1] for c in COMPOSITES], ids=[c[0] for c in COMPOSITES])
def test_repeated_calls_give_what_explain_gives(make):
    model = Net().double().eval()
    explainer = lrp.Explainer(model, make())
    for seed in range(3):
        x = _image(seed=seed)
        _same(explainer(x), lrp.explain(model, x, composite=make()))
    for target in (0, [1, 2]):
        _same(explainer(_image(), target), lrp.explain(model, _image(), target, composite=make()))


def test_the_second_call_builds_nothing_new():
    model = Net().double().eval()
    explainer = lrp.Explainer(model, "epsilon-plus-flat")
    explainer(_image())
    built = explainer.cache.misses
    assert built > 0
    explainer(_image(seed=5))
    assert explainer.cache.misses == built and explainer.cache.hits > 0


def _edit_in_place(model):
    with torch.no_grad():
        model.conv2.weight.mul_(-1.5)


def _load_state_dict(model):
    model.load_state_dict(Net(seed=7).double().state_dict())


def _replace_parameter(model):
    model.conv1.weight = nn.Parameter(torch.randn_like(model.conv1.weight))


def _new_batchnorm_statistics(model):
    with torch.no_grad():
        model.bn.running_var.mul_(3.0)


def _assign_data(model):
    model.fc.weight.data = torch.randn_like(model.fc.weight)


def _through_data(model):
    model.conv2.weight.data.mul_(-1.5)  # .data has a version counter of its own: the weight's is not bumped


def _statistics_through_data(model):
    model.bn.running_mean.data.add_(0.5)


def _fused_optimiser_step(model):
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=0.5, fused=True)  # bumps no version counter
    model(_image(seed=3)).square().sum().backward()
    opt.step()
    model.eval()


def _train_step(model):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = model(_image(seed=3)).square().sum()
    loss.backward()
    opt.step()
    model.eval()


CHANGES = {"weights edited in place": _edit_in_place, "state dict loaded": _load_state_dict,
           "parameter replaced": _replace_parameter, "BatchNorm statistics": _new_batchnorm_statistics,
           ".data assigned": _assign_data, "an optimiser step": _train_step, ".data changed": _through_data,
           "statistics changed through .data": _statistics_through_data,
           "a fused optimiser step": _fused_optimiser_step}


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("composite", ["epsilon-plus-flat", "epsilon-gamma-box"])
def test_a_changed_model_is_never_explained_with_what_was_kept(change, composite):
    params = BOUNDS if composite == "epsilon-gamma-box" else {}
    model = Net().double().eval()
    explainer = lrp.Explainer(model, lrp.composite(composite, **params))
    before = explainer(_image())
    CHANGES[change](model)
    after = explainer(_image())
    _same(after, lrp.explain(model, _image(), composite=lrp.composite(composite, **params)))
    assert not torch.allclose(after.relevance, before.relevance)


@pytest.mark.parametrize("bounds", ["numbers", "tensors"])
def test_changed_rule_parameters_are_noticed(bounds):
    model = Net().double().eval()
    low, high = (-1.0, 1.0) if bounds == "numbers" else (torch.full((3, 1, 1), -1.0, dtype=torch.float64),
                                                         torch.full((3, 1, 1), 1.0, dtype=torch.float64))
    box = lrp.rules.ZBox(low, high)
    comp = lrp.Composite(by_position={"first": box}, default=lrp.rules.Epsilon())
    explainer = lrp.Explainer(model, comp)
    before = explainer(_image())
    if bounds == "numbers":
        box.low, box.high = -3.0, 3.0
    else:
        box.low.data.fill_(-3.0)  # in place, through .data: no version bump
        box.high.data.fill_(3.0)
    after = explainer(_image())
    _same(after, lrp.explain(model, _image(), composite=comp))
    assert not torch.allclose(after.relevance, before.relevance)


class Branches(nn.Module):
    """Control flow on the input's values: another layer (with other rules' tensors) for each branch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.wide, self.narrow = nn.Conv2d(6, 6, 3, padding=2, dilation=2), nn.Conv2d(6, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.conv(x))
        h = self.wide(h) if x.mean() > 0 else self.narrow(h)
        return self.fc(F.relu(h).mean((2, 3)))


def test_control_flow_on_the_input_is_followed_on_every_call():
    model = Branches().double().eval()
    explainer = lrp.Explainer(model, "epsilon-plus-flat")
    for sign in (1, -1, 1, -1):
        x = _image().abs() * sign
        res = explainer(x)
        _same(res, lrp.explain(model, x, composite="epsilon-plus-flat"))
        assert ("wide" in res.rules) == (sign > 0)


def test_other_input_shapes_and_dtypes():
    model = Net().double().eval()
    explainer = lrp.Explainer(model, "epsilon-plus-flat")
    for x in (_image(), _image(n=3)[..., :6, :6], _image(n=1)):
        _same(explainer(x), lrp.explain(model, x, composite="epsilon-plus-flat"))
    model32 = copy.deepcopy(model).float()
    explainer32 = lrp.Explainer(model32, "epsilon-plus-flat")
    x = _image().float()
    _same(explainer32(x), lrp.explain(model32, x, composite="epsilon-plus-flat"))


def test_the_model_is_left_as_it_was():
    model = Net().double().train()
    flags = [p.requires_grad for p in model.parameters()]
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    explainer = lrp.Explainer(model)
    res = explainer(_image())
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    model.eval()
    _same(res, lrp.explain(model, _image()))  # explained in eval mode, as explain does


def test_clear_drops_what_was_kept():
    explainer = lrp.Explainer(Net().double().eval())
    explainer(_image())
    assert explainer.cache.entries
    explainer.clear()
    assert not explainer.cache.entries
    assert "epsilon-plus-flat" in repr(explainer)


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="nn.Module"):
        lrp.Explainer(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown composite"):
        lrp.Explainer(Net(), "no-such-composite")
