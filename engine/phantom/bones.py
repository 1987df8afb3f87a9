"""The bones' render step: spine, ribs, scapulae, sternum, clavicles. Each part paints into the canvas and marks its
voxels in `bone` when the caller asks for the bone mask (phantom_masks)."""
from __future__ import annotations

import numpy as np

from engine.phantom.grid import path_segments
from engine.phantom.hu import HU
from engine.phantom.scene import Scene, Sternum

F32 = np.float32
RIB_PHI_END = np.array([0.93, 0.93, 0.93, 0.93, 0.93, 0.93, 0.92, 0.86, 0.82, 0.78, 0.55, 0.42])   # x pi, per rib


def paint_bones(sc: Scene) -> Sternum:
    """All bones; the bone mask goes to sc.masks["bone"] when masks are asked for. Reads body, heart, findings
    (the healed split of a sternotomy). Returns the Sternum part."""
    bone = np.zeros(sc.grid.shape, bool) if sc.want_masks else None
    _spine(sc, bone)
    _ribs(sc, bone)
    _scapulae(sc, bone)
    sternum = _sternum(sc, bone)
    _clavicles(sc, sternum, bone)
    if bone is not None:
        sc.masks["bone"] = bone
    return sternum


def _spine(sc: Scene, bone):
    """Vertebral bodies (cancellous + cortex) and discs, canal, posterior elements."""
    a = sc.anat
    b = sc.grid.box((-70, a.y_vb - a.vb_ry - 40, -400), (70, a.y_vb + 90, 400))
    X, Y, Z = b.x, b.y, b.z
    yv = a.y_spine(Z)
    frac = ((a.z_t1 - Z) / a.pitch) % 1.0
    disc = frac > 1.0 - 5.5 / a.pitch
    q = (X / a.vb_rx) ** 2 + ((Y - yv) / a.vb_ry) ** 2
    view = sc.canvas.hu[b.sl]
    vb = q < 1.0
    np.copyto(view, F32(HU["cancellous"]), where=vb)
    np.copyto(view, F32(HU["vertebral cortex"]), where=vb & (q > 0.72))
    np.copyto(view, F32(HU["disc"]), where=vb & disc)
    yc = yv + a.vb_ry + 9.0
    rc = np.sqrt(X ** 2 + (Y - yc) ** 2)
    vert = ~disc & (frac > 0.08)
    arch = (rc > 8.5) & (rc < 15.0) & (Y > yc - 7.0) & vert
    spinous = (np.abs(X) < 4.5) & (Y > yc + 12.0) & (Y < yc + 46.0 - 12.0 * frac) & vert
    transverse = (np.abs(X) < 40.0) & (np.abs(Y - yc - 2.0) < 5.0) & (frac > 0.2) & (frac < 0.6)
    post = arch | spinous | transverse
    np.copyto(view, F32(HU["vertebral arch"]), where=post)
    np.copyto(view, F32(HU["csf"]), where=rc < 8.5)
    if bone is not None:
        bone[b.sl] |= vb | post


def _ribs(sc: Scene, bone):
    """12 pairs around the cavity, sloping down anteriorly (one pass over the chest-wall band)."""
    a, body, hu = sc.anat, sc.body, sc.canvas.hu
    band = (body.dout > 0.0) & (body.dout < a.rib_zone + 0.5) & body.mask
    k, j, i = np.nonzero(band)
    phi = body.phi[0, j, i]
    z = sc.grid.axis("z")[k]
    dout = body.dout[k, j, i]
    drop = a.rib_drop * (phi / np.pi) ** 1.15
    ic = (a.z_t1 - drop - z) / a.pitch
    n = np.round(ic)
    dz = (ic - n) * a.pitch
    n = n.astype(np.int64)
    ok = (n >= 0) & (n < 12)
    phi_end = RIB_PHI_END[np.clip(n, 0, 11)]
    ok &= (phi > 0.2) & (phi < phi_end * np.pi)
    dc = 1.0 + a.rib_t / 2
    h_r = a.rib_h * np.where(n == 0, 0.8, 1.0)
    e = np.sqrt((dz / (h_r / 2)) ** 2 + ((dout - dc) / (a.rib_t / 2)) ** 2)
    rib = ok & (e < 1.0)
    cart = rib & (phi > (phi_end - 0.2) * np.pi) & (n < 10)
    val = np.where(e > 0.6, F32(HU["cortical"]), F32(HU["cancellous"]))
    val = np.where(cart, F32(HU["cartilage"]), val)
    hu[k[rib], j[rib], i[rib]] = val[rib]
    if bone is not None:
        bone[k[rib & ~cart], j[rib & ~cart], i[rib & ~cart]] = True


