"""One rendering's shared state, declared: the inputs, the canvas, and the part each render step leaves for the next.

render.render_scene() runs the steps in a fixed order and each step's result is a typed field of `Scene`, so what a step
reads is what an earlier step wrote, and nothing is passed by attribute name. Who writes what:

    Scene(...)                 anat, grid, seed, findings, changes (the findings' setup painters), heart, paths, canvas
    normal.paint_body          body: Body (cavity distance, angle, cavity/abdomen masks, diaphragm height, stomach)
    normal.paint_lungs         lungs: Lungs (lung mask, lobes); the "parenchyma" painters write marks and the density
    normal.paint_lung_vessels  reads marks.vessel_scale (mosaic attenuation thins vessels)
    "lung" painters            marks.consolidation, marks.atelectasis (masks), marks.bullae
    normal.paint_airways       reads changes (airway walls, dilatation, cysts) and marks
    normal.paint_heart         heart_part: HeartPart (its box, surface distance, coronary centrelines)
    bones.paint_bones          sternum: Sternum (manubrium and xiphoid heights); bone mask when masks are asked for
    "dense" painters           canvas.dense and canvas.metal, painted after the blur
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.errors import UserError
from engine.labels import LABEL_INDEX, LOBES, Finding
from engine.phantom.anatomy import Anatomy, Heart
from engine.phantom.canvas import Canvas
from engine.phantom.findings import finding_rng
from engine.phantom.grid import Box, Grid, path_segments


@dataclass
class FindingsByLabel:
    """The study's findings grouped by label, each with its own random stream (finding_rng)."""
    items: dict[str, list[tuple[Finding, np.random.Generator]]]

    @classmethod
    def build(cls, findings: list[Finding], seed: int) -> "FindingsByLabel":
        items: dict[str, list[tuple[Finding, np.random.Generator]]] = {}
        for f in findings:
            if not isinstance(f, Finding):
                raise UserError("Each phantom finding must be an engine.labels.Finding record.")
            if f.label not in LABEL_INDEX:
                raise UserError(f"Unknown label {f.label!r} in a phantom finding.")
            items.setdefault(f.label, []).append((f, finding_rng(seed, f.label, len(items.get(f.label, [])))))
        return cls(items)

    def of(self, label: str) -> list[tuple[Finding, np.random.Generator]]:
        return self.items.get(label, [])

    def has(self, label: str) -> bool:
        return label in self.items

    def has_kind(self, label: str, kind: str) -> bool:
        return any(f.kind == kind for f, _ in self.of(label))


@dataclass
class AnatomyChanges:
    """What findings change in the normal anatomy, set by the "setup" painters before anything is painted.

    ctr: cardiothoracic ratio of an enlarged heart (None: the seed's own); pericardial_mm: effusion rim (mm);
    enlarged_nodes: (centre (3,) mm, short axis mm, long-axis direction (3,)); airway_walls: side -> (region function
    of points, wall factor); dilated_airways: side -> [(region function, calibre factor, kind)]; airway_cysts:
    (finding, rng) of cystic bronchiectasis, drawn with the airways.
    """
    ctr: float | None = None
    pericardial_mm: float = 0.0
    enlarged_nodes: list[tuple[np.ndarray, float, np.ndarray]] = field(default_factory=list)
    airway_walls: dict[str, tuple] = field(default_factory=dict)
    dilated_airways: dict[str, list[tuple]] = field(default_factory=dict)
    airway_cysts: list[tuple[Finding, np.random.Generator]] = field(default_factory=list)


@dataclass
class Body:
    """Written by normal.paint_body. dout: outward distance (mm) from the cavity wall (< 0 inside), (z, y, x);
    phi: angle around the cavity centre (0 posterior midline, pi anterior), (1, y, x); mask: inside the body;
    cav: inside the thoracic/abdominal cavity; zd: diaphragm height (mm), (1, y, x); below: under the diaphragm;
    stomach_c: the stomach's centre (x, y, z) mm."""
    dout: np.ndarray
    phi: np.ndarray
    mask: np.ndarray
    cav: np.ndarray
    zd: np.ndarray
    below: np.ndarray
    stomach_c: np.ndarray | None = None


@dataclass
class Lungs:
    """Written by normal.paint_lungs. lung: lung voxels; right: x < 2 mm; lobe: LOBES index per voxel (None when no
    finding needs lobes); vessel_occ / oesophagus_occ: occupancies of the mediastinal tubes; parenchyma: the lung
    density being painted (only while the "parenchyma" painters run)."""
    lung: np.ndarray
    right: np.ndarray
    lobe: np.ndarray | None
    vessel_occ: np.ndarray
    oesophagus_occ: np.ndarray
    parenchyma: np.ndarray | None = None

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


def lung_region_fn(anat: Anatomy, side, lobe):
    """Point-wise version of Lungs.region: a function P (N, 3) mm -> bool (needs only the anatomy)."""
    def fn(P):
        x = P[:, 0]
        if lobe in LOBES:
            return anat.lobe_index(x, P[:, 1], P[:, 2]) == LOBES.index(lobe)
        if side == "right":
            return x < 0
        if side == "left":
            return x >= 0
        return np.ones(len(P), bool)
    return fn


@dataclass
class LungMarks:
    """What the lung painters leave for later steps: vessel_scale (mosaic attenuation), consolidation and
    atelectasis occupancy masks (air bronchograms, hidden airways), bullae ((centre, radius mm), drawn last)."""
    vessel_scale: np.ndarray | None = None
    consolidation: np.ndarray | None = None
    atelectasis: np.ndarray | None = None
    bullae: list[tuple[np.ndarray, float]] = field(default_factory=list)


@dataclass
class HeartPart:
    """Written by normal.paint_heart: the heart's grid box, the myocardial surface distance (mm) in it, and the
    coronary centrelines (name -> (K, 3) mm)."""
    box: Box
    surface_d: np.ndarray
    coronaries: dict[str, np.ndarray]


@dataclass
class Sternum:
    """Written by normal.paint_bones: heights (z, mm) of the manubrium's top and of the xiphoid."""
    z_manubrium: float
    z_xiphoid: float


@dataclass
class Scene:
    """One rendering of (anatomy, findings) on a grid. The parts after `canvas` are filled by the render steps."""
    anat: Anatomy
    grid: Grid
    seed: int
    findings: FindingsByLabel
    changes: AnatomyChanges
    heart: Heart
    paths: dict[str, tuple[np.ndarray, np.ndarray]]
    canvas: Canvas
    want_masks: bool = False
    body: Body | None = None
    lungs: Lungs | None = None
    marks: LungMarks = field(default_factory=LungMarks)
    heart_part: HeartPart | None = None
    sternum: Sternum | None = None
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    segment_cache: dict[str, tuple] = field(default_factory=dict)

    def segments(self, names) -> list[tuple]:
        """Tube segments (p0, p1, r0, r1) of named mediastinal paths (cached per scene)."""
        for name in names:
            if name not in self.segment_cache:
                self.segment_cache[name] = path_segments(*self.paths[name])
        return [self.segment_cache[name] for name in names]

    def tube_occ(self, names, **kwargs):
        """Occupancy of named mediastinal paths (Canvas.tube_occ's keyword arguments)."""
        return self.canvas.tube_occ(self.segments(names), **kwargs)

    def lung_box(self) -> Box:
        """The grid box that holds both lungs."""
        a = self.anat
        return self.grid.box((-a.cav_a, a.cav_cy - a.cav_b, a.z_dome_l - 80.0), (a.cav_a, a.cav_cy + a.cav_b, a.z_apex))

