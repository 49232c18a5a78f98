"""lrp.evaluate: metrics on inputs whose answers are known in closed form, errors, and the MNIST end to end."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import lrp
from lrp import baselines, evaluate


def linear_model(features=8, classes=3, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(features, classes, bias=False).double().eval()


def image_linear_model(size=4, classes=2, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(size * size, classes, bias=False)).double().eval()


def contributions(model, x, target):
    w = model.weight if isinstance(model, nn.Linear) else model[1].weight
    return w[target].detach() * x.reshape(x.shape[0], -1)


# --------------------------------------------------------------------------- perturbation curves

@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_pixel_flipping_on_a_linear_model_has_its_closed_form(order, device):
    model = linear_model(features=8).to(device)
    x = torch.randn(5, 8, dtype=torch.float64).to(device)
    target = 1
    relevance = lrp.explain(model, x, target, "lrp0").relevance
    contrib = contributions(model, x, target)
    assert torch.allclose(relevance, contrib)  # the exact relevance of a bias-free linear model: w * x

    curve = evaluate.perturbation_curve(model, x, relevance, target, order=order, steps=8)
    contrib = contrib.cpu()
    ordered = contrib.sort(dim=1, descending=(order == "morf")).values
    removed = torch.cat([torch.zeros(5, 1, dtype=torch.float64), ordered.cumsum(1)], 1)
    expected = contrib.sum(1, keepdim=True) - removed  # f after removing the first k contributions
    np.testing.assert_allclose(curve.scores, expected.numpy(), atol=1e-12)
    np.testing.assert_allclose(curve.fractions, np.arange(9) / 8)
    np.testing.assert_allclose(curve.aopc, removed.mean(1).numpy(), atol=1e-12)
    np.testing.assert_allclose(curve.auc, np.trapezoid(expected.numpy(), np.arange(9) / 8, axis=1), atol=1e-12)
    # MoRF by the exact relevance is the steepest order there is: no random order beats its AOPC (LeRF: the flattest);
    # the random relevance stays on the CPU whatever the device of the model
    for seed in range(5):
        shuffled = evaluate.perturbation_curve(model, x, torch.rand(5, 8, generator=torch.Generator().manual_seed(seed),
                                                                    dtype=torch.float64), target, steps=8)
        if order == "morf":
            assert (curve.aopc >= shuffled.aopc - 1e-12).all()
        else:
            assert (curve.aopc <= shuffled.aopc + 1e-12).all()


def test_region_perturbation_removes_whole_patches_in_order_of_their_summed_relevance(device):
    model = image_linear_model(size=4).to(device)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64).to(device)
    contrib = contributions(model, x, 0).reshape(3, 2, 2, 2, 2).sum((2, 4)).cpu()  # (N, 2, 2) patch sums
    regions = contrib.reshape(3, 4)
    curve = evaluate.perturbation_curve(model, x, lrp.explain(model, x, 0, "lrp0").relevance, 0, patch=2)
    ordered = regions.sort(1, descending=True).values
    expected = regions.sum(1, keepdim=True) - torch.cat([torch.zeros(3, 1, dtype=torch.float64),
                                                         ordered.cumsum(1)], 1)
    np.testing.assert_allclose(curve.scores, expected.numpy(), atol=1e-12)


def test_volumes_with_channels_remove_all_channels_of_a_region_together():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 6 * 6, 1, bias=False)).double().eval()
    x = torch.randn(2, 2, 4, 6, 6, dtype=torch.float64)  # (N, C, D, H, W), like a hyperspectral cube
    contrib = model[1].weight[0].detach().reshape(1, 2, 4, 6, 6) * x
    relevance = lrp.explain(model, x, composite="lrp0").relevance
    assert torch.allclose(relevance, contrib)
    curve = evaluate.perturbation_curve(model, x, relevance, patch=(2, 3, 3), order="lerf")
    regions = contrib.sum(1).reshape(2, 2, 2, 2, 3, 2, 3).sum((2, 4, 6)).reshape(2, 8)
    ordered = regions.sort(1).values
    expected = regions.sum(1, keepdim=True) - torch.cat([torch.zeros(2, 1, dtype=torch.float64),
                                                         ordered.cumsum(1)], 1)
    np.testing.assert_allclose(curve.scores, expected.numpy(), atol=1e-12)


def test_steps_fewer_than_regions_remove_rounded_equal_parts():
    model = linear_model(features=8)
    x = torch.randn(2, 8, dtype=torch.float64)
    curve = evaluate.perturbation_curve(model, x, contributions(model, x, 0), 0, steps=3)
    np.testing.assert_allclose(curve.fractions, [0, 3 / 8, 5 / 8, 1])  # round(8k/3) = 0, 3, 5, 8


@pytest.mark.parametrize("replace", ["mean", 0.5, "tensor", "callable"])
def test_replacement_values_enter_the_score_exactly(replace, device):
    model = linear_model(features=6).to(device)
    x = torch.randn(4, 6, dtype=torch.float64).to(device)
    relevance = contributions(model, x, 2)
    values = {"mean": x.mean(1, keepdim=True).expand_as(x), 0.5: torch.full_like(x, 0.5),
              "tensor": torch.randn_like(x), "callable": -x}[replace]
    spec = {"tensor": values.cpu(), "callable": lambda t: -t}.get(replace, replace)  # a tensor given on the CPU
    curve = evaluate.perturbation_curve(model, x, relevance, 2, steps=6, replace=spec)
    w = model.weight[2].detach()
    order = relevance.argsort(1, descending=True)
    for k in range(7):
        removed = torch.zeros_like(x, dtype=torch.bool).scatter_(1, order[:, :k], True)
        expected = (torch.where(removed, values, x) * w).sum(1)
        np.testing.assert_allclose(curve.scores[:, k], expected.cpu().numpy(), atol=1e-12)


def test_blur_and_uniform_replacements(device):
    x = torch.zeros(1, 1, 21, 21, dtype=torch.float64, device=device)
    x[0, 0, 10, 10] = 1.0
    blurred = evaluate.Blur(sigma=1.5)(x)[0, 0].cpu()
    t = torch.arange(-5, 6, dtype=torch.float64)
    g = torch.exp(-0.5 * (t / 1.5) ** 2)
    g /= g.sum()
    np.testing.assert_allclose(blurred[5:16, 5:16].numpy(), torch.outer(g, g).numpy(), atol=1e-12)
    flat = torch.full((2, 3, 9, 9), 0.3, device=device)
    assert torch.allclose(evaluate.Blur(2.0)(flat), flat)

    y = (torch.rand(3, 2, 5, 5) * 4 - 1).to(device)
    noise = evaluate.Uniform(seed=3)(y)
    lo, hi = y.reshape(3, -1).min(1).values, y.reshape(3, -1).max(1).values
    assert (noise.reshape(3, -1) >= lo[:, None]).all() and (noise.reshape(3, -1) <= hi[:, None]).all()
    assert torch.equal(noise, evaluate.Uniform(seed=3)(y)) and not torch.equal(noise, evaluate.Uniform(seed=4)(y))
    assert noise.device == y.device and torch.equal(noise.cpu(), evaluate.Uniform(seed=3)(y.cpu()))  # same draws


def test_batching_does_not_change_the_curve(device):
    model = lrp.models.mnist().to(device)
    x, _ = lrp.models.mnist_digits("test", limit=6)
    x = x.to(device)
    relevance = lrp.explain(model, x).relevance
    a = evaluate.perturbation_curve(model, x, relevance, steps=20, patch=2, replace="blur", batch_size=7)
    b = evaluate.perturbation_curve(model, x, relevance, steps=20, patch=2, replace="blur", batch_size=1000)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)
    assert (a.target == lrp.explain(model, x).target.cpu().numpy()).all()


def test_perturbation_errors_name_the_problem_and_the_way_out():
    model = lrp.models.mnist()
    x, _ = lrp.models.mnist_digits("test", limit=2)
    r = torch.rand_like(x)
    with pytest.raises(ValueError, match=r"patch \(3, 3\) does not divide .*\(28, 28\).*\[1, 2, 4, 7, 14, 28\]"):
        evaluate.perturbation_curve(model, x, r, patch=3)
    with pytest.raises(ValueError, match="returned list; it must return a tensor shaped like its input"):
        evaluate.perturbation_curve(model, x, r, replace=lambda t: [0])
    with pytest.raises(ValueError, match=r"replacement values have shape \(2, 1, 14, 14\)"):
        evaluate.perturbation_curve(model, x, r, replace=lambda t: t[..., ::2, ::2])
    with pytest.raises(ValueError, match="unknown replacement 'black'"):
        evaluate.perturbation_curve(model, x, r, replace="black")
    with pytest.raises(ValueError, match=r"relevance has shape \(2, 28, 29\)"):
        evaluate.perturbation_curve(model, x, torch.rand(2, 28, 29))
    with pytest.raises(ValueError, match=r"steps must be between 1 and the number of regions \(49"):
        evaluate.perturbation_curve(model, x, r, patch=4, steps=50)
    with pytest.raises(ValueError, match="order must be 'morf'"):
        evaluate.perturbation_curve(model, x, r, order="most")
    with pytest.raises(ValueError, match=r"relevance has shape \(4, 1, 28, 28\); expected the input's \(2, 1, 28, 28\)"):
        evaluate.perturbation_curve(model, x, torch.cat([r, r]))
    with pytest.raises(ValueError, match="score='probability' needs an output shaped"):
        evaluate.perturbation_curve(nn.Sequential(nn.Flatten(), nn.Linear(784, 1), nn.Flatten(0)), x, r,
                                    score="probability")


def test_evaluation_leaves_the_model_as_it_was_even_when_it_raises():
    model = lrp.models.mnist().train()
    flags = [p.requires_grad for p in model.parameters()]
    x, _ = lrp.models.mnist_digits("test", limit=2)
    with pytest.raises(lrp.TargetError):
        evaluate.perturbation_curve(model, x, torch.rand_like(x), target=12)
    with pytest.raises(lrp.TargetError):
        evaluate.compare(model, x, target=12, methods=["gradient"])
    evaluate.perturbation_curve(model, x, torch.rand_like(x), steps=3)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags


# --------------------------------------------------------------------------- localisation and complexity

def test_a_mask_covering_exactly_the_relevant_pixels_scores_one(device):
    relevance = torch.zeros(3, 1, 6, 6)
    mask = torch.zeros(3, 6, 6, dtype=torch.bool)
    for i in range(3):
        mask[i, i:i + 2, 1:4] = True
    relevance[:, 0][mask] = torch.rand(int(mask.sum())) + 0.1
    relevance = relevance.to(device)  # the relevance where the model ran, the mask on the CPU
    for metric in (evaluate.pointing_game, evaluate.relevance_mass_accuracy, evaluate.relevance_rank_accuracy):
        np.testing.assert_allclose(metric(relevance, mask), 1.0)
    # the complement holds none of it: no hit, no mass; its 30 top-ranked pixels are the 6 relevant ones
    # (outside it) and 24 zeros (inside it)
    np.testing.assert_allclose(evaluate.pointing_game(relevance, ~mask), 0.0)
    np.testing.assert_allclose(evaluate.relevance_mass_accuracy(relevance, ~mask), 0.0)
    np.testing.assert_allclose(evaluate.relevance_rank_accuracy(relevance, ~mask), 24 / 30)


def test_localisation_values_on_a_hand_worked_example():
    relevance = torch.tensor([[4.0, 3.0, 2.0, 1.0, -5.0]])
    mask = torch.tensor([[1, 0, 1, 0, 1]])
    assert evaluate.pointing_game(relevance, mask)[0] == 1.0
    assert evaluate.relevance_mass_accuracy(relevance, mask)[0] == pytest.approx(6 / 10)  # positive part only
    assert evaluate.relevance_rank_accuracy(relevance, mask)[0] == pytest.approx(2 / 3)  # top 3: 4, 3, 2
    # the maximum sits one pixel left of the mask: a miss, unless the tolerance reaches it
    img = torch.zeros(1, 1, 5, 5)
    img[0, 0, 2, 1] = 1.0
    m = torch.zeros(5, 5, dtype=torch.bool)
    m[2, 2:] = True
    assert evaluate.pointing_game(img, m)[0] == 0.0
    assert evaluate.pointing_game(img, m, tolerance=1)[0] == 1.0
    # a constant heatmap (a dead model) points nowhere and ranks nothing
    assert np.isnan(evaluate.pointing_game(torch.zeros(1, 1, 5, 5), m)[0])
    assert np.isnan(evaluate.relevance_rank_accuracy(torch.zeros(1, 1, 5, 5), m)[0])


def test_mask_errors():
    r = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"mask has shape \(2, 8, 7\).*\(2, 8, 8\)"):
        evaluate.pointing_game(r, torch.ones(2, 8, 7, dtype=torch.bool))
    empty = torch.ones(2, 8, 8, dtype=torch.bool)
    empty[1] = False
    with pytest.raises(ValueError, match="the mask of sample 1 is empty"):
        evaluate.relevance_mass_accuracy(r, empty)
    with pytest.raises(ValueError, match="boolean or hold only 0 and 1"):
        evaluate.relevance_rank_accuracy(r, torch.full((8, 8), 0.5))


def test_gini_and_entropy_known_values():
    n = 50
    constant = torch.full((2, 1, 5, 10), 0.7)
    np.testing.assert_allclose(evaluate.sparseness(constant), 0.0, atol=1e-12)
    np.testing.assert_allclose(evaluate.entropy(constant), math.log(n), rtol=1e-12)
    one_hot = torch.zeros(1, n)
    one_hot[0, 7] = -3.0
    np.testing.assert_allclose(evaluate.sparseness(one_hot), (n - 1) / n)
    np.testing.assert_allclose(evaluate.entropy(one_hot), 0.0, atol=1e-12)
    # Gini as the mean absolute difference, an independent formula
    a = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    v = a.abs().reshape(4, -1)
    mad = (v[:, :, None] - v[:, None, :]).abs().sum((1, 2)) / (2 * v.shape[1] ** 2 * v.mean(1))
    np.testing.assert_allclose(evaluate.sparseness(a), mad.numpy(), rtol=1e-10)
    assert np.isnan(evaluate.sparseness(torch.zeros(1, 5))[0])


# --------------------------------------------------------------------------- similarity

def test_similarities_against_scipy_and_scikit_image(device):
    stats = pytest.importorskip("scipy.stats")
    metrics = pytest.importorskip("skimage.metrics")
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 1, 12, 10, generator=gen, dtype=torch.float64)
    b = a + 0.7 * torch.randn(3, 1, 12, 10, generator=gen, dtype=torch.float64)
    b[0, 0, :4] = 0.0  # ties
    a[0, 0, 5:] = 1.0
    # heatmaps on the device (both, or only the first: the randomisation check compares such pairs); until issue 19
    # ssim and relative_l2 put one of them on the CPU and the other on the device, and crashed on a GPU
    da, db = a.to(device), b.to(device)
    ours = evaluate.spearman(da, db)
    ssim = evaluate.ssim(da, db)
    np.testing.assert_array_equal(evaluate.ssim(da, b), ssim)
    for i in range(3):
        assert ours[i] == pytest.approx(stats.spearmanr(a[i].flatten(), b[i].flatten()).statistic, abs=1e-12)
        rng = float(max(a[i].max(), b[i].max()) - min(a[i].min(), b[i].min()))
        ref = metrics.structural_similarity(a[i, 0].numpy(), b[i, 0].numpy(), data_range=rng)
        assert ssim[i] == pytest.approx(ref, abs=1e-10)
    expected_l2 = ((b - a).reshape(3, -1).norm(dim=1) / a.reshape(3, -1).norm(dim=1)).numpy()
    np.testing.assert_allclose(evaluate.relative_l2(da, db), expected_l2)
    np.testing.assert_allclose(evaluate.relative_l2(a, db), expected_l2)
    np.testing.assert_allclose(evaluate.spearman(da, da), 1.0)
    np.testing.assert_allclose(evaluate.ssim(da, da), 1.0)
    np.testing.assert_allclose(evaluate.relative_l2(da, da), 0.0)
    with pytest.raises(ValueError, match="at least 3x3"):
        evaluate.ssim(torch.rand(2, 1, 2, 8), torch.rand(2, 1, 2, 8))


# --------------------------------------------------------------------------- randomisation

def test_randomising_nothing_leaves_the_heatmap_identical_and_the_model_untouched(device):
    model = lrp.models.mnist().train().to(device)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, _ = lrp.models.mnist_digits("test", limit=4)
    x = x.to(device)
    res = evaluate.randomisation_check(model, x, layers=[])
    assert res.layers == ["none"]
    np.testing.assert_allclose(res.similarity["spearman"], 1.0)
    np.testing.assert_allclose(res.similarity["ssim"], 1.0)
    np.testing.assert_allclose(res.similarity["relative_l2"], 0.0)
    evaluate.randomisation_check(model, x, mode="independent")
    assert model.training
    assert all(torch.equal(before[k], v) and v.device == before[k].device for k, v in model.state_dict().items())


def test_randomising_all_layers_decorrelates_the_heatmap(device):
    model = lrp.models.mnist().to(device)
    x, _ = lrp.models.mnist_digits("test", limit=16)
    x = x.to(device)
    cascade = evaluate.randomisation_check(model, x, method="epsilon-plus-flat")
    assert cascade.layers == ["none", "9", "7", "3", "0"]  # the top layer first
    spearman = cascade.mean("spearman")
    assert spearman[0] == pytest.approx(1.0)
    assert spearman[-1] < 0.5, spearman
    assert cascade.mean("relative_l2")[-1] > 0.5
    independent = evaluate.randomisation_check(model, x, mode="independent")
    # the first step randomises the same layer with the same seed in both modes; later ones differ, as only
    # cascading keeps the earlier randomisations
    np.testing.assert_allclose(independent.similarity["spearman"][1], cascade.similarity["spearman"][1])
    assert not np.allclose(independent.similarity["spearman"][4], cascade.similarity["spearman"][4])
    alone = evaluate.randomisation_check(model, x, layers=["0"], seed=3)  # the first conv alone, same seed (3 + 1)
    np.testing.assert_allclose(independent.similarity["spearman"][4], alone.similarity["spearman"][1])
    assert len(independent.relevance) == 5 and independent.relevance[0].shape == (4, 1, 28, 28)


def test_randomisation_of_a_tabular_model_leaves_out_ssim(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1), nn.Sigmoid()).to(device)
    res = evaluate.randomisation_check(model, torch.randn(5, 6).to(device), method="epsilon")
    assert list(res.similarity) == ["spearman", "relative_l2"] and res.layers == ["none", "2", "0"]
    np.testing.assert_allclose(res.similarity["spearman"][0], 1.0)


def test_randomisation_errors():
    model = lrp.models.mnist()
    x, _ = lrp.models.mnist_digits("test", limit=2)
    with pytest.raises(ValueError, match="no module named 'classifier'"):
        evaluate.randomisation_check(model, x, layers=["classifier"])
    with pytest.raises(ValueError, match="mode must be 'cascading' or 'independent'"):
        evaluate.randomisation_check(model, x, mode="top-down")
    with pytest.raises(ValueError, match="unknown similarity 'pearson'"):
        evaluate.randomisation_check(model, x, metrics=["pearson"])


# --------------------------------------------------------------------------- baselines

def test_baselines_on_a_linear_model_have_their_closed_forms(device):
    model = image_linear_model(size=4, classes=3).to(device)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64).to(device)
    w = model[1].weight[2].detach().reshape(1, 1, 4, 4)
    assert torch.allclose(baselines.gradient(model, x, 2).relevance, w.expand_as(x))
    assert torch.allclose(baselines.gradient_x_input(model, x, 2).relevance, w * x)
    assert torch.allclose(baselines.integrated_gradients(model, x, 2, steps=3).relevance, w * x)
    assert torch.allclose(baselines.smoothgrad(model, x, 2, samples=5).relevance, w.expand_as(x))
    assert torch.allclose(baselines.occlusion(model, x, 2, patch=1).relevance, w * x)
    patches = (w * x).reshape(2, 1, 2, 2, 2, 2).sum((3, 5), keepdim=True) / 4  # each patch's drop, shared by 4
    occ = baselines.occlusion(model, x, 2, patch=2).relevance.reshape(2, 1, 2, 2, 2, 2)
    assert torch.allclose(occ, patches.expand_as(occ))
    r = baselines.random(model, x, seed=1).relevance
    assert torch.equal(r, baselines.random(model, x, seed=1).relevance) and r.shape == x.shape
    assert r.device == x.device and torch.equal(r.cpu(), baselines.random(model.cpu(), x.cpu(), seed=1).relevance)


def test_gradient_baselines_on_a_relu_network(device):
    model = lrp.models.mnist().double().to(device)
    x, _ = lrp.models.mnist_digits("test", limit=4)
    x = x.double().to(device)
    gxi = baselines.gradient_x_input(model, x)
    assert torch.allclose(gxi.relevance, lrp.explain(model, x, composite="lrp0").relevance, atol=1e-10)
    ig = baselines.integrated_gradients(model, x, steps=64)
    gap = gxi.output.gather(1, gxi.target[:, None])[:, 0] - model(torch.zeros_like(x))[:, gxi.target].diagonal()
    # completeness: IG sums to f(x) - f(0), up to the Riemann sum's error
    np.testing.assert_allclose(ig.relevance.sum((1, 2, 3)).detach().cpu(), gap.detach().cpu(), rtol=0.05)


def test_baselines_leave_the_model_as_they_found_it(device):
    model = lrp.models.mnist().train().to(device)
    flags = [p.requires_grad for p in model.parameters()]
    x, _ = lrp.models.mnist_digits("test", limit=2)
    x = x.to(device)
    for name, method in baselines.METHODS.items():
        assert method(model, x, 3).relevance.device == x.device, name
        assert model.training and [p.requires_grad for p in model.parameters()] == flags, name
        assert all(p.grad is None for p in model.parameters()), name
    with pytest.raises(TypeError, match=r"unexpected options \['stepz'\]"):
        baselines.integrated_gradients(model, x, stepz=3)
    with pytest.raises(lrp.TargetError):
        baselines.gradient(model, x, 10)


# --------------------------------------------------------------------------- comparison and MNIST end to end

def test_compare_outputs(tmp_path, device):
    model = lrp.models.mnist().to(device)
    x, _ = lrp.models.mnist_digits("test", limit=8)
    masks = x[:, 0] > 0.5  # on the CPU, as lrp evaluate reads them from files
    x = x.to(device)
    table = evaluate.compare(model, x, methods={"LRP": "epsilon-plus-flat", "grad": "gradient"}, masks=masks,
                             steps=10, replace="blur")
    assert [row["method"] for row in table.rows] == ["LRP", "grad"]
    assert {"aopc_morf", "aopc_lerf", "auc_morf", "abpc", "sparseness", "entropy", "pointing_game",
            "mass_accuracy", "rank_accuracy", "ms_per_sample"} <= set(table.rows[0])
    assert table.rows[0]["aopc_morf"] == pytest.approx(table.curves["LRP"]["morf"].aopc.mean())
    table.to_csv(tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_text().splitlines()[0].startswith("method,aopc_morf")
    assert "| LRP |" in table.to_markdown()
    table.plot(tmp_path / "curves.png")
    from PIL import Image
    assert Image.open(tmp_path / "curves.png").size[0] > 300
    pandas = pytest.importorskip("pandas")
    assert isinstance(table.to_pandas(), pandas.DataFrame)
    with pytest.raises(ValueError, match="unknown method 'gradcam'"):
        evaluate.compare(model, x, methods=["gradcam"])
    with pytest.raises(ValueError, match="two methods are called '<lambda>'"):
        evaluate.compare(model, x, methods=[lambda m, x, t: x, lambda m, x, t: -x])
    precomputed = evaluate.compare(model, x, methods={"mine": table.relevance["LRP"]}, steps=10, replace="blur")
    assert precomputed.rows[0]["aopc_morf"] == pytest.approx(table.rows[0]["aopc_morf"])
    assert math.isnan(precomputed.rows[0]["ms_per_sample"])
    with pytest.raises(ValueError, match="returned relevance \\(8, 10\\)"):
        evaluate.compare(model, x, methods=[lambda m, x, t: m(x)])


def test_randomisation_plot_and_csv(tmp_path, device):
    model = lrp.models.mnist().to(device)
    x, _ = lrp.models.mnist_digits("test", limit=4)
    x = x.to(device)
    res = evaluate.randomisation_check(model, x)
    import matplotlib
    backend = matplotlib.get_backend()
    res.plot(tmp_path / "r.png")
    assert matplotlib.get_backend() == backend  # plots leave the caller's backend alone
    res.to_csv(tmp_path / "r.csv")
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert lines[0] == "step,randomised,spearman,ssim,relative_l2" and len(lines) == 6


def test_lrp_beats_gradient_and_random_at_removing_what_the_mnist_model_uses(device):
    model = lrp.models.mnist().to(device)
    x, _ = lrp.models.mnist_digits("test", limit=200)
    x = x.to(device)
    methods = {"epsilon-plus-flat": "epsilon-plus-flat",
               "epsilon-gamma-box": lrp.composite("epsilon-gamma-box", low=0.0, high=1.0),
               "gradient": "gradient", "random": "random"}
    table = {row["method"]: row for row in evaluate.compare(model, x, methods=methods, orders=("morf",),
                                                            steps=25, replace="blur").rows}
    for name in ("epsilon-plus-flat", "epsilon-gamma-box"):
        assert table[name]["aopc_morf"] > 1.1 * table["gradient"]["aopc_morf"], table
        assert table[name]["aopc_morf"] > 1.5 * table["random"]["aopc_morf"], table


# --------------------------------------------------------------------------- agreement with Quantus

def test_agreement_with_quantus():
    quantus = pytest.importorskip("quantus", reason="Quantus (PyPI quantus) is not installed")
    model = lrp.models.mnist()
    x, _ = lrp.models.mnist_digits("test", limit=16)
    res = lrp.explain(model, x)
    a, xn, yn = res.relevance.numpy(), x.numpy(), res.target.numpy()
    common = dict(disable_warnings=True)
    q = quantus.PixelFlipping(features_in_step=16, perturb_baseline="black", normalise=False, abs=False, **common)(
        model=model, x_batch=xn, y_batch=yn, a_batch=a, device="cpu", softmax=True, channel_first=True)
    ours = evaluate.perturbation_curve(model, x, res.relevance, res.target, steps=49, score="probability")
    np.testing.assert_allclose(ours.scores[:, 1:], np.array(q), atol=1e-5)

    masks = xn > 0.5
    for metric, ours_fn, attributions in [
            (quantus.PointingGame, evaluate.pointing_game, a),
            (quantus.RelevanceMassAccuracy, evaluate.relevance_mass_accuracy, np.clip(a, 0, None)),
            (quantus.RelevanceRankAccuracy, evaluate.relevance_rank_accuracy, np.abs(a))]:
        theirs = metric(normalise=False, abs=False, **common)(model=model, x_batch=xn, y_batch=yn,
                                                             a_batch=attributions, s_batch=masks.astype(float),
                                                             channel_first=True)
        np.testing.assert_allclose(ours_fn(torch.from_numpy(attributions), torch.from_numpy(masks)), theirs,
                                   atol=1e-6, err_msg=metric.__name__)
    for metric, ours_fn, rtol in [(quantus.Sparseness, evaluate.sparseness, 1e-4),
                                  (quantus.Complexity, evaluate.entropy, 1e-6)]:
        theirs = metric(normalise=False, abs=True, **common)(model=model, x_batch=xn, y_batch=yn, a_batch=a.copy(),
                                                            channel_first=True)
        # Quantus adds 1e-7 to every |R| before the Gini index
        np.testing.assert_allclose(ours_fn(res.relevance), theirs, rtol=rtol, err_msg=metric.__name__)


# --------------------------------------------------------------------------- found by a new-user bug hunt

def test_relevance_that_is_not_finite_is_refused_not_scored():
    model = lrp.models.mnist()
    x, _ = lrp.models.mnist_digits("test", limit=2)
    relevance = lrp.explain(model, x).relevance
    spoilt = relevance.clone()
    spoilt[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="1 values that are not finite"):
        evaluate.perturbation_curve(model, x, spoilt, steps=2)
    with pytest.raises(ValueError, match="not finite"):
        evaluate.pointing_game(spoilt, x > 0.5)
    with pytest.raises(ValueError, match="not finite.*heatmap cannot show"):
        lrp.heatmap(spoilt[0, 0])
    # a NumPy array is relevance too, as the other metrics take it
    as_array = evaluate.perturbation_curve(model, x, relevance.numpy(), steps=2)
    np.testing.assert_array_equal(as_array.scores, evaluate.perturbation_curve(model, x, relevance, steps=2).scores)


def test_probability_of_a_single_score_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 1))  # no sigmoid: softmax over one class would be 1 whatever is removed
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="two classes or more"):
        evaluate.perturbation_curve(model, x, torch.randn(3, 8), score="probability", steps=2)


def test_one_name_where_names_are_expected_is_one_name_not_its_letters():
    model = lrp.models.mnist()
    x, _ = lrp.models.mnist_digits("test", limit=4)
    one = evaluate.compare(model, x, methods="gradient", orders="morf", steps=3)
    listed = evaluate.compare(model, x, methods=["gradient"], orders=["morf"], steps=3)
    assert [r["method"] for r in one.rows] == ["gradient"]
    np.testing.assert_array_equal(one.curves["gradient"]["morf"].scores, listed.curves["gradient"]["morf"].scores)
    single = evaluate.randomisation_check(model, x, metrics="spearman", layers="9")
    assert single.layers == ["none", "9"] and list(single.similarity) == ["spearman"]
    with pytest.raises(ValueError, match="module '1' \\(ReLU\\) has no parameters to randomise"):
        evaluate.randomisation_check(model, x, layers=["9", "1"])


def test_compare_times_each_method_after_a_warm_up_call():
    """A process's first call of a method pays one-time costs (imports, allocations); ``ms_per_sample`` leaves
    them out, as ``lrp evaluate``'s report does: each method is called once on the first input before the timed
    call. A relevance tensor given beforehand is neither called nor timed."""
    model = lrp.models.mnist()
    x, _ = lrp.models.mnist_digits("test", limit=4)
    sizes = []

    def gradient_x_input(model, x, target):
        sizes.append(len(x))
        return baselines.gradient_x_input(model, x, target)

    given = lrp.explain(model, x).relevance
    table = evaluate.compare(model, x, methods={"gxi": gradient_x_input, "given": given}, orders="morf", steps=2)
    assert sizes == [1, 4]
    rows = {r["method"]: r for r in table.rows}
    assert rows["gxi"]["ms_per_sample"] > 0 and math.isnan(rows["given"]["ms_per_sample"])
