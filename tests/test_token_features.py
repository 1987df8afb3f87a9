"""engine/token_features.py: the frozen per-token front end for the demo CT-ViT (issue 12).

Scenes are drawn in HU on the demo grid (64 x 128 x 128 voxels, 2.73 x 2.73 x 4.69 mm) with partial-volume edges;
expected values are worked out from the drawn voxels, not from the code under test.
"""
import numpy as np
import pytest

from engine.errors import UserError
from engine.phantom import render_phantom, sample_findings
from engine.token_features import (FEATURE_NAMES, TokenFeatureConfig, feature_names, symmetric_eigenvalues_3x3,
                                   token_features)
from engine.volume import DEMO_SHAPE_ZYX, DEMO_SPACING_XYZ

SPACING_ZYX = np.array(DEMO_SPACING_XYZ)[::-1]
LUNG_HU, SOFT_TISSUE_HU = -865.0, 40.0


def column(name: str) -> int:
    return FEATURE_NAMES.index(name)


def millimetre_grid():
    """(z, y, x) voxel-centre coordinates in mm, each (64, 128, 128) by broadcasting."""
    return [np.arange(n, dtype=np.float32)[tuple(slice(None) if a == i else None for a in range(3))] * s
            for i, (n, s) in enumerate(zip(DEMO_SHAPE_ZYX, SPACING_ZYX))]


def occupancy(distance_mm: np.ndarray, radius_mm: float) -> np.ndarray:
    """Partial-volume share (0-1) of a voxel inside a surface at radius_mm (linear over one in-plane voxel)."""
    return np.clip((radius_mm - distance_mm) / SPACING_ZYX[2] + 0.5, 0.0, 1.0)


