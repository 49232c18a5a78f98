"""The public API: targets, start relevance, composites, module rules, errors, and leaving no trace."""

import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lrp
from architectures import Residual, Sequential2d, TabularMLP


def _snapshot(model):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for m in model.modules()],
    }


def _assert_untouched(model, before, x, out_before):
    after = _snapshot(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["hooks"] == before["hooks"]
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    was_training = model.training
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), out_before)
    model.train(was_training)


def test_model_untouched_after_success():
    model = Sequential2d()
    model.train()  # explain switches to eval for the call and must switch back
    model[7].weight.requires_grad_(False)  # a frozen layer stays frozen, the others stay trainable
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        out_before = model(x)
    model.train()
    before = _snapshot(model)
    res = lrp.explain(model, x)
    torch.testing.assert_close(res.output, out_before)
    _assert_untouched(model, before, x, out_before)


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.exp(x))


def test_model_untouched_after_failure_and_error_names_the_op():
    model = nn.Sequential(nn.Linear(4, 4), Unsupported())
    x = torch.randn(2, 4)
    with torch.no_grad():
        out_before = model.eval()(x)
    before = _snapshot(model)
    with pytest.raises(lrp.UnsupportedOperationError) as info:
        lrp.explain(model, x)
    message = str(info.value)
    assert "'exp'" in message and "module '1' (Unsupported)" in message and "register_module_rule" in message
    _assert_untouched(model, before, x, out_before)


def test_division_by_an_activation_is_refused():
    class SoftSign(nn.Module):
        def forward(self, x):
            return x / (x.abs() + 1)

    with pytest.raises(lrp.UnsupportedOperationError, match="'div'.*divisor depends on the input"):
        lrp.explain(nn.Sequential(nn.Linear(3, 3), SoftSign(), nn.Linear(3, 2)), torch.randn(2, 3))


def test_registered_module_rules():
    class Gate(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)  # SiLU written by hand

    class MyReLU(nn.Module):
        def forward(self, x):
            return x.clamp(min=0) * 1.0

    model = nn.Sequential(nn.Linear(5, 6, bias=False), Gate(), nn.Linear(6, 6, bias=False), MyReLU(),
                          nn.Linear(6, 2, bias=False)).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    comp = lrp.composite("lrp0")
    comp.module_rules = {Gate: lrp.rules.Pass(), MyReLU: lrp.rules.Gradient()}
    res = lrp.explain(model, x, composite=comp)
    torch.testing.assert_close(res.relevance.sum(1), res.start.sum(1), rtol=1e-8, atol=0)
    # the same with a SiLU module, whose identity rule is built in
    reference = nn.Sequential(model[0], nn.SiLU(), model[2], nn.ReLU(), model[4])
    torch.testing.assert_close(res.relevance, lrp.explain(reference, x, composite="lrp0").relevance)


def test_global_registration_and_custom_module_rule():
    class Halve(nn.Module):
        def forward(self, x):
            return torch.exp(x) * 0 + x / 2  # nothing lrp could follow

    class HalfRule(lrp.rules.ModuleRule):
        def relevance(self, inputs, output, relevance):
            return relevance  # y = x / 2: all of the output's relevance comes from x

    lrp.register_module_rule(Halve, HalfRule())
    model = nn.Sequential(nn.Linear(4, 4, bias=False), Halve(), nn.Linear(4, 2, bias=False)).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    res = lrp.explain(model, x, composite="lrp0")
    torch.testing.assert_close(res.relevance.sum(1), res.start.sum(1))
    with pytest.raises(TypeError, match="ModuleRule"):
        lrp.register_module_rule(Halve, lrp.rules.Epsilon())