def _scapulae(sc: Scene, bone):
    """Thin plates outside the posterolateral ribs, triangular (wide at the top)."""
    a, body = sc.anat, sc.body
    z_top, z_bot = a.z_t1 - 5.0, a.z_t1 - 150.0
    sc_band = (body.dout > a.rib_zone + 3.0) & (body.dout < a.rib_zone + 9.0) & body.mask
    k2, j2, i2 = np.nonzero(sc_band & (sc.canvas.Z > z_bot) & (sc.canvas.Z < z_top))
    phi2 = body.phi[0, j2, i2]
    z2 = sc.grid.axis("z")[k2]
    lat2 = 0.22 * np.pi + 0.3 * np.pi * np.clip((z2 - z_bot) / (z_top - z_bot), 0, 1)
    d2 = body.dout[k2, j2, i2]
    thick = np.where(phi2 > lat2 - 0.06 * np.pi, 6.0, 3.5)               # thicker lateral border
    plate = (phi2 > 0.22 * np.pi) & (phi2 < lat2) & (np.abs(d2 - (a.rib_zone + 6.0)) < thick / 2 + 0.5)
    sc.canvas.hu[k2[plate], j2[plate], i2[plate]] = F32(HU["scapula"])
    if bone is not None:
        bone[k2[plate], j2[plate], i2[plate]] = True


def _sternum(sc: Scene, bone) -> Sternum:
    """Manubrium, body, xiphoid (cortex around marrow) at the anterior midline; split (healed) after sternotomy."""
    a, h = sc.anat, sc.heart
    z_man = a.z_carina + 38.0
    z_xiph = h.c[2] - h.half_extent(h.fat)[2] + 15.0
    b = sc.grid.box((-40, -400, z_xiph - 15.0), (40, 0, z_man + 2.0))
    if not b.empty:
        Zb, Xb = b.z, b.x
        ws = np.where(Zb > z_man - 45.0, 26.0, np.where(Zb < z_xiph + 20.0, 10.0, 16.0))
        ws = np.where(Zb < z_xiph, 10.0 * np.clip(1 - (z_xiph - Zb) / 15.0, 0, 1), ws)
        d = sc.body.dout[b.sl]
        t_s = 11.0
        st = (np.abs(Xb) < ws) & (d > 0.5) & (d < 0.5 + t_s)
        cortex = (np.abs(Xb) > ws - 2.5) | (d < 3.0) | (d > t_s - 2.0)
        view = sc.canvas.hu[b.sl]
        np.copyto(view, F32(HU["cancellous"]), where=st)
        np.copyto(view, F32(HU["sternal cortex"]), where=st & cortex)
        if sc.findings.has_kind("Medical material", "sternotomy wires"):
            np.copyto(view, F32(HU["fat"]), where=st & (np.abs(Xb) < 0.9))   # the healed split
        if bone is not None:
            bone[b.sl] |= st
    return Sternum(z_manubrium=z_man, z_xiphoid=z_xiph)


def _clavicles(sc: Scene, sternum: Sternum, bone):
    """From the manubrium out to the shoulders."""
    a, z_man = sc.anat, sternum.z_manubrium
    y_front = a.cav_cy - a.cav_b * a.cavity_scale(z_man)
    segs = []
    for sgn in (-1, 1):
        pts = np.array([[sgn * 20.0, y_front - 10.0, z_man + 2.0], [sgn * 60.0, y_front - 14.0, z_man + 10.0],
                        [sgn * (a.cav_a * 0.95), y_front + 20.0, a.z_t1 + 22.0]])
        segs.append(path_segments(pts, np.full(3, 7.0)))
    occ = sc.canvas.tube_occ(segs)
    sc.canvas.blend(occ, HU["clavicle"])
    if bone is not None:
        bone |= occ > 0.5
