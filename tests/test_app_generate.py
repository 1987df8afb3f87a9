"""The Generate tab's handlers without a browser, on a tiny generator and a tiny CT CLIP: a generation fills the
viewer, the download and both readings; cancel mid-way is one sentence and the next generation still works; bad
input (empty or 50 kB prompt, steps 0 or 10,000, guidance below 0 or absurd, an absurd seed, an unknown finding) is
one sentence; two tabs generating at once both finish, one after the other; "toggle a finding" on the last prompt
shows without | with | |difference| over with, all labelled synthetic, with the finding's two readings; the app
builds with the tab and says how to train a missing generator."""
from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
import torch

from app.generate_tab import NO_LAST_PROMPT, _event_for, generate, toggle
from app.models import CTClipModels, GeneratorModels
from app.viewer import refresh_comparison, render_comparison
from engine.labels import LABELS
from engine.models.vae import CTAutoencoder
from engine.pipelines.generate import read_nifti_description
from engine.report_edit import present_findings
from engine.viewing import difference_heat
from tests.tiny_models import TINY_SHAPE, tiny_ctclip_config, tiny_unet, tiny_vae_config

REPORT = "Findings: Right pleural effusion. Impression: Right pleural effusion."


def _quiet(fraction, desc=""):
    return None


def _tab(name: str):
    """A stand-in for gr.Request: what the handlers read of it is the browser session's hash."""
    return SimpleNamespace(session_hash=name)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from engine.models.ctclip import CTCLIP

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("app_gen")
    CTCLIP.build(tiny_ctclip_config()).save_pretrained(root / "ctclip")
    # the CT CLIP folder's held-out figures (hand-set): the generated volume's bars name its one weak label
    per_label = {label: {"auroc": 0.61 if label == "Atelectasis" else 0.95} for label in LABELS}
    (root / "ctclip" / "metrics.json").write_text(json.dumps({"zero_shot": {"per_label": per_label}}))
    CTAutoencoder(tiny_vae_config()).save_pretrained(root / "generator" / "vae")
    tiny_unet().save_pretrained(root / "generator" / "unet")  # a context that matters: prompts differ
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CT_CTCLIP_DIR", str(root / "ctclip"))
        patch.setenv("CT_GENERATOR_DIR", str(root / "generator"))
        generator = GeneratorModels(CTClipModels())
        generator.pipeline()  # loaded while the variables point at the tiny folders
    return generator


def test_generation_fills_viewer_download_and_both_readings(models):
    fractions = []
    volume, path, status, asked, found, last = generate(models, REPORT, 2, 5.0, 3, None,
                                                        lambda f, desc="": fractions.append(f))
    assert volume.array.shape == TINY_SHAPE and "SYNTHETIC" in volume.source
    assert "SYNTHETIC" in read_nifti_description(path)
    assert asked is not None and found is not None and "seed 3" in status.value
    assert [a.text for a in found.layout.annotations if a.name == "weak labels"] == \
        ["Read with care (held-out AUROC):<br>Atelectasis 0.61"]
    assert not [a for a in asked.layout.annotations if a.name == "weak labels"]   # a text's reading: not the CT's
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert (last.text, last.steps, last.guidance, last.seed) == (REPORT, 2, 5.0, 3)
    assert last.generation.volume is volume


def test_cancel_mid_way_is_one_sentence_and_the_tab_stays_usable(models):
    def cancel_on_second_step(fraction, desc=""):
        if "step 2" in desc:
            _event_for(None).set()
    with pytest.raises(gr.Error, match="cancelled"):
        generate(models, REPORT, 4, 5.0, 0, None, cancel_on_second_step)
    last = generate(models, REPORT, 3, 5.0, 0, None, _quiet)[-1]
    with pytest.raises(gr.Error, match="cancelled"):  # the toggle's generation is cancelled the same way
        toggle(models, last, "Emphysema", None, cancel_on_second_step)
    assert toggle(models, last, "Emphysema", None, _quiet)[0] is not None
    assert not models.lock.locked()


@pytest.mark.parametrize("text, steps, guidance, seed, match", [
    ("", 2, 5.0, 0, "empty"), ("   \n ", 2, 5.0, 0, "empty"),
    ("Findings: effusion. " * 2_500, 2, 5.0, 0, "characters long"),   # 50 kB
    (REPORT, 0, 5.0, 0, "steps"), (REPORT, 10_000, 5.0, 0, "steps"), (REPORT, None, 5.0, 0, None),
    (REPORT, 2, -1.0, 0, "guidance"), (REPORT, 2, 1e9, 0, "guidance"), (REPORT, 2, float("nan"), 0, "guidance"),
    (REPORT, 2, 5.0, 1e30, "seed"), (REPORT, 2, 5.0, float("nan"), "seed")])
