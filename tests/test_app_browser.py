"""The app in a real browser: Debian's chromium driven by Playwright, against the tiny offline models.

Screenshots go to artifacts/ (git-ignored) for people and CI logs to look at."""

from __future__ import annotations

import io
import shutil
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app
import sdxl_fast
from sdxl_fast import metadata
from test_app_helpers import running_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-quic", "--no-first-run", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
WAIT_MS = 120_000  # generous ceilings for a busy CI machine, not performance claims

sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)")


@pytest.fixture(scope="module")
def served(tiny_models):
    with running_app(tiny_models) as (url, studio):
        yield url, studio


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, served):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(WAIT_MS)
    page.goto(served[0])
    page.wait_for_selector("#prompt textarea")
    yield page
    page.close()


PROGRESS_TEXT = """() => {
    const bar = document.querySelector('#result [role="progressbar"]');
    const text = bar && bar.getAttribute('aria-valuetext');
    return text && text.includes('Step') ? text : null;
}"""


def result_text(page) -> str:
    """The result gallery's text (its captions) with whitespace collapsed."""
    return " ".join(page.locator("#result").inner_text().split())


def wait_for_result_text(page, text: str):
    page.wait_for_function(
        "t => document.querySelector('#result').innerText.replace(/\\s+/g, ' ').includes(t)", arg=text)


def shown_image(page, served_url: str) -> Image.Image:
    src = page.locator("#result img").first.get_attribute("src")
    url = src if src.startswith(("http", "data:")) else served_url.rstrip("/") + "/" + src.lstrip("/")
    with urllib.request.urlopen(url, timeout=60) as response:
        return Image.open(io.BytesIO(response.read())).convert("RGB")


def test_fast_follows_typing_and_quality_shows_progress_then_the_image(page, served):
    prompt = page.locator("#prompt textarea")
    prompt.press_sequentially("a red fox", delay=20)
    wait_for_result_text(page, "a red fox Steps:")  # the caption starts with the prompt: no button was pressed
    first = page.locator("#result img").first.get_attribute("src")
    prompt.press_sequentially(" in the snow", delay=20)
    wait_for_result_text(page, "a red fox in the snow Steps:")
    assert page.locator("#result img").first.get_attribute("src") != first
    assert "Mode: fast" in result_text(page)
    page.screenshot(path=str(ARTIFACTS / "app-fast.png"))

    page.get_by_label("Quality").check()
    page.locator("#generate-quality").wait_for(state="visible")
    steps = page.locator("#steps-quality input[type=number]")
    steps.fill("6")
    steps.press("Tab")
    page.locator("#generate-quality").click()
    # Read the bar in the same poll that finds it: it is gone as soon as the run ends.
    progress = page.wait_for_function(PROGRESS_TEXT).json_value()
    assert "/6, about" in progress and "s left" in progress, progress  # "Step i/6, about N s left: i / 6 steps"
    wait_for_result_text(page, "step ")  # a live preview of the denoising
    wait_for_result_text(page, "Mode: quality")
    assert "Steps: 6" in result_text(page)
    page.locator("#history").get_by_text("Mode: quality").first.wait_for()
    # The typed sentence's last frame went into the history with the click, after the click's own image.
    page.locator("#history").get_by_text("a red fox in the snow Steps:").first.wait_for()
    assert page.locator("#history").get_by_text("Mode: fast").count() == 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "app-quality.png"))


def test_typing_fast_coalesces_generations_and_ends_on_the_final_prompt(page, served, tiny_models):
    text = "a watercolour lighthouse on a cliff above the sea"
    before = app.generations["fast"]
    page.locator("#prompt textarea").press_sequentially(text, delay=5)  # one input event per character
    wait_for_result_text(page, text + " Steps:")
    made = app.generations["fast"] - before
    assert 1 <= made <= len(text) // 4, f"{made} generations for {len(text)} keystrokes"

    # The frame came inline with the event's answer, not as a file to fetch.
    assert page.locator("#result img").first.get_attribute("src").startswith("data:image/jpeg;base64,")
    seed = int(page.locator("#seed input").input_value())
    expected = sdxl_fast.generate(tiny_models, sdxl_fast.GenerationParams(text, mode="fast", steps=1, seed=seed,
                                                                          width=512, height=512))[0]
    shown = shown_image(page, served[0])
    expected = Image.open(io.BytesIO(metadata.jpeg_bytes(expected))).convert("RGB")  # a live frame: JPEG
    difference = np.abs(np.asarray(shown, dtype=np.int16) - np.asarray(expected, dtype=np.int16))
    assert difference.max() <= 2


def test_stop_cancels_quality_cleanly(page, served):
    page.get_by_label("Quality").check()
    page.locator("#prompt textarea").fill("a castle at dusk")
    steps = page.locator("#steps-quality input[type=number]")
    steps.fill("100")
    steps.press("Tab")
    stopped_before = app.generations["stopped"]
    page.locator("#generate-quality").click()
    page.locator('#result [role="progressbar"][aria-valuetext*="/100"]').wait_for(state="attached")
    wait_for_result_text(page, "step ")  # previews are streaming: the model is mid-run
    page.locator("#stop").click()
    for _ in range(1200):  # bounded: the worker notices Stop at its next denoising step
        if app.generations["stopped"] > stopped_before:
            break
        time.sleep(0.1)
    assert app.generations["stopped"] == stopped_before + 1
    assert "Mode: quality" not in result_text(page)

    steps.fill("2")
    steps.press("Tab")
    page.locator("#generate-quality").click()
    wait_for_result_text(page, "Mode: quality")
    assert "a castle at dusk" in result_text(page)


def test_a_server_without_fast_opens_on_quality(browser, tiny_models):
    """`--modes quality` (or a Fast model that failed to load): the page opens on the mode it can serve, with
    Quality's controls, and says why Fast is unavailable."""
    quality_only = sdxl_fast.Models(device=tiny_models.device, dtype=tiny_models.dtype, quality=tiny_models.quality)
    with running_app(quality_only, {"fast": "This server was started with --modes quality."}) as (url, _):
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(WAIT_MS)
        page.goto(url)
        page.locator("#generate-quality").wait_for(state="visible")  # hidden while the page shows Fast
        assert page.get_by_label("Quality").is_checked()
        assert page.locator("#negative").is_visible() and not page.locator("#generate-fast").is_visible()
        assert "This server was started with --modes quality." in page.inner_text("body")
        page.close()
