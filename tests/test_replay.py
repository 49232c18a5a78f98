"""``lrp.Explainer`` records the second call of a kind and replays it (issue 12): a replayed call gives
bit for bit what ``lrp.explain`` gives, on every kind of model, and every change a recorded program cannot see
by itself (another input shape, model attributes, hooks, tensors outside the model, control flow on values,
autocast, targets) is noticed: the call is recorded again, or explained eagerly.

Each test checks that the calls it compares were really replayed (``explainer.calls``), so that a test cannot
pass on the eager path alone.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import lrp
from architectures import Residual, bias_free_models
from test_explainer import Net, _image
from test_heads_and_inputs import Head, _mlp
from test_heads_and_inputs import _x as _features
from test_language_models import TokenNet, _ids, _llama
from test_recurrent import Classifier
from test_recurrent import _x as _sequence

BOUNDS = dict(low=-3.0, high=3.0)


def _same(res, ref):
    """Bit for bit: a replay runs the operations the eager call ran, in the same order."""
    rel, want = (res.relevance, ref.relevance) if isinstance(res.relevance, tuple) else \
        ((res.relevance,), (ref.relevance,))
    for a, b in zip(rel, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), f"max difference {(a - b).abs().max().item():.3g}"
    assert torch.equal(res.output, ref.output)
    assert (res.target is None) == (ref.target is None)
    assert res.target is None or torch.equal(res.target, ref.target)
    assert torch.equal(res.start, ref.start)
    assert res.rules == ref.rules and res.head == ref.head
    assert res.conservation.keys() == ref.conservation.keys()
    for k in ref.conservation:
        assert torch.equal(res.conservation[k], ref.conservation[k]), k
    assert res.layers.keys() == ref.layers.keys()
    for k in ref.layers:
        assert torch.equal(res.layers[k], ref.layers[k]), k


def _varied(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Another input of ``x``'s shape and dtype (token ids stay ids)."""
    g = torch.Generator().manual_seed(seed)
    if not x.is_floating_point():
        return torch.randint(0, int(x.max()) + 1, x.shape, generator=g)
    return x + 0.3 * torch.randn(x.shape, generator=g, dtype=x.dtype)


def _vit():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32, num_classes=5).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero: every score would be 0
    return model


def _cases():
    cases = [(name, model.eval(), x, "epsilon-plus-flat") for name, model, x in bias_free_models() if name != "shared"]
    torch.manual_seed(0)
    cases += [
        ("net float64, epsilon-gamma-box", Net().double().eval(), _image(), lrp.composite("epsilon-gamma-box",
                                                                                         **BOUNDS)),
        ("resnet18 alpha-beta", torchvision.models.resnet18(num_classes=7).eval(), torch.randn(2, 3, 32, 32),
         "epsilon-alpha2-beta1"),
        ("vit", _vit(), torch.randn(2, 3, 32, 32), "epsilon"),
        ("gru", Classifier("gru").double().eval(), _sequence(), "epsilon"),
        ("lstm, two layers", Classifier("lstm", layers=2).double().eval(), _sequence(), "epsilon"),
        ("token ids", TokenNet().eval(), _ids(), "epsilon"),
        ("sigmoid head", Head(_mlp(1), torch.sigmoid), _features(), "epsilon-plus"),
        ("layered", Net().eval(), _image().float(), lrp.composite("layered", **BOUNDS)),
    ]
    return cases


CASES = _cases()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_replayed_call_gives_what_explain_gives(case):
    _, model, x, composite = case
    explainer = lrp.Explainer(model, composite)
    for seed in range(4):
        xs = _varied(x, seed)
        _same(explainer(xs), lrp.explain(model, xs, composite=composite))
    assert explainer.calls == {"eager": 1, "recorded": 1, "replayed": 2}, explainer.why_not_replayed


def test_a_language_model_is_replayed():
    model = lrp.language.NextToken(_llama())
    explainer = lrp.Explainer(model, "epsilon")
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    for seed in range(3):
        x = _varied(ids, seed)
        _same(explainer(x), lrp.explain(model, x, composite="epsilon"))
    assert explainer.calls["replayed"] == 1, explainer.why_not_replayed


def test_several_inputs_and_recorded_layers():
    vqa, encoder = lrp.vqa.vqa()
    image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ids = encoder.batch(["what colour is the circle", "how many squares are there"])
    explainer = lrp.Explainer(vqa, "epsilon-plus-flat")
    for seed in range(3):
        x = (_varied(image, seed), ids)
        _same(explainer(x, record_layers=True), lrp.explain(vqa, x, record_layers=True))
    assert explainer.calls["replayed"] == 1


