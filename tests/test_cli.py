"""The command line, run as a user would: a subprocess, files in, files out."""

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lrp
from device_lane import assert_matches_cpu, scalar_rel


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "lrp.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    x, _ = lrp.models.mnist_digits("test", limit=3)
    (folder / "nested").mkdir()
    for i in range(3):
        target = folder / ("nested" if i == 2 else ".") / f"digit{i}.png"
        Image.fromarray((x[i, 0].numpy() * 255).round().astype("uint8")).save(target)
    return folder


def test_builtin_model_accuracy_from_shipped_checkpoint():
    assert lrp.models.accuracy(lrp.models.mnist()) >= 0.98


def test_explain_folder_with_builtin_model(digits, tmp_path, device):
    (digits / "broken.png").write_text("not an image")
    result = run("explain", str(digits), "--model", "mnist", "--device", str(device), "--out", str(tmp_path / "out"),
                 cwd=tmp_path)
    assert result.returncode == 1, result.stderr  # one broken file: reported, the rest explained
    assert "broken.png: not a readable image" in result.stderr
    rows = list(csv.DictReader(open(tmp_path / "out" / "summary.csv")))
    assert [(Path(r["file"]).name, r["status"].split(":")[0]) for r in rows] == [
        ("broken.png", "failed"), ("digit0.png", "ok"), ("digit1.png", "ok"), ("digit2.png", "ok")]
    assert "not a readable image" in rows[0]["status"] and rows[0]["outputs"] == ""
    rows = rows[1:]
    assert [r["outputs"] for r in rows] == ["digit0", "digit1", "digit2"]
    model = lrp.models.mnist()
    for r in rows:
        heat = Image.open(tmp_path / "out" / f"{r['outputs']}_heatmap.png")
        over = Image.open(tmp_path / "out" / f"{r['outputs']}_overlay.png")
        assert heat.size == over.size == (28, 28)
        relevance = np.load(tmp_path / "out" / f"{r['outputs']}_relevance.npy")
        path = next(digits.rglob(r["outputs"] + ".png"))
        x = torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32) / 255.0)[None, None]
        expected = lrp.explain(model, x).relevance[0].numpy()  # on the CPU
        assert_matches_cpu(relevance, expected, device, rtol=1e-5, atol=1e-7, what=r["file"])
        assert int(r["predicted"]) == int(r["explained"]) == int(model(x).argmax())
        total = expected.sum()
        assert abs(float(r["relevance_sum"]) - total) < scalar_rel(device, 1e-3) * max(1.0, abs(total))
        logit = float(model(x).detach()[0].max())
        # the explained score: the logit
        assert abs(float(r["score"]) - logit) < scalar_rel(device, 1e-4) * max(1.0, abs(logit))
    (digits / "broken.png").unlink()


