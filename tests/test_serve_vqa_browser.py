"""The VQA tab of ``lrp serve`` in a real headless browser: Debian's Chromium driven by Playwright.

Loads a scene and a new one, picks a suggested question and sees the answer, the heatmap over the scene and the
question's words coloured by relevance (as :func:`lrp.vqa.ask` gives them), explains another answer and goes back
to the model's, types a word the model does not know and sees the server's message next to the question, and
takes screenshots (into pytest's tmp dir, and into $LRP_SCREENSHOTS when set). Skipped when Chromium or
Playwright is missing.
"""

from __future__ import annotations


import pytest
import torch

from browser_support import open_page, playwright  # noqa: E402

playwright()  # skips the module, naming what is missing

from lrp import vqa as Q  # noqa: E402
from lrp.datasets import shapes_vqa as V  # noqa: E402
from lrp.web.app import create_app  # noqa: E402
from serve_fixtures import live_server  # noqa: E402



@pytest.fixture(scope="module")
def model():
    return Q.vqa()[0]


@pytest.fixture(scope="module")
def server():
    with live_server(create_app(["mnist", "vqa"])) as url:
        yield url


def scene_seed(page) -> int:
    page.wait_for_selector("#vqa-scene[data-seed]")
    return int(page.get_attribute("#vqa-scene", "data-seed"))


def wait_for_answer(page, seed: int, question: str, target: int) -> None:
    """Until the page shows the answer to ``question`` about scene ``seed``, explaining answer ``target``."""
    page.wait_for_function("([seed, question, target]) => { const h = document.querySelector('#vqa-heatmap');"
                           " return h.dataset.seed === seed && h.dataset.question === question &&"
                           " h.dataset.target === target && h.hasAttribute('src'); }",
                           arg=[str(seed), question, str(target)])


def words(page) -> list[tuple[str, float]]:
    return [(t, float(v)) for t, v in page.eval_on_selector_all(
        "#vqa-words .tok", "els => els.map(e => [e.textContent, e.dataset.relevance])")]


def check_colours(page, values: list[float]) -> None:
    """Red for positive relevance, blue for negative (bwr, as the Text tab), the largest magnitude saturated."""
    found = [tuple(int(v) for v in css[css.index("(") + 1:-1].split(","))[:3] for css in page.eval_on_selector_all(
        "#vqa-words .tok", "els => els.map(e => getComputedStyle(e).backgroundColor)")]
    assert len(found) == len(values)
    for (r, g, b), value in zip(found, values):
        if value > 0:
            assert r == 255 and g == b
        elif value < 0:
            assert b == 255 and r == g
    strongest = max(range(len(values)), key=lambda k: abs(values[k]))
    assert found[strongest] == ((255, 0, 0) if values[strongest] > 0 else (0, 0, 255))


def check_words(page, expected) -> None:
    shown = words(page)
    assert [w for w, _ in shown] == expected.tokens
    for (_, value), relevance in zip(shown, expected.words.tolist()):
        assert value == pytest.approx(relevance, rel=1e-4, abs=1e-5)
    check_colours(page, [v for _, v in shown])


