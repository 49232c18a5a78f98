"""Models with several inputs: ``lrp.explain(model, (image, ids))`` gives one relevance per input, conserves over
all of them together, equals gradient x input under LRP-0 on ReLU networks, equals the same function written with
one input, applies pixel rules to the image only, and names the input that is wrong."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import lrp


class ImageAndQuestion(nn.Module):
    """A tiny VQA-like model without biases: a CNN on the image, mean-pooled token embeddings for the question,
    concatenated and classified."""

    def __init__(self, vocab: int = 20, classes: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.embedding = nn.Embedding(vocab, 8)
        self.question = nn.Linear(8, 8, bias=False)
        self.head = nn.Linear(6 * 4 + 8, classes, bias=False)

    def forward(self, image: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        seen = self.pool(torch.relu(self.conv(image))).flatten(1)
        asked = torch.relu(self.question(self.embedding(ids))).mean(1)
        return self.head(torch.cat([seen, asked], 1))


class TwoFloats(nn.Module):
    """f(a, b) = W relu(U [a; b]): the same function as :class:`Concatenated` on ``cat([a, b], 1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(7, 12, bias=False)
        self.out = nn.Linear(12, 3, bias=False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(torch.cat([a, b], 1))))


class Concatenated(nn.Module):
    def __init__(self, two: TwoFloats):
        super().__init__()
        self.two = two

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.two(x[:, :4], x[:, 4:])


@pytest.fixture
def vqa():
    torch.manual_seed(0)
    model = ImageAndQuestion().eval()
    image = torch.randn(3, 3, 8, 8)
    ids = torch.randint(0, 20, (3, 5))
    return model, image, ids


