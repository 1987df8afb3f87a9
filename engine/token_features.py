"""A frozen, physics-informed front end for the demo CT-ViT: per-token features computed once per volume.

`token_features(hu, spacing_xyz)` turns a chest CT in HU on the demo grid (z, y, x) = (64, 128, 128) into an array
(t, h, w, F) float32 on exactly the CT-ViT's token grid: token (k, j, i) covers voxels [8k, 8k+8) x [16j, 16j+16) x
[16i, 16i+16) (z, y, x), so a learned layer on top keeps the token grid (and the exact heat map). Nothing here is
learned; the features are what classic CT computer-aided detection measures, in physical units:

- HU window shares (`share_*`, fraction 0-1 of the token's voxels) over windows that go up to metal: air, emphysema
  (< -950 HU), lung, ground glass, fat, fluid, soft tissue, contrast / low calcium, dense calcium, bone, metal
  (>= 1800 HU; the CT-CLIP clip at 1000 HU throws this away). `logshare_*` = log(share + 1/(2 x voxels per token)),
  because the marks of emphysema, calcium or metal are rare voxel classes (about 1 % of a token).
- HU statistics per token (`hu_*`, HU): mean, SD, min, max and the 5th / 50th / 95th percentiles.
- Hessian shape measures at several Gaussian scales sigma (mm) of the HU image clipped to [-1000, 400] HU (so bone
  and metal do not swamp lung structure): with the Hessian's eigenvalues l1 <= l2 <= l3 (HU / mm^2) scaled by
  sigma^2 (so every measure is in HU and comparable across scales),
  bright blob = max(0, -l3) (all three curvatures negative: a nodule, a node, a calcified plaque),
  bright tube = max(0, -l2) - max(0, -l3) (two negative, one flat: a vessel, a wire),
  bright plate = max(0, -l1) - max(0, -l2) (one negative: a septal line, a fissure, a pleural rind),
  dark blob = max(0, l1) (all positive: a bulla, an emphysematous hole, a cyst),
  the Laplacian of Gaussian, LoG = -sigma^2 (l1 + l2 + l3) (HU; positive on bright blobs and tubes), and the
  gradient magnitude `edge` (HU / mm: interfaces, septal lines, reticulation). A ball of radius r answers most at
  sigma = r / sqrt(3): 2.5 / 4 / 6 mm suit radii of about 4 / 7 / 10 mm; smaller nodules still answer at 2.5 mm,
  more weakly (the in-plane voxel is 2.7 mm).
- Texture: the local SD (HU) at two Gaussian scales (parenchymal texture).
Every voxel map is pooled per token by its mean (`*_mean`) and its maximum (`*_max`).

Cost (CPU, one thread, measured under load): about 0.4 s per demo volume for the full set (docs/token_features.md
has the table per group); the `fast` preset (shares, HU statistics, Hessian at 4 mm, texture at 3 mm) 0.14 s. The
per-scale maps are independent and scipy's filters release the GIL, so they run on `workers` threads (default
torch's thread count, which the training caches set to 1): the same array, 0.35 -> 0.22 s on lung1's demo grid
with two threads (idle machine, median of 7).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
from scipy import ndimage

from engine.errors import UserError

HU_FLOOR, HU_CEIL = -1024.0, 3071.0          # the scanner's range (12-bit CT): the phantom and real CTs stay inside


@dataclass(frozen=True)
class TokenFeatureConfig:
    """What to compute. Patch sizes in voxels (z, y, x); HU edges in HU; filter scales in mm."""
    patch_zyx: tuple[int, int, int] = (8, 16, 16)
    # Window edges (HU): bins are [-inf, e0), [e0, e1), ..., [e_last, inf), named by `window_names`.
    hu_edges: tuple[float, ...] = (-980.0, -950.0, -700.0, -300.0, -150.0, -30.0, 25.0, 130.0, 400.0, 1000.0,
                                   1800.0)
    window_names: tuple[str, ...] = ("air", "emphysema", "lung", "ground_glass", "transition", "fat", "fluid",
                                     "soft_tissue", "contrast_calcium", "dense_calcium", "bone", "metal")
    log_shares: bool = True
    hu_percentiles: tuple[float, ...] = (5.0, 50.0, 95.0)
    hessian_sigmas_mm: tuple[float, ...] = (2.5, 4.0, 6.0)
    shape_clip_hu: tuple[float, float] = (-1000.0, 400.0)   # the image the Hessian, edges and texture look at
    texture_sigmas_mm: tuple[float, ...] = (3.0, 8.0)

    @classmethod
    def demo(cls) -> "TokenFeatureConfig":
        """The full set on the demo CT-ViT's token grid (8 x 16 x 16 voxels per token)."""
        return cls()

    @classmethod
    def fast(cls) -> "TokenFeatureConfig":
        """A cheaper set for inference: shares, HU statistics, one Hessian scale (with its edges), one texture scale."""
        return cls(hessian_sigmas_mm=(4.0,), texture_sigmas_mm=(3.0,))


SHAPE_MEASURES = ("blob", "tube", "plate", "dark_blob", "log", "edge")


