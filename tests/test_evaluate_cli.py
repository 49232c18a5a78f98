"""``lrp evaluate``, run as a user would: a subprocess that writes a report."""

import csv
import subprocess
import sys

import pytest
import torch
from PIL import Image

import lrp
from device_lane import scalar_rel
from lrp import evaluate


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "lrp.cli", "evaluate", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_evaluate_builtin_model_writes_a_report_that_matches_the_api(tmp_path, device):
    # on a GPU this is the command of issue 19, whose randomisation check crashed in ssim
    out = tmp_path / "eval"
    result = run("--model", "mnist", "--limit", "12", "--steps", "8", "--methods", "epsilon-plus-flat",
                 "gradient", "occlusion", "random", "--randomise", "epsilon-plus-flat", "--randomisation-samples",
                 "3", "--replace", "blur", "zero", "--device", str(device), "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["method"], r["replace"]) for r in rows] == [
        (m, rep) for rep in ("blur", "zero") for m in ("epsilon-plus-flat", "gradient", "occlusion-4", "random")]
    model = lrp.models.mnist().to(device)
    x, _ = lrp.models.mnist_digits("test", limit=12)
    api = evaluate.compare(model, x.to(device), methods=["epsilon-plus-flat", "gradient"], steps=8, replace="blur",
                           masks=x[:, 0] > 0.5)
    for ours, cli in zip(api.rows, rows):
        for key in ("aopc_morf", "aopc_lerf", "pointing_game", "sparseness"):
            assert float(cli[key]) == pytest.approx(ours[key], rel=scalar_rel(device, 1e-5), abs=1e-6), key
    report = (out / "report.md").read_text()
    assert "| epsilon-plus-flat |" in report and "Randomisation sanity check" in report
    for name in ("curves_blur_morf.png", "curves_zero_lerf.png", "randomisation_epsilon-plus-flat.png"):
        assert name in report
        assert Image.open(out / name).size[0] > 300
    random_rows = list(csv.DictReader(open(out / "randomisation.csv")))
    assert [r["randomised"] for r in random_rows] == ["none", "9", "7", "3", "0"]
    assert float(random_rows[0]["spearman"]) == pytest.approx(1.0)


def test_evaluate_image_files(tmp_path):
    x, _ = lrp.models.mnist_digits("test", limit=4)
    for i in range(4):
        Image.fromarray((x[i, 0].numpy() * 255).round().astype("uint8")).save(tmp_path / f"d{i}.png")
    (tmp_path / "broken.png").write_text("no image")
    result = run(str(tmp_path), "--model", "mnist", "--steps", "4", "--methods", "lrp0", "random", "--randomise",
                 "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "broken.png: not a readable image" in result.stderr
    assert "4 inputs from" in (tmp_path / "out" / "report.md").read_text()
    assert not (tmp_path / "out" / "randomisation.csv").exists()


@pytest.mark.parametrize("args, message", [
    (["--methods", "gradcam"], "unknown method 'gradcam'"),
    (["--patch", "3"], "patch (3, 3) does not divide"),
    (["--model", "resnet18"], "give the inputs to evaluate on"),
    (["--methods", "random", "occlusion", "--randomise", "occlusion", "typo"], "--randomise 'typo' is not among"),
])
def test_evaluate_errors(tmp_path, args, message):
    result = run("--limit", "2", "--steps", "2", "--randomise", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_fewer_regions_than_steps_is_a_note_not_an_error(tmp_path):
    result = run("--limit", "3", "--patch", "4", "--methods", "random", "--randomise", "--out", "o", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "49 regions of patch 4: 49 steps instead of 50" in result.stderr
    assert "49 perturbation steps" in (tmp_path / "o" / "report.md").read_text()


def test_readme_evaluate_command(tmp_path):
    """The README's ``lrp evaluate`` line, as written (default settings: 300 digits, 11 methods)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    lines = [line.split("#")[0].split() for line in re.findall(r"^lrp evaluate.*$", readme, re.M)
             if "--model spam" not in line and "--benchmark" not in line]  # tests/test_spam_cli.py, test_vqa_benchmark.py
    assert lines
    for args in lines:
        result = run(*args[2:], cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    rows = {r["method"]: r for r in csv.DictReader(open(tmp_path / "lrp-eval" / "results.csv"))}
    # on the built-in model, LRP's ranking removes what the model uses faster than the gradient's and random
    for name in ("epsilon-plus-flat", "epsilon-gamma-box", "layered"):
        assert float(rows[name]["aopc_morf"]) > float(rows["gradient"]["aopc_morf"])
        assert float(rows[name]["aopc_morf"]) > float(rows["random"]["aopc_morf"])


def test_evaluate_with_ground_truth_masks(tmp_path):
    x, _ = lrp.models.mnist_digits("test", limit=6)
    (tmp_path / "in").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(6):
        Image.fromarray((x[i, 0].numpy() * 255).round().astype("uint8")).save(tmp_path / "in" / f"d{i}.png")
        if i < 5:  # d5 has no mask: reported and skipped
            strokes = (x[i, 0] > 0.5).numpy()
            if i % 2:
                Image.fromarray(strokes.astype("uint8") * 255).save(tmp_path / "masks" / f"d{i}.png")
            else:
                import numpy as np
                np.save(tmp_path / "masks" / f"d{i}.npy", strokes)
    result = run(str(tmp_path / "in"), "--masks", str(tmp_path / "masks"), "--steps", "4", "--methods", "lrp0",
                 "random", "--randomise", "--out", "o", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "d5.png: no mask d5.<png|npy|...>" in result.stderr
    assert result.stderr.count("error:") == 1  # the five others, with image and array masks, are evaluated
    assert "5 inputs from" in (tmp_path / "o" / "report.md").read_text()
    rows = {r["method"]: r for r in csv.DictReader(open(tmp_path / "o" / "results.csv"))}
    masks = x[:5, 0] > 0.5
    relevance = lrp.explain(lrp.models.mnist(), x[:5], composite="lrp0").relevance
    assert float(rows["lrp0"]["mass_accuracy"]) == pytest.approx(
        evaluate.relevance_mass_accuracy(relevance, masks).mean(), abs=1e-3)
    assert float(rows["lrp0"]["pointing_game"]) == 1.0
    assert "the masks in" in (tmp_path / "o" / "report.md").read_text()
