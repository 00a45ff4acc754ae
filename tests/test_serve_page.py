"""The page at / in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium, no
download): type a prompt, press Generate, see the progress bar move, the live picture appear and the
gallery fill; drop-to-reproduce fills the form from a PNG through /sdapi/v1/png-info."""

import base64
import fnmatch
import os
import time
from pathlib import Path

import pytest

from serve_server import running_server

from selenium import webdriver

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM = "/usr/bin/chromium"
WAIT_SECONDS = 60
needs_chromium = pytest.mark.skipif(not (Path(CHROMEDRIVER).exists() and Path(CHROMIUM).exists()),
                                    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager never downloads a driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1200,900", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(condition, what):
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@needs_chromium
def test_type_a_prompt_press_generate_watch_it_emerge(browser, tmp_path):
    with running_server() as (url, app):
        browser.get(url + "/")
        wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#sampler_name option")) > 5, "the samplers")
        browser.find_element(By.ID, "prompt").send_keys("a red circle")
        steps = browser.find_element(By.ID, "steps")
        steps.clear()
        steps.send_keys("80")
        browser.find_element(By.ID, "seed").clear()
        browser.find_element(By.ID, "seed").send_keys("7")
        browser.find_element(By.ID, "generate").click()
        progress_values, live_pictures = [], set()

        def watch():
            progress_values.append(float(browser.find_element(By.ID, "progress").get_attribute("value")))
            live = browser.find_element(By.ID, "live")
            if live.is_displayed():
                live_pictures.add(live.get_attribute("src"))
            return browser.find_element(By.ID, "status").text == "done"

        wait_for(watch, "the picture")
        moving = [value for value in progress_values if 0 < value < 1]
        assert len(set(moving)) >= 2, f"the progress bar did not move: {progress_values[:20]}"
        assert len(live_pictures) >= 2, "the live picture did not change while the steps ran"
        final = browser.find_element(By.ID, "live").get_attribute("src")
        assert final.startswith("data:image/png;base64,")
        assert "Seed: 7," in browser.find_element(By.ID, "parameters").text
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#gallery figure img"), "the gallery")
        screenshots = Path(os.environ.get("NPDIFF_SCREENSHOT_DIR", tmp_path))  # set it to look at the page
        assert browser.save_screenshot(str(screenshots / "page.png"))

        # drop a PNG on the page: its settings fill the form (the page's own drop handler, fed a File)
        png = base64.b64decode(final.split(",", 1)[1])
        browser.find_element(By.ID, "prompt").clear()
        browser.execute_script(
            "const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));"
            "const transfer = new DataTransfer();"
            "transfer.items.add(new File([bytes], 'made.png', {type: 'image/png'}));"
            "document.body.dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true}));",
            base64.b64encode(png).decode())
        wait_for(lambda: browser.find_element(By.ID, "prompt").get_attribute("value") == "a red circle", "the drop")
        assert browser.find_element(By.ID, "seed").get_attribute("value") == "7"
        assert browser.find_element(By.ID, "steps").get_attribute("value") == "80"


def test_the_page_is_package_data():
    """Every file of npdiff/serve_static matches pyproject.toml's package-data: a non-editable install serves it."""
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11's TOML reader")
    root = Path(__file__).resolve().parent.parent
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["npdiff"]
    files = sorted(path.relative_to(root / "npdiff").as_posix() for path in (root / "npdiff" / "serve_static").iterdir())
    assert files == ["serve_static/app.js", "serve_static/index.html", "serve_static/style.css"]
    for name in files:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name