def ball(centre_zyx_mm, radius_mm: float) -> np.ndarray:
    z, y, x = millimetre_grid()
    cz, cy, cx = centre_zyx_mm
    return occupancy(np.sqrt((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2), radius_mm)


def tube_along_x(centre_zy_mm, radius_mm: float) -> np.ndarray:
    z, y, _ = millimetre_grid()
    d = np.sqrt((z - centre_zy_mm[0]) ** 2 + (y - centre_zy_mm[1]) ** 2)
    return np.broadcast_to(occupancy(d, radius_mm), DEMO_SHAPE_ZYX)


def token_centre_mm(k: int, j: int, i: int):
    """Physical centre (z, y, x) mm of token (k, j, i) (8 x 16 x 16 voxels)."""
    return tuple((np.array([8 * k, 16 * j, 16 * i]) + np.array([3.5, 7.5, 7.5])) * SPACING_ZYX)


def lung_scene(*objects) -> np.ndarray:
    """Uniform lung (-865 HU) with soft-tissue objects (occupancy maps) painted in."""
    hu = np.full(DEMO_SHAPE_ZYX, LUNG_HU, np.float32)
    for occ in objects:
        hu += occ * (SOFT_TISSUE_HU - hu)
    return hu


def test_feature_grid_is_the_ct_vit_token_grid_on_a_phantom():
    hu = render_phantom([], seed=3_200_001).array
    features = token_features(hu, DEMO_SPACING_XYZ)
    assert features.shape == (8, 8, 8, len(FEATURE_NAMES)) and features.dtype == np.float32
    assert np.isfinite(features).all()
    # token (k, j, i) is voxels [8k, 8k+8) x [16j, 16j+16) x [16i, 16i+16): its mean HU is that block's mean
    assert features[3, 5, 2, column("hu_mean")] == pytest.approx(hu[24:32, 80:96, 32:48].mean(), abs=0.01)
    # the window shares of a token sum to one
    shares = [column(n) for n in FEATURE_NAMES if n.startswith("share_")]
    np.testing.assert_allclose(features[..., shares].sum(-1), 1.0, atol=1e-5)
    fast = token_features(hu, DEMO_SPACING_XYZ, TokenFeatureConfig.fast())
    assert fast.shape == (8, 8, 8, len(feature_names(TokenFeatureConfig.fast())))
    # the fast preset's features are the same numbers as the full set's columns of the same name
    shared = feature_names(TokenFeatureConfig.fast())
    np.testing.assert_allclose(fast, features[..., [column(n) for n in shared]], rtol=1e-5, atol=1e-3)
    # the per-scale maps on two threads are the very same numbers, in the same columns, as on one
    assert np.array_equal(token_features(hu, DEMO_SPACING_XYZ, workers=2), token_features(hu, DEMO_SPACING_XYZ,
                                                                                            workers=1))


def test_a_grid_that_is_not_whole_tokens_is_a_user_error():
    with pytest.raises(UserError):
        token_features(np.zeros((60, 128, 128), np.float32), DEMO_SPACING_XYZ)


def test_metal_share_is_set_only_in_the_tokens_the_metal_ball_occupies():
    hu = np.full(DEMO_SHAPE_ZYX, SOFT_TISSUE_HU, np.float32)
    # a 2,500 HU ball of radius 6 mm centred on the corner shared by tokens (3..4, 3..4, 3..4)
    centre = tuple(np.array([32, 64, 64]) * SPACING_ZYX - SPACING_ZYX / 2)
    metal = ball(centre, 6.0) > 0.5
    hu[metal] = 2500.0
    features = token_features(hu, DEMO_SPACING_XYZ)
    expected = metal.reshape(8, 8, 8, 16, 8, 16).transpose(0, 2, 4, 1, 3, 5).reshape(8, 8, 8, -1).mean(-1)
    assert (expected > 0).sum() == 8          # the ball straddles the eight tokens around the corner
    np.testing.assert_allclose(features[..., column("share_metal")], expected, atol=1e-6)
    assert features[..., column("share_bone")].max() == 0.0   # metal is not counted as bone, unlike at a 1000 HU clip
    assert features[4, 4, 4, column("hu_max")] == 2500.0


def test_metal_share_marks_the_phantoms_medical_material():
    seed = 3_200_002
    rng = np.random.default_rng(seed)
    findings = sample_findings(["Medical material"], rng)
    with_material = token_features(render_phantom(findings, seed).array, DEMO_SPACING_XYZ)
    without = token_features(render_phantom([], seed).array, DEMO_SPACING_XYZ)
    assert without[..., column("share_metal")].max() == 0.0
    assert with_material[..., column("share_metal")].max() > 0.0


@pytest.mark.parametrize("radius_mm", [3.0, 5.0])
def test_a_nodule_is_a_blob_and_a_vessel_of_the_same_radius_is_a_tube(radius_mm):
    """A soft-tissue ball and a tube along x of the same radius in lung, in tokens of their own.

    Blobness tells them apart at every scale. Tubeness only from sigma 4 mm up: at 2.5 mm the 4.7 mm slices cut a
    small ball into a disc or two, whose rim looks as tube-like as a vessel (measured: 36 vs 37 HU at r = 3 mm)."""
    nodule_token, vessel_token = (4, 2, 3), (4, 5, 3)
    nodule = ball(token_centre_mm(*nodule_token), radius_mm)
    vessel = tube_along_x(token_centre_mm(*vessel_token)[:2], radius_mm)
    features = token_features(lung_scene(nodule, vessel), DEMO_SPACING_XYZ)
    at_nodule, at_vessel = features[nodule_token], features[vessel_token]
    for sigma in TokenFeatureConfig.demo().hessian_sigmas_mm:
        blob = column(f"blob_s{sigma:g}_max")
        assert at_nodule[blob] > 10.0 and at_vessel[blob] < 0.2 * at_nodule[blob], sigma
        # both raise the Laplacian of Gaussian over empty lung
        empty = features[1, 2, 6, column(f"log_s{sigma:g}_max")]
        assert at_nodule[column(f"log_s{sigma:g}_max")] > empty + 30.0, sigma
        assert at_vessel[column(f"log_s{sigma:g}_max")] > empty + 30.0, sigma
    for sigma in TokenFeatureConfig.demo().hessian_sigmas_mm[1:]:
        tube = column(f"tube_s{sigma:g}_max")
        assert at_vessel[tube] > 1.5 * at_nodule[tube], sigma
        # the vessel crosses its whole token, the ball fills a corner of its own: the token mean says so too
        assert at_vessel[column(f"tube_s{sigma:g}_mean")] > 1.5 * at_nodule[column(f"tube_s{sigma:g}_mean")], sigma


def test_features_move_with_the_object_by_whole_tokens():
    centre = token_centre_mm(3, 3, 3)
    scene = lung_scene(ball(centre, 4.0), tube_along_x((centre[0], centre[1] + 20.0), 2.5))
    features = token_features(scene, DEMO_SPACING_XYZ)
    for axis, step in enumerate((8, 16, 16)):
        shifted = token_features(np.roll(scene, step, axis=axis), DEMO_SPACING_XYZ)
        # token k + 1 of the shifted scene is token k of the original (away from the wrapped-around edge)
        moved = np.take(shifted, np.arange(1, 8), axis=axis)
        original = np.take(features, np.arange(0, 7), axis=axis)
        np.testing.assert_allclose(moved, original, rtol=1e-4, atol=1e-2)


def test_closed_form_eigenvalues_match_numpy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 3, 3)) * 100.0
    a = a + a.transpose(0, 2, 1)
    a[:5] = np.diag([7.0, 7.0, 7.0])              # a triple eigenvalue: the closed form's degenerate case
    mine = np.stack(symmetric_eigenvalues_3x3(a[:, 0, 0], a[:, 1, 1], a[:, 2, 2], a[:, 0, 1], a[:, 0, 2], a[:, 1, 2]),
                    axis=1)
    np.testing.assert_allclose(mine, np.linalg.eigvalsh(a), atol=1e-6 * 400)
