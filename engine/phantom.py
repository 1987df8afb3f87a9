"""The digital chest phantom: a procedural, non-contrast chest CT in Hounsfield units with the 18 CT-RATE findings.

`render_phantom(findings, seed)` is a deterministic function of (findings, seed, grid): the same inputs give a
bit-identical float32 HU array indexed (z, y, x) in LPS (array[k] is an axial slice, k increasing towards the head;
row index increasing = posterior; column index increasing = patient's left).

How it is built
- Geometry lives in physical millimetres, independent of the grid: x = patient's left, y = posterior, z = head,
  origin at the centre of the field of view (350 x 350 x 300 mm unless the spacing says otherwise). `Anatomy` holds
  every per-seed number (body habitus, cavity, diaphragm domes, spine, ribs, heart size/position/axis, mediastinal
  vessel paths, the lung vessel and airway trees) and is cached per seed, so re-rendering a seed on another grid or
  with other findings is cheap.
- Rendering paints tissues in HU (values from shared/notes/ct-appearance.md) from the outside in, then adds CT noise
  and a slight Gaussian blur (the scanner's point-spread, which also anti-aliases edges). Calcium and metal are
  painted after the blur so that thin, dense objects keep their HU, then metal adds streak artefacts.
- Tubes (vessels, airways, wires, leads, clavicles) are rasterised with partial-volume occupancy in per-segment
  bounding boxes, all segments at once; vessel and airway trees fill each lung by recursive partition of random
  target points (a space-filling branching tree, radius ~ (served leaves)^0.45), so they differ per seed.
- Random streams are separate: anatomy from SeedSequence([seed, 0]); finding number j of a label from
  ([seed, 1, label index, j]); CT noise from ([seed, 2]). The same seed with and without a finding therefore differs
  only where the finding is drawn (plus the lungs it displaces).

Findings are `engine.labels.Finding` records (label, side, lobe, size_mm, severity, kind, stations); the report writer
reads the same records, so the picture and the text agree. At the demo grid (2.7 mm in-plane, 4.7 mm slices) fine
findings (septal lines, wires, plaques, bronchial walls) are drawn bolder than life so that they remain measurable;
each place where this happens says so.
"""
from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline

from engine.errors import UserError
from engine.labels import (KINDS, LABEL_INDEX, LABELS, LEFT_LOBES, LOBES, NODE_STATIONS, RIGHT_LOBES, Finding,
                           check_labels)
from engine.volume import DEMO_SHAPE_ZYX, Volume

ROOT = Path(__file__).resolve().parents[1]
LABEL_TABLE_CSV = ROOT.parent / "shared" / "data" / "ctrate_labels" / "train_predicted_labels.csv"
LABEL_SETS_JSON = ROOT / "assets" / "phantom" / "label_sets.json"

FOV_XYZ_MM = (350.0, 350.0, 300.0)   # physical field of view of the default grid (x, y, z), mm

# Hounsfield units of non-contrast chest CT (shared/notes/ct-appearance.md).
HU = {
    "air": -1000.0, "lung": -865.0, "fat": -95.0, "water": 8.0, "muscle": 45.0, "blood": 38.0, "myocardium": 48.0,
    "liver": 60.0, "spleen": 48.0, "kidney": 32.0, "node": 42.0, "cancellous": 260.0, "cortical": 1100.0,
    "cartilage": 130.0, "disc": 85.0, "csf": 20.0, "calcium": 650.0,
    # metal attenuates far beyond the scanner's 3071 HU ceiling: painted at its "true" value and clipped at the end,
    # so a sub-voxel wire still saturates its voxel (blooming), as on real scans
    "metal": 15000.0,
}


# ============================================================================================ CT-RATE label table

def load_label_table(path: str | Path | None = None) -> np.ndarray:
    """CT-RATE's label table as an (N, 18) uint8 0/1 array in CT-CLIP label order.

    path None: the compact assets/phantom/label_sets.json shipped with the project (unique label vectors + counts of
    train_predicted_labels.csv, expanded back to rows in code order), always, so the same seed draws the same label
    set on every machine, with or without the CSV beside the project.
    A .csv path must have the 18 label columns; a .json path must be in build_label_sets_json's format.
    """
    if path is None:
        path = LABEL_SETS_JSON
    path = Path(path)
    if not path.is_file():
        raise UserError(f"The CT-RATE label table {path} does not exist.")
    return _load_label_table_cached(str(path)).copy()


@functools.lru_cache(maxsize=4)
def _load_label_table_cached(path: str) -> np.ndarray:
    if path.endswith(".json"):
        data = json.loads(Path(path).read_text())
        if list(data["labels"]) != list(LABELS):
            raise UserError(f"The label sets in {path} are not in CT-CLIP label order.")
        codes = np.asarray(data["codes"], dtype=np.int64)
        bits = (codes[:, None] >> np.arange(len(LABELS))[None, :]) & 1
        return np.repeat(bits.astype(np.uint8), np.asarray(data["counts"], dtype=np.int64), axis=0)
    import pandas as pd

    frame = pd.read_csv(path)
    missing = [name for name in LABELS if name not in frame.columns]
    if missing:
        raise UserError(f"The label table {path} lacks the column {missing[0]!r}.")
    return (frame[list(LABELS)].to_numpy() > 0).astype(np.uint8)


def build_label_sets_json(csv_path: str | Path = LABEL_TABLE_CSV, out_path: str | Path = LABEL_SETS_JSON) -> dict:
    """Write the compact label table (unique label vectors as 18-bit codes + how often each occurs) shipped in assets/.

    Bit i of a code is label i in CT-CLIP order. Returns the written dictionary.
    """
    table = load_label_table(csv_path)
    codes = (table.astype(np.int64) << np.arange(len(LABELS))[None, :]).sum(1)
    unique, counts = np.unique(codes, return_counts=True)
    data = {
        "source": "CT-RATE train_predicted_labels.csv (ibrahimhamamci/CT-RATE), reduced to unique label vectors",
        "license": "CC BY-NC-SA 4.0 (CT-RATE): non-commercial use, share-alike, attribution to the CT-RATE authors",
        "labels": list(LABELS),
        "encoding": "bit i of each code = label i in the order of 'labels'; counts = number of CT-RATE volumes",
        "n_rows": int(counts.sum()),
        "codes": unique.tolist(),
        "counts": counts.tolist(),
    }
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    return data


def sample_label_set(rng: np.random.Generator, table: np.ndarray | None = None) -> list[str]:
    """One row of CT-RATE's label table drawn uniformly (so label priors, co-occurrence and the share of normal
    studies are CT-RATE's); returns the positive label names in CT-CLIP order ([] for a normal study)."""
    if table is None:
        table = _load_label_table_cached(str(LABEL_SETS_JSON))
    row = table[int(rng.integers(len(table)))]
    return [LABELS[i] for i in np.flatnonzero(row)]


# ============================================================================================ findings

def _pick(rng, options, p=None):
    return options[int(rng.choice(len(options), p=p))]


def _severity(rng, p=(0.45, 0.35, 0.2)) -> str:
    return _pick(rng, ("mild", "moderate", "severe"), p)


def _side(rng, p=(0.4, 0.3, 0.3)) -> str:
    return _pick(rng, ("right", "left", "bilateral"), p)


def _lobe_for(rng, side: str, prefer=None) -> str:
    lobes = RIGHT_LOBES if side == "right" else LEFT_LOBES
    if prefer is not None:
        lobes = [lobe for lobe in lobes if lobe in prefer] or lobes
    return _pick(rng, tuple(lobes))


LOWER = ("right lower lobe", "left lower lobe")
UPPER = ("right upper lobe", "left upper lobe")


