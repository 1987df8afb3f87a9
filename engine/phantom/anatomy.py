"""The phantom's per-seed anatomy in millimetres (LPS, origin at the centre of the field of view), independent of grid.

`sample_anatomy(seed)` draws every per-seed number (body habitus, cavity, diaphragm domes, spine, ribs, heart
size/position/axis, fissures, the lung vessel and airway trees) from SeedSequence([seed, 0]) and caches it;
`heart_geometry`, `vessel_paths` and `lymph_station_centres` derive the heart, the mediastinal tubes and the node
stations from it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from engine.errors import UserError
from engine.labels import LOBES


@dataclass
class Tree:
    """A branching tube tree: segments p0 -> p1 (S, 3) mm with radii r0, r1 (S,), leaves served n (S,), depth (S,)."""
    p0: np.ndarray
    p1: np.ndarray
    r0: np.ndarray
    r1: np.ndarray
    n: np.ndarray
    depth: np.ndarray


@dataclass
class Heart:
    """The heart as an ellipsoid: centre c (3,), columns of R = local axes (e1 base->apex), myocardial semi-axes s (3,),
    epicardial fat thickness (mm), unit vector v_rv towards the right ventricle (perpendicular to e1), the
    cardiothoracic ratio it was sized for."""
    c: np.ndarray
    R: np.ndarray
    s: np.ndarray
    fat: float
    v_rv: np.ndarray
    ctr: float

    def local(self, x, y, z):
        """Local coordinates (u1, u2, u3) in mm of broadcastable physical coordinates."""
        d = (x - self.c[0], y - self.c[1], z - self.c[2])
        return tuple(np.float32(self.R[0, i]) * d[0] + np.float32(self.R[1, i]) * d[1] + np.float32(self.R[2, i]) * d[2]
                     for i in range(3))

    def world(self, u):
        return self.c + np.asarray(u, np.float64) @ self.R.T

    def half_extent(self, extra: float = 0.0) -> np.ndarray:
        """Half extent (x, y, z) in mm of the ellipsoid with semi-axes s + extra."""
        return np.sqrt(((self.R * (self.s + extra)[None, :]) ** 2).sum(1))

    def bottom_z(self, x, y, extra: float = 0.0):
        """Height (z, mm) of the lower surface of the ellipsoid with semi-axes s + extra above points (x, y);
        +inf where the ellipsoid does not reach."""
        A = self.R @ np.diag(1.0 / (self.s + extra) ** 2) @ self.R.T
        dx, dy = x - self.c[0], y - self.c[1]
        b = A[2, 0] * dx + A[2, 1] * dy
        cq = A[0, 0] * dx * dx + 2 * A[0, 1] * dx * dy + A[1, 1] * dy * dy - 1.0
        disc = b * b - A[2, 2] * cq
        root = (-b - np.sqrt(np.maximum(disc, 0.0))) / A[2, 2]
        return np.where(disc > 0, self.c[2] + root, np.inf)

    def surface_distance(self, u, extra: float = 0.0):
        """Approximate signed distance (mm, > 0 outside) to the ellipsoid with semi-axes s + extra."""
        s = self.s + extra
        q = [u[i] / np.float32(s[i]) for i in range(3)]
        rn = np.sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2])
        g = np.sqrt(sum((q[i] / np.float32(s[i])) ** 2 for i in range(3)))
        return (rn - 1.0) * rn / np.maximum(g, 1e-4)


@dataclass
class Anatomy:
    """Every per-seed anatomical number of the phantom (mm, LPS, origin at the centre of the field of view)."""
    seed: int
    female: bool
    # thoracic cavity: ellipse centred (0, cav_cy), half width cav_a, half depth cav_b (at the dome level)
    cav_a: float
    cav_b: float
    cav_cy: float
    # body wall thickness outside the cavity (mm): rib zone, muscle, fat
    rib_zone: float
    muscle: float
    fat: float
    # cranio-caudal landmarks (z, mm)
    z_apex: float
    z_carina: float
    z_dome_r: float
    z_dome_l: float
    dome_x: float
    dome_y: float
    dome_rx: float
    dome_ry: float
    apex_r: float
    # spine and ribs
    y_vb: float
    vb_rx: float
    vb_ry: float
    pitch: float
    z_t1: float
    rib_drop: float
    rib_h: float
    rib_t: float
    # airway and lungs
    y_tr: float
    trachea_r: float
    lung_hu: float
    fissure: dict
    # heart (normal size) and vessels
    ctr: float
    heart_axis: np.ndarray
    heart_shape: np.ndarray
    heart_fat: float
    heart_right_frac: float
    aorta_scale: float
    # lung trees (built on the normal heart)
    trees: dict = field(default_factory=dict)
    noise_sd: float = 15.0

    # ---- analytic shapes (broadcastable over numpy arrays of x, y, z in mm)
    def cavity_scale(self, z):
        """Cavity half width/depth factor at height z: widest just above the domes, dome-shaped towards the apex."""
        mid = np.clip((z - self.z_dome_r) / (self.z_carina - self.z_dome_r), 0.0, 1.0)
        top = np.clip((z - (self.z_carina - 10.0)) / (self.z_apex + 12.0 - (self.z_carina - 10.0)), 0.0, 1.0)
        return (1.0 - 0.07 * mid) * np.sqrt(np.clip(1.0 - 0.72 * top ** 2.2, 0.05, 1.0))

    def cavity_dout(self, x, y, z):
        """Outward distance (mm, along rays from the cavity centre) from the thoracic cavity wall: < 0 inside."""
        f = self.cavity_scale(z)
        a, b = self.cav_a * f, self.cav_b * f
        yy = y - self.cav_cy
        rn = np.sqrt((x / a) ** 2 + (yy / b) ** 2)
        rho = np.sqrt(x * x + yy * yy)
        return rho * (1.0 - 1.0 / np.maximum(rn, 1e-3))

    def diaphragm_z(self, x, y):
        """Height (z, mm) of the diaphragm surface: two paraboloid domes, the right one higher."""
        dy = (y - self.dome_y) ** 2 / (2 * self.dome_ry)
        zr = self.z_dome_r - (x + self.dome_x) ** 2 / (2 * self.dome_rx) - dy
        zl = self.z_dome_l - (x - self.dome_x) ** 2 / (2 * self.dome_rx) - dy
        zc = self.z_dome_l - 14.0 - (x - 10.0) ** 2 / (2 * 70.0) - dy          # central tendon under the heart
        return np.maximum(np.maximum(np.maximum(zr, zl), zc), self.z_dome_l - 55.0)

    def apex_z(self, x, y):
        """Top (z, mm) of each lung: a paraboloid cap over each apex."""
        ax = 0.45 * self.cav_a
        ay = self.cav_cy + 0.25 * self.cav_b
        d2 = np.minimum((x - ax) ** 2, (x + ax) ** 2) + (y - ay) ** 2
        return self.z_apex - d2 / (2 * self.apex_r)

    def y_spine(self, z):
        """Centre (y, mm) of the vertebral body at height z (mild thoracic kyphosis)."""
        return self.y_vb - 6.0 * ((z - 0.0) / 150.0) ** 2

    def in_mediastinal_band(self, x, y, z):
        """The mediastinum between sternum and spine (without the heart and great vessels, which are separate)."""
        y_front = self.cav_cy - self.cav_b * self.cavity_scale(z)
        y_back = self.y_spine(z)
        ym, half = (y_front + y_back) / 2, np.maximum((y_back - y_front) / 2, 1.0)
        upper = np.clip((z - (self.z_carina - 40.0)) / 40.0, 0.0, 1.0)
        w = 6.0 + (10.0 + 16.0 * upper) * np.sqrt(np.clip(1.0 - ((y - ym) / half) ** 2, 0.0, 1.0))
        return np.abs(x - 2.0) < w

    def in_spine_zone(self, x, y, z):
        """Vertebra with a paravertebral margin and everything behind it near the midline (no lung there)."""
        yv = self.y_spine(z)
        body = (x / (self.vb_rx + 7.0)) ** 2 + ((y - yv) / (self.vb_ry + 7.0)) ** 2 < 1.0
        return body | ((y > yv) & (np.abs(x) < self.vb_rx + 14.0))

    def lobe_index(self, x, y, z):
        """Lobe (index into LOBES) of points by side (x < 0 right) and the fissure surfaces (any point, in or out)."""
        f = self.fissure
        right = x < 0
        z_obl = np.where(right, f["obl_z_r"], f["obl_z_l"]) + np.where(right, f["obl_k_r"], f["obl_k_l"]) * (
            y - f["obl_y"]) - 0.004 * (np.abs(x) - 70.0) ** 2
        lower = z < z_obl
        middle = (~lower) & (z < f["minor_z"] - 0.15 * (y - f["obl_y"]))
        return np.where(right, np.where(lower, 2, np.where(middle, 1, 0)),
                        np.where(lower, 5, np.where(middle, 4, 3))).astype(np.int8)


def heart_geometry(anat: Anatomy, ctr: float | None = None) -> Heart:
    """The heart sized for a cardiothoracic ratio (heart width incl. epicardial fat / inner thoracic width)."""
    ctr = anat.ctr if ctr is None else float(ctr)
    e1 = anat.heart_axis / np.linalg.norm(anat.heart_axis)
    e2 = np.cross(e1, [0.0, 0.0, 1.0])
    e2 /= np.linalg.norm(e2)
    e3 = np.cross(e1, e2)
    R = np.stack([e1, e2, e3], axis=1)
    # the widest inner thoracic width (lung to lung), and the heart's width out to its epicardial fat
    inner = 2.0 * (anat.cav_a - 1.5)
    width = ctr * inner
    base_half_x = np.sqrt(((R[0] * anat.heart_shape) ** 2).sum())
    k = (width / 2.0 - anat.heart_fat) / base_half_x
    s = anat.heart_shape * k
    # the heart grows mostly into the left chest: keep its right border about right_frac of its width right of midline
    half = np.sqrt(((R * (s + anat.heart_fat)[None, :]) ** 2).sum(1))
    right_frac = anat.heart_right_frac + 0.4 * max(0.0, ctr - 0.42)      # a big heart also grows to the right
    cx = -right_frac * width + half[0]
    y_front = anat.cav_cy - anat.cav_b
    cy = y_front + 6.0 + half[1]
    # widest at or above the right dome (the right heart border meets the right lung); the diaphragm gives way below
    cz = max(float(anat.diaphragm_z(cx, cy)) + half[2] - 12.0, anat.z_dome_r + 6.0)
    c = np.array([cx, cy, cz])
    rv = np.array([-0.45, -0.9, 0.1])
    rv = rv - rv.dot(e1) * e1
    return Heart(c=c, R=R, s=s, fat=anat.heart_fat, v_rv=rv / np.linalg.norm(rv), ctr=ctr)


def vessel_paths(anat: Anatomy, heart: Heart) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Mediastinal tubes as (control points (K, 3) mm, radii (K,) mm): aorta, pulmonary arteries, veins, airway,
    oesophagus. Control points are placed relative to the carina, trachea, spine and heart, so they follow the seed."""
    zc, yt, k = anat.z_carina, anat.y_tr, anat.aorta_scale
    ys = lambda z: anat.y_spine(z) - anat.vb_ry                               # noqa: E731  front of the spine
    h = heart
    root = h.world([-0.72 * h.s[0], 0, 0]) + np.array([-6.0, -8.0, 14.0])
    ra = h.world([-0.45 * h.s[0], 0, 0]) + h.v_rv * 0.55 * h.s[1] + np.array([-12.0, 6.0, 0.0])
    la = h.world([-0.8 * h.s[0], 0, 0]) + np.array([4.0, 10.0, -6.0])
    rv_apex = h.world([0.55 * h.s[0], 0, 0]) + h.v_rv * 0.45 * h.s[1]
    top = 160.0
    p = {
        "aorta": ([root, root + [-3, -6, 22], [-9, yt - 32, zc + 8], [-2, yt - 26, zc + 26], [22, yt - 10, zc + 32],
                   [27, yt + 16, zc + 24], [25, ys(zc - 5) - 10, zc - 8], [21, ys(zc - 80) - 11, zc - 80],
                   [9, ys(-150) - 14, -160.0]],
                  np.array([15, 16, 16, 15, 14, 13, 12, 11.5, 11]) * k),
        "brachiocephalic trunk": ([[2, yt - 22, zc + 28], [-12, yt - 14, zc + 60], [-22, yt - 6, top]], [6.5, 6, 5.5]),
        "left carotid": ([[13, yt - 14, zc + 32], [13, yt - 9, zc + 70], [14, yt - 6, top]], [4.0, 3.8, 3.8]),
        "left subclavian": ([[25, yt + 6, zc + 30], [31, yt + 8, zc + 68], [55, yt + 2, top]], [5.0, 4.8, 4.6]),
        "pulmonary trunk": ([root + [24, -10, -6], root + [26, -4, 18], [14, yt - 12, zc - 12]], [13, 13, 12]),
        "left pulmonary artery": ([[14, yt - 12, zc - 12], [32, yt + 0, zc - 8], [48, yt + 16, zc - 18]], [10, 9, 8.5]),
        "right pulmonary artery": ([[14, yt - 12, zc - 12], [-10, yt - 17, zc - 19], [-30, yt - 12, zc - 23],
                                    [-46, yt + 6, zc - 28]], [10, 9.5, 9, 8.5]),
        "superior vena cava": ([[-30, yt - 9, top], [-29, yt - 11, zc + 20], [-27, yt - 13, zc - 8], ra + [0, 0, 25]],
                               [9, 10, 10.5, 11]),
        "left brachiocephalic vein": ([[62, yt - 26, zc + 48], [10, yt - 32, zc + 40], [-26, yt - 14, zc + 30]],
                                      [6.0, 6.0, 7.0]),
        "right brachiocephalic vein": ([[-52, yt - 20, top], [-31, yt - 10, zc + 32]], [7.0, 8.0]),
        "inferior vena cava": ([[-18, ys(-150) - 30, -160.0], [-20, ys(-60) - 32, anat.z_dome_r - 10],
                                ra + [0, 0, -25]], [12, 12, 12]),
        "azygos": ([[-13, ys(-140) + 3, -160.0], [-12, ys(zc) + 4, zc - 2], [-20, yt + 4, zc + 12],
                    [-27, yt - 12, zc + 10]], [4.0, 4.0, 4.5, 5.0]),
        "oesophagus": ([[-3, yt + 21, top], [0, yt + 21, zc], [5, ys(zc - 60) - 12, zc - 60],
                        [16, ys(anat.z_dome_l) - 24, anat.z_dome_l + 2],
                        [40, ys(anat.z_dome_l) - 40, anat.z_dome_l - 25]], [8.0, 8.0, 8.0, 8.5, 9.0]),
        "trachea": ([[0, yt - 2, top], [0, yt, zc + 20], [0, yt + 2, zc]], [anat.trachea_r] * 3),
        "right main bronchus": ([[0, yt + 2, zc], [-18, yt + 4, zc - 10], [-33, yt + 6, zc - 21]], [7.5, 7.0, 6.5]),
        "left main bronchus": ([[0, yt + 2, zc], [20, yt + 7, zc - 16], [39, yt + 12, zc - 35]], [7.0, 6.5, 6.0]),
        "right upper pulmonary vein": ([la + [-18, -4, 10], la + [-38, -6, 26], [-50, yt - 8, zc - 22]], [6, 6, 5.5]),
        "right lower pulmonary vein": ([la + [-18, 2, -8], la + [-42, 6, -14]], [6, 5.5]),
        "left upper pulmonary vein": ([la + [18, -4, 10], la + [38, -6, 24], [50, yt - 2, zc - 20]], [6, 6, 5.5]),
        "left lower pulmonary vein": ([la + [18, 2, -8], la + [42, 6, -12]], [6, 5.5]),
    }
    extras = {"root": root, "ra": ra, "la": la, "rv_apex": rv_apex}
    out = {name: (np.asarray(pts, np.float64), np.asarray(r, np.float64)) for name, (pts, r) in p.items()}
    out.update({name: (np.asarray(v, np.float64)[None, :], np.zeros(1)) for name, v in extras.items()})
    return out


