"""Preprocessing steps and presets on real CTs: geometry kept (a structure stays at its physical place), grids and
intensity mappings of the CT-CLIP, Text2CT and demo presets."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from engine.transforms import (CTCLIP, DEMO, TEXT2CT, CenterCropOrPad, ClipHU, Compose, FlipToRAS, Preprocessing,
                               ResampleToSpacing, ScaleHU, prepare, resample_to_grid, to_model_tensor)
from engine.volume import DEMO_SHAPE_ZYX, DEMO_SPACING_XYZ, Volume, read_ct


@pytest.fixture(scope="module")
def small(shared_data) -> Volume:
    return read_ct(shared_data / "ct" / "lung1_image_small128.nii.gz")


@pytest.fixture(scope="module")
def lung1(lung1_path) -> Volume:
    return read_ct(lung1_path)


def centre_mm(volume: Volume) -> np.ndarray:
    half = (np.asarray(volume.shape_xyz) - 1) / 2 * np.asarray(volume.spacing)
    return np.asarray(volume.origin) + np.asarray(volume.direction).reshape(3, 3) @ half


def centroid_mm(volume: Volume, mask: np.ndarray) -> np.ndarray:
    z, y, x = np.nonzero(mask)
    index_xyz = np.array([x.mean(), y.mean(), z.mean()])
    return np.asarray(volume.origin) + np.asarray(volume.direction).reshape(3, 3) @ (index_xyz * volume.spacing)


def test_resample_to_own_spacing_is_identity(small):
    same = ResampleToSpacing(small.spacing)(small)
    assert same.array.shape == small.array.shape
    np.testing.assert_allclose(same.array, small.array, atol=1e-2)
    assert same.origin == pytest.approx(small.origin, abs=1e-6)


def test_resampling_keeps_the_tumour_in_place(lung1, shared_data):
    label = sitk.ReadImage(str(shared_data / "ct" / "lung1_label.nii.gz"))
    mask = Volume(array=sitk.GetArrayFromImage(label).astype(np.float32), spacing=lung1.spacing,
                  origin=lung1.origin)
    step = ResampleToSpacing((1.5, 1.5, 1.5), default_value=0.0)
    out_ct, out_mask = ResampleToSpacing((1.5, 1.5, 1.5))(lung1), step(mask)
    extent = np.asarray(lung1.shape_xyz) * np.asarray(lung1.spacing)
    assert out_ct.shape_xyz == tuple(int(n) for n in np.rint(extent / 1.5))
    assert centre_mm(out_ct) == pytest.approx(centre_mm(lung1), abs=1e-3)
    before, after = centroid_mm(mask, mask.array > 0.5), centroid_mm(out_mask, out_mask.array > 0.5)
    assert np.abs(before - after).max() < 1.5                       # within one output voxel
    assert float(np.median(out_ct.array[out_mask.array > 0.5])) > -300   # the tumour is soft tissue in both
    assert float(np.median(lung1.array[mask.array > 0.5])) > -300


def test_center_crop_or_pad_moves_the_origin_with_the_voxels(small):
    cropped = CenterCropOrPad((40, 100, 90))(small)
    start = ((48 - 40) // 2, (128 - 100) // 2, (128 - 90) // 2)
    np.testing.assert_array_equal(cropped.array, small.array[start[0]:start[0] + 40, start[1]:start[1] + 100,
                                                             start[2]:start[2] + 90])
    expected = np.asarray(small.origin) + np.asarray(start[::-1]) * np.asarray(small.spacing)
    assert cropped.origin == pytest.approx(tuple(expected))
    padded = CenterCropOrPad((60, 130, 140), pad_value=-1000.0)(small)
    assert padded.array.shape == (60, 130, 140)
    np.testing.assert_array_equal(padded.array[6:54, 1:129, 6:134], small.array)
    assert padded.array[0].max() == -1000.0 and padded.array[:, :, 0].max() == -1000.0
    expected = np.asarray(small.origin) - np.array([6, 1, 6]) * np.asarray(small.spacing)   # (x, y, z) shift
    assert padded.origin == pytest.approx(tuple(expected))


def test_clip_and_scale():
    volume = Volume(array=np.array([[[-3000.0, -1000.0, 0.0, 500.0, 1000.0, 2000.0]]], np.float32),
                    spacing=(1.0, 1.0, 1.0))
    clipped = ClipHU(-1000, 1000)(volume)
    np.testing.assert_array_equal(clipped.array.ravel(), [-1000, -1000, 0, 500, 1000, 1000])
    ctclip = ScaleHU(-1000, 1000, -1, 1)(clipped)
    np.testing.assert_allclose(ctclip.array.ravel(), [-1, -1, 0, 0.5, 1, 1])
    assert ctclip.is_hu is False
    text2ct = ScaleHU(-1000, 1000, 0, 1)(clipped)
    np.testing.assert_allclose(text2ct.array.ravel(), [0, 0, 0.5, 0.75, 1, 1])


def test_presets_match_the_references():
    assert CTCLIP.spacing_xyz == (0.75, 0.75, 1.5) and CTCLIP.shape_zyx == (240, 480, 480)
    assert CTCLIP.clip_hu == (-1000, 1000) and CTCLIP.out_range == (-1, 1) and CTCLIP.pad_value == -1.0
    assert TEXT2CT.spacing_xyz == (0.75, 0.75, 3.0) and TEXT2CT.shape_zyx == (128, 512, 512)
    assert TEXT2CT.out_range == (0, 1) and TEXT2CT.pad_value == 0.0 and TEXT2CT.orientation == "RAS"
    assert DEMO.spacing_xyz == pytest.approx(DEMO_SPACING_XYZ) and DEMO.shape_zyx == DEMO_SHAPE_ZYX
    steps = [type(step).__name__ for step in CTCLIP.transforms().steps]
    assert steps == ["ResampleToSpacing", "ClipHU", "ScaleHU", "CenterCropOrPad"]


def test_demo_tensor_of_lung1(lung1):
    tensor = to_model_tensor(lung1, DEMO)
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32
    assert tuple(tensor.shape) == (1, *DEMO_SHAPE_ZYX)
    assert float(tensor.min()) == -1.0 and float(tensor.max()) == 1.0
    # lung1 covers 292 x 292 x 240 mm, the demo grid 350 x 350 x 300 mm: the border is padding (-1 = air).
    assert float(tensor[0, 0].abs().sub(1).abs().max()) == 0.0 and float(tensor[0, :, 0, 0].max()) == -1.0
    # and the single-step grid resampling gives nearly the same picture (centring differs by < 1 voxel)
    grid = resample_to_grid(lung1, DEMO_SHAPE_ZYX, DEMO_SPACING_XYZ)
    assert grid.array.shape == DEMO_SHAPE_ZYX
    assert centre_mm(grid) == pytest.approx(centre_mm(lung1), abs=1e-3)
    assert np.abs(np.clip(grid.array, -1000, 1000) / 1000 - tensor[0].numpy()).mean() < 0.05


def test_ctclip_and_text2ct_tensors(small):
    ctclip = to_model_tensor(small, CTCLIP)
    assert tuple(ctclip.shape) == (1, 240, 480, 480)
    assert float(ctclip.min()) == -1.0 and float(ctclip.max()) == 1.0
    # lung1 small spans 240 mm in z = 160 slices of 1.5 mm: 40 padded slices (-1) at each end.
    assert float(ctclip[0, :40].max()) == -1.0 and float(ctclip[0, 120].max()) > 0
    text2ct = to_model_tensor(small, TEXT2CT)
    assert tuple(text2ct.shape) == (1, 128, 512, 512)
    assert float(text2ct.min()) == 0.0 and float(text2ct.max()) == 1.0
    lps = to_model_tensor(small, replace(TEXT2CT, orientation="LPS"))
    torch.testing.assert_close(text2ct, lps.flip(2, 3))             # RAS: y and x reversed
    resized = to_model_tensor(small, Preprocessing.text2ct(fit="resize"))
    assert tuple(resized.shape) == (1, 128, 512, 512) and float(resized[0, 0].max()) > 0.5  # no padding: stretched


def test_text2ct_preset_flips_to_ras_as_a_named_step_that_keeps_the_geometry(small):
    """The RAS flip is a step of the Text2CT chain (so every caller of the chain gets it, the pipeline included),
    and the flipped volume still places each voxel where it was in the patient."""
    steps = Preprocessing.text2ct().transforms().steps
    assert isinstance(steps[-1], FlipToRAS) and not any(isinstance(s, FlipToRAS) for s in CTCLIP.transforms().steps)
    prepared, tensor = prepare(small, TEXT2CT)
    assert torch.equal(tensor[0], torch.from_numpy(prepared.array))
    before = Compose(steps[:-1])(small)
    np.testing.assert_array_equal(prepared.array, before.array[:, ::-1, ::-1])
    # voxel (k, j, i) of the flipped array is voxel (k, ny-1-j, nx-1-i) before: same physical point (x, y, z) mm
    k, j, i = 60, 100, 30
    nz, ny, nx = before.array.shape

    def point(volume, index_zyx):
        d = np.asarray(volume.direction).reshape(3, 3)
        return np.asarray(volume.origin) + d @ (np.asarray(index_zyx[::-1], float) * np.asarray(volume.spacing))
    np.testing.assert_allclose(point(prepared, (k, j, i)), point(before, (k, ny - 1 - j, nx - 1 - i)), atol=1e-6)
    # patient's left is now column 0: the direction's x column points to -x (right -> left reversed)
    assert np.asarray(prepared.direction).reshape(3, 3)[0, 0] == -1.0


def test_compose_runs_steps_in_order(small):
    pipeline = Compose([ClipHU(-1000, 1000), ScaleHU(-1000, 1000, 0, 1), CenterCropOrPad((8, 16, 16), 0.0)])
    out = pipeline(small)
    assert out.array.shape == (8, 16, 16) and 0.0 <= out.array.min() and out.array.max() <= 1.0
    assert "ScaleHU" in repr(pipeline)
