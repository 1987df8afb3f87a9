"""Acceptance (issue 15): the Generate tab in a real browser (headless Chromium via Playwright).

Type a report, press Generate and watch the progress bar move (sampling step n of N), browse the generated volume
(a slice slider changes the picture), download the NIfTI and reopen it with engine.volume.read_ct (the model's
spacing, "SYNTHETIC" in its header); toggle a finding on the last prompt (two synthetic volumes side by side and
their difference in colour); two tabs generating at once both finish.

Starts `python app.py` with the shipped generator (assets/generator) when there is one, else with a tiny one saved
in a temporary folder ($CT_GENERATOR_DIR, 32 x 64 x 64 voxels): random weights (its cross-attention values scaled
up so that the prompt shows), except that its decoder's last normalisation and convolution are set by hand so every
volume it draws is a block of soft tissue (about 0 HU, a texture that follows the latent, so two prompts differ) in
a one-voxel rim of air - something read_ct reopens as CT, which an untrained decoder's output is not. The CT CLIP and the library's latents are the shipped ones, or the stand-in of
tests/test_app_find_browser.py. The test asserts behaviour, never image quality. Screenshots go to a temporary
folder (CT_SCREENSHOTS=DIR keeps them).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.browser import browser_page, running_app, screenshots_dir
from tests.test_app_browser import _image, _press_slider, _wait_for_new_src
from tests.test_app_find_browser import COLOUR_PIXELS_JS, _checkpoint_env

REPORT = ("Findings: Moderate right pleural effusion with adjacent passive atelectasis. The heart is enlarged. "
          "Impression: Right pleural effusion. Cardiomegaly.")
# sampling steps: the tiny generator's steps are quick (about 0.05 s), so the slider's most (50) lets the progress bar
# be seen moving; the shipped generator's take about 0.3 s, so its default 15 show it as well (and the generation and
# the toggle's two take a third of the time: the suite's budget)
TINY_STEPS, SHIPPED_STEPS = 50, 15

pytestmark = [pytest.mark.browser, pytest.mark.timeout(900)]


def _tiny_ct_generator(folder: Path, context_dim: int) -> None:
    """A tiny generator (vae/ + unet/) conditioned on a `context_dim` text latent whose volumes reopen as CT (see the
    module docstring). The decoder's output is conv(norm(h)): with the norm's scale 0.5 and shift 1, and every
    convolution weight 0.5 / (9 C) with bias -1, an inner voxel (27 taps) sums to 0.5 + texture (about 0 HU) and a
    face voxel (18 taps, the rest zero padding) to 0.0 + texture (about -1000 HU)."""
    import torch

    from engine.models.vae import CTAutoencoder
    from tests.tiny_models import tiny_unet, tiny_vae_config

    torch.manual_seed(0)
    vae = CTAutoencoder(tiny_vae_config())
    norm, conv = vae.network.decoder.blocks[-2], vae.network.decoder.blocks[-1].conv
    with torch.no_grad():
        norm.weight.fill_(0.5)
        norm.bias.fill_(1.0)
        conv.weight.fill_(0.5 / (9 * conv.in_channels))
        conv.bias.fill_(-1.0)
    vae.save_pretrained(folder / "vae")
    # twice the tiny grid per axis (32 x 64 x 64 voxels over the demo field of view): a sampling step takes long
    # enough (about 0.05 s) for the progress bar to be seen moving through the steps
    unet = tiny_unet(context_dim=context_dim, latent_shape=(4, 8, 16, 16),
                     image_spacing=(350.0 / 64, 350.0 / 64, 300.0 / 32))
    with torch.no_grad():  # cross-attention values x 10: two reports' text latents are close, and a toggled
        for name, weight in unet.named_parameters():  # finding should show (measured: 7 % of voxels >= 100 HU apart)
            if "attn2.to_v" in name:
                weight.mul_(10.0)
    unet.save_pretrained(folder / "unet")


def _generator_env(scratch: Path, ctclip_env: dict) -> dict:
    """Nothing when assets/generator holds a trained generator; else the tiny one above."""
    from engine.models.ctclip import CTCLIP
    from engine.settings import ctclip_dir, generator_dir

    if (generator_dir() / "unet" / "config.json").is_file():
        return {}
    latent = CTCLIP.read_config(ctclip_env.get("CT_CTCLIP_DIR", ctclip_dir())).latent_dim
    _tiny_ct_generator(scratch / "generator", latent)
    return {"CT_GENERATOR_DIR": str(scratch / "generator")}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """(url, the generator folder the app uses)."""
    from engine.settings import generator_dir

    scratch = tmp_path_factory.mktemp("generate_app")
    env = dict(CT_WORKSTATION_LIBRARY=str(scratch / "user_library"), **_checkpoint_env(scratch))
    env.update(_generator_env(scratch, env))
    with running_app(scratch / "app.log", env, start_timeout_s=300) as url:
        yield url, Path(env.get("CT_GENERATOR_DIR", generator_dir()))


def _generate(tab, text: str, steps: int, seed: int | None = None) -> None:
    tab.locator("#generate-prompt textarea").fill(text)
    steps_box = tab.locator("#generate-steps input[type=number]")
    steps_box.fill(str(steps))
    steps_box.press("Enter")
    if seed is not None:
        seed_box = tab.get_by_label("Seed (same seed, same volume)")
        seed_box.fill(str(seed))
        seed_box.press("Enter")
    tab.locator("#generate-run").click()


RECORD_PROGRESS_JS = """root => {
  window.__progress = [];
  new MutationObserver(() => {
    const bar = root.querySelector('.progress-level'), fill = root.querySelector('.progress-bar');
    if (!bar) return;
    const seen = [fill ? parseFloat(fill.style.width) || 0 : 0, bar.innerText.split(/\\s+/).join(' ')];
    const last = window.__progress[window.__progress.length - 1];
    if (!last || last[1] !== seen[1]) window.__progress.push(seen);
  }).observe(root, {subtree: true, childList: true, characterData: true, attributes: true});
}"""


def _watch_progress(page, tab, shots: Path, timeout_s: float = 120) -> list[tuple[float, str]]:
    """Wait for the generation to finish, one screenshot on the way; return every state the bar showed, [(width in %,
    its text)] (recorded in the page by RECORD_PROGRESS_JS)."""
    status = tab.locator(".block.generate-status")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and "Synthetic volume" not in status.inner_text():
        seen = page.evaluate("window.__progress")
        if seen and not (shots / "generate_1_progress.png").exists():  # taken as the bar appears, it lands a few
            page.screenshot(path=str(shots / "generate_1_progress.png"))  # steps later (the viewport: quicker)
        time.sleep(0.05)
    return [tuple(state) for state in page.evaluate("window.__progress")]


def test_type_a_report_watch_progress_browse_download_and_toggle(app, tmp_path_factory):
    import numpy as np

    from engine.pipelines.generate import read_nifti_description
    from engine.volume import read_ct

    from engine.settings import generator_dir

    url, generator = app
    steps = SHIPPED_STEPS if generator == generator_dir() else TINY_STEPS
    spacing = json.loads((generator / "unet" / "config.json").read_text())["image_spacing"]
    shots = screenshots_dir(tmp_path_factory)
    downloads = tmp_path_factory.mktemp("downloads")
    with browser_page(url, timeout_ms=120_000) as page:
        page.get_by_role("tab", name="Generate").click()
        tab = page.locator("#tab-generate")
        tab.get_by_text("Synthetic", exact=False).first.wait_for()

        # Type a report and generate: the progress bar appears and moves through the sampling steps.
        tab.evaluate(RECORD_PROGRESS_JS)
        _generate(tab, REPORT, steps)
        seen = _watch_progress(page, tab, shots)
        texts = " ".join(text for _, text in seen)
        assert "reading the report" in texts and "decoding" in texts, seen   # the volume, or window k of n
        decoding = [w for w, text in seen if text.startswith("decoding window")]
        assert decoding == sorted(decoding), seen                  # an autoencoder trained on crops: it moves too
        sampling = [w for w, text in seen if "sampling step" in text]
        assert len(sampling) >= 5 and sampling == sorted(sampling) and sampling[0] < sampling[-1], seen  # it moved
        status = tab.locator(".block.generate-status")
        status.get_by_text("Synthetic volume, seed 0").wait_for()
        assert f"{steps} steps" in status.inner_text()
        info = tab.locator(".block.ct-info")
        info.get_by_text("SYNTHETIC").wait_for()
        page.screenshot(path=str(shots / "generate_2_volume.png"), full_page=True)

        # Browse: the axial slider changes the axial picture (a screenshot of it before and after).
        src = _wait_for_new_src(tab, "axial", None)
        before = _image(tab, "axial").first.screenshot()
        _press_slider(tab, "ct-slider-axial", "ArrowLeft", times=6)
        _wait_for_new_src(tab, "axial", src)
        assert _image(tab, "axial").first.screenshot() != before
        page.screenshot(path=str(shots / "generate_3_slice_moved.png"), full_page=True)

        # Download the NIfTI; read_ct reopens it with the model's spacing, and its header says synthetic.
        with page.expect_download() as download:
            tab.locator("#generate-download a").first.click()
        path = downloads / download.value.suggested_filename
        download.value.save_as(path)
        volume = read_ct(path)
        assert volume.spacing == pytest.approx(spacing, rel=1e-4)
        assert "SYNTHETIC" in read_nifti_description(path)

        # Toggle a finding on the last prompt: the effusion is removed; both volumes and the difference appear.
        tab.locator("#generate-toggle").click()
        summary = tab.locator(".block.generate-toggle-status")
        summary.get_by_text("Synthetic pair").wait_for()
        assert "removed from the last prompt" in summary.inner_text()
        assert "read in the synthetic volume" in summary.inner_text()
        toggled = tab.locator("#generate-toggled-prompt textarea").input_value()
        assert toggled.startswith("Findings:") and "pleural effusion" not in toggled.lower()
        images = [tab.locator(f".generate-compare-{k} img").first for k in range(3)]
        for image in images:
            image.wait_for()
            assert image.evaluate("e => e.complete && e.naturalWidth > 0")
        page.screenshot(path=str(shots / "generate_4_toggle.png"), full_page=True)
        for k, title in enumerate(("Without Pleural effusion (synthetic)", "With Pleural effusion (synthetic)",
                                   "|With - without| over with Pleural effusion (synthetic)")):
            tab.locator(f".generate-compare-{k}").get_by_text(title, exact=True).wait_for()
        assert [image.evaluate(COLOUR_PIXELS_JS) for image in images[:2]] == [0, 0]   # two grey CT slices
        assert images[0].screenshot() != images[1].screenshot()
        assert images[2].evaluate(COLOUR_PIXELS_JS) > 0   # where the two differ, in colour

        # The comparison's slider moves the three images together.
        before = [image.screenshot() for image in images]
        _press_slider(tab, "generate-compare-slider", "ArrowLeft", times=4)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and images[1].screenshot() == before[1]:
            time.sleep(0.2)
        after = [image.screenshot() for image in images]
        assert all(a != b for a, b in zip(after, before))
        page.screenshot(path=str(shots / "generate_5_toggle_slice.png"), full_page=True)
        assert np.isfinite(volume.array).all()


def test_two_tabs_generating_at_once_both_finish(app, tmp_path_factory):
    url, _ = app
    shots = screenshots_dir(tmp_path_factory)
    with browser_page(url, timeout_ms=180_000) as first:
        second = first.context.browser.new_page(viewport={"width": 1400, "height": 1000})  # its own session
        second.set_default_timeout(180_000)
        second.goto(url)
        second.get_by_role("heading", name="Chest-CT workstation").wait_for()
        tabs = []
        for page in (first, second):
            page.get_by_role("tab", name="Generate").click()
            tabs.append(page.locator("#tab-generate"))
        for tab, seed in zip(tabs, (1, 2)):
            _generate(tab, REPORT, 10, seed=seed)
        for tab, seed in zip(tabs, (1, 2)):
            tab.locator(".block.generate-status").get_by_text(f"Synthetic volume, seed {seed}").wait_for()
            _wait_for_new_src(tab, "axial", None)
        first.screenshot(path=str(shots / "generate_6_tab1.png"), full_page=True)
        second.screenshot(path=str(shots / "generate_7_tab2.png"), full_page=True)
