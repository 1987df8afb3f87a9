"""The Chest X-ray tab in a real browser (headless Chromium via Playwright): upload the real NIH radiograph, see the 18
findings and the similar CT studies, the film with a finding's class activation map, open a study in the viewer; then
simulate a radiograph from the CT open in the viewer.

Starts `python app.py` with the shipped chest X-ray encoder (assets/x2ct) when it exists, else with a random-weight
encoder of the demo architecture saved in a temporary folder ($CT_X2CT_DIR): the test asserts behaviour, never scores.
The CT CLIP and the library's latents are the shipped ones, or the stand-in of tests/test_app_find_browser.py.
Screenshots go to a temporary folder (CT_SCREENSHOTS=DIR keeps them).
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.browser import browser_page, running_app, screenshots_dir
from tests.conftest import SHARED_DATA
from tests.test_app_find_browser import COLOUR_PIXELS_JS, _bars, _checkpoint_env

CXR_PNG = SHARED_DATA / "cxr" / "00000001_000.png"
K = 5

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]


def _encoder_env(scratch: Path, ctclip_env: dict) -> dict:
    """Nothing when assets/x2ct holds an encoder; else a random demo encoder into the app's CT CLIP latent."""
    from engine.models.ctclip import CTCLIP
    from engine.models.cxr_encoder import CXREncoder
    from engine.settings import ctclip_dir, x2ct_dir
    from tests.tiny_models import tiny_cxr_config

    if (x2ct_dir() / "config.json").is_file():
        return {}
    import torch

    latent = CTCLIP.read_config(ctclip_env.get("CT_CTCLIP_DIR", ctclip_dir())).latent_dim
    torch.manual_seed(0)
    CXREncoder(tiny_cxr_config(latent_dim=latent)).save_pretrained(scratch / "x2ct")
    return {"CT_X2CT_DIR": str(scratch / "x2ct")}


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    scratch = tmp_path_factory.mktemp("cxr_app")
    env = dict(CT_WORKSTATION_LIBRARY=str(scratch / "user_library"), **_checkpoint_env(scratch))
    env.update(_encoder_env(scratch, env))
    with running_app(scratch / "app.log", env, start_timeout_s=300) as url:
        yield url


def _rows(tab, n: int, timeout_s: float = 90):
    rows = tab.locator("#cxr-results .virtual-row")
    deadline = time.monotonic() + timeout_s
    while rows.count() < n and time.monotonic() < deadline:
        time.sleep(0.2)
    assert rows.count() == n, f"{rows.count()} result rows"
    return rows


def _colour_pixels(image, timeout_s: float = 60) -> int:
    """Poll the film until it carries coloured pixels (the class activation map) and return how many."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            count = image.evaluate(COLOUR_PIXELS_JS)
        except Exception:   # an <img> replaced while it was read
            count = 0
        if count or time.monotonic() > deadline:
            return count
        time.sleep(0.3)


def test_chest_xray_upload_findings_studies_and_simulate(app_url, tmp_path_factory):
    from engine.labels import LABELS

    shots = screenshots_dir(tmp_path_factory)
    with browser_page(app_url, timeout_ms=60_000) as page:
        page.get_by_role("tab", name="Chest X-ray").click()
        tab = page.locator("#tab-cxr")
        tab.locator("#cxr-k input[type=number]").fill(str(K))
        tab.locator("#cxr-k input[type=number]").press("Enter")

        # Upload the real radiograph: the film, the 18 bars, K studies ranked by cosine, the map of a finding.
        tab.locator("#cxr-upload input[type=file]").set_input_files(str(CXR_PNG))
        tab.locator("#cxr-status").get_by_text("closest to it").wait_for(timeout=120_000)
        assert sorted(_bars(tab.locator("#cxr-findings"))) == sorted(LABELS)
        rows = _rows(tab, K)
        table = [[c.inner_text().strip() for c in row.locator("[role=gridcell]").all()] for row in rows.all()]
        scores = [float(r[2]) for r in table]
        assert scores == sorted(scores, reverse=True) and all(r[1] for r in table), table
        tab.locator("#cxr-map-note").get_by_text("is read on this film").wait_for()
        film = tab.locator("#cxr-film img").first
        assert _colour_pixels(film) > 0
        page.screenshot(path=str(shots / "cxr_1_upload.png"), full_page=True)

        # Another finding's map: picked from the list, the note names it.
        tab.locator("#cxr-finding input").click()
        page.get_by_role("option", name="Pleural effusion", exact=True).click()
        tab.locator("#cxr-map-note").get_by_text("Where Pleural effusion is read").wait_for()

        # Open the second study: its report and its planes in the tab's viewer.
        chosen = table[1][1]
        rows.nth(1).locator("[role=gridcell]").nth(1).click()
        tab.locator("#cxr-report").get_by_text(chosen).wait_for()
        info = tab.locator(".block.ct-info")
        info.get_by_text(chosen).wait_for()
        # its axial plane has loaded (waited for: on a busy machine the picture arrives after the info text)
        page.wait_for_function("() => { const i = document.querySelector('#tab-cxr .block.ct-axial img');"
                               " return i !== null && i.complete && i.naturalWidth > 0; }", timeout=60_000)
        page.screenshot(path=str(shots / "cxr_2_open_study.png"), full_page=True)

        # Simulate from the CT in the viewer (the study just opened): a new film is read.
        tab.get_by_role("button", name="Simulate from the CT in the viewer").click()
        tab.locator("#cxr-status").get_by_text("findings read from the radiograph simulated from").wait_for(
            timeout=120_000)
        assert chosen in tab.locator("#cxr-status").inner_text()
        _rows(tab, K)
        # the upload box no longer names the uploaded file: the film on show is the simulated one
        page.wait_for_function("() => !document.querySelector('#cxr-upload').innerText.includes('00000001_000')")
        page.screenshot(path=str(shots / "cxr_3_simulated.png"), full_page=True)
