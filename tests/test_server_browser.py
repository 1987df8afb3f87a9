"""The shared server in a real browser (Debian's Chromium via Playwright): a second browser cannot fetch the CT planes
rendered for the first one, and an upload over the limit gets one sentence in the page."""
from __future__ import annotations

import pytest

from tests.browser import CHROMIUM, CHROMIUM_ARGS, running_app

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server-browser")
    with running_app(tmp / "app.log", extra_env={"GRADIO_TEMP_DIR": str(tmp / "gradio")},
                     extra_args=["--max-upload-mb", "1"]) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _first_page(browser, url):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(url)
    page.get_by_role("heading", name="Chest-CT workstation").wait_for()
    return context, page


def test_second_browser_cannot_fetch_the_first_ones_ct_planes(browser, app_url):
    first, page = _first_page(browser, app_url)
    # The library's first study opens by itself; its axial plane is a PNG Gradio serves from its temporary folder.
    page.wait_for_function("() => { const i = document.querySelector('.block.ct-axial img');"
                           " return i && (i.getAttribute('src') || '').includes('/gradio_api/file='); }",
                           timeout=120_000)
    src = page.locator(".block.ct-axial img").first.get_attribute("src")
    assert first.request.get(src).status == 200
    second = browser.new_context()          # another browser that knows the URL but was never shown the picture
    second.request.get(app_url)             # it has its own session cookie now
    assert second.request.get(src).status == 404
    first.close()
    second.close()


def test_upload_over_the_limit_is_one_sentence(browser, app_url, tmp_path):
    big = tmp_path / "big_ct.nii.gz"
    big.write_bytes(b"\0" * 1_500_000)
    context, page = _first_page(browser, app_url)
    page.get_by_role("tab", name="Open a CT").click()
    page.get_by_text("up to 1 MB").wait_for()
    page.locator(".ct-upload input[type=file]").set_input_files(str(big))
    message = page.get_by_text("exceed the maximum allowed size").first
    message.wait_for(timeout=20_000)
    assert "big_ct.nii.gz" in message.inner_text() and "1.0 Mb" in message.inner_text()
    page.screenshot(path=str(tmp_path / "over_limit.png"))
    assert page.get_by_text("Traceback").count() == 0
    context.close()