def sample_findings(labels: list[str], rng: np.random.Generator) -> list[Finding]:
    """One or more `Finding` per label with plausible side, lobe, size (mm), severity, kind and node stations."""
    findings: list[Finding] = []
    for label in check_labels(labels):
        sev = _severity(rng)
        level = ("mild", "moderate", "severe").index(sev)
        if label == "Medical material":
            kind = _pick(rng, KINDS[label], (0.35, 0.3, 0.15, 0.2))
            side = "left" if kind == "pacemaker" and rng.random() < 0.85 else (
                "right" if kind == "port catheter" and rng.random() < 0.8 else None)
            if kind in ("pacemaker", "port catheter") and side is None:
                side = "right" if kind == "pacemaker" else "left"
            findings.append(Finding(label, side=side, severity="mild", kind=kind))
            if kind == "prosthetic valve" and rng.random() < 0.7:          # valve replacement comes with wires
                findings.append(Finding(label, severity="mild", kind="sternotomy wires"))
        elif label == "Arterial wall calcification":
            findings.append(Finding(label, severity=sev))
        elif label == "Cardiomegaly":
            findings.append(Finding(label, severity=sev))
        elif label == "Pericardial effusion":
            size = float(np.round(rng.uniform(*((5, 9), (9, 15), (15, 25))[level])))
            findings.append(Finding(label, size_mm=size, severity=sev))
        elif label == "Coronary artery wall calcification":
            kind = _pick(rng, KINDS[label], ((0.6, 0.3, 0.1), (0.3, 0.4, 0.3), (0.1, 0.3, 0.6))[level])
            findings.append(Finding(label, severity=sev, kind=kind))
        elif label == "Hiatal hernia":
            size = float(np.round(rng.uniform(*((25, 35), (35, 50), (50, 70))[level])))
            findings.append(Finding(label, size_mm=size, severity=sev))
        elif label == "Lymphadenopathy":
            n = int(rng.integers(1, 4))
            stations = tuple(sorted(rng.choice(len(NODE_STATIONS), size=n, replace=False,
                                               p=np.array([2, 3, 2, 3, 2, 2, 1, 1]) / 16)))
            size = float(np.round(rng.uniform(*((11, 14), (14, 20), (20, 30))[level])))
            findings.append(Finding(label, size_mm=size, severity=sev, stations=tuple(NODE_STATIONS[i] for i in stations)))
        elif label == "Emphysema":
            kind = _pick(rng, KINDS[label], (0.6, 0.2, 0.2))
            side = _side(rng, (0.1, 0.1, 0.8))
            size = float(np.round(rng.uniform(25, 60))) if kind == "bullous" else None
            findings.append(Finding(label, side=side, severity=sev, kind=kind, size_mm=size))
        elif label == "Atelectasis":
            kind = _pick(rng, KINDS[label], (0.55, 0.45))
            side = _side(rng, (0.4, 0.35, 0.25))
            for s in (("right", "left") if side == "bilateral" else (side,)):
                lobe = _lobe_for(rng, s, LOWER + ("right middle lobe", "lingula") if rng.random() < 0.3 else LOWER)
                findings.append(Finding(label, side=s, lobe=lobe, severity=sev, kind=kind))
        elif label == "Lung nodule":
            for _ in range(int(rng.choice([1, 1, 1, 2, 2, 3]))):
                side = _pick(rng, ("right", "left"), (0.55, 0.45))
                lobe = _lobe_for(rng, side, UPPER if rng.random() < 0.5 else None)
                kind = _pick(rng, KINDS[label], (0.75, 0.25))
                size = float(np.round(min(30.0, 4.0 + rng.gamma(1.5, 3.5) * (1 + level)), 0))
                findings.append(Finding(label, side=side, lobe=lobe, size_mm=size, severity=sev, kind=kind))
        elif label == "Lung opacity":
            side = _side(rng, (0.25, 0.2, 0.55))
            lobe = None if side == "bilateral" else _lobe_for(rng, side)
            findings.append(Finding(label, side=side, lobe=lobe, severity=sev, kind="ground-glass"))
        elif label == "Pulmonary fibrotic sequela":
            side = _side(rng, (0.35, 0.3, 0.35))
            for s in (("right", "left") if side == "bilateral" else (side,)):
                findings.append(Finding(label, side=s, lobe=_lobe_for(rng, s), severity=sev))
        elif label == "Pleural effusion":
            side = _side(rng, (0.35, 0.25, 0.4))
            size = float(np.round(rng.uniform(*((10, 20), (20, 40), (40, 70))[level])))
            findings.append(Finding(label, side=side, size_mm=size, severity=sev))
        elif label == "Mosaic attenuation pattern":
            findings.append(Finding(label, side="bilateral", severity=sev))
        elif label == "Peribronchial thickening":
            side = _side(rng, (0.15, 0.15, 0.7))
            lobe = None if side == "bilateral" else _lobe_for(rng, side, LOWER)
            findings.append(Finding(label, side=side, lobe=lobe, severity=sev))
        elif label == "Consolidation":
            side = _side(rng, (0.45, 0.35, 0.2))
            for s in (("right", "left") if side == "bilateral" else (side,)):
                lobe = _lobe_for(rng, s, LOWER if rng.random() < 0.6 else None)
                findings.append(Finding(label, side=s, lobe=lobe, severity=sev))
        elif label == "Bronchiectasis":
            kind = _pick(rng, KINDS[label], (0.6, 0.25, 0.15))
            side = _side(rng, (0.3, 0.25, 0.45))
            for s in (("right", "left") if side == "bilateral" else (side,)):
                lobe = _lobe_for(rng, s, LOWER + ("right middle lobe", "lingula"))
                findings.append(Finding(label, side=s, lobe=lobe, severity=sev, kind=kind))
        elif label == "Interlobular septal thickening":
            findings.append(Finding(label, side=_side(rng, (0.1, 0.1, 0.8)), severity=sev))
    return findings


# ============================================================================================ grid and rasterising

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


def _path_segments(points, radii, step_mm: float = 5.0):
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


def _smooth_noise(rng: np.random.Generator, grid: Grid, box: Box, corr_mm: float) -> np.ndarray:
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


# ============================================================================================ anatomy (per seed, mm)

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
        "inferior vena cava": ([[-18, ys(-150) - 30, -160.0], [-20, ys(-60) - 32, anat.z_dome_r - 10], ra + [0, 0, -25]],
                               [12, 12, 12]),
        "azygos": ([[-13, ys(-140) + 3, -160.0], [-12, ys(zc) + 4, zc - 2], [-20, yt + 4, zc + 12], [-27, yt - 12, zc + 10]],
                   [4.0, 4.0, 4.5, 5.0]),
        "oesophagus": ([[-3, yt + 21, top], [0, yt + 21, zc], [5, ys(zc - 60) - 12, zc - 60],
                        [16, ys(anat.z_dome_l) - 24, anat.z_dome_l + 2], [40, ys(anat.z_dome_l) - 40, anat.z_dome_l - 25]],
                       [8.0, 8.0, 8.0, 8.5, 9.0]),
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


def _polyline_distance(P: np.ndarray, pts: np.ndarray, radii: np.ndarray) -> np.ndarray:
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
            keep = _polyline_distance(Q, pts, r + 3.0 + margin) > 0
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
        trees[f"{side} veins"] = Tree(*[np.concatenate([getattr(t, f) for t in vts]) for f in
                                        ("p0", "p1", "r0", "r1", "n", "depth")])
    anat.trees = trees
    return anat


# ============================================================================================ rendering

def _resolve_grid(shape_zyx, spacing_xyz) -> Grid:
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


def lobe_side(f: Finding) -> str:
    """The lung a lobar finding lies in: from its lobe, else its side ('right' when neither says)."""
    if f.lobe in RIGHT_LOBES:
        return "right"
    if f.lobe in LEFT_LOBES:
        return "left"
    return f.side or "right"


def _finding_rng(seed: int, label: str, j: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), 1, LABEL_INDEX[label], int(j)]))


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


SEV = {"mild": 0, "moderate": 1, "severe": 2}


