"""The normal anatomy's render steps, from the outside in: body wall and abdomen, lungs, lung vessels, airways, heart,
mediastinum, bones; then the dense layer and metal streaks after the blur. Each step reads the scene parts its
docstring names (see engine/phantom/scene.py for who writes them) and the findings' changes to the normal anatomy.
"""
from __future__ import annotations

import numpy as np

from engine.labels import NODE_STATIONS
from engine.phantom.anatomy import AIRWAYS, MEDIASTINAL_VESSELS, lymph_station_centres
from engine.phantom.grid import occupancy_volume, rasterize_tubes, smooth_noise
from engine.phantom.hu import HU
from engine.phantom.painters import paint_airway_cysts, paint_findings
from engine.phantom.scene import Body, HeartPart, Lungs, Scene

F32 = np.float32


# ------------------------------------------------------------------ body wall and abdomen

def paint_body(sc: Scene) -> Body:
    """Body wall (muscle, fat, breasts, axillary fat), the CT table and the cavity contents. Reads anat, heart,
    changes.pericardial_mm; returns the Body part."""
    a, cv = sc.anat, sc.canvas
    X, Y, Z, hu = cv.X, cv.Y, cv.Z, cv.hu
    dout = a.cavity_dout(X, Y, Z).astype(np.float32)
    phi = np.arctan2(np.abs(X), Y - a.cav_cy).astype(np.float32)            # 0 posterior midline, pi anterior
    cphi, sphi = np.cos(phi), np.sin(phi)
    upper = np.clip((Z - a.z_carina) / 60.0, 0.0, 1.0)
    scap = np.clip((Z - (a.z_t1 - 170.0)) / 40.0, 0.0, 1.0)
    muscle = (a.muscle + 26.0 * np.clip(cphi, 0, 1) ** 4 + 28.0 * upper * sphi ** 2
              + 10.0 * np.clip(-cphi, 0, 1) ** 2 * np.clip((Z - a.z_carina + 70.0) / 60.0, 0.0, 1.0)
              + 14.0 * np.exp(-((phi - 1.05) / 0.45) ** 2) * scap)
    fat = a.fat * (0.45 + 0.55 * sphi) + 10.0 * upper * sphi ** 4
    m_edge = a.rib_zone + muscle
    y_back = a.cav_cy + a.cav_b + a.rib_zone + a.muscle + 20.0 + 0.45 * a.fat
    body = (dout < m_edge + fat) & (Y < y_back)
    np.copyto(hu, F32(HU["fat"]), where=body)
    np.copyto(hu, F32(HU["muscle"]), where=body & (dout < m_edge))
    if a.female:
        _paint_breasts(sc, body)
    for name in ("right axillary", "left axillary"):                   # axillary fat pads (where axillary nodes live)
        c = lymph_station_centres(a)[name]
        b = cv.box_around(c, (18, 24, 30))
        q = ((b.x - c[0]) / 16) ** 2 + ((b.y - c[1]) / 22) ** 2 + ((b.z - c[2]) / 28) ** 2
        view = hu[b.sl]
        np.copyto(view, F32(HU["fat"]), where=(q < 1) & (view > -500))
    table = (Y > y_back + 4) & (Y < y_back + 10) & (np.abs(X) < a.cav_a + 40.0)   # the CT table under the patient
    hu[:, table[0]] = F32(HU["ct table"])
    # thoracic and abdominal cavity contents
    cav = dout < 0
    h = sc.heart
    zd = np.minimum(a.diaphragm_z(X, Y), h.bottom_z(X, Y, h.fat + sc.changes.pericardial_mm + 2.0) - 4.0)
    zd = zd.astype(np.float32)                                           # (1, ny, nx): the heart rests in the diaphragm
    np.copyto(hu, F32(HU["fat"]), where=cav)
    np.copyto(hu, F32(HU["muscle"]), where=cav & (Z < zd + 4.0) & (Z > zd - 6.0))
    np.copyto(hu, F32(HU["neck soft tissue"]), where=cav & (Z > a.apex_z(X, Y) + 2.0) & (np.abs(X) > 28.0))
    part = Body(dout=dout, phi=phi, mask=body, cav=cav, zd=zd, below=Z < zd)
    part.stomach_c = _paint_abdomen(sc, part)
    return part