MEDIASTINAL_VESSELS = ("aorta", "brachiocephalic trunk", "left carotid", "left subclavian", "pulmonary trunk",
                       "left pulmonary artery", "right pulmonary artery", "superior vena cava",
                       "left brachiocephalic vein", "right brachiocephalic vein", "inferior vena cava", "azygos",
                       "right upper pulmonary vein", "right lower pulmonary vein", "left upper pulmonary vein",
                       "left lower pulmonary vein")
AIRWAYS = ("trachea", "right main bronchus", "left main bronchus")


def lymph_station_centres(anat: Anatomy) -> dict[str, np.ndarray]:
    """Centre (x, y, z) mm of each lymph-node station of engine.labels.NODE_STATIONS."""
    zc, yt = anat.z_carina, anat.y_tr
    ax = anat.cav_a + anat.rib_zone + 0.6 * anat.muscle + 8.0
    return {
        "prevascular": np.array([4.0, yt - 44.0, zc + 16.0]),
        "right paratracheal": np.array([-16.0, yt + 2.0, zc + 22.0]),
        "left paratracheal": np.array([14.0, yt + 6.0, zc + 44.0]),
        "subcarinal": np.array([4.0, yt + 14.0, zc - 20.0]),
        "right hilar": np.array([-50.0, yt + 20.0, zc - 34.0]),
        "left hilar": np.array([52.0, yt + 24.0, zc - 28.0]),
        "right axillary": np.array([-ax, anat.cav_cy - 6.0, zc + 28.0]),
        "left axillary": np.array([ax, anat.cav_cy - 6.0, zc + 28.0]),
    }