def test_record_layers_residual():
    torch.manual_seed(0)
    model, x = Residual().eval(), torch.randn(2, 3, 8, 8)
    explainer = lrp.Explainer(model)
    for seed in range(3):
        xs = _varied(x, seed)
        res = explainer(xs, record_layers=True)
        _same(res, lrp.explain(model, xs, record_layers=True))
        assert res.layers
    assert explainer.calls["replayed"] == 1


# ----------------------------------------------------------------------------- targets and starts

def _warm(explainer, x, **kwargs):
    for _ in range(2):
        explainer(x, **kwargs)


@pytest.mark.parametrize("target", [3, [0, 4], torch.tensor([2, 1])])
def test_targets_are_arguments_of_the_program(target):
    model, x = Net().double().eval(), _image()
    explainer = lrp.Explainer(model)
    _warm(explainer, x, target=0)
    _same(explainer(x, target), lrp.explain(model, x, target))
    _same(explainer(x, 1), lrp.explain(model, x, 1))
    assert explainer.calls["replayed"] == 2 and explainer.calls["recorded"] == 1


def test_bad_targets_are_refused_before_a_replay_as_explain_refuses_them():
    model, x = Net().double().eval(), _image()
    explainer = lrp.Explainer(model)
    _warm(explainer, x, target=0)
    for bad in (5, [0, -1], [1, 2, 3], 1.5):
        with pytest.raises(lrp.TargetError) as got:
            explainer(x, bad)
        with pytest.raises(lrp.TargetError) as want:
            lrp.explain(model, x, bad)
        assert str(got.value) == str(want.value)


def test_binary_and_one_score_models():
    binary = Head(_mlp(1), torch.sigmoid)
    explainer = lrp.Explainer(binary)
    _warm(explainer, _features(), target=1)
    for target in (0, 1, [0, 1, 1, 0, 0, 1]):
        _same(explainer(_features(), target), lrp.explain(binary, _features(), target))
    with pytest.raises(lrp.TargetError, match="two classes"):
        explainer(_features(), 2)
    score = Head(_mlp(1), lambda z: z.reshape(-1))  # one score, no sigmoid: the only target is 0
    explainer = lrp.Explainer(score)
    _warm(explainer, _features(), target=0)
    _same(explainer(_features(), 0), lrp.explain(score, _features(), 0))
    with pytest.raises(lrp.TargetError, match="only target is 0"):
        explainer(_features(), 1)
    assert explainer.calls["replayed"] == 1


def test_start_kinds():
    model, x = Net().double().eval(), _image()
    explainer = lrp.Explainer(model)
    for start in ("unit", "prob"):
        _warm(explainer, x, start=start)
        _same(explainer(x, start=start), lrp.explain(model, x, start=start))
    assert explainer.calls["replayed"] == 2
    tensor_start = torch.rand(2, 5, dtype=torch.float64)
    _same(explainer(x, start=tensor_start), lrp.explain(model, x, start=tensor_start))  # explained eagerly


# ----------------------------------------------------------------------------- what a program cannot see