def _paint_breasts(sc: Scene, body: np.ndarray):
    """Breasts: fat with glandular tissue, on the skin in front of each side."""
    a, g, hu = sc.anat, sc.grid, sc.canvas.hu
    for sgn in (-1, 1):
        c = np.array([sgn * 0.5 * a.cav_a, 0.0, a.z_carina - 70.0])
        k = int(np.clip(np.searchsorted(g.axis("z"), c[2]), 0, g.shape[0] - 1))
        i = int(np.clip(np.searchsorted(g.axis("x"), c[0]), 0, g.shape[2] - 1))
        col = np.flatnonzero(body[k, :, i])
        c[1] = g.axis("y")[col[0]] + 8.0 if col.size else a.cav_cy - a.cav_b - 40.0   # on the skin
        half = np.array([60.0, 24.0 + 0.4 * a.fat, 52.0])
        b = sc.canvas.box_around(c, half)
        q = ((b.x - c[0]) / half[0]) ** 2 + ((b.y - c[1]) / half[1]) ** 2 + ((b.z - c[2]) / half[2]) ** 2
        view = hu[b.sl]
        np.copyto(view, F32(HU["fat"]), where=(q < 1) & (view < -500))
        np.copyto(view, F32(HU["breast gland"]), where=(q < 0.35) & (view < 0))


def _paint_abdomen(sc: Scene, body: Body):
    """Bowel, liver, stomach (wall, fluid, air cap), spleen and kidney tops under the diaphragm. Returns the
    stomach's centre (x, y, z) mm (None when the grid does not reach the abdomen)."""
    a, g, hu = sc.anat, sc.grid, sc.canvas.hu
    b = g.box((-400, -400, -400), (400, 400, a.z_dome_r + 4.0))
    if b.empty:
        return None
    X, Y, Z = b.x, b.y, b.z
    zd = body.zd[:, b.sl[1], b.sl[2]]
    view = hu[b.sl]
    inside = body.cav[b.sl] & (Z < zd - 5.0)
    # bowel loops (soft tissue) in mesenteric fat: a thresholded random texture, fixed per seed
    loops = smooth_noise(np.random.default_rng(np.random.SeedSequence([sc.seed, 5])), g, b, 16.0)
    np.copyto(view, np.where(loops > 0.3, F32(HU["bowel"]), F32(HU["fat"])), where=inside)
    x_edge = 12.0 + 55.0 * np.clip(-(Y - a.cav_cy) / a.cav_b, 0.0, 1.0) - 0.25 * np.clip(zd - 35.0 - Z, 0, 200)
    np.copyto(view, F32(HU["liver"]), where=inside & (X < x_edge))
    # stomach under the left dome: wall, fluid (dependent, posterior) and an air cap (anterior, supine)
    c = np.array([0.55 * a.cav_a, a.cav_cy - 0.25 * a.cav_b, a.z_dome_l - 42.0])
    s = np.array([42.0, 0.55 * a.cav_b, 40.0])
    q = ((X - c[0]) / s[0]) ** 2 + ((Y - c[1]) / s[1]) ** 2 + ((Z - c[2]) / s[2]) ** 2
    stomach = inside & (q < 1) & (X > x_edge + 3)
    np.copyto(view, F32(HU["stomach wall"]), where=stomach)
    lumen = stomach & (q < 0.8)
    np.copyto(view, F32(HU["gastric fluid"]), where=lumen)
    np.copyto(view, F32(HU["air"]), where=lumen & (Y < c[1] - 0.5 * s[1]) & (Z > c[2] - 0.3 * s[2]))
    stomach_c = c
    # spleen (posterior left) and the tops of the kidneys
    c = np.array([0.72 * a.cav_a, a.cav_cy + 0.55 * a.cav_b, a.z_dome_l - 45.0])
    q = ((X - c[0]) / 24) ** 2 + ((Y - c[1]) / 42) ** 2 + ((Z - c[2]) / 48) ** 2
    np.copyto(view, F32(HU["spleen"]), where=inside & (q < 1))
    for sgn, dz in ((-1, 0.0), (1, 10.0)):
        c = np.array([sgn * 62.0, a.y_vb + 4.0, -172.0 + dz])
        q = ((X - c[0]) / 28) ** 2 + ((Y - c[1]) / 26) ** 2 + ((Z - c[2]) / 55) ** 2
        np.copyto(view, F32(HU["kidney"]), where=inside & (q < 1))
    return stomach_c


