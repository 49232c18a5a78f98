"""``lrp serve`` in a real headless browser: Debian's Chromium driven by Playwright.

Draws a digit with the mouse, asks why another class, uploads a PNG, and takes screenshots (into pytest's tmp
dir, and into $LRP_SCREENSHOTS when set). Skipped when Chromium or Playwright is missing.
"""

from __future__ import annotations


import pytest

from browser_support import TIMEOUT_MS, open_page, playwright  # noqa: E402

playwright()  # skips the module, naming what is missing

import lrp  # noqa: E402
from lrp.web.app import create_app  # noqa: E402
from serve_fixtures import digit_png, live_server  # noqa: E402



@pytest.fixture(scope="module")
def server():
    with live_server(create_app(["mnist"])) as url:
        yield url


@pytest.fixture
def page(browser, server):
    context, page, errors = open_page(browser, server + "/", viewport=(1280, 860), accept_downloads=True)
    yield page
    context.close()
    assert not errors, errors  # no JavaScript errors on the page


def draw_one(page) -> None:
    """A '1': one slightly slanted stroke from top to bottom, with the mouse."""
    box = page.locator("#pad").bounding_box()
    x, y = box["x"] + box["width"] * 0.54, box["y"] + box["height"] * 0.15
    page.mouse.move(x, y)
    page.mouse.down()
    for i in range(1, 25):
        page.mouse.move(x - i * 0.7, y + i * box["height"] * 0.7 / 24)
    page.mouse.up()


def heat_pixels(page) -> dict:
    """Red and blue pixels of the heatmap layer over the drawing."""
    return page.evaluate("""() => {
        const c = document.querySelector('#pad-heat');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let red = 0, blue = 0;
        for (let k = 0; k < d.length; k += 4) {
            if (d[k + 3] > 60 && d[k] > 200) red++;
            if (d[k + 3] > 60 && d[k + 2] > 200) blue++;
        }
        return {red, blue};
    }""")


def test_draw_a_one_then_ask_why_seven(page, shoot):
    assert page.locator("#pad-heat").evaluate("c => c.getContext('2d').getImageData(0, 0, 280, 280).data"
                                              ".some(v => v > 0)") is False
    draw_one(page)
    page.wait_for_function("document.querySelector('#draw-heatmap').getAttribute('src')")
    assert page.inner_text("#draw-pred") == "1"
    labels = page.locator("#draw-bars .bar .label").all_inner_texts()
    assert labels == [str(k) for k in range(10)]
    assert "predicted" in page.get_attribute("#draw-bars .bar[data-cls='1']", "class")
    assert page.inner_text("#draw-target").startswith("1")
    assert page.get_attribute("#draw-heatmap", "src").startswith("data:image/png;base64,")
    assert page.get_attribute("#draw-input", "src").startswith("data:image/png;base64,")
    heat = heat_pixels(page)
    assert heat["red"] > 500  # evidence for "1" lies over the stroke
    shoot(page, "1-draw-one")

    before = page.get_attribute("#draw-heatmap", "src")
    page.click("#draw-bars .bar[data-cls='7']")
    page.wait_for_selector("#draw-heatmap[data-target='7']")
    assert page.get_attribute("#draw-heatmap", "src") != before
    assert page.inner_text("#draw-target") == "7"
    assert page.inner_text("#draw-pred") == "1"  # still predicted a 1
    assert "target" in page.get_attribute("#draw-bars .bar[data-cls='7']", "class")
    assert "relevance for 7" in page.inner_text("#draw-heatmap-caption")
    assert heat_pixels(page)["blue"] > 200  # the stroke speaks against a 7 in places
    shoot(page, "2-why-seven")

    page.click("text=back to the prediction")
    page.wait_for_selector("#draw-heatmap[data-target='1']")
    page.click("#clear")
    assert page.inner_text("#draw-pred") == "–"
    assert heat_pixels(page) == {"red": 0, "blue": 0}


def test_composite_and_sample_digits(page, shoot):
    page.click("#samples button[data-label='3']")
    page.wait_for_selector("#draw-heatmap[data-target='3']")
    assert page.inner_text("#draw-pred") == "3"  # a held-out 3, recognised
    first = page.get_attribute("#draw-heatmap", "src")
    page.select_option("#draw-composite", "epsilon-gamma-box")
    page.wait_for_function("document.querySelector('#draw-stats').textContent.includes('epsilon-gamma-box')")
    assert page.get_attribute("#draw-heatmap", "src") != first
    shoot(page, "3-sample-three-gamma-box")


def test_upload_a_png(page, shoot, tmp_path):
    x, labels = lrp.models.mnist_digits("test", limit=8)
    path = tmp_path / "digit.png"
    path.write_bytes(digit_png(x[7]))
    page.click("#tab-upload")
    assert page.is_visible("#upload") and not page.is_visible("#draw")
    page.set_input_files("#up-file", str(path))
    page.wait_for_function("document.querySelector('#up-overlay').getAttribute('src')")
    assert page.inner_text("#up-pred").startswith(f"Predicted: {int(labels[7])} (")
    for image in ("#up-input", "#up-heatmap", "#up-overlay"):
        assert page.get_attribute(image, "src").startswith("data:image/png;base64,")
        # a data URL decodes asynchronously: wait until the picture is there before reading its size
        page.wait_for_function("s => { const i = document.querySelector(s); return i.complete && i.naturalWidth > 0 }",
                               arg=image)
        assert page.locator(image).evaluate("img => img.naturalWidth") == 224
    link = page.locator("#up-download")
    assert link.is_visible()
    assert link.get_attribute("download") == f"digit_{int(labels[7])}_heatmap.png"
    assert link.get_attribute("href") == page.get_attribute("#up-heatmap", "src")
    with page.expect_download() as download:
        link.click()
    saved = tmp_path / "downloaded.png"
    download.value.save_as(saved)
    assert saved.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shoot(page, "4-upload")

    page.select_option("#up-target", "5")
    page.wait_for_function("document.querySelector('#up-explaining').textContent.startsWith('explaining: 5')")
    assert page.locator("#up-download").get_attribute("download") == "digit_5_heatmap.png"


def test_upload_of_a_non_image_shows_the_error(page, tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not a picture")
    page.click("#tab-upload")
    page.set_input_files("#up-file", str(path))
    page.wait_for_selector("#error:not([hidden])")
    assert "cannot decode the image" in page.inner_text("#error")


def test_api_docs_render_without_internet(page, server, shoot):
    page.goto(server + "/docs")
    page.wait_for_selector(".opblock-summary-path")
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert {"/api/explain", "/api/models", "/api/samples"} <= {p.strip() for p in paths}
    page.click(".opblock-post .opblock-summary")
    # Swagger UI resolves the request body after the block opens and renders its content types a moment later:
    # wait for them (expect retries until the timeout) instead of reading whatever is there at once
    options = page.locator(".opblock-post .body-param-content-type select option")
    playwright().expect(options).to_have_count(2, timeout=TIMEOUT_MS)
    assert set(options.all_inner_texts()) == {"multipart/form-data", "application/json"}
    shoot(page, "5-api-docs")