def test_ask_about_a_scene_and_explain_another_answer(page, model, shoot):
    assert page.is_visible("#tab-vqa") and not page.is_visible("#vqa")
    page.click("#tab-vqa")
    assert page.is_visible("#vqa") and not page.is_visible("#draw")
    assert "held-out accuracy 96.2%" in page.inner_text("#vqa-about")
    first = scene_seed(page)
    first_src = page.get_attribute("#vqa-scene", "src")
    page.click("#vqa-new")
    page.wait_for_function("s => document.querySelector('#vqa-scene').dataset.seed !== s", arg=str(first))
    seed = scene_seed(page)
    assert page.get_attribute("#vqa-scene", "src") != first_src
    scene = V.make_scene(seed)
    options = page.locator("#vqa-suggest option").all_inner_texts()
    assert options[0].startswith("choose") and len(options) >= 3  # 'is there...' and 'how many...' always fit
    for question in options[1:]:
        V.ask(scene, question)  # each suggestion is a question the scene answers

    question = options[1]
    page.select_option("#vqa-suggest", "0")
    expected = Q.ask(scene.image, question, model=model)
    predicted = V.ANSWERS.index(expected.answer)
    wait_for_answer(page, seed, question, predicted)
    assert page.input_value("#vqa-question") == question
    assert page.inner_text("#vqa-answer") == expected.answer
    assert page.inner_text("#vqa-target") == f"{expected.answer} (the prediction)"
    assert "predicted" in page.get_attribute(f"#vqa-bars .bar[data-cls='{predicted}']", "class")
    assert page.locator("#vqa-bars .bar").all_inner_texts()[0].startswith("yes")  # every answer, in order
    assert page.locator("#vqa-bars .bar").count() == len(V.ANSWERS)
    check_words(page, expected)
    assert page.get_attribute("#vqa-heatmap", "src").startswith("data:image/png;base64,")
    assert page.get_attribute("#vqa-input", "src") == page.get_attribute("#vqa-scene", "src")
    assert "Ground truth:" in page.inner_text("#vqa-truth")
    heatmap = page.get_attribute("#vqa-heatmap", "src")
    page.check("#vqa-overlay")  # the heatmap over the scene instead of beside it
    page.wait_for_function("h => document.querySelector('#vqa-heatmap').src !== h", arg=heatmap)
    top = max(range(len(expected.tokens)), key=lambda k: float(expected.words[k]))
    page.hover(f"#vqa-words .tok >> nth={top}")
    hover = page.inner_text("#vqa-hover")
    assert hover.startswith(expected.tokens[top]) and f"for {expected.answer}" in hover
    shoot(page, "vqa-1-answer")

    with torch.no_grad():
        logits = model(Q.images(scene.image), torch.tensor([V.encode_question(question)]))[0]
    other = int(logits.argsort(descending=True)[1])  # the runner-up: why not that answer?
    page.click(f"#vqa-bars .bar[data-cls='{other}']")  # why not that answer?
    wait_for_answer(page, seed, question, other)
    label = V.ANSWERS[other]
    assert page.inner_text("#vqa-target") == label and page.inner_text("#vqa-answer") == expected.answer
    assert "target" in page.get_attribute(f"#vqa-bars .bar[data-cls='{other}']", "class")
    check_words(page, Q.ask(scene.image, question, target=label, model=model))
    assert page.inner_text("#vqa-legend-for") == f"for {label}"
    shoot(page, "vqa-2-other-answer")

    page.click("#vqa-explaining >> text=back to the prediction")
    wait_for_answer(page, seed, question, predicted)
    assert page.inner_text("#vqa-target") == f"{expected.answer} (the prediction)"
    check_words(page, expected)


def test_a_bad_question_is_refused_next_to_the_field(page, model, shoot):
    page.click("#tab-vqa")
    seed = scene_seed(page)
    assert not page.is_visible("#vqa-error")
    page.fill("#vqa-question", "is there a red hexagon?")
    page.press("#vqa-question", "Enter")
    page.wait_for_selector("#vqa-error:not([hidden])")
    message = page.inner_text("#vqa-error")
    assert "unknown word 'hexagon'" in message and "The model knows 28 words" in message
    assert "circle, square, triangle, diamond" in message and "is there a red circle?" in message
    assert page.inner_text("#vqa-answer") == "–"
    shoot(page, "vqa-3-bad-word")

    question = "how many circels are there?"
    page.fill("#vqa-question", question)
    page.click("#vqa-ask")
    page.wait_for_function("() => document.querySelector('#vqa-error').textContent.includes('circels')")
    assert "did you mean 'circles'" in page.inner_text("#vqa-error")
    page.fill("#vqa-question", "")
    page.press("#vqa-question", "Enter")
    page.wait_for_function("() => document.querySelector('#vqa-error').textContent.includes('has no words')")

    question = "How many circles are there"  # case and punctuation do not matter
    page.fill("#vqa-question", question)
    page.press("#vqa-question", "Enter")
    expected = Q.ask(V.make_scene(seed).image, question, model=model)
    wait_for_answer(page, seed, question, V.ANSWERS.index(expected.answer))
    assert not page.is_visible("#vqa-error") and page.inner_text("#vqa-answer") == expected.answer
    check_words(page, expected)


def test_a_new_scene_clears_the_answer(page):
    page.click("#tab-vqa")
    seed = scene_seed(page)
    page.fill("#vqa-question", "is there a red circle?")
    page.press("#vqa-question", "Enter")
    page.wait_for_selector("#vqa-heatmap[data-target]")
    page.click("#vqa-new")
    page.wait_for_function("s => document.querySelector('#vqa-scene').dataset.seed !== s", arg=str(seed))
    assert page.inner_text("#vqa-answer") == "–" and page.locator("#vqa-words .tok").count() == 0
    assert page.get_attribute("#vqa-heatmap", "src") is None
    assert page.input_value("#vqa-question") == "is there a red circle?"  # the question stays, to ask again


def test_with_only_the_vqa_model_the_page_opens_on_its_tab(browser):
    with live_server(create_app(["vqa"])) as url:
        context, page, errors = open_page(browser, url + "/#draw")
        assert not page.is_visible("#tab-draw") and not page.is_visible("#tab-upload")
        assert not page.is_visible("#tab-text") and not page.is_visible("#tab-camera")
        assert page.get_attribute("#tab-vqa", "aria-selected") == "true"
        scene_seed(page)
        assert page.is_visible("#vqa-scene") and page.is_visible("#vqa-question")
        context.close()
        assert not errors, errors
