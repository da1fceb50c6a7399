"""An exported report in headless Chromium: no console errors, painted, the slider works."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.browser

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "Debian's chromium is not installed (scripts/ensure-chromium.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def report_file(tmp_path_factory):
    pytest.importorskip("holoviews")
    import topoxr.viz as viz
    from topoxr.testing.maps import make_laid_naps

    nap = make_laid_naps(n_neurons=30, n_labels=3, n_epochs=4)
    report = viz.Report("Browser test")
    report.add_section("Training", viz.training_animation(nap))
    report.add_table([{"method": "pca", "trustworthiness": 0.9}], title="Quality")
    return report.save(tmp_path_factory.mktemp("report") / "report.html")


def _distinct_colours(png: bytes) -> int:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
    return len(np.unique(pixels, axis=0))


def test_report_renders_offline_and_epoch_slider_changes_the_picture(report_file):
    executable = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 800})
            errors: list[str] = []
            remote: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: remote.append(r.url)
                    if not r.url.startswith(("file:", "data:", "blob:")) else None)
            page.goto(report_file.as_uri())
            page.wait_for_selector("canvas", timeout=20_000)
            page.wait_for_function("window.Bokeh && Bokeh.documents.length > 0", timeout=20_000)
            page.wait_for_timeout(500)
            figure = page.locator("canvas").first  # the first map (not the widgets)
            before = figure.screenshot()
            assert _distinct_colours(before) > 100, "the maps are not painted"

            handle = page.locator(".noUi-handle").first
            handle.focus()
            for _ in range(3):
                page.keyboard.press("ArrowRight")
            page.wait_for_timeout(500)
            after = figure.screenshot()
            value = page.evaluate(
                "Bokeh.documents[0].get_model_by_name('slider-epoch').value")
            assert value == 3
            assert after != before, "moving the epoch slider did not change the maps"

            page.get_by_text("Play").click()  # the player runs without errors
            page.wait_for_timeout(900)
            assert errors == [], errors
            assert remote == [], f"the report loaded resources from the network: {remote}"
        finally:
            browser.close()


#: Most bytes and most milliseconds (to the page's load event) the demo report may take.
DEMO_REPORT_BYTES = 5_000_000
DEMO_LOAD_MS = 3000


@pytest.mark.slow
def test_demo_report_is_light_loads_fast_and_every_section_shows(quick_demo):
    """The real demo's report: under 5 MB, loaded in under 3 s, offline, every section drawn."""
    from tests.test_demo import SECTIONS

    out, _ = quick_demo
    report = out / "report.html"
    assert report.stat().st_size < DEMO_REPORT_BYTES, report.stat().st_size
    executable = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 800})
            errors: list[str] = []
            remote: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: remote.append(r.url)
                    if not r.url.startswith(("file:", "data:", "blob:")) else None)
            page.goto(report.as_uri(), wait_until="load")
            load_ms = page.evaluate(
                "performance.getEntriesByType('navigation')[0].loadEventEnd")
            assert 0 < load_ms < DEMO_LOAD_MS, f"the report took {load_ms:.0f} ms to load"
            headings = page.locator("h2").all_inner_texts()
            for section in SECTIONS:
                assert any(h.startswith(section) for h in headings), (section, headings)
            # every section shows something drawn: an image that decoded, or a canvas
            drawn = page.evaluate("""() => [...document.querySelectorAll('section')].map(s => {
                const h = s.querySelector('h2');
                const imgs = [...s.querySelectorAll('img')];
                const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
                return [h ? h.textContent : '', imgs.length, ok,
                        s.querySelectorAll('canvas, table, li').length];
            })""")
            for title, n_img, n_ok, other in drawn:
                assert n_img == n_ok, f"{title}: {n_img - n_ok} images did not decode"
                assert n_img + other > 0, f"section {title!r} shows nothing"
            # the training animation: the slider shows another epoch, play runs
            player = page.locator(".player").first
            visible = "el => [...el.querySelectorAll('.frame')].filter(f => " \
                      "f.style.display !== 'none').map(f => f.dataset.value)"
            assert player.evaluate(visible) == ["0"]
            slider = player.locator(".slider")
            slider.focus()
            for _ in range(3):
                page.keyboard.press("ArrowRight")
            assert player.evaluate(visible) == ["3"]
            assert "epoch:</b> 3" in player.locator(".value").inner_html()
            player.locator(".play").click()
            page.wait_for_timeout(800)
            assert player.evaluate(visible) != ["3"]  # it played on
            assert errors == [], errors
            assert remote == [], f"the report loaded resources from the network: {remote}"
        finally:
            browser.close()
