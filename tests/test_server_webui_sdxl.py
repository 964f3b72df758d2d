"""The web page with SDXL in headless Chromium: switching to an SDXL model sets the model's own size (/info's
sample_size), and the optional refiner picker and switch point reach the server (A1111's refiner_checkpoint /
refiner_switch_at). See test_server_webui.py for how Chromium is found."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from sdxl_reference import random_sdxl
from serverutil import KEY, Server, one_thread, save_tiny

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: run `make setup`")
if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed (apt-get install -y chromium): run `make setup`",
                allow_module_level=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """sd15/ (64 px), xl/ (a tiny SDXL whose own size is 96 px, standing for SDXL's 1024) and refiner/."""
    models = tmp_path_factory.mktemp("webui-xl") / "models"
    save_tiny(models / "sd15", seed=0)
    with one_thread():
        xl = random_sdxl("sdxl", seed=2)
        xl.config = dataclasses.replace(xl.config, sample_size=96)
        xl.save(models / "xl")
        random_sdxl("sdxl_refiner", seed=6).save(models / "refiner")
    instance = Server(models, "--model", str(models / "sd15"), "--dtype", "fp32")
    yield instance
    instance.stop()


def test_sdxl_size_and_the_refiner_fields(server):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(http_credentials={"username": "user", "password": KEY},
                                      viewport={"width": 1280, "height": 900})
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(server.url)
        page.wait_for_function("document.querySelector('#model').options.length > 0")
        assert page.locator("#width").input_value() == "64"
        assert page.locator("#refiner").input_value() == ""  # optional: no refiner unless one is picked
        assert page.locator("#refiner-switch").input_value() == "0.8"
        page.select_option("#model", "xl")
        page.wait_for_function("document.querySelector('#width').value === '96'", timeout=300_000)
        assert page.locator("#height").input_value() == "96"  # the SDXL model's own size, from /info

        page.select_option("#refiner", "refiner")
        page.fill("#refiner-switch", "0.5")
        page.fill("#width", "32")
        page.fill("#height", "32")
        page.fill("#steps", "4")
        page.fill("#seed", "3")
        page.fill("#prompt", "a red circle")
        page.click("#generate")
        page.wait_for_selector("#gallery figure", timeout=300_000)
        assert page.locator("#error").inner_text() == ""
        caption = page.locator("#gallery figcaption").first.inner_text()
        assert "Refiner: refiner" in caption and "Refiner switch at: 0.5" in caption and "Model: xl" in caption
        assert page.locator("#gallery img").first.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [32, 32]
        assert errors == [], f"JavaScript errors on the page: {errors}"
        browser.close()