def feature_names(config: TokenFeatureConfig | None = None) -> list[str]:
    """The F feature names, in the order of the last axis of `token_features`."""
    c = config or TokenFeatureConfig.demo()
    names = [f"share_{w}" for w in c.window_names]
    if c.log_shares:
        names += [f"logshare_{w}" for w in c.window_names]
    names += ["hu_mean", "hu_sd", "hu_min", "hu_max"] + [f"hu_p{int(q):02d}" for q in c.hu_percentiles]
    for s in c.hessian_sigmas_mm:
        names += [f"{m}_s{s:g}_{pool}" for m in SHAPE_MEASURES for pool in ("mean", "max")]
    for s in c.texture_sigmas_mm:
        names += [f"texture_s{s:g}_{pool}" for pool in ("mean", "max")]
    return names


FEATURE_NAMES: list[str] = feature_names()


def token_features(hu: np.ndarray, spacing_xyz, config: TokenFeatureConfig | None = None,
                   workers: int | None = None) -> np.ndarray:
    """(z, y, x) HU array, spacing (x, y, z) mm -> (t, h, w, F) float32 per-token features (see FEATURE_NAMES).

    The array's shape must be a multiple of the patch size (the demo grid 64 x 128 x 128 gives 8 x 8 x 8 tokens).
    Units per feature: shares 0-1, log-shares natural log of a share, HU statistics and shape measures in HU,
    edges in HU / mm, texture in HU. `workers`: threads for the per-scale maps (default torch.get_num_threads());
    the result does not depend on it.
    """
    c = config or TokenFeatureConfig.demo()
    hu = np.asarray(hu)
    if hu.ndim != 3 or any(n % p or n == 0 for n, p in zip(hu.shape, c.patch_zyx)):
        raise UserError(f"The CT's grid {tuple(hu.shape)} is not a whole number of {c.patch_zyx}-voxel tokens.")
    if len(c.window_names) != len(c.hu_edges) + 1:
        raise ValueError("window_names needs one name more than hu_edges")
    spacing_zyx = np.array(spacing_xyz, dtype=np.float64)[::-1]
    hu = np.clip(hu.astype(np.float32, copy=False), HU_FLOOR, HU_CEIL)
    blocks = _blocks(hu, c.patch_zyx)                       # (t, h, w, voxels per token)
    parts = [_window_shares(blocks, c), _hu_statistics(blocks, c)]
    shape_image = np.clip(hu, *c.shape_clip_hu)
    jobs = [partial(_pooled_hessian, shape_image, s, spacing_zyx, c.patch_zyx) for s in c.hessian_sigmas_mm]
    jobs += [partial(_pooled_texture, shape_image, s, spacing_zyx, c.patch_zyx) for s in c.texture_sigmas_mm]
    if workers is None:
        import torch

        workers = torch.get_num_threads()
    if workers > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            parts += list(pool.map(lambda job: job(), jobs))      # map keeps the feature order
    else:
        parts += [job() for job in jobs]
    return np.concatenate(parts, axis=-1).astype(np.float32)