class _Scene:
    """One rendering: paints the anatomy and the findings into `hu` step by step (see render_phantom)."""

    def __init__(self, anat: Anatomy, grid: Grid, findings: list[Finding], seed: int, want_masks: bool = False):
        self.a, self.g, self.seed = anat, grid, int(seed)
        self.want_masks = want_masks
        self.masks: dict[str, np.ndarray] = {}
        self.by_label: dict[str, list[tuple[Finding, np.random.Generator]]] = {}
        counts: dict[str, int] = {}
        for f in findings:
            if not isinstance(f, Finding):
                raise UserError("Each phantom finding must be an engine.labels.Finding record.")
            if f.label not in LABEL_INDEX:
                raise UserError(f"Unknown label {f.label!r} in a phantom finding.")
            j = counts.get(f.label, 0)
            counts[f.label] = j + 1
            self.by_label.setdefault(f.label, []).append((f, _finding_rng(seed, f.label, j)))
        self.X, self.Y, self.Z = grid.axis("x")[None, None, :], grid.axis("y")[None, :, None], grid.axis("z")[:, None, None]
        self.hu = np.full(grid.shape, HU["air"], np.float32)
        self.dense: list[tuple[np.ndarray, np.ndarray, float]] = []     # (flat, occupancy, HU) painted after the blur
        self.metal_flat: list[np.ndarray] = []
        ctr = None
        for f, rng in self.by_label.get("Cardiomegaly", []):
            ctr = rng.uniform(*((0.55, 0.59), (0.60, 0.65), (0.66, 0.72))[SEV.get(f.severity, 1)])
        self.heart = heart_geometry(anat, ctr)
        self.paths = vessel_paths(anat, self.heart)
        self.path_segs: dict[str, tuple] = {}
        self.peff = 0.0
        for f, _ in self.by_label.get("Pericardial effusion", []):
            self.peff = float(f.size_mm or (6.0, 12.0, 20.0)[SEV.get(f.severity, 1)])

    def has(self, label):
        return label in self.by_label

    # ------------------------------------------------------------------ helpers
    def tube_occ(self, names_or_segments, extra_r: float = 0.0, scale_r: float = 1.0, grow: float = 0.0):
        """Occupancy volume of named paths (or (p0, p1, r0, r1) tuples) with radii * scale_r + extra_r
        (and, with grow > 0, a second volume for radii + grow)."""
        seg = [[], [], [], []]
        for item in names_or_segments:
            if isinstance(item, str):
                if item not in self.path_segs:
                    self.path_segs[item] = _path_segments(*self.paths[item])
                item = self.path_segs[item]
            for k in range(4):
                seg[k].append(np.asarray(item[k], np.float64).reshape(len(item[0]), -1) if k < 2 else
                              np.asarray(item[k], np.float64).ravel())
        p0, p1 = np.concatenate(seg[0]), np.concatenate(seg[1])
        r0 = np.concatenate(seg[2]) * scale_r + extra_r
        r1 = np.concatenate(seg[3]) * scale_r + extra_r
        if grow:
            flat, occ, occ_g = rasterize_tubes(self.g, p0, p1, r0, r1, grow=grow)
            return occupancy_volume(self.g, flat, occ), occupancy_volume(self.g, flat, occ_g)
        flat, occ = rasterize_tubes(self.g, p0, p1, r0, r1)
        return occupancy_volume(self.g, flat, occ)

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

    def box_around(self, centre, half):
        c, h = np.asarray(centre, np.float64), np.asarray(half, np.float64)
        return self.g.box(c - h, c + h)

    def add_dense(self, p0, p1, r0, r1, value):
        flat, occ = rasterize_tubes(self.g, p0, p1, r0, r1)
        self.dense.append((flat, occ, float(value)))
        return flat

    def points_in(self, mask, rng, n):
        """n random voxel centres (n, 3) mm drawn from a boolean mask (with replacement if it is small)."""
        idx = np.flatnonzero(mask)
        if idx.size == 0:
            return np.zeros((0, 3))
        pick = idx[rng.integers(idx.size, size=n)]
        k, j, i = np.unravel_index(pick, self.g.shape)
        return np.stack([self.g.axis("x")[i], self.g.axis("y")[j], self.g.axis("z")[k]], axis=1).astype(np.float64)

    # ------------------------------------------------------------------ body wall and abdomen
    def body(self):
        a, X, Y, Z = self.a, self.X, self.Y, self.Z
        self.dout = a.cavity_dout(X, Y, Z).astype(np.float32)
        yy = Y - a.cav_cy
        self.phi = np.arctan2(np.abs(X), yy).astype(np.float32)            # 0 posterior midline, pi anterior
        cphi, sphi = np.cos(self.phi), np.sin(self.phi)
        upper = np.clip((Z - a.z_carina) / 60.0, 0.0, 1.0)
        scap = np.clip((Z - (a.z_t1 - 170.0)) / 40.0, 0.0, 1.0)
        muscle = (a.muscle + 26.0 * np.clip(cphi, 0, 1) ** 4 + 28.0 * upper * sphi ** 2
                  + 10.0 * np.clip(-cphi, 0, 1) ** 2 * np.clip((Z - a.z_carina + 70.0) / 60.0, 0.0, 1.0)
                  + 14.0 * np.exp(-((self.phi - 1.05) / 0.45) ** 2) * scap)
        fat = a.fat * (0.45 + 0.55 * sphi) + 10.0 * upper * sphi ** 4
        m_edge = a.rib_zone + muscle
        wall = m_edge + fat
        y_back = a.cav_cy + a.cav_b + a.rib_zone + a.muscle + 20.0 + 0.45 * a.fat
        self.y_back = y_back
        body = (self.dout < wall) & (Y < y_back)
        hu = self.hu
        np.copyto(hu, np.float32(HU["fat"]), where=body)
        np.copyto(hu, np.float32(HU["muscle"]), where=body & (self.dout < m_edge))
        if a.female:                                                      # breasts: fat with glandular tissue
            for sgn in (-1, 1):
                c = np.array([sgn * 0.5 * a.cav_a, 0.0, a.z_carina - 70.0])
                k = int(np.clip(np.searchsorted(self.g.axis("z"), c[2]), 0, self.g.shape[0] - 1))
                i = int(np.clip(np.searchsorted(self.g.axis("x"), c[0]), 0, self.g.shape[2] - 1))
                col = np.flatnonzero(body[k, :, i])
                c[1] = self.g.axis("y")[col[0]] + 8.0 if col.size else a.cav_cy - a.cav_b - 40.0   # on the skin
                half = np.array([60.0, 24.0 + 0.4 * a.fat, 52.0])
                b = self.box_around(c, half)
                q = ((b.x - c[0]) / half[0]) ** 2 + ((b.y - c[1]) / half[1]) ** 2 + ((b.z - c[2]) / half[2]) ** 2
                view = hu[b.sl]
                np.copyto(view, np.float32(HU["fat"]), where=(q < 1) & (view < -500))
                gland = q < 0.35
                np.copyto(view, np.float32(25.0), where=gland & (view < 0))
        # axillary fat pads (where axillary nodes live)
        for name in ("right axillary", "left axillary"):
            c = lymph_station_centres(a)[name]
            b = self.box_around(c, (18, 24, 30))
            q = ((b.x - c[0]) / 16) ** 2 + ((b.y - c[1]) / 22) ** 2 + ((b.z - c[2]) / 28) ** 2
            view = hu[b.sl]
            np.copyto(view, np.float32(HU["fat"]), where=(q < 1) & (view > -500))
        # the CT table under the patient
        table = (Y > y_back + 4) & (Y < y_back + 10) & (np.abs(X) < a.cav_a + 40.0)
        hu[:, table[0]] = np.float32(-150.0)
        self.body_mask = body
        # thoracic and abdominal cavity contents
        cav = self.dout < 0
        zd = a.diaphragm_z(X, Y)
        h = self.heart
        zd = np.minimum(zd, h.bottom_z(X, Y, h.fat + self.peff + 2.0) - 4.0)   # the heart rests in the diaphragm
        self.zd = zd.astype(np.float32)                                  # (1, ny, nx)
        below = Z < self.zd
        self.cav = cav
        self.below = below
        np.copyto(hu, np.float32(HU["fat"]), where=cav)
        np.copyto(hu, np.float32(HU["muscle"]), where=cav & (Z < self.zd + 4.0) & (Z > self.zd - 6.0))
        np.copyto(hu, np.float32(40.0), where=cav & (Z > a.apex_z(X, Y) + 2.0) & (np.abs(X) > 28.0))
        self.abdomen()

    def abdomen(self):
        a, g, hu = self.a, self.g, self.hu
        b = g.box((-400, -400, -400), (400, 400, a.z_dome_r + 4.0))
        if b.empty:
            return
        X, Y, Z = b.x, b.y, b.z
        zd = self.zd[:, b.sl[1], b.sl[2]]
        view = hu[b.sl]
        inside = self.cav[b.sl] & (Z < zd - 5.0)
        # bowel loops (soft tissue) in mesenteric fat: a thresholded random texture, fixed per seed
        loops = _smooth_noise(np.random.default_rng(np.random.SeedSequence([self.seed, 5])), g, b, 16.0)
        np.copyto(view, np.where(loops > 0.3, np.float32(30.0), np.float32(HU["fat"])), where=inside)
        x_edge = 12.0 + 55.0 * np.clip(-(Y - a.cav_cy) / a.cav_b, 0.0, 1.0) - 0.25 * np.clip(zd - 35.0 - Z, 0, 200)
        liver = inside & (X < x_edge)
        np.copyto(view, np.float32(HU["liver"]), where=liver)
        # stomach under the left dome: wall, fluid (dependent, posterior) and an air cap (anterior, supine)
        c = np.array([0.55 * a.cav_a, a.cav_cy - 0.25 * a.cav_b, a.z_dome_l - 42.0])
        s = np.array([42.0, 0.55 * a.cav_b, 40.0])
        q = ((X - c[0]) / s[0]) ** 2 + ((Y - c[1]) / s[1]) ** 2 + ((Z - c[2]) / s[2]) ** 2
        stomach = inside & (q < 1) & (X > x_edge + 3)
        np.copyto(view, np.float32(42.0), where=stomach)
        lumen = stomach & (q < 0.8)
        np.copyto(view, np.float32(18.0), where=lumen)
        np.copyto(view, np.float32(HU["air"]), where=lumen & (Y < c[1] - 0.5 * s[1]) & (Z > c[2] - 0.3 * s[2]))
        self.stomach_c = c
        # spleen (posterior left) and the tops of the kidneys
        c = np.array([0.72 * a.cav_a, a.cav_cy + 0.55 * a.cav_b, a.z_dome_l - 45.0])
        q = ((X - c[0]) / 24) ** 2 + ((Y - c[1]) / 42) ** 2 + ((Z - c[2]) / 48) ** 2
        np.copyto(view, np.float32(HU["spleen"]), where=inside & (q < 1))
        for sgn, dz in ((-1, 0.0), (1, 10.0)):
            c = np.array([sgn * 62.0, a.y_vb + 4.0, -172.0 + dz])
            q = ((X - c[0]) / 28) ** 2 + ((Y - c[1]) / 26) ** 2 + ((Z - c[2]) / 55) ** 2
            np.copyto(view, np.float32(HU["kidney"]), where=inside & (q < 1))

    # ------------------------------------------------------------------ lungs
    def lungs(self):
        a, X, Y, Z, hu = self.a, self.X, self.Y, self.Z, self.hu
        lung = self.cav & (self.dout < -1.5) & (Z > self.zd + 3.0) & (Z < a.apex_z(X, Y))
        lung &= ~a.in_mediastinal_band(X, Y, Z)
        lung &= ~a.in_spine_zone(X, Y, Z)
        h = self.heart
        hb = self.box_around(h.c, h.half_extent(h.fat + self.peff + 8.0))
        u = h.local(hb.x, hb.y, hb.z)
        lung[hb.sl] &= h.surface_distance(u, h.fat + self.peff + 3.0) > 0
        self.vessel_occ, self.vessel_env = self.tube_occ(MEDIASTINAL_VESSELS, grow=2.5)
        self.oes_occ, oes_env = self.tube_occ(["oesophagus"], grow=2.5)
        np.maximum(self.vessel_env, oes_env, out=self.vessel_env)
        lung &= self.vessel_env < 0.3
        self.lung = lung
        self.right = X < 2.0
        lobes_needed = self.want_masks or any(self.has(k) for k in (
            "Atelectasis", "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Consolidation",
            "Bronchiectasis", "Peribronchial thickening"))
        self.lobe = a.lobe_index(X, Y, Z) if lobes_needed else None
        # parenchyma: dependent (posterior) gradient, then the findings that change lung density
        y0, y1 = a.cav_cy - a.cav_b, a.cav_cy + a.cav_b
        grad = a.lung_hu + 75.0 * np.clip((Y - y0) / (y1 - y0), 0.0, 1.0) ** 1.5
        self.par = np.broadcast_to(grad, self.hu.shape).astype(np.float32)
        self.vessel_scale = None
        for label, fn in (("Emphysema", self.emphysema), ("Mosaic attenuation pattern", self.mosaic),
                          ("Lung opacity", self.ground_glass)):
            for f, rng in self.by_label.get(label, []):
                fn(f, rng)
        for f, rng in self.by_label.get("Lung nodule", []):
            if f.kind == "ground-glass":
                self.nodule(f, rng)
        np.copyto(hu, self.par, where=lung)
        del self.par
        self.fissures()

    def fissures(self):
        """Fissures as faint lines (a 1 mm pleural double layer averaged over a voxel)."""
        a, f = self.a, self.a.fissure
        lb = self.lung_box()
        X, Y, Z = lb.x, lb.y, lb.z
        right = X < 0
        kr, kl = f["obl_k_r"], f["obl_k_l"]
        z_obl = np.where(right, f["obl_z_r"], f["obl_z_l"]) + np.where(right, kr, kl) * (Y - f["obl_y"]) \
            - 0.004 * (np.abs(X) - 70.0) ** 2
        cos_t = 1.0 / np.sqrt(1.0 + np.where(right, kr, kl) ** 2)
        d = np.abs(Z - z_obl) * cos_t
        occ = np.clip(1.0 - d / self.g.spacing[2], 0.0, 1.0) * 0.14
        d2 = np.abs(Z - (f["minor_z"] - 0.15 * (Y - f["obl_y"])))
        occ2 = np.clip(1.0 - d2 / self.g.spacing[2], 0.0, 1.0) * 0.14 * right * (Z > z_obl)
        occ = np.maximum(occ, occ2) * self.lung[lb.sl]
        view = self.hu[lb.sl]
        view += occ * (np.float32(30.0) - view)

    # ------------------------------------------------------------------ lung vessels and airways
    def lung_vessels(self):
        a, t = self.a, self.a.trees
        segs = [t[f"{s} {k}"] for s in ("right", "left") for k in ("arteries", "veins")]
        p0 = np.concatenate([s.p0 for s in segs])
        p1 = np.concatenate([s.p1 for s in segs])
        r0 = np.concatenate([s.r0 for s in segs])
        r1 = np.concatenate([s.r1 for s in segs])
        # pulmonary arteries and veins (the trees were grown on the normal heart; an enlarged heart covers their roots)
        flat, occ = rasterize_tubes(self.g, p0, p1, r0, r1)
        vocc = occupancy_volume(self.g, flat, occ)
        if self.vessel_scale is not None:
            vocc *= self.vessel_scale
        # in the lungs, and in the hila (mediastinal fat next to the lungs) but not below the diaphragm
        cav, below = self.cav.reshape(-1), self.below.reshape(-1)
        self.blend(vocc, HU["blood"], where=lambda nz, o: cav[nz] & ~below[nz])

    def airway_tree(self):
        """Bronchi with walls (lumen air), drawn to the generation where they would still be visible."""
        a, g = self.a, self.g
        p0s, p1s, rl0, rl1, rw0, rw1 = [], [], [], [], [], []
        consol = getattr(self, "consolidation_mask", None)
        atel = getattr(self, "atelectasis_mask", None)
        for side in ("right", "left"):
            t = a.trees[f"{side} airways"]
            lumen0, lumen1 = t.r0 * 0.8, t.r1 * 0.8
            wall = 0.25 * lumen1 + 0.5
            show = t.n >= 3
            if consol is not None:                                        # air bronchograms reach further inside
                show |= self._lookup(consol, t.p1)
            ptf = self.peribronchial.get(side) if hasattr(self, "peribronchial") else None
            if ptf is not None:
                sel, factor = ptf
                sel = sel(t.p1)
                wall = np.where(sel, wall * factor + 0.8, wall)            # bold: >= 1 voxel at the demo grid
            bx = self.bronchiectasis.get(side) if hasattr(self, "bronchiectasis") else None
            if bx is not None:
                for sel_fn, k, kind in bx:
                    sel = sel_fn(t.p1) & (t.n <= 40)
                    rr = np.maximum(k * 1.3 * lumen1, 1.6 + 0.6 * k)
                    lumen0 = np.where(sel, np.maximum(lumen0, rr * 0.95), lumen0)
                    lumen1 = np.where(sel, rr, lumen1)
                    wall = np.where(sel, np.maximum(wall, 0.3 * rr + 0.9), wall)
                    show |= sel
            p0, p1 = t.p0[show], t.p1[show]
            l0, l1, w = lumen0[show], lumen1[show], wall[show]
            if bx is not None and any(kind == "varicose" for _, _, kind in bx):
                # beaded lumen: cut dilated segments in three with alternating calibre
                mid = (p0 + p1) / 2
                beads = l1 > 2.5
                p0 = np.concatenate([p0, mid[beads]])
                p1 = np.concatenate([p1, mid[beads]])
                l0 = np.concatenate([l0 * np.where(beads, 0.7, 1.0), l1[beads] * 1.35])
                l1 = np.concatenate([l1 * np.where(beads, 0.7, 1.0), l1[beads] * 1.35])
                w = np.concatenate([w, w[beads]])
            p0s.append(p0), p1s.append(p1), rl0.append(l0), rl1.append(l1), rw0.append(l0 + w), rw1.append(l1 + w)
        p0, p1 = np.concatenate(p0s), np.concatenate(p1s)
        wocc = occupancy_volume(g, *rasterize_tubes(g, p0, p1, np.concatenate(rw0), np.concatenate(rw1)))
        locc = occupancy_volume(g, *rasterize_tubes(g, p0, p1, np.concatenate(rl0), np.concatenate(rl1)))
        for f, rng in self.by_label.get("Bronchiectasis", []):
            if f.kind == "cystic":
                self.cysts(f, rng, wocc, locc)
        if atel is not None:
            keep = 1.0 - atel
            wocc *= keep
            locc *= keep
        cav, below = self.cav.reshape(-1), self.below.reshape(-1)
        inside = lambda nz, o: cav[nz] & ~below[nz]                         # noqa: E731
        self.blend(wocc, 20.0, where=inside)
        self.blend(locc, HU["air"], where=inside)
        self.airway_lumen = locc

    def _lookup(self, mask, P):
        """Value of a (z, y, x) mask at points P (N, 3) mm (nearest voxel; False outside the grid)."""
        g = self.g
        idx = [np.round((P[:, i] - g.origin[i]) / g.spacing[i]).astype(np.int64) for i in range(3)]
        n = (g.shape[2], g.shape[1], g.shape[0])
        ok = np.all([(idx[i] >= 0) & (idx[i] < n[i]) for i in range(3)], axis=0)
        out = np.zeros(len(P), bool)
        out[ok] = mask[idx[2][ok], idx[1][ok], idx[0][ok]] > 0
        return out

    def region(self, side, lobe, base=None):
        """Lung voxels of a side ('right'/'left'/'bilateral'/None) and optional lobe name."""
        m = self.lung if base is None else base
        if lobe in LOBES and self.lobe is not None:
            return m & (self.lobe == LOBES.index(lobe))
        if side == "right":
            return m & self.right
        if side == "left":
            return m & ~self.right
        return m

    def region_fn(self, side, lobe):
        """Point-wise version of region(): a function P (N, 3) -> bool."""
        a = self.a

        def fn(P):
            x = P[:, 0]
            if lobe in LOBES:
                return a.lobe_index(x, P[:, 1], P[:, 2]) == LOBES.index(lobe)
            if side == "right":
                return x < 0
            if side == "left":
                return x >= 0
            return np.ones(len(P), bool)
        return fn

    # ------------------------------------------------------------------ lung findings
    def emphysema(self, f, rng):
        a, sev = self.a, SEV.get(f.severity, 1)
        z_low = (a.z_carina - 5.0, a.z_carina - 45.0, a.z_dome_r - 10.0)[sev]
        zone = self.region(f.side, None) & (self.Z > z_low)
        kind = f.kind or "centrilobular"
        if kind == "centrilobular":
            n = (150, 400, 900)[sev] // (1 if f.side in (None, "bilateral") else 2)
            c = self.points_in(zone, rng, n)
            # holes 6-12 mm across (bold at the demo grid so they reach < -950 HU after the blur)
            r = rng.uniform(3.0, 6.0, len(c))
            occ = occupancy_volume(self.g, *rasterize_tubes(self.g, c, c, r, r))
            self.par += occ * (np.float32(HU["air"]) - self.par)
            if sev == 2:
                self.par -= 25.0 * zone
        elif kind == "paraseptal":
            n = (50, 110, 200)[sev] // (1 if f.side in (None, "bilateral") else 2)
            c = self.points_in(zone & (self.dout > -8.0), rng, n)
            r = rng.uniform(4.0, 8.0, len(c))
            occ = occupancy_volume(self.g, *rasterize_tubes(self.g, c, c, r, r))
            self.par += occ * (np.float32(HU["air"]) - self.par)
        self.emph_bullae = getattr(self, "emph_bullae", [])
        if kind == "bullous" or (kind == "paraseptal" and sev == 2):
            n = (1, 2, 4)[sev]
            d = float(f.size_mm or 40.0)
            for s in (("right", "left") if f.side in (None, "bilateral") else (f.side,)):
                for _ in range(n):
                    r = d / 2 * rng.uniform(0.7, 1.0)
                    band = self.region(s, None) & (self.Z > a.z_carina - 30.0) & (self.dout > -(r + 4.0)) & (
                        self.dout < -(r - 4.0))
                    c = self.points_in(band, rng, 1)
                    if len(c):
                        self.emph_bullae.append((c[0], r))

    def bullae(self):
        for c, r in getattr(self, "emph_bullae", []):
            b = self.box_around(c, (r + 6, r + 6, r + 6))
            dist = np.sqrt((b.x - c[0]) ** 2 + (b.y - c[1]) ** 2 + (b.z - c[2]) ** 2)
            inside = self.lung[b.sl]
            view = self.hu[b.sl]
            h = self.g.h
            wall = np.clip(1.0 - np.abs(dist - r) / h, 0.0, 1.0) * 0.45      # thin wall, bold: 1 voxel
            view += (wall * (np.float32(-50.0) - view)) * inside
            air = np.clip((r - dist) / h + 0.5, 0.0, 1.0)
            view += (air * (np.float32(HU["air"]) - view)) * inside

    def mosaic(self, f, rng):
        sev = SEV.get(f.severity, 1)
        lung_box = self.lung_box()
        n = _smooth_noise(rng, self.g, lung_box, 22.0)
        s = np.clip(n / 0.35, -1.0, 1.0)
        dense = np.float32((110.0, 160.0, 220.0)[sev])
        delta = np.where(s > 0, s * dense, s * 30.0) * self.region(f.side, None)[lung_box.sl]
        self.par[lung_box.sl] += delta
        vs = np.ones(self.g.shape, np.float32)
        vs[lung_box.sl] = np.where(s < 0, 1.0 + 0.45 * s, 1.0)               # thinner vessels in lucent lobules
        self.vessel_scale = vs if self.vessel_scale is None else self.vessel_scale * vs

    def ground_glass(self, f, rng):
        a, sev = self.a, SEV.get(f.severity, 1)
        lung_box = self.lung_box()
        n = _smooth_noise(rng, self.g, lung_box, 30.0)
        reg = self.region(f.side, f.lobe)[lung_box.sl]
        if f.lobe is None:       # diffuse opacities favour the periphery and the bases
            n = n + 0.5 * np.clip(1.0 + self.dout[lung_box.sl] / 30.0, 0.0, 1.0) \
                + 0.4 * np.clip((a.z_carina - lung_box.z) / 100.0, -0.5, 1.0)
        thr = (0.9, 0.4, -0.1)[sev]
        amt = _smoothstep((n - thr) / 0.5) * reg
        target = np.float32((-650.0, -600.0, -520.0)[sev])
        view = self.par[lung_box.sl]
        view += amt * (target - view)

    def lung_box(self) -> Box:
        a = self.a
        return self.g.box((-a.cav_a, a.cav_cy - a.cav_b, a.z_dome_l - 80.0), (a.cav_a, a.cav_cy + a.cav_b, a.z_apex))

    def nodule(self, f, rng):
        side = f.side or ("right" if f.lobe in RIGHT_LOBES else "left")
        if f.lobe in LOBES:
            side = "right" if f.lobe in RIGHT_LOBES else "left"
        d = float(f.size_mm or 8.0)
        r = max(d / 2.0, min(1.2 * self.g.h, 8.0))   # bold: at least 2.4 voxels across at the demo grid
        lobes = (f.lobe,) if f.lobe in LOBES else None
        try:
            c = sample_lung_points(self.a, self.heart, rng, 1, side, lobes=lobes, margin=r + 2.0)[0]
        except UserError:                             # a big nodule in a small lobe: let it reach the pleura
            c = sample_lung_points(self.a, self.heart, rng, 1, side, lobes=lobes, margin=2.0)[0]
        # lobulated: a main sphere and a few smaller satellites on its surface
        k = int(rng.integers(0, 3)) if d >= 8 else 0
        dirs = rng.normal(size=(k, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True) + 1e-9
        cs = np.vstack([c, c + dirs * r * 0.55])
        rs = np.r_[r, np.full(k, r * 0.55)]
        occ = occupancy_volume(self.g, *rasterize_tubes(self.g, cs, cs, rs, rs))
        self.nodules = getattr(self, "nodules", []) + [(c, r, f.kind)]
        if f.kind == "ground-glass":
            self.par += occ * (np.float32(-520.0) - self.par)
        else:
            self.blend(occ, 45.0, where=self.lung)

    def atelectasis(self, f, rng):
        a, sev = self.a, SEV.get(f.severity, 1)
        side = lobe_side(f)
        reg = self.region(side, f.lobe)
        if not reg.any():
            return
        if (f.kind or "segmental") == "plate-like":
            for _ in range((1, 2, 3)[sev]):
                c = self.points_in(reg & (self.Z < a.z_carina - 30.0), rng, 1)
                if not len(c):
                    c = self.points_in(reg, rng, 1)
                c = c[0]
                tilt = rng.uniform(0.35, 0.8)                           # 20-45 degrees from horizontal
                az = rng.uniform(0, 2 * np.pi)
                nrm = np.array([np.sin(tilt) * np.cos(az), np.sin(tilt) * np.sin(az), np.cos(tilt)])
                R = (18.0, 26.0, 34.0)[sev]
                b = self.box_around(c, (R + 5, R + 5, R + 5))
                dx, dy, dz = b.x - c[0], b.y - c[1], b.z - c[2]
                dn = dx * nrm[0] + dy * nrm[1] + dz * nrm[2]
                dt = np.sqrt(np.maximum(dx * dx + dy * dy + dz * dz - dn * dn, 0.0))
                h = self.g.h
                occ = np.clip((2.5 - np.abs(dn)) / h + 0.5, 0, 1) * np.clip((R - dt) / h + 0.5, 0, 1)  # 5 mm: bold
                view = self.hu[b.sl]
                view += occ * reg[b.sl] * (np.float32(25.0) - view)
        else:
            self.cone_opacity(f, rng, reg, half_angle=(14.0, 20.0, 28.0)[sev], value=38.0, dependent=True,
                              store="atelectasis_mask", fuzz=0.1)

    def cone_opacity(self, f, rng, reg, half_angle, value, dependent, store, fuzz, halo=0.0):
        """A wedge (cone from the hilum towards a peripheral target) of the region: segmental/lobar density."""
        a = self.a
        side = "right" if (f.lobe in RIGHT_LOBES or (f.lobe is None and f.side == "right")) else "left"
        hilum = self.paths[f"{side} main bronchus"][0][-1]
        cand = reg & (self.dout > -15.0)
        if dependent:
            cand &= self.Y > (a.cav_cy + 0.2 * a.cav_b)
        tgt = self.points_in(cand if cand.any() else reg, rng, 1)
        if not len(tgt):
            return
        axis = tgt[0] - hilum
        axis /= np.linalg.norm(axis)
        lb = self.lung_box()
        dx, dy, dz = lb.x - hilum[0], lb.y - hilum[1], lb.z - hilum[2]
        dist = np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-3
        cosang = (dx * axis[0] + dy * axis[1] + dz * axis[2]) / dist
        ang = np.degrees(np.arccos(np.clip(cosang, -1, 1)))
        score = (half_angle - ang) / half_angle + 0.4 * np.clip((dist - 20.0) / 30.0, -1, 0)
        if fuzz:
            score = score + fuzz * _smooth_noise(rng, self.g, lb, 12.0)
        m = np.zeros(self.g.shape, np.float32)
        m[lb.sl] = _smoothstep(score / 0.12) * reg[lb.sl]
        if halo:
            ggo = _smoothstep((score + halo) / 0.12) * reg[lb.sl] * (1 - m[lb.sl])
            view = self.hu[lb.sl]
            view += ggo * (np.float32(-520.0) - view)
        tex = np.float32(value) + 6.0 * (_smooth_noise(rng, self.g, lb, 8.0) if fuzz else 0.0)
        view = self.hu[lb.sl]
        view += m[lb.sl] * (tex - view)
        prev = getattr(self, store, None)
        setattr(self, store, m if prev is None else np.maximum(prev, m))

    def consolidation(self, f, rng):
        sev = SEV.get(f.severity, 1)
        side = lobe_side(f)
        reg = self.region(side, f.lobe)
        if not reg.any():
            reg = self.region(side, None)
        self.cone_opacity(f, rng, reg, half_angle=(16.0, 26.0, 45.0)[sev], value=32.0, dependent=rng.random() < 0.6,
                          store="consolidation_mask", fuzz=0.25, halo=0.25)

    def fibrosis(self, f, rng):
        sev = SEV.get(f.severity, 1)
        side = lobe_side(f)
        reg = self.region(side, f.lobe)
        if not reg.any():
            reg = self.region(side, None)
        hilum = self.paths[f"{side} main bronchus"][0][-1]
        n = (3, 5, 8)[sev]
        starts = self.points_in(reg & (self.dout > -6.0), rng, n)
        p0, p1 = [], []
        for s in starts:
            d = hilum - s
            d /= np.linalg.norm(d)
            d = d + rng.normal(0, 0.45, 3)
            d /= np.linalg.norm(d)
            L = rng.uniform(20.0, 45.0)
            mid = s + d * L * 0.5 + rng.normal(0, 3.0, 3)
            p0 += [s, mid]
            p1 += [mid, s + d * L]
        if p0:
            r = 1.6 + 0.3 * sev                                              # bold: real bands are 1-3 mm
            occ = occupancy_volume(self.g, *rasterize_tubes(self.g, np.array(p0), np.array(p1), r, r * 0.7))
            self.blend(occ, 10.0, where=reg)
        if sev >= 1:                                                         # subpleural reticulation
            lb = self.lung_box()
            nfield = _smooth_noise(rng, self.g, lb, 9.0)
            w = (0.0, 0.16, 0.22)[sev]
            line = np.clip(1.0 - np.abs(nfield) / w, 0.0, 1.0) * (self.dout[lb.sl] > -18.0) * reg[lb.sl]
            view = self.hu[lb.sl]
            view += 0.7 * line * (np.float32(-100.0) - view)

    def septal_lines(self, f, rng):
        a, sev = self.a, SEV.get(f.severity, 1)
        lb = self.lung_box()
        reg = self.region(f.side, None)[lb.sl]
        depth = (14.0, 22.0, 32.0)[sev]
        zone = _smoothstep((self.dout[lb.sl] + depth) / 6.0) * reg
        zone = zone * np.clip((a.z_carina + 20.0 - lb.z) / 40.0, 0.25 * sev, 1.0)   # basal predominance
        nfield = _smooth_noise(rng, self.g, lb, 11.0)
        w = (0.13, 0.17, 0.21)[sev]                  # line width: bold, 2-3 mm at the demo grid
        line = np.clip(1.0 - np.abs(nfield) / w, 0.0, 1.0) * zone
        view = self.hu[lb.sl]
        view += line * (np.float32((-250.0, -150.0, -80.0)[sev]) - view)

    def pleural_effusion(self, f, rng):
        a, sev = self.a, SEV.get(f.severity, 1)
        size = float(f.size_mm or (15.0, 30.0, 55.0)[sev])
        for side in (("right", "left") if f.side in (None, "bilateral") else (f.side,)):
            lb = self.lung_box()
            reg = self.region(side, None)[lb.sl]
            cphi = np.cos(self.phi[:, lb.sl[1], lb.sl[2]])
            k = 0.15 + 0.2 * sev
            w = np.clip((cphi + k) / (1.0 + k), 0.0, 1.0) ** 0.8           # posterior (dependent) crescent
            z_base = (a.z_dome_r if side == "right" else a.z_dome_l) - 15.0
            hz = np.clip(1.0 - (lb.z - z_base) / (2.5 * size + 40.0), 0.0, 1.0) ** 0.6
            t = size * w * hz
            depth = -self.dout[lb.sl]
            above_d = lb.z - self.zd[:, lb.sl[1], lb.sl[2]]
            t = np.maximum(t, np.where(above_d < 0.4 * size, 0.6 * size * np.clip(cphi + 0.6, 0, 1), 0.0))
            fluid = _smoothstep((t - depth) / 3.0) * reg
            view = self.hu[lb.sl]
            # compressive atelectasis: a dense band of lung along the fluid margin
            rim = _smoothstep((t + 4.0 + 3.0 * sev - depth) / 3.0) * reg * (1 - fluid) * (t > 2.0)
            view += rim * (np.float32(-250.0 + 100.0 * sev) - view)
            view += fluid * (np.float32(10.0) - view)

    def cysts(self, f, rng, wocc, locc):
        sev = SEV.get(f.severity, 1)
        side = "right" if f.lobe in RIGHT_LOBES else "left"
        t = self.a.trees[f"{side} airways"]
        sel = self.region_fn(side, f.lobe)(t.p1) & (t.n <= 3)
        idx = np.flatnonzero(sel)
        if idx.size == 0:
            return
        pick = idx[rng.integers(idx.size, size=(4, 8, 14)[sev])]
        c = t.p1[pick]
        r = rng.uniform(4.0, 8.0, len(c))
        occupancy_volume(self.g, *rasterize_tubes(self.g, c, c, r + 1.2, r + 1.2), out=wocc)
        occupancy_volume(self.g, *rasterize_tubes(self.g, c, c, r, r), out=locc)

    # ------------------------------------------------------------------ mediastinum
    def heart_and_pericardium(self):
        h, g = self.heart, self.g
        b = self.box_around(h.c, h.half_extent(h.fat + self.peff + 6.0))
        u = h.local(b.x, b.y, b.z)
        d = h.surface_distance(u, 0.0)                                  # myocardial surface distance, mm
        view = self.hu[b.sl]
        hh = g.h
        outer = h.fat + self.peff
        sac = np.clip((outer + 1.8 - d) / hh + 0.5, 0, 1)                  # pericardium: bold 1.8 mm line
        view += sac * (np.float32(HU["muscle"]) - view)
        if self.peff > 0:
            eff = np.clip((outer - d) / hh + 0.5, 0, 1)
            view += eff * (np.float32(HU["water"]) - view)
        fat = np.clip((h.fat - d) / hh + 0.5, 0, 1)
        view += fat * (np.float32(HU["fat"]) - view)
        myo = np.clip((0.0 - d) / hh + 0.5, 0, 1)
        view += myo * (np.float32(HU["myocardium"]) - view)
        # chambers (blood slightly darker than myocardium on non-contrast CT)
        w = np.array([0.0, h.v_rv @ h.R[:, 1], h.v_rv @ h.R[:, 2]])
        s = h.s
        for cen, semi in (
                (np.array([0.12 * s[0], 0, 0]) - 0.22 * s[1] * w, np.array([0.55, 0.42, 0.42]) * s),   # LV
                (np.array([0.0, 0, 0]) + 0.5 * s[1] * w, np.array([0.5, 0.26, 0.46]) * s),             # RV
                (np.array([-0.62 * s[0], 0, 0]) - 0.3 * s[1] * w, np.array([0.3, 0.38, 0.38]) * s),     # LA
                (np.array([-0.55 * s[0], 0, 0]) + 0.45 * s[1] * w, np.array([0.3, 0.36, 0.36]) * s)):  # RA
            q = sum(((u[i] - cen[i]) / semi[i]) ** 2 for i in range(3))
            view += np.clip((1.0 - q) * 6.0, 0, 1) * (np.float32(HU["blood"]) - view)
        # atrioventricular and interventricular grooves filled with epicardial fat
        u_av = -0.42 * s[0]
        sep = u[1] * w[1] + u[2] * w[2] - 0.12 * s[1]
        groove = ((np.abs(u[0] - u_av) < 5.0) & (d > -7.0) & (d < 0)) | (
            (np.abs(sep) < 4.0) & (d > -6.0) & (d < 0) & (u[0] > u_av))
        np.copyto(view, np.float32(HU["fat"]), where=groove)
        self.heart_box = b
        self.heart_d = d
        # coronary arteries (non-calcified) in the grooves
        self.coronaries = self.coronary_paths()
        segs = [self._poly_to_segs(p, 1.6) for p in self.coronaries.values()]
        p0 = np.concatenate([s_[0] for s_ in segs])
        p1 = np.concatenate([s_[1] for s_ in segs])
        occ = occupancy_volume(g, *rasterize_tubes(g, p0, p1, 1.6, 1.6))
        view += occ[b.sl] * (np.float32(HU["blood"]) - view)

    @staticmethod
    def _poly_to_segs(pts, r):
        return pts[:-1], pts[1:], np.full(len(pts) - 1, r), np.full(len(pts) - 1, r)

    def coronary_paths(self) -> dict[str, np.ndarray]:
        """LAD, circumflex and right coronary centrelines (K, 3) mm, 2 mm under the heart surface in the grooves."""
        h = self.heart
        s = h.s
        w = np.array([0.0, h.v_rv @ h.R[:, 1], h.v_rv @ h.R[:, 2]])
        u_av = -0.42 * s[0]
        rho = np.sqrt(max(1 - (u_av / s[0]) ** 2, 0.05)) * s[1:] - 2.0
        psi = np.linspace(0, 2 * np.pi, 73)[:-1]
        ring = np.stack([np.full_like(psi, u_av), rho[0] * np.cos(psi), rho[1] * np.sin(psi)], 1)
        side = ring[:, 1] * w[1] + ring[:, 2] * w[2]
        world = h.world(ring)
        start = np.argmin(world[:, 1] - world[:, 2])                          # anterior-superior: the aortic root side
        order = np.roll(np.arange(len(psi)), -start)
        rca = [i for i in order if side[i] > 0][: int(len(psi) * 0.45)]
        lcx = [i for i in order[::-1] if side[i] <= 0][: int(len(psi) * 0.3)]
        # LAD: along the anterior interventricular groove from base to apex
        lad = []
        for u1 in np.linspace(u_av, 0.9 * s[0], 14):
            rr = np.sqrt(max(1 - (u1 / s[0]) ** 2, 0.02)) * s[1:] - 2.0
            pts = np.stack([np.full_like(psi, u1), rr[0] * np.cos(psi), rr[1] * np.sin(psi)], 1)
            sp = pts[:, 1] * w[1] + pts[:, 2] * w[2] - 0.12 * s[1]
            wy = h.world(pts)[:, 1]
            score = np.abs(sp) + 0.1 * (wy - wy.min())
            lad.append(pts[np.argmin(score)])
        return {"RCA": world[rca], "LCX": world[lcx], "LAD": h.world(np.array(lad))}

    def mediastinal_vessels(self):
        g = self.g
        occ = self.vessel_occ
        self.aorta_occ = self.tube_occ(["aorta"]) if self.want_masks else None
        lung = self.lung.reshape(-1)
        self.blend(occ, HU["blood"], where=lambda nz, o: ~lung[nz] | (o > 0.5))

    def oesophagus(self):
        self.blend(self.oes_occ, HU["muscle"])
        lumen = self.tube_occ(["oesophagus"], scale_r=0.22)
        zc = np.repeat(self.g.axis("z") > self.a.z_dome_l + 10.0, self.g.shape[1] * self.g.shape[2])
        self.blend(lumen, HU["air"], where=lambda nz, o: 0.8 * zc[nz])

    def trachea(self):
        lumen, wall = self.tube_occ(AIRWAYS, grow=2.2)
        self.blend(wall, 25.0)
        self.blend(lumen, HU["air"])

    def lymph_nodes(self):
        a, g = self.a, self.g
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 3]))   # normal small nodes: anatomy stream
        centres = lymph_station_centres(a)
        nodes = []
        for name in NODE_STATIONS:
            if rng.random() < 0.5:
                nodes.append((centres[name] + rng.normal(0, 3.0, 3), rng.uniform(3.0, 7.0), rng.normal(size=3)))
        for f, frng in self.by_label.get("Lymphadenopathy", []):
            size = float(f.size_mm or 15.0)
            for st in (f.stations or ("subcarinal",)):
                if st not in centres:
                    continue
                for k in range(int(frng.integers(1, 3))):
                    short = size * (1.0 if k == 0 else frng.uniform(0.6, 0.9))
                    nodes.append((centres[st] + frng.normal(0, 3.0 + 3.0 * k, 3), short, frng.normal(size=3)))
        c = np.array([n[0] for n in nodes])
        short = np.array([n[1] for n in nodes])
        axis = np.array([n[2] / (np.linalg.norm(n[2]) + 1e-9) for n in nodes]) * short[:, None] * 0.25
        occ = occupancy_volume(g, *rasterize_tubes(g, c - axis, c + axis, short / 2, short / 2))  # long ~1.5 x short
        lung = self.lung.reshape(-1)
        self.blend(occ, HU["node"], where=lambda nz, o: ~lung[nz] | (o > 0.5))

    def hiatal_hernia(self, f, rng):
        a = self.a
        d = float(f.size_mm or 45.0)
        r = d / 2.0
        zc_ = float(a.diaphragm_z(12.0, a.y_spine(a.z_dome_l) - a.vb_ry - 25.0)) + 0.75 * r
        c = np.array([rng.uniform(4.0, 16.0), a.y_spine(zc_) - a.vb_ry - 6.0 - 0.8 * r, zc_])
        semi = np.array([r, 0.8 * r, 0.9 * r])
        b = self.box_around(c, semi + 6)
        q = np.sqrt(((b.x - c[0]) / semi[0]) ** 2 + ((b.y - c[1]) / semi[1]) ** 2 + ((b.z - c[2]) / semi[2]) ** 2)
        view = self.hu[b.sl]
        hh = self.g.h / r
        sac = np.clip((1.0 - q) / hh + 0.5, 0, 1)
        view += sac * (np.float32(HU["muscle"]) - view)
        inner = np.clip((1.0 - 3.5 / r - q) / hh + 0.5, 0, 1)                # 3.5 mm wall
        level = c[1] - rng.uniform(-0.1, 0.4) * semi[1]                       # air-fluid level (supine: coronal)
        content = np.where(b.y < level, np.float32(HU["air"]), np.float32(15.0))
        view += inner * (content - view)
        # neck through the hiatus down to the stomach
        sc = self.stomach_c
        p0, p1 = c - np.array([0, 0, 0.7 * r]), np.array([sc[0] * 0.6, sc[1] + 10.0, sc[2] + 20.0])
        occ = occupancy_volume(self.g, *rasterize_tubes(self.g, p0, p1, 10.0, 10.0))
        zc = np.repeat(self.g.axis("z") < c[2], self.g.shape[1] * self.g.shape[2])
        self.blend(occ, HU["muscle"], where=lambda nz, o: zc[nz])
        self.hernia = (c, semi)

    # ------------------------------------------------------------------ bones
    def bones(self):
        a, g, hu = self.a, self.g, self.hu
        bone = np.zeros(g.shape, bool) if self.want_masks else None
        # spine: vertebral bodies (cancellous + cortex) and discs, canal, posterior elements
        b = g.box((-70, a.y_vb - a.vb_ry - 40, -400), (70, a.y_vb + 90, 400))
        X, Y, Z = b.x, b.y, b.z
        yv = a.y_spine(Z)
        frac = ((a.z_t1 - Z) / a.pitch) % 1.0
        disc = frac > 1.0 - 5.5 / a.pitch
        q = (X / a.vb_rx) ** 2 + ((Y - yv) / a.vb_ry) ** 2
        view = hu[b.sl]
        vb = q < 1.0
        np.copyto(view, np.float32(HU["cancellous"]), where=vb)
        np.copyto(view, np.float32(800.0), where=vb & (q > 0.72))
        np.copyto(view, np.float32(HU["disc"]), where=vb & disc)
        yc = yv + a.vb_ry + 9.0
        rc = np.sqrt(X ** 2 + (Y - yc) ** 2)
        vert = ~disc & (frac > 0.08)
        arch = (rc > 8.5) & (rc < 15.0) & (Y > yc - 7.0) & vert
        spinous = (np.abs(X) < 4.5) & (Y > yc + 12.0) & (Y < yc + 46.0 - 12.0 * frac) & vert
        transverse = (np.abs(X) < 40.0) & (np.abs(Y - yc - 2.0) < 5.0) & (frac > 0.2) & (frac < 0.6)
        post = arch | spinous | transverse
        np.copyto(view, np.float32(550.0), where=post)
        np.copyto(view, np.float32(HU["csf"]), where=rc < 8.5)
        if bone is not None:
            bone[b.sl] |= vb | post
        # ribs: 12 pairs around the cavity, sloping down anteriorly (one pass over the chest-wall band)
        band = (self.dout > 0.0) & (self.dout < a.rib_zone + 0.5) & self.body_mask
        k, j, i = np.nonzero(band)
        phi = self.phi[0, j, i]
        z = g.axis("z")[k]
        dout = self.dout[k, j, i]
        drop = a.rib_drop * (phi / np.pi) ** 1.15
        ic = (a.z_t1 - drop - z) / a.pitch
        n = np.round(ic)
        dz = (ic - n) * a.pitch
        n = n.astype(np.int64)
        ok = (n >= 0) & (n < 12)
        phi_end = np.array([0.93, 0.93, 0.93, 0.93, 0.93, 0.93, 0.92, 0.86, 0.82, 0.78, 0.55, 0.42])[np.clip(n, 0, 11)]
        ok &= (phi > 0.2) & (phi < phi_end * np.pi)
        dc = 1.0 + a.rib_t / 2
        h_r = a.rib_h * np.where(n == 0, 0.8, 1.0)
        e = np.sqrt((dz / (h_r / 2)) ** 2 + ((dout - dc) / (a.rib_t / 2)) ** 2)
        rib = ok & (e < 1.0)
        cart = rib & (phi > (phi_end - 0.2) * np.pi) & (n < 10)
        val = np.where(e > 0.6, np.float32(HU["cortical"]), np.float32(HU["cancellous"]))
        val = np.where(cart, np.float32(HU["cartilage"]), val)
        hu[k[rib], j[rib], i[rib]] = val[rib]
        if bone is not None:
            bone[k[rib & ~cart], j[rib & ~cart], i[rib & ~cart]] = True
        # scapulae: thin plates outside the posterolateral ribs, triangular (wide at the top)
        z_top, z_bot = a.z_t1 - 5.0, a.z_t1 - 150.0
        sc_band = (self.dout > a.rib_zone + 3.0) & (self.dout < a.rib_zone + 9.0) & self.body_mask
        k2, j2, i2 = np.nonzero(sc_band & (self.Z > z_bot) & (self.Z < z_top))
        phi2 = self.phi[0, j2, i2]
        z2 = g.axis("z")[k2]
        lat2 = 0.22 * np.pi + 0.3 * np.pi * np.clip((z2 - z_bot) / (z_top - z_bot), 0, 1)
        d2 = self.dout[k2, j2, i2]
        thick = np.where(phi2 > lat2 - 0.06 * np.pi, 6.0, 3.5)               # thicker lateral border
        sc = (phi2 > 0.22 * np.pi) & (phi2 < lat2) & (np.abs(d2 - (a.rib_zone + 6.0)) < thick / 2 + 0.5)
        hu[k2[sc], j2[sc], i2[sc]] = np.float32(700.0)
        if bone is not None:
            bone[k2[sc], j2[sc], i2[sc]] = True
        # sternum: manubrium, body, xiphoid (cortex around marrow) at the anterior midline
        self.z_man = a.z_carina + 38.0
        hb = self.heart.half_extent(self.heart.fat)
        self.z_xiph = self.heart.c[2] - hb[2] + 15.0
        b = g.box((-40, -400, self.z_xiph - 15.0), (40, 0, self.z_man + 2.0))
        if not b.empty:
            Zb, Xb = b.z, b.x
            ws = np.where(Zb > self.z_man - 45.0, 26.0, np.where(Zb < self.z_xiph + 20.0, 10.0, 16.0))
            ws = np.where(Zb < self.z_xiph, 10.0 * np.clip(1 - (self.z_xiph - Zb) / 15.0, 0, 1), ws)
            d = self.dout[b.sl]
            t_s = 11.0
            st = (np.abs(Xb) < ws) & (d > 0.5) & (d < 0.5 + t_s)
            cortex = (np.abs(Xb) > ws - 2.5) | (d < 3.0) | (d > t_s - 2.0)
            view = hu[b.sl]
            np.copyto(view, np.float32(HU["cancellous"]), where=st)
            np.copyto(view, np.float32(900.0), where=st & cortex)
            if self.has("Medical material") and any(f.kind == "sternotomy wires" for f, _ in
                                                    self.by_label["Medical material"]):
                np.copyto(view, np.float32(HU["fat"]), where=st & (np.abs(Xb) < 0.9))   # the healed split
            if bone is not None:
                bone[b.sl] |= st
        # clavicles
        y_front = a.cav_cy - a.cav_b * a.cavity_scale(self.z_man)
        segs = []
        for sgn in (-1, 1):
            pts = np.array([[sgn * 20.0, y_front - 10.0, self.z_man + 2.0], [sgn * 60.0, y_front - 14.0, self.z_man + 10.0],
                            [sgn * (a.cav_a * 0.95), y_front + 20.0, a.z_t1 + 22.0]])
            segs.append(_path_segments(pts, np.full(3, 7.0)))
        occ = self.tube_occ(segs)
        self.blend(occ, 700.0)
        if bone is not None:
            bone |= occ > 0.5
            self.masks["bone"] = bone

    # ------------------------------------------------------------------ dense layer: calcium and metal
    def aortic_calcification(self, f, rng):
        sev = SEV.get(f.severity, 1)
        pts, radii = self.paths["aorta"]
        p0, p1, r0, _ = _path_segments(pts, radii, step_mm=2.0)
        n = len(p0)
        lo = int(0.25 * n)                                   # mostly arch and descending aorta
        m = (6, 16, 34)[sev]
        cs, rs = [], []
        for _ in range(m):
            i = int(rng.integers(lo, n - 1))
            t = p1[i] - p0[i]
            t /= np.linalg.norm(t) + 1e-9
            e1 = np.cross(t, [0.3, 0.2, 0.93])
            e1 /= np.linalg.norm(e1)
            e2 = np.cross(t, e1)
            th0 = rng.uniform(0, 2 * np.pi)
            arc = rng.uniform(0.35, 1.5)
            for th in np.linspace(th0, th0 + arc, 4):
                cs.append(p0[i] + (r0[i] - 0.8) * (np.cos(th) * e1 + np.sin(th) * e2))
                rs.append(rng.uniform(1.4, 2.2))                            # bold: real plaques are ~1 mm thick
        cs = np.array(cs)
        self.add_dense(cs, cs, np.array(rs), np.array(rs), rng.uniform(450.0, 900.0))

    def coronary_calcification(self, f, rng):
        sev = SEV.get(f.severity, 1)
        kind = f.kind or "LAD"
        vessels = {"LAD": ["LAD"], "LAD and circumflex": ["LAD", "LCX"], "three-vessel": ["LAD", "LCX", "RCA"]}.get(
            kind, ["LAD"])
        for name in vessels:
            path = self.coronaries[name]
            n_spots = (2, 5, 10)[sev]
            idx = rng.integers(0, max(1, int(len(path) * (0.6 if sev < 2 else 0.95))), size=n_spots)
            cs, ce = path[idx], path[np.minimum(idx + (1 if sev == 2 else 0), len(path) - 1)]
            r = rng.uniform(1.6, 2.4, n_spots)                               # bold: 3-5 mm spots
            self.add_dense(cs, ce, r, r, rng.uniform(400.0, 900.0))

    def medical_material(self, f, rng):
        a = self.a
        kind = f.kind or "sternotomy wires"
        metal = HU["metal"]
        if kind == "sternotomy wires":
            y_front = lambda z: a.cav_cy - a.cav_b * a.cavity_scale(z)     # noqa: E731
            for z in np.linspace(self.z_xiph + 12.0, self.z_man - 6.0, int(rng.integers(5, 8))):
                ws = 26.0 if z > self.z_man - 45.0 else 16.0
                yc = y_front(z) - 6.0
                th = np.linspace(0, 2 * np.pi, 25)
                ring = np.stack([0.8 * ws * np.cos(th), yc + 9.0 * np.sin(th), np.full_like(th, z)], 1)
                self.metal_flat.append(self.add_dense(ring[:-1], ring[1:], 1.1, 1.1, metal))   # bold: 2.2 mm wire
        elif kind == "prosthetic valve":
            root = self.paths["root"][0][0]
            pts, _ = self.paths["aorta"]
            t = pts[1] - pts[0]
            t /= np.linalg.norm(t)
            e1 = np.cross(t, [1.0, 0, 0])
            e1 /= np.linalg.norm(e1)
            e2 = np.cross(t, e1)
            th = np.linspace(0, 2 * np.pi, 25)
            rr = 11.0 * a.aorta_scale
            ring = root + rr * (np.cos(th)[:, None] * e1 + np.sin(th)[:, None] * e2)
            self.metal_flat.append(self.add_dense(ring[:-1], ring[1:], 1.8, 1.8, metal))
        elif kind in ("pacemaker", "port catheter"):
            sgn = -1.0 if f.side == "right" else 1.0
            y_front = a.cav_cy - a.cav_b
            zg = a.z_carina + (32.0 if kind == "pacemaker" else 22.0)
            gen = np.array([sgn * 0.5 * a.cav_a, y_front - a.rib_zone - a.muscle - 8.0, zg])
            if kind == "pacemaker":
                # generator can: a flat rounded box in the subcutaneous fat, drawn as a thick short tube
                self.metal_flat.append(self.add_dense(gen - [12.0, 0, 0], gen + [12.0, 0, 0], 9.0, 9.0, metal))
                yt, zc = a.y_tr, a.z_carina
                route = [gen + [-sgn * 10, 4, 4], [sgn * 48, y_front - 4.0, zc + 46.0], [sgn * 26, yt - 22, zc + 36],
                         [-28, yt - 12, zc + 8], self.paths["ra"][0][0] + [0, 0, 12]]
                for end in (self.paths["rv_apex"][0][0], self.paths["ra"][0][0] + [6.0, -12.0, 16.0]):
                    p0, p1, r0, r1 = _path_segments(np.array(route + [end]), np.full(len(route) + 1, 1.0), 3.0)
                    self.metal_flat.append(self.add_dense(p0, p1, r0, r1, metal))   # bold 2 mm leads
            else:
                self.metal_flat.append(self.add_dense(gen - [0, 6.0, 0], gen + [0, 6.0, 0], 12.0, 12.0, metal))
                yt, zc = a.y_tr, a.z_carina
                route = np.array([gen + [-sgn * 8, 2, 6], [sgn * 40, y_front - 2.0, zc + 50.0],
                                  [sgn * 30, yt - 18, zc + 40], [-28, yt - 12, zc + 10],
                                  self.paths["ra"][0][0] + [0, 0, 18]])
                p0, p1, r0, r1 = _path_segments(route, np.full(len(route), 1.3), 3.0)
                self.add_dense(p0, p1, r0, r1, 600.0)                         # radiopaque catheter

    def paint_dense(self):
        out = self.hu.reshape(-1)
        for flat, occ, value in self.dense:
            cur = out[flat]
            np.maximum.at(out, flat, cur + occ * (np.float32(value) - cur))

    def metal_streaks(self, rng):
        """Streak artefacts around metal: bright and dark lines through each metal cluster, slice by slice."""
        if not self.metal_flat:
            return
        g = self.g
        flat = np.concatenate(self.metal_flat)
        k, j, i = np.unravel_index(flat, g.shape)
        xs, ys = g.axis("x"), g.axis("y")
        for kk in np.unique(k):
            sel = k == kk
            amount = min(1.0, sel.sum() / 60.0)                  # a lead streaks a little, a generator a lot
            cx, cy = xs[i[sel]].mean(), ys[j[sel]].mean()
            b = g.box((cx - 90, cy - 90, -1e4), (cx + 90, cy + 90, 1e4))
            dx, dy = b.x[0] - cx, b.y[0] - cy
            r = np.sqrt(dx * dx + dy * dy) + 1.0
            streak = np.zeros_like(r)
            for th in rng.uniform(0, np.pi, 6):
                dist = np.abs(-np.sin(th) * dx + np.cos(th) * dy)
                streak += rng.choice([-1.0, 1.0]) * rng.uniform(120, 320) * np.exp(-(dist / 1.8) ** 2)
            self.hu[kk, b.sl[1], b.sl[2]] += (amount * streak * np.exp(-r / 45.0)).astype(np.float32)

    # ------------------------------------------------------------------ the whole study
    def tick(self, name):
        """Record the time spent since the previous tick under `name` (bench/bench_phantom.py prints these)."""
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self._t
        self._t = now

    def render(self, noise: bool) -> np.ndarray:
        self.timings, self._t = {}, time.perf_counter()
        self.body()
        self.tick("body")
        self.lungs()
        self.tick("lungs")
        self.lung_vessels()
        self.tick("lung vessels")
        for label, fn in (("Lung nodule", self.nodule), ("Consolidation", self.consolidation),
                          ("Atelectasis", self.atelectasis), ("Pulmonary fibrotic sequela", self.fibrosis),
                          ("Interlobular septal thickening", self.septal_lines)):
            for f, rng in self.by_label.get(label, []):
                if label == "Lung nodule" and f.kind == "ground-glass":
                    continue
                fn(f, rng)
        self.bullae()
        self.peribronchial = {}
        for f, _ in self.by_label.get("Peribronchial thickening", []):
            factor = (2.2, 3.0, 4.0)[SEV.get(f.severity, 1)]
            for s in (("right", "left") if f.side in (None, "bilateral") else (f.side,)):
                self.peribronchial[s] = (self.region_fn(s, f.lobe), factor)
        self.bronchiectasis = {}
        for f, _ in self.by_label.get("Bronchiectasis", []):
            s = "right" if f.lobe in RIGHT_LOBES else ("left" if f.lobe in LEFT_LOBES else (f.side or "right"))
            k = (1.5, 1.9, 2.4)[SEV.get(f.severity, 1)]
            self.bronchiectasis.setdefault(s, []).append((self.region_fn(s, f.lobe), k, f.kind or "cylindrical"))
        self.tick("lung findings")
        self.airway_tree()
        self.tick("airways")
        for f, rng in self.by_label.get("Pleural effusion", []):
            self.pleural_effusion(f, rng)
        self.tick("pleura")
        self.heart_and_pericardium()
        self.tick("heart")
        self.oesophagus()
        for f, rng in self.by_label.get("Hiatal hernia", []):
            self.hiatal_hernia(f, rng)
        self.mediastinal_vessels()
        self.lymph_nodes()
        self.trachea()
        self.tick("mediastinum")
        self.bones()
        self.tick("bones")
        for f, rng in self.by_label.get("Medical material", []):
            self.medical_material(f, rng)
        for f, rng in self.by_label.get("Arterial wall calcification", []):
            self.aortic_calcification(f, rng)
        for f, rng in self.by_label.get("Coronary artery wall calcification", []):
            self.coronary_calcification(f, rng)
        self.tick("calcium and metal")
        # scanner: noise (correlated by the blur, like reconstructed CT noise) and point-spread
        sigma = (0.35, 0.45, 0.45)                                           # voxels (z, y, x)
        if noise:
            nrng = np.random.default_rng(np.random.SeedSequence([self.seed, 2]))
            gain = self.a.noise_sd / _blur_noise_factor(sigma)
            self.hu += nrng.standard_normal(self.g.shape, dtype=np.float32) * np.float32(gain)
        self.tick("noise")
        out = ndimage.gaussian_filter(self.hu, sigma, mode="nearest", truncate=3.0)
        self.hu = out
        self.tick("blur")
        self.paint_dense()
        self.metal_streaks(np.random.default_rng(np.random.SeedSequence([self.seed, 4])))
        np.clip(self.hu, -1024.0, 3071.0, out=self.hu)
        self.tick("dense layer")
        if self.want_masks:
            self.collect_masks()
        return self.hu

    def collect_masks(self):
        m = self.masks
        m["body"] = self.body_mask.copy()
        m["lungs"] = self.lung.copy()
        m["lung_right"] = self.lung & self.right
        m["lung_left"] = self.lung & ~self.right
        for i, name in enumerate(LOBES):
            m[name] = self.lung & (self.lobe == i)
        hb = self.heart_box
        heart = np.zeros(self.g.shape, bool)
        heart[hb.sl] = self.heart_d < self.heart.fat
        m["heart"] = heart
        m["aorta"] = self.aorta_occ > 0.5
        m["peripheral_lung"] = self.lung & (self.dout > -20.0)
        m["mediastinum"] = self.cav & ~self.lung & ~self.below & (self.Z < self.a.apex_z(self.X, self.Y))


