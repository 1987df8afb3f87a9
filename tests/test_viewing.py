"""engine.viewing: physical aspect, radiological orientation, windowing, overlays and the 3-D surfaces."""
from __future__ import annotations

import numpy as np
import pytest

from engine.viewing import (PLANES, WINDOWS, difference_heat, display_shape, figure_3d, plane_count, plane_image,
                            surface_mesh, window)
from engine.volume import Volume, read_ct


@pytest.fixture(scope="module")
def lung1(lung1_path) -> Volume:
    return read_ct(lung1_path)


def test_coronal_and_sagittal_of_lung1_keep_their_physical_aspect(lung1):
    sx, sy, sz = lung1.spacing
    assert (sx, sz) == pytest.approx((0.5703125, 5.0))
    for plane, across in (("coronal", 512 * sx), ("sagittal", 512 * sy)):
        img = plane_image(lung1, plane, 200, *WINDOWS["lung"])
        h, w = img.shape
        assert img.dtype == np.uint8
        assert w == 512  # the finer spacing (0.57 mm) is kept across
        assert abs(h - w * (48 * sz) / across) <= 1.0, (plane, img.shape)
    assert plane_image(lung1, "axial", 20, *WINDOWS["lung"]).shape == (512, 512)


def test_aspect_on_an_anisotropic_grid():
    vol = Volume(np.zeros((10, 30, 40), np.float32), spacing=(1.0, 2.0, 3.0))  # x 40 mm, y 60 mm, z 30 mm
    assert display_shape(vol, "axial") == (60, 40)     # (y mm, x mm) at 1 mm pixels
    assert display_shape(vol, "coronal") == (30, 40)   # (z mm, x mm)
    assert display_shape(vol, "sagittal") == (15, 30)  # (z, y) at the finer 2 mm: 30 / 2, 60 / 2
    assert [plane_count(vol, p) for p in PLANES] == [10, 30, 40]


def _marked_volume():
    """A dark volume (z, y, x) with a bright marker at the patient's right-anterior-superior corner (x=0, y=0,
    z=top) and a grey one at the left-posterior-inferior corner (x=max, y=max, z=0)."""
    arr = np.full((12, 16, 20), -1000.0, np.float32)
    arr[-2:, :2, :2] = 1000.0     # right (x small), anterior (y small), superior (z large)
    arr[:2, -2:, -2:] = 0.0       # left, posterior, inferior
    return Volume(arr, spacing=(1.0, 1.0, 1.0))


@pytest.mark.parametrize("plane,index", [("axial", 11), ("coronal", 0), ("sagittal", 0)])
def test_right_anterior_superior_marker_is_top_left(plane, index):
    img = plane_image(_marked_volume(), plane, index, 0.0, 2000.0)
    h, w = img.shape
    assert img[0, 0] > 200                       # the bright marker
    assert img[h - 1, w - 1] < 50 and img[0, w - 1] < 50 and img[h - 1, 0] < 50


@pytest.mark.parametrize("plane,index", [("axial", 0), ("coronal", 15), ("sagittal", 19)])
def test_left_posterior_inferior_marker_is_bottom_right(plane, index):
    img = plane_image(_marked_volume(), plane, index, 0.0, 2000.0)
    h, w = img.shape
    assert 100 < img[h - 1, w - 1] < 160        # 0 HU in a (0, 2000) window is mid grey
    assert img[0, 0] < 50


def test_window_maps_level_and_width_to_grey_levels():
    hu = np.array([-2000, -160, 40, 240, 3000], np.float32)
    out = window(hu, 40, 400)
    assert out.dtype == np.uint8
    assert out.tolist() == [0, 0, 128, 255, 255]
    lung = window(np.array([-1350, -600, 150], np.float32), *WINDOWS["lung"])
    assert lung.tolist() == [0, 128, 255]
    ramp = window(np.linspace(-1000, 1000, 50, dtype=np.float32), 0, 2000)
    assert np.all(np.diff(ramp.astype(int)) >= 0) and ramp[0] == 0 and ramp[-1] == 255


def test_overlay_blends_a_heat_map_in_colour(lung1):
    grey = plane_image(lung1, "coronal", 256, *WINDOWS["mediastinum"])
    heat = np.zeros((48, 512), np.float32)      # the raw coronal plane: (z, x)
    heat[40:, 300:] = 1.0                        # bottom rows of the array = top of the displayed image
    rgb = plane_image(lung1, "coronal", 256, *WINDOWS["mediastinum"], overlay=heat)
    assert rgb.shape == grey.shape + (3,) and rgb.dtype == np.uint8
    h, w = grey.shape
    untouched = rgb[h - 50:, :250]              # overlay 0: exactly the grey image in all three channels
    assert np.array_equal(untouched[..., 0], grey[h - 50:, :250])
    assert np.array_equal(untouched[..., 0], untouched[..., 2])
    hot = rgb[:30, 350:].astype(int)             # overlay 1, displayed at the top (head up): red dominates
    assert (hot[..., 0] - hot[..., 2]).mean() > 60
    # A whole-volume heat map is sliced like the volume.
    vol_heat = np.zeros(lung1.array.shape, np.float32)
    vol_heat[40:, 256, 300:] = 1.0
    assert np.array_equal(plane_image(lung1, "coronal", 256, *WINDOWS["mediastinum"], overlay=vol_heat), rgb)
    with pytest.raises(ValueError):
        plane_image(lung1, "axial", 0, 40, 400, overlay=np.zeros((3, 3)))


