"""The Generate tab's handler without a browser, on a tiny generator and a tiny CT CLIP: a generation fills the
viewer, the download and both readings; cancel mid-way is one sentence and the next generation still works; bad
input is one sentence; the app builds with the tab and says how to train a missing generator."""
from __future__ import annotations

import gradio as gr
import pytest
import torch

from app.generate_tab import _event_for, generate
from app.models import CTClipModels, GeneratorModels
from engine.models.diffusion_unet import DiffusionUNet
from engine.models.vae import CTAutoencoder
from engine.pipelines.generate import read_nifti_description
from tests.tiny_models import TINY_SHAPE, tiny_ctclip_config, tiny_unet_config, tiny_vae_config

REPORT = "Findings: Right pleural effusion. Impression: Right pleural effusion."


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from engine.models.ctclip import CTCLIP

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("app_gen")
    CTCLIP.build(tiny_ctclip_config()).save_pretrained(root / "ctclip")
    CTAutoencoder(tiny_vae_config()).save_pretrained(root / "generator" / "vae")
    DiffusionUNet(tiny_unet_config()).save_pretrained(root / "generator" / "unet")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CT_CTCLIP_DIR", str(root / "ctclip"))
        patch.setenv("CT_GENERATOR_DIR", str(root / "generator"))
        generator = GeneratorModels(CTClipModels())
        generator.pipeline()  # loaded while the variables point at the tiny folders
    return generator


def test_generation_fills_viewer_download_and_both_readings(models):
    fractions = []
    volume, path, status, asked, found = generate(models, REPORT, 2, 5.0, 3, None,
                                                  lambda f, desc="": fractions.append(f))
    assert volume.array.shape == TINY_SHAPE and "SYNTHETIC" in volume.source
    assert "SYNTHETIC" in read_nifti_description(path)
    assert asked is not None and found is not None and "seed 3" in status.value
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_cancel_mid_way_is_one_sentence_and_the_tab_stays_usable(models):
    def cancel_on_second_step(fraction, desc=""):
        if "step 2" in desc:
            _event_for(None).set()
    with pytest.raises(gr.Error, match="cancelled"):
        generate(models, REPORT, 4, 5.0, 0, None, cancel_on_second_step)
    assert generate(models, REPORT, 1, 5.0, 0, None, lambda f, desc="": None)[0] is not None


@pytest.mark.parametrize("text, steps, guidance", [("", 2, 5.0), (REPORT, 0, 5.0), (REPORT, 2, -1.0),
                                                   ("x" * 50_000, 2, 5.0)])
def test_bad_input_is_one_sentence(models, text, steps, guidance):
    with pytest.raises(gr.Error):
        generate(models, text, steps, guidance, 0, None, lambda f, desc="": None)


def test_app_builds_with_the_tab_and_says_how_to_train_a_missing_generator(tmp_path, monkeypatch):
    from app.ui import AppConfig, build_app

    monkeypatch.setenv("CT_GENERATOR_DIR", str(tmp_path))
    demo = build_app(AppConfig(preload=False))
    texts = [getattr(block, "value", "") for block in demo.blocks.values()]
    assert any(isinstance(t, str) and "python -m training vae --preset demo" in t for t in texts)
