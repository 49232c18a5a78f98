"""What the Chromium tests of ``lrp serve`` share: Debian's Chromium driven by Playwright, skipped with the reason
when either is missing; a page that records JavaScript errors; screenshots into pytest's tmp dir and, when set,
$LRP_SCREENSHOTS."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest

CHROMIUM = os.environ.get("LRP_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 20_000


def playwright() -> Any:
    """``playwright.sync_api``, or a skip naming what to install (also when Chromium is missing)."""
    pytest.importorskip("fastapi", reason="the web extra is not installed: pip install 'lrp[web]'")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="Playwright for Python is not installed: pip install playwright "
                                          "(the browser is Debian's: apt-get install chromium)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (Debian), or set LRP_CHROMIUM to a "
                    f"Chromium binary", allow_module_level=True)
    return sync_api


@contextmanager
def chromium(extra_args: Sequence[str] = ()) -> Iterator[Any]:
    """A headless Chromium, closed on exit."""
    sync_api = playwright()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[*ARGS, *extra_args], timeout=60_000)
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser: Any, url: str, viewport: tuple[int, int] = (1280, 900), **context: Any
              ) -> tuple[Any, Any, list[str]]:
    """``(context, page, errors)``: ``url`` loaded until the app is ready; ``errors`` collects JavaScript errors."""
    ctx = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]}, **context)
    page = ctx.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]")
    return ctx, page, errors


def screenshot(page: Any, folder: Path, name: str) -> Path:
    """The whole page as ``folder/name.png``, copied to $LRP_SCREENSHOTS when set."""
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    extra = os.environ.get("LRP_SCREENSHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / path.name)
    return path
