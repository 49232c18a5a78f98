"""The examples of docs/web.md run against the app, with the files they name: the digits `lrp demo` writes
(dark ink on white) and a photo of a digit on paper. Each must explain the digit, not the background."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

import lrp  # noqa: E402
from lrp.web.app import create_app  # noqa: E402

DOC = (Path(__file__).resolve().parent.parent / "docs" / "web.md").read_text()
EXAMPLES = DOC[DOC.index("### Examples"):DOC.index("## Speed")]
SHELL = [re.sub(r"\\\n\s*", "", block) for block in re.findall(r"```\n(.*?)```", EXAMPLES, re.S)]
COMMANDS = [line for block in SHELL for line in block.splitlines() if line.startswith("curl ")]
PYTHON = re.findall(r"```python\n(.*?)```", EXAMPLES, re.S)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """lrp-demo/ as `lrp demo` writes it, and photo_of_a_digit.jpg; the true label of each."""
    from lrp import demo_report
    folder = tmp_path_factory.mktemp("web-docs")
    demo_report.run(str(folder / "lrp-demo"))
    index = (folder / "lrp-demo" / "index.html").read_text()
    label = int(re.search(r"digit_0\.png'><br>label (\d+)", index).group(1))
    x, y = lrp.models.mnist_digits("test", limit=50)
    k = int((y != label).nonzero()[0])  # another digit, so that the photo is not the same answer by chance
    ink = np.kron(x[k, 0].numpy(), np.ones((6, 6)))  # 168x168, written on a larger sheet of paper
    paper = np.full((240, 200), 235.0)
    paper[30:198, 20:188] -= ink * 200
    Image.fromarray(paper.astype("uint8")).convert("RGB").save(folder / "photo_of_a_digit.jpg", quality=90)
    return folder, {"lrp-demo/digit_0.png": label, "photo_of_a_digit.jpg": int(y[k])}


@pytest.fixture(scope="module")
def client():
    return TestClient(create_app(["mnist"]))


def ink_share(answer: dict, folder: Path) -> float:
    """The share of positive relevance on the ink of lrp-demo/digit_0.png (its dark pixels, at 28x28)."""
    ink = np.asarray(Image.open(folder / "lrp-demo/digit_0.png").convert("L").resize((28, 28))) < 128
    positive = np.clip(np.asarray(answer["relevance"])[0], 0, None)
    return float(positive[ink].sum() / positive.sum())


def request(client, command: str, folder: Path):
    """Send what a curl command line sends (-F fields and @files, -H headers, -d data) to the app."""
    args = shlex.split(command)[1:]
    fields, uploads, headers, body, url = {}, {}, {}, None, None
    it = iter(args)
    for arg in it:
        if arg == "-F":
            key, value = next(it).split("=", 1)
            if value.startswith("@"):
                uploads[key] = (Path(value[1:]).name, (folder / value[1:]).read_bytes())
            else:
                fields[key] = value
        elif arg == "-H":
            key, value = next(it).split(":", 1)
            headers[key.strip()] = value.strip()
        elif arg == "-d":
            body = next(it)
        elif arg.startswith("http"):
            url = arg
        elif arg != "-s":
            raise AssertionError(f"the test does not know curl's {arg}")
    path = urlparse(url).path
    if body is not None:
        return client.post(path, content=body, headers=headers)
    return client.post(path, files=uploads, data=fields, headers=headers)


def test_the_examples_are_there():
    assert len(COMMANDS) >= 5 and len(PYTHON) == 1


@pytest.mark.parametrize("command", COMMANDS)
def test_curl_example_explains_the_digit(command, files, client, tmp_path):
    folder, labels = files
    curl, _, pipe = command.partition(" | ")
    answer = request(client, curl, folder)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    sent = next((name for name in labels if name in curl), None)
    if sent is not None:  # a picture of a digit: the model reads the digit, not the paper
        assert body["prediction_label"] == str(labels[sent]), (command, body["probabilities"])
    if sent == "lrp-demo/digit_0.png" and "target=" not in curl:  # the relevance for it lies on the ink
        raw = request(client, curl.replace(" http", " -F raw=true http", 1), folder).json()
        assert ink_share(raw, folder) > 0.5  # about 0.7; 0.1 when the background is read as the digit
    if pipe:  # the heatmap as a file
        code = shlex.split(pipe)[2]
        subprocess.run([sys.executable, "-c", code], input=answer.text, text=True, cwd=tmp_path, check=True)
        assert Image.open(tmp_path / "heatmap.png").size[0] >= 224


def test_python_example(files, client, monkeypatch, capsys):
    folder, labels = files
    monkeypatch.chdir(folder)

    def post(url, **kwargs):
        return client.post(urlparse(url).path, **kwargs)

    namespace = {}
    code = PYTHON[0].replace("import httpx\n", "")
    exec(compile(code, "docs/web.md", "exec"), {"httpx": SimpleNamespace(post=post), **namespace})
    printed = capsys.readouterr().out.split()
    assert printed[0] == str(labels["lrp-demo/digit_0.png"]) and float(printed[1]) > 0.5


def test_without_invert_the_demo_digit_is_misread(files, client):
    """Why the examples send invert=true: dark ink on white, read as it is, is mostly 'ink' everywhere."""
    folder, labels = files
    body = request(client, "curl -F image=@lrp-demo/digit_0.png -F raw=true http://127.0.0.1:8000/api/explain",
                   folder).json()
    inverted = request(client, "curl -F image=@lrp-demo/digit_0.png -F raw=true -F invert=true "
                               "http://127.0.0.1:8000/api/explain", folder).json()
    assert ink_share(inverted, folder) > 0.5 > 0.2 > ink_share(body, folder)
    assert json.dumps(inverted["prediction_label"]) == json.dumps(str(labels["lrp-demo/digit_0.png"]))
