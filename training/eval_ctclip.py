"""Evaluate a CT CLIP checkpoint on the held-out phantom test split (seeds TEST_SEED_BASE + i, never trained on).

    python -m training ctclip-eval --checkpoint assets/ctclip      # writes assets/ctclip/metrics.json

Metrics (definitions in training/evaluate.py, CT-CLIP's, bugs fixed):
- zero-shot: CT-CLIP's prompts and rule, the app's own (engine.models.ctclip.zero_shot_probabilities) -> P(present);
  per-label AUROC, PR-AUC and CT-CLIP's top-left-threshold F1/accuracy/precision; macro means;
- report -> volume Recall@{5, 10, 50, 100}: each study's generated report ("Findings: ... Impression: ...") against
  all test volumes, positive found by seed; also the short query ("right pleural effusion") -> volume;
- volume -> volume MAP@{1, 5, 10, 50} with label-IoU relevance.
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


@torch.no_grad()
def encode_cache_images(model, cache, preset, batch_size: int = 8) -> torch.Tensor:
    from training.ctclip_data import hu_to_model
    out = []
    for i in range(0, len(cache), batch_size):
        x = torch.stack([hu_to_model(cache.hu(j), cache.spacing_xyz, preset)
                         for j in range(i, min(len(cache), i + batch_size))])
        out.append(model.encode_image(x))
    return torch.cat(out)


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
        train.records = train.records[:n_fit]
        if len(train) >= 2 * image_np.shape[1]:
            fit = encode_cache_images(model, train, preset).numpy()
            return linear_probe_auroc(image_np, labels, fit_features=fit, fit_labels=train.label_matrix())
    return linear_probe_auroc(image_np, labels)


def evaluate(checkpoint: Path, cache_root: Path | None = None, out: Path | None = None, n_test: int = 300,
             plan_size: int = TEST_PLAN_SIZE, write: bool = True, bootstrap: int = 500, probe_fit: int = 1000) -> dict:
    """Encode the test split with the checkpoint and return (and write to CHECKPOINT/metrics.json) the metrics.

    The image linear probe is fitted on the latents of the first `probe_fit` training studies when the training
    cache (CACHE/train) is there, else cross-validated on the test split."""
    from engine.models.ctclip import CTCLIP, ZERO_SHOT_PROMPTS
    from training.ctclip_data import CachePlan, PhantomCache, build_cache
    from training.evaluate import (bootstrap_ci, map_at_k, map_at_k_bounds, recall_at_k, write_metrics_json,
                                   zero_shot_metrics)

    t0 = time.time()
    checkpoint = Path(checkpoint)
    model = CTCLIP.from_pretrained(checkpoint).float().eval()
    preset = model.preprocessing                     # the checkpoint folder's own input preparation
    cache_root = Path(cache_root or training_cache_dir() / "ctclip-demo")
    test_root = cache_root / "test"
    build_cache(test_root, CachePlan("test", plan_size, 0, tuple(preset.shape_zyx), tuple(preset.spacing_xyz)))
    cache = PhantomCache(test_root)
    if len(cache) < n_test:
        raise RuntimeError(f"only {len(cache)} test studies rendered ({len(cache.failed)} seeds failed)")
    cache.records = cache.records[:n_test]           # the first n_test studies that rendered
    labels = cache.label_matrix()
    ids = [str(r["seed"]) for r in cache.records]

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

    def macro_auroc(p, y):
        return zero_shot_metrics(p, y)["macro"]["auroc"]

    def r10(s_rows, rows):   # resample queries; the gallery stays the whole test split
        return recall_at_k(report_sim[rows], [ids[i] for i in rows], ids, ks=(10,))["R@10"]
    rows = np.arange(len(ids))
    ci = {
        "zero_shot_macro_auroc": bootstrap_ci(macro_auroc, probs, labels, n=bootstrap),
        "report_to_volume_R@10": bootstrap_ci(lambda r: r10(None, r), rows, n=bootstrap),
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
        "targets": {"zero_shot_macro_auroc": 0.90, "report_to_volume_R@10": 0.30, "volume_to_volume_MAP@10": 0.70},
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