class TwoLayers(nn.Module):
    """fc1 (10 -> 16) and fc2 (16 -> 3), the same weights every time; subclasses write ``forward``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(10, 16), nn.Linear(16, 3)


class Scaled(TwoLayers):
    """A plain attribute, a tensor attribute and a module-level tensor enter the forward."""

    def __init__(self):
        super().__init__()
        self.scale = 0.5
        self.shift = torch.zeros(16)  # not a buffer

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x) * self.scale + self.shift) + OFFSET)


OFFSET = torch.zeros(16)


def _replayed_then(explainer, model, x, change):
    _warm(explainer, x)
    before = explainer(x)
    assert explainer.calls["replayed"] == 1
    change()
    for _ in range(3):  # recorded anew (or explained eagerly) and replayed again: each as explain
        after = explainer(x)
        _same(after, lrp.explain(model, x))
    assert not torch.equal(after.relevance, before.relevance)


@pytest.mark.parametrize("change", ["plain attribute", "tensor attribute replaced", "tensor attribute in place",
                                    "module-level tensor in place", "module-level tensor's data replaced",
                                    "hook added", "module replaced", "rule registered"])
def test_changes_the_program_cannot_see_are_noticed(change):
    model, x = Scaled().double().eval(), _features()
    OFFSET.zero_()
    explainer = lrp.Explainer(model)

    class Doubling(nn.Module):
        def forward(self, h):
            return 2 * h

    def apply():
        if change == "plain attribute":
            model.scale = 2.0
        elif change == "tensor attribute replaced":
            model.shift = torch.linspace(-1, 1, 16, dtype=torch.float64)
        elif change == "tensor attribute in place":
            model.shift.data.add_(torch.linspace(-1, 1, 16, dtype=torch.float64))  # no version bump
        elif change == "module-level tensor in place":
            OFFSET.add_(torch.linspace(-1, 1, 16))
        elif change == "module-level tensor's data replaced":
            OFFSET.data = torch.linspace(-1, 1, 16)  # other memory, no version bump
        elif change == "hook added":
            model.fc1.register_forward_hook(lambda m, i, o: o * torch.linspace(0, 2, 16, dtype=o.dtype))
        elif change == "module replaced":
            torch.manual_seed(1)
            model.fc2 = nn.Linear(16, 3).double()
        else:  # a module rule for the Linear layers' type: Gradient instead of their layer rules
            lrp.register_module_rule(Doubling, lrp.rules.Pass())
            model.fc1 = nn.Sequential(model.fc1, Doubling())

    try:
        _replayed_then(explainer, model, x, apply)
    finally:
        OFFSET.zero_()
        lrp.composites._MODULE_RULES.pop(Doubling, None)


def test_weights_changed_in_place_are_read_on_every_replay():
    model, x = Net().double().eval(), _image()
    explainer = lrp.Explainer(model, lrp.composite("epsilon-gamma-box", **BOUNDS))
    _warm(explainer, x)
    for k in range(3):
        with torch.no_grad():
            model.conv1.weight.data.mul_(-1.3)  # through .data: no version bump; the hash sees it
            model.bn.running_var.add_(0.1 * k)
        _same(explainer(x), lrp.explain(model, x, composite=lrp.composite("epsilon-gamma-box", **BOUNDS)))
    assert explainer.calls["replayed"] == 3


class Branches(nn.Module):
    """Another layer for each sign of the input's mean: ``if`` on a tensor."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.wide, self.narrow, self.head = nn.Linear(10, 16), nn.Linear(16, 16), nn.Linear(16, 16), \
            nn.Linear(16, 3)

    def forward(self, x):
        h = F.relu(self.fc(x))
        h = self.wide(h) if x.mean() > 0 else self.narrow(h)
        return self.head(F.relu(h))


class ReadsAList(TwoLayers):
    """Reads values with ``.tolist()``, which goes past torch's dispatcher (a tracer alone would not see it)."""

    def forward(self, x):
        h = F.relu(self.fc1(x))
        scale = 2.0 if sum(x.sum(1).tolist()) > 0 else 0.5
        return self.fc2(h) * scale


@pytest.mark.parametrize("model, calls", [
    (Branches(), {"eager": 3, "recorded": 1, "replayed": 2}),  # eager: the first call and both with -1
    (ReadsAList(), {"eager": 5, "recorded": 1}),  # the values themselves are read: they differ every call
], ids=["if on a tensor", "tolist"])
def test_values_read_into_python_are_guards(model, calls):
    """The program repeats the branch it was recorded with: replayed while the values read agree with the
    recording, explained eagerly when they do not (never with the values of the recording)."""
    model = model.double().eval()
    explainer = lrp.Explainer(model)
    signs = [1, 1, 1, -1, 1, -1]
    for k, sign in enumerate(signs):
        x = (_varied(_features(), k) + 0.5).abs() * sign  # every feature of the sign: the mean and sums have it
        _same(explainer(x), lrp.explain(model, x))
    assert explainer.calls == calls


class ReadsAValue(TwoLayers):
    def forward(self, x):
        h = F.relu(self.fc1(x))
        return self.fc2(h) * (1.0 + 0.01 * h.sum().item())


class SelectsByValue(TwoLayers):
    """Keeps the features active anywhere in the batch: a shape that depends on values."""

    def forward(self, x):
        h = F.relu(self.fc1(x))
        keep = torch.nonzero(h.detach().amax(0) > 0).squeeze(1)
        return self.fc2(h) + h.index_select(1, keep).sum(1, keepdim=True)


@pytest.mark.parametrize("model, reason", [(ReadsAValue(), "in 3 calls"),
                                           (SelectsByValue(), "depends on the data")], ids=["item", "nonzero"])
