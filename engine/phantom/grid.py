"""The phantom's voxel grid and rasterising: Grid and Box, partial-volume tubes, smooth random fields.

Geometry is in physical millimetres, x = patient's left, y = posterior, z = head, origin at the centre of the field
of view; arrays are (z, y, x).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline

from engine.errors import UserError

FOV_XYZ_MM = (350.0, 350.0, 300.0)   # physical field of view of the default grid (x, y, z), mm


@dataclass(frozen=True)
class Grid:
    """A voxel grid: shape (z, y, x), spacing (x, y, z) mm, centred on the physical origin."""
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @property
    def origin(self) -> tuple[float, float, float]:
        """Physical (x, y, z) mm of voxel (0, 0, 0)."""
        nz, ny, nx = self.shape
        sx, sy, sz = self.spacing
        return (-(nx - 1) / 2 * sx, -(ny - 1) / 2 * sy, -(nz - 1) / 2 * sz)

    def axis(self, name: str) -> np.ndarray:
        i = "xyz".index(name)
        n = self.shape[2 - i]
        return (self.origin[i] + np.arange(n) * self.spacing[i]).astype(np.float32)

    @property
    def h(self) -> float:
        """In-plane voxel size (mm): the width of soft edges."""
        return float(min(self.spacing[0], self.spacing[1]))

    def box(self, lo, hi) -> "Box":
        """The sub-block of voxels whose centres lie in the physical box [lo, hi] (x, y, z mm)."""
        sl = []
        for i in (2, 1, 0):
            c = self.axis("xyz"[i])
            a, b = np.searchsorted(c, lo[i]), np.searchsorted(c, hi[i], side="right")
            sl.append(slice(int(a), int(max(a, b))))
        return Box(self, tuple(sl))


@dataclass(frozen=True)
class Box:
    """A rectangular sub-block of a grid with broadcastable physical coordinates x (1,1,nx), y (1,ny,1), z (nz,1,1)."""
    grid: Grid
    sl: tuple[slice, slice, slice]

    @property
    def empty(self) -> bool:
        return any(s.stop <= s.start for s in self.sl)

    @property
    def x(self):
        return self.grid.axis("x")[self.sl[2]][None, None, :]

    @property
    def y(self):
        return self.grid.axis("y")[self.sl[1]][None, :, None]

    @property
    def z(self):
        return self.grid.axis("z")[self.sl[0]][:, None, None]


def rasterize_tubes(grid: Grid, p0, p1, r0, r1, grow: float = 0.0):
    """Partial-volume occupancy (0..1) of conical tube segments (points (S, 3) mm, radii (S,) mm) on `grid`.

    Returns (flat voxel indices, occupancy); an index may repeat where segments overlap (combine with a max).
    Zero-length segments are spheres. Tubes thinner than a voxel get a one-voxel core whose occupancy is their
    cross-section fraction (partial volume). All segments are done at once in their bounding boxes (vectorised).
    grow > 0: also return the occupancy of the same tubes with radii + grow mm, (flat, occ, occ_grown).
    """
    p0 = np.asarray(p0, np.float64).reshape(-1, 3)
    p1 = np.asarray(p1, np.float64).reshape(-1, 3)
    r0 = np.broadcast_to(np.asarray(r0, np.float64), (len(p0),))
    r1 = np.broadcast_to(np.asarray(r1, np.float64), (len(p0),))
    if len(p0) == 0:  # nothing to draw (e.g. no node fits at a station of a small anatomy)
        empty = (np.zeros(0, np.int64), np.zeros(0, np.float32))
        return empty + (np.zeros(0, np.float32),) if grow else empty
    nz, ny, nx = grid.shape
    n = np.array([nx, ny, nz])
    org, sp, h = np.array(grid.origin), np.array(grid.spacing), grid.h
    # cut long segments into pieces of <= 2.5 voxels so that bounding boxes stay tight around thin oblique tubes
    pieces = np.maximum(1, np.ceil(np.linalg.norm(p1 - p0, axis=1) / (2.5 * h))).astype(np.int64)
    if pieces.max() > 1:
        src = np.repeat(np.arange(len(p0)), pieces)
        k = np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        ta, tb = k / pieces[src], (k + 1) / pieces[src]
        d, dr = p1 - p0, r1 - r0
        p0, p1 = p0[src] + ta[:, None] * d[src], p0[src] + tb[:, None] * d[src]
        r0, r1 = r0[src] + ta * dr[src], r0[src] + tb * dr[src]
    reff = np.maximum(np.maximum(r0, r1) + grow, 0.5642 * h)      # 0.5642 h: disc of one voxel's area
    lo = np.minimum(p0, p1) - reff[:, None] - 0.5 * h
    hi = np.maximum(p0, p1) + reff[:, None] + 0.5 * h
    ilo = np.clip(np.ceil((lo - org) / sp), 0, n).astype(np.int64)
    ihi = np.clip(np.floor((hi - org) / sp), -1, n - 1).astype(np.int64)
    size = np.maximum(ihi - ilo + 1, 0)
    count = size.prod(1)
    keep = np.flatnonzero(count > 0)
    if keep.size == 0:
        empty = (np.zeros(0, np.int64), np.zeros(0, np.float32))
        return empty + (np.zeros(0, np.float32),) if grow else empty
    p0, p1, r0, r1, ilo, size, count = p0[keep], p1[keep], r0[keep], r1[keep], ilo[keep], size[keep], count[keep]
    seg = np.repeat(np.arange(len(keep)), count)
    off = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    sx_ = size[seg, 0]
    ix = off % sx_
    rest = off // sx_
    sy_ = size[seg, 1]
    iy = rest % sy_
    iz = rest // sy_
    ix += ilo[seg, 0]
    iy += ilo[seg, 1]
    iz += ilo[seg, 2]
    v = (p1 - p0).astype(np.float32)
    vv = np.maximum((v * v).sum(1), 1e-6)
    q0 = (org - p0).astype(np.float32)
    px = q0[seg, 0] + ix.astype(np.float32) * np.float32(sp[0])
    py = q0[seg, 1] + iy.astype(np.float32) * np.float32(sp[1])
    pz = q0[seg, 2] + iz.astype(np.float32) * np.float32(sp[2])
    t = np.clip((px * v[seg, 0] + py * v[seg, 1] + pz * v[seg, 2]) / vv[seg], 0.0, 1.0)
    px -= t * v[seg, 0]
    py -= t * v[seg, 1]
    pz -= t * v[seg, 2]
    dist = np.sqrt(px * px + py * py + pz * pz)
    r = (r0[seg] + t * (r1 - r0)[seg]).astype(np.float32)
    re = np.maximum(r, np.float32(0.5642 * h))
    occ = np.minimum(1.0, (r / re) ** 2) * np.clip((re - dist) / np.float32(h) + 0.5, 0.0, 1.0)
    if grow:
        rg = r + np.float32(grow)
        occ_g = np.clip((rg - dist) / np.float32(h) + 0.5, 0.0, 1.0)
        m = occ_g > 0.02
        flat = (iz[m] * ny + iy[m]) * nx + ix[m]
        return flat, occ[m].astype(np.float32), occ_g[m].astype(np.float32)
    m = occ > 0.02
    flat = (iz[m] * ny + iy[m]) * nx + ix[m]
    return flat, occ[m].astype(np.float32)


def occupancy_volume(grid: Grid, flat: np.ndarray, occ: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Max-combine rasterised occupancies into a (z, y, x) float32 volume."""
    if out is None:
        out = np.zeros(grid.shape, np.float32)
    np.maximum.at(out.reshape(-1), flat, occ)
    return out


