"""Rendering: the render steps in their order, the scanner (noise, blur), the dense layer, masks, and the public
render_phantom / phantom_masks / make_study, and
finding_masks (where each focal finding is drawn)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from engine.errors import UserError
from engine.labels import FOCAL_LABELS, LOBES, Finding, check_labels
from engine.phantom.anatomy import Anatomy, heart_geometry, sample_anatomy, vessel_paths
from engine.phantom.bones import paint_bones
from engine.phantom.canvas import Canvas
from engine.phantom.findings import sample_findings
from engine.phantom.grid import Grid, blur_noise_factor, resolve_grid
from engine.phantom.label_table import sample_label_set
from engine.phantom.normal import (paint_airways, paint_body, paint_heart, paint_lung_vessels, paint_lungs,
                                   paint_mediastinum)
from engine.phantom.painters import paint_bullae, paint_findings, run_setup_painters
from engine.phantom.scene import FindingsByLabel, Scene
from engine.volume import DEMO_SHAPE_ZYX, Volume

BLUR_SIGMA_ZYX = (0.35, 0.45, 0.45)   # the scanner's point-spread, voxels (z, y, x)
# What a seed renders, as a number: raised whenever a drawing changes, so that every cache of rendered phantoms
# (training/ctclip_data.CachePlan, training/x2ct_data.DRRPlan) records which phantom it holds and refuses or rebuilds
# another. 1: the phantom up to 2026-12-01; 2: fibrotic sequelae drawn as pleural-based bands with tags and
# subpleural reticulation at every severity (painters.fibrotic_sequela).
PHANTOM_REVISION = 2


def build_scene(anat: Anatomy, grid: Grid, findings: list[Finding], seed: int, want_masks: bool = False) -> Scene:
    """The scene of one rendering: findings checked and grouped, their setup painters run, the heart sized."""
    by_label = FindingsByLabel.build(findings, int(seed))
    changes = run_setup_painters(anat, by_label)
    heart = heart_geometry(anat, changes.ctr)
    return Scene(anat=anat, grid=grid, seed=int(seed), findings=by_label, changes=changes, heart=heart,
                 paths=vessel_paths(anat, heart), canvas=Canvas(grid), want_masks=want_masks)


def render_scene(sc: Scene, noise: bool, timings: dict[str, float] | None = None) -> np.ndarray:
    """Paint the scene into sc.canvas.hu and return it: float32 HU (z, y, x). Each step's part is assigned here, so
    the order below is the order of reading (engine/phantom/scene.py lists who writes what).

    timings: if given, seconds spent per step are added to it (bench/bench_phantom.py prints them)."""
    clock = [time.perf_counter()]

    def tick(name):
        now = time.perf_counter()
        if timings is not None:
            timings[name] = timings.get(name, 0.0) + now - clock[0]
        clock[0] = now

    sc.body = paint_body(sc)
    tick("body")
    sc.lungs = paint_lungs(sc)                          # runs the "parenchyma" painters
    tick("lungs")
    paint_lung_vessels(sc)
    tick("lung vessels")
    paint_findings(sc, "lung")
    paint_bullae(sc)
    tick("lung findings")
    paint_airways(sc)
    tick("airways")
    paint_findings(sc, "pleura")
    tick("pleura")
    sc.heart_part = paint_heart(sc)
    tick("heart")
    paint_mediastinum(sc)                               # runs the "mediastinum" painters
    tick("mediastinum")
    sc.sternum = paint_bones(sc)
    tick("bones")
    paint_findings(sc, "dense")
    tick("calcium and metal")
    _scan(sc, noise, tick)
    if sc.want_masks:
        collect_masks(sc)
    return sc.canvas.hu


def _scan(sc: Scene, noise: bool, tick):
    """The scanner: noise (correlated by the blur, like reconstructed CT noise), point-spread blur, then the dense
    layer, metal streaks and the scanner's HU range."""
    cv = sc.canvas
    if noise:
        nrng = np.random.default_rng(np.random.SeedSequence([sc.seed, 2]))
        gain = sc.anat.noise_sd / blur_noise_factor(BLUR_SIGMA_ZYX)
        cv.hu += nrng.standard_normal(sc.grid.shape, dtype=np.float32) * np.float32(gain)
    tick("noise")
    cv.hu = ndimage.gaussian_filter(cv.hu, BLUR_SIGMA_ZYX, mode="nearest", truncate=3.0)
    tick("blur")
    out = cv.hu.reshape(-1)
    for flat, occ, value in cv.dense:
        cur = out[flat]
        np.maximum.at(out, flat, cur + occ * (np.float32(value) - cur))
    _metal_streaks(sc, np.random.default_rng(np.random.SeedSequence([sc.seed, 4])))
    np.clip(cv.hu, -1024.0, 3071.0, out=cv.hu)
    tick("dense layer")


def _metal_streaks(sc: Scene, rng):
    """Streak artefacts around metal: bright and dark lines through each metal cluster, slice by slice."""
    if not sc.canvas.metal:
        return
    g = sc.grid
    k, j, i = np.unravel_index(np.concatenate(sc.canvas.metal), g.shape)
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
        sc.canvas.hu[kk, b.sl[1], b.sl[2]] += (amount * streak * np.exp(-r / 45.0)).astype(np.float32)


