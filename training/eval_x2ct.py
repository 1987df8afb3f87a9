"""Evaluate a CXR encoder (X2CT-CLIP) on the held-out DRR split with the trunk's metric code (training/evaluate.py).

    python -m training x2ct-eval --checkpoint runs/x2ct-demo/model        # writes runs/x2ct-demo/model/metrics.json

On the test split's clean DRRs (view 0), against the FROZEN CT CLIP the encoder was trained with:
- CXR -> CT volume and CXR -> report retrieval, R@{5, 10, 50} (gallery: the split's CT / report latents);
- zero-shot AUROC / PR-AUC (and F1 etc. at CT-CLIP's threshold rule) from the CXR latent through the CT CLIP's
  prompt latents (CTClipPipeline.zero_shot_from_latent), and the CT encoder's own zero-shot on the same studies;
- DeLong's test per label between the CXR and the CT zero-shot scores (same cases, so correlated AUROCs);
- few-shot linear probes: logistic regressions fitted on the CXR latents of 20 % and 50 % of the training split
  (a fixed random subset), scored on the test split;
- the run's loss weights (alpha, beta, gamma): the beta/gamma ablation is a run with --beta 0 or --gamma 0.
"""
from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from engine.errors import UserError
from engine.labels import LABELS
from engine.models.cxr_encoder import CXREncoder
from training.evaluate import (delong_test, linear_probe_auroc, recall_at_k, write_metrics_json,
                               zero_shot_metrics)
from training.train_x2ct import X2CTTrainConfig, cache_dir, load_ctclip
from training.x2ct_data import X2CTCache

PROBE_FRACTIONS = (0.2, 0.5)
RETRIEVAL_KS = (5, 10, 50)


def run_config(checkpoint: Path) -> tuple[X2CTTrainConfig, dict]:
    """The training run's config (RUN/train_config.json beside RUN/model)."""
    path = Path(checkpoint).parent / "train_config.json"
    if not path.is_file():
        raise UserError(f"No train_config.json beside '{checkpoint}': evaluate a model folder of a training run.")
    raw = json.loads(path.read_text())
    names = {f.name for f in fields(X2CTTrainConfig)}
    return X2CTTrainConfig(**{k: v for k, v in raw.items() if k in names}), raw


def encode_cache(encoder: CXREncoder, cache: X2CTCache, batch_size: int = 64) -> np.ndarray:
    """Unit CXR latents (N, D) of a split's clean DRRs."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(cache), batch_size):
            images = torch.stack([cache.image(i, 0) for i in range(start, min(len(cache), start + batch_size))])
            out.append(encoder.encode_image(images))
    return torch.cat(out).numpy()


def zero_shot_probabilities(pipeline, latents: np.ndarray) -> np.ndarray:
    """(N, 18) P(present) of each latent by the CT CLIP's prompt rule."""
    return np.array([[pipeline.zero_shot_from_latent(z)[label] for label in LABELS] for z in latents])


def delong_per_label(labels: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray) -> dict:
    """{label: {auroc_cxr, auroc_ct, z, p}} for the labels with at least two cases of each class."""
    out = {}
    for j, name in enumerate(LABELS):
        y = labels[:, j]
        if y.sum() >= 2 and (1 - y).sum() >= 2:
            a, b, z, p = delong_test(y, probs_a[:, j], probs_b[:, j])
            out[name] = {"auroc_cxr": a, "auroc_ct": b, "z": z, "p": p}
    return out


def few_shot_probes(train_latents, train_labels, test_latents, test_labels, seed: int = 0) -> dict:
    """{"20%": {...}, "50%": {...}}: linear_probe_auroc fitted on that share of the training split."""
    order = np.random.default_rng(seed).permutation(len(train_latents))
    out = {}
    for fraction in PROBE_FRACTIONS:
        chosen = order[: max(2, int(round(fraction * len(order))))]
        out[f"{round(100 * fraction)}%"] = linear_probe_auroc(test_latents, test_labels,
                                                              fit_features=train_latents[chosen],
                                                              fit_labels=train_labels[chosen])
    return out


def evaluate(checkpoint: Path, cache_root: Path | None = None, out: Path | None = None) -> dict:
    """Compute the metrics above and write them to CHECKPOINT/metrics.json (or `out`); returns them."""
    checkpoint = Path(checkpoint)
    cfg, raw = run_config(checkpoint)
    encoder = CXREncoder.from_pretrained(checkpoint)
    pipeline = load_ctclip(cfg)
    if raw.get("ctclip_model_id") and raw["ctclip_model_id"] != pipeline.model_id:
        raise UserError(f"The encoder was trained against CT CLIP {raw['ctclip_model_id']}, but "
                        f"{pipeline.model_id} is installed: retrain with 'python -m training x2ct'.")
    root = cache_dir(cfg, cache_root or (Path(raw["cache"]) if raw.get("cache") else None))
    test, train = X2CTCache(root / "test", pipeline.model_id), X2CTCache(root / "train", pipeline.model_id)
    cxr_test, cxr_train = encode_cache(encoder, test), encode_cache(encoder, train)
    ids = np.arange(len(test))
    ks = tuple(k for k in RETRIEVAL_KS if k <= len(test)) or (len(test),)
    probs_cxr = zero_shot_probabilities(pipeline, cxr_test)
    probs_ct = zero_shot_probabilities(pipeline, test.ct_latents.numpy())
    zs_cxr, zs_ct = zero_shot_metrics(probs_cxr, test.labels), zero_shot_metrics(probs_ct, test.labels)
    delong = delong_per_label(test.labels, probs_cxr, probs_ct)
    metrics = {
        "n": len(test),
        "cxr_to_volume": recall_at_k(cxr_test @ test.ct_latents.numpy().T, ids, ks=ks),
        "cxr_to_report": recall_at_k(cxr_test @ test.report_latents.numpy().T, ids, ks=ks),
        "chance_R@10": min(1.0, 10 / len(test)),
        "zero_shot_macro_auroc": zs_cxr["macro"]["auroc"],
        "zero_shot_macro_pr_auc": zs_cxr["macro"]["pr_auc"],
        "ctclip_zero_shot_macro_auroc": zs_ct["macro"]["auroc"],
        "zero_shot": zs_cxr,
        "ctclip_zero_shot": zs_ct,
        "delong_cxr_vs_ct": delong,
        "delong_labels_p_below_0.05": sum(1 for v in delong.values() if not math.isnan(v["p"]) and v["p"] < 0.05),
        "few_shot_linear_probe": few_shot_probes(cxr_train, train.labels, cxr_test, test.labels, cfg.seed),
        "loss_weights": {"alpha": cfg.alpha, "beta": cfg.beta, "gamma": cfg.gamma, "tau": cfg.tau},
    }
    write_metrics_json(Path(out) if out else checkpoint / "metrics.json", metrics, n=len(test),
                       split="held-out phantom DRRs (clean AP view) of the CT CLIP's test seeds",
                       ctclip_model_id=pipeline.model_id, n_train=len(train), backbone=cfg.backbone,
                       preset=cfg.preset)
    return metrics