@functools.lru_cache(maxsize=8)
def _blur_noise_factor(sigma: tuple[float, float, float]) -> float:
    """SD of unit white noise after the Gaussian blur (so the final noise SD is what the anatomy asks for)."""
    impulse = np.zeros((15, 15, 15), np.float32)
    impulse[7, 7, 7] = 1.0
    k = ndimage.gaussian_filter(impulse, sigma, mode="constant", truncate=3.0)
    return float(np.sqrt((k.astype(np.float64) ** 2).sum()))


def render_phantom(findings: list[Finding], seed: int, shape_zyx=DEMO_SHAPE_ZYX, spacing_xyz=None,
                   noise: bool = True) -> Volume:
    """The phantom's chest CT for (findings, seed) on a grid: float32 HU (z, y, x), LPS, spacing (x, y, z) mm.

    shape_zyx: voxels (z, y, x), default the demo grid 64 x 128 x 128. spacing_xyz: mm (x, y, z); None keeps the
    physical field of view 350 x 350 x 300 mm whatever the shape (FOV / shape). noise: add CT noise (SD 10-22 HU,
    per seed); without it the volume is the noise-free (still blurred) image. Deterministic in all arguments.
    """
    grid = _resolve_grid(shape_zyx, spacing_xyz)
    scene = _Scene(sample_anatomy(int(seed)), grid, list(findings), int(seed))
    array = scene.render(bool(noise))
    return Volume(array=array, spacing=grid.spacing, origin=grid.origin, source=f"phantom seed {int(seed)}")