@pytest.mark.parametrize("composite", ["lrp0", "epsilon", "epsilon-plus", "epsilon-alpha2-beta1"])
def test_relevance_of_all_inputs_together_is_conserved(vqa, composite):
    model, image, ids = vqa
    res = lrp.explain(model, (image, ids), composite=composite)
    assert isinstance(res.relevance, tuple) and len(res.relevance) == 2
    r_image, r_ids = res.relevance
    assert r_image.shape == image.shape and r_ids.shape == ids.shape and r_ids.dtype == torch.float32
    total = r_image.sum((1, 2, 3)) + r_ids.sum(1)
    torch.testing.assert_close(total, res.logits.gather(1, res.target[:, None])[:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res.conservation["input"], torch.ones(3), rtol=1e-4, atol=1e-5)
    assert r_image.abs().sum() > 0 and r_ids.abs().sum() > 0  # both inputs get a share


def test_lrp0_is_gradient_times_input_for_each_input(vqa):
    model, image, ids = vqa
    res = lrp.explain(model, (image, ids), composite="lrp0")
    x = image.clone().requires_grad_()
    embedded = model.embedding(ids).detach().requires_grad_()
    seen = model.pool(torch.relu(model.conv(x))).flatten(1)
    asked = torch.relu(model.question(embedded)).mean(1)
    scores = model.head(torch.cat([seen, asked], 1))
    scores.gather(1, res.target[:, None]).sum().backward()
    torch.testing.assert_close(res.relevance[0], (x.grad * image).detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res.relevance[1], (embedded.grad * embedded).sum(-1).detach(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("composite", ["lrp0", "epsilon", "epsilon-plus", "epsilon-alpha2-beta1"])
def test_two_inputs_or_one_concatenated_give_the_same_relevance(composite):
    torch.manual_seed(1)
    two = TwoFloats().eval()
    a, b = torch.randn(4, 4), torch.randn(4, 3)
    res = lrp.explain(two, [a, b], composite=composite, target=1)
    assert isinstance(res.relevance, tuple)
    one = lrp.explain(Concatenated(two), torch.cat([a, b], 1), composite=composite, target=1)
    torch.testing.assert_close(torch.cat(res.relevance, 1), one.relevance, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.logits, one.logits)


def test_pixel_rules_apply_to_the_image_input_only(vqa):
    model, image, ids = vqa
    res = lrp.explain(model, (image, ids), composite="epsilon-plus-flat", record_layers=True)
    assert res.rules["conv"].startswith("Flat")  # the layer that reads the pixels
    assert not res.rules["question"].startswith("Flat")  # the first layer after the embedding reads no pixels
    comp = lrp.composite("epsilon-gamma-box", low=-3.0, high=3.0)
    res = lrp.explain(model, (image, ids), composite=comp)
    assert lrp.explain(model, (image, ids), composite=comp).rules["conv"].startswith("ZBox")
    assert not res.rules["question"].startswith("ZBox")


def test_a_single_input_in_a_tuple_gives_a_tuple_and_the_same_values(vqa):
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(5, 4, bias=False), nn.ReLU(), nn.Linear(4, 3, bias=False)).eval()
    x = torch.randn(2, 5)
    alone = lrp.explain(net, x, composite="epsilon")
    in_tuple = lrp.explain(net, (x,), composite="epsilon")
    assert isinstance(alone.relevance, torch.Tensor) and isinstance(in_tuple.relevance, tuple)
    torch.testing.assert_close(in_tuple.relevance[0], alone.relevance)


def test_the_explainer_takes_several_inputs_too(vqa):
    model, image, ids = vqa
    explainer = lrp.Explainer(model, "epsilon-plus")
    first, again = explainer((image, ids)), explainer((image, ids))
    direct = lrp.explain(model, (image, ids), composite="epsilon-plus")
    for r in (first, again):
        for got, want in zip(r.relevance, direct.relevance):
            torch.testing.assert_close(got, want)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("inputs, message", [
    (lambda image, ids: (image, ids[:2]), r"input 1 of 2 has 2 samples \(shape \(2, 5\)\), input 0 has 3"),
    (lambda image, ids: (image, ids.tolist()), "input 1 of 2 must be a torch.Tensor, got list"),
    (lambda image, ids: (image, ids > 3), "input 1 of 2 must be a floating-point tensor or integer token ids"),
    (lambda image, ids: (), "x is an empty tuple"),
])
def test_errors_name_the_input(vqa, inputs, message):
    model, image, ids = vqa
    with pytest.raises((lrp.LRPError, TypeError), match=message):
        lrp.explain(model, inputs(image, ids))


V = 30  # vocabulary of the id-input models


class TwoQuestions(nn.Module):
    """Two id inputs read by one embedding table, the second one embedded first (call order != input order)."""

    def __init__(self, second_first: bool = True):
        super().__init__()
        self.embedding = nn.Embedding(V, 8)
        self.linear = nn.Linear(8, 8, bias=False)
        self.out = nn.Linear(16, 3, bias=False)
        self.second_first = second_first

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(self.embedding(ids))).mean(1)

    def forward(self, q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.second_first:
            ec = self.encode(c)
            eq = self.encode(q)
        else:
            eq = self.encode(q)
            ec = self.encode(c)
        return self.out(torch.cat([eq, ec], 1))


class Split(nn.Module):
    """The same function on one input: the first ``n`` columns are the first input, the rest the second."""

    def __init__(self, model: nn.Module, n: int):
        super().__init__()
        self.model, self.n = model, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x[:, :self.n], x[:, self.n:])


@pytest.mark.parametrize("second_first", [True, False])
@pytest.mark.parametrize("composite", ["lrp0", "epsilon", "epsilon-plus"])
def test_two_id_inputs_equal_the_same_ids_in_one_input(second_first, composite):
    torch.manual_seed(3)
    model = TwoQuestions(second_first).eval()
    q, c = torch.randint(0, V, (3, 4)), torch.randint(0, V, (3, 6))
    res = lrp.explain(model, (q, c), composite=composite, target=1)
    one = lrp.explain(Split(model, 4), torch.cat([q, c], 1), composite=composite, target=1)
    torch.testing.assert_close(torch.cat(res.relevance, 1), one.relevance, rtol=1e-5, atol=1e-6)
    same = lrp.explain(model, (q, q), composite=composite, target=1)  # one tensor given twice
    both = lrp.explain(Split(model, 4), torch.cat([q, q], 1), composite=composite, target=1)
    torch.testing.assert_close(torch.cat(same.relevance, 1), both.relevance, rtol=1e-5, atol=1e-6)


def test_ids_read_reindexed_and_by_two_tables_go_to_their_positions():
    class Tables(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.e1, self.e2, self.e3 = nn.Embedding(V, 8), nn.Embedding(V, 8), nn.Embedding(V, 8)
            self.out = nn.Linear(8, 3, bias=False)

        def forward(self, q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            h = self.e1(q.flip(1)[:, 1:]).sum(1) + self.e2(c).sum(1) + self.e3(c[:, :2]).sum(1)
            return self.out(torch.relu(h))

    torch.manual_seed(4)
    model = Tables().eval()
    q, c = torch.randint(0, V, (3, 4)), torch.randint(0, V, (3, 6))
    res = lrp.explain(model, (q, c), composite="lrp0", target=0)
    e1 = model.e1(q.flip(1)[:, 1:]).detach().requires_grad_()
    e2 = model.e2(c).detach().requires_grad_()
    e3 = model.e3(c[:, :2]).detach().requires_grad_()
    model.out(torch.relu(e1.sum(1) + e2.sum(1) + e3.sum(1)))[:, 0].sum().backward()
    expected_q = torch.zeros(3, 4)
    expected_q[:, :3] = (e1.grad * e1).sum(-1).detach().flip(1)  # q.flip(1)[:, 1:] holds positions 2, 1, 0
    expected_c = (e2.grad * e2).sum(-1).detach()
    expected_c[:, :2] += (e3.grad * e3).sum(-1).detach()
    torch.testing.assert_close(res.relevance[0], expected_q, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res.relevance[1], expected_c, rtol=1e-4, atol=1e-6)


def test_lrp0_is_gradient_times_input_for_two_float_inputs():
    torch.manual_seed(5)
    two = TwoFloats().eval()
    a, b = torch.randn(4, 4), torch.randn(4, 3)
    res = lrp.explain(two, (a, b), composite="lrp0", target=2)
    ga, gb = a.clone().requires_grad_(), b.clone().requires_grad_()
    two(ga, gb)[:, 2].sum().backward()
    torch.testing.assert_close(res.relevance[0], ga.grad * a, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res.relevance[1], gb.grad * b, rtol=1e-4, atol=1e-6)


class ImageAndVector(nn.Module):
    """An image branch and a vector branch, concatenated: the image's relevance does not depend on whether the
    vector branch is an input or a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.vector = nn.Linear(5, 6, bias=False)
        self.head = nn.Linear(16 + 6, 3, bias=False)

    def seen(self, image: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.conv(image))).flatten(1)

    def forward(self, image: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.seen(image), torch.relu(self.vector(vec))], 1))


class ImageOnly(nn.Module):
    """:class:`ImageAndVector` with the vector branch's output held as a buffer (a constant)."""

    def __init__(self, model: ImageAndVector, vec: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("held", torch.relu(model.vector(vec)).detach())

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.head(torch.cat([self.model.seen(image), self.held], 1))


@pytest.mark.parametrize("composite", ["epsilon", "epsilon-plus-flat", "epsilon-gamma-box", "layered",
                                       "epsilon-alpha2-beta1"])
def test_image_relevance_with_a_vector_input_equals_that_with_the_vector_held_fixed(composite):
    torch.manual_seed(6)
    model = ImageAndVector().eval()
    image, vec = torch.rand(2, 3, 6, 6), torch.randn(2, 5) * 4  # the vector lies far outside the image's [0, 1]
    bounds = {"low": 0.0, "high": 1.0} if composite in ("epsilon-gamma-box", "layered") else {}
    comp = lrp.composite(composite, **bounds)
    res = lrp.explain(model, (image, vec), composite=comp, target=0)
    alone = lrp.explain(ImageOnly(model, vec), image, composite=comp, target=0)
    assert res.rules["conv"] == alone.rules["model.conv"]  # the pixel and first-layer rules: the image's layer
    assert not res.rules["vector"].startswith(("ZBox", "Flat", "WSquare"))  # never the image's input rule
    torch.testing.assert_close(res.relevance[0], alone.relevance, rtol=1e-4, atol=1e-6)
    if composite != "layered":  # (its epsilon of 0.25 in the middle layers absorbs relevance)
        total = res.relevance[0].sum((1, 2, 3)) + res.relevance[1].sum(1)  # no biases: conserved over both inputs
        torch.testing.assert_close(total, res.logits[:, 0], rtol=1e-3, atol=1e-5)


def test_an_integer_input_no_embedding_reads_is_held_fixed():
    class Masked(nn.Module):  # token ids and an attention mask, as Hugging Face models take them
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(V, 8)
            self.out = nn.Linear(8, 2, bias=False)

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.out((self.embedding(ids) * mask[..., None]).sum(1))

    torch.manual_seed(7)
    model = Masked().eval()
    ids, mask = torch.randint(0, V, (2, 5)), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    res = lrp.explain(model, (ids, mask), composite="epsilon", target=1)
    assert torch.count_nonzero(res.relevance[1]) == 0  # the mask is a constant
    assert torch.count_nonzero(res.relevance[0][0, 3:]) == 0 and res.relevance[0][0, :3].abs().sum() > 0
    torch.testing.assert_close(res.relevance[0].sum(1), res.logits[:, 1], rtol=1e-4, atol=1e-5)


def test_an_id_input_read_by_embeddings_of_two_dtypes():
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.e32, self.e64 = nn.Embedding(V, 4), nn.Embedding(V, 4).double()
            self.out = nn.Linear(4, 2, bias=False)

        def forward(self, ids: torch.Tensor, ids2: torch.Tensor) -> torch.Tensor:
            return self.out(self.e32(ids).sum(1) + self.e64(ids2).sum(1).float())

    torch.manual_seed(8)
    ids = torch.randint(0, V, (2, 3))
    res = lrp.explain(Mixed().eval(), (ids, ids), composite="epsilon")
    assert all(torch.isfinite(r).all() for r in res.relevance)


def test_a_failing_model_gets_its_own_error_not_one_about_token_ids(vqa):
    model, image, ids = vqa
    with pytest.raises(RuntimeError, match="channels") as info:
        lrp.explain(model, (image[:, :2], ids))  # two channels for a three-channel conv
    assert "token ids" not in str(info.value)


def test_pictures_refuse_a_tuple_of_relevances_with_the_way_out(vqa):
    model, image, ids = vqa
    res = lrp.explain(model, (image, ids))
    with pytest.raises(TypeError, match=r"one tensor per input; draw each on its own"):
        lrp.heatmap(res.relevance)
    assert lrp.heatmap(res.relevance[0][0]).size == (8, 8)


def test_evaluation_methods_refuse_several_inputs_with_the_way_out(vqa):
    from lrp.evaluate.methods import resolve_method

    model, image, ids = vqa
    for name in ("gradient", "epsilon"):
        with pytest.raises(TypeError, match="lrp.evaluate scores models with one input; got 2 inputs"):
            resolve_method(name)(model, (image, ids), None)