def path_segments(points, radii, step_mm: float = 5.0):
    """A smooth centreline (cubic spline through control points, by chord length) cut into tube segments."""
    pts = np.asarray(points, np.float64)
    rad = np.asarray(radii, np.float64)
    chord = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))]
    n = max(2, int(np.ceil(chord[-1] / step_mm)) + 1)
    s = np.linspace(0.0, chord[-1], n)
    if len(pts) >= 3:
        c = CubicSpline(chord, pts, bc_type="natural")(s)
    else:
        c = pts[0] + (pts[1] - pts[0]) * (s / chord[-1])[:, None]
    r = np.interp(s, chord, rad)
    return c[:-1], c[1:], r[:-1], r[1:]


def smooth_noise(rng: np.random.Generator, grid: Grid, box: Box, corr_mm: float) -> np.ndarray:
    """Zero-mean, unit-SD Gaussian random field with correlation length ~corr_mm over `box` (float32).

    Made on a coarse grid of corr_mm / 2 cells (smoothed there) and linearly interpolated to the voxels: cheap, and
    the same texture in millimetres on every grid. numpy interpolation (no BLAS) keeps it bit-reproducible.
    """
    cell = corr_mm / 2.0
    axes = [box.x.ravel(), box.y.ravel(), box.z.ravel()]
    lo = [float(a[0]) if a.size else 0.0 for a in axes]
    sizes = [int(np.ceil(((float(a[-1]) - l) if a.size else 0.0) / cell)) + 4 for a, l in zip(axes, lo)]
    coarse = rng.standard_normal((sizes[2], sizes[1], sizes[0])).astype(np.float32)
    coarse = ndimage.gaussian_filter(coarse, 1.0, mode="wrap")
    coarse /= max(float(coarse.std()), 1e-6)
    out = coarse
    for ax_vol, coords, l in ((2, axes[0], lo[0]), (1, axes[1], lo[1]), (0, axes[2], lo[2])):
        u = (coords - l) / cell + 1.5
        i0 = np.floor(u).astype(np.int64)
        w = (u - i0).astype(np.float32)
        shape = [1, 1, 1]
        shape[ax_vol] = -1
        w = w.reshape(shape)
        out = np.take(out, i0, axis=ax_vol) * (1 - w) + np.take(out, i0 + 1, axis=ax_vol) * w
    return out.astype(np.float32)


