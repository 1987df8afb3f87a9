"""The chest X-ray flow below the browser: the pipeline's class activation map is exact (its shares sum to the
present-minus-absent cosine that P(present) is the softmax of), and the Chest X-ray tab's handlers on real inputs
(the NIH radiograph, DRRs of lung1 and of a phantom), with a trained encoder and without one (one sentence that names
the training command). The encoder is random-weight (behaviour, not scores) over the tiny CT CLIP of
tests/tiny_models.py, so the file runs in seconds whatever is shipped in assets/."""
from __future__ import annotations

import json
import math

import gradio as gr
import numpy as np
import pytest
import torch

from engine.labels import LABELS
from engine.radiograph import read_radiograph
from tests.conftest import SHARED_DATA

CXR_PNG = SHARED_DATA / "cxr" / "00000001_000.png"
LIBRARY_STUDIES = 3     # demo studies encoded by the tiny CT CLIP (the similar-studies list)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """(CXRPipeline, its folder): a random CXR encoder over the tiny random CT CLIP (latent 32)."""
    from engine.models.ctclip import CTCLIP
    from engine.models.cxr_encoder import CXREncoder
    from engine.pipelines.ctclip import CTClipPipeline
    from engine.pipelines.cxr import CXRPipeline
    from tests.tiny_models import tiny_ctclip_config, tiny_cxr_config

    folder = tmp_path_factory.mktemp("cxr")
    torch.manual_seed(0)
    CTCLIP.build(tiny_ctclip_config()).save_pretrained(folder / "ctclip")
    CXREncoder(tiny_cxr_config(latent_dim=32)).save_pretrained(folder / "x2ct")
    ctclip = CTClipPipeline.from_pretrained(folder / "ctclip")
    from engine.library import DemoLibrary
    from engine.study_library import build_demo_embeddings

    ids = [study.id for study in DemoLibrary.load().studies[:LIBRARY_STUDIES]]
    build_demo_embeddings(ctclip, folder / "library.safetensors", ids=ids)
    return CXRPipeline.from_pretrained(folder / "x2ct", ctclip=ctclip), folder


# ------------------------------------------------------------------------------------------------ exact CAM

@pytest.mark.parametrize("label", ["Cardiomegaly", "Pleural effusion"])
def test_location_shares_sum_to_the_score_the_probability_comes_from(pipelines, label):
    pipeline, _ = pipelines
    film = read_radiograph(CXR_PNG)
    shares = pipeline.location_shares(film, label)
    latent = pipeline.embed_radiograph(film)
    present, absent = pipeline.ctclip.prompt_latents[LABELS.index(label)]
    gap = float(latent @ present - latent @ absent)          # computed from the pooled latent, not from the map
    assert shares.ndim == 2 and shares.size > 1
    assert abs(float(shares.sum()) - gap) < 1e-5
    scale = float(pipeline.ctclip.model.logit_scale)
    probability = pipeline.ctclip.zero_shot_from_latent(latent)[label]
    assert abs(1 / (1 + math.exp(-scale * float(shares.sum()))) - probability) < 1e-5   # softmax of two = sigmoid


def test_location_map_covers_the_film_and_peaks_where_the_largest_share_is(pipelines):
    pipeline, _ = pipelines
    film = read_radiograph(CXR_PNG)
    shares = pipeline.location_shares(film, "Cardiomegaly")
    heat, gap = pipeline.location_map(film, "Cardiomegaly")
    assert heat.shape == film.image.shape and abs(gap - float(shares.sum())) < 1e-6
    if shares.max() > 0:                                     # the film is square: the map's cells are equal squares
        h, w = shares.shape
        row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
        cell = (row * h // heat.shape[0], col * w // heat.shape[1])
        assert shares[cell] >= 0.5 * shares.max()            # bilinear upsampling moves the peak by at most a cell


# ------------------------------------------------------------------------------------------------ tab handlers

def test_upload_reads_findings_similar_studies_and_the_map(pipelines, monkeypatch):
    from app import cxr_tab
    from app.models import CTClipModels, CXRModels

    pipeline, folder = pipelines
    monkeypatch.setenv("CT_CTCLIP_DIR", str(folder / "ctclip"))
    monkeypatch.setenv("CT_LIBRARY_EMBEDDINGS", str(folder / "library.safetensors"))
    monkeypatch.setenv("CT_WORKSTATION_LIBRARY", str(folder / "user_library"))
    # the encoder folder's held-out figures (hand-set here): the bars name its one weak label under the chart
    per_label = {label: {"auroc": 0.57 if label == "Lung nodule" else 0.9} for label in LABELS}
    (folder / "x2ct" / "metrics.json").write_text(json.dumps({"zero_shot": {"per_label": per_label}}))
    ctclip = CTClipModels()
    cxr = CXRModels(ctclip, weights=str(folder / "x2ct"))
    film, image, note = cxr_tab.load_film(str(CXR_PNG))
    assert image.shape == film.image.shape and image.dtype == np.uint8 and "00000001_000.png" in note
    note, plot, table, found, top = cxr_tab.read_film(cxr, ctclip, film, 5)
    assert plot.visible and top in LABELS and list(table.columns)[:2] == ["Rank", "Study"]
    layout = json.loads(plot.value["plot"])["layout"]
    assert layout["title"]["text"] == cxr_tab.RADIOGRAPH_READING_TITLE    # not "CT CLIP reading": it is the film's
    notes = [a["text"] for a in layout["annotations"] if a.get("name") == "weak labels"]
    assert notes == ["Read with care (held-out AUROC):<br>Lung nodule 0.57"]
    assert len(found) == len(table) == LIBRARY_STUDIES and [r["score"] for r in found] == sorted(
        (r["score"] for r in found), reverse=True)
    probabilities = pipeline.ctclip.zero_shot_from_latent(pipeline.embed_radiograph(film))
    assert top == max(probabilities, key=probabilities.get)   # the map opens on the most probable finding
    coloured, sentence = cxr_tab.show_map(cxr, film, top)
    assert coloured.shape == (*film.image.shape, 3) and top in sentence


def test_simulate_needs_an_open_ct_and_refuses_nothing_frontal(lung1_path):
    from app import cxr_tab
    from engine.volume import read_ct

    with pytest.raises(gr.Error, match="No CT is open"):
        cxr_tab.simulate_film(None)
    film, image, note = cxr_tab.simulate_film(read_ct(lung1_path))
    assert image.shape == film.image.shape and "lung1_image.nii.gz" in note


def test_without_an_encoder_the_tab_says_how_to_train_it(pipelines, tmp_path):
    from app import cxr_tab
    from app.models import CTClipModels, CXRModels

    cxr = CXRModels(CTClipModels(), weights=str(tmp_path / "no_encoder"))
    assert "python -m training x2ct --preset demo" in cxr.unavailable()
    film, _, _ = cxr_tab.load_film(str(CXR_PNG))
    note, plot, *_ = cxr_tab.read_film(cxr, None, film, 10)
    assert note.startswith("⚠") and "python -m training x2ct" in note and not plot.visible


def test_a_ct_slice_upload_is_one_sentence(tmp_path, lung1_path):
    from PIL import Image

    from app import cxr_tab
    from engine.viewing import window
    from engine.volume import read_ct

    path = tmp_path / "slice.png"
    Image.fromarray(window(read_ct(lung1_path).array[24], -600, 1500)).save(path)
    with pytest.raises(gr.Error, match="axial CT slice"):
        cxr_tab.load_film(str(path))
