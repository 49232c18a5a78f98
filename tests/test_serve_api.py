"""``lrp serve``: the JSON API (FastAPI's TestClient, and a real uvicorn server for concurrency)."""

from __future__ import annotations

import base64
import io
import json
import math
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the web extra is not installed: pip install 'lrp[web]'")
pytest.importorskip("httpx", reason="httpx is needed for FastAPI's TestClient")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

import lrp  # noqa: E402
from lrp.composites import COMPOSITES  # noqa: E402
from lrp.pipeline import Pipeline  # noqa: E402
from lrp.web.app import create_app  # noqa: E402
from lrp.pipeline import centre_digit  # noqa: E402
from lrp.web.service import MAX_BYTES, ServedModel  # noqa: E402
from serve_fixtures import SLOW_ENTERED, SLOW_GATE, digit_png, drawn_one, live_server, png_bytes  # noqa: E402

TINY_CLASSES = ["cat", "dog", "bird"]


@pytest.fixture(scope="module")
def digits():
    return lrp.models.mnist_digits("test", limit=32)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    classes = tmp_path_factory.mktemp("classes") / "classes.txt"
    classes.write_text("\n".join(TINY_CLASSES) + "\n")
    tiny = ServedModel.load("serve_fixtures:tiny_rgb", classes=str(classes), size=16, crop=16)
    return create_app(["mnist", tiny])


@pytest.fixture(scope="module")
def client(app):
    return TestClient(app)