def polyline_distance(P: np.ndarray, pts: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Distance (mm) from points P (N, 3) to the surface of a polyline tube (negative inside)."""
    a, b = pts[:-1], pts[1:]
    v = b - a
    vv = np.maximum((v * v).sum(1), 1e-9)
    t = np.clip(((P[:, None, :] - a[None]) * v[None]).sum(-1) / vv[None], 0, 1)
    d = np.linalg.norm(P[:, None, :] - (a[None] + t[..., None] * v[None]), axis=-1)
    r = radii[:-1][None] + t * (radii[1:] - radii[:-1])[None]
    return (d - r).min(1)


def lung_inside_points(anat: Anatomy, heart: Heart, P: np.ndarray, margin: float = 2.0) -> np.ndarray:
    """True where points P (N, 3) mm lie inside a lung with `margin` mm to spare (analytic, for sampling)."""
    x, y, z = P[:, 0], P[:, 1], P[:, 2]
    ok = anat.cavity_dout(x, y, z) < -1.5 - margin
    ok &= z > anat.diaphragm_z(x, y) + 3.0 + margin
    ok &= z < anat.apex_z(x, y) - margin
    ok &= ~anat.in_mediastinal_band(x, y, z) & ~anat.in_spine_zone(x, y, z)
    u = heart.local(x, y, z)
    ok &= heart.surface_distance(u, heart.fat) > 3.0 + margin
    if ok.any():
        paths = vessel_paths(anat, heart)
        idx = np.flatnonzero(ok)
        Q = P[idx]
        for name in MEDIASTINAL_VESSELS + ("oesophagus",):
            pts, r = paths[name]
            keep = polyline_distance(Q, pts, r + 3.0 + margin) > 0
            idx, Q = idx[keep], Q[keep]
        ok[:] = False
        ok[idx] = True
    return ok


def sample_lung_points(anat: Anatomy, heart: Heart, rng: np.random.Generator, n: int, side: str,
                       lobes: tuple[str, ...] | None = None, margin: float = 2.0,
                       z_range: tuple[float, float] | None = None) -> np.ndarray:
    """n random points (n, 3) mm uniformly inside the lung on `side` ('right'/'left'), optionally in given lobes."""
    sgn = -1.0 if side == "right" else 1.0
    lo = np.array([0.0, anat.cav_cy - anat.cav_b, anat.z_dome_l - 80.0])
    hi = np.array([anat.cav_a, anat.cav_cy + anat.cav_b, anat.z_apex])
    if z_range is not None:
        lo[2], hi[2] = max(lo[2], z_range[0]), min(hi[2], z_range[1])
    out = []
    got = 0
    for _ in range(60):
        c = lo + (hi - lo) * rng.random((max(4 * n, 64), 3))
        c[:, 0] *= sgn
        ok = lung_inside_points(anat, heart, c, margin)
        if lobes is not None:
            ok &= np.isin(np.asarray(LOBES)[anat.lobe_index(c[:, 0], c[:, 1], c[:, 2])], lobes)
        c = c[ok]
        out.append(c)
        got += len(c)
        if got >= n:
            break
    pts = np.concatenate(out)[:n]
    if len(pts) < n:                                      # a very small target region: repeat what was found
        if len(pts) == 0:
            raise UserError("The phantom could not place a finding in the requested lung region.")
        pts = pts[rng.integers(len(pts), size=n)]
    return pts


def grow_tree(points: np.ndarray, root: np.ndarray, r_root: float, rng: np.random.Generator,
              exponent: float = 0.5, alpha=(0.35, 0.6), offset: np.ndarray | None = None) -> Tree:
    """A space-filling branching tree from `root` to every target point (a leaf per point).

    Each node serves a group of points: its segment runs a fraction alpha of the way from the parent's end towards
    the group's centroid, then the group splits in two across its widest axis at a random fraction (recursive
    partition, done level by level for all groups at once). Radius = r_root * (leaves / all)^exponent.
    offset (G-independent, optional): per-level shift of the targets (used to run airways beside arteries).
    """
    P = np.asarray(points, np.float64)
    N = len(P)
    order = np.arange(N)
    starts, ends = np.array([0]), np.array([N])
    anchors = np.asarray(root, np.float64)[None, :]
    r_par = np.array([r_root])
    segs = []
    depth = 0
    while len(starts):
        cnt = ends - starts
        csum = np.vstack([np.zeros((1, 3)), np.cumsum(P[order], axis=0)])
        cent = (csum[ends] - csum[starts]) / cnt[:, None]
        if offset is not None:
            cent = cent + offset[depth % len(offset)] * np.where(cnt > 1, 1.0, 0.0)[:, None]
        leaf = cnt == 1
        a = np.where(leaf, 1.0, rng.uniform(*alpha, size=len(cnt)) * min(1.0, 0.55 + 0.15 * depth))
        end = anchors + (cent - anchors) * a[:, None]
        r = r_root * (cnt / N) ** exponent
        r_end = np.where(leaf, np.maximum(0.45, 0.6 * r), r)
        segs.append((anchors, end, np.minimum(r_par, r * 1.05), r_end, cnt, np.full(len(cnt), depth)))
        inner = np.flatnonzero(~leaf)
        if inner.size == 0:
            break
        # split each inner group across its widest axis at a random fraction
        st, en = starts[inner], ends[inner]
        c = cnt[inner]
        gid = np.repeat(np.arange(len(inner)), c)
        members = np.concatenate([order[s:e] for s, e in zip(st, en)])
        pts = P[members]
        mean = np.add.reduceat(pts, np.r_[0, np.cumsum(c)[:-1]], axis=0) / c[:, None]
        var = np.add.reduceat((pts - mean[gid]) ** 2, np.r_[0, np.cumsum(c)[:-1]], axis=0)
        axis = var.argmax(1)
        key = pts[np.arange(len(pts)), axis[gid]]
        srt = np.lexsort((key, gid))
        new_order = order.copy()
        pos = np.r_[0, np.cumsum(c)[:-1]]
        for j, (s, e) in enumerate(zip(st, en)):
            new_order[s:e] = members[srt[pos[j]:pos[j] + c[j]]]
        order = new_order
        k = np.clip(np.round(c * rng.uniform(0.3, 0.7, size=len(c))), 1, c - 1).astype(np.int64)
        starts = np.concatenate([st, st + k])
        ends = np.concatenate([st + k, en])
        anchors = np.concatenate([end[inner], end[inner]])
        r_par = np.concatenate([r_end[inner], r_end[inner]])
        depth += 1
    cat = [np.concatenate([s[i] for s in segs]) for i in range(6)]
    return Tree(*cat)


@functools.lru_cache(maxsize=32)
def sample_anatomy(seed: int) -> Anatomy:
    """The per-seed anatomy (cached; treat as read-only)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0]))
    U = rng.uniform
    cav_a = U(110.0, 136.0)
    cav_b = U(72.0, 92.0)
    z_apex = U(118.0, 136.0)
    z_dome_r = U(-62.0, -42.0)
    y_vb = 0.0
    anat = Anatomy(
        seed=int(seed), female=bool(rng.random() < 0.45),
        cav_a=cav_a, cav_b=cav_b, cav_cy=U(-12.0, -2.0),
        rib_zone=U(9.0, 12.0), muscle=U(8.0, 16.0), fat=U(5.0, 32.0),
        z_apex=z_apex, z_carina=z_apex - U(62.0, 82.0),
        z_dome_r=z_dome_r, z_dome_l=z_dome_r - U(8.0, 22.0),
        dome_x=U(50.0, 70.0), dome_y=U(-25.0, 0.0), dome_rx=U(60.0, 85.0), dome_ry=U(60.0, 85.0),
        apex_r=U(90.0, 130.0),
        y_vb=y_vb, vb_rx=U(16.0, 21.0), vb_ry=U(13.0, 17.0), pitch=U(23.0, 27.0), z_t1=z_apex + U(0.0, 12.0),
        rib_drop=U(95.0, 125.0), rib_h=U(10.0, 13.0), rib_t=U(6.0, 8.0),
        y_tr=0.0, trachea_r=U(8.0, 11.0), lung_hu=U(-885.0, -845.0),
        fissure={},
        ctr=U(0.37, 0.46), heart_axis=np.array([0.72, -0.52, -0.42]) + U(-0.1, 0.1, 3),
        heart_shape=np.array([1.0, U(0.62, 0.74), U(0.56, 0.66)]) * 60.0, heart_fat=U(2.5, 7.0),
        heart_right_frac=U(0.26, 0.36), aorta_scale=U(0.85, 1.2), noise_sd=U(10.0, 22.0),
    )
    anat.y_vb = anat.cav_cy + anat.cav_b - U(28.0, 36.0)
    anat.y_tr = anat.y_spine(anat.z_carina) - anat.vb_ry - U(34.0, 40.0)
    y_post = anat.cav_cy + anat.cav_b
    anat.fissure = {
        "obl_y": y_post, "obl_z_r": anat.z_carina + U(5.0, 25.0), "obl_z_l": anat.z_carina + U(10.0, 30.0),
        "obl_k_r": U(0.85, 1.15), "obl_k_l": U(0.95, 1.25),
        "minor_z": anat.z_carina - U(22.0, 40.0) + 0.15 * (anat.y_tr - y_post),
    }
    # lung trees on the normal heart: arteries and airways share a partition, veins interleave with their own
    heart = heart_geometry(anat)
    paths = vessel_paths(anat, heart)
    trees = {}
    for side, sgn in (("right", -1.0), ("left", 1.0)):
        pts = sample_lung_points(anat, heart, rng, 300, side, margin=3.0)
        art_root = paths[f"{side} pulmonary artery"][0][-1]
        air_root = paths[f"{side} main bronchus"][0][-1]
        # one generator seed for both trees gives the same partition (same splits and fractions): the airways run
        # beside the arteries (bronchovascular bundles), offset by a few mm so they do not coincide
        tree_seed = int(rng.integers(2**32))
        offs = rng.normal(0.0, 1.0, (16, 3))
        offs *= 5.0 / np.linalg.norm(offs, axis=1, keepdims=True)
        trees[f"{side} arteries"] = grow_tree(pts, art_root, 8.0, np.random.default_rng(tree_seed))
        trees[f"{side} airways"] = grow_tree(pts, air_root, 6.0, np.random.default_rng(tree_seed), offset=offs)
        vpts = sample_lung_points(anat, heart, rng, 300, side, margin=3.0)
        zmid = np.median(vpts[:, 2])
        vts = []
        for part, sel in (("upper", vpts[:, 2] >= zmid), ("lower", vpts[:, 2] < zmid)):
            root = paths[f"{side} {part} pulmonary vein"][0][-1]
            vts.append(grow_tree(vpts[sel], root, 6.0, np.random.default_rng(rng.integers(2**32))))
        trees[f"{side} veins"] = Tree(*[np.concatenate(parts) for parts in
                                        zip(*[(t.p0, t.p1, t.r0, t.r1, t.n, t.depth) for t in vts])])
    anat.trees = trees
    return anat

