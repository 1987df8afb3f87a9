"""The generator's evaluation building blocks, with hand-worked answers (the full protocol runs on the shipped
generator: python -m training generate-eval, whose figures are in assets/generator/metrics.json)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.tiny_models import tiny_cxr_config
from training.eval_generate import SLICES_PER_PLANE, degraded, fid, fid_2_5d, plane_slices, slice_features


def test_fid_of_a_shifted_copy_is_the_squared_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 3))
    shift = np.array([3.0, 0.0, -4.0])            # same covariance, means 5 apart: FID = 5^2 + trace term 0
    assert fid(a, a + shift) == pytest.approx(25.0, abs=1e-6)
    assert fid(a, a) == pytest.approx(0.0, abs=1e-6)
    assert fid(a, 2 * a) > 0.5                     # same mean, other covariance: (1 - 2)^2 x trace(cov) ~ 3
    # on the reference's principal axes: rotation-invariant, so with all axes kept it is the same number
    assert fid(a, a + shift, components=3) == pytest.approx(25.0, abs=1e-6)
    b = a.copy()
    b[:, 2] *= 0.01                                # the third axis carries almost no variance in the reference
    assert fid(b + [0, 0, 7.0], b, components=2) == pytest.approx(0.0, abs=1e-3)   # a shift along it is dropped


def test_plane_slices_are_evenly_spaced_interior_slices_of_each_plane():
    hu = np.arange(10 * 12 * 14, dtype=np.float32).reshape(10, 12, 14)
    planes = plane_slices(hu, n=2)                 # z: linspace(0, 9, 4) = 0, 3, 6, 9 -> interior 3 and 6
    assert [p.shape for p in planes["axial"]] == [(12, 14)] * 2
    assert np.array_equal(planes["axial"][0], hu[3]) and np.array_equal(planes["axial"][1], hu[6])
    assert np.array_equal(planes["coronal"][0], hu[:, 4, :])      # y: linspace(0, 11, 4) = 0, 3.67, 7.33, 11
    assert np.array_equal(planes["sagittal"][1], hu[:, :, 9])     # x: linspace(0, 13, 4) = 0, 4.33, 8.67, 13


def test_slice_features_and_fid_2_5d_separate_a_different_anatomy():
    from engine.models.cxr_encoder import CXREncoder

    torch.manual_seed(0)
    encoder = CXREncoder(tiny_cxr_config()).eval()
    rng = np.random.default_rng(1)
    z, y, x = np.mgrid[:16, :32, :32]
    ball = np.where((y - 16) ** 2 + (x - 16) ** 2 < 100, 40.0, -900.0)           # a soft-tissue cylinder in air
    same = [ball + rng.normal(0, 20, ball.shape) for _ in range(4)]
    other = [np.where(x < 16, 40.0, -900.0) + rng.normal(0, 20, ball.shape) for _ in range(4)]
    features = slice_features(same, encoder)
    assert {k: v.shape for k, v in features.items()} == {p: (4 * SLICES_PER_PLANE, encoder.config.feature_dim)
                                                         for p in ("axial", "coronal", "sagittal")}
    near = fid_2_5d(same[:2], same[2:], encoder)["mean"]
    far = fid_2_5d(same[:2], other[:2], encoder)["mean"]
    assert far > 3 * near


def test_degradations_keep_the_grid_and_remove_what_a_hand_count_says():
    z, y, x = np.mgrid[:8, :16, :16]
    checker = np.where((z + y + x) % 2 == 0, 100.0, -100.0).astype(np.float32)   # +-100 HU, one voxel period
    flat = np.full((8, 16, 16), -850.0, dtype=np.float32)
    for kind, amount in (("gaussian", 0.7), ("average", 2), ("average", 4)):
        assert degraded(checker, kind, amount).shape == checker.shape
        assert np.allclose(degraded(flat, kind, amount), -850.0, atol=1e-3)     # nothing to blur in a flat lung
    # every 2 x 2 x 2 block of the checkerboard holds four +100 and four -100: its mean, and so the upsampling, is 0
    assert np.abs(degraded(checker, "average", 2)).max() < 1e-3
    # a Gaussian of SD 0.7 voxel passes exp(-pi^2 0.7^2 / 2) = 0.089 of the Nyquist frequency per axis: 0.089^3 of
    # 100 HU is 0.07 HU in the interior (the sampled kernel passes a little more; the edges reflect)
    assert np.abs(degraded(checker, "gaussian", 0.7)[2:-2, 2:-2, 2:-2]).max() < 1.0
    # a step edge keeps its two plateaus away from the edge and gains a ramp across it
    step = np.where(x < 8, -1000.0, 0.0).astype(np.float32)
    blurred = degraded(step, "average", 4)
    assert blurred[0, 0, 0] == pytest.approx(-1000.0) and blurred[0, 0, -1] == pytest.approx(0.0)
    assert -1000.0 < blurred[0, 0, 7] < 0.0