def test_values_that_change_every_call_or_shapes_from_values_are_not_replayed(model, reason):
    model = model.double().eval()
    explainer = lrp.Explainer(model)
    for seed in range(6):
        x = _varied(_features(), seed)
        _same(explainer(x), lrp.explain(model, x))
    assert explainer.calls["replayed"] == 0
    assert reason in explainer.why_not_replayed


def test_the_reason_names_the_read_that_differed():
    """After three discarded replays the reason says which read differed, where, and both values."""
    import inspect

    model = Branches().double().eval()
    explainer = lrp.Explainer(model)
    for k, sign in enumerate([1, 1, 1, -1, -1, -1, 1]):
        explainer((_varied(_features(), k) + 0.5).abs() * sign)
    line = inspect.getsourcelines(Branches.forward)[1] + 2  # the line of the ``if``
    assert explainer.why_not_replayed.endswith(
        f"in 3 calls; the last time the value read at test_replay.py:{line} in forward was True when recorded, "
        f"False now")
    engine = lrp.Explainer(Net().double().eval(), "epsilon-plus")  # z+ at the pixels: the engine reads their signs
    for k in range(6):
        engine(_varied(_image(), k).abs() * (1 if k < 3 else -1))
    assert "the value read at lrp/rules.py:" in engine.why_not_replayed
    assert "in has_negative_input was False when recorded, True now" in engine.why_not_replayed


def test_autocast_records_anew():
    model, x = Net().eval(), _image().float()
    explainer = lrp.Explainer(model)
    _warm(explainer, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(3):
            res = explainer(x)
            _same(res, lrp.explain(model, x))
    assert res.output.dtype == torch.bfloat16
    _same(explainer(x), lrp.explain(model, x))  # the float32 program again
    assert explainer.calls["replayed"] == 2


def test_input_shapes_and_the_number_of_programs_kept():
    model = Net().double().eval()
    explainer = lrp.Explainer(model, programs=2)
    shapes = [(2, 3, 8, 8), (1, 3, 8, 8), (3, 3, 12, 12)]
    for _ in range(3):
        for shape in shapes:
            x = torch.randn(shape, dtype=torch.float64)
            _same(explainer(x), lrp.explain(model, x))
            assert len(explainer._programs) <= 2
    channels_last = torch.randn(2, 3, 8, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    for _ in range(3):
        _same(explainer(channels_last), lrp.explain(model, channels_last))
    explainer.clear()
    assert not explainer._programs
    with pytest.raises(ValueError, match="programs"):
        lrp.Explainer(model, programs=0)


def test_programs_of_other_batch_sizes_share_the_weight_derived_tensors():
    """A dataset's last, smaller batch gets a program of its own, but not a second copy of ``W+`` and the merged
    BatchNorms: both programs use one set, built again for both when the weights change."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=7).double().eval()
    comp = lrp.composite("epsilon-gamma-box", **BOUNDS)
    explainer = lrp.Explainer(model, comp)
    batches = [torch.randn(n, 3, 32, 32, dtype=torch.float64) for n in (4, 1)]

    def kept_sets():
        state = explainer._state.tensors
        return [r.program._folded(state) for r in explainer._programs.values()]

    for _ in range(3):
        for x in batches:
            _same(explainer(x), lrp.explain(model, x, composite=comp))
    assert explainer.calls["replayed"] == 2
    first, second = kept_sets()
    assert len(first) > 20 and all(a is b for a, b in zip(first, second))
    with torch.no_grad():
        model.conv1.weight.mul_(0.5)
    for x in batches:
        _same(explainer(x), lrp.explain(model, x, composite=comp))
    first_after, second_after = kept_sets()
    assert all(a is b for a, b in zip(first_after, second_after)) and first_after[0] is not first[0]
    explainer.clear()
    assert not explainer.kept._sets


class Counting(TwoLayers):
    """Adds up what it has seen in a buffer, in place, on every forward (and reads the buffer)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros(16))

    def forward(self, x):
        h = F.relu(self.fc1(x))
        self.seen.add_(h.detach().mean(0))
        return self.fc2(h * (1 + self.seen.tanh()))


def test_a_buffer_written_in_forward_is_written_by_every_replay():
    model, twin = Counting().double().eval(), Counting().double().eval()
    explainer = lrp.Explainer(model)
    for seed in range(4):
        x = _varied(_features(), seed)
        _same(explainer(x), lrp.explain(twin, x))
        torch.testing.assert_close(model.seen, twin.seen, rtol=0, atol=0)
    assert explainer.calls["replayed"] == 2


def test_dropout_draws_as_the_eager_call_draws():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3)).double().train()
    explainer = lrp.Explainer(model, eval_mode=False)
    results = []
    for seed in range(4):
        torch.manual_seed(seed)
        res = explainer(_features())
        torch.manual_seed(seed)
        _same(res, lrp.explain(model, _features(), eval_mode=False))
        results.append(res.relevance)
    assert explainer.calls["replayed"] == 2
    assert not torch.equal(results[2], results[3])  # a new draw on every replay, not one kept
    model.eval()  # with eval_mode=False the modes are the model's: a change records anew
    for _ in range(3):
        _same(explainer(_features()), lrp.explain(model, _features(), eval_mode=False))
    assert explainer.calls["replayed"] == 3