def resolve_grid(shape_zyx, spacing_xyz) -> Grid:
    """The Grid of a shape (z, y, x) and spacing (x, y, z) mm; spacing None keeps the field of view FOV_XYZ_MM.
    Raises UserError on a shape or spacing that is not three sensible numbers."""
    try:
        shape = tuple(int(n) for n in shape_zyx)
    except (TypeError, ValueError):
        raise UserError(f"The phantom grid shape must be three integers (z, y, x), not {shape_zyx!r}.") from None
    if len(shape) != 3 or min(shape) < 8 or max(shape) > 1024:
        raise UserError(f"The phantom grid shape must be three integers between 8 and 1024, not {shape_zyx!r}.")
    if spacing_xyz is None:
        spacing = (FOV_XYZ_MM[0] / shape[2], FOV_XYZ_MM[1] / shape[1], FOV_XYZ_MM[2] / shape[0])
    else:
        spacing = tuple(float(s) for s in spacing_xyz)
        if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
            raise UserError(f"The phantom spacing must be three positive millimetre values, not {spacing_xyz!r}.")
    return Grid(shape, spacing)


def smoothstep(x):
    """0 below 0, 1 above 1, the cubic 3x^2 - 2x^3 between (a soft edge)."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


@functools.lru_cache(maxsize=8)
def blur_noise_factor(sigma: tuple[float, float, float]) -> float:
    """SD of unit white noise after the Gaussian blur (so the final noise SD is what the anatomy asks for)."""
    impulse = np.zeros((15, 15, 15), np.float32)
    impulse[7, 7, 7] = 1.0
    k = ndimage.gaussian_filter(impulse, sigma, mode="constant", truncate=3.0)
    return float(np.sqrt((k.astype(np.float64) ** 2).sum()))
