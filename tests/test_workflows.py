"""The workflows lrp replaces, run as their users run them: a tabular MLP with a sigmoid output, a hyperspectral
cube through the user's own model file, MNIST arrays in every layout, a fine-tuned classifier with class names,
and scans larger than the crop. Each one worked badly or not at all before the shared pipeline (issue 11)."""

import csv
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lrp

NETS = textwrap.dedent('''
    import torch
    import torch.nn as nn
    import torch.nn.functional as F


    def tabular():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 1),
                             nn.Sigmoid())


    class Hyper(nn.Module):
        """(N, 1, bands, H, W): Conv3d, a reshape in forward, a depthwise-separable Conv2d."""

        def __init__(self, bands=30):
            super().__init__()
            torch.manual_seed(0)
            self.conv3d = nn.Conv3d(1, 2, (3, 3, 3), padding=(0, 1, 1))
            c = 2 * (bands - 2)
            self.depthwise = nn.Conv2d(c, c, 3, padding=1, groups=c)
            self.pointwise = nn.Conv2d(c, 8, 1)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            h = F.relu(self.conv3d(x))
            n, c, d, hh, ww = h.shape
            h = F.relu(self.pointwise(F.relu(self.depthwise(h.view(n, c * d, hh, ww)))))
            return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))
''')


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "lrp.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def rows(folder):
    return list(csv.DictReader(open(Path(folder) / "summary.csv")))


