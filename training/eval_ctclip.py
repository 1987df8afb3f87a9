"""Evaluate a CT CLIP checkpoint on the held-out phantom test split (seeds TEST_SEED_BASE + i, never trained on).

    python -m training ctclip-eval --checkpoint assets/ctclip      # writes assets/ctclip/metrics.json

Metrics (definitions in training/evaluate.py, CT-CLIP's, bugs fixed):
- zero-shot: CT-CLIP's prompts and rule, the app's own (engine.models.ctclip.zero_shot_probabilities) -> P(present);
  per-label AUROC, PR-AUC and CT-CLIP's top-left-threshold F1/accuracy/precision; macro means;
- report -> volume Recall@{5, 10, 50, 100}: each study's generated report ("Findings: ... Impression: ...") against
  all test volumes, positive found by seed; also the short query ("right pleural effusion") -> volume;
- volume -> volume MAP@{1, 5, 10, 50} with label-IoU relevance;
- the pointing game (training.evaluate.pointing_game): for each test study and each focal finding it has
  (engine.labels.FOCAL_LABELS), does the heat map of "{label} is present." (CTCLIP.token_scores on the unpooled
  token grid, the app's heat map) peak inside or within one token of the finding's mask (engine.phantom.finding_masks,
  cached as token shares next to the test volumes by training.ctclip_data.build_token_features).
95 % bootstrap intervals for the headline numbers.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from engine.labels import LABELS
from engine.settings import training_cache_dir
from training.ctclip_data import TEST_PLAN_SIZE


@torch.no_grad()
def encode_texts(model, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), batch_size):
        tok = model.tokenize(texts[i:i + batch_size])
        out.append(model.encode_text(tok["input_ids"], tok["attention_mask"]))
    return torch.cat(out)


def feature_cache(cache, preset):
    """The cache's stored token features for a token-feature preset (None otherwise, or when none are stored)."""
    from training.ctclip_data import TokenFeatureCache, features_paths
    if not preset.token_features or not features_paths(cache.root, preset.token_features)[0].exists():
        return None
    return TokenFeatureCache(cache, preset.token_features)


@torch.no_grad()
def encode_cache_images(model, cache, preset, batch_size: int = 8, tokens: bool = False) -> torch.Tensor:
    """Unit image latents (N, latent) of the cached studies, or with tokens=True the unpooled token grids
    (N, t, h, w, d). Token features come from the cache when stored (the same engine path computed them)."""
    from training.ctclip_data import model_input
    features = feature_cache(cache, preset)
    out = []
    for i in range(0, len(cache), batch_size):
        x = torch.stack([model_input(cache, j, preset, features) for j in range(i, min(len(cache), i + batch_size))])
        out.append(model.visual_transformer(x) if tokens else model.encode_image(x))
    return torch.cat(out)


@torch.no_grad()
def pointing_game_of(model, cache, preset, workers: int = 2) -> dict:
    """The pointing game over the cache's studies (masks drawn once and cached; see the module docstring)."""
    from dataclasses import replace

    from engine.labels import FOCAL_LABELS
    from engine.models.ctclip import ZERO_SHOT_PROMPTS
    from training.ctclip_data import TokenFeatureCache, build_token_features
    from training.evaluate import pointing_game
    mask_preset = preset if preset.token_features else replace(preset, token_features="demo")
    build_token_features(cache.root, mask_preset, n_masks=len(cache), workers=workers, n_studies=len(cache))
    masks = TokenFeatureCache(cache, mask_preset.token_features)
    prompts = encode_texts(model, [ZERO_SHOT_PROMPTS[0].format(label=label) for label in FOCAL_LABELS])
    heat, shares, names = [], [], []
    for i in range(len(cache)):
        m = masks.masks_of(i).numpy()                                   # (t, h, w, 8) token shares
        present = [k for k in range(len(FOCAL_LABELS)) if (m[..., k] > 0).any()]
        if not present:
            continue
        tokens = encode_cache_images(model, _one(cache, i), preset, tokens=True)
        for k in present:
            heat.append(model.token_scores(tokens, prompts[k])[0].numpy())
            shares.append(m[..., k] > 0)
            names.append(FOCAL_LABELS[k])
    return pointing_game(np.stack(heat), np.stack(shares), names)


def _one(cache, i: int):
    """A view of the cache holding only its i-th study (same memmaps)."""
    import copy
    view = copy.copy(cache)
    view.records = [cache.records[i]]
    return view


def zero_shot_probs(image_emb: torch.Tensor, model) -> np.ndarray:
    """(N, 18) P(present) by CT-CLIP's rule (engine.models.ctclip.zero_shot_probabilities, the app's own)."""
    from engine.models.ctclip import all_zero_shot_prompts, zero_shot_probabilities
    prompts = encode_texts(model, all_zero_shot_prompts()).reshape(len(LABELS), 2, -1)
    return zero_shot_probabilities(image_emb, prompts, float(model.logit_scale.detach())).numpy()