def test_targets_and_start_relevance():
    model = Sequential2d().double()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    out = model.eval()(x)
    res = lrp.explain(model, x)
    assert torch.equal(res.target, out.argmax(1))
    res2 = lrp.explain(model, x, target=2)
    assert torch.equal(res2.target, torch.tensor([2, 2, 2]))
    torch.testing.assert_close(res2.start.sum(1), out[:, 2].detach())
    res3 = lrp.explain(model, x, target=[0, 1, 4], start="unit", composite="lrp0")
    torch.testing.assert_close(res3.start, F.one_hot(torch.tensor([0, 1, 4]), 5).double())
    # LRP-0 is linear in the start relevance: unit start = score start / score
    res3s = lrp.explain(model, x, target=[0, 1, 4], composite="lrp0")
    scale = out.gather(1, torch.tensor([[0], [1], [4]])).detach()
    torch.testing.assert_close(res3.relevance * scale[:, :, None, None], res3s.relevance)
    prob = lrp.explain(model, x, start="prob", composite="lrp0")
    torch.testing.assert_close(prob.start.sum(1), torch.softmax(out, 1).max(1).values.detach())
    explicit = torch.randn_like(out)
    res4 = lrp.explain(model, x, start=explicit, composite="lrp0")
    sums = [lrp.explain(model, x, target=k, start="unit", composite="lrp0").relevance * explicit[:, k, None, None,
                                                                                                 None]
            for k in range(5)]
    torch.testing.assert_close(res4.relevance, sum(sums))


@pytest.mark.parametrize("target, message", [(7, "out of range"), ([0, 1], "2 targets for a batch of 3"),
                                             (1.5, "integer"), (-1, "out of range")])
def test_bad_targets(target, message):
    with pytest.raises(lrp.TargetError, match=message):
        lrp.explain(Sequential2d(), torch.randn(3, 3, 16, 16), target=target)


def test_bad_inputs_and_composites():
    model = Sequential2d()
    with pytest.raises(lrp.LRPError, match="token ids.*embedding"):
        lrp.explain(model, torch.zeros(1, 3, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown composite 'nope'"):
        lrp.explain(model, torch.randn(1, 3, 16, 16), composite="nope")
    with pytest.raises(ValueError, match="low=..., high=..."):
        lrp.composite("epsilon-gamma-box")
    with pytest.raises(lrp.TargetError, match="start must be"):
        lrp.explain(model, torch.randn(1, 3, 16, 16), start="logit")
    with pytest.raises(lrp.TargetError, match="must match the model output"):
        lrp.explain(model, torch.randn(1, 3, 16, 16), start=torch.ones(1, 3))


def test_input_rules_need_the_raw_input():
    class Normalizing(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Sequential2d()

        def forward(self, x):
            return self.net((x - 0.5) / 0.25)

    x = torch.randn(1, 3, 16, 16)
    # the composite's "first" rule finds no layer that reads the input: a warning, and the type rules apply
    with pytest.warns(UserWarning, match="first-layer rule Flat.*no layer gets it"):
        res = lrp.explain(Normalizing(), x, composite="epsilon-plus-flat")
    assert res.rules["net.0"].startswith("ZPlus")
    # an input rule put explicitly on a layer that does not read the input is an error
    with pytest.raises(lrp.RuleError, match="Flat.*must read the model input"):
        lrp.explain(Normalizing(), x, composite=lrp.Composite(by_name={"net.0": lrp.rules.Flat()}))


def test_input_rule_through_reshape_and_indexing():
    """Flat at a layer that reads a reshaped slice of the input: relevance lands on the right pixels."""

    class Sliced(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 3, bias=False)

        def forward(self, x):  # x: (N, 4, 4); only the first two rows are used
            return self.fc(x[:, :2].reshape(x.shape[0], -1))

    model = Sliced().double()
    x = torch.randn(2, 4, 4, dtype=torch.float64)
    res = lrp.explain(model, x, composite=lrp.Composite(by_position={"first": lrp.rules.Flat()}))
    assert torch.all(res.relevance[:, 2:] == 0)
    # flat: every input of the unit gets an equal share
    expected = (res.start.sum(1) / 8)[:, None, None].expand(2, 2, 4)
    torch.testing.assert_close(res.relevance[:, :2], expected, rtol=1e-5, atol=0)


def test_composite_precedence_name_over_position_over_type():
    model = Sequential2d()
    comp = lrp.Composite(by_type={"conv": lrp.rules.ZPlus(), nn.Linear: lrp.rules.Epsilon(0.1)},
                         by_position={"first": lrp.rules.Flat(), -1: lrp.rules.LRP0()},
                         by_name={"3": lrp.rules.Gamma(0.5), "1?": lrp.rules.AlphaBeta()})
    rules = lrp.explain(model, torch.randn(1, 3, 16, 16), composite=comp).rules
    assert rules == {"0": "Flat(stabilizer=1e-06)", "3": "Gamma(gamma=0.5, stabilizer=1e-06)",
                     "7": "Epsilon(epsilon=0.1)", "10": "AlphaBeta(alpha=2.0, beta=1.0, stabilizer=1e-06)"}


def test_layered_composite_assigns_by_depth():
    model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(4, 4), nn.ReLU())], nn.Linear(4, 2))
    res = lrp.explain(model, torch.rand(1, 4), composite=lrp.composite("layered", low=0.0, high=1.0))
    kinds = [rule.split("(")[0] for rule in res.rules.values()]
    # 7 layers: thirds at round(7/3) = 2 and round(14/3) = 5
    assert kinds == ["ZBox", "Gamma", "Epsilon", "Epsilon", "Epsilon", "LRP0", "LRP0"]


