"""Evaluation of the generator: writes GENERATOR/metrics.json.

    python -m training generate-eval [--generator assets/generator] [--n 60] [--n-sweep 24] [--ablation DIR]

Protocol. Held-out phantom studies: the CT CLIP's test split (training/ctclip_data.py test seeds, never trained on by
any model; the cache cache/ctclip-demo/test that ctclip-eval reads). Each study's report is generated with the
pipeline's defaults (steps, guidance 5) and seed = its index, so the run is reproducible voxel for voxel.

- Factual correctness (Text2CT's "CT-Net AUC", with the demo CT CLIP as the reader): the CT CLIP's zero-shot
  probabilities on the GENERATED volumes scored against the reports' labels (macro AUROC, training/evaluate.py's
  zero_shot_metrics), next to the same reader on the REAL phantoms of those reports, and on the real phantoms passed
  through the autoencoder (encode -> decode: the ceiling the latent space leaves the diffusion model). Demo target:
  generated >= 0.9 x real (the paper: 0.745 vs 0.751).
- FID 3-D: Frechet distance (MONAI's get_fid_score) between generated and real feature sets. Feature extractor
  (documented choice): the demo CT CLIP's unit image latent (256-d), projected on the real set's top
  `FID3D_COMPONENTS` principal axes (60 studies cannot give a full-rank 256-d covariance). Reference points in the same units: the
  autoencoder's reconstructions vs real, and one half of the real studies vs the other (the sampling floor).
- FID 2.5-D: per plane (axial, coronal, sagittal), `SLICES_PER_PLANE` evenly spaced slices of every volume, each
  windowed [-1000, 1000] HU, resized to 128 x 128 pixels (not aspect-corrected: the same for both sets) and
  standardised as a radiograph is, through the demo chest X-ray encoder's ResNet trunk (assets/x2ct, trained on
  radiographs simulated from these phantoms); FID per plane and their mean. Text2CT / MAISI use RadImageNet's
  ResNet-50 (2.5-D) and MedicalNet (3-D); neither is available offline, so these numbers compare our runs with each
  other, NOT with the paper's.
- Reader sensitivity (how sharp a volume must be for the reader): the same real phantoms after known blurs, read
  again (`DEGRADATIONS`: a Gaussian of 0.7 voxel SD; averaging 2 x 2 x 2 or 4 x 4 x 4 voxels then trilinear
  upsampling back). A generator or autoencoder blurrier than one of these should not be expected to beat its AUROC.
- Guidance sweep 0..10: factual correctness and FID 3-D of the first `n_sweep` studies at each scale.
- Ablation "text encoder not aligned with CT" (`--ablation DIR`: a generator folder whose U-Net was trained with
  `python -m training ldm --context-encoder minilm-mean`): its factual correctness on the same studies.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engine.labels import LABELS
from engine.settings import training_cache_dir
from engine.volume import Volume

GUIDANCE_SCALES = (0.0, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0)
SLICES_PER_PLANE = 8
FID3D_COMPONENTS = 16
DEGRADATIONS = {"gaussian_blur_0.7_voxel": ("gaussian", 0.7), "average_2x_then_trilinear": ("average", 2),
                "average_4x_then_trilinear": ("average", 4)}
TARGETS = {"factual_correctness_ratio": {"min": 0.9, "note": "generated macro AUROC >= 0.9 x real phantoms'"}}


# -------------------------------------------------------------------------------------------------- metrics
def fid(features_a: np.ndarray, features_b: np.ndarray, components: int | None = None) -> float:
    """Frechet distance between two (N, D) feature sets (MONAI's get_fid_score: means and covariances); with
    `components`, both sets are first projected on the top principal axes of features_b (the reference), which
    keeps the covariances full-rank when N is not much larger than D."""
    from monai.metrics.fid import get_fid_score

    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    if components:
        centre = b.mean(axis=0)
        axes = np.linalg.svd(b - centre, full_matrices=False)[2][:components].T
        a, b = (a - centre) @ axes, (b - centre) @ axes
    return float(get_fid_score(torch.from_numpy(a), torch.from_numpy(b)))


def fid3d(latents, real_latents) -> float:
    """FID 3-D of CT CLIP image latents against the real studies' (FID3D_COMPONENTS principal axes)."""
    return fid(np.array(latents), np.asarray(real_latents), components=FID3D_COMPONENTS)


def factual_correctness(probabilities: np.ndarray, labels: np.ndarray) -> dict:
    """Zero-shot metrics (AUROC per label and macro) of the CT CLIP's reading (N, 18) against labels (N, 18)."""
    from training.evaluate import zero_shot_metrics

    return zero_shot_metrics(probabilities, labels, LABELS)


def degraded(hu: np.ndarray, kind: str, amount: float) -> np.ndarray:
    """A (z, y, x) HU array blurred by a known amount, same shape: "gaussian" (SD `amount` voxels, scipy) or
    "average" (mean of `amount`^3-voxel blocks, then trilinear upsampling back; torch). The grid must be a multiple
    of the block for "average"."""
    from scipy import ndimage

    hu = np.asarray(hu, dtype=np.float32)
    if kind == "gaussian":
        return ndimage.gaussian_filter(hu, amount, mode="nearest")
    if kind == "average":
        block = int(amount)
        t = torch.from_numpy(hu)[None, None]
        pooled = torch.nn.functional.avg_pool3d(t, block)
        upsampled = torch.nn.functional.interpolate(pooled, size=hu.shape, mode="trilinear", align_corners=False)
        return upsampled[0, 0].numpy()
    raise ValueError(f"unknown degradation {kind!r}")


def plane_slices(hu: np.ndarray, n: int = SLICES_PER_PLANE) -> dict[str, list[np.ndarray]]:
    """n evenly spaced interior slices of a (z, y, x) HU array per plane: axial (y, x), coronal (z, x), sagittal
    (z, y)."""
    def pick(size):
        return np.linspace(0, size - 1, n + 2)[1:-1].round().astype(int)

    z, y, x = hu.shape
    return {"axial": [hu[k] for k in pick(z)], "coronal": [hu[:, k, :] for k in pick(y)],
            "sagittal": [hu[:, :, k] for k in pick(x)]}


@torch.inference_mode()
def slice_features(volumes: list[np.ndarray], encoder) -> dict[str, np.ndarray]:
    """{plane: (N * SLICES_PER_PLANE, c)} mean-pooled trunk features of the chest X-ray encoder (FID 2.5-D)."""
    from skimage.transform import resize

    from engine.radiograph import Radiograph

    size = encoder.config.image_size
    out: dict[str, list] = {"axial": [], "coronal": [], "sagittal": []}
    for hu in volumes:
        for plane, images in plane_slices(hu).items():
            batch = []
            for image in images:
                unit = (np.clip(image, -1000, 1000) + 1000) / 2000
                pixels = resize(unit.astype(np.float32), (size, size), anti_aliasing=True)
                batch.append(encoder.prepare(Radiograph(pixels, (1.0, 1.0))))
            out[plane].append(encoder.feature_map(torch.stack(batch)).mean(dim=(2, 3)).numpy())
    return {plane: np.concatenate(rows) for plane, rows in out.items()}


def fid_2_5d(generated: list[np.ndarray], real: list[np.ndarray], encoder) -> dict:
    """FID per plane and their mean, on slice features (see the module docstring for the extractor)."""
    a, b = slice_features(generated, encoder), slice_features(real, encoder)
    planes = {plane: fid(a[plane], b[plane]) for plane in a}
    return {**planes, "mean": float(np.mean(list(planes.values())))}


# ---------------------------------------------------------------------------------------------- the studies
def held_out_studies(n: int, reader, cache_root: Path | None = None):
    """The first n studies of the CT CLIP's test cache (rendered there when missing): (volumes, reports, labels)."""
    from training.ctclip_data import held_out_cache

    root = Path(cache_root or training_cache_dir() / "ctclip-demo") / "test"
    cache = held_out_cache(root, reader.model.preprocessing, n)
    spacing = cache.spacing_xyz
    volumes = [phantom_volume(np.asarray(cache.hu(i), dtype=np.float32), spacing) for i in range(len(cache))]
    return volumes, [r["report"] for r in cache.records], cache.label_matrix()


def phantom_volume(hu: np.ndarray, spacing_xyz) -> Volume:
    """A cached phantom as a Volume centred on the origin (as generated volumes are)."""
    origin = tuple(-(n - 1) * s / 2 for n, s in zip(hu.shape[::-1], spacing_xyz))
    return Volume(hu, tuple(spacing_xyz), origin, source="phantom")


class Reading:
    """What the reader sees in a set of volumes: zero-shot probabilities (N, 18), image latents (N, D), HU arrays."""

    def __init__(self):
        self.probs, self.latents, self.arrays = [], [], []

    def add(self, reader, volume: Volume) -> None:
        latent = reader.embed_volume(volume)
        reading = reader.zero_shot_from_latent(latent)
        self.probs.append([reading[label] for label in LABELS])
        self.latents.append(latent)
        self.arrays.append(volume.array)

    def scores(self, labels: np.ndarray) -> dict:
        return factual_correctness(np.array(self.probs), labels[:len(self.probs)])


def generate_readings(pipeline, reports: list[str], guidance: float, steps: int | None, desc: str) -> Reading:
    """Generate each report (seed = its index) and read the volume."""
    reading = Reading()
    for i, report in enumerate(tqdm(reports, desc=desc, unit="volume")):
        reading.add(pipeline.reader, pipeline.generate(report, steps=steps, guidance=guidance, seed=i).volume)
    return reading


def reconstructions(pipeline, volumes: list[Volume]) -> Reading:
    """Real phantoms through the autoencoder (encode as the U-Net's training latents were, decode as a generation
    is: GeneratePipeline.decode) and read: the latent space's ceiling."""
    from engine.models.vae import hu_to_unit

    reading = Reading()
    for volume in tqdm(volumes, desc="autoencoder", unit="volume"):
        with torch.inference_mode():
            latent = pipeline.vae.encode(hu_to_unit(torch.from_numpy(volume.array))[None, None])
            unit = pipeline.decode(latent * pipeline.config.scale_factor)
        reading.add(pipeline.reader, pipeline.to_volume(unit))
    return reading


# --------------------------------------------------------------------------------------------- evaluation
def evaluate(generator_dir: Path | None = None, n: int = 60, n_sweep: int = 24, steps: int | None = None,
             guidance: float = 5.0, scales=GUIDANCE_SCALES, ablation_dir: Path | None = None,
             cache_root: Path | None = None, out: Path | None = None, write: bool = True) -> dict:
    """Every metric of the module docstring; written to GENERATOR/metrics.json (or `out`)."""
    from engine.pipelines.cxr import CXRPipeline
    from engine.pipelines.generate import GeneratePipeline
    from engine.settings import generator_dir as default_generator_dir
    from training.evaluate import write_metrics_json

    t0 = time.time()
    generator_dir = Path(generator_dir or default_generator_dir())
    pipeline = GeneratePipeline.from_pretrained(generator_dir)
    reader = pipeline.reader
    volumes, reports, labels = held_out_studies(max(n, n_sweep), reader, cache_root)
    volumes, reports, labels = volumes[:n], reports[:n], labels[:n]
    real = Reading()
    for volume in tqdm(volumes, desc="real phantoms", unit="volume"):
        real.add(reader, volume)
    sensitivity = {}
    for name, (kind, amount) in DEGRADATIONS.items():
        blurred = Reading()
        for volume in tqdm(volumes, desc=name, unit="volume"):
            blurred.add(reader, phantom_volume(degraded(volume.array, kind, amount), volume.spacing))
        sensitivity[name] = blurred.scores(labels)["macro"]["auroc"]
    recon = reconstructions(pipeline, volumes)
    generated = generate_readings(pipeline, reports, guidance, steps, f"generating (guidance {guidance:g})")
    scores = {name: reading.scores(labels) for name, reading in
              (("generated", generated), ("real", real), ("autoencoder", recon))}
    macro = {name: s["macro"]["auroc"] for name, s in scores.items()}
    half = len(volumes) // 2
    real_latents, x2ct = np.array(real.latents), CXRPipeline.from_pretrained(ctclip=reader).encoder.eval()
    metrics = {
        "factual_correctness_macro_auroc": macro,
        "factual_correctness_ratio": macro["generated"] / macro["real"],
        "reader_sensitivity_macro_auroc": {"real": macro["real"], **sensitivity},
        "factual_correctness_per_label": {label: {name: s["per_label"][label]["auroc"] for name, s in scores.items()}
                                          for label in LABELS},
        "fid_3d_ctclip_latent": {"generated": fid3d(generated.latents, real_latents),
                                 "autoencoder": fid3d(recon.latents, real_latents),
                                 "real_half_vs_half": fid3d(real_latents[:half], real_latents[half:])},
        "fid_2_5d_x2ct_trunk": {"generated": fid_2_5d(generated.arrays, real.arrays, x2ct),
                                "autoencoder": fid_2_5d(recon.arrays, real.arrays, x2ct)},
        "targets": TARGETS,
    }
    metrics["guidance_sweep"] = guidance_sweep(pipeline, reports[:n_sweep], labels[:n_sweep], real_latents[:n_sweep],
                                               steps, scales, reuse={guidance: generated})
    if ablation_dir:
        ablation = GeneratePipeline.from_pretrained(ablation_dir, ctclip=reader)
        unaligned = generate_readings(ablation, reports, guidance, steps, "ablation (unaligned text)")
        metrics["ablation_text_encoder_not_aligned"] = {
            "context_encoder": ablation.config.context_encoder,
            "factual_correctness_macro_auroc": unaligned.scores(labels)["macro"]["auroc"],
            "fid_3d_ctclip_latent": fid3d(unaligned.latents, real_latents)}
    if write:
        write_metrics_json(Path(out or generator_dir / "metrics.json"), metrics, n=len(volumes),
                           split="phantom test seeds (CT CLIP test cache, held out)", guidance=guidance,
                           steps=steps or pipeline.config.default_steps, eval_seconds=time.time() - t0)
    return metrics


def guidance_sweep(pipeline, reports, labels, real_latents, steps, scales, reuse: dict | None = None) -> list[dict]:
    """Factual correctness (macro AUROC) and FID 3-D at each guidance scale (Text2CT: precision peaks near 5)."""
    rows = []
    for scale in scales:
        known = (reuse or {}).get(scale)
        reading = Reading()
        if known is not None:
            reading.probs, reading.latents = known.probs[:len(reports)], known.latents[:len(reports)]
        else:
            reading = generate_readings(pipeline, reports, scale, steps, f"sweep (guidance {scale:g})")
        rows.append({"guidance": scale, "factual_correctness_macro_auroc": reading.scores(labels)["macro"]["auroc"],
                     "fid_3d_ctclip_latent": fid3d(reading.latents, real_latents)})
    return rows