# ------------------------------------------------------------------ lungs, lung vessels, airways

LOBAR_LABELS = ("Atelectasis", "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Consolidation",
                "Bronchiectasis", "Peribronchial thickening")


def paint_lungs(sc: Scene) -> Lungs:
    """The lungs (cavity minus mediastinum, spine, heart and mediastinal tubes), their density with the
    "parenchyma" painters' findings, and the fissures. Reads body, heart, changes.pericardial_mm."""
    a, cv, body = sc.anat, sc.canvas, sc.body
    X, Y, Z = cv.X, cv.Y, cv.Z
    lung = body.cav & (body.dout < -1.5) & (Z > body.zd + 3.0) & (Z < a.apex_z(X, Y))
    lung &= ~a.in_mediastinal_band(X, Y, Z)
    lung &= ~a.in_spine_zone(X, Y, Z)
    h, peff = sc.heart, sc.changes.pericardial_mm
    hb = cv.box_around(h.c, h.half_extent(h.fat + peff + 8.0))
    lung[hb.sl] &= h.surface_distance(h.local(hb.x, hb.y, hb.z), h.fat + peff + 3.0) > 0
    vessel_occ, vessel_env = sc.tube_occ(MEDIASTINAL_VESSELS, grow=2.5)
    oes_occ, oes_env = sc.tube_occ(["oesophagus"], grow=2.5)
    np.maximum(vessel_env, oes_env, out=vessel_env)
    lung &= vessel_env < 0.3
    lobes_needed = sc.want_masks or any(sc.findings.has(k) for k in LOBAR_LABELS)
    lungs = Lungs(lung=lung, right=X < 2.0, lobe=a.lobe_index(X, Y, Z) if lobes_needed else None,
                  vessel_occ=vessel_occ, oesophagus_occ=oes_occ)
    sc.lungs = lungs
    # parenchyma: dependent (posterior) gradient, then the findings that change lung density
    y0, y1 = a.cav_cy - a.cav_b, a.cav_cy + a.cav_b
    grad = a.lung_hu + 75.0 * np.clip((Y - y0) / (y1 - y0), 0.0, 1.0) ** 1.5
    lungs.parenchyma = np.broadcast_to(grad, cv.hu.shape).astype(np.float32)
    paint_findings(sc, "parenchyma")
    np.copyto(cv.hu, lungs.parenchyma, where=lung)
    lungs.parenchyma = None
    _paint_fissures(sc)
    return lungs


