"""The web page in real headless Chromium (Debian's ``chromium`` driven by Playwright through ``executable_path``).

``make setup`` installs both; without them this file is skipped with the reason, never passed silently.
Set ``TORCHSD_SCREENSHOTS=DIR`` to keep the screenshots.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serverutil import KEY, Server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: run `make setup`")
if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed (apt-get install -y chromium): run `make setup`",
                allow_module_level=True)


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    """The shared test server's settings plus A1111's styles.csv with two styles, for the styles picker."""
    styles = tmp_path_factory.mktemp("webui") / "styles.csv"
    styles.write_text('name,prompt,negative_prompt\n"Ink","{prompt}, ink drawing","colour"\n"Moody","dark, moody",""\n',
                      encoding="utf-8")
    instance = Server(models_dir, "--model", str(models_dir / "tiny-a"), "--max-body-mb", "2", "--max-side", "512",
                      "--max-steps", "150", "--dtype", "fp32", "--styles-file", str(styles))
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(http_credentials={"username": "user", "password": KEY},
                                      viewport={"width": 1280, "height": 900}, accept_downloads=True)
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(server.url)
        yield page
        assert errors == [], f"JavaScript errors on the page: {errors}"
        browser.close()


def screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("TORCHSD_SCREENSHOTS"):
        keep = Path(os.environ["TORCHSD_SCREENSHOTS"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, keep / name)
    return path


def test_the_page_without_the_key_is_refused(server):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        # headless Chromium cancels the Basic-auth prompt the server's 401 asks for
        with pytest.raises(sync_api.Error, match="ERR_INVALID_AUTH_CREDENTIALS"):
            browser.new_page().goto(server.url)
        context = browser.new_context(http_credentials={"username": "user", "password": "wrong"})
        response = context.new_page().goto(server.url)  # tried the wrong key, then shows the 401 page
        assert response.status == 401 and "needs its API key" in response.text()
        browser.close()


def test_type_a_prompt_generate_and_see_progress_and_image(page, tmp_path):
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    assert page.locator("#model").input_value() == "tiny-a"
    assert page.locator("#width").input_value() == "64"  # the model's own size, from /info
    page.select_option("#sampler", "DDIM")
    page.fill("#prompt", "a red circle at the top left")
    page.fill("#steps", "60")
    page.fill("#seed", "42")
    # the run can take under two seconds: record what the page shows while it runs, not after the fact
    page.evaluate("""() => {
        const text = document.querySelector('#progress-text'), bar = document.querySelector('#progress');
        window.seen = {steps: [], bars: [], previewDuringRun: false};
        new MutationObserver(() => {
            if (text.textContent.startsWith('step ')) {
                window.seen.steps.push(text.textContent);
                window.seen.bars.push(bar.value);
            }
        }).observe(text, {childList: true, characterData: true, subtree: true});
        new MutationObserver(() => {
            if (text.textContent.startsWith('step ')) window.seen.previewDuringRun = true;
        }).observe(document.querySelector('#preview'), {attributes: true, attributeFilter: ['src']});
    }""")
    page.click("#generate")

    page.wait_for_selector("#gallery figure", timeout=300_000)
    # while it ran: "step k/60" with the bar part-way, and a preview of the current prediction
    seen = page.evaluate("window.seen")
    assert seen["steps"] and all(re.fullmatch(r"step \d+/60", t) for t in seen["steps"]), seen
    assert any(0 < bar < 1 for bar in seen["bars"]), seen
    assert seen["previewDuringRun"], seen
    assert page.locator("#progress").evaluate("p => p.value") == 1
    assert page.locator("#progress-text").inner_text().startswith("done in ")
    assert page.locator("#error").inner_text() == ""
    assert page.locator("#gallery img").first.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [64, 64]
    caption = page.locator("#gallery figcaption").first.inner_text()
    assert caption.startswith("a red circle at the top left\nSteps: 60, Sampler: DDIM") and "Seed: 42," in caption

    with page.expect_download() as download_info:
        page.get_by_text("Download PNG").first.click()
    download = download_info.value
    assert download.suggested_filename == "torchsd-42.png"
    saved = tmp_path / "download.png"
    download.save_as(saved)
    with Image.open(saved) as image:  # the PNG carries its parameters
        assert image.size == (64, 64) and image.text["parameters"] == caption
    screenshot(page, tmp_path, "webui-after-generation.png")


def test_image_to_image_with_a_painted_mask(page, tmp_path):
    init = tmp_path / "init.png"
    Image.fromarray((np.indices((64, 64)).sum(0) * 2 % 256).astype(np.uint8)).convert("RGB").save(init)
    page.set_input_files("#init-file", str(init))
    page.wait_for_selector("#init-box:not([hidden])")
    page.fill("#steps", "4")
    page.locator("#mask-canvas").scroll_into_view_if_needed()  # below the fold, as a user would scroll to it
    box = page.locator("#mask-canvas").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.7, steps=8)
    page.mouse.up()
    painted = page.evaluate("""() => { const c = document.querySelector('#mask-canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
        for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }""")
    assert painted > 100  # the brush painted the mask
    figures = page.locator("#gallery figure").count()
    page.click("#generate")
    page.wait_for_function(f"document.querySelectorAll('#gallery figure').length > {figures}", timeout=300_000)
    assert "Denoising strength: 0.75" in page.locator("#gallery figcaption").first.inner_text()
    page.wait_for_function("!document.querySelector('#generate').disabled", timeout=60_000)
    screenshot(page, tmp_path, "webui-inpainting.png")

    page.click("#clear-mask")  # no mask: plain image to image
    figures = page.locator("#gallery figure").count()
    page.click("#generate")
    page.wait_for_function(f"document.querySelectorAll('#gallery figure').length > {figures}", timeout=300_000)
    assert "Denoising strength: 0.75" in page.locator("#gallery figcaption").first.inner_text()
    assert page.locator("#error").inner_text() == ""


def test_the_model_picker_switches_the_server_model(page, server):
    def current() -> str:
        with server.client() as client:
            return client.get("/sdapi/v1/options").json()["sd_model_checkpoint"]

    page.select_option("#model", "sub/tiny-b")
    page.wait_for_function("!document.querySelector('#generate').disabled", timeout=300_000)
    assert page.locator("#model-status").inner_text() == "" and current() == "sub/tiny-b"
    page.select_option("#model", "tiny-a")
    page.wait_for_function("!document.querySelector('#generate').disabled", timeout=300_000)
    assert current() == "tiny-a"


def test_styles_tiling_and_hires_fix_with_a_network_upscaler(page, tmp_path):
    if page.locator("#init-box").is_visible():  # an image left from the image-to-image test: text to image now
        page.click("#clear-init")
    page.wait_for_function("document.querySelector('#styles').options.length > 0")
    assert [o for o in page.locator("#styles option").all_inner_texts()] == ["Ink", "Moody"]
    assert page.locator("#hires-box").is_hidden()
    page.check("#hires")
    upscalers = page.locator("#hr-upscaler option").all_inner_texts()
    assert upscalers[0] == "Latent" and {"Lanczos", "R-ESRGAN 4x+"} <= set(upscalers)
    page.select_option("#hr-upscaler", "R-ESRGAN 4x+")
    page.fill("#hr-scale", "2")
    page.fill("#hr-steps", "2")
    page.select_option("#styles", ["Ink"])
    page.check("#tiling")
    page.select_option("#sampler", "Euler")
    page.fill("#prompt", "a blue square")
    page.fill("#steps", "3")
    page.fill("#seed", "7")
    count = page.locator("#gallery figure").count()
    page.click("#generate")
    page.wait_for_function(f"document.querySelectorAll('#gallery figure').length > {count}", timeout=300_000)
    assert page.locator("#error").inner_text() == ""
    # 64 px first pass, doubled by the hires fix; the style's template wrapped the prompt
    assert page.locator("#gallery img").first.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [128, 128]
    caption = page.locator("#gallery figcaption").first.inner_text()
    assert caption.startswith("a blue square, ink drawing\nNegative prompt: colour\n"), caption
    for part in ("Hires upscale: 2", "Hires steps: 2", "Hires upscaler: R-ESRGAN 4x+", "Tiling: True"):
        assert part in caption, (part, caption)
    screenshot(page, tmp_path, "webui-styles-hires.png")
    page.uncheck("#hires")
    page.uncheck("#tiling")
    page.select_option("#styles", [])