def test_torchvision_model_with_finetuned_head_and_class_names(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=4).eval()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "classes.txt").write_text("glioma\nmeningioma\nnone\npituitary\n")
    Image.fromarray((np.random.default_rng(0).random((80, 90, 3)) * 255).astype("uint8")).save(tmp_path / "scan.png")
    result = run("explain", "scan.png", "--model", "resnet18", "--weights", "weights.pt", "--size", "64", "--crop",
                 "64", "--target", "meningioma", "--classes", "classes.txt", "--composite", "epsilon-gamma-box",
                 "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    row = next(csv.DictReader(open(tmp_path / "out" / "summary.csv")))
    assert row["explained"] == "meningioma"
    assert Image.open(tmp_path / "out" / "scan_heatmap.png").size == (64, 64)
    relevance = np.load(tmp_path / "out" / "scan_relevance.npy")
    assert relevance.shape == (3, 64, 64)
    # the same input through the Python API
    from lrp.pipeline import Preprocess
    x, _ = Preprocess(size=64, crop=64, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)).image(
        tmp_path / "scan.png")
    low = (0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    high = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    expected = lrp.explain(model, x[None], target=1, composite=lrp.composite("epsilon-gamma-box", low=low,
                                                                             high=high)).relevance[0]
    np.testing.assert_allclose(relevance, expected.numpy(), rtol=1e-4, atol=1e-6)


def test_arrays_and_exported_programs(tmp_path):
    """A hyperspectral cube as .npy through a torch.export program: per-band heatmaps and raw relevance."""
    from architectures import Hyperspectral
    torch.manual_seed(0)
    model = Hyperspectral().eval()
    cube = torch.randn(1, 6, 8, 8)
    program = torch.export.export(model, (cube[None],))
    torch.export.save(program, tmp_path / "model.pt2")
    np.save(tmp_path / "cube.npy", cube.numpy())
    result = run("explain", "cube.npy", "--model", "model.pt2", "--composite", "lrp0", "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    relevance = np.load(tmp_path / "out" / "cube_relevance.npy")
    expected = lrp.explain(model, cube[None], composite="lrp0").relevance[0]
    np.testing.assert_allclose(relevance, expected.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("args, message", [
    (["--model", "nosuchnet"], "unknown model 'nosuchnet'"),
    (["--model", "resnet18", "--weights", "missing.pt"], "missing.pt does not exist"),
    (["--target", "cat"], "target 'cat' is neither a class index nor one of the 10 class names (0, 1,"),
])
def test_errors_are_one_clear_line(digits, tmp_path, args, message):
    result = run("explain", str(digits / "digit0.png"), *args, "--out", "out", cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_wrong_channel_count_is_reported(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "w.pt")
    Image.fromarray(np.zeros((32, 32), dtype="uint8")).save(tmp_path / "gray.png")
    result = run("explain", "gray.png", "--model", "resnet18", "--weights", "w.pt", "--grayscale", "--out", "out",
                 cwd=tmp_path)
    assert result.returncode == 1 and "gray.png: has 1 channels, but --mean gives 3 values" in result.stderr


def test_torchscript_file_is_refused_with_a_way_out(tmp_path):
    torch.jit.save(torch.jit.script(lrp.models.mnist()), tmp_path / "scripted.pt")
    Image.fromarray(np.zeros((28, 28), dtype="uint8")).save(tmp_path / "d.png")
    result = run("explain", "d.png", "--model", "scripted.pt", "--out", "out", cwd=tmp_path)
    assert result.returncode == 2 and "TorchScript" in result.stderr and "torch.export" in result.stderr


def test_demo_writes_report(tmp_path):
    result = run("demo", "--out", "demo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "demo" / "index.html").read_text().count("<img") > 20
    assert Image.open(tmp_path / "demo" / "overview.png").size[0] > 500


def test_factory_spec_with_weights(tmp_path):
    """'module.path:factory' builds the user's own model class; --weights loads its state dict."""
    (tmp_path / "mynets.py").write_text(
        "import torch.nn as nn\n"
        "def tabular():\n"
        "    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))\n")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    torch.save(model.state_dict(), tmp_path / "tab.pt")
    row = np.random.default_rng(1).random(5).astype("float32")
    np.save(tmp_path / "row.npy", row)
    result = run("explain", "row.npy", "--model", "mynets:tabular", "--weights", "tab.pt", "--composite",
                 "epsilon", "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    relevance = np.load(tmp_path / "out" / "row_relevance.npy")
    expected = lrp.explain(model, torch.from_numpy(row)[None], composite="epsilon").relevance[0].numpy()
    np.testing.assert_allclose(relevance, expected, rtol=1e-5, atol=1e-7)


def test_device_that_torch_cannot_use_here_is_named_with_the_way_out(monkeypatch):
    from lrp.cli import build_parser
    from lrp.pipeline import ModelError, check_device
    assert check_device("cpu") == "cpu"
    with pytest.raises(ModelError, match="unknown device 'gpu0': use cpu, cuda or cuda:N"):
        check_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match=r"CUDA is not available on this machine .*use --device cpu"):
        check_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == "cuda:1"
    with pytest.raises(ModelError, match=r"this machine has 2 CUDA device\(s\), cuda:0..cuda:1"):
        check_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for command in (["explain", "x.png"], ["evaluate"], ["serve"]):  # argparse: exit 2, message on stderr
        with pytest.raises(SystemExit) as stop:
            build_parser().parse_args([*command, "--device", "cuda"])
        assert stop.value.code == 2
    assert build_parser().parse_args(["serve", "--device", "cpu"]).device == "cpu"


def test_explain_on_a_missing_device_is_one_line_not_a_traceback(digits, tmp_path):
    result = run("explain", str(digits), "--device", "cuda:99", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "argument --device: device 'cuda:99'" in result.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- found by a new-user bug hunt

def _main(capsys, *argv) -> tuple[int, str]:
    """``lrp`` in this process (argparse's refusals exit): its exit status and what it printed on stderr."""
    from lrp.cli import main
    try:
        status = main(list(argv))
    except SystemExit as exc:
        status = exc.code
    return status, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["explain", "IN", "--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["explain", "IN", "--batch-size", "-2"], "argument --batch-size: must be at least 1, got -2"),
    (["explain", "IN", "--cmap", "nope"], "argument --cmap: invalid choice: 'nope'"),
    (["explain", "IN", "--crop", "-3"], "argument --crop: must be at least 0, got -3"),
    (["explain", "IN", "--size", "-5"], "argument --size: must be at least 0, got -5"),
    (["explain", "IN", "--low", "1", "--high", "0"], "--low 1.0 --high 0.0: the lowest input value must be below"),
    (["evaluate", "--limit", "0"], "argument --limit: must be at least 1, got 0"),
    (["evaluate", "--limit", "-1990"], "argument --limit: must be at least 1, got -1990"),
    (["evaluate", "--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
])
def test_options_out_of_range_are_refused_before_anything_runs(digits, tmp_path, capsys, argv, message):
    argv = [str(digits / "digit0.png") if a == "IN" else a for a in argv]
    status, err = _main(capsys, *argv, "--out", str(tmp_path / "out"))
    assert status == 2 and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["a file", "under a file", "a folder in the way of summary.csv"])
def test_an_output_folder_that_cannot_be_written_is_one_line(digits, tmp_path, capsys, where):
    (tmp_path / "file").write_text("kept")
    out = {"a file": tmp_path / "file", "under a file": tmp_path / "file" / "sub"}.get(where, tmp_path / "out")
    if where == "a folder in the way of summary.csv":
        (out / "summary.csv").mkdir(parents=True)
    status, err = _main(capsys, "explain", str(digits / "digit0.png"), "--out", str(out))
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert ("is a file; give a folder" if where != "a folder in the way of summary.csv" else
            "cannot write into --out") in err
    assert (tmp_path / "file").read_text() == "kept"


def test_relevance_that_is_not_finite_is_a_failed_input_not_ok(tmp_path, capsys):
    x, _ = lrp.models.mnist_digits("test", limit=2)
    x = x.numpy().copy()
    x[1] *= 1e38  # the model overflows on this one
    np.save(tmp_path / "digits.npy", x)
    status, err = _main(capsys, "explain", str(tmp_path / "digits.npy"), "--out", str(tmp_path / "out"))
    assert status == 1, err
    rows = list(csv.DictReader(open(tmp_path / "out" / "summary.csv")))
    assert [r["status"] for r in rows] == ["ok", "failed: relevance not finite (the model overflowed)"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.npy")) == ["digits_0_relevance.npy"]


def test_a_torchvision_model_without_weights_is_said_to_be_random_and_is_the_same_every_run(tmp_path, capsys):
    from lrp.pipeline import Pipeline
    rng = torch.random.get_rng_state()
    first, second = (Pipeline.load("resnet18").loaded.model.state_dict() for _ in range(2))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert torch.equal(torch.random.get_rng_state(), rng)  # seeded on the side: the caller's generator untouched
    Image.fromarray(np.full((40, 40, 3), 128, dtype="uint8")).save(tmp_path / "grey.png")
    status, err = _main(capsys, "explain", str(tmp_path / "grey.png"), "--model", "resnet18", "--size", "32",
                        "--crop", "32", "--out", str(tmp_path / "out"))
    assert status == 0, err
    assert "note: --model resnet18 has random weights" in err and "--weights FILE" in err


def test_weights_that_are_not_a_state_dict_are_one_plain_line(digits, tmp_path, capsys):
    """torch's refusal to unpickle a whole module runs over several lines, with terminal colour codes: lrp gives
    its first line, plain, and the way out."""
    torch.save({"layer": torch.nn.Linear(2, 2)}, tmp_path / "module.pt")  # a module, not a state dict
    status, err = _main(capsys, "explain", str(digits / "digit0.png"), "--model", "resnet18", "--weights",
                        str(tmp_path / "module.pt"), "--out", str(tmp_path / "out"))
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot read weights from" in err and "torch.save(model.state_dict(), path)" in err
    assert "\x1b" not in err
