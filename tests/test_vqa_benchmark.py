"""The baselines on models with several inputs (exact invariants on tiny models), and ``lrp evaluate --benchmark
shapes-vqa`` (the Shapes VQA localisation benchmark) on a few held-out questions."""

from __future__ import annotations

import csv
import io
import re
import shlex
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from lrp import baselines
from lrp.cli import main
from lrp.evaluate.methods import EVALUATE_COMPOSITES
from lrp.errors import LRPError


class ImageAndIds(nn.Module):
    """An image ``(N, 2, 4, 4)`` and token ids ``(N, 3)`` -> 4 scores; smooth, with the two inputs multiplied."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.embedding = nn.Embedding(5, 3)
        self.out = nn.Linear(3, 4)

    def forward(self, image: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(image)).mean((2, 3))
        return self.out(h * self.embedding(ids).sum(1) + h)


class TwoFloats(nn.Module):
    """Two float inputs, ``(N, 1, 2, 2)`` and ``(N, 4)`` -> 3 scores."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.a(a.flatten(1))) * self.b(b) + self.b(b) ** 2


@pytest.fixture
def image_and_ids():
    torch.manual_seed(2)
    return ImageAndIds().eval(), torch.rand(3, 2, 4, 4), torch.tensor([[1, 2, 3], [0, 4, 1], [2, 2, 2]])


def _autograd(model: nn.Module, inputs: tuple, target: torch.Tensor) -> list:
    leaves = [t.clone().requires_grad_(True) if t.is_floating_point() else t for t in inputs]
    score = model(*leaves).gather(1, target[:, None]).sum()
    return list(torch.autograd.grad(score, [t for t in leaves if t.is_floating_point()]))


def test_gradients_of_each_float_input_and_zeros_for_ids(image_and_ids):
    model, x, ids = image_and_ids
    target = model(x, ids).argmax(1)
    (g,) = _autograd(model, (x, ids), target)
    res = baselines.gradient(model, (x, ids))
    assert isinstance(res.relevance, tuple) and len(res.relevance) == 2
    torch.testing.assert_close(res.relevance[0], g)
    assert res.relevance[1].shape == ids.shape and res.relevance[1].dtype == x.dtype
    assert not res.relevance[1].any()  # ids are held fixed: no relevance
    torch.testing.assert_close(baselines.gradient_x_input(model, (x, ids)).relevance[0], x * g)
    a, b = torch.randn(3, 1, 2, 2), torch.randn(3, 4)
    model2 = TwoFloats().eval()
    target2 = model2(a, b).argmax(1)
    for got, want in zip(baselines.gradient(model2, [a, b]).relevance, _autograd(model2, (a, b), target2)):
        torch.testing.assert_close(got, want)


def test_integrated_gradients_is_complete_over_the_float_inputs(image_and_ids):
    model, x, ids = image_and_ids
    res = baselines.integrated_gradients(model, (x, ids), steps=256)
    idx = res.target[:, None]
    drop = (model(x, ids).gather(1, idx) - model(torch.zeros_like(x), ids).gather(1, idx))[:, 0].detach()
    torch.testing.assert_close(res.relevance[0].sum((1, 2, 3)), drop, rtol=1e-3, atol=1e-5)
    assert not res.relevance[1].any()
    a, b = torch.randn(3, 1, 2, 2), torch.randn(3, 4)
    model2 = TwoFloats().eval()
    res = baselines.integrated_gradients(model2, (a, b), steps=256, baseline=(0.0, 0.5))
    idx = res.target[:, None]
    drop = (model2(a, b).gather(1, idx) - model2(torch.zeros_like(a), torch.full_like(b, 0.5)).gather(1, idx))[:, 0]
    total = res.relevance[0].sum((1, 2, 3)) + res.relevance[1].sum(1)  # one path through both inputs
    torch.testing.assert_close(total, drop.detach(), rtol=1e-3, atol=1e-5)


def test_smoothgrad_without_noise_is_the_gradient(image_and_ids):
    model, x, ids = image_and_ids
    plain = baselines.gradient(model, (x, ids)).relevance
    smooth = baselines.smoothgrad(model, (x, ids), noise=0.0, samples=3).relevance
    torch.testing.assert_close(smooth[0], plain[0])
    noisy = baselines.smoothgrad(model, (x, ids), samples=3).relevance
    assert not torch.allclose(noisy[0], plain[0]) and not noisy[1].any()
    torch.testing.assert_close(baselines.smoothgrad(model, (x, ids), samples=3).relevance[0], noisy[0])  # seeded


