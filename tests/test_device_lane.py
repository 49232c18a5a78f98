"""The device lane (issue 19): the lane itself (selection, skipping with the reason), and what holds on the device
``LRP_TEST_DEVICE`` names: explanations agree with the CPU's (float64 exactly, float32 within TF32's rounding), the
randomisation check draws the same layers on every device, ``lrp video`` and ``lrp explain --store zarr`` run there.

Run the lane alone with ``make test-gpu`` (``LRP_TEST_DEVICE=cuda pytest -m device``). On the CPU (the default) the
tests of the lane run as any other test."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lrp
from architectures import Residual, Sequential2d
from device_lane import DEVICE_ENV, assert_matches_cpu, float32_rel, skip_reason, tf32_possible
from lrp import evaluate
from lrp.evaluate.randomisation import _randomise, parameter_layers

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- the lane

def test_a_missing_device_is_a_skip_with_the_reason(monkeypatch):
    assert skip_reason("cpu") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert skip_reason("cuda") == "LRP_TEST_DEVICE=cuda but torch.cuda.is_available() is False on this machine"
    assert skip_reason("cuda:1").startswith("LRP_TEST_DEVICE=cuda:1 but torch.cuda.is_available() is False")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert skip_reason("cuda:0") is None
    assert skip_reason("cuda:3") == "LRP_TEST_DEVICE=cuda:3 but this machine has 1 CUDA device(s)"
    assert "hold no values" in skip_reason("meta")


def test_the_lane_selects_the_device_tests_and_skips_them_where_the_device_is_missing(tmp_path):
    """``pytest -m device`` with a device this machine lacks: every selected test skips with the reason, none
    passes having run nothing; tests that choose their own devices (test_mixed_precision) are not selected."""
    missing = f"cuda:{torch.cuda.device_count() + 7}"  # no machine has it, with or without CUDA
    env = {**os.environ, DEVICE_ENV: missing}
    files = ["tests/test_invariants.py", "tests/test_mixed_precision.py", "tests/test_device_lane.py"]
    result = subprocess.run([sys.executable, "-m", "pytest", "-m", "device", "-rs", "-p", "no:cacheprovider",
                             "-o", "addopts=", *files], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert f"device lane: {DEVICE_ENV}={missing} (the device tests skip" in out
    summary = out.strip().splitlines()[-1]
    assert " skipped" in summary and " passed" not in summary and " failed" not in summary, summary
    assert "deselected" in summary  # test_mixed_precision's own device parameter, and the tests of the lane itself
    skips = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    assert skips and all(f"{DEVICE_ENV}={missing} but" in line for line in skips), skips
    assert not any("test_mixed_precision" in line for line in skips)


def test_the_device_fixture_is_the_lane_device(device):
    assert device == torch.device(os.environ.get(DEVICE_ENV, "").strip() or "cpu")
    assert torch.zeros(1, device=device).device.type == device.type


# --------------------------------------------------------------------------- agreement with the CPU

@pytest.mark.parametrize("composite", ["lrp0", "epsilon-plus-flat", "epsilon-gamma-box", "epsilon-alpha2-beta1"])
@pytest.mark.parametrize("make", [Sequential2d, Residual], ids=["sequential", "residual"])
def test_explanations_on_the_device_equal_the_cpus(make, composite, device):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(3, 3, 16, 16)
    comp = lrp.composite(composite, low=-4.0, high=4.0) if composite == "epsilon-gamma-box" else composite
    # float64: the same numbers on every device, up to the order of the sums
    cpu = lrp.explain(model.double(), x.double(), composite=comp)
    dev = lrp.explain(copy.deepcopy(model).double().to(device), x.double().to(device), composite=comp)
    assert dev.relevance.device.type == device.type
    assert torch.equal(dev.target.cpu(), cpu.target)
    scale = float(cpu.relevance.abs().max())
    torch.testing.assert_close(dev.relevance.cpu(), cpu.relevance, rtol=1e-9, atol=1e-12 * scale)
    # float32: within TF32's rounding on CUDA (tests/device_lane.py), float32's on the CPU
    cpu32 = lrp.explain(model.float(), x, composite=comp)
    dev32 = lrp.explain(copy.deepcopy(model).float().to(device), x.to(device), composite=comp)
    assert dev32.relevance.dtype == torch.float32
    assert_matches_cpu(dev32.relevance, cpu32.relevance, device, rtol=1e-5, atol=1e-6 * scale)


def test_tf32_is_what_the_float32_tolerance_allows_for(device):
    """The float32 tolerance is looser than the CPU's only where TF32 may round products: on CUDA."""
    assert (float32_rel(device) > 1e-4) == tf32_possible(device)
    assert not tf32_possible("cpu")


# --------------------------------------------------------------------------- evaluation

