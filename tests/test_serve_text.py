"""``lrp serve`` with text models: the JSON API for texts (FastAPI's TestClient, and a real uvicorn server for
concurrent requests), the example texts, /api/models, and serving a Hugging Face text classifier."""

from __future__ import annotations

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

from lrp.errors import ModelError  # noqa: E402
from lrp.pipeline.text import TextPipeline  # noqa: E402
from lrp.spam import SPAM_ACCURACY, spam_examples  # noqa: E402
from lrp.web.app import create_app  # noqa: E402
from lrp.web.schemas import MAX_TEXT_CHARS  # noqa: E402
from lrp.web.service import MAX_BYTES  # noqa: E402
from serve_fixtures import live_server  # noqa: E402

SPAMMY = "Congratulations! You have WON a FREE prize: click here http://win.example.com to claim it now!!!"
HAMMY = "Hi Tom, the meeting about the apt repository is moved to Thursday. Can you review the patch first?"
MIXED = "Re: your order\n\nThanks   for the free\tcoffee, see you at the conference tomorrow.\n\n-- Anna"


@pytest.fixture(scope="module")
def app():
    return create_app()  # the default: mnist, spam and vqa


@pytest.fixture(scope="module")
def client(app):
    return TestClient(app)


@pytest.fixture(scope="module")
def spam():
    """The spam pipeline loaded on its own, as the Python API gives it."""
    return TextPipeline.load("spam")


