"""The demo page in a real headless browser: Debian's Chromium (`.ci/browser` installs it) driven by Playwright.
Loads the page, uploads an image, asks a question, and checks that the answers and the overlay appear; bad input
shows a message in the page. With VLMEFF_DEMO_SCREENSHOT=path the answered page is saved there (the README's
screenshot: `VLMEFF_DEMO_SCREENSHOT=docs/demo.png pytest tests/test_demo_browser.py`)."""
import os
import shutil
import socket

import pytest

pytest.importorskip("gradio")
pytest.importorskip("easy_vqa")
sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("no Chromium: run .ci/browser (apt-get install chromium)", allow_module_level=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url():
    from vlmeff.demo.app import launch
    port = free_port()
    app = launch("tiny-llava-evqa", port=port, block=False)
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--headless=new"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, url):
    """A fresh page of the app for each test."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url)
    page.wait_for_selector("#run")
    yield page
    page.close()


def upload(page, path):
    page.locator("#image input[type=file]").set_input_files(path)


def run(page):
    page.click("#run")


def test_an_uploaded_image_gets_both_answers_and_its_overlay(page):
    from vlmeff.data import easyvqa
    from vlmeff.demo.runner import DemoModel
    path = easyvqa.image_paths("test")[0]
    upload(page, str(path))
    page.fill("#question textarea", "what shape is in the image?")
    run(page)
    page.wait_for_selector("#overlays img", timeout=60_000)
    page.wait_for_function("document.querySelector('#comparison').innerText.includes('256 -> 64')", timeout=60_000)
    text = page.locator("#comparison").inner_text()
    expected = DemoModel.load("tiny-llava-evqa").ask(easyvqa.load_image(path), "what shape is in the image?",
                                                     "cls", 0.25)
    for name, unpruned, pruned in expected.table[:2]:
        assert name in text and unpruned in text and pruned in text
    assert "FLOPs (prefill)" in text and "latency" in text
    assert "64 of 256 patches kept" in page.locator("#status").inner_text()
    assert page.locator("#overlays img").first.evaluate("img => img.naturalWidth") == 336
    if os.environ.get("VLMEFF_DEMO_SCREENSHOT"):
        page.screenshot(path=os.environ["VLMEFF_DEMO_SCREENSHOT"], full_page=True)


def test_bad_input_is_a_message_in_the_page(page):
    from vlmeff.data import easyvqa
    upload(page, str(easyvqa.image_paths("test")[0]))
    run(page)
    page.wait_for_function("document.querySelector('#status').innerText.includes('Input error')", timeout=60_000)
    assert "type a question" in page.locator("#status").inner_text()
    page.fill("#question textarea", "what shape is in the image?")
    page.fill("#budget textarea", "5000")
    run(page)
    page.wait_for_function("document.querySelector('#status').innerText.includes('5000')", timeout=60_000)
    assert "a count from 1 to 256" in page.locator("#status").inner_text()


def test_a_corrupt_upload_is_a_message_in_the_page(page, tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is no image")
    upload(page, str(path))          # the preview's check says so at once
    page.wait_for_function("document.querySelector('#status').innerText.includes('Input error')", timeout=60_000)
    assert "not an image" in page.locator("#status").inner_text()
    assert page.locator("#preview img").count() == 0
