"""The Text tab of ``lrp serve`` in a real headless browser: Debian's Chromium driven by Playwright.

Types a text and sees the prediction and the token heatmap, asks what speaks for the other class, switches
between words and tokens, loads a held-out mail, and takes screenshots (into pytest's tmp dir, and into
$LRP_SCREENSHOTS when set). Skipped when Chromium or Playwright is missing.
"""

from __future__ import annotations


import pytest

from browser_support import open_page, playwright  # noqa: E402

playwright()  # skips the module, naming what is missing

from lrp.pipeline.text import TextPipeline  # noqa: E402
from lrp.spam import spam_examples  # noqa: E402
from lrp.web.app import create_app  # noqa: E402
from serve_fixtures import HOLD, TEXT_DONE, TEXT_ENTERED, TEXT_GATE, held_spam, live_server  # noqa: E402

SPAMMY = "Congratulations! You have WON a FREE prize: click here http://win.example.com to claim it now!!!"
HAMMY = "Hi Tom, the meeting about the apt repository moved to Thursday.\n\nCan you review   the patch first?"


@pytest.fixture(scope="module")
def spam():
    return TextPipeline.load("spam")


@pytest.fixture(scope="module")
def server():
    # as the default app (mnist and spam), but texts with HOLD in them wait for the test to let them through
    with live_server(create_app(["mnist", held_spam()])) as url:
        yield url


def wait_for_answer(page, text: str, target: int | None = None) -> None:
    """Until the heatmap shows the answer for ``text`` as it is in the box (and for ``target``)."""
    page.wait_for_function("n => document.querySelector('#text-heat').dataset.sent === String(n)", arg=len(text))
    assert page.input_value("#text-input") == text
    if target is not None:
        page.wait_for_selector(f"#text-heat[data-target='{target}']")


def shown(page) -> list[tuple[str, float]]:
    """The coloured spans of the heatmap: their text and relevance."""
    return [(t, float(v)) for t, v in page.eval_on_selector_all(
        "#text-heat .tok", "els => els.map(e => [e.textContent, e.dataset.relevance])")]


def colours(page) -> list[tuple[int, ...]]:
    """The background colour of each coloured span, as (r, g, b)."""
    found = page.eval_on_selector_all("#text-heat .tok", "els => els.map(e => getComputedStyle(e).backgroundColor)")
    return [tuple(int(v) for v in css[css.index("(") + 1:-1].split(",")) for css in found]


def check_colours(page, values: list[float]) -> int:
    """Red for positive relevance, blue for negative (bwr), the largest magnitude fully saturated; its index."""
    found = colours(page)
    assert len(found) == len(values)
    for (r, g, b), value in zip(found, values):
        if value > 0:
            assert r == 255 and g == b
        elif value < 0:
            assert b == 255 and r == g
    strongest = max(range(len(values)), key=lambda k: abs(values[k]))
    assert found[strongest] == ((255, 0, 0) if values[strongest] > 0 else (0, 0, 255))
    return strongest


def test_type_a_text_then_see_what_speaks_for_the_other_class(page, spam, shoot):
    assert page.is_visible("#tab-text") and page.is_visible("#tab-draw") and page.is_visible("#tab-upload")
    page.click("#tab-text")
    assert page.is_visible("#text") and not page.is_visible("#draw")
    assert "held-out accuracy 98.4%" in page.inner_text("#text-about")
    page.type("#text-input", SPAMMY, delay=4)  # key by key: explained again as the typing pauses
    wait_for_answer(page, SPAMMY)
    expected = spam.explain(SPAMMY)
    assert expected.predicted_label == "spam"
    assert page.inner_text("#text-pred") == "spam"
    assert page.inner_text("#text-target") == "spam (the prediction)"
    assert "predicted" in page.get_attribute("#text-bars .bar[data-cls='1']", "class")
    words = shown(page)
    assert [w for w, _ in words] == [w for w, _, _ in expected.words()]  # words merged by default
    for (_, value), (_, relevance, _) in zip(words, expected.words()):
        assert value == pytest.approx(relevance, rel=1e-4, abs=1e-5)
    top = max(range(len(words)), key=lambda k: words[k][1])
    low = min(range(len(words)), key=lambda k: words[k][1])
    assert words[top][1] > 0 > words[low][1]  # words for spam and words for ham
    strongest = check_colours(page, [v for _, v in words])
    spam_colours = colours(page)
    page.hover(f"#text-heat .tok >> nth={top}")
    hover = page.inner_text("#text-hover")
    assert hover.startswith(words[top][0]) and "for spam" in hover
    shoot(page, "text-1-spam")

    page.click("#text-bars .bar[data-cls='0']")  # what speaks for ham?
    wait_for_answer(page, SPAMMY, target=0)
    assert page.inner_text("#text-target") == "ham" and page.inner_text("#text-pred") == "spam"
    flipped = shown(page)
    assert [w for w, _ in flipped] == [w for w, _ in words]
    for (_, before), (_, after) in zip(words, flipped):
        assert after == pytest.approx(-before, abs=1e-5)  # relevance for ham is minus that for spam
    assert check_colours(page, [v for _, v in flipped]) == strongest
    after = colours(page)
    assert after[top][2] == after[low][0] == 255 and after[top][0] < 255 and after[low][2] < 255
    assert [(b, g, r) for r, g, b in after] == spam_colours  # red and blue swap
    assert page.inner_text("#text-legend-for") == "for ham" and page.inner_text("#text-legend-against") == "for spam"
    assert "Why ham?" in page.inner_text("#text-heat-title").replace("WHY HAM?", "Why ham?")

    page.uncheck("#text-words")  # token by token, still for ham
    page.wait_for_selector("#text-heat[data-merge='false']")
    tokens = shown(page)
    ham = spam.explain(SPAMMY, target="ham")
    assert len(tokens) == len(ham.encoded.tokens)
    for (_, value), relevance in zip(tokens, ham.relevance.tolist()):
        assert value == pytest.approx(relevance, rel=1e-4, abs=1e-5)
    shoot(page, "text-2-ham-tokens")

    page.click("text=back to the prediction")
    wait_for_answer(page, SPAMMY, target=1)
    page.click("#text-clear")
    assert page.inner_text("#text-pred") == "–" and page.locator("#text-heat .tok").count() == 0