def test_bad_input_is_one_sentence(models, text, steps, guidance, seed, match):
    if match is None:   # no steps (an API call leaving it out): the model's default, not an error
        default = models.pipeline().config.default_steps
        assert generate(models, text, steps, guidance, seed, None, _quiet)[-1].steps == default
        return
    with pytest.raises(gr.Error, match=match) as caught:
        generate(models, text, steps, guidance, seed, None, _quiet)
    message = caught.value.message
    assert message.count(". ") <= 1 and "Traceback" not in message and not models.lock.locked()


def test_two_tabs_generating_at_once_both_finish_one_after_the_other(models):
    """Two sessions press Generate together: both get their volume (the same as alone, same seed), and the lock
    runs them one after the other (the steps of one never fall between the steps of the other)."""
    alone = generate(models, REPORT, 3, 5.0, 11, _tab("alone"), _quiet)[0].array
    events, results, errors = [], {}, []

    def tab(name):
        try:
            results[name] = generate(models, REPORT, 3, 5.0, 11, _tab(name),
                                     lambda f, desc="": events.append((name, desc)))[0].array
        except Exception as err:  # noqa: BLE001 - the test reports any failure of either tab
            errors.append(err)
    threads = [threading.Thread(target=tab, args=(name,)) for name in ("tab-1", "tab-2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors and set(results) == {"tab-1", "tab-2"}
    assert all(np.array_equal(array, alone) for array in results.values())
    order = [name for name, _ in events]
    first = order[0]
    assert order == [first] * order.count(first) + [n for n in order if n != first], "the two runs interleaved"


def test_toggle_needs_a_last_prompt_and_a_known_finding(models):
    with pytest.raises(gr.Error, match=NO_LAST_PROMPT.split(":")[0]):
        toggle(models, None, "Emphysema", None, _quiet)
    last = generate(models, REPORT, 1, 5.0, 0, None, _quiet)[-1]
    with pytest.raises(gr.Error, match="18 labels"):
        toggle(models, last, "Pneumothorax", None, _quiet)


def test_toggle_shows_without_with_and_their_difference_labelled_synthetic(models):
    volume, _, _, _, _, last = generate(models, REPORT, 2, 5.0, 4, None, _quiet)
    fractions = []
    pair, toggled_text, status = toggle(models, last, "Pleural effusion", None,
                                        lambda f, desc="": fractions.append(f))
    # REPORT states the effusion: the toggle removes it, so the last generation is the "with" volume, reused as is
    assert pair.second is volume and "Pleural effusion" not in present_findings(toggled_text)
    assert all("synthetic" in title for title in pair.titles)
    assert [t.split(" (")[0] for t in pair.titles] == ["Without Pleural effusion", "With Pleural effusion",
                                                       "|With - without| over with Pleural effusion"]
    difference = pair.second.array - pair.first.array
    np.testing.assert_array_equal(pair.overlay, difference_heat(difference))
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert "Synthetic pair" in status.value and "| read in the synthetic volume (zero-shot) |" in status.value
    assert "seed 4" in status.value

    # the side-by-side viewer: the three images at one slice; colour only where the volumes differ
    slider, *titled = refresh_comparison(pair, "Axial", "Lung")
    assert slider.maximum == TINY_SHAPE[0] - 1 and slider.value == TINY_SHAPE[0] // 2
    assert [image.label for image in titled] == list(pair.titles)
    k = int(np.argmax(np.abs(difference).sum(axis=(1, 2))))   # the axial slice where they differ most
    without, with_, over = render_comparison(pair, "Axial", k, "Lung")
    assert without.ndim == 2 and with_.ndim == 2 and over.shape == (*with_.shape, 3)
    coloured = (over.max(axis=-1).astype(int) - over.min(axis=-1)) > 10
    assert coloured.any() and not np.array_equal(without, with_)
    same = pair.overlay[k] == 0    # where the volumes (nearly) agree, the overlay image is the grey "with" image
    if same.any() and with_.shape == same.shape:
        assert np.array_equal(over[same][:, 0], with_[same])
    assert render_comparison(None, "Axial", 0, "Lung") == [None, None, None]


def test_app_builds_with_the_tab_and_says_how_to_train_a_missing_generator(tmp_path, monkeypatch):
    from app.ui import AppConfig, build_app

    monkeypatch.setenv("CT_GENERATOR_DIR", str(tmp_path))
    demo = build_app(AppConfig(preload=False))
    texts = [getattr(block, "value", "") for block in demo.blocks.values()]
    assert any(isinstance(t, str) and "python -m training vae --preset demo" in t for t in texts)
    assert any(isinstance(t, str) and "What one finding changes" in t for t in texts)
