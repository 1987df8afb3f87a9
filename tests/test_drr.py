"""DRR physics, orientation and geometry on the phantom (whose heart and aortic arch are on the patient's left) and on
a real CT; each test can fail if an axis is flipped, swapped or scaled."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from engine.drr import (METAL_HU, MU_WATER_PER_MM, DRRAugmentation, attenuation_per_mm, optical_depth, project,
                        simulate_radiograph)
from engine.errors import UserError
from engine.phantom import HU, phantom_masks, render_phantom
from engine.phantom.grid import resolve_grid
from engine.volume import Volume, read_ct

ROOT = Path(__file__).resolve().parents[1]
LUNG1_SMALL = ROOT.parent / "shared" / "data" / "ct" / "lung1_image_small128.nii.gz"
SHAPE = (48, 96, 96)          # a small phantom grid; the default field of view 350 x 350 x 300 mm
SEED = 9101


def test_attenuation_is_water_scaled_and_clipped_at_zero():
    hu = torch.tensor([-1024.0, -1000.0, 0.0, 1000.0])
    assert torch.allclose(attenuation_per_mm(hu), torch.tensor([0.0, 0.0, MU_WATER_PER_MM, 2 * MU_WATER_PER_MM]))


def test_metal_at_the_scanner_ceiling_attenuates_as_metal():
    """A CT file stores metal at <= 3071 HU (4.07x water); the radiograph takes it as METAL_HU (16x water). Bone
    (2000 HU) is not metal."""
    hu = torch.tensor([2000.0, 2499.0, 2500.0, 3071.0])
    expected = MU_WATER_PER_MM * torch.tensor([3.0, 3.499, 16.0, 16.0])
    assert METAL_HU == 15000.0 and torch.allclose(attenuation_per_mm(hu), expected)


def test_a_sternal_wire_over_the_spine_shows_on_the_film():
    """A wire 2 voxels (12.5 mm) high and 16 wide, one voxel (3.6 mm) deep, at the anterior midline, stored at
    3071 HU as a CT file stores metal: over the mediastinum and spine it brightens the display by about 0.11 (with
    the CT's own 3071 HU as the attenuation it was 0.026, and the wires of a sternotomy vanished on the film)."""
    volume = render_phantom([], SEED, shape_zyx=SHAPE, noise=False)
    nz, ny, nx = SHAPE
    front = int(np.flatnonzero(volume.array[nz // 2, :, nx // 2] > 300)[0])   # the sternum's front row
    wire = np.zeros(SHAPE, bool)
    wire[nz // 2 - 1: nz // 2 + 1, front, nx // 2 - 8: nx // 2 + 8] = True
    wired = volume.array.copy()
    wired[wire] = 3071.0
    without = simulate_radiograph(volume).image
    with_wire = simulate_radiograph(Volume(array=wired, spacing=volume.spacing)).image
    on_wire = project(wire.astype(np.float32), volume.spacing)[0].numpy() > 0.5 * volume.spacing[1]
    assert on_wire.sum() >= 40
    assert np.median((with_wire - without)[on_wire]) > 0.08
    assert np.abs(with_wire - without)[~ndimage.binary_dilation(on_wire, iterations=2)].max() < 0.02


def test_line_integral_uses_the_spacing_along_y():
    # a water slab 40 voxels thick along y at 2.5 mm: optical depth = 0.0193 * 100 mm = 1.93 everywhere it crosses
    hu = np.full((10, 60, 20), -1000.0, np.float32)
    hu[:, 10:50, :] = 0.0
    depth, pixel = optical_depth(Volume(array=hu, spacing=(2.0, 2.5, 2.0)))
    assert pixel == 2.0 and depth.shape == (10, 20)
    assert torch.allclose(depth, torch.full_like(depth, MU_WATER_PER_MM * 100.0), atol=1e-5)


def test_heart_shadow_is_on_the_image_right_half():
    # the heart made 500 HU denser: the DRR's change is exactly the heart's shadow, wherever the pipeline puts it
    normal = render_phantom([], SEED, shape_zyx=SHAPE, noise=False)
    dense_heart = render_phantom([], SEED, shape_zyx=SHAPE, noise=False)
    dense_heart.array[phantom_masks(SEED, shape_zyx=SHAPE)["heart"]] += 500.0
    shadow = (optical_depth(dense_heart)[0] - optical_depth(normal)[0]).numpy()
    half = shadow.shape[1] // 2
    assert shadow[:, half:].sum() > 0.65 * shadow.sum()               # the patient's left = the image's right
    displayed = simulate_radiograph(dense_heart).image - simulate_radiograph(normal).image
    assert displayed[:, half:].sum() > displayed[:, :half].sum()


def test_aortic_arch_is_on_the_image_right_and_above_the_heart():
    masks = phantom_masks(SEED, shape_zyx=SHAPE)
    spacing = resolve_grid(SHAPE, None).spacing
    aorta, _ = project(masks["aorta"], spacing)
    heart, _ = project(masks["heart"], spacing)
    top_aorta = int(np.nonzero(aorta.sum(1).numpy())[0][0])
    top_heart = int(np.nonzero(heart.sum(1).numpy())[0][0])
    assert top_aorta < top_heart                                       # head up: the arch sits above the heart
    arch_row = aorta[top_aorta:top_aorta + 3].sum(0).numpy()
    assert (arch_row * np.arange(arch_row.size)).sum() / arch_row.sum() > aorta.shape[1] / 2


def test_head_is_up_apices_above_the_diaphragm():
    lungs, _ = project(phantom_masks(SEED, shape_zyx=SHAPE)["lungs"], resolve_grid(SHAPE, None).spacing)
    width = (lungs > 0).sum(1).numpy()
    rows = np.nonzero(width)[0]
    widest = np.nonzero(width == width.max())[0]
    assert width[rows[0]] < 0.6 * width.max()                          # the top row of lung is a narrow apex
    assert widest.mean() > (rows[0] + rows[-1]) / 2                    # the widest lung (the bases) in the lower half


def test_aspect_ratio_is_the_physical_field_of_view():
    hu = render_phantom([], SEED, shape_zyx=(30, 64, 80), spacing_xyz=(3.0, 4.0, 8.0), noise=False).array
    volume = Volume(array=hu, spacing=(3.0, 4.0, 8.0))
    image = simulate_radiograph(volume).image
    assert image.shape == (80, 80)          # 30 x 8 mm = 240 mm tall, 80 x 3 mm = 240 mm wide, 3 mm pixels
    real = read_ct(LUNG1_SMALL)
    drr = simulate_radiograph(real)
    width_mm, _, height_mm = real.extent_mm
    h, w = drr.image.shape
    assert drr.pixel_spacing_mm[0] == drr.pixel_spacing_mm[1]
    assert abs(w / h - width_mm / height_mm) < 2.0 / h


def test_metal_ball_is_the_brightest_blob_at_its_place():
    volume = render_phantom([], SEED, shape_zyx=SHAPE, noise=False)
    grid = resolve_grid(SHAPE, None)
    x, y, z = grid.axis("x"), grid.axis("y"), grid.axis("z")
    centre = (60.0, 0.0, 30.0)                          # mm: in the patient's left lung, above the centre
    inside = ((x[None, None, :] - centre[0]) ** 2 + (y[None, :, None] - centre[1]) ** 2
              + (z[:, None, None] - centre[2]) ** 2) < 10.0 ** 2
    volume.array[inside] = HU["metal"]                  # steel's true attenuation (a CT file would clip it at 3071)
    drr = simulate_radiograph(volume)
    depth, pixel = optical_depth(volume)               # -log(I / I0) before the display window saturates it
    assert drr.pixel_spacing_mm[0] == pixel
    row, col = np.unravel_index(np.argmax(ndimage.gaussian_filter(depth.numpy(), 1)), depth.shape)
    # display: column 0 at the patient's right edge (x min), row 0 at the top (z max)
    expected_col = (centre[0] - (x[0] - grid.spacing[0] / 2)) / pixel
    expected_row = ((z[-1] + grid.spacing[2] / 2) - centre[2]) / pixel
    assert abs(col + 0.5 - expected_col) <= 1.5 and abs(row + 0.5 - expected_row) <= 1.5
    assert drr.image[row, col] > 0.99                   # white on the display too
    assert col > drr.image.shape[1] / 2                # the patient's left is the image's right


def test_pa_and_ap_display_alike_and_the_pa_detector_image_is_mirrored():
    volume = read_ct(LUNG1_SMALL)
    pa, ap = simulate_radiograph(volume, "pa").image, simulate_radiograph(volume, "ap").image
    assert np.array_equal(pa, ap)
    pa_detector = simulate_radiograph(volume, "pa", detector_view=True).image
    ap_detector = simulate_radiograph(volume, "ap", detector_view=True).image
    assert np.array_equal(pa_detector, pa[:, ::-1]) and np.array_equal(ap_detector, ap)
    assert not np.array_equal(pa_detector, pa)
    with pytest.raises(UserError):
        simulate_radiograph(volume, "lateral")


def test_augmentation_is_seeded_and_keeps_the_anatomy():
    volume = render_phantom([], SEED, shape_zyx=SHAPE, noise=False)
    aug = DRRAugmentation.sample(np.random.default_rng(3))
    a = simulate_radiograph(volume, augmentation=aug, seed=1).image
    b = simulate_radiograph(volume, augmentation=aug, seed=1).image
    c = simulate_radiograph(volume, augmentation=aug, seed=2).image
    clean = simulate_radiograph(volume).image
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() >= 0 and a.max() <= 1 and np.abs(a - clean).mean() > 0.005
    assert np.corrcoef(a.ravel(), clean.ravel())[0, 1] > 0.9              # mild: still the same chest


def test_rotation_turns_the_patient_about_the_vertical_axis():
    hu = np.full((8, 40, 40), -1000.0, np.float32)
    hu[:, 18:22, 5:35] = 1000.0                         # a bar along x, 4 voxels thick in y
    depth0, _ = optical_depth(Volume(array=hu, spacing=(1.0, 1.0, 1.0)))
    depth90, _ = optical_depth(Volume(array=hu, spacing=(1.0, 1.0, 1.0)), rotation_deg=90)
    # unrotated the beam crosses the bar's 4 mm thickness; turned 90 degrees it runs along its 30 mm length
    assert abs(float(depth0[:, 20].mean()) - 4 * 2 * MU_WATER_PER_MM) < 1e-3
    assert float(depth90.max()) > 6 * float(depth0.max())


def test_cli_drr_writes_a_png(tmp_path):
    out = tmp_path / "drr.png"
    done = subprocess.run([sys.executable, "-m", "engine", "drr", "--ct", str(LUNG1_SMALL), "--out", str(out),
                           "--view", "ap", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    picture = np.asarray(Image.open(out))
    assert answer["view"] == "ap" and list(picture.shape) == answer["shape"]
    assert picture.dtype == np.uint8 and picture.max() > 200
    bad = subprocess.run([sys.executable, "-m", "engine", "drr", "--ct", str(tmp_path / "none.nii.gz"), "--out",
                          str(out), "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "error" in json.loads(bad.stdout)
