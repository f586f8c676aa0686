"""The web page at `/` in headless Chromium (Debian's package), driven by Playwright.

Set VISIONSERVE_DOCS_SCREENSHOT=docs/web.png to also refresh the README's screenshot.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import shared_file

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SAM_LIGHT = "sam-segmentation-light"  # tiny random-weight ViT in the test service
RUN_TIMEOUT_MS = 90_000


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (`make browser`)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser, service):
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    page = context.new_page()
    page.requests = []
    page.allowed = [service["url"], "blob:", "data:"]
    page.console_errors = []
    page.on("request", lambda r: page.requests.append(r.url))
    page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
    page.on("pageerror", lambda e: page.console_errors.append(str(e)))
    page.goto(service["url"] + "/")
    page.wait_for_selector("body[data-state=idle]", timeout=30_000)
    yield page
    # Offline by design: the page may only ever talk to the service that served it.
    outside = [u for u in page.requests if not u.startswith(tuple(page.allowed))]
    assert outside == [], f"requests outside the service: {outside}"
    assert page.console_errors == []
    context.close()


@pytest.fixture(scope="module")
def sample() -> Path:
    return shared_file("images", "pigo_sample.jpg")


def run_and_wait(page, expect: str = "done") -> None:
    page.click("#run")
    page.wait_for_selector("body[data-state=done], body[data-state=error]", timeout=RUN_TIMEOUT_MS)
    state = page.get_attribute("body", "data-state")
    assert state == expect, page.text_content("#error")


def save_screenshot(page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    docs = os.environ.get("VISIONSERVE_DOCS_SCREENSHOT")
    if docs:
        from PIL import Image  # only for the README's copy: a palette PNG is a fraction

        image = Image.open(path).convert("RGB")
        image.quantize(colors=256, dither=Image.Dither.NONE).save(docs, optimize=True)
        print(f"docs screenshot: {docs}")


def test_upload_and_detect_one_face(page, sample, tmp_path):
    page.select_option("#model", "cnn-face-detection")
    assert page.input_value("#param-confidence") == "0.85"  # the configured default
    page.set_input_files("#file", str(sample))
    page.wait_for_function("document.getElementById('original-image').naturalWidth > 0")
    run_and_wait(page)

    assert page.locator("#items li").count() == 1
    assert page.text_content("#summary") == "1 face found"
    assert page.eval_on_selector("#result-image", "img => img.naturalWidth") == 320
    assert page.eval_on_selector("#result-image", "img => img.naturalHeight") == 400
    assert page.is_visible("#download")
    assert page.get_attribute("#download", "download") == "pigo_sample-cnn-face-detection.jpg"
    assert not page.is_visible("#raw-json")  # collapsed until asked for
    page.click("#raw summary")
    raw = json.loads(page.text_content("#raw-json"))
    assert raw["count"] == 1 and raw["filename"] == "pigo_sample.jpg"
    # One request for the run: the boxes are drawn in the page from the JSON answer.
    runs = [u for u in page.requests if "/v1/detect/" in u]
    assert len(runs) == 1 and runs[0].endswith("format=json")
    page.click("#raw summary")
    save_screenshot(page, tmp_path / "web.png")


def test_errors_show_the_services_detail(page, sample):
    page.select_option("#model", "cnn-face-detection")
    page.set_input_files("#file", str(sample))
    page.fill("#param-confidence", "7")
    run_and_wait(page, expect="error")
    assert page.is_visible("#error")
    text = page.text_content("#error")
    assert "422 bad_parameter" in text and "confidence=7.0 is out of range" in text
    # Chromium logs every 4xx response; this one is the point of the test.
    page.console_errors[:] = [e for e in page.console_errors if "status of 422" not in e]


def test_url_input_is_fetched_by_the_service(page, image_server, sample_url):
    page.allowed.append(image_server)  # the browser shows the original from there too
    page.select_option("#model", "face-detect-pigo")
    page.fill("#image-url", sample_url)
    page.press("#image-url", "Enter")  # submits the form, like clicking Run
    page.wait_for_selector("body[data-state=done], body[data-state=error]", timeout=RUN_TIMEOUT_MS)
    assert page.get_attribute("body", "data-state") == "done", page.text_content("#error")
    assert page.locator("#items li").count() == 1
    assert page.eval_on_selector("#result-image", "img => img.naturalWidth") == 320
    # That server sends no CORS headers, so the page cannot read the original's pixels and
    # asks the service for its rendered picture as well.
    runs = [u.rsplit("?", 1)[-1] for u in page.requests if "/v1/detect/" in u]
    assert runs == ["format=json", "format=jpeg"]
    # Chromium logs the refused CORS load of the original: expected here, not a page error.
    page.console_errors[:] = [
        e for e in page.console_errors if "CORS policy" not in e and "ERR_FAILED" not in e
    ]


def test_sam_prompted_by_a_click_then_automatic_with_progress(page, sample, sam_ready):
    page.select_option("#model", SAM_LIGHT)
    page.set_input_files("#file", str(sample))
    page.wait_for_function("document.getElementById('original-image').naturalWidth > 0")
    page.click("#original-image")  # the centre: one foreground point
    x, y = map(int, page.input_value("#points").split(","))
    assert abs(x - 160) <= 2 and abs(y - 200) <= 2
    run_and_wait(page)
    assert "mask" in page.text_content("#summary")
    assert page.eval_on_selector("#result-image", "img => img.naturalWidth") == 320

    page.click("#clear-points")
    page.fill("#param-points_per_side", "4")
    page.click("#run")
    page.wait_for_selector("#progress-box:not([hidden])")
    page.wait_for_selector("body[data-state=done], body[data-state=error]", timeout=RUN_TIMEOUT_MS)
    assert page.get_attribute("body", "data-state") == "done", page.text_content("#error")
    assert "(automatic)" in page.text_content("#summary")
    assert any("/v1/jobs/" in u for u in page.requests)
    assert page.get_attribute("#download", "download") == f"pigo_sample-{SAM_LIGHT}.png"


def test_yunet_is_the_default_and_blur_shows_the_services_picture(page, sample):
    assert page.input_value("#model") == "yunet-face-detection"
    assert page.input_value("#param-draw") == "box"  # a choice, listed for every detector
    page.set_input_files("#file", str(sample))
    page.wait_for_function("document.getElementById('original-image').naturalWidth > 0")
    run_and_wait(page)
    assert page.text_content("#summary") == "1 face found"
    assert "5 landmarks" in page.text_content("#items li")
    page.select_option("#param-draw", "blur")
    run_and_wait(page)
    # Hidden faces are the service's rendering: JSON for the list, then its JPEG.
    runs = [u.rsplit("?", 1)[-1] for u in page.requests if "/v1/detect/" in u]
    assert runs == ["format=json", "format=json", "format=jpeg"]