def image_probe(model, preset, image_np: np.ndarray, labels: np.ndarray, train_root: Path, n_fit: int) -> dict:
    """linear_probe_auroc of the test latents, fitted on training-split latents when that cache exists."""
    from training.ctclip_data import PhantomCache
    from training.evaluate import linear_probe_auroc
    if n_fit and (train_root / "meta.json").is_file():
        train = PhantomCache(train_root)
        stored = feature_cache(train, preset)
        if stored is not None:     # the studies whose token features are cached (others would be computed now)
            train.records = [r for i, r in enumerate(train.records) if stored.has(i)]
        train.records = train.records[:n_fit]
        if len(train) >= 2 * image_np.shape[1]:
            fit = encode_cache_images(model, train, preset).numpy()
            return linear_probe_auroc(image_np, labels, fit_features=fit, fit_labels=train.label_matrix())
    return linear_probe_auroc(image_np, labels)


# The demo encoder's acceptance targets (issue 12), written next to the measured figures; none is asserted here.
TARGETS = {"zero_shot_macro_auroc": 0.90, "zero_shot_every_label_auroc": 0.75,
           "zero_shot_auroc_medical_material_cardiomegaly_effusions_emphysema": 0.95,
           "image_linear_probe_macro_auroc": 0.93, "report_to_volume_R@10": 0.50, "query_to_volume_R@10": 0.35,
           "volume_to_volume_MAP@10": 0.45, "pointing_game_rate": 0.70}


def evaluate(checkpoint: Path, cache_root: Path | None = None, out: Path | None = None, n_test: int = 300,
             plan_size: int = TEST_PLAN_SIZE, write: bool = True, bootstrap: int = 500, probe_fit: int = 1000,
             pointing: bool = True) -> dict:
    """Encode the test split with the checkpoint and return (and write to CHECKPOINT/metrics.json) the metrics.

    The image linear probe is fitted on the latents of the first `probe_fit` training studies when the training
    cache (CACHE/train) is there, else cross-validated on the test split."""
    from engine.models.ctclip import CTCLIP, ZERO_SHOT_PROMPTS
    from training.ctclip_data import build_token_features, held_out_cache
    from training.evaluate import (bootstrap_ci, macro_auroc, map_at_k, map_at_k_bounds, recall_at_k,
                                   write_metrics_json, zero_shot_metrics)

    t0 = time.time()
    checkpoint = Path(checkpoint)
    model = CTCLIP.from_pretrained(checkpoint).float().eval()
    preset = model.preprocessing                     # the checkpoint folder's own input preparation
    cache_root = Path(cache_root or training_cache_dir() / "ctclip-demo")
    test_root = cache_root / "test"
    cache = held_out_cache(test_root, preset, n_test, plan_size)   # the first n_test studies that rendered
    labels = cache.label_matrix()
    ids = [str(r["seed"]) for r in cache.records]

    if preset.token_features:     # the test volumes' features once (and the focal masks, for the pointing game)
        build_token_features(test_root, preset, n_masks=n_test if pointing else 0, n_studies=n_test)
    image = encode_cache_images(model, cache, preset)
    reports = encode_texts(model, [r["report"] for r in cache.records])
    queries = encode_texts(model, [r["query"] for r in cache.records])
    probs = zero_shot_probs(image, model)

    zs = zero_shot_metrics(probs, labels)
    report_sim = (reports @ image.t()).numpy()
    query_sim = (queries @ image.t()).numpy()
    r_report = recall_at_k(report_sim, ids, ids)
    r_query = recall_at_k(query_sim, ids, ids)
    image_np = image.numpy()
    maps = map_at_k(image_np, labels)

    def r10(rows):   # resample queries; the gallery stays the whole test split
        return recall_at_k(report_sim[rows], [ids[i] for i in rows], ids, ks=(10,))["R@10"]
    rows = np.arange(len(ids))
    ci = {
        "zero_shot_macro_auroc": bootstrap_ci(macro_auroc, probs, labels, n=bootstrap),
        "report_to_volume_R@10": bootstrap_ci(r10, rows, n=bootstrap),
    }
    metrics = {
        "zero_shot_macro_auroc": zs["macro"]["auroc"],
        "recall_at_10": r_report["R@10"],
        "map_at_10": maps["MAP@10"],
        "zero_shot": zs,
        "report_to_volume": r_report,
        "query_to_volume": r_query,
        "volume_to_volume": maps,
        "volume_to_volume_bounds": map_at_k_bounds(labels),   # oracle (true label IoU) and random embeddings
        # what the image latents carry per label (logistic regression fitted on training latents, else 5-fold);
        # the zero-shot score is linear in the latent, so this is roughly what a perfect text side could reach
        "image_linear_probe_auroc": image_probe(model, preset, image_np, labels, cache_root / "train", probe_fit),
        "ci95": {k: {"point": v[0], "lo": v[1], "hi": v[2]} for k, v in ci.items()},
        "targets": TARGETS,
        "pointing_game": pointing_game_of(model, cache, preset) if pointing else None,
        "n": len(ids),
    }
    summary = checkpoint / "train_summary.json"
    trained = json.loads(summary.read_text()) if summary.exists() else {}
    if write:
        write_metrics_json(Path(out or checkpoint / "metrics.json"), metrics, n=len(ids),
                           split=f"phantom test seeds {ids[0]}..{ids[-1]} (held out)",
                           gallery=len(ids), prompts=list(ZERO_SHOT_PROMPTS),
                           eval_seconds=time.time() - t0, trained_steps=trained.get("checkpoint_step"),
                           trained_seconds=trained.get("last_log", {}).get("elapsed_s"))
    return metrics