def explain(client, text, **fields):
    response = client.post("/api/explain", json={"model": "spam", "text": text, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def error_of(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    return body["error"]


# --------------------------------------------------------------------------- models and examples

def test_default_app_serves_mnist_and_spam_with_its_accuracy(client):
    body = client.get("/api/models").json()
    mnist, spam, vqa = body["models"]
    assert vqa["name"] == "vqa" and vqa["modality"] == "vqa"
    assert mnist["name"] == "mnist" and mnist["modality"] == "image" and mnist["accuracy"] is None
    assert mnist["drawable"] is True and mnist["preprocessing"]["size"] == 28
    assert spam["name"] == "spam" and spam["modality"] == "text" and spam["kind"] == "spam"
    assert spam["classes"] == ["ham", "spam"] and spam["num_classes"] == 2
    assert spam["accuracy"] == pytest.approx(SPAM_ACCURACY, abs=1e-12)
    assert spam["max_tokens"] == 512 and spam["truncates"] is True
    assert spam["drawable"] is False and spam["input_shape"] is None and spam["preprocessing"] is None
    assert spam["default_composite"] == "epsilon" and "epsilon" in spam["composites"]
    assert "epsilon-gamma-box" not in spam["composites"]  # z^B needs a value range: token ids have none
    assert body["limits"] == {"max_bytes": MAX_BYTES, "max_side": 4096, "max_text_chars": MAX_TEXT_CHARS}


def test_examples_are_the_held_out_mails(client):
    examples = client.get("/api/examples?model=spam").json()
    assert client.get("/api/examples").json() == examples  # the first text model by default
    mails = spam_examples()
    assert [(e["id"], e["label"], e["label_name"], e["text"], e["group"]) for e in examples] == [
        (m.id, m.label, m.label_name, m.text, m.group) for m in mails]
    assert sorted(e["label_name"] for e in examples) == ["ham"] * 10 + ["spam"] * 10
    assert all(e["text"].startswith(e["subject"]) and "\n" not in e["subject"] for e in examples)


def test_examples_are_recognised(client, spam):
    for example in spam_examples()[:4]:
        body = explain(client, example.text)
        assert body["prediction_label"] == spam.explain(example.text).predicted_label


# --------------------------------------------------------------------------- explaining

@pytest.mark.parametrize("target", [None, "spam", "ham", 0, 1, "pred"])
def test_explanation_equals_the_python_call(client, spam, target):
    body = explain(client, SPAMMY, target=target)
    expected = spam.explain(SPAMMY, target=target)
    assert body["tokens"] == expected.encoded.tokens
    assert len(body["tokens"]) == len(body["relevance"]) == len(body["spans"]) == len(body["special"])
    np.testing.assert_allclose(body["relevance"], expected.relevance.numpy(), rtol=1e-5, atol=1e-6)
    assert body["target"] == expected.target and body["target_label"] == expected.explained
    assert body["prediction"] == expected.predicted and body["prediction_label"] == expected.predicted_label
    np.testing.assert_allclose(body["probabilities"], expected.probabilities, atol=1e-6)
    assert body["score"] == pytest.approx(expected.score, rel=1e-5)
    assert body["relevance_sum"] == pytest.approx(float(expected.relevance.sum()), rel=1e-5, abs=1e-6)
    assert body["relevance_sum"] == pytest.approx(body["score"], rel=1e-3)  # epsilon conserves here
    assert body["spans"] == [list(s) for s in expected.encoded.spans]
    assert body["text"] == SPAMMY and body["truncated"] is False and body["max_tokens"] == 512
    assert body["composite"] == "epsilon" and body["model"] == "spam" and body["elapsed_ms"] > 0
    assert body["html"] is None
    from lrp.spam import explain_text  # the documented one-call Python API gives the same
    one_call = explain_text(SPAMMY, target=None if target == "pred" else target)
    np.testing.assert_allclose(body["relevance"], one_call.relevance.numpy(), rtol=1e-5, atol=1e-6)


def test_default_target_is_the_prediction(client):
    for text in (SPAMMY, HAMMY):
        body = explain(client, text)
        assert body["target"] == body["prediction"]
    assert explain(client, SPAMMY)["prediction_label"] == "spam"
    assert explain(client, HAMMY)["prediction_label"] == "ham"


def test_the_other_class_is_exactly_minus(client):
    for_spam = explain(client, MIXED, target="spam")
    for_ham = explain(client, MIXED, target="ham")
    assert for_spam["opposite_label"] == "ham" and for_ham["opposite_label"] == "spam"
    np.testing.assert_allclose(for_ham["relevance"], -np.array(for_spam["relevance"]), atol=1e-6)
    assert for_ham["score"] == pytest.approx(-for_spam["score"], rel=1e-5)
    assert for_ham["prediction"] == for_spam["prediction"]  # the prediction does not change


def test_words_sum_their_tokens(client, spam):
    body = explain(client, MIXED, target="spam")
    words, relevance, spans, text = body["words"], body["relevance"], body["spans"], body["text"]
    expected = spam.explain(MIXED, target="spam").words()
    assert [w["word"] for w in words] == [w for w, _, _ in expected]
    assert [w["tokens"] for w in words] == [p for _, _, p in expected]
    positions = [p for w in words for p in w["tokens"]]
    assert positions == sorted(set(positions))  # each token in one word at most, in order
    for w in words:
        assert w["relevance"] == pytest.approx(sum(relevance[p] for p in w["tokens"]), rel=1e-6, abs=1e-7)
        assert w["word"] == text[spans[w["tokens"][0]][0]:spans[w["tokens"][-1]][1]]
    outside = set(range(len(relevance))) - set(positions)
    assert outside and all(not text[slice(*spans[p])].strip() for p in outside)  # white space only
    assert [w["word"] for w in words][:4] == ["Re:", "your", "order", "Thanks"]


def test_words_and_html_on_request(client, spam):
    plain = explain(client, HAMMY, words=False, html=True)
    assert plain["words"] is None
    assert plain["html"].startswith('<div class="lrp-tokens"') and plain["html"].count("data-relevance=") == len(
        plain["tokens"])
    merged = explain(client, HAMMY, html=True)
    values = [float(v) for v in re.findall(r'data-relevance="([^"]+)"', merged["html"])]
    expected = spam.explain(HAMMY).token_html(merge=True)
    np.testing.assert_allclose(values, [float(v) for v in re.findall(r'data-relevance="([^"]+)"', expected)],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("composite", ["epsilon-plus", "lrp0", "layered"])
def test_composites(client, spam, composite):
    body = explain(client, HAMMY, composite=composite, target="spam")
    expected = spam.explain(HAMMY, target="spam", composite=composite)
    assert body["composite"] == composite
    np.testing.assert_allclose(body["relevance"], expected.relevance.numpy(), rtol=1e-5, atol=1e-6)


def test_a_raw_mail_is_read_as_subject_and_body(client, spam):
    raw = "From: a@example.com\nTo: b@example.com\nSubject: Cheap meds\n\nBuy now, best prices online!\n"
    body = explain(client, raw)
    assert body["text"] == spam.encode(raw).text != raw
    assert body["text"].startswith("Cheap meds") and "From:" not in body["text"]


def test_a_long_text_is_cut_to_what_the_model_reads(client):
    text = "free money for you " * 1500  # 28,500 characters, far over 512 tokens
    body = explain(client, text)
    assert body["truncated"] is True and len(body["tokens"]) == 512 == len(body["relevance"])


# --------------------------------------------------------------------------- errors

EIGHT = [[0.0] * 28] * 28
ERRORS = {
    "empty": (422, {"model": "spam", "text": ""}, ["text: empty"]),
    "white-space": (422, {"model": "spam", "text": " \n\t  "}, ["only white space"]),
    "oversized": (413, {"model": "spam", "text": "a" * (MAX_TEXT_CHARS + 1)}, ["100,001", "at most 100,000"]),
    "unknown-target": (400, {"model": "spam", "text": "hello", "target": "eggs"}, ["ham, spam"]),
    "target-out-of-range": (400, {"model": "spam", "text": "hello", "target": 2}, ["out of range"]),
    "text-to-mnist": (422, {"model": "mnist", "text": "hello"}, ["'mnist' reads images", "text model (spam)"]),
    "array-to-spam": (422, {"model": "spam", "array": EIGHT}, ["'spam' reads text", "image model (mnist)"]),
    "text-and-array": (422, {"text": "hello", "array": EIGHT}, ["not both"]),
    "unknown-field": (422, {"model": "spam", "text": "hello", "colour": "red"}, ["colour"]),
    "image-option": (422, {"model": "spam", "text": "hello", "preprocess": "digit"}, ["preprocess"]),
    "text-not-a-string": (422, {"model": "spam", "text": ["hello"]}, ["text"]),
    "text-missing": (422, {"model": "spam", "target": "spam"}, ["text", "required"]),
    "composite-for-pixels": (422, {"model": "spam", "text": "hello", "composite": "epsilon-gamma-box"},
                             ["value range", "epsilon"]),
    "unknown-composite": (422, {"model": "spam", "text": "hello", "composite": "magic"}, ["unknown composite"]),
    "unknown-model": (422, {"model": "gpt-17", "text": "hello"}, ["unknown model", "mnist, spam"]),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_error_status_and_message(client, case):
    status, body, words = ERRORS[case]
    message = error_of(client.post("/api/explain", json=body), status)
    for word in words:
        assert word in message, message


def test_an_image_upload_to_the_text_model_and_examples_of_an_image_model(client):
    message = error_of(client.post("/api/explain", files={"image": ("a.png", b"\x89PNG", "image/png")},
                                   data={"model": "spam"}), 422)
    assert "'spam' reads text" in message
    assert "/api/samples" in error_of(client.get("/api/examples?model=mnist"), 422)
    assert "unknown model" in error_of(client.get("/api/examples?model=nope"), 422)


def test_text_without_a_model_goes_to_the_text_model_and_arrays_to_the_image_model(client):
    assert client.post("/api/explain", json={"text": SPAMMY}).json()["model"] == "spam"
    assert client.post("/api/explain", json={"array": EIGHT}).json()["model"] == "mnist"


def test_an_app_with_only_a_text_model():
    client = TestClient(create_app(["spam"]))
    info = client.get("/api/models").json()
    assert [m["name"] for m in info["models"]] == ["spam"] and info["limits"]["max_text_chars"] == MAX_TEXT_CHARS
    assert "no image model is served" in error_of(client.post("/api/explain", json={"array": EIGHT}), 422)
    assert client.post("/api/explain", json={"text": HAMMY}).status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"ExplainTextResponse", "TextExample", "ModelInfo"} <= set(schema["components"]["schemas"])
    body = schema["paths"]["/api/explain"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert [s["title"] for s in body["oneOf"]] == ["ExplainArrayRequest", "ExplainTextRequest"]
    assert "/api/examples" in schema["paths"]


def test_an_image_only_app_refuses_texts():
    client = TestClient(create_app(["mnist"]))
    assert "max_text_chars" not in client.get("/api/models").json()["limits"]
    assert "no text model is served" in error_of(client.post("/api/explain", json={"text": "hi"}), 422)


# --------------------------------------------------------------------------- the examples in docs/web.md

DOC = (Path(__file__).resolve().parent.parent / "docs" / "web.md").read_text()
TEXT_DOC = DOC[DOC.index("### `POST /api/explain` with a text"):DOC.index("### Examples")]
CURL = [line for block in re.findall(r"```\n(.*?)```", TEXT_DOC, re.S)
        for line in re.sub(r"\\\n\s*", "", block).splitlines() if line.startswith("curl ")]


def test_the_text_examples_of_the_docs_run(client, spam):
    assert len(CURL) == 3
    for command in CURL:
        args = shlex.split(command)[1:]
        url = urlparse(args[-1])
        if "-d" not in args:
            response = client.get(f"{url.path}?{url.query}")
            assert response.status_code == 200 and len(response.json()) == 20
            continue
        assert args[:2] == ["-H", "Content-Type: application/json"] and args[2] == "-d" and len(args) == 5
        response = client.post(url.path, content=args[3], headers={"Content-Type": "application/json"})
        assert response.status_code == 200, response.text
        sent = json.loads(args[3])
        expected = spam.explain(sent["text"], target=sent.get("target"))
        assert response.json()["target_label"] == expected.explained
        np.testing.assert_allclose(response.json()["relevance"], expected.relevance.numpy(), rtol=1e-5, atol=1e-6)


def test_the_python_example_of_the_docs(client, capsys):
    (code,) = re.findall(r"```python\n(.*?)```", TEXT_DOC, re.S)

    def post(url, **kwargs):
        return client.post(urlparse(url).path, **kwargs)

    exec(compile(code.replace("import httpx\n", ""), "docs/web.md", "exec"), {"httpx": SimpleNamespace(post=post)})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("spam ") and float(lines[0].split()[1]) > 0.5 and len(lines) == 4
    values = [float(line.split()[-1]) for line in lines[1:]]
    assert values == sorted(values, reverse=True) and values[0] > 0


# --------------------------------------------------------------------------- a real server

def test_concurrent_texts_are_each_answered_correctly(app, spam):
    texts = [SPAMMY, HAMMY, MIXED] + [m.text for m in spam_examples()[:5]]
    jobs = [(text, target) for text in texts for target in ("spam", "ham")]
    expected = [spam.explain(text, target=target) for text, target in jobs]
    with live_server(app) as url:
        def one(job):
            return httpx.post(f"{url}/api/explain", json={"text": job[0], "target": job[1]}, timeout=60).json()
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, jobs))
    for answer, outcome in zip(answers, expected):
        assert answer["target_label"] == outcome.explained
        np.testing.assert_allclose(answer["relevance"], outcome.relevance.numpy(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- Hugging Face and the command line

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    pytest.importorskip("transformers")
    from serve_fixtures import text_checkpoints
    return text_checkpoints(tmp_path_factory.mktemp("text-checkpoints"))


def test_a_hugging_face_classifier_is_served(checkpoints):
    spec = f"hf:{checkpoints['classifier']}"
    client = TestClient(create_app(["mnist", spec]))
    info = client.get("/api/models").json()["models"][1]
    assert info["name"] == spec and info["modality"] == "text" and info["kind"] == "huggingface"
    assert info["classes"] == ["negative", "neutral", "positive"] and info["accuracy"] is None
    assert info["max_tokens"] == 64 and info["truncates"] is False
    text = "the film was good, free money"
    body = client.post("/api/explain", json={"model": spec, "text": text, "target": "positive"}).json()
    expected = TextPipeline.load(spec).explain(text, target="positive")
    assert body["tokens"] == expected.encoded.tokens and body["special"] == expected.encoded.special
    assert body["special"][0] and body["spans"][0] is None  # <s>: a special token, at no characters
    np.testing.assert_allclose(body["relevance"], expected.relevance.numpy(), rtol=1e-4, atol=1e-9)
    assert body["target_label"] == "positive" and body["opposite_label"] is None
    for w in body["words"]:
        assert w["relevance"] == pytest.approx(sum(body["relevance"][p] for p in w["tokens"]), rel=1e-5, abs=1e-12)
    assert client.get(f"/api/examples?model={spec}").json() == []
    message = error_of(client.post("/api/explain", json={"model": spec, "text": "good film " * 60}), 413)
    assert "reads at most 64" in message and "shorten" in message


def never_serve(monkeypatch):
    """The command must fail before uvicorn starts: if it got there, fail instead of serving for ever."""
    import uvicorn

    def run(*args, **kwargs):
        raise AssertionError("lrp serve started a server")
    monkeypatch.setattr(uvicorn, "run", run)


def test_a_causal_language_model_is_refused_with_the_way_out(checkpoints, capsys, monkeypatch):
    from lrp.cli import main
    from lrp.web.server import load_models
    never_serve(monkeypatch)
    spec = f"hf:{checkpoints['causal-lm']}"
    with pytest.raises(ModelError, match="causal language model.*lrp explain --model"):
        load_models([{"model": spec}])
    assert main(["serve", "--model", spec]) == 2
    assert "lrp serve explains text classifiers" in capsys.readouterr().err


def test_serve_options_for_text_models(capsys, monkeypatch):
    from lrp.cli import build_parser, main
    from lrp.web.server import load_models
    from lrp.web.text_service import ServedText
    never_serve(monkeypatch)
    assert build_parser().parse_args(["serve", "--model", "spam"]).served == [{"model": "spam"}]
    assert main(["serve", "--model", "spam", "--weights", "w.pt"]) == 2
    assert "--weights applies to image models" in capsys.readouterr().err
    assert main(["serve", "--model", "mnist", "--model", "spam", "--invert"]) == 2
    assert "--invert applies to image models" in capsys.readouterr().err
    models = load_models([])  # lrp serve without --model
    assert [m.name for m in models] == ["mnist", "spam", "vqa"] and isinstance(models[1], ServedText)
    assert models[1].model.training is False and torch.is_grad_enabled()
