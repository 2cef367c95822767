"""The search page end to end in headless Chromium: upload, search, refine from a result.

Needs Debian's `chromium` and `chromium-driver` (CI installs them, see .ci/run); skipped,
saying so, where they are absent. The screenshot goes to the test's temporary directory,
and also to $CIRCE_WEB_SCREENSHOT when set; the README's picture is made by
    CIRCE_WEB_SCREENSHOT=docs/web-search.png python -m pytest tests/test_web.py
"""

import os
import random
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from circe.data.render import render_scene
from circe.data.synthetic import random_scene
from circe.index.build import build_index
from circe.index.identity import MethodSource
from circe.index.search import IndexSearcher
from circe.methods import create_method
from circe.serve.app import create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="headless browser test needs chromium and chromedriver "
    "(apt-get install chromium chromium-driver)",
)
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--window-size=1280,900",
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory, default_backbone):
    """The app over a 24-image gallery, served by uvicorn on loopback -> (url, gallery)."""
    import uvicorn

    gallery = tmp_path_factory.mktemp("gallery")
    rng = random.Random(11)
    for i in range(24):
        render_scene(random_scene(rng), 96).save(gallery / f"scene-{i:02d}.png")
    index = tmp_path_factory.mktemp("index")
    method = create_method("sum", default_backbone)
    source = MethodSource(method="sum")
    build_index(gallery, index, method, source, batch_size=12)
    app = create_app(IndexSearcher(index, method=method, source=source))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", gallery
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def test_upload_search_then_refine_from_a_result(site, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url, gallery = site
    wait = WebDriverWait(browser, 20)
    browser.get(url)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".gallery-item")) == 24)
    assert "24 images" in browser.find_element(By.ID, "status").text

    browser.find_element(By.ID, "search-button").click()  # no reference yet: a message
    assert "reference image" in browser.find_element(By.ID, "message").text

    # Pick a file as the reference, say what changes, search.
    browser.find_element(By.ID, "file").send_keys(str(gallery / "scene-03.png"))
    wait.until(lambda d: d.find_element(By.ID, "reference-preview").is_displayed())
    Select(browser.find_element(By.ID, "k")).select_by_visible_text("10")
    browser.find_element(By.ID, "text").send_keys("add a large blue square")
    browser.find_element(By.ID, "search-button").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result")) == 10)
    scores = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".result .score")]
    assert scores[0].startswith("#1 · ") and float(scores[0].split("· ")[1]) > 0

    # Click the second result: it becomes the reference; refine from it.
    second = browser.find_elements(By.CSS_SELECTOR, ".result")[1]
    chosen = second.get_attribute("data-id")
    second.click()
    preview = browser.find_element(By.ID, "reference-preview")
    wait.until(lambda d: preview.get_attribute("data-id") == chosen)
    text = browser.find_element(By.ID, "text")
    text.clear()
    text.send_keys("make the square red")
    browser.find_element(By.ID, "search-button").click()
    wait.until(lambda d: "make the square red" in d.find_element(By.ID, "grid-title").text)
    results = browser.find_elements(By.CSS_SELECTOR, ".result")
    assert len(results) == 10 and chosen not in {r.get_attribute("data-id") for r in results}
    assert len(browser.find_elements(By.CSS_SELECTOR, "#history li")) == 2
    wait.until(
        lambda d: d.execute_script(
            "return [...document.images].every(i => !i.src || (i.complete && i.naturalWidth))"
        )
    )

    browser.save_screenshot(str(tmp_path / "web-search.png"))
    if target := os.environ.get("CIRCE_WEB_SCREENSHOT"):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "web-search.png", target)
