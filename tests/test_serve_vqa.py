"""``lrp serve`` with the VQA model: generated scenes (``GET /api/vqa/scene``), questions answered and explained
(``POST /api/vqa/explain``) as :func:`lrp.vqa.ask` answers and explains them, the ground truth, the errors, and
the model among the defaults (FastAPI's TestClient, and a real uvicorn server for concurrent questions)."""

from __future__ import annotations

import base64
import io
import json
import re
import shlex
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the web extra is not installed: pip install 'lrp[web]'")
pytest.importorskip("httpx", reason="httpx is needed for FastAPI's TestClient")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from lrp import visualize  # noqa: E402
from lrp import vqa as Q  # noqa: E402
from lrp.datasets import shapes_vqa as V  # noqa: E402
from lrp.evaluate import relevance_mass_accuracy  # noqa: E402
from lrp.web.app import create_app, load_model  # noqa: E402
from lrp.web.schemas import MAX_QUESTION_CHARS, MAX_SEED  # noqa: E402
from lrp.web.vqa_service import ServedVQA  # noqa: E402
from serve_fixtures import live_server  # noqa: E402

SEED = 7  # six objects: a green, a yellow and a blue square, a yellow and a blue circle, a blue triangle


@pytest.fixture(scope="module")
def app():
    return create_app()  # the default: mnist, spam and vqa


@pytest.fixture(scope="module")
def client(app):
    return TestClient(app)


@pytest.fixture(scope="module")
def model():
    return Q.vqa()[0]