def test_maxpool_as_average_matches_average_pooling_rule():
    """Max-pooling treated as average pooling redistributes like LRP-0 on an average pool of the same input."""
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64) + 0.1
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False).double()
    fc = nn.Linear(4 * 16, 3, bias=False).double()
    model = nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), fc)
    res = lrp.explain(model, x, composite=lrp.composite("lrp0", maxpool="average"), record_layers=True)
    # reference: relevance at the pool output, pushed through avg-pool proportionally, then LRP-0 through conv
    h = torch.relu(conv(x))
    pooled = F.max_pool2d(h, 2)
    r_out = res.layers["4"].detach()  # relevance at the output of the dense layer
    lrp_fc_in = (pooled.flatten(1) * ((r_out / fc(pooled.flatten(1))) @ fc.weight)).reshape(pooled.shape)
    share = lrp_fc_in / F.avg_pool2d(h, 2)
    r_h = h * F.interpolate(share, scale_factor=2, mode="nearest") / 4
    x_ = x.clone().requires_grad_(True)
    z = conv(x_)
    (g,) = torch.autograd.grad(z, x_, torch.where(z > 0, r_h / z, torch.zeros_like(z)))
    torch.testing.assert_close(res.relevance, (x * g).detach(), rtol=1e-8, atol=1e-10)


def test_inplace_ops_and_no_grad_context():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.c = nn.Linear(4, 2)

        def forward(self, x):
            h = self.a(x)
            h.relu_()  # return value ignored: later uses of h must see the rectified value
            y = self.b(h)
            y += h
            y = F.relu(y, inplace=True)
            y = y * 1.0  # (native autograd needs the ReLU output intact)
            y[:, 0] = 0.0
            return self.c(y)

    model = InPlace().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    with torch.no_grad():
        res = lrp.explain(model, x, composite="lrp0")
    x_ = x.clone().requires_grad_(True)
    out = model(x_)
    torch.testing.assert_close(res.output, out.detach())
    (g,) = torch.autograd.grad(out.gather(1, res.target[:, None]).sum(), x_)
    torch.testing.assert_close(res.relevance, g * x)


def test_sigmoid_mlp_relevance_per_feature_and_layer():
    model = TabularMLP().double()
    x = torch.randn(4, 10, dtype=torch.float64)
    res = lrp.explain(model, x, composite="epsilon", record_layers=True)
    assert res.output.shape == (4, 1) and res.relevance.shape == (4, 10)
    assert set(res.layers) == {"fc1", "fc2", "out"}
    assert res.layers["fc1"].shape == (4, 16)
    # the output is the sigmoid's probability; the relevance starts before it, at the logit z of the predicted
    # class (z for class 1, -z for class 0)
    assert res.head == "sigmoid"
    torch.testing.assert_close(res.layers["out"].sum(1), torch.where(res.target == 1, 1.0, -1.0) * res.logits[:, 0])


def test_concurrent_calls_on_one_model_are_serialised():
    model = Residual()
    x = torch.randn(2, 3, 8, 8)
    expected = lrp.explain(model, x).relevance
    results, errors = [], []

    def work():
        try:
            results.append(lrp.explain(model, x).relevance)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for r in results:
        torch.testing.assert_close(r, expected)
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_torchscript_is_refused_with_a_way_out():
    scripted = torch.jit.script(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)))
    with pytest.raises(lrp.LRPError, match="TorchScript.*Python model"):
        lrp.explain(scripted, torch.randn(1, 3))