@pytest.fixture
def nets(tmp_path):
    """The user's model file in a folder of its own, and the module it defines (imported by path)."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "nets.py").write_text(NETS)
    import importlib.util
    spec = importlib.util.spec_from_file_location("nets_under_test", tmp_path / "models" / "nets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tabular_sigmoid_model_from_a_file_path_with_a_batched_array(tmp_path, nets):
    """A (N, 10) batch of feature rows through `path/to/file.py:factory`, run from another folder: one row per
    sample, the score explained is the logit of the predicted class (not the probability), and the relevance
    differs between features (no flat input rule on features)."""
    features = np.random.default_rng(0).normal(size=(6, 10)).astype("float32")
    np.save(tmp_path / "rows.npy", features)
    (tmp_path / "elsewhere").mkdir()
    result = run("explain", "../rows.npy", "--model", "../models/nets.py:tabular", "--out", "out",
                 cwd=tmp_path / "elsewhere")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "elsewhere" / "out"
    table = rows(out)
    assert len(table) == 6 and all(r["status"] == "ok" for r in table)
    model = nets.tabular().eval()
    x = torch.from_numpy(features)
    logits = model[:-1](x).detach()[:, 0]
    for i, r in enumerate(table):
        predicted = int(logits[i] > 0)
        assert r["predicted"] == str(predicted) and r["explained"] == str(predicted)
        assert float(r["score"]) == pytest.approx(float(logits[i] if predicted else -logits[i]), rel=1e-4)
        relevance = np.load(out / f"{r['outputs']}_relevance.npy")
        expected = lrp.explain(model, x[i:i + 1]).relevance[0].numpy()
        np.testing.assert_allclose(relevance, expected, rtol=1e-5, atol=1e-7)
        assert relevance.std() > 1e-3 * np.abs(relevance).max()  # not the same value for every feature
        assert (out / f"{r['outputs']}_features.png").exists()


def test_binary_sigmoid_model_explains_either_class_by_name(tmp_path, nets):
    np.save(tmp_path / "row.npy", np.random.default_rng(1).normal(size=10).astype("float32"))
    (tmp_path / "classes.txt").write_text("healthy\nsick\n")
    for name, sign in (("sick", 1.0), ("healthy", -1.0)):
        result = run("explain", "row.npy", "--model", "models/nets.py:tabular", "--classes", "classes.txt",
                     "--target", name, "--out", name, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        (row,) = rows(tmp_path / name)
        x = torch.from_numpy(np.load(tmp_path / "row.npy"))[None]
        logit = float(nets.tabular().eval()[:-1](x).detach()[0, 0])
        assert row["explained"] == name and float(row["score"]) == pytest.approx(sign * logit, rel=1e-4)


def test_hyperspectral_cube_gets_a_band_grid_and_bounds_from_its_values(tmp_path, nets):
    """A (1, 30, 25, 25) cube (one sample: channel, bands, H, W) from the user's file: the relevance, one labelled
    tile per band, and z^B bounds taken from the data's range, said on stderr."""
    cube = (np.random.default_rng(2).random((1, 30, 25, 25)) * 2).astype("float32")  # values up to 2
    np.save(tmp_path / "cube.npy", cube)
    result = run("explain", "cube.npy", "--model", "models/nets.py:Hyper", "--composite", "epsilon-gamma-box",
                 "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    low, high = float(cube.min()), float(cube.max())
    assert f"z^B bounds from the arrays' values: low={low:g}, high={high:g}" in result.stderr
    relevance = np.load(tmp_path / "out" / "cube_relevance.npy")
    comp = lrp.composite("epsilon-gamma-box", low=low, high=high)
    expected = lrp.explain(nets.Hyper().eval(), torch.from_numpy(cube)[None], composite=comp).relevance[0]
    np.testing.assert_allclose(relevance, expected.numpy(), rtol=1e-4, atol=1e-6)
    grid = Image.open(tmp_path / "out" / "cube_bands.png")
    assert grid.size[0] > 5 * 25 and grid.size[1] > 5 * 25  # 30 tiles, enlarged
    assert "_bands" in result.stdout


@pytest.mark.parametrize("layout", ["hw", "chw", "batch", "batch-no-channel"])
def test_mnist_arrays_in_every_layout(tmp_path, layout):
    x, _ = lrp.models.mnist_digits("test", limit=3)
    array = {"hw": x[0, 0], "chw": x[0], "batch": x, "batch-no-channel": x[:, 0]}[layout].numpy()
    np.save(tmp_path / "a.npy", array)
    result = run("explain", "a.npy", "--model", "mnist", "--grayscale", "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    table = rows(tmp_path / "out")
    n = 3 if layout.startswith("batch") else 1
    assert len(table) == n
    expected = lrp.explain(lrp.models.mnist(), x[:n]).relevance
    for i, r in enumerate(table):
        np.testing.assert_allclose(np.load(tmp_path / "out" / f"{r['outputs']}_relevance.npy"), expected[i].numpy(),
                                   rtol=1e-5, atol=1e-7)


def test_an_array_that_fits_no_layout_says_the_shape_expected(tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((5, 3, 28), dtype="float32"))
    result = run("explain", "bad.npy", "--model", "mnist", "--out", "out", cwd=tmp_path)
    assert result.returncode == 1
    assert "reads samples shaped (1, 28, 28)" in result.stderr and "(28, 28)" in result.stderr
    (row,) = rows(tmp_path / "out")
    assert row["status"].startswith("failed: ") and "(1, 28, 28)" in row["status"]


def test_class_names_must_match_the_outputs(tmp_path):
    x, _ = lrp.models.mnist_digits("test", limit=1)
    np.save(tmp_path / "d.npy", x[0].numpy())
    (tmp_path / "classes.txt").write_text("glioma\nmeningioma\n")
    result = run("explain", "d.npy", "--model", "mnist", "--classes", "classes.txt", "--out", "out", cwd=tmp_path)
    assert result.returncode == 2
    assert "2 class names" in result.stderr and "10 classes" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing written


def test_factory_import_error_names_the_way_out(tmp_path, nets):
    (tmp_path / "elsewhere").mkdir()
    result = run("explain", "x.npy", "--model", "nets:tabular", "--out", "out", cwd=tmp_path / "elsewhere")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "PYTHONPATH" in result.stderr and "path/to/nets.py:tabular" in result.stderr


def test_scans_larger_than_the_crop_are_said_and_can_be_kept_whole(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.save(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(), tmp_path / "w.pt")
    scan = np.zeros((255, 255), dtype="uint8")
    scan[100:160, 90:170] = 120  # a dark scan with a grey structure
    Image.fromarray(scan).convert("RGB").save(tmp_path / "scan.png")
    result = run("explain", "scan.png", "--model", "resnet18", "--weights", "w.pt", "--out", "cropped", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "centre-cropped to 224x224" in result.stderr and "--crop 0" in result.stderr
    assert Image.open(tmp_path / "cropped" / "scan_heatmap.png").size == (224, 224)
    result = run("explain", "scan.png", "--model", "resnet18", "--weights", "w.pt", "--size", "0", "--crop", "0",
                 "--out", "whole", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "cropped" not in result.stderr
    assert Image.open(tmp_path / "whole" / "scan_overlay.png").size == (255, 255)


def test_help_shows_the_default_preprocessing_of_each_model_kind():
    result = run("explain", "--help", cwd=".")
    text = " ".join(result.stdout.split())
    assert "torchvision names: RGB, shorter side resized to 256, centre crop 224x224" in text
    assert "mnist: grayscale, shorter side resized to 28" in text


def test_the_server_refuses_class_names_that_do_not_match_and_batches(tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from lrp.errors import ModelError
    from lrp.web.app import create_app
    from lrp.web.service import ServedModel
    (tmp_path / "classes.txt").write_text("glioma\nmeningioma\n")
    with pytest.raises(ModelError, match="2 class names were given, but model 'mnist' has 10 classes"):
        create_app([ServedModel.load("mnist", classes=str(tmp_path / "classes.txt"))])
    client = TestClient(create_app(["mnist"]))
    x, _ = lrp.models.mnist_digits("test", limit=2)
    answer = client.post("/api/explain", json={"array": x.tolist()})
    assert answer.status_code == 422 and "holds 2 samples; send one input per request" in answer.json()["error"]


def test_evaluation_refuses_one_output_models_with_the_way_out():
    """Perturbation tracks the explained class's score; a one-logit model has none per class, so evaluating it
    would compare heatmaps of -z with the drop of p: refused, with the wrapper that makes it work."""
    from lrp import evaluate
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1), torch.nn.Sigmoid())
    x = torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"torch.cat\(\[-z, z\], 1\)"):
        evaluate.compare(model, x, methods=["epsilon", "random"], steps=2)

    class TwoLogits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.logit = model[:-1]

        def forward(self, x):
            z = self.logit(x)
            return torch.cat([-z, z], 1)

    table = evaluate.compare(TwoLogits(), x, methods=["epsilon", "random"], steps=2)
    assert len(table.rows) >= 2


def test_randomisation_check_of_a_sigmoid_model_explains_the_predicted_class():
    from lrp import evaluate
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1), torch.nn.Sigmoid())
    x = torch.randn(5, 6)
    res = evaluate.randomisation_check(model, x, method="epsilon", layers=[])
    predicted = lrp.explain(model, x, composite="epsilon")
    assert predicted.target.tolist() == (model[:-1](x).detach()[:, 0] > 0).long().tolist()
    np.testing.assert_allclose(res.relevance[0].numpy(), predicted.relevance[:len(res.relevance[0])].numpy(),
                               rtol=1e-5, atol=1e-7)
