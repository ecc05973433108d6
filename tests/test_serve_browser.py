"""The upload page in a real headless browser: Debian's chromium + chromium-driver through selenium
(nothing is downloaded; skipped when they are not installed: `apt-get install chromium chromium-driver`).

Uploads two images, waits for the cards, checks the words and that the explanation overlays were
decoded by the browser, then a broken file. The screenshot is kept in the test's tmp_path; with
HIERARCHY_UPDATE_SCREENSHOT=1 it also replaces docs/img/serve_page.png."""
from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="chromium and chromium-driver are not installed")

from test_explain import PATCH, SIZE, mark_stage, marked, write_marker_run  # noqa: E402,F401
from test_serve_server import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def page_server(tmp_path: Path, mark_stage) -> Iterator[str]:
    """The app on a loopback port, in this process (so the test's marker stage is registered)."""
    import uvicorn

    from hierarchy.serve.app import create_app
    from hierarchy.serve.service import ServeOptions, Service

    run = write_marker_run(tmp_path / "run")
    pipe = tmp_path / "pipeline.yaml"
    pipe.write_text("name: Bright-square finder (test)\ndescription: Finds a bright square in noise images; "
                    "a test pipeline.\nroot: mark\nstages:\n  mark:\n    stage: mark\n"
                    f"    weights: {run}\n    threshold: 0.9\n    ood: 'off'\n    routes: {{default: stop}}\n")
    service = Service(pipe, ServeOptions(device="cpu", precision="fp32", engine="torch"))
    service.load()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service, load_on_startup=False), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


@pytest.fixture
def browser() -> Iterator["webdriver.Chrome"]:
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1000,1400"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=DriverService(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout: float = 60.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def save_image(path: Path, corner: tuple[int, int] | None, seed: int) -> Path:
    arr = marked(np.random.default_rng(seed), corner).transpose(1, 2, 0)
    Image.fromarray(arr).resize((256, 256), Image.NEAREST).save(path)
    return path


def test_upload_page_shows_labels_words_and_overlays(page_server: str, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    browser.get(page_server)
    wait_for(browser, lambda d: d.find_element(By.ID, "title").text == "Bright-square finder (test)")
    assert "Intended use: Finds a bright square" in browser.find_element(By.ID, "intended").text
    assert "not a diagnosis" in browser.find_element(By.ID, "disclaimer").text

    images = [save_image(tmp_path / "square.png", (SIZE - PATCH - 4, 6), 1), save_image(tmp_path / "noise.png", None, 2)]
    browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in images))
    cards = wait_for(browser, lambda d: (c := d.find_elements(By.CSS_SELECTOR, ".card")) and len(c) == 2 and c)
    by_name = {c.find_element(By.CSS_SELECTOR, ".filename").text: c for c in cards}
    square, noise = by_name["square.png"], by_name["noise.png"]
    assert square.get_attribute("data-status") == "ok"
    assert square.find_element(By.CSS_SELECTOR, ".headline").text == "Result: marked"
    assert noise.get_attribute("data-status") == "abstained"
    assert noise.find_element(By.CSS_SELECTOR, ".headline").text == "Not sure: a person should look at this image"
    assert "below the 90% it needs" in noise.find_element(By.CSS_SELECTOR, ".detail").text
    assert square.find_element(By.CSS_SELECTOR, ".step-conf").text == "100%"
    for card in cards:  # the overlay of the one stage visited, decoded by the browser
        (overlay,) = card.find_elements(By.CSS_SELECTOR, "img.overlay")
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay) == 224

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    browser.find_element(By.ID, "files").send_keys(str(broken))
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card")) == 3)
    error = browser.find_elements(By.CSS_SELECTOR, ".card")[0]
    assert error.get_attribute("data-status") == "error"
    assert error.find_element(By.CSS_SELECTOR, ".headline").text == "Could not use this file"

    shot = tmp_path / "serve_page.png"
    browser.set_window_size(1000, browser.execute_script("return document.body.scrollHeight") + 120)
    assert browser.save_screenshot(str(shot)) and Image.open(shot).size[0] >= 900
    if os.environ.get("HIERARCHY_UPDATE_SCREENSHOT"):
        (REPO / "docs" / "img").mkdir(exist_ok=True)
        shutil.copyfile(shot, REPO / "docs" / "img" / "serve_page.png")
    print(f"screenshot: {shot}")
