"""Honest defaults: input rules only for images, explaining from the logits before a final sigmoid / softmax /
log-softmax, and target checks for one-score models."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lrp


def _mlp(outputs=1, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32, bias=bias), nn.ReLU(), nn.Linear(32, 16, bias=bias), nn.ReLU(),
                         nn.Linear(16, outputs, bias=bias)).double().eval()


def _x(n=6, seed=1):
    return torch.randn(n, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


class Head(nn.Module):
    """``body(x)`` followed by ``fn`` (a head and/or reshapes)."""

    def __init__(self, body, fn):
        super().__init__()
        self.body, self.fn = body, fn

    def forward(self, x):
        return self.fn(self.body(x))


# --------------------------------------------------------------------------- input rules only for images

def test_tabular_features_get_an_input_rule_that_depends_on_their_values():
    model = _mlp()
    res = lrp.explain(model, _x())
    assert res.rules["0"].startswith("Epsilon")
    # Flat would give every feature the same relevance
    assert (res.relevance.std(1) > 1e-3 * res.relevance.abs().mean(1)).all()
    layered = lrp.explain(model, _x(), composite="layered")
    assert layered.rules["0"].startswith("Gamma")  # the lower third; w^2 only for images
    # z^B depends on the values and on the bounds given: it applies to features too
    boxed = lrp.explain(model, _x(), composite=lrp.composite("epsilon-gamma-box", low=-3.0, high=3.0))
    assert boxed.rules["0"].startswith("ZBox")


@pytest.mark.parametrize("shape, conv", [((2, 1, 8, 8), nn.Conv2d), ((2, 2, 4, 6, 6), nn.Conv3d)])
def test_images_get_the_pixel_rules(shape, conv):
    model = nn.Sequential(conv(shape[1], 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * int(torch.tensor(shape[2:]).prod()), 4))
    x = torch.randn(*shape)
    assert lrp.explain(model, x).rules["0"].startswith("Flat")
    assert lrp.explain(model, x, composite="layered").rules["0"].startswith("WSquare")


def test_a_one_dimensional_signal_is_not_an_image():
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 3))
    res = lrp.explain(model, torch.randn(2, 2, 16))
    assert res.rules["0"].startswith("ZPlus")  # the composite's by_type rule for convolutions


def test_pixels_position_key():
    image_model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    comp = lrp.Composite(by_position={"pixels": lrp.rules.Flat()}, default=lrp.rules.LRP0())
    assert lrp.explain(image_model, torch.randn(1, 1, 8, 8), composite=comp).rules["0"].startswith("Flat")
    assert lrp.explain(_mlp(), _x(), composite=comp).rules["0"] == "LRP0()"

    class Normalizing(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net((x - 0.5) / 0.25)

    # the "no layer reads the input" warning covers "pixels", for images only
    with pytest.warns(UserWarning, match="first-layer rule Flat.*no layer gets it"):
        lrp.explain(Normalizing(image_model), torch.randn(1, 1, 8, 8), composite=comp)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lrp.explain(Normalizing(_mlp()), _x(), composite=comp)


# --------------------------------------------------------------------------- binary sigmoid heads

def test_sigmoid_head_is_explained_from_the_logit_of_either_class():
    body = _mlp(bias=False)
    model = nn.Sequential(body, nn.Sigmoid())
    x = _x()
    z = body(x).detach()
    plain = lrp.explain(body, x, composite="lrp0")  # the same MLP without the sigmoid, from its logit
    predicted = (z[:, 0] > 0).long()
    assert 0 < int(predicted.sum()) < len(x), "test set-up: both classes should be predicted"
    for target, sign in ((1, 1.0), (0, -1.0)):
        res = lrp.explain(model, x, target=target, composite="lrp0", record_layers=True)
        assert res.head == "sigmoid" and torch.equal(res.target, torch.full((len(x),), target))
        torch.testing.assert_close(res.output, torch.sigmoid(z))
        torch.testing.assert_close(res.logits, z)
        assert torch.equal(res.start, sign * z)
        torch.testing.assert_close(res.relevance.sum(1), sign * z[:, 0], rtol=1e-10, atol=1e-12)
        for name, ratio in res.conservation.items():
            torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=1e-8, atol=0.0, msg=name)
        torch.testing.assert_close(res.relevance, sign * plain.relevance, rtol=1e-10, atol=1e-12)
    default = lrp.explain(model, x, composite="lrp0")
    assert torch.equal(default.target, predicted)
    torch.testing.assert_close(default.relevance.sum(1), z[:, 0].abs(), rtol=1e-10, atol=1e-12)
    # LRP-0 on a ReLU network is gradient x input, here of the explained class's log-odds (exactly +-1 at z)
    x_ = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((body(x_)[:, 0] * (2 * predicted - 1)).sum(), x_)
    torch.testing.assert_close(default.relevance, g * x, rtol=1e-10, atol=1e-12)
    # the default composite (epsilon on features) as well
    sign = (2 * predicted[:, None] - 1).double()
    torch.testing.assert_close(lrp.explain(model, x).relevance, lrp.explain(body, x).relevance * sign,
                               rtol=1e-8, atol=1e-12)


SIGMOID_FORMS = {
    "module": lambda z: torch.sigmoid(z),
    "functional": lambda z: F.sigmoid(z),
    "method": lambda z: z.sigmoid(),
    "squeeze": lambda z: torch.sigmoid(z).squeeze(1),
    "view": lambda z: torch.sigmoid(z).view(-1),
    "flatten": lambda z: z.sigmoid().flatten(),
    "reshape-unsqueeze": lambda z: torch.sigmoid(z.reshape(-1)).unsqueeze(1),
    "inplace": lambda z: (z * 1.0).sigmoid_(),
}


@pytest.mark.parametrize("form", list(SIGMOID_FORMS))
def test_sigmoid_head_forms_and_reshapes(form):
    body = _mlp(bias=False)
    fn = nn.Sigmoid() if form == "module" else SIGMOID_FORMS[form]
    model = Head(body, fn)
    x = _x()
    res = lrp.explain(model, x, target=1, composite="lrp0")
    out = model(x)
    assert res.head == "sigmoid" and res.output.shape == out.shape and res.logits.shape == out.shape
    torch.testing.assert_close(res.logits.reshape(-1), body(x).detach()[:, 0])
    torch.testing.assert_close(res.relevance, lrp.explain(body, x, composite="lrp0").relevance)


def test_binary_start_kinds_and_targets():
    body = _mlp(bias=False)
    model = Head(body, lambda z: torch.sigmoid(z).squeeze(1))
    x = _x()
    z = body(x).detach()[:, 0]
    p = torch.sigmoid(z)
    target = torch.tensor([0, 1, 0, 1, 1, 0])
    prob = lrp.explain(model, x, target=target, start="prob", composite="lrp0")
    expected = torch.where(target == 1, p, 1 - p)
    torch.testing.assert_close(prob.start, expected)
    torch.testing.assert_close(prob.relevance.sum(1), expected, rtol=1e-10, atol=1e-12)
    unit = lrp.explain(model, x, target=[1, 1, 0, 0, 1, 0], start="unit", composite="lrp0")
    torch.testing.assert_close(unit.relevance.sum(1), torch.ones(6, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    with pytest.raises(lrp.TargetError, match="two classes, 1 .*and 0"):
        lrp.explain(model, x, target=2)
    with pytest.raises(lrp.TargetError, match="2 targets for a batch of 6"):
        lrp.explain(model, x, target=[0, 1])


# --------------------------------------------------------------------------- softmax heads

SOFTMAX_FORMS = {
    "nn.Softmax(1)": ("softmax", nn.Softmax(dim=1)),
    "nn.Softmax(-1)": ("softmax", nn.Softmax(dim=-1)),
    "F.softmax": ("softmax", lambda z: F.softmax(z, dim=1)),
    "torch.softmax": ("softmax", lambda z: torch.softmax(z, -1)),
    "method": ("softmax", lambda z: z.softmax(1)),
    "nn.LogSoftmax": ("log_softmax", nn.LogSoftmax(dim=1)),
    "F.log_softmax": ("log_softmax", lambda z: F.log_softmax(z, 1)),
    "method-log": ("log_softmax", lambda z: z.log_softmax(dim=-1)),
    "view": ("softmax", lambda z: z.softmax(1).view(z.shape[0], -1).contiguous()),
}


@pytest.mark.parametrize("form", list(SOFTMAX_FORMS))
def test_softmax_heads_explain_like_the_model_without_them(form):
    kind, fn = SOFTMAX_FORMS[form]
    body = _mlp(outputs=4, bias=False)
    model = Head(body, fn)
    x = _x()
    for target in (None, 2):
        res = lrp.explain(model, x, target=target, composite="epsilon-plus", record_layers=True)
        ref = lrp.explain(body, x, target=target, composite="epsilon-plus")
        assert res.head == kind
        torch.testing.assert_close(res.output, model(x).detach())
        torch.testing.assert_close(res.logits, body(x).detach())
        assert torch.equal(res.target, ref.target)
        torch.testing.assert_close(res.start, ref.start)
        torch.testing.assert_close(res.relevance, ref.relevance)
    prob = lrp.explain(model, x, start="prob", composite="lrp0")
    torch.testing.assert_close(prob.start.sum(1), torch.softmax(body(x), 1).max(1).values.detach())


def test_from_logits_false_and_tensor_starts_explain_the_output_as_it_is():
    body = _mlp(bias=False)
    model = nn.Sequential(body, nn.Sigmoid())
    x = _x()
    old = lrp.explain(model, x, composite="lrp0", from_logits=False)
    p = model(x).detach()
    assert old.head is None and torch.equal(old.logits, old.output) and old.num_classes == 1
    assert torch.equal(old.target, torch.zeros(6, dtype=torch.long))
    # the sigmoid's identity rule passes the probability on to the logit
    torch.testing.assert_close(old.relevance.sum(1), p[:, 0], rtol=1e-10, atol=1e-12)
    with pytest.raises(lrp.TargetError, match="only a model ending in a sigmoid has two classes"):
        lrp.explain(model, x, target=1, from_logits=False)

    classifier = nn.Sequential(_mlp(outputs=3, bias=False), nn.Softmax(dim=1))
    probs = classifier(x).detach()
    old = lrp.explain(classifier, x, composite="lrp0", from_logits=False)
    assert old.head is None
    torch.testing.assert_close(old.start.sum(1), probs.max(1).values)
    torch.testing.assert_close(old.probabilities, probs)  # the model's own probabilities, not their softmax
    mask = torch.rand(6, 3, dtype=torch.float64)
    res = lrp.explain(classifier, x, start=mask, composite="lrp0", record_layers=True)
    assert res.head is None and torch.equal(res.logits, res.output) and torch.equal(res.start, mask)
    torch.testing.assert_close(res.relevance, lrp.explain(classifier, x, start=mask, composite="lrp0",
                                                          from_logits=False).relevance)
    torch.testing.assert_close(res.relevance.sum(1), mask.sum(1), rtol=1e-10, atol=1e-12)
    with pytest.raises(lrp.TargetError, match="must match the model output"):
        lrp.explain(nn.Sequential(body, nn.Sigmoid(), nn.Flatten(0)), x, start=torch.ones(6, 1))


def test_a_softmax_that_is_not_over_the_classes_is_not_a_head():
    body = _mlp(outputs=3, bias=False)
    x = _x()
    over_batch = Head(body, lambda z: torch.softmax(z, 0))
    res = lrp.explain(over_batch, x, composite="lrp0")
    assert res.head is None and torch.equal(res.logits, res.output)
    torch.testing.assert_close(res.relevance, lrp.explain(over_batch, x, composite="lrp0", from_logits=False).relevance)

    class Attention(nn.Module):
        """Self-attention over 4 tokens of 3 features; its softmax is not the output."""

        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (nn.Linear(3, 3, bias=False) for _ in range(3))
            self.out = nn.Linear(12, 2, bias=False)

        def forward(self, x):
            t = x.reshape(x.shape[0], 4, 3)
            a = torch.softmax(self.q(t) @ self.k(t).transpose(1, 2), -1)
            return self.out((a @ self.v(t)).flatten(1))

    attn = Attention().double()
    x = torch.randn(2, 12, dtype=torch.float64)
    assert lrp.explain(attn, x).head is None
    # a softmax whose output is the model output but shaped (batch, tokens, tokens) is no head either
    weights = Head(attn, lambda _: torch.softmax(attn.q(x.reshape(2, 4, 3)), -1))
    res = lrp.explain(weights, x, start=torch.ones(2, 4, 3, dtype=torch.float64))
    assert res.head is None


def test_multi_label_sigmoid_head():
    body = _mlp(outputs=3, bias=False)
    model = nn.Sequential(body, nn.Sigmoid())
    x = _x()
    res = lrp.explain(model, x, target=1, composite="lrp0")
    assert res.head == "sigmoid" and res.num_classes == 3
    torch.testing.assert_close(res.relevance, lrp.explain(body, x, target=1, composite="lrp0").relevance)
    torch.testing.assert_close(res.probabilities, model(x).detach())
    prob = lrp.explain(model, x, target=1, start="prob", composite="lrp0")
    torch.testing.assert_close(prob.start.sum(1), torch.sigmoid(body(x))[:, 1].detach())


# --------------------------------------------------------------------------- classes, probabilities, predictions

def test_num_classes_probabilities_and_predictions():
    x = _x()
    body = _mlp(bias=False)
    z = body(x).detach()[:, 0]
    binary = lrp.explain(nn.Sequential(body, nn.Sigmoid()), x)
    p = torch.sigmoid(z)
    assert binary.num_classes == 2
    torch.testing.assert_close(binary.probabilities, torch.stack([1 - p, p], 1))
    assert torch.equal(binary.predicted, (z > 0).long()) and binary.predicted.dtype == torch.long

    classes = _mlp(outputs=4, bias=False)
    logits = classes(x).detach()
    for fn in (nn.Softmax(dim=1), nn.LogSoftmax(dim=1), nn.Identity()):
        res = lrp.explain(nn.Sequential(classes, fn), x)
        assert res.num_classes == 4
        torch.testing.assert_close(res.probabilities, torch.softmax(logits, 1))
        assert torch.equal(res.predicted, logits.argmax(1))

    score = lrp.explain(body, x)  # one score, no sigmoid: a regression-like output
    assert score.num_classes == 1 and score.probabilities is None and score.predicted is None
    flat = lrp.explain(nn.Sequential(body, nn.Flatten(0)), x)
    assert flat.num_classes == 1 and flat.target is None and flat.probabilities is None
    # baselines build an Explanation without a head: logits are the output
    from lrp import baselines
    base = baselines.gradient(classes, x)
    assert base.head is None and base.logits is base.output and base.num_classes == 4


# --------------------------------------------------------------------------- issue 12: tensor targets on one score

def test_tensor_target_on_a_one_score_model_is_a_target_error():
    model = nn.Sequential(_mlp(), nn.Flatten(0))  # output (N,)
    x = _x(3)
    with pytest.raises(lrp.TargetError, match="only target is 0.*only a model ending in a sigmoid.*start="):
        lrp.explain(model, x, target=torch.tensor([1, 0, 1]))
    with pytest.raises(lrp.TargetError, match="only a model ending in a sigmoid"):
        lrp.explain(model, x, target=1)
    with pytest.raises(lrp.TargetError, match="only a model ending in a sigmoid"):
        lrp.explain(_mlp(), x, target=1)  # output (N, 1)
    with pytest.raises(lrp.TargetError, match="integer"):
        lrp.explain(model, x, target=torch.tensor([0.0, 1.0, 0.0]))
    zeros = lrp.explain(model, x, target=torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(zeros.relevance, lrp.explain(model, x).relevance)