def png(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"))


def ask(client, question: str, seed: int = SEED, **fields) -> dict:
    response = client.post("/api/vqa/explain", json={"seed": seed, "question": question, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def error_of(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    return body["error"]


def names_the_vocabulary(message: str) -> bool:
    return "circle, square, triangle, diamond" in message and "'is there a red circle?'" in message


# --------------------------------------------------------------------------- models and scenes

def test_vqa_is_served_by_default_and_listed(client):
    models = {m["name"]: m for m in client.get("/api/models").json()["models"]}
    assert list(models) == ["mnist", "spam", "vqa"]
    vqa = models["vqa"]
    assert vqa["modality"] == "vqa" and vqa["kind"] == "vqa" and vqa["input_shape"] == [3, 64, 64]
    assert vqa["classes"] == list(V.ANSWERS) and vqa["num_classes"] == 19
    assert vqa["vocabulary"] == list(V.VOCABULARY[1:]) and vqa["accuracy"] == pytest.approx(Q.VQA_ACCURACY)
    assert vqa["default_composite"] == "epsilon-plus-flat" and "epsilon-gamma-box" in vqa["composites"]
    assert models["mnist"]["vocabulary"] is None and not vqa["drawable"]
    assert isinstance(load_model("vqa"), ServedVQA)


def test_a_scene_is_the_same_for_its_seed(client):
    first = client.get(f"/api/vqa/scene?seed={SEED}").json()
    assert client.get(f"/api/vqa/scene?seed={SEED}").json() == first
    scene = V.make_scene(SEED)
    assert first["seed"] == SEED and first["size"] == 64 and first["scale"] == 4
    shown = png(first["scene"])
    assert shown.shape == (256, 256, 3)
    np.testing.assert_array_equal(shown[::4, ::4], scene.image)  # enlarged 4x, nearest neighbour: exact
    assert [(o["colour"], o["shape"]) for o in first["objects"]] == [(o.colour, o.shape) for o in scene.objects]
    other = client.get(f"/api/vqa/scene?seed={SEED + 1}").json()
    assert other["scene"] != first["scene"]


def test_the_suggested_questions_are_answered_by_the_scene(client):
    for seed in (SEED, 11, 12345):
        body = client.get(f"/api/vqa/scene?seed={seed}").json()
        scene = V.make_scene(seed)
        types = [q["type"] for q in body["questions"]]
        assert types == [t for t in V.QUESTION_TYPES if t in types] and len(types) >= 3
        for q in body["questions"]:
            assert V.ask(scene, q["question"]).answer == q["answer"]
            assert V.parse(q["question"])[0] == q["type"]
    assert len(client.get(f"/api/vqa/scene?seed={SEED}").json()["questions"]) == 5


def test_a_scene_without_a_seed_is_random_and_its_seed_gives_it_again(client):
    a, b = (client.get("/api/vqa/scene").json() for _ in range(2))
    assert 0 <= a["seed"] <= MAX_SEED and a["seed"] != b["seed"]
    assert client.get(f"/api/vqa/scene?seed={a['seed']}").json()["scene"] == a["scene"]


# --------------------------------------------------------------------------- answers and relevance

def test_answers_and_relevance_are_those_of_lrp_vqa_ask(client, model):
    scene = V.make_scene(SEED)
    questions = [q["question"] for q in client.get(f"/api/vqa/scene?seed={SEED}").json()["questions"]]
    for question in questions + ["circle circle"]:
        body = ask(client, question, raw=True)
        expected = Q.ask(scene.image, question, model=model)
        assert body["answer"] == expected.answer == body["explained"] and body["answers"] == list(V.ANSWERS)
        assert body["prediction"] == body["target"] == V.ANSWERS.index(expected.answer)
        assert body["probability"] == pytest.approx(expected.probability, rel=1e-5)
        assert body["probabilities"][body["prediction"]] == pytest.approx(expected.probability, rel=1e-5)
        assert len(body["probabilities"]) == 19 and sum(body["probabilities"]) == pytest.approx(1, abs=1e-5)
        assert max(body["probabilities"]) == body["probabilities"][body["prediction"]]
        assert [w["word"] for w in body["words"]] == expected.tokens == V.tokenize(question)
        np.testing.assert_allclose([w["relevance"] for w in body["words"]], expected.words.numpy(), rtol=1e-5,
                                   atol=1e-6)
        pixels = np.asarray(body["relevance"])
        np.testing.assert_allclose(pixels, expected.image.numpy(), rtol=1e-5, atol=1e-7)
        # no biases: the pixels and the words share the explained logit between them
        assert body["score"] == pytest.approx(expected.score, rel=1e-6)
        assert body["image_relevance_sum"] == pytest.approx(pixels.sum(), rel=1e-4, abs=1e-5)
        assert body["question_relevance_sum"] == pytest.approx(sum(w["relevance"] for w in body["words"]), abs=1e-5)
        assert body["relevance_sum"] == pytest.approx(body["image_relevance_sum"] + body["question_relevance_sum"])
        assert body["relevance_sum"] == pytest.approx(body["score"], rel=1e-3, abs=1e-3)
        assert body["composite"] == "epsilon-plus-flat" and body["modality"] == "vqa" and body["seed"] == SEED


def test_the_heatmap_and_the_scene_are_drawn_as_the_other_tabs_draw_them(client, model):
    question = "what colour is the triangle?"
    body = ask(client, question)
    assert body["relevance"] is None  # only with raw=true
    scene = V.make_scene(SEED)
    expected = Q.ask(scene.image, question, model=model)
    heat = png(body["heatmap"])
    assert heat.shape == (256, 256, 3)
    np.testing.assert_array_equal(heat[::4, ::4], np.asarray(visualize.heatmap(expected.image, "bwr")))
    np.testing.assert_array_equal(png(body["scene"])[::4, ::4], scene.image)
    over = png(body["overlay"])[::4, ::4]
    np.testing.assert_array_equal(over, np.asarray(visualize.overlay(Image.fromarray(scene.image), expected.image)))


def test_another_answer_is_explained_on_request(client, model):
    scene = V.make_scene(SEED)
    question = "is there a red circle?"
    predicted = ask(client, question)
    assert predicted["answer"] == "no" == predicted["explained"]
    for target in ("yes", "Yes", 0):
        body = ask(client, question, target=target)
        expected = Q.ask(scene.image, question, target="yes", model=model)
        assert body["answer"] == "no" and body["explained"] == "yes" and body["target"] == 0
        assert body["prediction"] == 1 and body["probabilities"] == pytest.approx(predicted["probabilities"])
        assert body["score"] == pytest.approx(expected.score, rel=1e-6) and body["score"] < predicted["score"]
        np.testing.assert_allclose([w["relevance"] for w in body["words"]], expected.words.numpy(), rtol=1e-5,
                                   atol=1e-6)
        assert body["relevance_sum"] == pytest.approx(body["score"], rel=1e-3, abs=1e-3)
    assert ask(client, question, target="pred")["explained"] == "no"
    gamma = ask(client, question, target="yes", composite="epsilon-gamma-box")  # z^B: pixels in [0, 1]
    assert gamma["composite"] == "epsilon-gamma-box" and gamma["explained"] == "yes"
    assert gamma["relevance_sum"] == pytest.approx(gamma["score"], rel=1e-3, abs=1e-3)


def test_the_ground_truth_and_where_the_relevance_lies(client):
    scene = V.make_scene(SEED)
    body = ask(client, "what colour is the triangle?", raw=True)
    truth = body["truth"]
    mask = V.ask(scene, "what colour is the triangle?").mask
    assert truth["type"] == "query_colour" and truth["answer"] == "blue"
    assert truth["correct"] is (body["answer"] == "blue")
    assert truth["mask_share"] == pytest.approx(mask.mean())
    pixels = torch.tensor(body["relevance"])[None, None]
    expected = relevance_mass_accuracy(pixels, torch.from_numpy(mask.copy())[None])
    assert truth["mass_accuracy"] == pytest.approx(float(expected[0]), rel=1e-5)
    assert truth["mass_accuracy"] > 4 * truth["mask_share"]  # the triangle holds far more than its area's share
    shaded = png(truth["mask"])[::4, ::4]
    np.testing.assert_array_equal(shaded[mask], scene.image[mask])
    assert (shaded[~mask] < scene.image[~mask]).any() and body["truth_note"] is None
    absent = ask(client, "is there a red circle?")["truth"]  # nothing answers to it: no pixels to mark
    assert absent["answer"] == "no" and absent["mask_share"] == 0 and absent["mass_accuracy"] is None
    free = ask(client, "circle circle")
    assert free["truth"] is None and "follows none of the templates" in free["truth_note"]
    ambiguous = ask(client, "what colour is the square?")  # three squares: 'the square' picks out none
    assert ambiguous["truth"] is None and "3 squares" in ambiguous["truth_note"]


# --------------------------------------------------------------------------- errors

def test_bad_questions_get_a_clear_422_with_the_vocabulary(client):
    message = error_of(client.post("/api/vqa/explain", json={"seed": SEED, "question": "is there a hexagon?"}), 422)
    assert message.startswith("question: unknown word 'hexagon'") and names_the_vocabulary(message)
    message = error_of(client.post("/api/vqa/explain", json={"seed": SEED, "question": "is there a red circel"}), 422)
    assert "did you mean 'circle'" in message and names_the_vocabulary(message)
    for empty in ("", "   ", "?!"):
        message = error_of(client.post("/api/vqa/explain", json={"seed": SEED, "question": empty}), 422)
        assert "has no words" in message and names_the_vocabulary(message)
    long = "is there a red circle " * 20
    assert len(long) > MAX_QUESTION_CHARS
    message = error_of(client.post("/api/vqa/explain", json={"seed": SEED, "question": long}), 422)
    assert "too long" in message and f"at most {MAX_QUESTION_CHARS}" in message and names_the_vocabulary(message)
    message = error_of(client.post("/api/vqa/explain", json={"seed": SEED, "question": 3}), 422)
    assert "question" in message


@pytest.mark.parametrize("target", ["maybe", 19, -1, "purple circle", "2.5"])
def test_a_target_that_is_not_an_answer_is_refused(client, target):
    message = error_of(client.post("/api/vqa/explain", json={"seed": SEED, "question": "is there a red circle?",
                                                             "target": target}), 400)
    assert message.startswith("target:") and "yes, no, red" in message and "six" in message


CASES = {
    "negative seed": ({"seed": -1, "question": "is there a red circle?"}, "seed"),
    "seed too large": ({"seed": MAX_SEED + 1, "question": "is there a red circle?"}, "seed"),
    "seed as text": ({"seed": "7", "question": "is there a red circle?"}, "seed"),
    "no seed": ({"question": "is there a red circle?"}, "seed"),
    "no question": ({"seed": SEED}, "question"),
    "target neither an index nor a word": ({"seed": SEED, "question": "is there a red circle?", "target": True},
                                           "target"),
    "unknown composite": ({"seed": SEED, "question": "is there a red circle?", "composite": "magic"},
                          "unknown composite 'magic'"),
    "unknown field": ({"seed": SEED, "question": "is there a red circle?", "image": "x"}, "image"),
    "unknown model": ({"seed": SEED, "question": "is there a red circle?", "model": "nope"}, "unknown model 'nope'"),
    "an image model": ({"seed": SEED, "question": "is there a red circle?", "model": "mnist"},
                       "questions about scenes go to a VQA model (vqa)"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_requests_get_422_naming_the_problem(client, case):
    body, expected = CASES[case]
    assert expected in error_of(client.post("/api/vqa/explain", json=body), 422)


def test_bad_scene_requests_and_other_routes(client):
    for query in ("seed=-1", f"seed={MAX_SEED + 1}", "seed=abc"):
        assert "seed" in error_of(client.get(f"/api/vqa/scene?{query}"), 422)
    assert "unknown model" in error_of(client.get("/api/vqa/scene?model=nope"), 422)
    broken = client.post("/api/vqa/explain", content=b"{not json", headers={"Content-Type": "application/json"})
    assert broken.status_code in (400, 422) and broken.json()["error"]
    for sent in ({"model": "vqa", "text": "is there a red circle?"}, {"model": "vqa", "array": [[0.5]]},
                 {"model": "vqa"}):
        message = error_of(client.post("/api/explain", json=sent), 422)
        assert "POST /api/vqa/explain" in message and "GET /api/vqa/scene" in message
    assert "GET /api/vqa/scene" in error_of(client.get("/api/examples?model=vqa"), 422)


def test_without_a_vqa_model_the_routes_say_how_to_serve_one():
    client = TestClient(create_app(["mnist"]))
    assert "start the server with --model vqa" in error_of(client.get("/api/vqa/scene"), 422)
    message = error_of(client.post("/api/vqa/explain", json={"seed": 1, "question": "is there a red circle?"}), 422)
    assert "no VQA model is served" in message


def test_the_routes_are_in_the_api_docs(client):
    schema = client.get("/openapi.json").json()
    assert {"/api/vqa/scene", "/api/vqa/explain"} <= set(schema["paths"])
    assert {"VQAExplainRequest", "VQAExplainResponse", "VQASceneResponse", "VQAWord", "VQATruth"} <= set(
        schema["components"]["schemas"])
    post = schema["paths"]["/api/vqa/explain"]["post"]
    assert {"400", "422"} <= set(post["responses"])
    question = schema["components"]["schemas"]["VQAExplainRequest"]["properties"]["question"]
    assert question["maxLength"] == MAX_QUESTION_CHARS


# --------------------------------------------------------------------------- the examples in docs/web.md

DOC = (Path(__file__).resolve().parent.parent / "docs" / "web.md").read_text()
VQA_DOC = DOC[DOC.index("### VQA: `GET /api/vqa/scene`"):DOC.index("### `POST /api/explain` with a text")]


def test_the_curl_examples_of_the_docs_run(client, model):
    commands = [line for block in re.findall(r"```\n(.*?)```", VQA_DOC, re.S)
                for line in re.sub(r"\\\n\s*", "", block).splitlines() if line.startswith("curl ")]
    assert len(commands) == 3
    for command in commands:
        args = shlex.split(command)[1:]
        url = urlparse(args[-1])
        if "-d" not in args:
            body = client.get(f"{url.path}?{url.query}").json()
            assert body["seed"] == SEED and len(body["questions"]) == 5
            continue
        assert args[:2] == ["-H", "Content-Type: application/json"] and args[2] == "-d" and len(args) == 5
        response = client.post(url.path, content=args[3], headers={"Content-Type": "application/json"})
        assert response.status_code == 200, response.text
        sent = json.loads(args[3])
        expected = Q.ask(V.make_scene(sent["seed"]).image, sent["question"], target=sent.get("target"), model=model)
        assert response.json()["explained"] == expected.explained and response.json()["answer"] == expected.answer


def test_the_python_example_of_the_docs(client, capsys):
    (code,) = re.findall(r"```python\n(.*?)```", VQA_DOC, re.S)

    def post(url, **kwargs):
        return client.post(urlparse(url).path, **kwargs)

    exec(compile(code.replace("import httpx\n", ""), "docs/web.md", "exec"), {"httpx": SimpleNamespace(post=post)})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("blue ") and lines[0].endswith("truth: blue") and len(lines) == 3
    assert lines[1].startswith("[('what', ") and lines[2].startswith("on the triangle: 0.")


# --------------------------------------------------------------------------- a real server

def test_concurrent_questions_are_each_answered_correctly(app, model):
    scene = V.make_scene(SEED)
    jobs = [(q, t) for q in ("what colour is the triangle?", "how many squares are there?", "is there a red circle?")
            for t in (None, "yes")]
    expected = [Q.ask(scene.image, q, target=t, model=model) for q, t in jobs]
    with live_server(app) as url:
        def one(job):
            return httpx.post(f"{url}/api/vqa/explain", json={"seed": SEED, "question": job[0], "target": job[1]},
                              timeout=60).json()
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(one, jobs))
    for answer, out in zip(answers, expected):
        assert answer["explained"] == out.explained and answer["answer"] == out.answer
        np.testing.assert_allclose([w["relevance"] for w in answer["words"]], out.words.numpy(), rtol=1e-5, atol=1e-6)