@pytest.mark.parametrize("warm", [True, False], ids=["replays", "first calls and recordings"])
def test_calls_from_several_threads(warm):
    model = Net().double().eval()
    explainer = lrp.Explainer(model)
    if warm:
        _warm(explainer, _image())
    inputs = [_varied(_image(), seed) for seed in range(8)]
    results: dict[int, list[lrp.Explanation]] = {}

    def work(k):
        results[k] = [explainer(inputs[k]) for _ in range(3)]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, x in enumerate(inputs):
        for res in results[k]:
            _same(res, lrp.explain(model, x))
    assert sum(explainer.calls.values()) == 24 + 2 * warm
    if warm:  # cold, how many calls replay depends on when the one recording ends: only the results are checked
        assert explainer.calls["replayed"] == 24


def test_replay_off():
    model = Net().double().eval()
    explainer = lrp.Explainer(model, replay=False)
    for _ in range(3):
        _same(explainer(_image()), lrp.explain(model, _image()))
    assert explainer.calls == {"eager": 3}


# ----------------------------------------------------------------------------- regressions found in review

class WrittenAfterMatmul(nn.Module):
    """A tensor computed from weights alone, then written in place (through ``_unsafe_view``, ``unbind``)."""

    def __init__(self, how):
        super().__init__()
        torch.manual_seed(0)
        self.how = how
        self.pos, self.proj = nn.Parameter(torch.randn(2, 6)), nn.Parameter(torch.randn(6, 6))
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        if self.how == "matmul":
            p = (self.pos[None] @ self.proj)[0]  # view, mm, _unsafe_view
            p.mul_(0.5)
            return self.fc(x + p.sum(0))
        a, b = (self.pos * 2).unbind(0)
        a.add_(1.0)
        return self.fc(x * a + b)


@pytest.mark.parametrize("how", ["matmul", "unbind"])
def test_a_weight_derived_tensor_written_in_place_is_computed_anew_every_call(how):
    model = WrittenAfterMatmul(how).double().eval()
    explainer = lrp.Explainer(model, "epsilon")
    for seed in range(5):
        x = _varied(_features(6)[:, :6], seed)
        _same(explainer(x), lrp.explain(model, x, composite="epsilon"))
    assert explainer.calls["replayed"] == 3


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(10, 3), nn.Linear(10, 3)

    def forward(self, x, y):
        return self.a(x) + self.b(y)


def test_the_same_tensor_given_twice_is_not_one_input_of_the_program():
    model, x = TwoInputs().double().eval(), _features()
    explainer = lrp.Explainer(model)
    _warm(explainer, (x, x))
    for seed in range(3):
        pair = (x, _varied(x, seed))
        _same(explainer(pair), lrp.explain(model, pair))  # another kind of call: the last one replayed
    z = _varied(x, 7)
    _same(explainer((z, z)), lrp.explain(model, (z, z)))  # the program recorded with one tensor twice
    assert explainer.calls["replayed"] == 2


class SplitByBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(10, 3)
        self.register_buffer("cut", torch.tensor([3]))

    def forward(self, x):
        left, right = torch.tensor_split(x, self.cut, dim=1)
        return self.fc(torch.cat([left * 2, right], 1))


def test_split_points_read_from_a_buffer_are_guards():
    model, x = SplitByBuffer().double().eval(), _features()
    explainer = lrp.Explainer(model)
    _warm(explainer, x)
    _same(explainer(x), lrp.explain(model, x))
    assert explainer.calls["replayed"] == 1
    model.cut.fill_(6)
    for _ in range(2):
        _same(explainer(x), lrp.explain(model, x))


