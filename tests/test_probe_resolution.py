"""The resolution probe's geometry helpers on hand-made shapes whose answers are known."""
import numpy as np

from training.probe_resolution import _components, _diameter_mm, _within_mm


def _ball(shape, centre, radius_mm, sampling_zyx):
    grids = np.meshgrid(*[(np.arange(n) - c) * s for n, c, s in zip(shape, centre, sampling_zyx)], indexing="ij")
    return sum(g ** 2 for g in grids) <= radius_mm ** 2


def test_ball_is_compact_and_rod_is_elongated():
    sp = (1.0, 1.0, 1.0)
    mask = _ball((40, 40, 40), (12, 12, 12), 5.0, sp)
    mask[30, 5:35, 28:31] = True                       # a rod 30 x 3 x 1 voxels, apart from the ball
    vol, elong = _components(mask, sp)
    order = np.argsort(vol)
    rod, ball = order
    assert abs(vol[ball] - 4 / 3 * np.pi * 125) / (4 / 3 * np.pi * 125) < 0.1
    assert abs(_diameter_mm(vol[[ball]])[0] - 10.0) < 0.5
    assert elong[ball] < 1.1
    assert elong[rod] > 5.0


def test_anisotropic_spacing_is_in_mm():
    sp = (5.0, 1.0, 1.0)                                # thick slices
    mask = np.zeros((9, 31, 31), bool)
    mask[4, 15, 15] = True
    grown = _within_mm(mask, 5.0, sp)
    assert grown[:, 15, 15].sum() == 3                  # one slice each way
    assert grown[4, 15, :].sum() == 11                  # five voxels each way
    shrunk = _within_mm(_ball((9, 31, 31), (4, 15, 15), 12.0, sp), 6.0, sp, inside=True)
    assert 11 <= shrunk[4, 15, :].sum() <= 13             # radius 12 mm less 6 mm: about 6 mm each way
    assert shrunk[:, 15, 15].sum() == 3                 # the slices at +-5 mm are still 7 mm deep; +-10 mm are not


def test_no_components():
    vol, elong = _components(np.zeros((5, 5, 5), bool), (1.0, 1.0, 1.0))
    assert vol.size == 0 and elong.size == 0
