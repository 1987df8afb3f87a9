"""The digital chest phantom: determinism, anatomy, each of the 18 findings measurable where drawn, label sampling.

Finding tests render the same seed with and without one finding (noise-free, demo grid) and measure the finding
with a per-label measurement in HU inside the relevant anatomical region (masks of the normal anatomy from
phantom_masks), so each test can fail if the finding is missing, misplaced or too faint.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from engine.errors import UserError
from engine.labels import KINDS, LABELS, LOBES, NODE_STATIONS, Finding
from engine.phantom import (build_label_sets_json, heart_geometry, load_label_table, lymph_station_centres,
                            make_study, phantom_masks, rasterize_tubes, occupancy_volume, render_phantom,
                            sample_anatomy, sample_findings, sample_label_set, resolve_grid)
from engine.volume import DEMO_SHAPE_ZYX

SEED = 7


@pytest.fixture(scope="module")
def base():
    """Noise-free normal study of SEED on the demo grid and its anatomy masks."""
    return render_phantom([], SEED, noise=False).array, phantom_masks(SEED)


def render(*findings, seed=SEED):
    return render_phantom(list(findings), seed, noise=False).array


def dilate(mask, n):
    return ndimage.binary_dilation(mask, iterations=n)


def world_to_index(p, shape=DEMO_SHAPE_ZYX):
    g = resolve_grid(shape, None)
    return tuple(int(round((p[i] - g.origin[i]) / g.spacing[i])) for i in (2, 1, 0))


# ------------------------------------------------------------------------------------------ determinism, anatomy

def test_same_seed_is_bit_identical_and_seeds_differ():
    f = [Finding("Lung nodule", side="right", lobe="right upper lobe", size_mm=10.0, kind="solid")]
    a = render_phantom(f, 3).array
    b = render_phantom(f, 3).array
    assert a.dtype == np.float32 and a.shape == DEMO_SHAPE_ZYX
    assert np.array_equal(a, b)
    c = render_phantom(f, 4).array
    assert np.abs(a - c).mean() > 20.0                       # a different patient, not just different noise
    a3, a4 = sample_anatomy(3), sample_anatomy(4)
    assert a3.cav_a != a4.cav_a and a3.ctr != a4.ctr and a3.z_carina != a4.z_carina
    assert not np.allclose(a3.trees["right arteries"].p1[:5], a4.trees["right arteries"].p1[:5])
    m3, m4 = phantom_masks(3), phantom_masks(4)
    assert m3["lungs"].sum() != m4["lungs"].sum()


def test_anatomy_is_plausible(base):
    vol, m = base
    body, lungs = m["body"], m["lungs"]
    assert 0.15 < lungs.sum() / body.sum() < 0.5
    assert -900 < np.median(vol[lungs]) < -780                    # aerated lung
    assert vol.min() >= -1024 and vol.max() <= 3071
    assert (vol[m["bone"]] > 250).mean() > 0.5 and (vol > 700).sum() > 500   # cortical bone present
    heart = m["heart"] & ~dilate(~m["heart"], 2)
    assert 25 < np.median(vol[heart]) < 60                          # unenhanced blood / myocardium
    assert np.median(vol[~body & (np.arange(vol.shape[1])[None, :, None] < 20)]) < -990   # air in front
    # LPS: the left lung lies at higher column indices, the spine posterior (high row indices)
    cols = np.nonzero(m["lung_left"])[2].mean(), np.nonzero(m["lung_right"])[2].mean()
    assert cols[0] > cols[1]
    z = np.nonzero(m["lungs"])[0]
    assert z.max() > 0.7 * vol.shape[0] and z.min() > 0.05 * vol.shape[0]   # apices high, abdomen below
    # six lobes, each a real part of its lung
    for lobe in LOBES:
        assert m[lobe].sum() > 0.03 * lungs.sum(), lobe


def test_noise_level_and_other_grids():
    vol = render_phantom([], 11).array
    clean = render_phantom([], 11, noise=False).array
    sd = float((vol - clean).std())
    assert 8.0 < sd < 25.0
    small = render_phantom([], 11, shape_zyx=(32, 64, 64))
    assert small.array.shape == (32, 64, 64)
    assert np.allclose(small.spacing, (350 / 64, 350 / 64, 300 / 32))
    big_fov = render_phantom([], 11, shape_zyx=(32, 64, 64), spacing_xyz=(8.0, 8.0, 12.0), noise=False).array
    # a 512 mm field of view: the body is a smaller part of the image, and air surrounds it
    frac_small = (small.array > -500).mean()
    frac_big = (big_fov > -500).mean()
    assert frac_big < 0.7 * frac_small
    with pytest.raises(UserError):
        render_phantom([], 0, shape_zyx=(4, 64, 64))
    with pytest.raises(UserError):
        render_phantom([Finding("Not a label")], 0)


# ------------------------------------------------------------------------------------------ the 18 findings

def test_medical_material_metal(base):
    vol0, _ = base
    assert (vol0 > 2000).sum() == 0
    for kind in KINDS["Medical material"]:
        vol = render(Finding("Medical material", side="left", kind=kind))
        assert (vol > 2000).sum() >= 4, kind


def test_arterial_wall_calcification(base):
    vol0, m = base
    zone = dilate(m["aorta"], 2) & ~dilate(m["bone"], 1)
    counts = [((render(Finding("Arterial wall calcification", severity=s)) > 250) & zone).sum()
              for s in ("mild", "severe")]
    n0 = ((vol0 > 250) & zone).sum()
    assert counts[0] > n0 + 8 and counts[1] > counts[0] + 20


def cardiothoracic_ratio(vol, masks):
    """Heart width / inner thoracic width: the widest axial row of the heart (incl. epicardial fat) over the widest
    lung-to-lung row. Checks on the image that this heart row is soft tissue bordered by aerated lung on both sides (within the
    5 voxels of pericardium and pericardial fat, so the mask's width is the width a reader would measure)."""
    heart, lungs = masks["heart"], masks["lungs"]
    zs, ys = np.nonzero(heart.any(2))
    best = (0, 0, 0, 0, 0)
    for k, j in zip(zs, ys):
        xs = np.flatnonzero(heart[k, j])
        if xs.max() - xs.min() + 1 > best[0]:
            best = (xs.max() - xs.min() + 1, k, j, xs.min(), xs.max())
    width, k, j, x0, x1 = best
    row = vol[k, j]
    assert np.median(row[x0:x1 + 1]) > -100
    assert (row[max(0, x0 - 5):x0] < -500).any() and (row[x1 + 1:x1 + 6] < -500).any()
    thorax = max(np.ptp(np.flatnonzero(lungs[kk, jj])) + 1 for kk, jj in zip(*np.nonzero(lungs.any(2))))
    return width / thorax


def test_cardiomegaly_ctr(base):
    vol0, m = base
    assert cardiothoracic_ratio(vol0, m) < 0.5
    f = Finding("Cardiomegaly", severity="moderate")
    assert cardiothoracic_ratio(render(f), phantom_masks(SEED, findings=[f])) > 0.5
    anat = sample_anatomy(SEED)
    assert heart_geometry(anat, 0.6).s[0] > heart_geometry(anat).s[0] * 1.2


def test_pericardial_effusion_rim(base):
    vol0, m = base
    zone = dilate(m["heart"], 5) & (m["heart"] | m["mediastinum"])
    fluid = lambda v: ((v > 0) & (v < 25) & (np.abs(ndimage.uniform_filter(v, 3) - 12) < 15) & zone).sum()  # noqa
    n0 = fluid(vol0)
    n_small = fluid(render(Finding("Pericardial effusion", size_mm=6.0, severity="mild")))
    n_big = fluid(render(Finding("Pericardial effusion", size_mm=18.0, severity="severe")))
    assert n_small > 3 * n0 + 100 and n_big > 2 * n_small


def test_coronary_calcification(base):
    vol0, m = base
    zone = dilate(m["heart"], 2) & ~dilate(m["bone"], 2)
    n0 = ((vol0 > 200) & zone).sum()
    n1 = ((render(Finding("Coronary artery wall calcification", severity="moderate", kind="LAD")) > 200) & zone).sum()
    n3 = ((render(Finding("Coronary artery wall calcification", severity="severe", kind="three-vessel")) > 200)
          & zone).sum()
    assert n0 == 0 and n1 >= 4 and n3 > n1


def test_hiatal_hernia_air_above_diaphragm_behind_heart(base):
    vol0, m = base
    vol = render(Finding("Hiatal hernia", size_mm=45.0, severity="moderate"))
    new_air = (vol < -900) & (vol0 > -500) & m["mediastinum"]
    assert new_air.sum() > 40
    z, y, x = np.nonzero(new_air)
    hz, hy, hx = np.nonzero(m["heart"])
    anat = sample_anatomy(SEED)
    assert y.mean() > hy.mean()                                             # behind the heart
    assert z.mean() < world_to_index((0, 0, anat.z_carina))[0]             # below the carina, above the diaphragm


def test_lymphadenopathy_at_named_stations(base):
    vol0, m = base
    anat = sample_anatomy(SEED)
    centres = lymph_station_centres(anat)
    stations = ("subcarinal", "right hilar", "right axillary")
    vol = render(Finding("Lymphadenopathy", size_mm=16.0, severity="moderate", stations=stations))
    zz, yy, xx = np.indices(vol.shape)
    g = resolve_grid(DEMO_SHAPE_ZYX, None)
    for name in NODE_STATIONS:
        c = centres[name]
        d = np.sqrt(((xx * g.spacing[0] + g.origin[0]) - c[0]) ** 2 + ((yy * g.spacing[1] + g.origin[1]) - c[1]) ** 2
                    + ((zz * g.spacing[2] + g.origin[2]) - c[2]) ** 2)
        near = d < 14.0
        soft_new = ((vol > 20) & (vol < 70) & ~((vol0 > 20) & (vol0 < 70)) & near).sum()
        if name in stations:
            assert soft_new * np.prod(g.spacing) > 500.0, name          # > 0.5 ml of new node tissue
        else:
            assert soft_new == 0, name


def test_emphysema_low_attenuation_scales_with_severity(base):
    vol0, m = base
    lungs = m["lungs"]
    laa = lambda v: ((v < -950) & lungs).mean() / lungs.mean()                               # noqa: E731
    mild = laa(render(Finding("Emphysema", side="bilateral", severity="mild", kind="centrilobular")))
    severe = laa(render(Finding("Emphysema", side="bilateral", severity="severe", kind="centrilobular")))
    bullous = laa(render(Finding("Emphysema", side="right", severity="moderate", kind="bullous", size_mm=40.0)))
    assert laa(vol0) + 0.002 < mild < severe
    assert bullous > laa(vol0) + 0.002


def dense_in(v, mask, lo=-300, hi=100):
    return ((v > lo) & (v < hi) & mask).sum()


def test_atelectasis_in_named_lobe(base):
    vol0, m = base
    lobe = "right lower lobe"
    for kind in ("segmental", "plate-like"):
        vol = render(Finding("Atelectasis", side="right", lobe=lobe, severity="moderate", kind=kind))
        assert dense_in(vol, m[lobe]) > dense_in(vol0, m[lobe]) + 40, kind
        assert dense_in(vol, m["lung_left"]) == dense_in(vol0, m["lung_left"]), kind


@pytest.mark.parametrize("lobe,kind,size", [("right upper lobe", "solid", 12.0), ("left lower lobe", "solid", 6.0),
                                            ("lingula", "ground-glass", 16.0)])
def test_lung_nodule_round_blob_in_its_lobe(base, lobe, kind, size):
    vol0, m = base
    side = "right" if lobe.startswith("right") else "left"
    vol = render(Finding("Lung nodule", side=side, lobe=lobe, size_mm=size, kind=kind))
    diff = vol - vol0
    blob = diff > (300 if kind == "solid" else 150)
    lab, n = ndimage.label(blob)
    assert n >= 1
    sizes = ndimage.sum(blob, lab, range(1, n + 1))
    comp = lab == (1 + int(np.argmax(sizes)))
    k, j, i = np.round(ndimage.center_of_mass(comp)).astype(int)
    assert m[lobe][k, j, i] or dilate(m[lobe], 1)[k, j, i]
    peak = vol[comp].max()
    if kind == "ground-glass":
        assert -700 < np.median(vol[comp]) < -300
    else:                                    # small nodules lose their peak to partial volume at 2.7 x 4.7 mm
        assert (20 < peak < 80) if size >= 10 else (-250 < peak < 80)
    g = resolve_grid(DEMO_SHAPE_ZYX, None)
    vox = np.prod(g.spacing)
    d_eq = (6 * comp.sum() * vox / np.pi) ** (1 / 3)
    assert 0.5 * max(size, 4.5) < d_eq < 1.8 * max(size, 4.5)
    zs, ys, xs = np.nonzero(comp)
    extent = np.array([np.ptp(xs) + 1, np.ptp(ys) + 1, np.ptp(zs) + 1]) * np.array(g.spacing)
    assert extent.max() < 2.5 * max(extent.min(), g.spacing[2])               # round, not a tube


def test_lung_opacity_ground_glass(base):
    vol0, m = base
    ggo = lambda v: ((v > -750) & (v < -350) & m["lungs"]).sum()                             # noqa: E731
    mild = ggo(render(Finding("Lung opacity", side="bilateral", severity="mild", kind="ground-glass")))
    severe = ggo(render(Finding("Lung opacity", side="bilateral", severity="severe", kind="ground-glass")))
    one = render(Finding("Lung opacity", side="left", lobe="left lower lobe", severity="moderate"))
    assert ggo(vol0) * 1.5 + 200 < mild < severe
    assert ggo(one * m["lung_right"]) == ggo(vol0 * m["lung_right"])


def test_fibrotic_bands_in_lobe(base):
    vol0, m = base
    lobe = "left upper lobe"
    vol = render(Finding("Pulmonary fibrotic sequela", side="left", lobe=lobe, severity="moderate"))
    assert dense_in(vol, m[lobe], -600, 100) > dense_in(vol0, m[lobe], -600, 100) + 30
    assert dense_in(vol, m["lung_right"], -600, 100) == dense_in(vol0, m["lung_right"], -600, 100)


def test_mild_fibrotic_sequela_is_visible_at_the_demo_grid(base):
    """Even mild sequelae (four bands and their pleural tags) raise a few hundred voxels by more than 200 HU, all in
    their lobe: drawn at 1-3 mm, as in life, they changed about 70 voxels and no encoder could read them."""
    vol0, m = base
    lobe = "right lower lobe"
    raised = render(Finding("Pulmonary fibrotic sequela", side="right", lobe=lobe, severity="mild")) - vol0 > 200
    assert raised.sum() >= 250
    assert not (raised & ~m[lobe]).any()


def test_pleural_effusion_dependent_fluid_on_its_side(base):
    vol0, m = base
    post = np.arange(vol0.shape[1])[None, :, None] > vol0.shape[1] // 2
    fluid = lambda v, side: ((v > 0) & (v < 25) & m[f"lung_{side}"] & post).sum()          # noqa: E731
    right = render(Finding("Pleural effusion", side="right", size_mm=30.0, severity="moderate"))
    small = render(Finding("Pleural effusion", side="right", size_mm=12.0, severity="mild"))
    assert fluid(right, "right") > 10 * fluid(vol0, "right") + 300
    assert fluid(right, "left") == fluid(vol0, "left")
    assert fluid(small, "right") < 0.7 * fluid(right, "right")
    both = render(Finding("Pleural effusion", side="bilateral", size_mm=30.0, severity="moderate"))
    assert fluid(both, "left") > 10 * fluid(vol0, "left") + 300


def test_mosaic_attenuation_patchwork(base):
    vol0, m = base
    par = m["lungs"] & (vol0 < -700)                  # parenchyma of the normal lung (no vessels)
    vol = render(Finding("Mosaic attenuation pattern", side="bilateral", severity="moderate"))
    iqr = lambda v: np.subtract(*np.percentile(ndimage.uniform_filter(v, 3)[par], [75, 25]))   # noqa: E731
    assert iqr(vol) > iqr(vol0) + 40                      # a patchwork of denser and lucent lobules
    assert ((vol > -780) & par).sum() / par.sum() > 0.2
    assert ((vol < -880) & par).sum() > ((vol0 < -880) & par).sum()


def airway_zone(seed, extra_mm):
    anat = sample_anatomy(seed)
    g = resolve_grid(DEMO_SHAPE_ZYX, None)
    occ = np.zeros(g.shape, np.float32)
    for side in ("right", "left"):
        t = anat.trees[f"{side} airways"]
        keep = t.n >= 3
        occupancy_volume(g, *rasterize_tubes(g, t.p0[keep], t.p1[keep], t.r0[keep] + extra_mm,
                                             t.r1[keep] + extra_mm), out=occ)
    return occ > 0.5


def test_peribronchial_thickening(base):
    vol0, m = base
    zone = airway_zone(SEED, 5.0) & m["lungs"]
    walls = lambda v: ((v > -500) & (v < 100) & zone).sum()                                  # noqa: E731
    vol = render(Finding("Peribronchial thickening", side="bilateral", severity="moderate"))
    assert walls(vol) > 1.3 * walls(vol0) + 50
    far = m["lungs"] & ~airway_zone(SEED, 12.0)
    assert abs(dense_in(vol, far, -500, 100) - dense_in(vol0, far, -500, 100)) < 0.1 * walls(vol0) + 10


def test_consolidation_with_air_bronchograms(base):
    vol0, m = base
    lobe = "right lower lobe"
    vol = render(Finding("Consolidation", side="right", lobe=lobe, severity="severe"))
    cons = (vol > -100) & (vol < 70) & m[lobe] & (vol0 < -600)
    assert cons.sum() > 200
    filled = ndimage.binary_closing(cons, iterations=2)
    bronchograms = filled & (vol < -400) & m[lobe]
    assert bronchograms.sum() >= 2
    assert dense_in(vol, m["lung_left"]) == dense_in(vol0, m["lung_left"])


def test_bronchiectasis_dilated_airways_in_lobe(base):
    vol0, m = base
    lobe = "left lower lobe"
    air = lambda v, mask: ((v < -900) & mask).sum()                                          # noqa: E731
    for kind in ("cylindrical", "cystic"):
        vol = render(Finding("Bronchiectasis", side="left", lobe=lobe, severity="moderate", kind=kind))
        assert air(vol, m[lobe]) > 1.5 * air(vol0, m[lobe]) + 20, kind
        assert air(vol, m["lung_right"]) == air(vol0, m["lung_right"]), kind


def test_interlobular_septal_thickening_peripheral(base):
    vol0, m = base
    zone = m["peripheral_lung"]
    lines = lambda v, z: ((v > -700) & (v < 0) & z).sum()                                     # noqa: E731
    vol = render(Finding("Interlobular septal thickening", side="bilateral", severity="moderate"))
    gain_periph = lines(vol, zone) - lines(vol0, zone)
    central = m["lungs"] & ~zone
    gain_central = lines(vol, central) - lines(vol0, central)
    assert gain_periph > 200 and gain_periph > 2 * gain_central


# ------------------------------------------------------------------------------------------ labels and studies

def test_label_table_sampling_follows_ctrate(shared_data, tmp_path):
    table = load_label_table(shared_data / "ctrate_labels" / "train_predicted_labels.csv")
    assert table.shape[1] == len(LABELS) and table.shape[0] > 40000
    normal_rate = (table.sum(1) == 0).mean()
    rng = np.random.default_rng(0)
    draws = [sample_label_set(rng, table) for _ in range(2000)]
    drawn_normal = np.mean([len(d) == 0 for d in draws])
    assert abs(drawn_normal - normal_rate) < 0.03
    prevalence = table.mean(0)
    drawn = np.mean([[name in d for name in LABELS] for d in draws], axis=0)
    assert np.abs(drawn - prevalence).max() < 0.05
    # the compact json shipped in assets/ holds exactly the same rows
    out = tmp_path / "label_sets.json"
    data = build_label_sets_json(shared_data / "ctrate_labels" / "train_predicted_labels.csv", out)
    assert "CC BY-NC-SA 4.0" in data["license"]
    back = load_label_table(out)
    assert back.shape == table.shape and np.array_equal(back.sum(0), table.sum(0))
    assert np.array_equal(np.unique(back, axis=0), np.unique(table, axis=0))


def test_shipped_label_sets_json_matches_table():
    from engine import settings
    back = load_label_table(settings.phantom_label_sets())
    assert back.shape[1] == len(LABELS) and back.shape[0] > 40000


def test_sampled_findings_use_the_vocabulary():
    rng = np.random.default_rng(5)
    for _ in range(30):
        for f in sample_findings(list(LABELS), rng):
            assert f.label in LABELS
            assert f.side in (None, "right", "left", "bilateral")
            assert f.lobe is None or f.lobe in LOBES
            assert f.severity in ("mild", "moderate", "severe")
            assert f.kind is None or f.kind in (KINDS[f.label] or ())
            assert set(f.stations) <= set(NODE_STATIONS)
            if f.lobe is not None and f.side in ("right", "left"):
                assert f.lobe.startswith(f.side) or (f.side == "left" and f.lobe == "lingula")
            if f.label == "Lung nodule":
                assert 4 <= f.size_mm <= 30
            if f.label == "Lymphadenopathy":
                assert f.size_mm > 10 and f.stations
    assert {f.label for f in sample_findings(list(LABELS), rng)} == set(LABELS)


def test_make_study_is_reproducible():
    a = make_study(21, with_report=False, shape_zyx=(32, 64, 64))
    b = make_study(21, with_report=False, shape_zyx=(32, 64, 64))
    assert a.labels == b.labels and a.findings == b.findings
    assert np.array_equal(a.volume.array, b.volume.array)
    assert {f.label for f in a.findings} == set(a.labels)
    c = make_study(22, labels=["Pleural effusion", "cardiomegaly"], with_report=False, shape_zyx=(32, 64, 64))
    assert c.labels == ["Cardiomegaly", "Pleural effusion"]
    with pytest.raises(UserError):
        make_study(1, labels=["Broken heart"], with_report=False)


def test_make_study_with_report():
    pytest.importorskip("engine.report_writer")
    s = make_study(23, labels=["Lung nodule"], shape_zyx=(32, 64, 64))
    assert s.report is not None and "nodule" in s.report.text.lower()


def test_seed_without_normal_lymph_nodes_renders():
    """Regression: seed 1,000,234 (demo-0235) draws no normal node at any station; rendering must not fail."""
    vol = render_phantom([], 1_000_234)
    assert vol.array.shape == DEMO_SHAPE_ZYX and np.isfinite(vol.array).all()


def test_which_lung_a_finding_is_in_has_one_answer():
    """engine.phantom.findings is the one home of "which lung": the lobe decides, else the side, else the right lung;
    a sided finding covers both lungs when bilateral or unsided."""
    from engine.phantom import finding_lung, finding_sides

    assert finding_lung(Finding("Consolidation", side="right", lobe="lingula")) == "left"
    assert finding_lung(Finding("Consolidation", side="left", lobe="right middle lobe")) == "right"
    assert finding_lung(Finding("Lung nodule", side="left")) == "left"
    assert finding_lung(Finding("Lung nodule")) == "right"
    assert finding_sides("bilateral") == finding_sides(None) == ("right", "left")
    assert finding_sides("left") == ("left",)