def _paint_fissures(sc: Scene):
    """Fissures as faint lines (a 1 mm pleural double layer averaged over a voxel). Reads lungs."""
    f = sc.anat.fissure
    lb = sc.lung_box()
    X, Y, Z = lb.x, lb.y, lb.z
    right = X < 0
    kr, kl = f["obl_k_r"], f["obl_k_l"]
    z_obl = np.where(right, f["obl_z_r"], f["obl_z_l"]) + np.where(right, kr, kl) * (Y - f["obl_y"]) \
        - 0.004 * (np.abs(X) - 70.0) ** 2
    cos_t = 1.0 / np.sqrt(1.0 + np.where(right, kr, kl) ** 2)
    d = np.abs(Z - z_obl) * cos_t
    occ = np.clip(1.0 - d / sc.grid.spacing[2], 0.0, 1.0) * 0.14
    d2 = np.abs(Z - (f["minor_z"] - 0.15 * (Y - f["obl_y"])))
    occ2 = np.clip(1.0 - d2 / sc.grid.spacing[2], 0.0, 1.0) * 0.14 * right * (Z > z_obl)
    occ = np.maximum(occ, occ2) * sc.lungs.lung[lb.sl]
    view = sc.canvas.hu[lb.sl]
    view += occ * (F32(HU["fissure"]) - view)


def _in_chest(body: Body):
    """where-function for Canvas.blend: inside the cavity and above the diaphragm."""
    cav, below = body.cav.reshape(-1), body.below.reshape(-1)
    return lambda nz, o: cav[nz] & ~below[nz]


def paint_lung_vessels(sc: Scene):
    """Pulmonary arteries and veins of the per-seed trees (grown on the normal heart; an enlarged heart covers their
    roots), in the lungs and the hila but not below the diaphragm. Reads body, marks.vessel_scale."""
    t, g = sc.anat.trees, sc.grid
    segs = [t[f"{s} {k}"] for s in ("right", "left") for k in ("arteries", "veins")]
    p0, p1 = np.concatenate([s.p0 for s in segs]), np.concatenate([s.p1 for s in segs])
    r0, r1 = np.concatenate([s.r0 for s in segs]), np.concatenate([s.r1 for s in segs])
    vocc = occupancy_volume(g, *rasterize_tubes(g, p0, p1, r0, r1))
    if sc.marks.vessel_scale is not None:
        vocc *= sc.marks.vessel_scale
    sc.canvas.blend(vocc, HU["blood"], where=_in_chest(sc.body))


def _airway_segments(sc: Scene, side: str):
    """One lung's bronchi to draw: (p0, p1, lumen r0, lumen r1, wall), with the findings' changes (air bronchograms
    in consolidation, thick walls, dilatation, beading)."""
    t = sc.anat.trees[f"{side} airways"]
    lumen0, lumen1 = t.r0 * 0.8, t.r1 * 0.8
    wall = 0.25 * lumen1 + 0.5
    show = t.n >= 3
    if sc.marks.consolidation is not None:                           # air bronchograms reach further inside
        show |= sc.canvas.lookup(sc.marks.consolidation, t.p1)
    if side in sc.changes.airway_walls:
        region, factor = sc.changes.airway_walls[side]
        wall = np.where(region(t.p1), wall * factor + 0.8, wall)      # bold: >= 1 voxel at the demo grid
    dilated = sc.changes.dilated_airways.get(side, [])
    for region, k, _ in dilated:
        sel = region(t.p1) & (t.n <= 40)
        rr = np.maximum(k * 1.3 * lumen1, 1.6 + 0.6 * k)
        lumen0 = np.where(sel, np.maximum(lumen0, rr * 0.95), lumen0)
        lumen1 = np.where(sel, rr, lumen1)
        wall = np.where(sel, np.maximum(wall, 0.3 * rr + 0.9), wall)
        show |= sel
    p0, p1 = t.p0[show], t.p1[show]
    l0, l1, w = lumen0[show], lumen1[show], wall[show]
    if any(kind == "varicose" for _, _, kind in dilated):
        # beaded lumen: cut dilated segments in three with alternating calibre
        mid = (p0 + p1) / 2
        beads = l1 > 2.5
        p0 = np.concatenate([p0, mid[beads]])
        p1 = np.concatenate([p1, mid[beads]])
        l0 = np.concatenate([l0 * np.where(beads, 0.7, 1.0), l1[beads] * 1.35])
        l1 = np.concatenate([l1 * np.where(beads, 0.7, 1.0), l1[beads] * 1.35])
        w = np.concatenate([w, w[beads]])
    return p0, p1, l0, l1, w


