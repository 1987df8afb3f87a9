"""Fit a CT CLIP checkpoint's out-of-distribution check (engine/ood.py) and measure it.

    python -m training ctclip-ood --checkpoint assets/ctclip [--cache DIR] [--n-fit 1000] [--n-calibrate 400]
                                  [--n-test 300] [--quantile 0.99] [--workers 2]

1. fit: the image latents of the first n_fit TRAINING-split phantoms (CACHE/train when the training cache holds that
   many finished studies, else rendered into CACHE/ood_fit with the training seeds 0, 1, ...) -> mean and Ledoit-Wolf
   shrunk precision matrix;
2. calibrate: the distances of n_calibrate HELD-OUT phantoms with seeds CALIBRATION_SEED_BASE + i (800_000 + i:
   never trained on, not in the fit, not the test split; CACHE/calibration) -> the threshold is their `quantile`;
3. write CHECKPOINT/latent_statistics.safetensors + latent_statistics.json;
4. measure: the flagged fraction of the ctclip-eval test split (its first n_test studies, CACHE/test, seeds
   TEST_SEED_BASE + i) and which real CTs in ../shared/data/ct are flagged, merged into CHECKPOINT/metrics.json
   under "ood" (every other key kept; run it after ctclip-eval, which rewrites that file).
Every latent comes from CTClipPipeline.embed_volume, the path the CLI and the app use (or, for a token-feature
checkpoint, the token features the phantom cache stored by that same path), so the statistics hold for whichever
image encoder the checkpoint has.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from engine.settings import shared_data, training_cache_dir

REAL_CT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".dcm")


def cache_latents(pipeline, cache, n: int, desc: str, progress: bool = True, every: int = 25) -> np.ndarray:
    """Unit image latents (n, D) of the first n finished studies of a PhantomCache, by the pipeline's own path.
    Kept next to the cache (CACHE_ROOT/ood_latents_<split>_<model_id>.npz, saved every `every` studies), so an
    interrupted or repeated run (another --quantile) encodes each study once per checkpoint. A token-feature
    checkpoint reads the features the cache stored (engine.transforms' TokenFeatures, computed once per study)."""
    import torch

    from engine.volume import Volume
    from training.eval_ctclip import feature_cache

    seeds = np.array([r["seed"] for r in cache.records[:n]], dtype=np.int64)
    store = cache.root.parent / f"ood_latents_{cache.meta['plan']['split']}_{pipeline.model_id}.npz"
    done = []
    if store.is_file():
        saved = np.load(store)
        k = min(len(saved["seeds"]), n)
        if np.array_equal(saved["seeds"][:k], seeds[:k]):
            done = list(saved["latents"][:k])
    features = feature_cache(cache, pipeline.preprocessing)
    bar = tqdm(total=n, initial=len(done), desc=desc, unit="study", disable=not progress)
    for i in range(len(done), n):
        if features is not None and features.has(i):     # the same engine path, computed once by the cache
            with torch.inference_mode():
                done.append(pipeline.model.encode_image(features.features_of(i)[None].float())[0].numpy())
        else:
            done.append(pipeline.embed_volume(Volume(array=cache.hu(i), spacing=cache.spacing_xyz)))
        bar.update(1)
        if (i + 1) % every == 0 or i + 1 == n:
            np.savez(store.with_suffix(".tmp.npz"), latents=np.stack(done), seeds=seeds[:len(done)])
            os.replace(store.with_suffix(".tmp.npz"), store)
    bar.close()
    return np.stack(done)


def phantom_split(root: Path, split: str, n: int, plan_size: int, preprocessing, workers: int,
                  progress: bool = True):
    """A PhantomCache of `split` with at least n finished studies, its first n kept (rendered when missing)."""
    from training.ctclip_data import CachePlan, PhantomCache, build_cache

    if not ((root / "meta.json").is_file() and len(PhantomCache(root)) >= n):
        build_cache(root, CachePlan(split, plan_size, 0, tuple(preprocessing.shape_zyx),
                                    tuple(preprocessing.spacing_xyz)), workers=workers, progress=progress)
    cache = PhantomCache(root)
    if len(cache) < n:
        raise RuntimeError(f"only {len(cache)} {split} studies rendered in {root} ({len(cache.failed)} seeds failed)")
    cache.records = cache.records[:n]
    return cache


def training_split(cache_root: Path, n: int, preprocessing, workers: int, progress: bool = True):
    """The first n training studies: from the training cache when it holds them (generated first, then real-report
    phantoms, as CTCLIPDataset sees them), else the training seeds rendered into CACHE/ood_fit."""
    from training.ctclip_data import PhantomCache

    train = cache_root / "train"
    if (train / "meta.json").is_file():
        cache = PhantomCache(train)
        if len(cache) >= n and tuple(cache.meta["plan"]["shape_zyx"]) == tuple(preprocessing.shape_zyx):
            cache.records = cache.records[:n]
            return cache
    return phantom_split(cache_root / "ood_fit", "train", n, n + spare_seeds(n), preprocessing, workers, progress)


def spare_seeds(n: int) -> int:
    """Seeds rendered beyond n, for any the phantom cannot draw (a failed seed is skipped, never replaced)."""
    return max(2, n // 20)


def real_ct_paths(directory: Path | None = None) -> list[Path]:
    """The real CTs of ../shared/data/ct (files whose names say CT image, not label masks)."""
    directory = Path(directory or shared_data() / "ct")
    return sorted(p for p in directory.iterdir()
                  if p.name.endswith(REAL_CT_SUFFIXES) and "label" not in p.name.lower())


def real_ct_checks(pipeline, paths: list[Path]) -> dict[str, dict]:
    """{file name: {"in_distribution", "ood_score"} or {"error": sentence}} for each real CT."""
    from engine.errors import UserError
    from engine.volume import read_ct

    out = {}
    for path in paths:
        try:
            latent = pipeline.embed_volume(read_ct(path))
        except UserError as err:
            out[path.name] = {"error": str(err)}
            continue
        out[path.name] = pipeline.distribution_check(latent).to_json()
    return out


def fit_ood(checkpoint: Path, cache_root: Path | None = None, n_fit: int = 1000, n_calibrate: int = 400,
            n_test: int = 300, quantile: float = 0.99, workers: int = 2, real_cts: list[Path] | None = None,
            progress: bool = True) -> dict:
    """Steps 1-4 of the module docstring. Returns the "ood" block merged into CHECKPOINT/metrics.json."""
    from engine.errors import UserError
    from engine.ood import LatentStatistics, fit_latent_statistics
    from engine.pipelines.ctclip import CTClipPipeline
    from training.ctclip_data import CALIBRATION_SEED_BASE, TEST_PLAN_SIZE
    from training.evaluate import merge_metrics_json

    if n_fit < 2 or n_calibrate < 1 or n_test < 0:
        raise UserError("--n-fit must be at least 2, --n-calibrate at least 1 and --n-test 0 or more.")
    if not 0.5 <= quantile < 1:
        raise UserError(f"--quantile must be at least 0.5 and below 1 (e.g. 0.99), not {quantile}.")
    t0 = time.time()
    checkpoint = Path(checkpoint)
    cache_root = Path(cache_root or training_cache_dir() / "ctclip-demo")
    pipeline = CTClipPipeline.from_pretrained(checkpoint)
    pre = pipeline.preprocessing
    fit_cache = training_split(cache_root, n_fit, pre, workers, progress)
    fit = cache_latents(pipeline, fit_cache, n_fit, "latents (fit, training phantoms)", progress)
    calibration_cache = phantom_split(cache_root / "calibration", "calibration", n_calibrate,
                                      n_calibrate + spare_seeds(n_calibrate), pre, workers, progress)
    calibration = cache_latents(pipeline, calibration_cache, n_calibrate, "latents (calibration, held out)", progress)
    seeds = {"fit": _seed_span(fit_cache), "calibration": _seed_span(calibration_cache)}
    stats = fit_latent_statistics(fit, calibration, quantile, info={
        "model_id": pipeline.model_id, "seeds": seeds, "fit_cache": str(fit_cache.root),
        "calibration_seed_base": CALIBRATION_SEED_BASE})
    stats.save(checkpoint)
    pipeline.__dict__.pop("latent_statistics", None)      # read back from the files, as the CLI will read them
    if not isinstance(pipeline.latent_statistics, LatentStatistics):
        raise RuntimeError(f"the statistics written to {checkpoint} do not load back")
    block = {"quantile": quantile, "threshold": stats.threshold, "n_fit": n_fit, "n_calibrate": n_calibrate,
             "shrinkage": stats.info["shrinkage"], "seeds": seeds,
             "calibration_flag_rate": stats.info["calibration_flag_rate"]}
    if n_test:
        test_cache = phantom_split(cache_root / "test", "test", n_test, TEST_PLAN_SIZE, pre, workers, progress)
        test = cache_latents(pipeline, test_cache, n_test, "latents (ctclip-eval test split)", progress)
        scores = pipeline.latent_statistics.distances(test) / stats.threshold
        block["test"] = {"n": n_test, "seeds": _seed_span(test_cache), "flag_rate": float(np.mean(scores > 1)),
                         "ood_score_median": float(np.median(scores)), "ood_score_max": float(scores.max())}
    block["real_ct"] = real_ct_checks(pipeline, real_ct_paths() if real_cts is None else real_cts)
    block["real_ct_flagged"] = sorted(k for k, v in block["real_ct"].items() if v.get("in_distribution") is False)
    block["seconds"] = time.time() - t0
    merge_metrics_json(checkpoint / "metrics.json", "ood", block)
    return block


def _seed_span(cache) -> str:
    seeds = [r["seed"] for r in cache.records]
    return f"{min(seeds)}..{max(seeds)} ({len(seeds)} studies)"
