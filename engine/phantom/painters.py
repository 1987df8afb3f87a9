"""One painter per CT-RATE label, in a table keyed by label name (PAINTERS).

Each painter is called once per finding of its label with the finding's own random stream, at the render step its
entry names, and reads the scene parts its entry lists (engine/phantom/scene.py says which step writes each part):

- "setup" painters run before anything is painted and change the normal anatomy: paint(changes, anat, f, rng)
  writes fields of AnatomyChanges (heart size, pericardial rim, enlarged nodes, airway walls and calibres);
- every other painter is paint(scene, f, rng) and paints into the canvas (or, at "parenchyma", into the lung
  density before it is copied into the lungs), or leaves marks for later steps (scene.marks).

Within a step, painters run in the table's order (that order is the painting order), each over its label's
findings in the order given. At the demo grid (2.7 mm in-plane, 4.7 mm slices) fine findings are drawn
bolder than life so that they stay measurable; each place where this happens says so.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from engine.errors import UserError
from engine.labels import LABELS, LOBES, Finding
from engine.phantom.anatomy import Anatomy, lymph_station_centres, sample_lung_points
from engine.phantom.findings import finding_lung, finding_sides, severity_level
from engine.phantom.grid import occupancy_volume, path_segments, rasterize_tubes, smooth_noise, smoothstep
from engine.phantom.hu import HU, HU_BY_SEVERITY, HU_RANGE
from engine.phantom.scene import AnatomyChanges, FindingsByLabel, Scene, lung_region_fn

F32 = np.float32


# ------------------------------------------------------------------ setup: changes of the normal anatomy

def cardiomegaly(changes: AnatomyChanges, anat: Anatomy, f: Finding, rng):
    """An enlarged heart: cardiothoracic ratio 0.55-0.59 / 0.60-0.65 / 0.66-0.72 by severity."""
    changes.ctr = rng.uniform(*((0.55, 0.59), (0.60, 0.65), (0.66, 0.72))[severity_level(f)])


def pericardial_effusion(changes: AnatomyChanges, anat: Anatomy, f: Finding, rng):
    """A fluid rim of size_mm (default 6 / 12 / 20 mm by severity) around the heart."""
    changes.pericardial_mm = float(f.size_mm or (6.0, 12.0, 20.0)[severity_level(f)])


def lymphadenopathy(changes: AnatomyChanges, anat: Anatomy, f: Finding, rng):
    """One or two enlarged nodes (short axis size_mm, default 15 mm) at each of the finding's stations."""
    centres = lymph_station_centres(anat)
    size = float(f.size_mm or 15.0)
    for st in (f.stations or ("subcarinal",)):
        if st not in centres:
            continue
        for k in range(int(rng.integers(1, 3))):
            short = size * (1.0 if k == 0 else rng.uniform(0.6, 0.9))
            changes.enlarged_nodes.append((centres[st] + rng.normal(0, 3.0 + 3.0 * k, 3), short, rng.normal(size=3)))


def peribronchial_thickening(changes: AnatomyChanges, anat: Anatomy, f: Finding, rng):
    """Thicker bronchial walls (x 2.2 / 3.0 / 4.0 by severity) in the finding's sides or lobe."""
    factor = (2.2, 3.0, 4.0)[severity_level(f)]
    for s in finding_sides(f.side):
        changes.airway_walls[s] = (lung_region_fn(anat, s, f.lobe), factor)


def bronchiectasis(changes: AnatomyChanges, anat: Anatomy, f: Finding, rng):
    """Dilated bronchi (x 1.5 / 1.9 / 2.4 by severity) in the finding's lobe; cystic ones also get cysts."""
    s = finding_lung(f)
    k = (1.5, 1.9, 2.4)[severity_level(f)]
    changes.dilated_airways.setdefault(s, []).append((lung_region_fn(anat, s, f.lobe), k, f.kind or "cylindrical"))
    if f.kind == "cystic":
        changes.airway_cysts.append((f, rng))