def test_surface_mesh_of_lung1_has_bone_and_lungs_in_millimetres(lung1):
    meshes = surface_mesh(lung1)
    assert set(meshes) == {"bone", "lungs"}
    lo = np.array(lung1.origin)
    hi = lo + np.array(lung1.extent_mm)
    for mesh in meshes.values():
        assert mesh.vertices.shape[1] == 3 and mesh.faces.shape[1] == 3 and len(mesh.faces) > 1000
        assert np.all(mesh.vertices >= lo - 10) and np.all(mesh.vertices <= hi + 10)
    lungs = meshes["lungs"].vertices
    width_mm = lungs[:, 0].max() - lungs[:, 0].min()
    assert 180 < width_mm < 300                  # both lungs side by side, inside a 292 mm field of view
    mid_x = (lungs[:, 0].max() + lungs[:, 0].min()) / 2
    assert (lungs[:, 0] < mid_x - 40).any() and (lungs[:, 0] > mid_x + 40).any()  # two lungs, not one blob


def test_figure_3d_has_bone_and_lung_meshes_with_equal_aspect(lung1):
    fig = figure_3d(lung1)
    names = {t.name: t for t in fig.data}
    assert set(names) == {"bone", "lungs"} and all(t.type == "mesh3d" for t in fig.data)
    assert names["lungs"].opacity < 1.0 and names["bone"].opacity == 1.0
    assert fig.layout.scene.aspectmode == "data"


def test_difference_heat_is_transparent_below_30_hu_and_full_from_300_hu():
    difference = np.array([0.0, -20.0, 30.0, 165.0, -165.0, 300.0, -1000.0], np.float32)
    np.testing.assert_allclose(difference_heat(difference), [0, 0, 0, 0.5, 0.5, 1, 1])  # (165 - 30) / 270 = 0.5


def test_a_small_simulated_film_is_enlarged_for_its_panel_and_a_large_film_shrunk(shared_data):
    """The display's longer side lands in [512, 1024] pixels with the film's aspect kept: a simulated film of the
    demo phantom (about 110 x 128 pixels) had been drawn small inside the 420-pixel-high radiograph panel."""
    from engine.drr import simulate_radiograph
    from engine.phantom import render_phantom
    from engine.radiograph import read_radiograph
    from engine.viewing import radiograph_image

    film = simulate_radiograph(render_phantom([], 7, noise=False)).image
    h, w = film.shape
    assert max(h, w) < 512
    shown = radiograph_image(film)
    assert max(shown.shape) == 512 and shown.dtype == np.uint8
    assert shown.shape[0] / shown.shape[1] == pytest.approx(h / w, abs=0.01)
    # enlarged, not altered: the bright mediastinum stays in the middle column band, the dark lungs either side
    third = shown.shape[1] // 3
    middle, sides = shown[:, third:2 * third].mean(), np.r_[shown[:, :third].ravel(), shown[:, 2 * third:].ravel()].mean()
    assert middle > sides + 20
    heat = np.zeros_like(film)
    heat[: h // 2] = 1.0
    overlaid = radiograph_image(film, overlay=heat)
    assert overlaid.shape == (*shown.shape, 3)
    red_excess = overlaid[..., 0].astype(int) - overlaid[..., 2].astype(int)
    assert red_excess[: shown.shape[0] // 3].mean() > red_excess[-shown.shape[0] // 3:].mean() + 50

    png = read_radiograph(shared_data / "cxr" / "00000001_000.png").image          # 512 x 512: shown as it is
    np.testing.assert_array_equal(radiograph_image(png), np.round(np.clip(png, 0, 1) * 255).astype(np.uint8))
    film_1024 = read_radiograph(shared_data / "cxr" / "siim_pa_chest.dcm").image    # 1024 x 1024
    large = np.kron(film_1024, np.ones((2, 2), np.float32))                          # the film at 2048 x 2048
    shrunk = radiograph_image(large)
    assert shrunk.shape == (1024, 1024)
    assert np.abs(shrunk.astype(int) - radiograph_image(film_1024).astype(int)).mean() < 3   # the same picture