def collect_masks(sc: Scene):
    """The anatomy masks of phantom_masks into sc.masks (bone was added by the bones step)."""
    m, lungs, body = sc.masks, sc.lungs, sc.body
    m["body"] = body.mask.copy()
    m["lungs"] = lungs.lung.copy()
    m["lung_right"] = lungs.lung & lungs.right
    m["lung_left"] = lungs.lung & ~lungs.right
    for i, name in enumerate(LOBES):
        m[name] = lungs.lung & (lungs.lobe == i)
    heart = np.zeros(sc.grid.shape, bool)
    heart[sc.heart_part.box.sl] = sc.heart_part.surface_d < sc.heart.fat
    m["heart"] = heart
    m["aorta"] = sc.tube_occ(["aorta"]) > 0.5
    m["peripheral_lung"] = lungs.lung & (body.dout > -20.0)
    cv = sc.canvas
    m["mediastinum"] = body.cav & ~lungs.lung & ~body.below & (cv.Z < sc.anat.apex_z(cv.X, cv.Y))


def render_phantom(findings: list[Finding], seed: int, shape_zyx=DEMO_SHAPE_ZYX, spacing_xyz=None,
                   noise: bool = True) -> Volume:
    """The phantom's chest CT for (findings, seed) on a grid: float32 HU (z, y, x), LPS, spacing (x, y, z) mm.

    shape_zyx: voxels (z, y, x), default the demo grid 64 x 128 x 128. spacing_xyz: mm (x, y, z); None keeps the
    physical field of view 350 x 350 x 300 mm whatever the shape (FOV / shape). noise: add CT noise (SD 10-22 HU,
    per seed); without it the volume is the noise-free (still blurred) image. Deterministic in all arguments.
    """
    grid = resolve_grid(shape_zyx, spacing_xyz)
    scene = build_scene(sample_anatomy(int(seed)), grid, list(findings), int(seed))
    array = render_scene(scene, bool(noise))
    return Volume(array=array, spacing=grid.spacing, origin=grid.origin, source=f"phantom seed {int(seed)}")


def phantom_masks(seed: int, shape_zyx=DEMO_SHAPE_ZYX, spacing_xyz=None,
                  findings: list[Finding] | None = None) -> dict[str, np.ndarray]:
    """Boolean (z, y, x) masks of the anatomy of `seed` on a grid (normal study unless findings are given):
    body, lungs, lung_right, lung_left, the six lobes (names of engine.labels.LOBES), heart (incl. epicardial fat),
    aorta, bone, peripheral_lung (within 20 mm of the costal pleura), mediastinum."""
    grid = resolve_grid(shape_zyx, spacing_xyz)
    scene = build_scene(sample_anatomy(int(seed)), grid, list(findings or []), int(seed), want_masks=True)
    render_scene(scene, False)
    return scene.masks


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
    labels, findings, rng = study_findings(seed, labels)
    volume = render_phantom(findings, seed, shape_zyx=shape_zyx, spacing_xyz=spacing_xyz)
    report = None
    if with_report:
        from engine.report_writer import write_report   # written alongside; imported only when a report is asked for

        report = write_report(findings, rng)
    return PhantomStudy(seed=int(seed), labels=labels, findings=findings, volume=volume, report=report)


def study_findings(seed: int, labels: list[str] | None = None) -> tuple[list[str], list[Finding], np.random.Generator]:
    """make_study's draws: (labels in CT-CLIP order, findings, the generator the report continues from). Labels None:
    drawn from CT-RATE's label table. A cached study's findings come back from its seed (and labels, if given)."""
    rng = np.random.default_rng(int(seed))
    if labels is None:
        labels = sample_label_set(rng)
    try:
        labels = check_labels(labels)
    except ValueError as err:
        raise UserError(str(err)) from None
    return labels, sample_findings(labels, rng), rng


def finding_masks(seed: int, findings: list[Finding], labels=FOCAL_LABELS, shape_zyx=DEMO_SHAPE_ZYX,
                  spacing_xyz=None, min_change_hu: float = 30.0) -> dict[str, np.ndarray]:
    """Boolean (z, y, x) mask of where each of `labels` present in `findings` is drawn: the voxels whose noise-free
    HU changes by at least `min_change_hu` when that label's findings are left out (same seed, same grid). The
    phantom's random streams are per label, so leaving one label out changes only its own lesion and the tissue it
    displaces (a pleural effusion's compressed lung is part of its mask). Labels absent from `findings` get no key.
    One noise-free render plus one per present label (about 0.3 s each on the demo grid)."""
    present = [label for label in labels if any(f.label == label for f in findings)]
    if not present:
        return {}
    full = render_phantom(findings, seed, shape_zyx, spacing_xyz, noise=False)
    out = {}
    for label in present:
        without = render_phantom([f for f in findings if f.label != label], seed, shape_zyx, spacing_xyz, noise=False)
        out[label] = np.abs(full.array - without.array) >= np.float32(min_change_hu)
    return out