def paint_airway_cysts(sc: Scene, f: Finding, rng, wall_occ, lumen_occ):
    """Cysts at the ends of small bronchi of the finding's lobe, added to the airways' wall and lumen occupancies."""
    sev = severity_level(f)
    side = finding_lung(f)
    t = sc.anat.trees[f"{side} airways"]
    sel = lung_region_fn(sc.anat, side, f.lobe)(t.p1) & (t.n <= 3)
    idx = np.flatnonzero(sel)
    if idx.size == 0:
        return
    pick = idx[rng.integers(idx.size, size=(4, 8, 14)[sev])]
    c = t.p1[pick]
    r = rng.uniform(4.0, 8.0, len(c))
    g = sc.grid
    occupancy_volume(g, *rasterize_tubes(g, c, c, r + 1.2, r + 1.2), out=wall_occ)
    occupancy_volume(g, *rasterize_tubes(g, c, c, r, r), out=lumen_occ)


# ------------------------------------------------------------------ parenchyma: the lung density

def emphysema(sc: Scene, f: Finding, rng):
    """Centrilobular holes or paraseptal (subpleural) holes in the upper zones (lower with severity); bullae are
    queued in marks.bullae and drawn after the lung findings (paint_bullae)."""
    a, sev, lungs, cv = sc.anat, severity_level(f), sc.lungs, sc.canvas
    par, dout = lungs.parenchyma, sc.body.dout
    z_low = (a.z_carina - 5.0, a.z_carina - 45.0, a.z_dome_r - 10.0)[sev]
    zone = lungs.region(f.side, None) & (cv.Z > z_low)
    kind = f.kind or "centrilobular"
    per_side = 1 if f.side in (None, "bilateral") else 2
    if kind in ("centrilobular", "paraseptal"):
        if kind == "centrilobular":
            c = cv.points_in(zone, rng, (150, 400, 900)[sev] // per_side)
            r = rng.uniform(3.0, 6.0, len(c))        # holes 6-12 mm across (bold: < -950 HU after the blur)
        else:
            c = cv.points_in(zone & (dout > -8.0), rng, (50, 110, 200)[sev] // per_side)
            r = rng.uniform(4.0, 8.0, len(c))
        occ = occupancy_volume(sc.grid, *rasterize_tubes(sc.grid, c, c, r, r))
        par += occ * (F32(HU["air"]) - par)
        if kind == "centrilobular" and sev == 2:
            par -= 25.0 * zone
    if kind == "bullous" or (kind == "paraseptal" and sev == 2):
        d = float(f.size_mm or 40.0)
        for s in finding_sides(f.side):
            for _ in range((1, 2, 4)[sev]):
                r = d / 2 * rng.uniform(0.7, 1.0)
                band = lungs.region(s, None) & (cv.Z > a.z_carina - 30.0) & (dout > -(r + 4.0)) & (dout < -(r - 4.0))
                c = cv.points_in(band, rng, 1)
                if len(c):
                    sc.marks.bullae.append((c[0], r))


def paint_bullae(sc: Scene):
    """The bullae emphysema queued: air with a thin wall (bold: 1 voxel), inside the lungs."""
    for c, r in sc.marks.bullae:
        b = sc.canvas.box_around(c, (r + 6, r + 6, r + 6))
        dist = np.sqrt((b.x - c[0]) ** 2 + (b.y - c[1]) ** 2 + (b.z - c[2]) ** 2)
        inside = sc.lungs.lung[b.sl]
        view = sc.canvas.hu[b.sl]
        h = sc.grid.h
        wall = np.clip(1.0 - np.abs(dist - r) / h, 0.0, 1.0) * 0.45
        view += (wall * (F32(HU["bulla wall"]) - view)) * inside
        air = np.clip((r - dist) / h + 0.5, 0.0, 1.0)
        view += (air * (F32(HU["air"]) - view)) * inside


def mosaic_attenuation(sc: Scene, f: Finding, rng):
    """Lobular patches denser (+110 / +160 / +220 HU by severity) and lucent (-30 HU, with thinner vessels)."""
    sev = severity_level(f)
    lb = sc.lung_box()
    s = np.clip(smooth_noise(rng, sc.grid, lb, 22.0) / 0.35, -1.0, 1.0)
    dense = F32((110.0, 160.0, 220.0)[sev])              # HU shifts of the lung density, not tissue values
    delta = np.where(s > 0, s * dense, s * 30.0) * sc.lungs.region(f.side, None)[lb.sl]
    sc.lungs.parenchyma[lb.sl] += delta
    vs = np.ones(sc.grid.shape, np.float32)
    vs[lb.sl] = np.where(s < 0, 1.0 + 0.45 * s, 1.0)                      # thinner vessels in lucent lobules
    sc.marks.vessel_scale = vs if sc.marks.vessel_scale is None else sc.marks.vessel_scale * vs


def lung_opacity(sc: Scene, f: Finding, rng):
    """Ground-glass patches in the finding's side or lobe (diffuse ones favour the periphery and the bases)."""
    a, sev = sc.anat, severity_level(f)
    lb = sc.lung_box()
    n = smooth_noise(rng, sc.grid, lb, 30.0)
    reg = sc.lungs.region(f.side, f.lobe)[lb.sl]
    if f.lobe is None:
        n = n + 0.5 * np.clip(1.0 + sc.body.dout[lb.sl] / 30.0, 0.0, 1.0) \
            + 0.4 * np.clip((a.z_carina - lb.z) / 100.0, -0.5, 1.0)
    amt = smoothstep((n - (0.9, 0.4, -0.1)[sev]) / 0.5) * reg
    target = F32(HU_BY_SEVERITY["ground-glass opacity"][sev])
    view = sc.lungs.parenchyma[lb.sl]
    view += amt * (target - view)


def lung_nodule(sc: Scene, f: Finding, rng):
    """A lobulated sphere of size_mm (default 8 mm; bold: at least 2.4 voxels across at the demo grid) in the
    finding's lobe: ground-glass into the lung density ("parenchyma"), solid into the canvas ("lung")."""
    d = float(f.size_mm or 8.0)
    r = max(d / 2.0, min(1.2 * sc.grid.h, 8.0))
    lobes = (f.lobe,) if f.lobe in LOBES else None
    side = finding_lung(f)
    try:
        c = sample_lung_points(sc.anat, sc.heart, rng, 1, side, lobes=lobes, margin=r + 2.0)[0]
    except UserError:                             # a big nodule in a small lobe: let it reach the pleura
        c = sample_lung_points(sc.anat, sc.heart, rng, 1, side, lobes=lobes, margin=2.0)[0]
    k = int(rng.integers(0, 3)) if d >= 8 else 0   # lobulated: a main sphere and a few satellites on its surface
    dirs = rng.normal(size=(k, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True) + 1e-9
    cs = np.vstack([c, c + dirs * r * 0.55])
    rs = np.r_[r, np.full(k, r * 0.55)]
    occ = occupancy_volume(sc.grid, *rasterize_tubes(sc.grid, cs, cs, rs, rs))
    if f.kind == "ground-glass":
        par = sc.lungs.parenchyma
        par += occ * (F32(HU["ground glass"]) - par)
    else:
        sc.canvas.blend(occ, HU["solid nodule"], where=sc.lungs.lung)



# ------------------------------------------------------------------ lung: findings painted over the lungs

def atelectasis(sc: Scene, f: Finding, rng):
    """Plate-like bands (bold: 5 mm thick) or a dependent segmental wedge (marks.atelectasis) in the finding's lobe."""
    a, sev, cv = sc.anat, severity_level(f), sc.canvas
    side = finding_lung(f)
    reg = sc.lungs.region(side, f.lobe)
    if not reg.any():
        return
    if (f.kind or "segmental") != "plate-like":
        m = _cone_opacity(sc, side, rng, reg, half_angle=(14.0, 20.0, 28.0)[sev], value=HU["atelectasis"],
                          dependent=True, fuzz=0.1)
        sc.marks.atelectasis = _merge(sc.marks.atelectasis, m)
        return
    for _ in range((1, 2, 3)[sev]):
        c = cv.points_in(reg & (cv.Z < a.z_carina - 30.0), rng, 1)
        if not len(c):
            c = cv.points_in(reg, rng, 1)
        c = c[0]
        tilt = rng.uniform(0.35, 0.8)                           # 20-45 degrees from horizontal
        az = rng.uniform(0, 2 * np.pi)
        nrm = np.array([np.sin(tilt) * np.cos(az), np.sin(tilt) * np.sin(az), np.cos(tilt)])
        R = (18.0, 26.0, 34.0)[sev]
        b = cv.box_around(c, (R + 5, R + 5, R + 5))
        dx, dy, dz = b.x - c[0], b.y - c[1], b.z - c[2]
        dn = dx * nrm[0] + dy * nrm[1] + dz * nrm[2]
        dt = np.sqrt(np.maximum(dx * dx + dy * dy + dz * dz - dn * dn, 0.0))
        h = sc.grid.h
        occ = np.clip((2.5 - np.abs(dn)) / h + 0.5, 0, 1) * np.clip((R - dt) / h + 0.5, 0, 1)
        view = cv.hu[b.sl]
        view += occ * reg[b.sl] * (F32(HU["atelectatic band"]) - view)


def _merge(prev, m):
    """Max-combine an occupancy mask into a mark (None: nothing yet)."""
    if m is None:
        return prev
    return m if prev is None else np.maximum(prev, m)


def _cone_opacity(sc: Scene, side: str, rng, reg, half_angle, value, dependent, fuzz, halo=0.0):
    """A wedge (cone from the hilum of `side` towards a peripheral target) of the region: segmental/lobar density
    of `value` HU, with a ground-glass halo when halo > 0. Returns its occupancy (z, y, x), None when no target."""
    a, cv, g = sc.anat, sc.canvas, sc.grid
    hilum = sc.paths[f"{side} main bronchus"][0][-1]
    cand = reg & (sc.body.dout > -15.0)
    if dependent:
        cand &= cv.Y > (a.cav_cy + 0.2 * a.cav_b)
    tgt = cv.points_in(cand if cand.any() else reg, rng, 1)
    if not len(tgt):
        return None
    axis = tgt[0] - hilum
    axis /= np.linalg.norm(axis)
    lb = sc.lung_box()
    dx, dy, dz = lb.x - hilum[0], lb.y - hilum[1], lb.z - hilum[2]
    dist = np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-3
    cosang = (dx * axis[0] + dy * axis[1] + dz * axis[2]) / dist
    ang = np.degrees(np.arccos(np.clip(cosang, -1, 1)))
    score = (half_angle - ang) / half_angle + 0.4 * np.clip((dist - 20.0) / 30.0, -1, 0)
    if fuzz:
        score = score + fuzz * smooth_noise(rng, g, lb, 12.0)
    m = np.zeros(g.shape, np.float32)
    m[lb.sl] = smoothstep(score / 0.12) * reg[lb.sl]
    if halo:
        ggo = smoothstep((score + halo) / 0.12) * reg[lb.sl] * (1 - m[lb.sl])
        view = cv.hu[lb.sl]
        view += ggo * (F32(HU["ground glass"]) - view)
    tex = F32(value) + 6.0 * (smooth_noise(rng, g, lb, 8.0) if fuzz else 0.0)
    view = cv.hu[lb.sl]
    view += m[lb.sl] * (tex - view)
    return m


def consolidation(sc: Scene, f: Finding, rng):
    """A wedge of consolidation with a ground-glass halo in the finding's lobe (marks.consolidation: air
    bronchograms)."""
    sev = severity_level(f)
    side = finding_lung(f)
    reg = sc.lungs.region(side, f.lobe)
    if not reg.any():
        reg = sc.lungs.region(side, None)
    m = _cone_opacity(sc, side, rng, reg, half_angle=(16.0, 26.0, 45.0)[sev], value=HU["consolidation"],
                      dependent=rng.random() < 0.6, fuzz=0.25, halo=0.25)
    sc.marks.consolidation = _merge(sc.marks.consolidation, m)


def fibrotic_sequela(sc: Scene, f: Finding, rng):
    """Post-inflammatory fibrotic sequelae in the finding's lobe: straight parenchymal bands that start on the pleura
    and run into the lobe at an angle of their own (not towards the hilum, as vessels do), each with a soft-tissue
    pleural tag where it meets the pleura, over subpleural reticulation. Bold at the demo grid: bands 4.4-5.6 mm
    thick and 25-50 mm long (real bands are 1-3 mm thick, 2-5 cm long), tags 8 mm across; drawn thinner, a band is
    a few partial-volume voxels among the vessels, which no encoder here could tell apart (docs/training.md)."""
    sev, cv, g = severity_level(f), sc.canvas, sc.grid
    side = finding_lung(f)
    reg = sc.lungs.region(side, f.lobe)
    if not reg.any():
        reg = sc.lungs.region(side, None)
    k, j, i = np.nonzero(reg)
    centre = np.array([cv.X[0, 0, i].mean(), cv.Y[0, j, 0].mean(), cv.Z[k, 0, 0].mean()])   # the lobe's centroid, mm
    starts = cv.points_in(reg & (sc.body.dout > -4.0), rng, (4, 6, 9)[sev])
    p0, p1, r0 = [], [], []
    for s in starts:
        d = centre - s
        d /= np.linalg.norm(d) + 1e-6
        d = d + rng.normal(0, 0.6, 3)
        d /= np.linalg.norm(d)
        r = rng.uniform(2.2, 2.8)
        p0 += [s, s]
        p1 += [s + d * rng.uniform(25.0, 50.0), s]       # the band, and its pleural tag (a sphere)
        r0 += [r, 4.0]
    if p0:
        r0 = np.array(r0)
        occ = occupancy_volume(g, *rasterize_tubes(g, np.array(p0), np.array(p1), r0, r0))
        cv.blend(occ, HU["fibrotic band"], where=reg)
    lb = sc.lung_box()
    nfield = smooth_noise(rng, g, lb, 9.0)
    w = (0.12, 0.16, 0.22)[sev]
    depth = (12.0, 18.0, 24.0)[sev]
    line = np.clip(1.0 - np.abs(nfield) / w, 0.0, 1.0) * (sc.body.dout[lb.sl] > -depth) * reg[lb.sl]
    view = cv.hu[lb.sl]
    view += 0.8 * line * (F32(HU["reticulation"]) - view)


def septal_thickening(sc: Scene, f: Finding, rng):
    """A network of septal lines (bold: 2-3 mm at the demo grid) in the periphery, basal predominant."""
    a, sev = sc.anat, severity_level(f)
    lb = sc.lung_box()
    reg = sc.lungs.region(f.side, None)[lb.sl]
    depth = (14.0, 22.0, 32.0)[sev]
    zone = smoothstep((sc.body.dout[lb.sl] + depth) / 6.0) * reg
    zone = zone * np.clip((a.z_carina + 20.0 - lb.z) / 40.0, 0.25 * sev, 1.0)   # basal predominance
    nfield = smooth_noise(rng, sc.grid, lb, 11.0)
    line = np.clip(1.0 - np.abs(nfield) / (0.13, 0.17, 0.21)[sev], 0.0, 1.0) * zone
    view = sc.canvas.hu[lb.sl]
    view += line * (F32(HU_BY_SEVERITY["septal lines"][sev]) - view)


# ------------------------------------------------------------------ pleura and mediastinum

def pleural_effusion(sc: Scene, f: Finding, rng):
    """A dependent (posterior) crescent of fluid, size_mm deep (default 15 / 30 / 55 mm), with a band of compressed
    lung along its margin, on each side of the finding."""
    a, sev, body = sc.anat, severity_level(f), sc.body
    size = float(f.size_mm or (15.0, 30.0, 55.0)[sev])
    for side in finding_sides(f.side):
        lb = sc.lung_box()
        reg = sc.lungs.region(side, None)[lb.sl]
        cphi = np.cos(body.phi[:, lb.sl[1], lb.sl[2]])
        k = 0.15 + 0.2 * sev
        w = np.clip((cphi + k) / (1.0 + k), 0.0, 1.0) ** 0.8
        z_base = (a.z_dome_r if side == "right" else a.z_dome_l) - 15.0
        hz = np.clip(1.0 - (lb.z - z_base) / (2.5 * size + 40.0), 0.0, 1.0) ** 0.6
        t = size * w * hz
        depth = -body.dout[lb.sl]
        above_d = lb.z - body.zd[:, lb.sl[1], lb.sl[2]]
        t = np.maximum(t, np.where(above_d < 0.4 * size, 0.6 * size * np.clip(cphi + 0.6, 0, 1), 0.0))
        fluid = smoothstep((t - depth) / 3.0) * reg
        view = sc.canvas.hu[lb.sl]
        rim = smoothstep((t + 4.0 + 3.0 * sev - depth) / 3.0) * reg * (1 - fluid) * (t > 2.0)
        view += rim * (F32(HU_BY_SEVERITY["compressed lung"][sev]) - view)
        view += fluid * (F32(HU["pleural fluid"]) - view)


def hiatal_hernia(sc: Scene, f: Finding, rng):
    """A sac of size_mm (default 45 mm) above the hiatus with an air-fluid level, and its neck to the stomach."""
    a, cv, g = sc.anat, sc.canvas, sc.grid
    r = float(f.size_mm or 45.0) / 2.0
    zc_ = float(a.diaphragm_z(12.0, a.y_spine(a.z_dome_l) - a.vb_ry - 25.0)) + 0.75 * r
    c = np.array([rng.uniform(4.0, 16.0), a.y_spine(zc_) - a.vb_ry - 6.0 - 0.8 * r, zc_])
    semi = np.array([r, 0.8 * r, 0.9 * r])
    b = cv.box_around(c, semi + 6)
    q = np.sqrt(((b.x - c[0]) / semi[0]) ** 2 + ((b.y - c[1]) / semi[1]) ** 2 + ((b.z - c[2]) / semi[2]) ** 2)
    view = cv.hu[b.sl]
    hh = g.h / r
    sac = np.clip((1.0 - q) / hh + 0.5, 0, 1)
    view += sac * (F32(HU["muscle"]) - view)
    inner = np.clip((1.0 - 3.5 / r - q) / hh + 0.5, 0, 1)                # 3.5 mm wall
    level = c[1] - rng.uniform(-0.1, 0.4) * semi[1]                       # air-fluid level (supine: coronal)
    content = np.where(b.y < level, F32(HU["air"]), F32(HU["hernia fluid"]))
    view += inner * (content - view)
    sc_ = sc.body.stomach_c
    if sc_ is None:                                                        # the grid stops above the stomach
        return
    p0, p1 = c - np.array([0, 0, 0.7 * r]), np.array([sc_[0] * 0.6, sc_[1] + 10.0, sc_[2] + 20.0])
    occ = occupancy_volume(g, *rasterize_tubes(g, p0, p1, 10.0, 10.0))    # the neck through the hiatus
    zc = np.repeat(g.axis("z") < c[2], g.shape[1] * g.shape[2])
    cv.blend(occ, HU["muscle"], where=lambda nz, o: zc[nz])


# ------------------------------------------------------------------ dense: calcium and metal, painted after the blur

def arterial_calcification(sc: Scene, f: Finding, rng):
    """Plaques (arcs of calcium, bold: real plaques are ~1 mm thick) along the aortic wall, mostly arch and
    descending aorta."""
    sev = severity_level(f)
    pts, radii = sc.paths["aorta"]
    p0, p1, r0, _ = path_segments(pts, radii, step_mm=2.0)
    n = len(p0)
    lo = int(0.25 * n)
    cs, rs = [], []
    for _ in range((6, 16, 34)[sev]):
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
            rs.append(rng.uniform(1.4, 2.2))
    cs = np.array(cs)
    sc.canvas.add_dense(cs, cs, np.array(rs), np.array(rs), rng.uniform(*HU_RANGE["aortic plaque"]))


def coronary_calcification(sc: Scene, f: Finding, rng):
    """Calcified spots (bold: 3-5 mm) along the LAD, the LAD and circumflex, or all three coronaries."""
    sev = severity_level(f)
    vessels = {"LAD": ["LAD"], "LAD and circumflex": ["LAD", "LCX"], "three-vessel": ["LAD", "LCX", "RCA"]}.get(
        f.kind or "LAD", ["LAD"])
    for name in vessels:
        path = sc.heart_part.coronaries[name]
        n_spots = (2, 5, 10)[sev]
        idx = rng.integers(0, max(1, int(len(path) * (0.6 if sev < 2 else 0.95))), size=n_spots)
        cs, ce = path[idx], path[np.minimum(idx + (1 if sev == 2 else 0), len(path) - 1)]
        r = rng.uniform(1.6, 2.4, n_spots)
        sc.canvas.add_dense(cs, ce, r, r, rng.uniform(*HU_RANGE["coronary plaque"]))


def medical_material(sc: Scene, f: Finding, rng):
    """Sternotomy wires, a prosthetic valve ring, a pacemaker with two leads, or a port with its catheter."""
    a, cv, paths = sc.anat, sc.canvas, sc.paths
    kind = f.kind or "sternotomy wires"
    if kind == "sternotomy wires":
        z_man, z_xiph = sc.sternum.z_manubrium, sc.sternum.z_xiphoid
        for z in np.linspace(z_xiph + 12.0, z_man - 6.0, int(rng.integers(5, 8))):
            ws = 26.0 if z > z_man - 45.0 else 16.0
            yc = a.cav_cy - a.cav_b * a.cavity_scale(z) - 6.0
            th = np.linspace(0, 2 * np.pi, 25)
            ring = np.stack([0.8 * ws * np.cos(th), yc + 9.0 * np.sin(th), np.full_like(th, z)], 1)
            cv.add_metal(ring[:-1], ring[1:], 1.1, 1.1)                   # bold: 2.2 mm wire
    elif kind == "prosthetic valve":
        pts, _ = paths["aorta"]
        t = pts[1] - pts[0]
        t /= np.linalg.norm(t)
        e1 = np.cross(t, [1.0, 0, 0])
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(t, e1)
        th = np.linspace(0, 2 * np.pi, 25)
        ring = paths["root"][0][0] + 11.0 * a.aorta_scale * (np.cos(th)[:, None] * e1 + np.sin(th)[:, None] * e2)
        cv.add_metal(ring[:-1], ring[1:], 1.8, 1.8)
    elif kind in ("pacemaker", "port catheter"):
        _device(sc, kind, -1.0 if f.side == "right" else 1.0)


def _device(sc: Scene, kind: str, sgn: float):
    """A pacemaker (generator can, leads to the right ventricle and atrium) or a port with its catheter to the right
    atrium, on the side sgn (-1 right, +1 left)."""
    a, cv, paths = sc.anat, sc.canvas, sc.paths
    y_front = a.cav_cy - a.cav_b
    gen = np.array([sgn * 0.5 * a.cav_a, y_front - a.rib_zone - a.muscle - 8.0,
                    a.z_carina + (32.0 if kind == "pacemaker" else 22.0)])
    yt, zc, ra = a.y_tr, a.z_carina, paths["ra"][0][0]
    if kind == "pacemaker":
        # generator can: a flat rounded box in the subcutaneous fat, drawn as a thick short tube
        cv.add_metal(gen - [12.0, 0, 0], gen + [12.0, 0, 0], 9.0, 9.0)
        route = [gen + [-sgn * 10, 4, 4], [sgn * 48, y_front - 4.0, zc + 46.0], [sgn * 26, yt - 22, zc + 36],
                 [-28, yt - 12, zc + 8], ra + [0, 0, 12]]
        for end in (paths["rv_apex"][0][0], ra + [6.0, -12.0, 16.0]):
            cv.add_metal(*path_segments(np.array(route + [end]), np.full(len(route) + 1, 1.0), 3.0))  # bold 2 mm
    else:
        cv.add_metal(gen - [0, 6.0, 0], gen + [0, 6.0, 0], 12.0, 12.0)
        route = np.array([gen + [-sgn * 8, 2, 6], [sgn * 40, y_front - 2.0, zc + 50.0], [sgn * 30, yt - 18, zc + 40],
                          [-28, yt - 12, zc + 10], ra + [0, 0, 18]])
        cv.add_dense(*path_segments(route, np.full(len(route), 1.3), 3.0), HU["catheter"])   # radiopaque catheter


# ------------------------------------------------------------------ the table

@dataclass(frozen=True)
class Painter:
    """How one label is drawn: the render step that calls `paint` (step_by_kind: sub-types drawn at another step)
    and the scene parts it reads."""
    step: str
    paint: Callable
    reads: str
    step_by_kind: dict[str, str] = field(default_factory=dict)

    def step_of(self, f: Finding) -> str:
        return self.step_by_kind.get(f.kind, self.step)


# Steps, in render order: setup, parenchyma, lung, pleura, mediastinum, dense (engine/phantom/render.py).
PAINTERS: dict[str, Painter] = {
    "Medical material": Painter("dense", medical_material, "anat, paths, sternum"),
    "Arterial wall calcification": Painter("dense", arterial_calcification, "paths"),
    "Coronary artery wall calcification": Painter("dense", coronary_calcification, "heart_part.coronaries"),
    "Cardiomegaly": Painter("setup", cardiomegaly, "nothing"),
    "Pericardial effusion": Painter("setup", pericardial_effusion, "nothing"),
    "Hiatal hernia": Painter("mediastinum", hiatal_hernia, "anat, body.stomach_c"),
    "Lymphadenopathy": Painter("setup", lymphadenopathy, "anat (node stations)"),
    "Emphysema": Painter("parenchyma", emphysema, "anat, body.dout, lungs"),
    "Mosaic attenuation pattern": Painter("parenchyma", mosaic_attenuation, "lungs"),
    "Lung opacity": Painter("parenchyma", lung_opacity, "anat, body.dout, lungs"),
    "Lung nodule": Painter("lung", lung_nodule, "anat, heart, lungs", {"ground-glass": "parenchyma"}),
    "Consolidation": Painter("lung", consolidation, "anat, paths, body.dout, lungs"),
    "Atelectasis": Painter("lung", atelectasis, "anat, paths, body.dout, lungs"),
    "Pulmonary fibrotic sequela": Painter("lung", fibrotic_sequela, "paths, body.dout, lungs"),
    "Interlobular septal thickening": Painter("lung", septal_thickening, "anat, body.dout, lungs"),
    "Pleural effusion": Painter("pleura", pleural_effusion, "anat, body (dout, phi, zd), lungs"),
    "Peribronchial thickening": Painter("setup", peribronchial_thickening, "anat (lobes)"),
    "Bronchiectasis": Painter("setup", bronchiectasis, "anat (lobes)"),
}
assert set(PAINTERS) == set(LABELS), "one painter per CT-RATE label"


def run_setup_painters(anat: Anatomy, findings: FindingsByLabel) -> AnatomyChanges:
    """The findings' changes of the normal anatomy (the "setup" painters), before anything is painted."""
    changes = AnatomyChanges()
    for label, painter in PAINTERS.items():
        for f, rng in findings.of(label):
            if painter.step_of(f) == "setup":
                painter.paint(changes, anat, f, rng)
    return changes


def paint_findings(sc: Scene, step: str):
    """Every finding whose painter belongs to `step`, in the table's order."""
    for label, painter in PAINTERS.items():
        for f, rng in sc.findings.of(label):
            if painter.step_of(f) == step:
                painter.paint(sc, f, rng)