def phantom_masks(seed: int, shape_zyx=DEMO_SHAPE_ZYX, spacing_xyz=None,
                  findings: list[Finding] | None = None) -> dict[str, np.ndarray]:
    """Boolean (z, y, x) masks of the anatomy of `seed` on a grid (normal study unless findings are given):
    body, lungs, lung_right, lung_left, the six lobes (names of engine.labels.LOBES), heart (incl. epicardial fat),
    aorta, bone, peripheral_lung (within 20 mm of the costal pleura), mediastinum."""
    grid = _resolve_grid(shape_zyx, spacing_xyz)
    scene = _Scene(sample_anatomy(int(seed)), grid, list(findings or []), int(seed), want_masks=True)
    scene.render(False)
    return scene.masks


# ============================================================================================ studies

@dataclass
class PhantomStudy:
    """One phantom study: its seed, labels (CT-CLIP order), the drawn findings, the volume and the report."""
    seed: int
    labels: list[str]
    findings: list[Finding]
    volume: Volume
    report: object | None = None


def make_study(seed: int, labels: list[str] | None = None, shape_zyx=DEMO_SHAPE_ZYX, spacing_xyz=None,
               with_report: bool = True) -> PhantomStudy:
    """A complete study: labels (None: drawn from CT-RATE's label table), findings, volume and CT-RATE-style report.

    Everything random comes from np.random.default_rng(seed) (label set, findings, report wording) and the seed itself
    (anatomy and noise), so a study is reproducible from its seed and labels.
    """
    rng = np.random.default_rng(int(seed))
    if labels is None:
        labels = sample_label_set(rng)
    try:
        labels = check_labels(labels)
    except ValueError as err:
        raise UserError(str(err)) from None
    findings = sample_findings(labels, rng)
    volume = render_phantom(findings, seed, shape_zyx=shape_zyx, spacing_xyz=spacing_xyz)
    report = None
    if with_report:
        from engine.report_writer import write_report   # written alongside; imported only when a report is asked for

        report = write_report(findings, rng)
    return PhantomStudy(seed=int(seed), labels=labels, findings=findings, volume=volume, report=report)
