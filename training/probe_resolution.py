"""Is the demo grid too coarse for the small findings? The same hand-made features on two render grids.

    python -m training.probe_resolution [--n 400] [--scales 1 2] [--workers 2] [--out docs/resolution_probe.json]

Evidence for docs/training.md, not part of any model. Each study (CT-RATE label set drawn from its seed, seeds
960,000.. so none is a training or test study) is rendered by the phantom at the demo grid (64 x 128 x 128 voxels,
2.73 x 2.73 x 4.69 mm) and at `scale` times finer (scale 2: 128 x 256 x 256, 1.37 x 1.37 x 2.34 mm), the field of
view is the same. The same radiomics-style features, all in physical units (HU, mm, mm^3), are computed on both inside
the phantom's own anatomy masks (lungs, heart, aorta, mediastinum: the true regions, so the features get every chance),
and a logistic regression per label (training.evaluate.linear_probe_auroc, 5-fold) says how much of each label they
carry. A label that is at chance on the demo grid and well above it on the finer grid is one the demo grid cannot show
to any encoder; one that stays at chance on both is beyond these features, not proof either way.

Features of finished studies are appended to OUT.features.jsonl as they come, so an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from scipy import ndimage

from engine.labels import LABELS
from engine.phantom import FOV_XYZ_MM
from engine.volume import DEMO_SHAPE_ZYX

ROOT = Path(__file__).resolve().parents[1]
SEED_BASE = 960_000
LUNG_HU_EDGES = (-1100, -950, -910, -870, -830, -790, -700, -500, -300, -100, 100, 4000)


# ---- region helpers (mm, not voxels, so both grids are measured alike) -------------------------------------------

def _within_mm(mask: np.ndarray, r_mm: float, sampling_zyx, inside: bool = False) -> np.ndarray:
    """Voxels within r_mm of `mask` (dilation), or with inside=True the voxels of `mask` deeper than r_mm (erosion).

    Computed on the mask's bounding box padded by r_mm with an exact Euclidean distance transform (scipy's EDT is the
    one library call that takes anisotropic spacing in mm)."""
    out = np.zeros_like(mask)
    if not mask.any():
        return out
    pad = [int(np.ceil(r_mm / s)) + 1 for s in sampling_zyx]
    idx = np.nonzero(mask)
    sl = tuple(slice(max(0, i.min() - p), min(n, i.max() + p + 1)) for i, p, n in zip(idx, pad, mask.shape))
    box = mask[sl]
    if inside:
        out[sl] = ndimage.distance_transform_edt(box, sampling=sampling_zyx) > r_mm
    else:
        out[sl] = ndimage.distance_transform_edt(~box, sampling=sampling_zyx) <= r_mm
    return out


def _components(mask: np.ndarray, sampling_zyx) -> tuple[np.ndarray, np.ndarray]:
    """Connected components (26-connectivity) of `mask`: (volume mm^3, elongation) per component.

    Elongation = sqrt(largest / smallest eigenvalue of the component's coordinate covariance in mm^2), 1 for a ball;
    one-voxel-thick components get the voxel size as their smallest spread so they are not infinitely elongated."""
    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return np.zeros(0), np.zeros(0)
    ids = np.arange(1, n + 1)
    voxel_mm3 = float(np.prod(sampling_zyx))
    count = ndimage.sum_labels(np.ones_like(lab, np.float64), lab, ids)
    coords = [np.arange(s, dtype=np.float64).reshape([-1 if a == ax else 1 for a in range(3)]) * sp
              for ax, (s, sp) in enumerate(zip(mask.shape, sampling_zyx))]
    grids = [np.broadcast_to(c, mask.shape) for c in coords]
    mean = [ndimage.sum_labels(g, lab, ids) / count for g in grids]
    cov = np.zeros((n, 3, 3))
    for a in range(3):
        for b in range(a, 3):
            m = ndimage.sum_labels(grids[a] * grids[b], lab, ids) / count - mean[a] * mean[b]
            cov[:, a, b] = cov[:, b, a] = m
    cov += np.diag([s * s / 12.0 for s in sampling_zyx])[None]     # a voxel's own spread
    ev = np.linalg.eigvalsh(cov)
    return count * voxel_mm3, np.sqrt(ev[:, -1] / np.maximum(ev[:, 0], 1e-9))


def _diameter_mm(volume_mm3: np.ndarray) -> np.ndarray:
    return np.cbrt(6.0 * volume_mm3 / np.pi)


def _fractions(values: np.ndarray, edges) -> list[float]:
    if values.size == 0:
        return [0.0] * (len(edges) - 1)
    return list(np.histogram(values, bins=edges)[0] / values.size)


# ---- the features ------------------------------------------------------------------------------------------------

def study_features(hu: np.ndarray, masks: dict[str, np.ndarray], spacing_xyz) -> np.ndarray:
    """~50 hand-made features of one study: hu float32 HU (z, y, x), masks from engine.phantom.phantom_masks,
    spacing (x, y, z) mm. Densities are fractions of a region, sizes mm or mm^3 (log1p), counts per litre of lung."""
    sp = tuple(float(s) for s in spacing_xyz[::-1])                  # (z, y, x) mm for the array axes
    vv = float(np.prod(sp))
    lungs, heart, aorta, bone = masks["lungs"], masks["heart"], masks["aorta"], masks["bone"]
    lung_l = max(lungs.sum() * vv / 1e6, 1e-3)
    lung_hu = hu[lungs]
    f: list[float] = []
    # lung density: histogram, percentiles, upper vs lower half low-attenuation area
    f += _fractions(lung_hu, LUNG_HU_EDGES)
    f += list(np.percentile(lung_hu, [2, 10, 50, 90, 98]) / 1000.0) if lung_hu.size else [0.0] * 5
    zs = np.nonzero(lungs.any(axis=(1, 2)))[0]
    mid = (zs.min() + zs.max()) // 2 if zs.size else 0
    for half in (slice(None, mid), slice(mid, None)):
        h = hu[half][lungs[half]]
        f.append(float((h < -950).mean()) if h.size else 0.0)
    # emphysema-like clusters of < -950 HU
    laa = (hu < -950) & lungs                                           # low-attenuation lung (LAA-950)
    vol, elong = _components(laa, sp)
    big = vol >= 50.0
    f += [np.log1p(big.sum() / lung_l), np.log1p(vol.max() if vol.size else 0.0),
          np.log1p(((vol >= 20) & (elong > 3)).sum() / lung_l)]          # tubular air: airways
    # compact bright foci deep in the lung (nodules) vs the branching vessels, and compact ground glass
    deep = _within_mm(lungs, 3.0, sp, inside=True)
    for lo, hi in ((-400, 4000), (-750, -400)):
        vol, elong = _components((hu > lo) & (hu < hi) & deep, sp)
        d = _diameter_mm(vol)
        compact = (elong < 2.0) & (d >= 3.0) & (d <= 30.0)
        f += [np.log1p(compact.sum() / lung_l), np.log1p(vol[compact].sum()),
              float(d[compact].max()) if compact.any() else 0.0, np.log1p(len(vol) / lung_l),
              float(vol.max() / vol.sum()) if vol.size else 0.0]
    # airway walls: soft tissue within 2 mm of tubular air
    ring = _within_mm(laa, 2.0, sp) & ~laa & lungs
    f.append(float((hu[ring] > -500).mean()) if ring.any() else 0.0)
    # subpleural lung vs central lung
    periph = masks["peripheral_lung"] & lungs
    central = lungs & ~periph
    f += _fractions(hu[periph], (-4000, -750, -300, 4000))[1:]
    f.append((hu[periph].mean() - hu[central].mean()) / 1000.0 if periph.any() and central.any() else 0.0)
    # mediastinum outside heart and aorta: fat / soft tissue / calcium / air, and round soft-tissue masses (nodes)
    med = masks["mediastinum"] & ~heart & ~aorta & ~bone
    f += _fractions(hu[med], (-4000, -500, -200, -30, 100, 130, 4000))
    vol, elong = _components((hu > -10) & (hu < 100) & med, sp)
    d = _diameter_mm(vol)
    nodes = (d >= 10.0) & (elong < 2.5)
    f += [np.log1p(nodes.sum()), float(d[nodes].max()) if nodes.any() else 0.0]
    # hiatus: air or fluid in the lower mediastinum
    med_z = np.nonzero(med.any(axis=(1, 2)))[0]
    if med_z.size:
        low = np.zeros_like(med)
        cut = med_z.min() + (med_z.max() - med_z.min()) // 3
        low[:cut] = med[:cut]
        f += _fractions(hu[low], (-4000, -200, -30, 100, 4000)) if low.any() else [0.0] * 4
    else:
        f += [0.0] * 4
    # heart: size, cardiothoracic ratio, calcium on its surface, fluid around it
    f.append(np.log1p(heart.sum() * vv))
    body_w = masks["body"].any(axis=(0, 1)).sum()
    f.append(float(heart.any(axis=(0, 1)).sum() / max(body_w, 1)))
    shell = _within_mm(heart, 5.0, sp) & ~bone
    f += [float((hu[shell] > 150).mean()) if shell.any() else 0.0,
          float(hu[shell].max() / 1000.0) if shell.any() else 0.0]
    sac = _within_mm(heart, 8.0, sp) & ~heart & ~lungs & ~bone
    f.append(float(((hu[sac] > 0) & (hu[sac] < 40)).mean()) if sac.any() else 0.0)
    # aortic wall calcium
    wall = _within_mm(aorta, 3.0, sp) & ~bone
    f += [float((hu[wall] > 150).mean()) if wall.any() else 0.0, float(hu[wall].max() / 1000.0) if wall.any() else 0.0]
    # pleural space: fluid-density tissue just outside the lungs
    pleura = _within_mm(lungs, 15.0, sp) & masks["body"] & ~lungs & ~masks["mediastinum"] & ~bone
    fluid = pleura & (hu > -10) & (hu < 40)
    f += [float(fluid.sum() / max(pleura.sum(), 1)), np.log1p(fluid.sum() * vv / 1e3)]
    # medical material: metal or dense material outside bone
    not_bone = masks["body"] & ~_within_mm(bone, 2.0, sp)
    f += [np.log1p((hu[not_bone] > 2000).sum() * vv), np.log1p((hu[not_bone] > 600).sum() * vv)]
    return np.asarray(f, np.float64)


# ---- running it --------------------------------------------------------------------------------------------------

def _one(job: tuple[int, int]) -> dict:
    """Render study `seed` on the demo grid times `scale` and return its features and labels (runs in a worker)."""
    from engine.errors import UserError
    from engine.phantom import make_study, phantom_masks
    seed, scale = job
    shape = tuple(n * scale for n in DEMO_SHAPE_ZYX)
    t0 = time.time()
    try:
        study = make_study(seed, shape_zyx=shape, with_report=False)
        masks = phantom_masks(seed, shape_zyx=shape, findings=study.findings)
    except (UserError, ValueError, IndexError, RuntimeError) as err:   # a seed the phantom cannot draw (as the cache)
        return {"seed": seed, "scale": scale, "failed": f"{type(err).__name__}: {err}"}
    feats = study_features(study.volume.array, masks, study.volume.spacing)
    return {"seed": seed, "scale": scale, "labels": [n for n in LABELS if n in set(study.labels)],
            "features": [round(float(v), 6) for v in feats], "seconds": round(time.time() - t0, 2)}


def _init_worker():
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def run(n: int, scales: list[int], out: Path, workers: int = 2) -> dict:
    from tqdm import tqdm
    from training.evaluate import linear_probe_auroc
    log = out.with_suffix(".features.jsonl")
    done = {}
    if log.exists():
        for line in log.read_text().splitlines():
            try:
                r = json.loads(line)
                done[(r["seed"], r["scale"])] = r
            except (json.JSONDecodeError, KeyError):                # a torn last line from an interrupted run
                pass
    todo = [(SEED_BASE + i, s) for s in scales for i in range(n) if (SEED_BASE + i, s) not in done]
    with log.open("a") as fh, get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
        for r in tqdm(pool.imap_unordered(_one, todo), total=len(todo), desc="render + features", unit="study"):
            done[(r["seed"], r["scale"])] = r
            fh.write(json.dumps(r) + "\n")
            fh.flush()
    seeds = [SEED_BASE + i for i in range(n)
             if all("features" in done.get((SEED_BASE + i, s), {}) for s in scales)]
    result = {"n": len(seeds), "seeds": f"{seeds[0]}..{seeds[-1]}" if seeds else "", "probe": "5-fold logistic",
              "by_scale": {}}
    for s in scales:
        x = np.array([done[(seed, s)]["features"] for seed in seeds])
        y = np.array([[n in done[(seed, s)]["labels"] for n in LABELS] for seed in seeds])
        probe = linear_probe_auroc(x, y)
        shape = [d * s for d in DEMO_SHAPE_ZYX]
        result["by_scale"][str(s)] = {
            "grid_zyx": shape, "spacing_xyz_mm": [round(f / m, 3) for f, m in zip(FOV_XYZ_MM, shape[::-1])],
            "n_features": int(x.shape[1]), "macro_auroc": round(probe["macro"], 4),
            "per_label": {k: round(v, 4) for k, v in probe["per_label"].items()},
            "n_positive": {k: int(y[:, j].sum()) for j, k in enumerate(LABELS)},
            "median_seconds_per_study": float(np.median([done[(seed, s)]["seconds"] for seed in seeds]))}
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.probe_resolution", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=400, help="studies per grid (default 400)")
    p.add_argument("--scales", type=int, nargs="+", default=[1, 2], help="grid refinements of the demo grid")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "resolution_probe.json")
    a = p.parse_args(argv)
    if a.n < 20 or any(s < 1 or s > 4 for s in a.scales):
        print(json.dumps({"error": "Use --n of at least 20 and --scales between 1 and 4."}))
        return 2
    r = run(a.n, a.scales, a.out, a.workers)
    print(json.dumps({s: {"macro_auroc": v["macro_auroc"]} for s, v in r["by_scale"].items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