def test_randomisation_draws_the_same_layers_on_every_device(device):
    """A seed re-initialises a layer to the same weights on the CPU and on a GPU (drawn on the CPU, then copied):
    the check's result does not depend on where it ran."""
    model = lrp.models.mnist()
    x, _ = lrp.models.mnist_digits("test", limit=2)
    twin = copy.deepcopy(model).to(device)
    for k, name in enumerate(parameter_layers(model, x)):
        _randomise(dict(model.named_modules())[name], 10 + k)
        _randomise(dict(twin.named_modules())[name], 10 + k)
    for key, value in twin.state_dict().items():
        assert value.device.type == device.type, key
        assert torch.equal(value.cpu(), model.state_dict()[key]), key


def test_randomisation_check_on_the_device_equals_the_cpus(device):
    """The check of issue 19's crash (SSIM of heatmaps on the GPU), in float64 so that the numbers must agree."""
    model = lrp.models.mnist().double()
    x, _ = lrp.models.mnist_digits("test", limit=4)
    x = x.double()
    cpu = evaluate.randomisation_check(model, x, method="epsilon-plus-flat")
    dev = evaluate.randomisation_check(copy.deepcopy(model).to(device), x.to(device), method="epsilon-plus-flat")
    assert dev.layers == cpu.layers and list(dev.similarity) == ["spearman", "ssim", "relative_l2"]
    for metric in cpu.similarity:
        np.testing.assert_allclose(dev.similarity[metric], cpu.similarity[metric], rtol=1e-6, atol=1e-9,
                                   err_msg=metric)
    assert all(r.device.type == "cpu" for r in dev.relevance)  # kept for the plot


def test_compare_on_the_device_equals_the_cpus(device):
    model = lrp.models.mnist().double()
    x, _ = lrp.models.mnist_digits("test", limit=6)
    x = x.double()
    masks = x[:, 0] > 0.5
    methods = ["epsilon-plus-flat", "gradient", "occlusion", "smoothgrad", "random"]
    settings = dict(methods=methods, masks=masks, steps=7, patch=2, replace="uniform")
    cpu = evaluate.compare(model, x, **settings)
    dev = evaluate.compare(copy.deepcopy(model).to(device), x.to(device), **settings)
    for ours, theirs in zip(dev.rows, cpu.rows):
        for key, value in theirs.items():
            if key not in ("method", "ms_per_sample"):
                assert ours[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (theirs["method"], key)


# --------------------------------------------------------------------------- lrp video and lrp explain --store

def test_video_on_the_device(device, tmp_path, capsys):
    av = pytest.importorskip("av", reason="lrp video needs PyAV: pip install 'lrp[video]'")
    from lrp.cli import main

    x, _ = lrp.models.mnist_digits("test", limit=6)
    frames = np.repeat((x[:, 0].numpy() * 255).round().astype(np.uint8).repeat(4, 1).repeat(4, 2)[..., None], 3, -1)
    clip = tmp_path / "digits.mp4"
    with av.open(str(clip), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 112, 112, "yuv420p"
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())

    def decoded(path):
        with av.open(str(path)) as container:
            return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(int)

    outputs = {}
    for where in ("cpu", str(device)):
        outputs[where] = tmp_path / f"{where.replace(':', '_')}.mp4"
        status = main(["video", str(clip), "--model", "mnist", "--device", where, "--layout", "side-by-side",
                       "--out", str(outputs[where])])
        assert status == 0, capsys.readouterr().err
    cpu, dev = decoded(outputs["cpu"]), decoded(outputs[str(device)])
    assert dev.shape == cpu.shape == (6, 112, 224, 3)
    assert np.abs(dev - cpu).mean() < 1.0  # the same heatmaps, up to a colour level where float32 rounds apart


def test_store_on_the_device(device, tmp_path, capsys, monkeypatch):
    zarr = pytest.importorskip("zarr")
    from lrp.cli import main

    x, _ = lrp.models.mnist_digits("test", limit=20)
    pixels = (x[:, 0].numpy() * 255).round().astype("uint8")
    folder = tmp_path / "digits"
    folder.mkdir()
    from PIL import Image
    for i in range(len(pixels)):
        Image.fromarray(pixels[i]).save(folder / f"{i:02d}.png")
    monkeypatch.chdir(tmp_path)
    status = main(["explain", str(folder), "--store", "zarr", "--out", "out", "--batch-size", "8", "--chunk", "8",
                   "--workers", "0", "--device", str(device)])
    assert status == 0, capsys.readouterr().err
    got = zarr.open_array(tmp_path / "out" / "explanations.zarr" / "relevance", mode="r")[:]
    seen = torch.from_numpy(pixels.astype(np.float32) / 255.0)[:, None]
    expected = torch.cat([lrp.explain(lrp.models.mnist(), seen[s:s + 8]).relevance for s in range(0, 20, 8)])
    assert_matches_cpu(got, expected, device, rtol=1e-5, atol=1e-6, what="zarr store")