class TwoRelus(nn.Module):
    """Score = sum relu(a) + sum relu(b): the gradient of a ReLU whose input sits just above zero is 1 as long as the
    noise stays small against that offset."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        score = torch.relu(a).flatten(1).sum(1) + torch.relu(b).flatten(1).sum(1)
        return torch.stack([score, -score], 1)


def test_smoothgrad_scales_each_inputs_noise_by_its_own_range():
    a = torch.linspace(-100, 100, 8).reshape(1, 8)  # range 200: noise sigma 20
    b = 0.05 + torch.linspace(0, 0.01, 8).reshape(1, 8)  # range 0.01: sigma 0.001, far below the 0.05 offset
    res = baselines.smoothgrad(TwoRelus(), (a, b), target=0, samples=64)
    torch.testing.assert_close(res.relevance[1], torch.ones_like(b))  # b's own small noise never crosses zero
    assert res.relevance[0].min() < 0.5  # a's large noise does, for values near zero


def test_occlusion_by_hand(image_and_ids):
    model, x, ids = image_and_ids
    res = baselines.occlusion(model, (x, ids), patch=2, value=0.5)
    idx = res.target
    score = lambda image: model(image, ids).gather(1, idx[:, None])[:, 0].detach()  # noqa: E731
    want = torch.zeros_like(x)
    for i in (0, 2):
        for j in (0, 2):
            occluded = x.clone()
            occluded[:, :, i:i + 2, j:j + 2] = 0.5
            want[:, :, i:i + 2, j:j + 2] = ((score(x) - score(occluded)) / 8)[:, None, None, None]  # 2x2x2 values
    torch.testing.assert_close(res.relevance[0], want)
    assert not res.relevance[1].any()
    # two float inputs: each occluded in turn, the other held; a 2-D input in groups of `patch` features
    a, b = torch.randn(2, 1, 2, 2), torch.randn(2, 4)
    model2 = TwoFloats().eval()
    res = baselines.occlusion(model2, (a, b), patch=2)
    s = lambda a_, b_: model2(a_, b_).gather(1, res.target[:, None])[:, 0].detach()  # noqa: E731
    b_first = b.clone()
    b_first[:, :2] = 0
    torch.testing.assert_close(res.relevance[1][:, 0], (s(a, b) - s(a, b_first)) / 2)
    # patch 2 covers the whole 2 x 2 image: one region, its drop shared by its 4 values
    torch.testing.assert_close(res.relevance[0], ((s(a, b) - s(torch.zeros_like(a), b)) / 4).view(2, 1, 1, 1)
                               .expand_as(a))


def test_random_and_the_one_input_path(image_and_ids):
    model, x, ids = image_and_ids
    r = baselines.random(model, (x, ids)).relevance
    assert r[0].shape == x.shape and r[1].shape == ids.shape and r[1].dtype == x.dtype and r[1].any()
    torch.testing.assert_close(baselines.random(model, (x, ids)).relevance[1], r[1])  # seeded
    # one tensor gives a tensor, a one-element tuple a tuple: the same numbers
    image_only = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 4)).eval()
    for name, method in baselines.METHODS.items():
        alone, in_tuple = method(image_only, x).relevance, method(image_only, (x,)).relevance
        assert isinstance(alone, torch.Tensor) and isinstance(in_tuple, tuple), name
        torch.testing.assert_close(alone, in_tuple[0])


def test_errors_name_the_input(image_and_ids):
    model, x, ids = image_and_ids
    with pytest.raises(LRPError, match="input 1 of 2 has 1 samples"):
        baselines.gradient(model, (x, ids[:1]))
    with pytest.raises(TypeError, match="input 1 of 2 must be a torch.Tensor, got str"):
        baselines.smoothgrad(model, (x, "is there a red circle?"))
    with pytest.raises(TypeError, match="input 1 of 2 must be a floating-point tensor or integer token ids"):
        baselines.random(model, (x, ids > 1))
    with pytest.raises(TypeError, match="none of the 2 inputs is floating-point"):
        baselines.gradient_x_input(model, (ids, ids))
    with pytest.raises(ValueError, match=r"input 0 of 2: patch \(3, 3\) does not divide"):
        baselines.occlusion(model, (x, ids), patch=3)
    with pytest.raises(ValueError, match="3 baselines for 2 inputs"):
        baselines.integrated_gradients(model, (x, ids), baseline=(0.0, 0.0, 0.0))
    with pytest.raises(TypeError, match="x must be a floating-point torch.Tensor"):  # one input: as before
        baselines.gradient(model, ids)


# --------------------------------------------------------------------------- lrp evaluate --benchmark shapes-vqa

LIMIT = 30


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes-vqa")
    printed = io.StringIO()
    with redirect_stdout(printed):
        code = main(["evaluate", "--benchmark", "shapes-vqa", "--limit", str(LIMIT), "--out", str(out)])
    assert code == 0
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return out, rows, printed.getvalue()


def test_the_benchmark_writes_its_report(benchmark):
    from lrp.datasets.shapes_vqa import test_set
    from lrp.vqa import vqa, vqa_accuracy

    out, rows, printed = benchmark
    accuracy = vqa_accuracy(vqa()[0], test_set(LIMIT)).overall
    assert re.search(r"^answer accuracy: (\d\.\d+)$", printed, re.M).group(1) == f"{accuracy:.3f}"
    assert {"method", "kind", "subset", "question_type", "n", "mass_accuracy", "rank_accuracy", "pointing_game",
            "mask_share"} <= set(rows[0])
    methods = [*EVALUATE_COMPOSITES, *baselines.METHODS]
    for subset in ("correct", "all"):
        assert [r["method"] for r in rows if r["subset"] == subset and r["question_type"] == "all"] == methods
    assert {r["kind"] for r in rows if r["method"] in EVALUATE_COMPOSITES} == {"lrp"}
    report = (out / "report.md").read_text(encoding="utf-8")
    assert f"answer accuracy: {accuracy:.3f}" in report and "**Verdict**" in report and "Chance" in report
    for picture in ("metrics.png", "by_type.png", "examples.png"):
        assert f"]({picture})" in report and 0 < (out / picture).stat().st_size < 300_000


def test_rows_by_type_and_subset_count_their_own_questions(benchmark):
    """Per method and subset, the question types' counts add up to the 'all' row's, and the 'correct' subset holds
    the localisable questions the model answers right."""
    from lrp.datasets.shapes_vqa import test_set
    from lrp.vqa import vqa, vqa_accuracy

    _, rows, _ = benchmark
    questions = test_set(LIMIT)
    right = vqa_accuracy(vqa()[0], questions).correct
    expected = {"all": sum(q.localisable for q in questions),
                "correct": sum(q.localisable and ok for q, ok in zip(questions, right))}
    for subset, n in expected.items():
        for method in {r["method"] for r in rows}:
            mine = [r for r in rows if r["method"] == method and r["subset"] == subset]
            total = next(int(r["n"]) for r in mine if r["question_type"] == "all")
            assert total == n
            assert sum(int(r["n"]) for r in mine if r["question_type"] != "all") == total


def test_lrp_localises_better_than_random(benchmark):
    _, rows, _ = benchmark
    main_rows = {r["method"]: r for r in rows if r["subset"] == "correct" and r["question_type"] == "all"}
    mass = {m: float(r["mass_accuracy"]) for m, r in main_rows.items()}
    chance = float(main_rows["random"]["mask_share"])
    assert abs(mass["random"] - chance) < 0.03  # random relevance lands at chance: the mask's share of the image
    assert max(mass[m] for m in EVALUATE_COMPOSITES) > mass["random"] + 0.3


@pytest.mark.parametrize("argv, message", [
    (["--patch", "4"], "--patch does not apply to --benchmark shapes-vqa"),
    (["--model", "mnist"], "--model does not apply"),
    (["picture.png"], "inputs does not apply"),
    (["--limit", "1001"], "limit must be between 1 and 1000"),
    (["--methods", "lrp0", "saliency"], "unknown method 'saliency'"),
])
def test_options_that_do_not_apply_are_refused(argv, message, capsys, tmp_path):
    assert main(["evaluate", "--benchmark", "shapes-vqa", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err
    if "does not apply" in message:
        assert "(options: --methods, --limit, --batch-size, --out)" in err


def test_the_help_names_the_benchmark(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    assert "--benchmark {shapes-vqa}" in capsys.readouterr().out


def test_the_readme_line_runs_as_written(tmp_path, monkeypatch, capsys):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    lines = [line.split("#")[0].strip() for line in re.findall(r"^lrp evaluate --benchmark .*$", readme, re.M)]
    assert len(lines) == 1
    monkeypatch.chdir(tmp_path)
    assert main(shlex.split(lines[0])[1:]) == 0
    assert re.search(r"^answer accuracy: 0\.\d+$", capsys.readouterr().out, re.M)
    rows = list(csv.DictReader(open(tmp_path / "lrp-eval" / "results.csv", newline="", encoding="utf-8")))
    mass = {r["method"]: float(r["mass_accuracy"]) for r in rows
            if r["subset"] == "correct" and r["question_type"] == "all"}
    assert mass["layered"] > mass["random"] + 0.3