def test_an_answer_for_an_older_text_is_not_shown(page, spam):
    page.click("#tab-text")
    for event in (TEXT_ENTERED, TEXT_GATE, TEXT_DONE):
        event.clear()
    try:
        page.fill("#text-input", f"{SPAMMY} {HOLD}")  # held in the server until the gate opens
        assert TEXT_ENTERED.wait(20), "the text never reached the model"
        page.fill("#text-input", "")  # cleared while its answer is on its way
    finally:
        TEXT_GATE.set()
    assert TEXT_DONE.wait(20)
    page.wait_for_function("() => !document.querySelector('#text').classList.contains('working')")
    assert page.inner_text("#text-pred") == "–" and page.locator("#text-heat .tok").count() == 0

    page.type("#text-input", HAMMY[:20], delay=1)
    page.fill("#text-input", HAMMY)  # a paste in the middle of typing
    wait_for_answer(page, HAMMY)
    assert page.inner_text("#text-pred") == spam.explain(HAMMY).predicted_label == "ham"
    assert "Can you review" in page.inner_text("#text-heat")


def test_an_answer_for_a_replaced_text_is_never_shown(page, spam):
    """Text A is on its way when B replaces it: A's heatmap must not appear next to B, B's must follow."""
    page.click("#tab-text")
    for event in (TEXT_ENTERED, TEXT_GATE, TEXT_DONE):
        event.clear()
    page.evaluate("""() => { window.shownTexts = [];
        new MutationObserver(() => window.shownTexts.push([document.querySelector('#text-heat').dataset.sent,
                                                            document.querySelector('#text-input').value.length]))
            .observe(document.querySelector('#text-heat'), {attributes: true, attributeFilter: ['data-sent']}); }""")
    first = f"{SPAMMY} {HOLD}"
    try:
        page.fill("#text-input", first)
        assert TEXT_ENTERED.wait(20), "the text never reached the model"
        page.fill("#text-input", HAMMY)  # replaced while the first answer is held in the server
        page.wait_for_timeout(600)  # past the debounce: the new text is waiting for the first answer
    finally:
        TEXT_GATE.set()
    assert TEXT_DONE.wait(20)
    wait_for_answer(page, HAMMY)
    assert page.inner_text("#text-pred") == spam.explain(HAMMY).predicted_label
    shown_lengths = [sent for sent, _ in page.evaluate("window.shownTexts") if sent]
    assert str(len(first)) not in shown_lengths, "the heatmap of the replaced text was shown"


def test_load_a_held_out_mail(page, spam, shoot):
    page.click("#tab-text")
    options = page.locator("#text-example option").all_inner_texts()
    examples = spam_examples()
    assert len(options) == 1 + len(examples) and options[0].startswith("choose")
    k = next(i for i, m in enumerate(examples) if m.label_name == "spam" and len(m.text) > 1500)
    assert options[k + 1].startswith("spam · ")
    page.select_option("#text-example", str(k))
    wait_for_answer(page, examples[k].text)
    expected = spam.explain(examples[k].text)
    assert page.inner_text("#text-pred") == expected.predicted_label == "spam"
    assert f"{len(expected.encoded.tokens)} tokens" in page.inner_text("#text-stats")
    assert len(shown(page)) == len(expected.words())
    shoot(page, "text-3-example-mail")

    ham = next(i for i, m in enumerate(examples) if m.label_name == "ham")
    page.select_option("#text-example", str(ham))
    wait_for_answer(page, examples[ham].text)
    assert page.inner_text("#text-pred") == "ham"


def test_a_text_over_the_limit_is_refused_on_the_page(page):
    page.click("#tab-text")
    page.fill("#text-input", "a" * 100_001)
    page.dispatch_event("#text-input", "input")
    page.wait_for_selector("#error:not([hidden])")
    assert "at most 100,000" in page.inner_text("#error")
    assert "over" in page.get_attribute("#text-count", "class")


def test_tabs_follow_the_models_served(browser):
    with live_server(create_app(["spam"])) as url:
        context, page, errors = open_page(browser, url + "/#draw")
        assert not page.is_visible("#tab-draw") and not page.is_visible("#tab-upload")
        assert page.get_attribute("#tab-text", "aria-selected") == "true" and page.is_visible("#text-input")
        context.close()
        assert not errors, errors
    with live_server(create_app(["mnist"])) as url:
        context, page, errors = open_page(browser, url + "/#text")
        assert not page.is_visible("#tab-text") and page.is_visible("#pad")
        context.close()
        assert not errors, errors


def test_the_image_tabs_serve_only_image_models(page):
    page.click("#tab-upload")
    assert page.locator("#up-model option").all_inner_texts() == ["mnist"]
    page.click("#tab-draw")
    page.click("#samples button[data-label='3']")
    page.wait_for_selector("#draw-heatmap[data-target='3']")
    assert page.inner_text("#draw-pred") == "3"