@pytest.mark.parametrize("change", ["sign flip through .data", "equal values through .data"])
def test_writes_that_keep_the_xor_of_the_bits_are_seen(change):
    model, x = Net().double().eval(), _image()
    explainer = lrp.Explainer(model, lrp.composite("epsilon-gamma-box", **BOUNDS))
    _warm(explainer, x)
    if change == "sign flip through .data":
        model.conv1.weight.data.neg_()  # an even number of elements: the XOR of their bits is unchanged
    else:
        model.bn.weight.data.fill_(1.0)
        model.bn.running_var.data.fill_(4.0)  # 6 equal values over 6 equal values: XOR 0 before and after
    _same(explainer(x), lrp.explain(model, x, composite=lrp.composite("epsilon-gamma-box", **BOUNDS)))
    assert explainer.calls["replayed"] == 1


class CastsToWeights(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 5)

    def forward(self, x):
        x = x.to(self.conv.weight.dtype)
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("convert", ["double", "channels_last"])
def test_a_model_converted_in_place_records_anew(convert):
    model, x = CastsToWeights().eval(), _image().float()
    explainer = lrp.Explainer(model)
    _warm(explainer, x)
    model.double() if convert == "double" else model.to(memory_format=torch.channels_last)
    for _ in range(3):
        _same(explainer(x), lrp.explain(model, x))
    assert explainer.calls["replayed"] >= 1


class ClampsUnknownIds(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.fc = nn.Embedding(10, 6), nn.Linear(6, 3)

    def forward(self, ids):
        if (ids >= 10).any():  # unknown tokens: the last id
            ids = ids.clamp(max=9)
        return self.fc(self.emb(ids).mean(1))


def test_a_replay_that_fails_before_its_guards_are_compared_is_explained_eagerly():
    model = ClampsUnknownIds().eval()
    explainer = lrp.Explainer(model, "epsilon")
    ok, unknown = torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([[1, 2, 30], [4, 5, 6]])
    _warm(explainer, ok)
    _same(explainer(unknown), lrp.explain(model, unknown, composite="epsilon"))


class CountsCalls(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 3)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        with torch.no_grad():
            self.seen.add_(1)
        return self.fc(x)


def test_a_discarded_replay_leaves_the_buffers_it_wrote_as_they_were():
    model, twin = CountsCalls().eval(), CountsCalls().eval()
    comp = lrp.Composite(default=lrp.rules.ZPlus())  # reads whether the input has a negative element
    explainer = lrp.Explainer(model, comp)
    g = torch.Generator().manual_seed(0)
    for x in [torch.rand(4, 6, generator=g) for _ in range(3)] + [torch.randn(4, 6, generator=g)]:
        _same(explainer(x), lrp.explain(twin, x, composite=comp))
    assert model.seen.item() == twin.seen.item() == 4
    assert explainer.calls == {"eager": 2, "recorded": 1, "replayed": 1}


class SignRule(lrp.rules.ModuleRule):
    """A rule of the user's that reads a value with ``.tolist()`` in the backward."""

    def relevance(self, inputs, output, relevance):
        return relevance * (1.0 if relevance.sum().tolist() > 0 else 0.5)


class Act(nn.Module):
    def forward(self, x):
        return torch.relu(x)


def test_values_a_rule_of_the_user_reads_in_the_backward_are_guards():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 6), Act(), nn.Linear(6, 3)).double().eval()
    comp = lrp.Composite(module_rules={Act: SignRule()})
    explainer = lrp.Explainer(model, comp)
    for k in range(8):
        x = _varied(_features(), k) * (1 if k % 2 else 5)
        for target in (0, 1):
            _same(explainer(x, target), lrp.explain(model, x, target, comp))


class ScaledByClass(nn.Module):
    k = 1.0

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(10, 3)

    def forward(self, x):
        return self.fc(x) * self.k


def test_class_attributes_and_a_patched_forward_are_seen():
    model, x = ScaledByClass().double().eval(), _features()
    explainer = lrp.Explainer(model)
    _warm(explainer, x)
    try:
        ScaledByClass.k = 2.0
        for _ in range(3):
            _same(explainer(x), lrp.explain(model, x))
        ScaledByClass.forward = lambda self, x: self.fc(-x)
        for _ in range(3):
            _same(explainer(x), lrp.explain(model, x))
    finally:
        ScaledByClass.k = 1.0
        del ScaledByClass.forward
        ScaledByClass.forward = lambda self, x: self.fc(x) * self.k


class Shifted(nn.Module):
    """A base class whose attribute and method its subclass uses."""
    shift = 0.0

    def act(self, h):
        return torch.relu(h + self.shift)