def test_activations_are_released_after_explain():
    """Autograd nodes hold the trace's records; explain must break that cycle or each call leaks its activations."""
    import gc
    import weakref

    model = Sequential2d()
    seen = []
    handle = model[3].register_forward_hook(lambda m, i, o: seen.append(weakref.ref(o)))
    try:
        lrp.explain(model, torch.randn(2, 3, 16, 16))
    finally:
        handle.remove()
    gc.collect()
    assert seen and all(ref() is None for ref in seen)


def test_exported_program_explains_like_the_module():
    from test_invariants import ReLUWithBatchNorm, _randomize_batchnorm
    model = _randomize_batchnorm(ReLUWithBatchNorm()).eval()
    x = torch.randn(2, 3, 8, 8)
    program = torch.export.export(model, (x,)).module()
    for composite in ("lrp0", "epsilon-plus-flat"):
        torch.testing.assert_close(lrp.explain(program, x, composite=composite).relevance,
                                   lrp.explain(model, x, composite=composite).relevance)


def test_explain_leaves_no_reference_cycles_behind():
    """Everything a call builds is freed by reference counting as soon as it returns (no work for the cyclic
    garbage collector, no memory held until it runs), BatchNorm fusion included."""
    import gc

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.randn(2, 3, 8, 8)
    lrp.explain(net, x)  # first call: lazy imports and caches
    gc.collect()
    gc.disable()
    try:
        lrp.explain(net, x, composite="epsilon-plus", record_layers=True)
        found = gc.collect()
    finally:
        gc.enable()
    assert found == 0


def _small_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


@pytest.mark.parametrize("how", ["input made under inference_mode", "called under inference_mode"])
def test_inference_mode_inputs_and_calls_are_explained(how):
    """torch.inference_mode() is how servers run models: an input made under it, or a call made under it, is
    explained as a plain input is (explain runs outside inference mode, on a clone of such an input)."""
    model, x = _small_mlp(), torch.randn(2, 6)
    want = lrp.explain(model, x)
    explainer = lrp.Explainer(model)
    for _ in range(4):  # eager, recorded, replayed
        if how == "input made under inference_mode":
            with torch.inference_mode():
                given = x.clone()
            got = [lrp.explain(model, given), explainer(given)]
        else:
            with torch.inference_mode():
                got = [lrp.explain(model, x), explainer(x)]
        for res in got:
            assert torch.equal(res.relevance, want.relevance) and not res.relevance.is_inference()
    assert explainer.calls["replayed"] == 2, explainer.calls


def test_a_model_made_under_inference_mode_is_refused_with_the_way_out():
    with torch.inference_mode():
        model = _small_mlp()
    flags = [p.requires_grad for p in model.parameters()]
    for explain in (lambda x: lrp.explain(model, x), lrp.Explainer(model)):
        with pytest.raises(lrp.LRPError, match=r"'0.weight' was made under torch.inference_mode\(\).*outside"):
            explain(torch.randn(2, 6))
    assert [p.requires_grad for p in model.parameters()] == flags
    with torch.no_grad():  # lrp.evaluate's forward passes leave such a model as it was, too
        lrp.evaluate.perturbation_curve(model, torch.randn(2, 6), torch.randn(2, 6), steps=2)
    assert [p.requires_grad for p in model.parameters()] == flags


def test_a_module_held_in_a_plain_list_is_named_as_such():
    class Listed(nn.Module):
        def __init__(self):
            super().__init__()
            self.extra = [nn.Linear(4, 3)]  # not registered: its parameters are not the model's

        def forward(self, x):
            return self.extra[0](x)

    model = Listed()
    with pytest.raises(lrp.UnsupportedOperationError, match="not among the model's parameters.*plain list"):
        lrp.explain(model, torch.randn(2, 4))
    model.extra[0].requires_grad_(False)  # the way out the message gives
    assert lrp.explain(model, torch.randn(2, 4)).relevance.shape == (2, 4)
