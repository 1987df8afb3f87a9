"""Chest radiograph reading and normalisation on the two real CXRs (NIH PNG, SIIM DICOM) and files made from them:
16-bit PNG, RGB/RGBA, JPEG, MONOCHROME1 and windowed 16-bit DICOM, non-square sizes."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from engine.radiograph import Radiograph, normalise_for_model, read_radiograph


@pytest.fixture(scope="module")
def nih(shared_data) -> Radiograph:
    return read_radiograph(shared_data / "cxr" / "00000001_000.png")


@pytest.fixture(scope="module")
def siim(shared_data) -> Radiograph:
    return read_radiograph(shared_data / "cxr" / "siim_pa_chest.dcm")


def test_real_png(nih, shared_data):
    raw = np.asarray(Image.open(shared_data / "cxr" / "00000001_000.png"), dtype=np.float32)
    assert nih.image.shape == (512, 512) and nih.image.dtype == np.float32
    np.testing.assert_allclose(nih.image, raw / 255.0)             # 8-bit: shown as stored
    assert nih.pixel_spacing_mm is None and nih.warnings == []


def test_real_dicom(siim, shared_data):
    ds = pydicom.dcmread(shared_data / "cxr" / "siim_pa_chest.dcm")
    assert siim.image.shape == (1024, 1024) and 0.0 <= siim.image.min() and siim.image.max() <= 1.0
    np.testing.assert_allclose(siim.image, ds.pixel_array / 255.0, atol=1e-6)
    assert siim.pixel_spacing_mm == pytest.approx((0.168, 0.168))
    # a PA chest film: the mediastinum/spine column (centre) is brighter than the lungs either side
    h, w = siim.image.shape
    centre = siim.image[h // 3:2 * h // 3, w // 2 - w // 20:w // 2 + w // 20].mean()
    lungs = siim.image[h // 3:2 * h // 3, w // 5:w // 3].mean()
    assert centre > lungs + 0.1


def test_sixteen_bit_and_colour_pngs(nih, tmp_path):
    sixteen = (nih.image * 4095).round().astype(np.uint16)           # 12-bit data in a 16-bit container
    Image.fromarray(sixteen).save(tmp_path / "16bit.png")
    assert Image.open(tmp_path / "16bit.png").mode.startswith("I")
    image16 = read_radiograph(tmp_path / "16bit.png").image
    assert image16.min() == 0.0 and image16.max() == 1.0
    assert np.corrcoef(image16.ravel(), nih.image.ravel())[0, 1] > 0.99
    grey8 = (nih.image * 255).round().astype(np.uint8)
    Image.fromarray(np.stack([grey8] * 3, -1)).save(tmp_path / "rgb.png")
    rgba = np.concatenate([np.stack([grey8] * 3, -1), np.full(grey8.shape + (1,), 255, np.uint8)], -1)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    for name in ("rgb.png", "rgba.png"):
        picture = read_radiograph(tmp_path / name)
        np.testing.assert_allclose(picture.image, nih.image, atol=1.5 / 255)
        assert picture.warnings == []                                # grey stored as RGB is not "colour"


def test_jpeg_and_non_square(nih, tmp_path):
    grey8 = (nih.image * 255).round().astype(np.uint8)
    Image.fromarray(grey8[:, 56:456]).save(tmp_path / "narrow.jpg", quality=92)
    picture = read_radiograph(tmp_path / "narrow.jpg")
    assert picture.image.shape == (512, 400)
    assert np.abs(picture.image - nih.image[:, 56:456]).mean() < 0.02
    tensor = normalise_for_model(picture, size=224)
    assert tuple(tensor.shape) == (1, 224, 224) and tensor.dtype == torch.float32
    # 512 x 400 -> 224 x 175: 24 + 25 columns of black padding, centred
    assert float(tensor[0, :, :24].abs().max()) == 0.0 and float(tensor[0, :, -25:].abs().max()) == 0.0
    assert float(tensor[0, :, 30:190].mean()) > 0.2


def test_monochrome1_is_inverted(shared_data, siim, tmp_path):
    ds = pydicom.dcmread(shared_data / "cxr" / "siim_pa_chest.dcm")
    ds.set_pixel_data((255 - ds.pixel_array).astype(np.uint8), "MONOCHROME1", 8)   # uncompressed, inverted
    ds.save_as(tmp_path / "mono1.dcm")
    mono1 = read_radiograph(tmp_path / "mono1.dcm")
    assert np.corrcoef(mono1.image.ravel(), siim.image.ravel())[0, 1] > 0.999      # displayed the same way


def test_sixteen_bit_dicom_window_is_applied(shared_data, siim, tmp_path):
    ds = pydicom.dcmread(shared_data / "cxr" / "siim_pa_chest.dcm")
    stored = (ds.pixel_array.astype(np.uint16) * 15 + 100)               # 12-bit-like data with an offset
    stored[:8, :8] = 4095                                              # a burnt-in marker outside the window
    ds.set_pixel_data(stored, "MONOCHROME2", 12)
    ds.WindowCenter, ds.WindowWidth = 100 + 15 * 127.5, 15 * 127.5     # the middle half of the grey range
    ds.save_as(tmp_path / "windowed16.dcm")
    windowed = read_radiograph(tmp_path / "windowed16.dcm")
    assert windowed.image.min() == 0.0 and windowed.image.max() == 1.0
    expected = np.clip((siim.image - 0.25) / 0.5, 0, 1)               # the window's contrast stretch
    inside = np.ones(siim.image.shape, bool)
    inside[:8, :8] = False
    assert np.abs(windowed.image[inside] - expected[inside]).mean() < 0.01


@pytest.mark.parametrize("standardise", [False, True])
def test_normalise_both_real_cxrs(nih, siim, standardise):
    for radiograph in (nih, siim):
        tensor = normalise_for_model(radiograph, size=224, standardise=standardise)
        assert tuple(tensor.shape) == (1, 224, 224) and torch.isfinite(tensor).all()
        if standardise:
            assert abs(float(tensor.mean())) < 1e-3 and abs(float(tensor.std()) - 1) < 1e-2
        else:
            assert 0.0 <= float(tensor.min()) and float(tensor.max()) <= 1.0
            assert abs(float(tensor.mean()) - float(radiograph.image.mean())) < 0.01   # square: no padding
