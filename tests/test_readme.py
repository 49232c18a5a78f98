"""Every Python example in the README runs."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in BLOCKS[: index + 1]:  # later blocks may use names from earlier ones
        exec(compile(block, f"README.md block {index}", "exec"), namespace)
    if "heatmap.png" in BLOCKS[index]:
        assert (tmp_path / "heatmap.png").stat().st_size > 0


CLI = [line.split("#")[0].strip() for block in re.findall(r"## On the command line\n.*?```\n(.*?)```", README.read_text(), re.S)
       for line in block.splitlines() if line.startswith("lrp ")]


def test_readme_command_lines_run(tmp_path):
    """The command-line examples, with the files they name made up (a fine-tuned 4-class ResNet18, one scan)."""
    import subprocess
    import sys

    import numpy as np
    import torch
    import torchvision
    from PIL import Image

    assert len(CLI) >= 3
    torch.save(torchvision.models.resnet18(weights=None, num_classes=4).state_dict(), tmp_path / "finetuned.pt")
    (tmp_path / "classes.txt").write_text("glioma\nmeningioma\nnone\npituitary\n")
    (tmp_path / "scans").mkdir()
    Image.fromarray((np.random.default_rng(0).random((240, 240, 3)) * 255).astype("uint8")).save(
        tmp_path / "scans" / "scan1.png")
    (tmp_path / "models").mkdir()  # a user's hyperspectral model file and a cube: (channel, bands, H, W)
    (tmp_path / "models" / "hyper.py").write_text(
        "import sys, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from architectures import Hyperspectral\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return Hyperspectral(bands=6)\n")
    np.save(tmp_path / "cube.npy", (np.random.default_rng(1).random((1, 6, 9, 9)) * 2).astype("float32"))
    for line in CLI:
        args = line.split()[1:]
        result = subprocess.run([sys.executable, "-m", "lrp.cli", *args], cwd=tmp_path, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, (line, result.stderr)
    assert (tmp_path / "lrp-out" / "digit_0_heatmap.png").exists()  # from the second line
    import csv
    rows = list(csv.DictReader(open(tmp_path / "lrp-out" / "summary.csv")))
    scan = [row for row in rows if "scan1" in row["file"]]
    assert scan and scan[0]["predicted"] in {"glioma", "meningioma", "none", "pituitary"}  # line 3 names classes
    assert (tmp_path / "cube" / "cube_bands.png").exists()  # the fourth: one tile per band