def paint_airways(sc: Scene):
    """Bronchi with walls (lumen air), drawn to the generation where they would still be visible, cysts of cystic
    bronchiectasis, hidden where atelectasis collapsed the lung. Reads body, changes, marks."""
    g = sc.grid
    parts = [_airway_segments(sc, side) for side in ("right", "left")]
    p0, p1 = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    rw0 = np.concatenate([p[2] + p[4] for p in parts])
    rw1 = np.concatenate([p[3] + p[4] for p in parts])
    wocc = occupancy_volume(g, *rasterize_tubes(g, p0, p1, rw0, rw1))
    locc = occupancy_volume(g, *rasterize_tubes(g, p0, p1, np.concatenate([p[2] for p in parts]),
                                                np.concatenate([p[3] for p in parts])))
    for f, rng in sc.changes.airway_cysts:                            # bronchiectasis's cysts join the airways
        paint_airway_cysts(sc, f, rng, wocc, locc)
    if sc.marks.atelectasis is not None:
        keep = 1.0 - sc.marks.atelectasis
        wocc *= keep
        locc *= keep
    inside = _in_chest(sc.body)
    sc.canvas.blend(wocc, HU["bronchial wall"], where=inside)
    sc.canvas.blend(locc, HU["air"], where=inside)


# ------------------------------------------------------------------ heart and mediastinum

def paint_heart(sc: Scene) -> HeartPart:
    """Pericardium (with its effusion), epicardial fat, myocardium, chambers, grooves and coronary arteries. Reads
    heart, changes.pericardial_mm; returns the HeartPart."""
    h, g, peff = sc.heart, sc.grid, sc.changes.pericardial_mm
    b = sc.canvas.box_around(h.c, h.half_extent(h.fat + peff + 6.0))
    u = h.local(b.x, b.y, b.z)
    d = h.surface_distance(u, 0.0)                                  # myocardial surface distance, mm
    view = sc.canvas.hu[b.sl]
    hh = g.h
    outer = h.fat + peff
    sac = np.clip((outer + 1.8 - d) / hh + 0.5, 0, 1)                  # pericardium: bold 1.8 mm line
    view += sac * (F32(HU["muscle"]) - view)
    if peff > 0:
        eff = np.clip((outer - d) / hh + 0.5, 0, 1)
        view += eff * (F32(HU["water"]) - view)
    fat = np.clip((h.fat - d) / hh + 0.5, 0, 1)
    view += fat * (F32(HU["fat"]) - view)
    myo = np.clip((0.0 - d) / hh + 0.5, 0, 1)
    view += myo * (F32(HU["myocardium"]) - view)
    # chambers (blood slightly darker than myocardium on non-contrast CT)
    w = np.array([0.0, h.v_rv @ h.R[:, 1], h.v_rv @ h.R[:, 2]])
    s = h.s
    for cen, semi in (
            (np.array([0.12 * s[0], 0, 0]) - 0.22 * s[1] * w, np.array([0.55, 0.42, 0.42]) * s),   # LV
            (np.array([0.0, 0, 0]) + 0.5 * s[1] * w, np.array([0.5, 0.26, 0.46]) * s),             # RV
            (np.array([-0.62 * s[0], 0, 0]) - 0.3 * s[1] * w, np.array([0.3, 0.38, 0.38]) * s),     # LA
            (np.array([-0.55 * s[0], 0, 0]) + 0.45 * s[1] * w, np.array([0.3, 0.36, 0.36]) * s)):  # RA
        q = sum(((u[i] - cen[i]) / semi[i]) ** 2 for i in range(3))
        view += np.clip((1.0 - q) * 6.0, 0, 1) * (F32(HU["blood"]) - view)
    # atrioventricular and interventricular grooves filled with epicardial fat
    u_av = -0.42 * s[0]
    sep = u[1] * w[1] + u[2] * w[2] - 0.12 * s[1]
    groove = ((np.abs(u[0] - u_av) < 5.0) & (d > -7.0) & (d < 0)) | (
        (np.abs(sep) < 4.0) & (d > -6.0) & (d < 0) & (u[0] > u_av))
    np.copyto(view, F32(HU["fat"]), where=groove)
    # coronary arteries (non-calcified) in the grooves
    coronaries = coronary_paths(h)
    p0 = np.concatenate([p[:-1] for p in coronaries.values()])
    p1 = np.concatenate([p[1:] for p in coronaries.values()])
    occ = occupancy_volume(g, *rasterize_tubes(g, p0, p1, 1.6, 1.6))
    view += occ[b.sl] * (F32(HU["blood"]) - view)
    return HeartPart(box=b, surface_d=d, coronaries=coronaries)


