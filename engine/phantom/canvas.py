"""The canvas a rendering paints on: the HU volume (z, y, x), its voxel coordinates, and the dense layer (calcium and
metal) that is painted after the scanner blur so that thin, dense objects keep their HU."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.phantom.grid import Box, Grid, occupancy_volume, rasterize_tubes
from engine.phantom.hu import HU


@dataclass
class Canvas:
    """hu: float32 HU (z, y, x), starts as air. X, Y, Z: broadcastable physical coordinates (mm) of the voxels.
    dense: (flat voxel indices, occupancy, HU) painted after the blur; metal: flat indices of metal (for streaks)."""
    grid: Grid
    hu: np.ndarray = field(init=False)
    X: np.ndarray = field(init=False)
    Y: np.ndarray = field(init=False)
    Z: np.ndarray = field(init=False)
    dense: list[tuple[np.ndarray, np.ndarray, float]] = field(default_factory=list)
    metal: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self):
        g = self.grid
        self.hu = np.full(g.shape, HU["air"], np.float32)
        self.X, self.Y, self.Z = g.axis("x")[None, None, :], g.axis("y")[None, :, None], g.axis("z")[:, None, None]

    def blend(self, occ, value, where=None):
        """hu <- hu + occ * (value - hu) (alpha compositing) on the voxels where occ > 0 (sparse).

        where: None, a boolean/float volume, or a function (flat indices, occupancies) -> weights.
        """
        nz = np.flatnonzero(occ)
        if nz.size == 0:
            return
        o = occ.reshape(-1)[nz]
        if callable(where):
            o = o * where(nz, o)
        elif where is not None:
            o = o * where.reshape(-1)[nz]
        h = self.hu.reshape(-1)
        cur = h[nz]
        h[nz] = cur + o * (np.float32(value) - cur)

    def box_around(self, centre, half) -> Box:
        """The grid box of the physical box centre +- half (x, y, z mm)."""
        c, h = np.asarray(centre, np.float64), np.asarray(half, np.float64)
        return self.grid.box(c - h, c + h)

    def add_dense(self, p0, p1, r0, r1, value) -> np.ndarray:
        """Queue tubes (mm) of `value` HU for the dense layer; returns their flat voxel indices."""
        flat, occ = rasterize_tubes(self.grid, p0, p1, r0, r1)
        self.dense.append((flat, occ, float(value)))
        return flat

    def add_metal(self, p0, p1, r0, r1):
        """Queue metal tubes (mm) for the dense layer; they also cast streaks."""
        self.metal.append(self.add_dense(p0, p1, r0, r1, HU["metal"]))

    def points_in(self, mask, rng, n):
        """n random voxel centres (n, 3) mm drawn from a boolean mask (with replacement if it is small)."""
        idx = np.flatnonzero(mask)
        if idx.size == 0:
            return np.zeros((0, 3))
        pick = idx[rng.integers(idx.size, size=n)]
        k, j, i = np.unravel_index(pick, self.grid.shape)
        g = self.grid
        return np.stack([g.axis("x")[i], g.axis("y")[j], g.axis("z")[k]], axis=1).astype(np.float64)

    def lookup(self, mask, P):
        """Value of a (z, y, x) mask at points P (N, 3) mm (nearest voxel; False outside the grid)."""
        g = self.grid
        idx = [np.round((P[:, i] - g.origin[i]) / g.spacing[i]).astype(np.int64) for i in range(3)]
        n = (g.shape[2], g.shape[1], g.shape[0])
        ok = np.all([(idx[i] >= 0) & (idx[i] < n[i]) for i in range(3)], axis=0)
        out = np.zeros(len(P), bool)
        out[ok] = mask[idx[2][ok], idx[1][ok], idx[0][ok]] > 0
        return out

    def tube_occ(self, segments, extra_r: float = 0.0, scale_r: float = 1.0, grow: float = 0.0):
        """Occupancy volume of tube segments ((p0, p1, r0, r1) tuples, mm) with radii * scale_r + extra_r
        (and, with grow > 0, a second volume for radii + grow)."""
        seg = [[], [], [], []]
        for item in segments:
            for k in range(4):
                seg[k].append(np.asarray(item[k], np.float64).reshape(len(item[0]), -1) if k < 2 else
                              np.asarray(item[k], np.float64).ravel())
        p0, p1 = np.concatenate(seg[0]), np.concatenate(seg[1])
        r0 = np.concatenate(seg[2]) * scale_r + extra_r
        r1 = np.concatenate(seg[3]) * scale_r + extra_r
        if grow:
            flat, occ, occ_g = rasterize_tubes(self.grid, p0, p1, r0, r1, grow=grow)
            return occupancy_volume(self.grid, flat, occ), occupancy_volume(self.grid, flat, occ_g)
        flat, occ = rasterize_tubes(self.grid, p0, p1, r0, r1)
        return occupancy_volume(self.grid, flat, occ)
