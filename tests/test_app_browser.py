"""The app's first screen in a real browser (headless Chromium via Playwright): Library and Open a CT with the viewer.

Starts `python app.py` on a free 127.0.0.1 port, then: opens a library study (report, labels and the three planes
appear), uploads lung1 (info line), moves each slice slider and switches windows (images change), shows the 3-D view,
and uploads a PNG (one-sentence error; the viewer keeps working). Screenshots go to a temporary folder
(CT_SCREENSHOTS=DIR keeps them somewhere to look at).
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.browser import browser_page, running_app, screenshots_dir

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "assets" / "library" / "studies.json"
pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    with running_app(tmp_path_factory.mktemp("app") / "app.log") as url:
        yield url


@pytest.fixture(scope="module")
def page(app_url):
    with browser_page(app_url) as page:
        yield page


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return screenshots_dir(tmp_path_factory)


# ----------------------------------------------------------------------------------------------------- helpers

def _image(tab, plane: str):
    return tab.locator(f".block.ct-{plane} img")


def _wait_for_new_src(tab, plane: str, old: str | None, timeout_s: float = 20.0) -> str:
    """Wait until the plane's <img> shows a new image (gradio serves each new picture under a new URL) and has
    loaded; return its src."""
    img = _image(tab, plane)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if img.count():
            src = img.first.get_attribute("src")
            if src and src != old and img.first.evaluate("e => e.complete && e.naturalWidth > 0"):
                return src
        time.sleep(0.1)
    raise AssertionError(f"the {plane} image did not change within {timeout_s} s")


def _natural_size(tab, plane: str) -> tuple[int, int]:
    return tuple(_image(tab, plane).first.evaluate("e => [e.naturalWidth, e.naturalHeight]"))


def _press_slider(tab, css: str, key: str = "ArrowRight", times: int = 5):
    rng = tab.locator(f".block.{css} input[type=range]")
    rng.focus()
    for _ in range(times):
        rng.press(key)


def _toast_text(page) -> str:
    toast = page.locator(".toast-body").last
    toast.wait_for()
    return toast.inner_text()


# ----------------------------------------------------------------------------------------------------- the test

def test_library_and_open_a_ct_in_the_browser(page, shots, shared_data):
    studies = json.loads(LIBRARY.read_text())
    study = studies[2]

    # Library: the first study opens with the page; clicking the third row opens that one: its report, its labels
    # and three new planes appear.
    lib = page.locator("#tab-library")
    report = lib.locator(".block.library-report")
    report.get_by_text(studies[0]["id"]).wait_for(timeout=60_000)
    first = {plane: _wait_for_new_src(lib, plane, None) for plane in ("axial", "coronal", "sagittal")}
    lib.locator(".library-table").get_by_text(study["id"], exact=True).click()
    report.get_by_text(study["id"]).wait_for()
    impression_start = " ".join(study["report"]["impression"].split()[:6])
    assert impression_start in " ".join(report.inner_text().split())
    for plane in ("axial", "coronal", "sagittal"):
        _wait_for_new_src(lib, plane, first[plane])
    checked = lib.locator(".block.library-labels input[type=checkbox]:checked")
    assert checked.count() == len(study["labels"])
    assert "128 x 128 x 64" in lib.locator(".block.ct-info").inner_text()
    page.screenshot(path=str(shots / "1_library.png"), full_page=True)

    # Open a CT: upload lung1; the info line describes it and the planes have lung1's physical aspect.
    page.get_by_role("tab", name="Open a CT").click()
    tab = page.locator("#tab-open")
    tab.locator(".block.ct-upload input[type=file]").set_input_files(str(shared_data / "ct" / "lung1_image.nii.gz"))
    info = tab.locator(".block.ct-info")
    info.get_by_text("512 x 512 x 48").wait_for(timeout=60_000)
    assert "5.0 mm" in info.inner_text() and "lung1_image.nii.gz" in info.inner_text()
    src = {plane: _wait_for_new_src(tab, plane, None) for plane in ("axial", "coronal", "sagittal")}
    assert _natural_size(tab, "axial") == (512, 512)
    w, h = _natural_size(tab, "coronal")
    assert abs(h - w * (48 * 5.0) / (512 * 0.5703125)) <= 1
    page.screenshot(path=str(shots / "2_lung1.png"), full_page=True)

    # Each slice slider changes its own plane.
    for plane in ("axial", "coronal", "sagittal"):
        before = _image(tab, plane).first.screenshot()
        _press_slider(tab, f"ct-slider-{plane}", "ArrowRight" if plane != "axial" else "ArrowLeft", times=8)
        src[plane] = _wait_for_new_src(tab, plane, src[plane])
        assert _image(tab, plane).first.screenshot() != before, plane

    # Window presets change every plane; the level/width sliders follow the preset.
    for preset, level in (("Bone", "400"), ("Mediastinum", "40")):
        before = _image(tab, "axial").first.screenshot()
        tab.locator(".block.ct-preset").get_by_text(preset, exact=True).click()
        for plane in ("axial", "coronal", "sagittal"):
            src[plane] = _wait_for_new_src(tab, plane, src[plane])
        assert _image(tab, "axial").first.screenshot() != before, preset
        assert tab.locator(".block.ct-level input[type=number]").input_value() == level
    page.screenshot(path=str(shots / "3_mediastinum.png"), full_page=True)

    # Moving the width slider by hand makes the window Custom.
    _press_slider(tab, "ct-width", "ArrowLeft", times=10)
    src["axial"] = _wait_for_new_src(tab, "axial", src["axial"])
    assert tab.locator(".block.ct-preset input[type=radio]:checked").get_attribute("value") == "Custom"

    # 3-D view on request.
    tab.get_by_role("button", name="Show 3-D").click()
    tab.locator(".block.ct-plot .js-plotly-plot").wait_for(timeout=60_000)
    assert tab.locator(".block.ct-plot .js-plotly-plot .gl-container, .block.ct-plot canvas").count() > 0
    page.wait_for_timeout(1000)
    page.screenshot(path=str(shots / "4_3d.png"), full_page=True)

    # A PNG is refused with one sentence; the viewer still shows lung1 and still responds.
    tab.locator(".block.ct-upload").get_by_role("button", name="Clear").click()
    tab.locator(".block.ct-upload input[type=file]").set_input_files(str(shared_data / "cxr" / "00000001_000.png"))
    message = _toast_text(page)
    page.wait_for_timeout(600)  # the toast slides in
    page.screenshot(path=str(shots / "5_bad_file.png"), full_page=True)
    body = message.strip().splitlines()[-1].strip()
    assert "Traceback" not in message and "Error" not in body
    assert len(re.findall(r"[.!?](?:\s|$)", body)) == 1 and body.endswith("."), message
    assert "512 x 512 x 48" in info.inner_text()
    _press_slider(tab, "ct-slider-axial", "ArrowRight", times=3)
    _wait_for_new_src(tab, "axial", src["axial"])