def decode_png(data_url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert data_url.startswith(prefix)
    with Image.open(io.BytesIO(base64.b64decode(data_url[len(prefix):]))) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def error_of(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    return body["error"]


def upload(client, data: bytes, content_type: str = "image/png", name: str = "x.png", **fields):
    return client.post("/api/explain", files={"image": (name, data, content_type)},
                       data={k: str(v) for k, v in fields.items()})


# --------------------------------------------------------------------------- models and samples

def test_models_lists_each_model_with_shape_classes_and_composites(client):
    body = client.get("/api/models").json()
    mnist, tiny = body["models"]
    assert mnist["name"] == "mnist" and mnist["kind"] == "mnist" and mnist["drawable"] is True
    assert mnist["input_shape"] == [1, 28, 28] and mnist["num_classes"] == 10
    assert mnist["classes"] == [str(k) for k in range(10)]
    assert tiny["name"] == "serve_fixtures:tiny_rgb" and tiny["kind"] == "factory" and tiny["drawable"] is False
    assert tiny["input_shape"] == [3, 16, 16] and tiny["num_classes"] == 3 and tiny["classes"] == TINY_CLASSES
    assert tiny["preprocessing"]["crop"] == 16
    for m in (mnist, tiny):
        assert m["composites"] == list(COMPOSITES) and m["default_composite"] == "epsilon-plus-flat"
    assert body["limits"] == {"max_bytes": MAX_BYTES, "max_side": 4096}


def test_samples_are_held_out_digits_one_per_class(client):
    samples = client.get("/api/samples").json()
    assert [s["label"] for s in samples] == list(range(10))
    model = lrp.models.mnist()
    x = torch.tensor([s["array"] for s in samples])[:, None]
    assert x.shape == (10, 1, 28, 28) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert (model(x).argmax(1) == torch.arange(10)).sum() >= 9
    assert decode_png(samples[3]["image"]).shape == (28, 28, 3)


def test_page_and_static_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for name in ("app.js", "style.css"):
        assert f"/static/{name}" in page.text
        assert client.get(f"/static/{name}").status_code == 200
    docs = client.get("/docs")
    assert docs.status_code == 200 and "cdn." not in docs.text  # Swagger UI from this server
    assert client.get("/openapi.json").json()["paths"]["/api/explain"]["post"]["requestBody"]["content"].keys() == {
        "multipart/form-data", "application/json"}


# --------------------------------------------------------------------------- explaining

def test_array_explanation_equals_lrp_explain(client, digits):
    x, labels = digits
    res = client.post("/api/explain", json={"array": x[0].tolist(), "raw": True})
    assert res.status_code == 200, res.text
    body = res.json()
    model = lrp.models.mnist()
    expected = lrp.explain(model, x[:1])
    np.testing.assert_allclose(np.array(body["relevance"]), expected.relevance[0].numpy(), rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        logits = model(x[:1])[0]
    assert body["prediction"] == body["target"] == int(logits.argmax()) == int(labels[0])
    np.testing.assert_allclose(body["probabilities"], torch.softmax(logits, 0).detach().numpy(), atol=2e-6)
    assert math.isclose(sum(body["probabilities"]), 1.0, abs_tol=1e-4)
    assert body["score"] == pytest.approx(float(logits[body["target"]]), rel=1e-5)
    assert body["relevance_sum"] == pytest.approx(float(expected.relevance.sum()), rel=1e-5)
    assert body["input_shape"] == [1, 28, 28] and body["frame"] is None
    heat = decode_png(body["heatmap"])
    assert heat.shape == (224, 224, 3)  # 28x28 enlarged 8 times
    r = expected.relevance[0, 0].numpy()
    top = np.unravel_index(np.argmax(r), r.shape)
    assert tuple(heat[top[0] * 8 + 4, top[1] * 8 + 4]) == (255, 0, 0)  # the most relevant pixel: full red
    assert decode_png(body["overlay"]).shape == decode_png(body["input_image"]).shape == (224, 224, 3)


def test_raw_values_are_left_out_unless_asked(client, digits):
    body = client.post("/api/explain", json={"array": digits[0][1].tolist()}).json()
    assert body["relevance"] is None and body["heatmap"]


def test_png_upload_equals_the_array(client, digits):
    x, _ = digits
    by_array = client.post("/api/explain", json={"array": x[2].tolist(), "raw": True}).json()
    by_png = upload(client, digit_png(x[2]), raw="true").json()
    assert by_png["prediction"] == by_array["prediction"]
    np.testing.assert_allclose(by_png["relevance"], by_array["relevance"], rtol=1e-6, atol=1e-8)
    assert by_png["heatmap"] == by_array["heatmap"]
    picture = decode_png(by_png["input_image"])[::8, ::8, 0]  # the digit, as the model saw it
    np.testing.assert_array_equal(picture, np.round(x[2, 0].numpy() * 255).astype(np.uint8))


def test_two_dimensional_array_reads_as_one_channel(client, digits):
    x, _ = digits
    flat = client.post("/api/explain", json={"array": x[4, 0].tolist(), "raw": True}).json()
    full = client.post("/api/explain", json={"array": x[4].tolist(), "raw": True}).json()
    assert flat["relevance"] == full["relevance"]


@pytest.mark.parametrize("target", [7, "7"])
def test_target_selection(client, digits, target):
    x, labels = digits
    assert int(labels[0]) != 7
    body = client.post("/api/explain", json={"array": x[0].tolist(), "target": target, "raw": True}).json()
    expected = lrp.explain(lrp.models.mnist(), x[:1], target=7)
    assert body["target"] == 7 and body["target_label"] == "7" and body["prediction"] == int(labels[0])
    np.testing.assert_allclose(body["relevance"], expected.relevance[0].numpy(), rtol=1e-5, atol=1e-7)
    form = upload(client, digit_png(x[0]), target=target).json()
    assert form["target"] == 7 and form["relevance_sum"] == pytest.approx(body["relevance_sum"], rel=1e-5)


def test_target_by_class_name_and_preprocessing_of_the_model(client):
    rgb = Image.fromarray((np.random.default_rng(0).random((40, 30, 3)) * 255).astype(np.uint8))
    body = upload(client, png_bytes(rgb), model="serve_fixtures:tiny_rgb", target="bird", raw="true").json()
    assert body["target"] == 2 and body["target_label"] == "bird" and body["input_shape"] == [3, 16, 16]
    assert body["prediction_label"] == TINY_CLASSES[body["prediction"]]
    served = ServedModel.load("serve_fixtures:tiny_rgb", size=16, crop=16)
    x, _ = served.pre.from_image(rgb)
    expected = lrp.explain(served.model, x[None], target=2)
    np.testing.assert_allclose(body["relevance"], expected.relevance[0].numpy(), rtol=1e-5, atol=1e-7)
    assert decode_png(body["overlay"]).shape == (224, 224, 3)  # 16x16 enlarged 14 times


@pytest.mark.parametrize("name", list(COMPOSITES))
def test_each_composite(client, digits, name):
    x, _ = digits
    body = client.post("/api/explain", json={"array": x[5].tolist(), "composite": name, "raw": True}).json()
    assert body["composite"] == name
    comp, _ = Pipeline.load("mnist").composite(name)
    expected = lrp.explain(lrp.models.mnist(), x[5:6], composite=comp)
    np.testing.assert_allclose(body["relevance"], expected.relevance[0].numpy(), rtol=1e-4, atol=1e-6)


def test_composites_give_different_explanations(client, digits):
    x, _ = digits
    sums = {name: client.post("/api/explain", json={"array": x[6].tolist(), "composite": name, "raw": True})
            .json()["relevance"] for name in ("epsilon", "epsilon-plus-flat", "epsilon-gamma-box")}
    assert sums["epsilon"] != sums["epsilon-plus-flat"] != sums["epsilon-gamma-box"]


# --------------------------------------------------------------------------- drawings

def test_drawn_digit_is_centred_like_mnist_and_framed(client):
    drawing = drawn_one()
    body = upload(client, png_bytes(drawing), preprocess="digit", invert="false", raw="true").json()
    assert body["prediction"] == 1 and body["input_shape"] == [1, 28, 28]
    seen = decode_png(body["input_image"])[::8, ::8, 0].astype(float)
    ys, xs = np.nonzero(seen > 25)
    assert max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) == 20  # the bounding box fits 20x20
    cy = (seen.sum(1) * (np.arange(28) + 0.5)).sum() / seen.sum()
    assert abs(cy - 14) <= 1
    frame = body["frame"]
    ink = np.nonzero(np.asarray(drawing) > 0)
    assert frame["x"] <= ink[1].min() and frame["x"] + frame["width"] >= ink[1].max()
    assert frame["y"] <= ink[0].min() and frame["y"] + frame["height"] >= ink[0].max()
    assert frame["height"] == pytest.approx(28 / 20 * (ink[0].max() - ink[0].min() + 1), rel=0.05)


def test_drawing_on_white_paper_with_invert(client):
    black_on_white = Image.eval(drawn_one(), lambda v: 255 - v)
    body = upload(client, png_bytes(black_on_white), preprocess="digit", invert="true").json()
    assert body["prediction"] == 1


def test_drawing_as_array(client):
    drawing = np.asarray(drawn_one(140, 11), dtype=np.float32) / 255
    body = client.post("/api/explain", json={"array": drawing.tolist(), "preprocess": "digit"}).json()
    assert body["prediction"] == 1 and body["frame"]["width"] > 0


def test_centre_digit():
    gray = np.zeros((100, 60), dtype=np.float32)
    gray[10:90, 20:30] = 1.0
    digit, (x, y, w, h) = centre_digit(gray)
    ys, xs = np.nonzero(digit > 0.1)
    assert ys.max() - ys.min() + 1 == 20 and xs.max() - xs.min() + 1 <= 4
    assert abs((digit.sum(0) * (np.arange(28) + 0.5)).sum() / digit.sum() - 14) <= 0.5
    assert (w, h) == pytest.approx((28 / 20 * 80, 28 / 20 * 80), rel=0.05) and x < 20 and y < 10
    empty, frame = centre_digit(np.zeros((50, 40), dtype=np.float32))
    assert not empty.any() and frame == (0.0, 0.0, 40.0, 50.0)


def test_exported_program_is_served_with_its_input_shape(tmp_path):
    model = lrp.models.mnist()
    path = tmp_path / "mnist.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(1, 1, 28, 28),)), str(path))
    client = TestClient(create_app([str(path)]))
    info = client.get("/api/models").json()["models"][0]
    assert info["kind"] == "exported" and info["input_shape"] == [1, 28, 28] and info["drawable"] is True
    drawing = drawn_one()
    body = upload(client, png_bytes(drawing), preprocess="digit", raw="true").json()
    assert body["prediction"] == 1
    digit, _ = centre_digit(np.asarray(drawing, dtype=np.float32) / 255)
    expected = lrp.explain(model, torch.from_numpy(digit)[None, None]).relevance[0]
    np.testing.assert_allclose(body["relevance"], expected.numpy(), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- errors

def big_png(width: int, height: int) -> bytes:
    return png_bytes(Image.new("L", (width, height)))


ERRORS = {
    # 400: a body or image that does not decode, a bad target
    "json-syntax": (400, dict(content=b'{"array": [1,', headers={"content-type": "application/json"})),
    "json-binary": (400, dict(content=b"\xff\xfe\x00garbage", headers={"content-type": "application/json"})),
    "png-garbage": (400, dict(files={"image": ("a.png", b"\x89PNG garbage", "image/png")})),
    "png-truncated": (400, dict(files={"image": ("a.png", big_png(64, 64)[:60], "image/png")})),
    "png-empty": (400, dict(files={"image": ("a.png", b"", "image/png")})),
    "multipart-garbage": (400, dict(content=b"--xx\r\ngarbage", headers={
        "content-type": "multipart/form-data; boundary=xx"})),
    "target-out-of-range": (400, dict(json={"array": [[0.0] * 28] * 28, "target": 10})),
    "target-negative": (400, dict(json={"array": [[0.0] * 28] * 28, "target": -1})),
    "target-unknown-name": (400, dict(json={"array": [[0.0] * 28] * 28, "target": "seven"})),
    # 413: too large
    "image-too-wide": (413, dict(files={"image": ("a.png", big_png(4097, 1), "image/png")})),
    "body-too-large": (413, dict(content=b"0" * (MAX_BYTES + 1), headers={"content-type": "application/json"})),
    # 415: not an image, not a type the API reads
    "text-body": (415, dict(content=b"hello", headers={"content-type": "text/plain"})),
    "no-content-type": (415, dict(content=b"hello")),
    "text-file": (415, dict(files={"image": ("a.txt", b"hello", "text/plain")})),
    "svg-file": (415, dict(files={"image": ("a.svg", b"<svg/>", "image/svg+xml")})),
    "octet-stream-not-image": (415, dict(files={"image": ("a.bin", b"\x00\x01garbage", "application/octet-stream")})),
    "pdf-as-octet-stream": (415, dict(files={"image": ("a.bin", b"%PDF-1.4 garbage", "application/octet-stream")})),
    # 422: valid syntax, invalid request
    "array-wrong-shape": (422, dict(json={"array": [[0.0] * 5] * 5})),
    "array-ragged": (422, dict(json={"array": [[0.0, 1.0], [0.0]]})),
    "array-strings": (422, dict(json={"array": [["a"] * 28] * 28})),
    "array-nan": (422, dict(content=json.dumps({"array": [[float("nan")] * 28] * 28}).encode(),
                            headers={"content-type": "application/json"})),
    "array-missing": (422, dict(json={"composite": "lrp0"})),
    "array-not-list": (422, dict(json={"array": 3})),
    "json-not-object": (422, dict(json=[1, 2, 3])),
    "unknown-field": (422, dict(json={"array": [[0.0] * 28] * 28, "colour": "red"})),
    "unknown-composite": (422, dict(json={"array": [[0.0] * 28] * 28, "composite": "magic"})),
    "unknown-model": (422, dict(json={"array": [[0.0] * 28] * 28, "model": "resnet1000"})),
    "bad-preprocess": (422, dict(json={"array": [[0.0] * 28] * 28, "preprocess": "magic"})),
    "bad-raw-flag": (422, dict(files={"image": ("a.png", big_png(28, 28), "image/png")}, data={"raw": "maybe"})),
    "image-field-missing": (422, dict(files={"picture": ("a.png", big_png(28, 28), "image/png")})),
    "image-field-is-text": (422, dict(data={"image": "not a file"}, files={"other": ("a.png", b"x", "image/png")})),
    "image-wrong-size": (422, dict(files={"image": ("a.png", big_png(40, 30), "image/png")})),
    "digit-for-rgb-model": (422, dict(files={"image": ("a.png", big_png(28, 28), "image/png")},
                                      data={"preprocess": "digit", "model": "serve_fixtures:tiny_rgb"})),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_error_status_and_json_message(client, case):
    status, request = ERRORS[case]
    message = error_of(client.post("/api/explain", **request), status)
    assert "Traceback" not in message


def test_error_messages_say_what_is_wrong(client):
    assert "4096" in error_of(upload(client, big_png(4097, 1)), 413)
    assert "reads samples shaped (1, 28, 28)" in error_of(client.post("/api/explain",
                                                                      json={"array": [[0.0] * 5] * 5}), 422)
    assert "epsilon-plus-flat" in error_of(client.post("/api/explain", json={"array": [[0.0] * 28] * 28,
                                                                            "composite": "x"}), 422)
    assert "preprocess='digit'" in error_of(upload(client, big_png(40, 30)), 422)
    assert "out of range" in error_of(client.post("/api/explain", json={"array": [[0.0] * 28] * 28,
                                                                       "target": 12}), 400)


def test_body_too_large_while_streaming(client):
    def chunks():  # no Content-Length: the limit applies while reading
        for _ in range(11):
            yield b"0" * (1024 * 1024)
    response = client.post("/api/explain", content=chunks(), headers={"content-type": "application/json"})
    assert "10 MB" in error_of(response, 413)


def test_unknown_route_and_method_are_json_errors(client):
    error_of(client.get("/api/nothing"), 404)
    error_of(client.get("/api/explain"), 405)


def test_garbage_does_not_break_the_server(client, digits):
    rng = np.random.default_rng(1)
    for kind in ("application/json", "multipart/form-data; boundary=abc", "image/png"):
        for _ in range(5):
            response = client.post("/api/explain", content=rng.bytes(int(rng.integers(1, 5000))),
                                   headers={"content-type": kind})
            assert 400 <= response.status_code < 500 and "error" in response.json()
    assert client.post("/api/explain", json={"array": digits[0][0].tolist()}).status_code == 200


# --------------------------------------------------------------------------- a real server

@pytest.fixture(scope="module")
def server(app):
    with live_server(app) as url:
        yield url


def test_concurrent_requests_are_all_answered_correctly(server, digits):
    x, _ = digits
    model = lrp.models.mnist()
    expected = lrp.explain(model, x)
    sums = expected.relevance.flatten(1).sum(1)
    with torch.no_grad():
        preds = model(x).argmax(1)

    def one(i: int) -> tuple[int, dict]:
        if i % 2:
            r = httpx.post(f"{server}/api/explain", json={"array": x[i].tolist()}, timeout=60)
        else:
            r = httpx.post(f"{server}/api/explain", files={"image": ("d.png", digit_png(x[i]), "image/png")},
                           timeout=60)
        return r.status_code, r.json()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(32)))
    assert [status for status, _ in results] == [200] * 32
    for i, (_, body) in enumerate(results):
        assert body["prediction"] == int(preds[i])
        assert body["relevance_sum"] == pytest.approx(float(sums[i]), rel=1e-4, abs=1e-5)


def test_oversized_upload_to_a_real_server(server):
    response = httpx.post(f"{server}/api/explain", content=b"0" * (MAX_BYTES + 1),
                          headers={"content-type": "application/json"}, timeout=60)
    assert "10 MB" in error_of(response, 413)


def test_a_slow_request_does_not_block_others(digits):
    app = create_app([ServedModel.load("serve_fixtures:slow", size=8, crop=8), "mnist"])
    SLOW_ENTERED.clear()
    SLOW_GATE.clear()
    with live_server(app) as url, ThreadPoolExecutor(1) as pool:
        try:
            slow = pool.submit(httpx.post, f"{url}/api/explain", json={"array": [[1.0] * 8] * 8}, timeout=90)
            assert SLOW_ENTERED.wait(30), "the slow request never reached the model"
            fast = httpx.post(f"{url}/api/explain", json={"array": digits[0][0].tolist(), "model": "mnist"},
                              timeout=30)
            models = httpx.get(f"{url}/api/models", timeout=30)
            assert fast.status_code == 200 and models.status_code == 200
            assert not slow.done()  # both answered while the slow request is still held in the model
        finally:
            SLOW_GATE.set()
        assert slow.result().status_code == 200


# --------------------------------------------------------------------------- the command line

def test_serve_options_group_by_model():
    from lrp.cli import build_parser
    args = build_parser().parse_args(["serve", "--invert", "--model", "mnist", "--model", "resnet18", "--weights",
                                      "w.pt", "--classes", "c.txt", "--crop", "200", "--port", "9000"])
    assert args.served == [{"invert": True, "model": "mnist"},
                           {"model": "resnet18", "weights": "w.pt", "classes": "c.txt", "crop": 200}]
    assert args.port == 9000 and args.host == "127.0.0.1"
    assert build_parser().parse_args(["serve"]).served is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--model", "mnist", "--weights", "a.pt", "--weights", "b.pt"])


def run_cli(*args: str, code: str = "") -> subprocess.CompletedProcess:
    script = f"import sys\n{code}\nfrom lrp.cli import main\nsys.exit(main({list(args)!r}))"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


def test_serve_without_the_web_extra_says_what_to_install():
    result = run_cli("serve", code="sys.modules['fastapi'] = None")
    assert result.returncode == 2
    assert "pip install 'lrp[web]'" in result.stderr and "fastapi" in result.stderr


def test_serve_with_a_bad_model_spec_is_a_clear_error():
    result = run_cli("serve", "--model", "no_such_module:factory")
    assert result.returncode == 2 and "cannot import 'no_such_module'" in result.stderr


def test_served_model_and_its_inputs_go_to_its_device(monkeypatch):
    from lrp.pipeline import ModelError
    from lrp.web import service
    from lrp.web.schemas import ExplainOptions
    served = ServedModel.load("mnist", device="meta")  # a device other than the CPU, on any machine
    assert served.device == torch.device("meta") and all(p.is_meta for p in served.model.parameters())
    seen = []

    def recording_explain(model, x, **kwargs):
        seen.append(x.device)
        raise RuntimeError("recorded")

    from lrp.pipeline import pipeline
    monkeypatch.setattr(pipeline, "explain", recording_explain)
    with pytest.raises(service.ServiceError, match="recorded"):
        service.explain_array(served, np.zeros((28, 28)).tolist(), ExplainOptions())
    assert seen == [torch.device("meta")]
    with pytest.raises(ModelError, match="unknown device 'gpu0'"):
        ServedModel.load("mnist", device="gpu0")


def test_models_served_on_the_lane_device_answer_requests(device, digits):
    """``lrp serve --device``: the models load onto the device (as the CLI loads them), and a request by array, a
    PNG upload, a camera frame and a text are answered from it, with what ``lrp.explain`` gives on the CPU."""
    from device_lane import assert_matches_cpu, scalar_rel
    from lrp.web.server import load_models

    x, labels = digits
    models = load_models([{"model": "mnist"}, {"model": "spam"}], device=str(device))
    pipelines = [getattr(m, "pipeline", m) for m in models]  # a ServedText holds its TextPipeline
    assert [p.device.type for p in pipelines] == [device.type, device.type]
    assert all(w.device.type == device.type for p in pipelines for w in p.model.parameters())
    app = create_app(models)  # warms each model up on its device
    client = TestClient(app)
    cpu = lrp.models.mnist()
    for i in (0, 2):
        body = client.post("/api/explain", json={"array": x[i].tolist(), "raw": True}).json()
        by_png = upload(client, digit_png(x[i]), raw="true").json()
        expected = lrp.explain(cpu, x[i:i + 1])
        for answer in (body, by_png):
            assert answer["prediction"] == answer["target"] == int(labels[i]), answer
            assert_matches_cpu(np.asarray(answer["relevance"], dtype=np.float32), expected.relevance[0], device,
                               rtol=1e-5, atol=1e-7, what=f"digit {i}")
            assert answer["score"] == pytest.approx(float(expected.output[0, int(labels[i])]),
                                                    rel=scalar_rel(device, 1e-5))
    with client.websocket_connect("/api/camera") as ws:  # the Camera tab: a frame explained on the device
        assert ws.receive_json()["type"] == "ready"
        ws.send_text(json.dumps({"model": "mnist", "preprocess": "model", "raw": True}))
        assert ws.receive_json()["type"] == "options"
        ws.send_bytes(digit_png(x[2]))
        frame = ws.receive_json()
    assert frame["type"] == "result" and frame["prediction"] == int(labels[2]), frame
    assert_matches_cpu(np.asarray(frame["relevance"], dtype=np.float32), lrp.explain(cpu, x[2:3]).relevance[0],
                       device, rtol=1e-5, atol=1e-7, what="camera frame")
    words = "Win a FREE prize now, click here to claim your cash"
    text = client.post("/api/explain", json={"model": "spam", "text": words})  # the Text tab, on the device
    assert text.status_code == 200, text.text
    from lrp.pipeline.text import TextPipeline
    on_cpu = TextPipeline.load("spam").explain(words)
    assert text.json()["prediction"] == on_cpu.predicted
    assert_matches_cpu(np.asarray(text.json()["relevance"], dtype=np.float32), on_cpu.relevance, device, rtol=1e-5,
                       atol=1e-6, what="text")