def _pooled_hessian(image, sigma_mm, spacing_zyx, patch_zyx) -> np.ndarray:
    """The Hessian shape maps at one scale, pooled per token."""
    pz, py, px = patch_zyx
    maps, stride = _hessian_shape_maps(image, sigma_mm, spacing_zyx)
    return _pooled(maps, (pz, py // stride, px // stride))


def _pooled_texture(image, sigma_mm, spacing_zyx, patch_zyx) -> np.ndarray:
    """The local SD at one scale, pooled per token."""
    return _pooled([_local_sd(image, sigma_mm, spacing_zyx)], patch_zyx)


# ------------------------------------------------------------------------------------------------ per-token pieces

def _blocks(volume: np.ndarray, patch_zyx) -> np.ndarray:
    """(z, y, x) -> (t, h, w, pz * py * px): each token's voxels on the last axis (a view when possible)."""
    pz, py, px = patch_zyx
    t, h, w = volume.shape[0] // pz, volume.shape[1] // py, volume.shape[2] // px
    return volume.reshape(t, pz, h, py, w, px).transpose(0, 2, 4, 1, 3, 5).reshape(t, h, w, pz * py * px)


def _window_shares(blocks: np.ndarray, c: TokenFeatureConfig) -> np.ndarray:
    """Share of each token's voxels in each HU window (and its log, floored at half a voxel)."""
    n_voxels = blocks.shape[-1]
    below = np.stack([(blocks < e).mean(axis=-1) for e in c.hu_edges], axis=-1)      # cumulative shares
    cumulative = np.concatenate([below, np.ones(blocks.shape[:3] + (1,))], axis=-1)
    shares = np.diff(cumulative, axis=-1, prepend=0.0)
    if not c.log_shares:
        return shares
    return np.concatenate([shares, np.log(shares + 0.5 / n_voxels)], axis=-1)


def _hu_statistics(blocks: np.ndarray, c: TokenFeatureConfig) -> np.ndarray:
    """Mean, SD, min, max and percentiles of each token's HU."""
    stats = [blocks.mean(axis=-1), blocks.std(axis=-1), blocks.min(axis=-1), blocks.max(axis=-1)]
    stats += list(np.percentile(blocks, c.hu_percentiles, axis=-1))
    return np.stack(stats, axis=-1)


def _pooled(maps: list[np.ndarray], patch_zyx) -> np.ndarray:
    """Each (z, y, x) map -> its per-token mean and max: (t, h, w, 2 * len(maps)) as [m0 mean, m0 max, m1 ...]."""
    out = []
    for m in maps:
        b = _blocks(m, patch_zyx)
        out += [b.mean(axis=-1), b.max(axis=-1)]
    return np.stack(out, axis=-1)


# ------------------------------------------------------------------------------------------------ voxel maps

def _sigma_voxels(sigma_mm: float, spacing_zyx: np.ndarray) -> tuple[float, ...]:
    return tuple(float(s) for s in sigma_mm / spacing_zyx)


def _hessian_shape_maps(image: np.ndarray, sigma_mm: float, spacing_zyx: np.ndarray) -> tuple[list[np.ndarray], int]:
    """Scale-normalised Hessian measures (HU) and the gradient magnitude (HU / mm) at one scale, and the in-plane
    stride of the maps (1, or 2 when sigma spans 1.4 voxels or more in-plane: the Gaussian then passes < 8 % at the
    half-rate Nyquist frequency, so every other voxel loses next to nothing, and the maps cost a quarter).

    The Hessian is taken by central differences (np.gradient, in mm) of the Gaussian-smoothed image: one anisotropic
    Gaussian per scale instead of six derivative filters (skimage.feature.hessian_matrix takes one sigma in voxels,
    not per-axis mm); the eigenvalues come from `symmetric_eigenvalues_3x3` below.
    """
    sigma = _sigma_voxels(sigma_mm, spacing_zyx)
    smooth = ndimage.gaussian_filter(image, sigma, mode="nearest", truncate=3.0)
    stride = 2 if min(sigma[1:]) >= 1.4 else 1
    smooth = smooth[:, ::stride, ::stride]
    step = spacing_zyx * np.array([1, stride, stride])
    gz, gy, gx = np.gradient(smooth, *step)                           # HU / mm
    hzz, hzy, hzx = np.gradient(gz, *step)
    hyy, hyx = np.gradient(gy, *step[1:], axis=(1, 2))
    hxx = np.gradient(gx, step[2], axis=2)
    l1, l2, l3 = (sigma_mm ** 2 * e for e in symmetric_eigenvalues_3x3(hzz, hyy, hxx, hzy, hzx, hyx))
    zero = np.float32(0.0)
    neg1, neg2, neg3 = np.maximum(-l1, zero), np.maximum(-l2, zero), np.maximum(-l3, zero)
    edge = np.sqrt(gz * gz + gy * gy + gx * gx)
    return [neg3, neg2 - neg3, neg1 - neg2, np.maximum(l1, zero), -(l1 + l2 + l3), edge], stride


def symmetric_eigenvalues_3x3(a11, a22, a33, a12, a13, a23) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eigenvalues (ascending l1 <= l2 <= l3) of per-voxel symmetric 3 x 3 matrices given by their six entries.

    Written by hand (the closed trigonometric form, Smith 1961) because np.linalg.eigvalsh, which
    skimage.feature.hessian_matrix_eigvals calls, costs about 1.5 s per scale on the 1-million-voxel demo grid.
    """
    q = (a11 + a22 + a33) / 3.0
    b11, b22, b33 = a11 - q, a22 - q, a33 - q
    p1 = a12 * a12 + a13 * a13 + a23 * a23
    p = np.sqrt((b11 * b11 + b22 * b22 + b33 * b33 + 2.0 * p1) / 6.0)
    det = b11 * (b22 * b33 - a23 * a23) - a12 * (a12 * b33 - a23 * a13) + a13 * (a12 * a23 - b22 * a13)
    p_safe = np.maximum(p, np.float32(1e-12))
    r = np.clip(det / (2.0 * p_safe ** 3), -1.0, 1.0)
    phi = np.arccos(r) / 3.0
    largest = q + 2.0 * p * np.cos(phi)
    smallest = q + 2.0 * p * np.cos(phi + np.float32(2.0 * np.pi / 3.0))
    middle = 3.0 * q - largest - smallest
    return smallest, middle, largest


def _local_sd(image: np.ndarray, sigma_mm: float, spacing_zyx: np.ndarray) -> np.ndarray:
    """Local SD (HU) under a Gaussian window of sigma mm: sqrt(G * x^2 - (G * x)^2)."""
    sigma = _sigma_voxels(sigma_mm, spacing_zyx)
    mean = ndimage.gaussian_filter(image, sigma, mode="nearest", truncate=3.0)
    mean_sq = ndimage.gaussian_filter(image * image, sigma, mode="nearest", truncate=3.0)
    # float32 suffices: squares of <= 1000 HU carry an error of about 0.1 HU^2 against a noise variance of >= 100 HU^2
    return np.sqrt(np.maximum(mean_sq - mean * mean, np.float32(0.0)))
