"""The frontal-chest plausibility check (engine/radiograph_view.py) on real inputs: the two real radiographs, DRRs of
the real CT lung1 and of held-out phantoms (with findings, augmented or not) pass; a lateral projection and axial
slices of the same real CT (lung and mediastinal windows), an inverted film and a phantom's axial slice are refused,
through the function and through `engine findings` (exit 2, one sentence, before any model loads)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.drr import DRRAugmentation, attenuation_per_mm, project, simulate_radiograph, to_display
from engine.errors import UserError
from engine.phantom import make_study
from engine.radiograph import Radiograph, read_radiograph
from engine.radiograph_view import check_frontal_chest, view_evidence
from engine.viewing import window
from engine.volume import read_ct
from tests.conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
CXR_PNG = SHARED_DATA / "cxr" / "00000001_000.png"
CXR_DCM = SHARED_DATA / "cxr" / "siim_pa_chest.dcm"
TEST_SEEDS = (900_020, 900_021, 900_022)      # training.ctclip_data TEST_SEED_BASE + i: held out from every trainer


PHANTOM_LABELS = {"effusion": ["Pleural effusion"], "cardiomegaly": ["Cardiomegaly", "Pericardial effusion"],
                  "consolidation": ["Consolidation", "Lung opacity", "Atelectasis"], "normal": []}


@pytest.fixture(scope="module")
def lung1():
    return read_ct(SHARED_DATA / "ct" / "lung1_image.nii.gz")


@pytest.fixture(scope="module")
def phantoms() -> dict:
    """Held-out phantoms (one test seed each) with the findings that change a film's look most, and a normal one."""
    return {name: make_study(seed, labels=labels, with_report=False).volume
            for seed, (name, labels) in zip(TEST_SEEDS + (900_023,), PHANTOM_LABELS.items())}


def lateral_projection(volume) -> Radiograph:
    """A lateral view of a CT: the same line integrals as engine.drr, along x (left-right) instead of y."""
    mu = attenuation_per_mm(torch.from_numpy(np.ascontiguousarray(volume.array)))
    sx, sy, sz = volume.spacing
    depth, pixel = project(mu.permute(0, 2, 1).contiguous(), (sy, sx, sz))
    return Radiograph(image=to_display(depth), pixel_spacing_mm=(pixel, pixel), source="lateral.png")


def axial_slice(volume, index: int, level: float, width: float) -> Radiograph:
    """An axial CT slice as a screenshot would store it: windowed to 8-bit grey, then read back as a picture."""
    return Radiograph(image=window(volume.array[index], level, width).astype(np.float32) / 255, source="slice.png")


def save_png(radiograph: Radiograph, path: Path) -> Path:
    Image.fromarray(np.round(radiograph.image * 255).astype(np.uint8)).save(path)
    return path


# ------------------------------------------------------------------------------------------------ frontal films pass

@pytest.mark.parametrize("path", [CXR_PNG, CXR_DCM], ids=["nih-png", "siim-dicom"])
def test_real_frontal_radiographs_pass(path):
    evidence = check_frontal_chest(read_radiograph(path))
    assert evidence.air_top == evidence.air_bottom == 0.0
    assert min(evidence.left_dip, evidence.right_dip) > 0.3      # well clear of the 0.15 line


def test_drr_of_the_real_ct_passes(lung1):
    for view in ("pa", "ap"):
        check_frontal_chest(simulate_radiograph(lung1, view=view))


def test_drrs_of_held_out_phantoms_pass_clean_and_augmented(phantoms):
    rng = np.random.default_rng(0)
    for volume in phantoms.values():
        for augmentation in (None, DRRAugmentation.sample(rng)):
            check_frontal_chest(simulate_radiograph(volume, augmentation=augmentation, seed=1))


def test_letterboxed_film_is_not_taken_for_a_ct_slice():
    film = read_radiograph(CXR_PNG).image
    bars = np.zeros((200, film.shape[1]), np.float32)
    padded = Radiograph(image=np.concatenate([bars, film, bars]), source="letterboxed.png")
    assert view_evidence(padded.image).air_top == 0.0
    check_frontal_chest(padded)


# ------------------------------------------------------------------------------------------------ others are refused

def test_lateral_views_are_refused(lung1, phantoms):
    for volume in (lung1, *phantoms.values()):
        with pytest.raises(UserError, match="frontal"):
            check_frontal_chest(lateral_projection(volume))


@pytest.mark.parametrize("index", [10, 24, 36])
@pytest.mark.parametrize("window_hu", [(-600, 1500), (40, 400)], ids=["lung", "mediastinum"])
def test_axial_slices_of_the_real_ct_are_refused(lung1, index, window_hu):
    with pytest.raises(UserError, match="axial CT slice"):
        check_frontal_chest(axial_slice(lung1, index, *window_hu))


def test_phantom_axial_slice_and_inverted_film_are_refused(phantoms):
    volume = phantoms["normal"]
    with pytest.raises(UserError, match="axial CT slice"):
        check_frontal_chest(axial_slice(volume, volume.array.shape[0] // 2, -600, 1500))
    negative = Radiograph(image=1.0 - read_radiograph(CXR_PNG).image, source="negative.png")
    evidence = view_evidence(negative.image)
    assert evidence.looks_like_ct_slice or not evidence.looks_frontal    # its dark abdomen reads as air, too
    with pytest.raises(UserError):
        check_frontal_chest(negative)


# ------------------------------------------------------------------------------------------------ through the CLI

def _findings(path: Path, tmp_path: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CT_WORKSTATION_LIBRARY": str(tmp_path / "lib"),
           "CT_X2CT_DIR": str(tmp_path / "no_model")}    # refused before the (absent) model is even looked for
    done = subprocess.run([sys.executable, "-m", "engine", "findings", "--cxr", str(path), "--json"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert "Traceback" not in done.stderr
    return done.returncode, json.loads(done.stdout)


def test_findings_refuses_a_ct_slice_a_lateral_view_and_a_12000_pixel_square(lung1, tmp_path):
    slice_png = save_png(axial_slice(lung1, 24, -600, 1500), tmp_path / "ct_slice.png")
    lateral_png = save_png(lateral_projection(lung1), tmp_path / "lateral.png")
    huge = tmp_path / "huge.png"
    Image.new("L", (12000, 12000)).save(huge)            # 144 M pixels: over the reader's 60 M, under Pillow's bomb
    for path, expected in ((slice_png, "axial CT slice"), (lateral_png, "frontal"), (huge, "million")):
        status, answer = _findings(path, tmp_path)
        assert status == 2 and expected in answer["error"], answer
        message = answer["error"]
        assert message.endswith(".") and "\n" not in message and ". " not in message.rstrip(".")