def coronary_paths(h) -> dict[str, np.ndarray]:
    """LAD, circumflex and right coronary centrelines (K, 3) mm, 2 mm under the heart surface in the grooves."""
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


def paint_oesophagus(sc: Scene):
    """The oesophagus (muscle) with a little air in its lumen above the diaphragm. Reads lungs.oesophagus_occ."""
    cv = sc.canvas
    cv.blend(sc.lungs.oesophagus_occ, HU["muscle"])
    lumen = sc.tube_occ(["oesophagus"], scale_r=0.22)
    zc = np.repeat(sc.grid.axis("z") > sc.anat.z_dome_l + 10.0, sc.grid.shape[1] * sc.grid.shape[2])
    cv.blend(lumen, HU["air"], where=lambda nz, o: 0.8 * zc[nz])


def paint_mediastinal_vessels(sc: Scene):
    """Aorta, great vessels, pulmonary arteries and veins, venae cavae, azygos (blood). Reads lungs."""
    lung = sc.lungs.lung.reshape(-1)
    sc.canvas.blend(sc.lungs.vessel_occ, HU["blood"], where=lambda nz, o: ~lung[nz] | (o > 0.5))


def paint_trachea(sc: Scene):
    """Trachea and main bronchi: wall and air lumen."""
    lumen, wall = sc.tube_occ(AIRWAYS, grow=2.2)
    sc.canvas.blend(wall, HU["tracheal wall"])
    sc.canvas.blend(lumen, HU["air"])


def paint_lymph_nodes(sc: Scene):
    """Normal small nodes at about half the stations (their own stream, SeedSequence([seed, 3])), then the enlarged
    nodes of lymphadenopathy (changes.enlarged_nodes). Reads lungs."""
    rng = np.random.default_rng(np.random.SeedSequence([sc.seed, 3]))
    centres = lymph_station_centres(sc.anat)
    nodes = []
    for name in NODE_STATIONS:
        if rng.random() < 0.5:
            nodes.append((centres[name] + rng.normal(0, 3.0, 3), rng.uniform(3.0, 7.0), rng.normal(size=3)))
    nodes += sc.changes.enlarged_nodes
    c = np.array([n[0] for n in nodes])
    short = np.array([n[1] for n in nodes])
    axis = np.array([n[2] / (np.linalg.norm(n[2]) + 1e-9) for n in nodes]) * short[:, None] * 0.25
    g = sc.grid
    occ = occupancy_volume(g, *rasterize_tubes(g, c - axis, c + axis, short / 2, short / 2))  # long ~1.5 x short
    lung = sc.lungs.lung.reshape(-1)
    sc.canvas.blend(occ, HU["node"], where=lambda nz, o: ~lung[nz] | (o > 0.5))


def paint_mediastinum(sc: Scene):
    """The mediastinum in painting order: oesophagus, hiatal hernia, vessels, nodes, trachea."""
    paint_oesophagus(sc)
    paint_findings(sc, "mediastinum")
    paint_mediastinal_vessels(sc)
    paint_lymph_nodes(sc)
    paint_trachea(sc)
