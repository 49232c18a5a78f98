"""Token deletion for text models (lrp.evaluate.tokens) and the spam model's report (lrp.evaluate.text_report):
known answers on hand-made models, identities on SpamNet, a tiny report."""

import copy
import csv
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import lrp
from lrp.evaluate import tokens as T

PAD = 0


class Bag(nn.Module):
    """Score s = sum of the tokens' values v[id] (v[pad] = 0); logits (-s, s). A token's contribution is its
    value, and gradient x input on the one-dimensional embedding is exactly that."""

    def __init__(self, values):
        super().__init__()
        self.embedding = nn.Embedding(len(values), 1, padding_idx=PAD)
        with torch.no_grad():
            self.embedding.weight[:, 0] = torch.tensor(values, dtype=torch.float32)

    def forward(self, ids):
        s = self.embedding(ids)[..., 0].sum(1)
        return torch.stack([-s, s], 1)


class Positional(Bag):
    """s = sum_p (p + 1) v[id_p]: where a token stands matters."""

    def forward(self, ids):
        weights = torch.arange(1, ids.shape[1] + 1, dtype=torch.float32, device=ids.device)
        s = (self.embedding(ids)[..., 0] * weights).sum(1)
        return torch.stack([-s, s], 1)


class Curved(nn.Module):
    """A non-linear model with a bias, so f(zero embedding) != 0 and integrated gradients is not gradient x
    input."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.embedding = nn.Embedding(20, 6, padding_idx=PAD)
        with torch.no_grad():
            self.embedding.weight[1:] = torch.randn(19, 6, generator=gen)
        self.hidden = nn.Linear(6, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, ids):
        return self.out(torch.tanh(self.hidden(self.embedding(ids)).mean(1)))


VALUES = [0.0, 1.0, 2.0, 3.0, 4.0, -1.0, -2.0, 0.5]


def test_aopc_known_answer_on_a_bag_of_tokens(device):
    model = Bag(VALUES).to(device)
    ids = torch.tensor([[3, 1, 4, 2, PAD, PAD]], device=device)  # contributions 3, 1, 4, 2: score 10, class 1
    relevance = T.gradient_x_input(model, ids)
    assert torch.allclose(relevance.cpu(), torch.tensor([[3.0, 1.0, 4.0, 2.0, 0.0, 0.0]]))
    for removal in T.REMOVALS:  # order does not matter to a bag of tokens: both removals agree
        morf = T.token_deletion_curve(model, ids, relevance, order="morf", steps=4, removal=removal)
        lerf = T.token_deletion_curve(model, ids, relevance, order="lerf", steps=4, removal=removal)
        assert morf.target.tolist() == [1]
        np.testing.assert_allclose(morf.scores[0], [10, 6, 3, 1, 0])  # 4, then 3, 2, 1 removed
        np.testing.assert_allclose(lerf.scores[0], [10, 9, 7, 4, 0])
        assert morf.aopc[0] == pytest.approx((0 + 4 + 7 + 9 + 10) / 5)  # 6.0
        assert lerf.aopc[0] == pytest.approx((0 + 1 + 3 + 6 + 10) / 5)  # 4.0
        np.testing.assert_allclose(morf.fractions, [0, 0.25, 0.5, 0.75, 1])
        assert morf.auc[0] == pytest.approx(0.25 * (10 + 6 + 6 + 3 + 3 + 1 + 1 + 0) / 2)


def test_steps_split_each_texts_real_tokens():
    model = Bag(VALUES)
    ids = torch.tensor([[3, 1, 4, PAD, PAD], [2, 2, 2, 2, 1]])  # 3 and 5 real tokens
    curve = T.token_deletion_curve(model, ids, T.gradient_x_input(model, ids), order="morf", steps=4)
    # round(k * n / 4), half to even: n = 3 -> 0, 1, 2, 2, 3; n = 5 -> 0, 1, 2, 4, 5
    assert curve.removed.tolist() == [[0, 1, 2, 2, 3], [0, 1, 2, 4, 5]]
    np.testing.assert_allclose(curve.scores[0], [8, 4, 1, 1, 0])
    np.testing.assert_allclose(curve.scores[1], [9, 7, 5, 1, 0])
    # relevance on padding is ignored: padding is never removed, so a huge value there changes nothing
    loud = T.gradient_x_input(model, ids)
    loud[0, 3:] = 100.0
    again = T.token_deletion_curve(model, ids, loud, order="morf", steps=4)
    np.testing.assert_allclose(again.scores, curve.scores)


def test_morf_beats_random_beats_lerf_with_true_contributions():
    model = Bag(VALUES)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, len(VALUES), (40, 12), generator=gen)
    ids[torch.arange(40), torch.randint(4, 12, (40,), generator=gen)] = PAD  # some texts shorter
    ids = torch.where(torch.cumsum(ids == PAD, 1) > 0, torch.zeros_like(ids), ids)  # right-padded
    truth = T.gradient_x_input(model, ids)
    aopc = {}
    for name, relevance in {"truth": truth, "random": T.random(model, ids, seed=3)}.items():
        for order in T.ORDERS:
            aopc[name, order] = T.token_deletion_curve(model, ids, relevance, order=order, steps=5).aopc
    # per text: removing the k largest contributions lowers the score most, the k smallest least
    assert np.all(aopc["truth", "morf"] >= aopc["random", "morf"] - 1e-9)
    assert np.all(aopc["random", "morf"] >= aopc["truth", "lerf"] - 1e-9)
    assert aopc["truth", "morf"].mean() > aopc["random", "morf"].mean() > aopc["truth", "lerf"].mean()


def test_occlusion_removes_exactly_a_words_contribution(device):
    model = Bag(VALUES).to(device)
    ids = torch.tensor([[3, 1, 7, 4, 2, PAD], [5, 6, 1, PAD, PAD, PAD]], device=device)
    words = [[0, 0, None, 1, 1], [0, 1, 2]]
    relevance = T.occlusion(model, ids, torch.tensor([1, 0]), words=words)  # the target on the CPU
    assert relevance.device == ids.device
    # text 0, class 1: word 0 = 3 + 1 -> 2 each; white space 0; word 1 = 4 + 2 -> 3 each
    # text 1, class 0 (score -s): dropping a token of value v changes -s by +v, so its relevance is -v
    expected = torch.tensor([[2.0, 2.0, 0.0, 3.0, 3.0, 0.0], [1.0, 2.0, -1.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(relevance.cpu(), expected)
    # without words, each token is its own word: occlusion = the contributions
    single = T.occlusion(model, ids, torch.tensor([1, 1]), batch_size=3)
    assert torch.allclose(single, T.gradient_x_input(model, ids, torch.tensor([1, 1])))


def test_mask_keeps_positions_delete_closes_the_gap(device):
    ids = torch.tensor([[5, 6, 7, 8, PAD]])
    removed = torch.tensor([[False, True, False, True, False]])
    assert T.remove_tokens(ids, removed, "mask").tolist() == [[5, 0, 7, 0, 0]]
    assert T.remove_tokens(ids, removed, "delete").tolist() == [[5, 7, 0, 0, 0]]
    with pytest.raises(ValueError, match="removal"):
        T.remove_tokens(ids, removed, "drop")

    model = Positional([0.0, 1.0, 2.0, 3.0]).to(device)
    ids = torch.tensor([[1, 2, 3, PAD]], device=device)  # s = 1*1 + 2*2 + 3*3 = 14
    first_first = torch.tensor([[3.0, 2.0, 1.0, 0.0]])  # on the CPU; MoRF removes position 0, then 1, then 2
    mask = T.token_deletion_curve(model, ids, first_first, steps=3, removal="mask")
    delete = T.token_deletion_curve(model, ids, first_first, steps=3, removal="delete")
    np.testing.assert_allclose(mask.scores[0], [14, 2 * 2 + 3 * 3, 3 * 3, 0])
    np.testing.assert_allclose(delete.scores[0], [14, 1 * 2 + 2 * 3, 1 * 3, 0])  # the rest moved left
    # trimming trailing padding does not change anything for a model that ignores padding
    full = T.token_deletion_curve(model, ids, first_first, steps=3, removal="delete", trim=False)
    np.testing.assert_allclose(full.scores, delete.scores)


def test_integrated_gradients_completeness():
    model = Curved().eval()
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 20, (3, 7), generator=gen)
    target = torch.tensor([0, 1, 1])
    ig = T.integrated_gradients(model, ids, target, steps=128, batch_size=32)
    with torch.no_grad():
        f = model(ids).gather(1, target[:, None])[:, 0]
        baseline = model.out(torch.tanh(model.hidden(torch.zeros(3, 7, 6)).mean(1))).gather(1, target[:, None])[:, 0]
    assert torch.allclose(ig.sum(1), f - baseline, atol=1e-4)
    # and it is not gradient x input here (the model is not homogeneous)
    assert not torch.allclose(ig, T.gradient_x_input(model, ids, target), atol=1e-3)
    sal = T.gradient(model, ids, target)
    assert bool((sal >= 0).all()) and sal.shape == ids.shape


@pytest.fixture(scope="module")
def spam_batch():
    from lrp import models, spam
    model, tokenizer = models.spam()
    mails = spam.spam_heldout()
    ids, encoded = spam.encode_batch([mails[k].text for k in (0, 400, 800, 1100)], tokenizer)
    return model, ids[:, :160], encoded


def test_spam_gradient_x_input_is_lrp0_and_integrated_gradients(spam_batch, device):
    model, ids, _ = spam_batch
    model, ids = copy.deepcopy(model).to(device), ids.to(device)
    if device.type != "cpu":  # identities checked in float64 there: CUDA runs float32 convolutions in TF32
        model = model.double()
    target = model(ids).argmax(1)
    gxi = T.gradient_x_input(model, ids, target)
    lrp0 = lrp.explain(model, ids, target, composite="lrp0").relevance
    scale = float(gxi.abs().max())
    assert torch.allclose(gxi, lrp0, atol=1e-5 * scale)
    assert torch.allclose(T.lrp_relevance(model, ids, target, "epsilon"), lrp0, atol=1e-4 * scale)
    # a bias-free ReLU network is positively homogeneous: integrated gradients from 0 = gradient x input
    assert torch.allclose(T.integrated_gradients(model, ids, target, steps=4), gxi, atol=1e-5 * scale)
    assert (gxi[ids == PAD] == 0).all()
    with pytest.raises(lrp.errors.LRPError, match="z\\^B"):
        T.resolve_text_method("epsilon-gamma-box")(model, ids, target)


def test_tiny_spam_report(tmp_path):
    from lrp.evaluate.text_report import run_spam
    asked = ["epsilon", "gradient", "occlusion", "random"]
    path = run_spam(tmp_path, limit=4, steps=4, methods=asked, log=lambda _: None)
    report = path.read_text(encoding="utf-8")
    assert path == tmp_path / "report.md" and "**Verdict** (4 held-out mails" in report
    with open(tmp_path / "results.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert sorted({r["method"] for r in rows}) == sorted(asked)
    assert sorted((r["method"], r["removal"]) for r in rows) == sorted((m, r) for m in asked for r in T.REMOVALS)
    for row in rows:
        for key in ("aopc_morf", "aopc_lerf", "auc_morf", "auc_lerf", "abpc", "ms_per_sample"):
            assert math.isfinite(float(row[key])), (row["method"], key)
    for removal in T.REMOVALS:
        for order in T.ORDERS:
            assert (tmp_path / f"curves_{removal}_{order}.png").stat().st_size > 1000
