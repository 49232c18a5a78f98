"""The Camera tab of ``lrp serve``: the WebSocket ``/api/camera``.

The protocol with Starlette's test client: a frame round-trips and its answer is the HTTP API's (and
``lrp.explain``'s) for the same image; a photo of a digit on paper is cropped, inverted and centred as a drawn
digit; errors; a slow model keeps only the latest frame; a session that closes, even mid-explanation, frees what
it held. Then the tab in Debian's Chromium with a fake camera playing a clip of a digit written on paper: frames
round-trip, the digit is read, the frames/s counter moves, and closing the page frees the server's session.
Screenshots go to pytest's tmp dir (and $LRP_SCREENSHOTS when set). The browser part is skipped when Chromium or
Playwright is missing.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the web extra is not installed: pip install 'lrp[web]'")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

import lrp  # noqa: E402
from lrp.web import camera  # noqa: E402
from lrp.web.app import create_app  # noqa: E402
from lrp.web.service import ServedModel  # noqa: E402
import browser_support  # noqa: E402
from browser_support import chromium  # noqa: E402
from serve_fixtures import CAMERA_ENTERED, CAMERA_GATE, live_server, paper_digit, png_bytes  # noqa: E402



@pytest.fixture(scope="module")
def digits():
    x, y = lrp.models.mnist_digits("test", limit=100)
    return x, y


@pytest.fixture(scope="module")
def three(digits):
    """A held-out 3 (28x28, white on black in [0, 1])."""
    x, y = digits
    return x[int((y == 3).nonzero()[0]), 0].numpy()


@pytest.fixture(scope="module")
def app():
    held = ServedModel.load("serve_fixtures:held", size=8, crop=8, grayscale=True)
    tiny = ServedModel.load("serve_fixtures:tiny_rgb", size=16, crop=16)
    return create_app(["mnist", tiny, held])


@pytest.fixture
def client(app):
    yield TestClient(app)
    assert app.state.camera.open == 0 and app.state.camera.working == 0  # every test leaves nothing behind


def jpeg(gray: np.ndarray, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gray).convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def picture(data_url: str) -> np.ndarray:
    kind, data = data_url.split(",", 1)
    assert kind in ("data:image/jpeg;base64", "data:image/png;base64")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def start(ws, **options) -> dict:
    """Read the greeting, send ``options``, return the acknowledgement."""
    ready = ws.receive_json()
    assert ready["type"] == "ready" and ready["max_frame_bytes"] == camera.MAX_FRAME_BYTES
    ws.send_text(json.dumps(options))
    answer = ws.receive_json()
    assert answer["type"] == "options", answer
    return answer


# --------------------------------------------------------------------------- the protocol

def test_a_frame_round_trips_and_matches_the_http_api_and_lrp_explain(client, app, three):
    sheet = png_bytes(Image.fromarray(paper_digit(three)))  # a clean scan: exactly 255 * (1 - digit), enlarged
    with client.websocket_connect("/api/camera") as ws:
        ack = start(ws, model="mnist", preprocess="digit", invert=True, raw=True)
        assert ack["model"] == "mnist" and ack["options"]["preprocess"] == "digit"
        assert app.state.camera.open == 1
        ws.send_bytes(sheet)
        res = ws.receive_json()
    assert res["type"] == "result" and res["number"] == 1 and res["dropped"] == 0
    assert res["prediction_label"] == "3" and res["note"] is None
    http = client.post("/api/explain", files={"image": ("three.png", sheet, "image/png")},
                       data={"preprocess": "digit", "invert": "true", "raw": "true"}).json()
    for key in ("prediction", "probabilities", "target", "score", "relevance_sum", "input_shape", "heatmap",
                "input_image", "frame", "relevance", "composite", "model"):
        assert res[key] == http[key], key
    # and lrp.explain on the digit the drawing tab makes of it
    served = app.state.models["mnist"]
    x = served.digit(1.0 - np.asarray(Image.open(io.BytesIO(sheet)), dtype=np.float32) / 255.0).x
    expected = lrp.explain(served.model, x[None], composite="epsilon-plus-flat").relevance[0]
    assert torch.allclose(torch.tensor(res["relevance"]), expected, atol=1e-5)
    # the frame comes back, its size, with the heatmap over the 28x28 grid the model saw and the rest darkened
    view = picture(res["view"])
    assert view.shape == (280, 280, 3) and (res["width"], res["height"]) == (280, 280)
    seen = res["seen"]
    assert seen == res["frame"] and 20 < seen["width"] < 280
    x0, y0 = round(seen["x"]), round(seen["y"])
    x1, y1 = round(seen["x"] + seen["width"]), round(seen["y"] + seen["height"])
    outside = np.ones((280, 280), bool)
    outside[max(0, y0):y1, max(0, x0):x1] = False
    inside = view[max(0, y0) + 2:y1 - 2, max(0, x0) + 2:x1 - 2]
    assert view[outside].mean() < 0.6 * inside.mean()  # darkened where the model does not look
    red = (inside[..., 0] > 180) & (inside[..., 1] < 140)
    ink = paper_digit(three)[max(0, y0) + 2:y1 - 2, max(0, x0) + 2:x1 - 2] < 128
    assert red.sum() > 300 and (red & ink).sum() > 0.6 * red.sum()  # red lies on the strokes
    assert set(res["timing"]) == {"decode_ms", "explain_ms", "render_ms"}


def test_a_photo_of_paper_is_cropped_inverted_and_centred(client, digits):
    """Shaded, noisy paper in a JPEG: the paper is taken out before the digit is centred, so that the model
    reads the digit; sent as it is to the HTTP API's digit preprocessing, the paper's noise counts as ink."""
    x, y = digits
    right = 0
    with client.websocket_connect("/api/camera") as ws:
        start(ws, preprocess="digit", invert=True)
        for i in range(20):
            photo = paper_digit(x[i, 0].numpy(), size=(360, 300), paper=215, ink=170, noise=5, shading=30, seed=i,
                                shift=(i % 7 - 3, i % 5 - 2))
            ws.send_bytes(jpeg(photo))
            res = ws.receive_json()
            assert res["number"] == i + 1
            right += res["prediction"] == int(y[i])
            assert res["seen"]["width"] < 300  # the grid around the ink, not the whole sheet
    assert right >= 18
    http = client.post("/api/explain", files={"image": ("p.jpg", jpeg(photo), "image/jpeg")},
                       data={"preprocess": "digit", "invert": "true"}).json()
    assert http["frame"]["width"] > 360  # the noise spread the "ink" over the whole sheet


def test_blank_paper_says_there_is_no_ink(client):
    with client.websocket_connect("/api/camera") as ws:
        start(ws, preprocess="digit", invert=True)
        ws.send_bytes(jpeg(np.clip(np.random.default_rng(0).normal(215, 5, (240, 240)), 0, 255).astype(np.uint8)))
        res = ws.receive_json()
    assert res["type"] == "result" and res["note"] == camera.NO_INK


def test_other_image_models_get_their_own_preprocessing(client):
    rgb = np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    frame = png_bytes(Image.fromarray(rgb))
    with client.websocket_connect("/api/camera") as ws:
        start(ws, model="serve_fixtures:tiny_rgb", target=2)
        ws.send_bytes(frame)
        res = ws.receive_json()
    http = client.post("/api/explain", files={"image": ("f.png", frame, "image/png")},
                       data={"model": "serve_fixtures:tiny_rgb", "target": "2"}).json()
    for key in ("prediction", "probabilities", "target", "score", "relevance_sum", "heatmap", "input_image"):
        assert res[key] == http[key], key
    assert res["input_shape"] == [3, 16, 16] and res["target"] == 2
    # resized to 16 on the shorter side and centre-cropped: the model sees the centre square of the frame
    assert abs(res["seen"]["width"] - 48) < 4 and abs(res["seen"]["height"] - 48) < 2 and res["seen"]["x"] > 4
    assert picture(res["view"]).shape == (48, 64, 3)


def test_errors_are_answered_and_the_session_goes_on(client, three):
    good = jpeg(paper_digit(three))
    with client.websocket_connect("/api/camera") as ws:
        start(ws, preprocess="digit", invert=True)
        ws.send_bytes(b"not a picture at all")
        error = ws.receive_json()
        assert error == {"type": "error", "status": 415, "number": 1,
                         "error": "frame 1: it is not an image of a supported type (PNG, JPEG, GIF, BMP, WebP, TIFF, "
                                  "PPM)"}
        ws.send_bytes(good[:len(good) // 3])  # cut short
        error = ws.receive_json()
        assert error["status"] == 400 and error["number"] == 2 and "cannot decode" in error["error"]
        for options, status, words in (
                ({"model": "nope"}, 422, "unknown model 'nope'; served: mnist, serve_fixtures:tiny_rgb"),
                ({"composite": "magic"}, 422, "unknown composite 'magic'"),
                ({"target": 12}, 400, "target"),
                ({"colour": "red"}, 422, "colour: Extra inputs are not permitted"),
                ({"model": "serve_fixtures:tiny_rgb"}, 422, "preprocess 'digit' makes a 1x28x28 digit"),
                ([1, 2], 422, "options must be a JSON object")):
            ws.send_text(json.dumps(options))
            error = ws.receive_json()
            assert error["type"] == "error" and error["status"] == status and words in error["error"], error
            assert error["error"].endswith("(the options stay as they were)") and "number" not in error
        ws.send_text("{broken")
        assert ws.receive_json()["status"] == 400
        ws.send_bytes(good)  # the options are still mnist's digit and invert
        res = ws.receive_json()
        assert res["type"] == "result" and res["number"] == 3 and res["prediction_label"] == "3"


@pytest.mark.parametrize("what", ["bytes", "pixels", "options"])
def test_too_large_closes_the_socket_with_1009(client, what):
    with client.websocket_connect("/api/camera") as ws:
        ws.receive_json()
        if what == "bytes":
            ws.send_bytes(b"\xff" * (camera.MAX_FRAME_BYTES + 1))
        elif what == "pixels":
            ws.send_bytes(png_bytes(Image.new("L", (camera.MAX_FRAME_SIDE + 1, 8))))
        else:
            ws.send_text(json.dumps({"model": "x" * camera.MAX_OPTIONS_CHARS}))
        error = ws.receive_json()
        closed = ws.receive()
    assert error["type"] == "error" and error["status"] == 413 and "too large" in error["error"]
    assert {"bytes": "2,097,153 bytes, at most 2,097,152 (2 MB)", "pixels": "1921x8 pixels, at most 1920x1920",
            "options": "at most 4,096"}[what] in error["error"]
    assert closed["type"] == "websocket.close" and closed["code"] == 1009


def test_a_slow_model_keeps_only_the_latest_frame(client, app):
    bright = png_bytes(Image.new("L", (16, 16), 255))
    dark = png_bytes(Image.new("L", (16, 16), 0))
    CAMERA_ENTERED.clear()
    CAMERA_GATE.clear()
    try:
        with client.websocket_connect("/api/camera") as ws:
            start(ws, model="serve_fixtures:held")
            ws.send_bytes(bright)  # 1: held in the model
            assert CAMERA_ENTERED.wait(30)
            for _ in range(3):  # 2, 3, 4 arrive meanwhile: each replaces the one before
                ws.send_bytes(dark)
            deadline = time.monotonic() + 10
            while app.state.camera.dropped < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert app.state.camera.working == 1
            CAMERA_GATE.set()
            first, latest = ws.receive_json(), ws.receive_json()
            assert (first["number"], latest["number"]) == (1, 4)
            assert first["dropped"] == latest["dropped"] == 2  # 2 and 3 were never explained
            ws.send_text(json.dumps({"composite": "epsilon"}))
            assert ws.receive_json()["type"] == "options"  # nothing else was on its way
    finally:
        CAMERA_GATE.set()


def test_closing_mid_explanation_frees_the_session(client, app):
    """The client goes while its frame is in the model: the session ends once the model is done with it (a
    thread running a model cannot be stopped), and nothing of it is left."""
    CAMERA_ENTERED.clear()
    CAMERA_GATE.clear()
    closed = threading.Event()

    def visit() -> None:
        with client.websocket_connect("/api/camera") as ws:
            start(ws, model="serve_fixtures:held")
            ws.send_bytes(png_bytes(Image.new("L", (16, 16), 255)))
            assert CAMERA_ENTERED.wait(30)
        closed.set()  # the test client's exit waits for the app to end

    visitor = threading.Thread(target=visit, daemon=True)
    visitor.start()
    try:
        assert CAMERA_ENTERED.wait(30)
        time.sleep(0.3)
        assert app.state.camera.open == 1 and app.state.camera.working == 1 and not closed.is_set()
    finally:
        CAMERA_GATE.set()
    visitor.join(30)
    assert closed.is_set()
    assert app.state.camera.open == 0 and app.state.camera.working == 0


def test_more_cameras_than_allowed_are_turned_away(client, app):
    app.state.camera.max_sessions = 1
    try:
        with client.websocket_connect("/api/camera") as first:
            first.receive_json()
            with client.websocket_connect("/api/camera") as second:
                error = second.receive_json()
                assert error["status"] == 503 and "try again later" in error["error"]
                assert second.receive()["code"] == 1013
            assert app.state.camera.open == 1
    finally:
        app.state.camera.max_sessions = camera.MAX_SESSIONS


def test_without_an_image_model_the_camera_is_refused():
    text_only = create_app(["spam"], warm_up=False)
    with TestClient(text_only).websocket_connect("/api/camera") as ws:
        error = ws.receive_json()
        assert error["status"] == 422 and "the camera needs an image model" in error["error"]
        assert ws.receive()["code"] == 1008
    assert text_only.state.camera.open == 0


# --------------------------------------------------------------------------- the tab in Chromium

def write_y4m(path: Path, frames: list[np.ndarray], fps: int = 30) -> None:
    """Gray frames (H, W) uint8 as a YUV4MPEG2 clip (4:2:0, neutral chroma): what Chromium's fake camera plays."""
    height, width = frames[0].shape
    chroma = np.full((height // 2) * (width // 2), 128, np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for frame in frames:
            f.write(b"FRAME\n" + frame.tobytes() + chroma + chroma)


@pytest.fixture(scope="module")
def clip(tmp_path_factory, three):
    """A second of a 3 written on paper, held a little unsteadily in front of a 640x480 camera (looped)."""
    path = tmp_path_factory.mktemp("camera") / "digit-on-paper.y4m"
    frames = [paper_digit(three, size=(640, 480), paper=215, ink=170, noise=4, shading=30, seed=k,
                          shift=(int(6 * np.sin(k / 2)), int(4 * np.cos(k / 3)))) for k in range(12)]
    write_y4m(path, frames)
    return path


@pytest.fixture(scope="module")
def browser_app():
    return create_app(["mnist"])


@pytest.fixture(scope="module")
def server(browser_app):
    with live_server(browser_app) as url:
        yield url


@pytest.fixture(scope="module")
def browser(clip):
    with chromium(["--use-fake-device-for-media-stream", f"--use-file-for-fake-video-capture={clip}"]) as launched:
        yield launched


def open_page(browser, server, **context):
    context, page, errors = browser_support.open_page(browser, server + "/#camera", **context)
    assert page.is_visible("#camera") and page.get_attribute("#tab-camera", "aria-selected") == "true"
    return context, page, errors


shoot = browser_support.screenshot


def wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def frames_shown(page) -> int:
    return int(page.get_attribute("#cam-view", "data-frames"))


def test_camera_tab_reads_a_digit_on_paper_and_frees_the_server_when_closed(browser, server, browser_app, tmp_path):
    sessions = browser_app.state.camera
    context, page, errors = open_page(browser, server, permissions=["camera"])
    try:
        assert page.input_value("#cam-preprocess") == "digit" and page.is_checked("#cam-invert")
        page.click("#cam-start")
        page.wait_for_function("Number(document.querySelector('#cam-view').dataset.frames) >= 10")
        assert sessions.open == 1
        assert page.inner_text("#cam-pred") == "3"  # the digit on paper, read
        assert page.get_attribute("#cam-view", "src").startswith("data:image/jpeg;base64,")
        assert page.is_visible("#cam-guide")
        fps = float(page.get_attribute("#cam-view", "data-fps"))
        assert fps > 1
        counted = frames_shown(page)
        page.wait_for_function(f"Number(document.querySelector('#cam-view').dataset.frames) >= {counted + 5}")
        line = page.inner_text("#cam-fps")
        assert "frames/s" in line and "280×280" in line
        assert page.get_attribute("#cam-bars .bar[data-cls='3']", "class") == "bar predicted target"
        assert sessions.dropped == 0  # the page waits for each answer: nothing to drop
        # why not an 8? one click, while the frames keep coming
        page.click("#cam-bars .bar[data-cls='8']")
        page.wait_for_function("document.querySelector('#cam-target').textContent === '8'")
        assert page.inner_text("#cam-pred") == "3"
        shoot(page, tmp_path, "camera-why-eight")
        page.click("text=back to the prediction")
        page.wait_for_function("document.querySelector('#cam-target').textContent.startsWith('3')")
        shoot(page, tmp_path, "camera")
        seconds = 3.0
        before = frames_shown(page)
        time.sleep(seconds)
        rate = (frames_shown(page) - before) / seconds
        print(f"camera tab, mnist: {rate:.1f} frames/s over {seconds:.0f} s; the page says "
              f"{page.get_attribute('#cam-view', 'data-fps')}")
        assert rate > 2
        # Stop ends the session; Start opens another
        page.click("#cam-stop")
        assert wait_for(lambda: sessions.open == 0)
        assert page.is_visible("#cam-idle")
        page.click("#cam-start")
        page.wait_for_function(f"Number(document.querySelector('#cam-view').dataset.frames) > {frames_shown(page)}")
        assert sessions.open == 1
        # another tab stops the camera
        page.click("#tab-draw")
        assert wait_for(lambda: sessions.open == 0)
        page.click("#tab-camera")
        page.click("#cam-start")
        page.wait_for_function(f"Number(document.querySelector('#cam-view').dataset.frames) > {frames_shown(page)}")
        assert sessions.open == 1
    finally:
        page.close()
        assert wait_for(lambda: sessions.open == 0 and sessions.working == 0), (sessions.open, sessions.working)
        context.close()
    assert not errors, errors


def test_a_denied_camera_says_so_on_the_page(browser, server, browser_app):
    context, page, errors = open_page(browser, server)  # no camera permission given
    try:
        page.click("#cam-start")
        page.wait_for_selector("#cam-message:not([hidden])")
        assert "not allowed" in page.inner_text("#cam-message")
        assert page.is_enabled("#cam-start") and browser_app.state.camera.open == 0
    finally:
        context.close()
    assert not errors, errors


def test_no_camera_says_so_on_the_page(browser, server):
    context, page, errors = open_page(browser, server, permissions=["camera"])
    try:
        page.evaluate("""() => { navigator.mediaDevices.getUserMedia =
            () => Promise.reject(new DOMException('Requested device not found', 'NotFoundError')); }""")
        page.click("#cam-start")
        page.wait_for_selector("#cam-message:not([hidden])")
        assert page.inner_text("#cam-message").startswith("No camera found")
    finally:
        context.close()
    assert not errors, errors