class ShiftedNet(Shifted):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(10, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize("change", ["base class attribute", "base class method"])
def test_what_a_base_class_defines_is_seen(change):
    model, x = ShiftedNet().double().eval(), _features()
    explainer = lrp.Explainer(model)

    def apply():
        if change == "base class attribute":
            Shifted.shift = -0.5
        else:
            Shifted.act = lambda self, h: torch.relu(-h)

    try:
        _replayed_then(explainer, model, x, apply)
    finally:
        Shifted.shift = 0.0
        Shifted.act = lambda self, h: torch.relu(h + self.shift)


class ScaledEpsilon(lrp.rules.Epsilon):
    """A rule of the user's whose backward reads an attribute of its class."""
    scale = 1.0

    def backward(self, ctx, g, R):
        return super().backward(ctx, g, R) * self.scale


def test_what_a_rule_class_defines_is_seen():
    model, x = Net().double().eval(), _image()
    composite = lrp.Composite(default=ScaledEpsilon())
    explainer = lrp.Explainer(model, composite)
    _warm(explainer, x)
    before = explainer(x)
    assert explainer.calls["replayed"] == 1
    try:
        ScaledEpsilon.scale = 10.0
        for _ in range(3):
            after = explainer(x)
            _same(after, lrp.explain(model, x, composite=composite))
    finally:
        ScaledEpsilon.scale = 1.0
    assert not torch.equal(after.relevance, before.relevance)


def test_tensor_bounds_changed_in_place_are_read_on_every_replay():
    model, x = Net().double().eval(), _image()
    low, high = torch.full((3, 1, 1), -3.0, dtype=torch.float64), torch.full((3, 1, 1), 3.0, dtype=torch.float64)
    composite = lrp.composite("epsilon-gamma-box", low=low, high=high)
    explainer = lrp.Explainer(model, composite)
    _warm(explainer, x)
    for k in range(4):
        low.mul_(1.5)  # the rule's repr shows their shape, not their values: no guard on them
        _same(explainer(x), lrp.explain(model, x, composite=composite))
    assert explainer.calls["replayed"] == 4, explainer.calls


def test_a_model_error_while_recording_does_not_stop_later_replays():
    class FailsOnce(Net):
        def __init__(self):
            super().__init__()
            self.state = {"fail": False}  # changed in place below: not a change of the model's state

        def forward(self, x):
            if self.state["fail"]:
                raise ValueError("bad batch")
            return super().forward(x)

    model, x = FailsOnce().double().eval(), _image()
    explainer = lrp.Explainer(model)
    explainer(x)
    model.state["fail"] = True
    with pytest.raises(ValueError, match="bad batch"):
        explainer(x)  # the recording call: the model raises under the tracer, and again eagerly
    model.state["fail"] = False
    for _ in range(3):
        _same(explainer(x), lrp.explain(model, x))
    assert explainer.calls["recorded"] == 1 and explainer.calls["replayed"] == 2, explainer.calls
    assert explainer.why_not_replayed is None


def test_an_input_of_a_tensor_subclass_does_not_stop_plain_inputs_from_replaying():
    tv_tensors = pytest.importorskip("torchvision.tv_tensors")
    model, x = Net().double().eval(), _image()
    explainer = lrp.Explainer(model)
    for _ in range(3):  # the tracer does not follow this subclass: its calls are explained eagerly
        _same(explainer(tv_tensors.Image(x)), lrp.explain(model, x))
    for _ in range(3):
        _same(explainer(x), lrp.explain(model, x))
    assert explainer.calls["replayed"] >= 1, explainer.calls


def test_a_model_that_changes_itself_every_call_says_so():
    class Remembers(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(10, 3)

        def forward(self, x):
            self.last = tuple(x.shape)  # a new object every call
            return self.fc(x)

    model = Remembers().double().eval()
    explainer = lrp.Explainer(model)
    for _ in range(4):
        _same(explainer(_features()), lrp.explain(model, _features()))
    assert explainer.calls == {"eager": 4}
    assert "model changed between calls" in explainer.why_not_replayed


def test_a_start_that_is_neither_a_name_nor_a_tensor_is_refused_as_explain_refuses_it():
    explainer = lrp.Explainer(Net().double().eval())
    with pytest.raises(lrp.TargetError):
        explainer(_image(), start=["score"])


# ----------------------------------------------------------------------------- the device lane

@pytest.mark.parametrize("case", ["net, epsilon-gamma-box", "resnet18", "token ids", "if on a tensor"])
def test_replay_on_the_lane_device(device, case):
    """On the device of ``LRP_TEST_DEVICE`` (``make test-gpu``): replays give what ``explain`` gives there, in
    float64 (where kernels may sum in another order from call to call, to 1e-9)."""
    if case == "net, epsilon-gamma-box":
        model, x, comp = Net(), _image(), lrp.composite("epsilon-gamma-box", **BOUNDS)
    elif case == "resnet18":
        torch.manual_seed(0)
        model, x, comp = torchvision.models.resnet18(num_classes=7), torch.randn(2, 3, 32, 32), "epsilon-plus-flat"
    elif case == "token ids":
        model, x, comp = TokenNet(), _ids(), "epsilon"
    else:
        model, x, comp = Branches(), _features(), "epsilon-plus-flat"
    model = model.double().eval().to(device)
    x = (x.double() if x.is_floating_point() else x).to(device)
    explainer = lrp.Explainer(model, comp)
    for seed in range(5):
        xs = _varied(x.cpu(), seed).to(device)
        if case == "if on a tensor" and seed == 4:
            xs = -xs.abs()  # the other branch: explained eagerly
        res, ref = explainer(xs), lrp.explain(model, xs, composite=comp)
        assert res.relevance.device == xs.device
        torch.testing.assert_close(res.relevance, ref.relevance, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(res.output, ref.output, rtol=1e-9, atol=1e-12)
    assert explainer.calls["replayed"] + explainer.calls["graphed"] >= 2


# ----------------------------------------------------------------------------- torch.compile (compile=True)

def _mlp64():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()


def test_compiled_replays_are_close_to_explain():
    """With ``compile=True`` the second replay compiles the program (checked against it); later replays run the
    compiled program, whose relevance is ``explain``'s up to rounding (inductor reorders float work)."""
    model = _mlp64()
    explainer = lrp.Explainer(model, "epsilon", compile=True)
    assert explainer.why_not_compiled == "no call of this kind has been replayed"
    for seed in range(4):
        xs = _varied(_features(), seed)
        _same(explainer(xs), lrp.explain(model, xs, composite="epsilon"))  # eager, recorded, replayed, compiling
    assert explainer.why_not_compiled is None, explainer.why_not_compiled
    program = next(iter(explainer._programs.values())).program
    used = []
    compiled = program.compiled
    program.compiled = lambda *args: used.append(1) or compiled(*args)
    for seed in range(4, 7):
        xs = _varied(_features(), seed)
        res, ref = explainer(xs), lrp.explain(model, xs, composite="epsilon")
        torch.testing.assert_close(res.relevance, ref.relevance, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(res.output, ref.output, rtol=1e-12, atol=1e-12)
        assert torch.equal(res.target, ref.target)
    assert len(used) == 3 and explainer.calls["replayed"] == 5


@pytest.mark.parametrize("trouble", ["fails", "disagrees"])
def test_a_program_that_does_not_compile_well_runs_as_recorded(monkeypatch, trouble):
    def fake_compile(program, **options):
        if trouble == "fails":
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore")
        return lambda *args: [t + 1 if t.is_floating_point() else t for t in program(*args)]

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = _mlp64()
    explainer = lrp.Explainer(model, "epsilon", compile=True)
    for seed in range(6):
        xs = _varied(_features(), seed)
        _same(explainer(xs), lrp.explain(model, xs, composite="epsilon"))
    assert explainer.calls["replayed"] == 4
    if trouble == "fails":
        assert explainer.why_not_compiled == ("torch.compile failed: RuntimeError: InvalidCxxCompiler: No working "
                                              "C++ compiler found")
    else:
        assert explainer.why_not_compiled.startswith("the compiled program disagreed with it: output 0 differs")
    assert lrp.Explainer(model).why_not_compiled == "compile is off (compile=False)"


def test_programs_that_write_buffers_or_draw_are_not_compiled(monkeypatch):
    """Checking a compiled program runs the program twice: a buffer written in ``forward`` would be written
    twice, and random numbers drawn anew."""
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled"))
    counting = Counting().double().eval()
    explainer = lrp.Explainer(counting, "epsilon", compile=True)
    for seed in range(5):
        explainer(_varied(_features(), seed))
    assert explainer.why_not_compiled == "the program writes the model's tensors"
    torch.manual_seed(0)
    dropout = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
    explainer = lrp.Explainer(dropout, "epsilon", eval_mode=False, compile=True)
    for seed in range(5):
        explainer(_varied(_features(), seed).float())
    assert explainer.why_not_compiled == "the program draws random numbers"
