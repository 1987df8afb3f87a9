"""The papers' evaluation metrics, shared by every model of the project (CT CLIP, speech, CXR).

ROC points, AUROC, average precision, F1/accuracy/precision and the logistic probe are scikit-learn's (what
CT-CLIP's own evaluation calls); the bootstrap is scipy.stats.bootstrap. Written here only what neither library has:
Recall@K found by study id, MAP@K with label-IoU relevance, and DeLong's test of two correlated AUROCs.

What each function reproduces (definitions read from the public CT-CLIP code; its bugs are not reproduced):
- `zero_shot_metrics`: per-label AUROC and PR-AUC (average precision, as X2CT-CLIP reports it), then, at a
  per-label threshold chosen on the evaluation data itself -- the ROC point closest to the top-left corner
  (CT-CLIP's rule) -- the support-weighted F1, the accuracy and the precision of the positive class.
  Macro and support-weighted means over labels. A label with only one class present in the data has no ROC:
  its metrics are NaN and it is left out of the means (listed under "excluded_labels").
- `recall_at_k`: report -> volume Recall@K, the positive of each query found by STUDY ID, never by position
  (the reference pairs text i with image i by directory order, which breaks silently when listings differ).
- `map_at_k`: volume -> volume "MAP@K" as CT-CLIP defines it: for each query, the mean label-IoU of its top-K
  retrieved volumes; then the mean over queries. The query itself is excluded and each K is computed from scratch
  (the reference counts the query as its own best match and never resets its accumulator between K values).
- `map_at_k_read_labels`: where MAP@K is lost: a ranking by label vectors with some labels read by the model and the
  rest true (none read = the oracle), to show which labels' readings cost the ranking most.
- `bootstrap_ci`: percentile confidence interval by resampling cases with replacement (the reference's bootstrap
  script forgets to apply its resampled indices).
- `delong_test`: is one score's AUROC above another's on the same cases (fast DeLong, Sun & Xu 2014).
- `linear_probe_auroc`: how much of each label an embedding carries, whatever the text side does: a logistic
  regression per label on the (standardised) image latents, fitted on training-split latents (or k-fold), scored
  by AUROC on held-out ones. The zero-shot score is itself linear in the image latent (scale * (pos - neg) . z),
  so the probe shows what a better text side could reach with this image encoder.
- `pointing_game`: does a finding's heat map peak inside, or within one token of, that finding's mask (issue 12
  item 6; no published CT CLIP measures it); hit rate per label and over all (study, finding) pairs.
- `write_metrics_json`: the metrics.json written next to each shipped checkpoint.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import subprocess
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (accuracy_score, average_precision_score, f1_score, precision_score, roc_auc_score,
                             roc_curve)
from sklearn.model_selection import PredefinedSplit
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from engine.errors import UserError
from engine.labels import LABELS

NAN = float("nan")


# ----------------------------------------------------------------------------------------------------------------
# Binary-classification building blocks (one label at a time)
# ----------------------------------------------------------------------------------------------------------------

def _check_binary(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.shape != y.shape:
        raise UserError(f"Labels and scores must be 1-D arrays of the same length, got {y.shape} and {s.shape}.")
    if not np.all((y == 0) | (y == 1)):
        raise UserError("Labels must be 0 or 1.")
    if not np.all(np.isfinite(s)):
        raise UserError("Scores must be finite numbers (no NaN or infinity).")
    return y.astype(bool), s


def _both_classes(y: np.ndarray) -> bool:
    return bool(y.any()) and not bool(y.all())


def roc_points(y_true, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC operating points (fpr, tpr, thresholds), thresholds descending, one point per distinct score
    (sklearn's roc_curve without dropping collinear points).

    A case is called positive when its score >= threshold; tied scores move together (one diagonal step).
    The trivial point (0, 0) "call nothing positive" is not listed. Requires both classes present.
    """
    y, s = _check_binary(y_true, scores)
    if not _both_classes(y):
        raise UserError("The ROC needs at least one positive and one negative case.")
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    return fpr[1:], tpr[1:], thresholds[1:]          # sklearn's first point is (0, 0) at threshold +inf


def auroc(y_true, scores) -> float:
    """Area under the ROC curve (sklearn's roc_auc_score: ties count one half). NaN if one class only."""
    y, s = _check_binary(y_true, scores)
    return float(roc_auc_score(y, s)) if _both_classes(y) else NAN


def average_precision(y_true, scores) -> float:
    """PR-AUC as average precision: sum over distinct thresholds of (recall step) x precision, no interpolation
    (sklearn's average_precision_score). NaN if one class only."""
    y, s = _check_binary(y_true, scores)
    return float(average_precision_score(y, s)) if _both_classes(y) else NAN


def top_left_threshold(y_true, scores, *, rule: str = "roc") -> float:
    """The per-label decision threshold of CT-CLIP: the operating point closest to the ROC's top-left corner,
    i.e. minimising sqrt((1 - TPR)^2 + FPR^2).

    rule="roc" (default): candidates are the ROC's own operating points (every distinct score; a case is positive
        when score >= threshold). Exact and independent of the score's scale.
    rule="grid100": the reference code verbatim: candidates np.linspace(0, 1, 100), positive when score > threshold
        (only meaningful for probabilities in [0, 1]).
    Ties in distance go to the HIGHEST threshold in both rules (the reference scans thresholds upwards with `<=`).
    """
    y, s = _check_binary(y_true, scores)
    if not _both_classes(y):
        return NAN
    if rule == "roc":
        fpr, tpr, thresholds = roc_points(y, s)
    elif rule == "grid100":
        thresholds = np.linspace(0.0, 1.0, 100)                  # the reference's grid, not ROC points
        called = s[None, :] > thresholds[:, None]
        tpr = (called & y).sum(1) / y.sum()
        fpr = (called & ~y).sum(1) / (~y).sum()
    else:
        raise UserError(f"Unknown threshold rule {rule!r}; use 'roc' or 'grid100'.")
    distance = np.sqrt((1.0 - tpr) ** 2 + fpr ** 2)
    best = np.flatnonzero(distance <= distance.min() + 1e-12)
    return float(thresholds[best].max())


def classification_at(y_true, predicted) -> dict:
    """Weighted F1 (F1 of each class weighted by its support, sklearn's average='weighted'), accuracy and
    precision of the positive class (0 when nothing is called positive)."""
    y = np.asarray(y_true).astype(bool)
    pred = np.asarray(predicted).astype(bool)
    both = [False, True]
    return {
        "f1_weighted": float(f1_score(y, pred, labels=both, average="weighted", zero_division=0.0)),
        "accuracy": float(accuracy_score(y, pred)),
        "precision": float(precision_score(y, pred, zero_division=0.0)),
    }


# ----------------------------------------------------------------------------------------------------------------
# Zero-shot multi-label classification (CT-CLIP / SpeechCT-CLIP / X2CT-CLIP tables)
# ----------------------------------------------------------------------------------------------------------------

PER_LABEL_METRICS = ("auroc", "pr_auc", "f1_weighted", "accuracy", "precision")


def zero_shot_metrics(probs, labels, names: Sequence[str] = LABELS, *, threshold_rule: str = "roc") -> dict:
    """Zero-shot metrics of a multi-label classifier.

    probs: (N, L) scores, higher = more likely present (P(present) for CT-CLIP); labels: (N, L) 0/1;
    names: the L label names (default the 18 CT-RATE labels in CT-CLIP order).
    Returns {"per_label": {name: {auroc, pr_auc, threshold, f1_weighted, accuracy, precision, n_pos, n_neg}},
             "macro": {metric: mean over labels}, "weighted": {metric: mean weighted by each label's positives},
             "excluded_labels": [...], "n": N, "threshold_rule": ..., "notes": [...]}.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim != 2 or p.shape != y.shape:
        raise UserError(f"probs and labels must both be (N, L) arrays, got {p.shape} and {y.shape}.")
    if len(names) != p.shape[1]:
        raise UserError(f"Got {len(names)} label names for {p.shape[1]} label columns.")
    per_label, excluded = {}, []
    for j, name in enumerate(names):
        yj, sj = _check_binary(y[:, j], p[:, j])
        n_pos, n_neg = int(yj.sum()), int((~yj).sum())
        row = {"n_pos": n_pos, "n_neg": n_neg}
        if n_pos == 0 or n_neg == 0:
            excluded.append(name)
            row.update({m: NAN for m in PER_LABEL_METRICS}, threshold=NAN)
        else:
            threshold = top_left_threshold(yj, sj, rule=threshold_rule)
            called = sj >= threshold if threshold_rule == "roc" else sj > threshold
            row.update(auroc=auroc(yj, sj), pr_auc=average_precision(yj, sj), threshold=threshold,
                       **classification_at(yj, called))
        per_label[name] = row

    included = [n for n in names if n not in excluded]
    support = np.array([per_label[n]["n_pos"] for n in included], dtype=np.float64)
    macro, weighted = {}, {}
    for metric in PER_LABEL_METRICS:
        values = np.array([per_label[n][metric] for n in included], dtype=np.float64)
        macro[metric] = float(values.mean()) if len(values) else NAN
        weighted[metric] = float(np.sum(values * support) / support.sum()) if len(values) else NAN
    notes = ["threshold per label = ROC point closest to the top-left corner, chosen on these data (CT-CLIP's rule)",
             "f1_weighted = F1 of each class weighted by its support; precision = of the positive class",
             "'weighted' means weight each label by its number of positive cases"]
    if excluded:
        notes.append(f"{len(excluded)} label(s) with only one class present have NaN metrics and are excluded "
                     f"from the means: {', '.join(excluded)}")
    return {"per_label": per_label, "macro": macro, "weighted": weighted, "excluded_labels": excluded,
            "n": int(p.shape[0]), "threshold_rule": threshold_rule, "notes": notes}


def macro_auroc(probs, labels) -> float:
    """zero_shot_metrics(probs, labels)["macro"]["auroc"] alone: the mean AUROC over the labels with both classes
    present, in one roc_auc_score call (what the bootstrap repeats hundreds of times). NaN if no label has both."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    if p.ndim != 2 or p.shape != y.shape:
        raise UserError(f"probs and labels must both be (N, L) arrays, got {p.shape} and {y.shape}.")
    defined = y.any(axis=0) & ~y.all(axis=0)
    if not defined.any():
        return NAN
    if defined.sum() == 1:                             # sklearn reads one column as a binary, not a multilabel, task
        return auroc(y[:, defined][:, 0], p[:, defined][:, 0])
    return float(roc_auc_score(y[:, defined], p[:, defined], average="macro"))


# ----------------------------------------------------------------------------------------------------------------
# Retrieval
# ----------------------------------------------------------------------------------------------------------------

def _check_ks(ks) -> None:
    if len(ks) == 0 or any(int(k) != k or k < 1 for k in ks):
        raise UserError(f"K values must be positive integers, got {list(ks)}.")


def recall_at_k(sim, query_ids, gallery_ids=None, ks: Sequence[int] = (5, 10, 50, 100)) -> dict:
    """Report -> volume Recall@K.

    sim: (Q, N) similarity of each query (report, speech, CXR) to each gallery volume, higher = closer.
    query_ids: (Q,) the study id each query belongs to; gallery_ids: (N,) the study id of each gallery column.
        The positive of query i is the gallery column whose id equals query_ids[i] (never "column i").
        If gallery_ids is None, query_ids are the positive's column indices directly.
    Ties are counted against the query: rank = 1 + number of OTHER columns scoring >= the positive's score
    (a constant similarity cannot score well). For K >= N every query is a hit (Recall@K = 1).
    Returns {"R@5": ..., "R@10": ..., ...}.
    """
    s = np.asarray(sim, dtype=np.float64)
    if s.ndim != 2:
        raise UserError(f"sim must be a (queries, gallery) matrix, got shape {s.shape}.")
    n_query, n_gallery = s.shape
    if len(query_ids) != n_query:
        raise UserError(f"Got {len(query_ids)} query ids for {n_query} similarity rows.")
    if gallery_ids is None:
        positive = np.asarray(query_ids, dtype=np.int64)
        if np.any(positive < 0) or np.any(positive >= n_gallery):
            raise UserError("A positive's column index lies outside the gallery.")
    else:
        gallery_ids = [str(g) for g in gallery_ids]
        if len(gallery_ids) != n_gallery:
            raise UserError(f"Got {len(gallery_ids)} gallery ids for {n_gallery} similarity columns.")
        column = {g: i for i, g in enumerate(gallery_ids)}
        if len(column) != n_gallery:
            raise UserError("Gallery ids must be unique.")
        missing = [str(q) for q in query_ids if str(q) not in column]
        if missing:
            raise UserError(f"{len(missing)} query id(s) have no volume in the gallery, e.g. {missing[0]!r}.")
        positive = np.array([column[str(q)] for q in query_ids], dtype=np.int64)
    _check_ks(ks)
    positive_score = s[np.arange(n_query), positive]
    rank = np.sum(s >= positive_score[:, None], axis=1)          # includes the positive itself: rank >= 1
    return {f"R@{k}": float(np.mean(rank <= k)) for k in ks}


def label_iou(a, b, *, empty: float = 1.0) -> np.ndarray:
    """IoU of 0/1 label vectors (broadcasting over leading axes): |a and b| / |a or b|; `empty` where both are
    all-zero (two normal studies have identical label sets)."""
    a, b = np.asarray(a).astype(bool), np.asarray(b).astype(bool)
    inter = np.sum(a & b, axis=-1)
    union = np.sum(a | b, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), empty)


def map_at_k(x, labels, ks: Sequence[int] = (1, 5, 10, 50), *, is_similarity: bool = False,
             abnormal_gallery_only: bool = True) -> dict:
    """Volume -> volume MAP@K with graded relevance = IoU of the label vectors (CT-CLIP's definition, done right).

    x: (N, D) embeddings (cosine similarity is used) or, with is_similarity=True, an (N, N) similarity matrix
       (row = query, column = candidate, higher = closer). labels: (N, L) 0/1.
    MAP@K = mean over queries q of  (1/K') * sum_{r=1..K'} IoU(labels[q], labels[retrieved_r(q)]),
    with K' = min(K, number of candidates). Candidates are all other studies (the query itself is never one of
    them); with abnormal_gallery_only (the reference's choice) only studies with at least one positive label are
    candidates, while every study is a query. Equal similarities rank in index order (as the reference's stable
    sort). Each K is computed on its own.
    Returns {"MAP@1": ..., ...}.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    if y.ndim != 2 or x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise UserError(f"Expected (N, D) embeddings and (N, L) labels, got {x.shape} and {y.shape}.")
    _check_ks(ks)
    n = x.shape[0]
    if is_similarity:
        if x.shape != (n, n):
            raise UserError(f"A similarity matrix must be square, got {x.shape}.")
        sim = x.copy()
    else:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        if np.any(norms == 0):
            raise UserError("An embedding is all zeros; cosine similarity is undefined.")
        unit = x / norms
        sim = unit @ unit.T
    candidate = y.any(axis=1) if abnormal_gallery_only else np.ones(n, dtype=bool)
    sim[:, ~candidate] = -np.inf
    np.fill_diagonal(sim, -np.inf)                                 # the query is not its own match
    n_candidates = candidate.sum() - candidate                      # per query: candidates other than itself
    k_max = max(1, min(max(ks), n))
    iou_top = np.empty((n, k_max))                                  # IoU of query q with its r-th retrieved study
    for start in range(0, n, 256):                                  # blocks of queries bound the memory
        rows = slice(start, start + 256)
        order = np.argsort(-sim[rows], axis=1, kind="stable")[:, :k_max]
        iou_top[rows] = label_iou(y[rows, None, :], y[order])
    cumulative = np.cumsum(iou_top, axis=1)
    out = {}
    for k in ks:
        k_eff = np.minimum(k, n_candidates)
        valid = k_eff > 0
        per_query = cumulative[np.flatnonzero(valid), k_eff[valid] - 1] / k_eff[valid]
        out[f"MAP@{k}"] = float(per_query.mean()) if len(per_query) else NAN
    return out


# ----------------------------------------------------------------------------------------------------------------
# Confidence intervals and the metrics file
# ----------------------------------------------------------------------------------------------------------------

def bootstrap_ci(metric_fn: Callable[..., float], *arrays, n: int = 1000, alpha: float = 0.05,
                 seed: int = 0, method: str = "percentile") -> tuple[float, float, float]:
    """(point, lo, hi): metric_fn(*arrays) and its (1 - alpha) bootstrap interval over `n` resamples of the cases
    (axis 0 of every array, the same indices for all) drawn with replacement, by scipy.stats.bootstrap (which
    draws the same indices from `seed` as the hand-written loop it replaced: the shipped intervals are unchanged).

    method: "percentile" (CT-CLIP's bootstrap and every metrics.json so far) or scipy's "BCa" / "basic".
    With "percentile", resamples where the metric is undefined (NaN, e.g. one class only) are left out of the
    percentiles; with the other methods any undefined resample makes the interval NaN."""
    if not arrays:
        raise UserError("bootstrap_ci needs at least one array of cases.")
    arrays = [np.asarray(a) for a in arrays]
    n_cases = len(arrays[0])
    if any(len(a) != n_cases for a in arrays):
        raise UserError("All arrays given to bootstrap_ci must have the same number of cases.")
    if n_cases < 2:
        raise UserError("bootstrap_ci needs at least two cases.")
    point = float(metric_fn(*arrays))

    def on_cases(index):             # scipy resamples the case indices; every array is taken at the same ones
        return metric_fn(*(a[index] for a in arrays))
    with warnings.catch_warnings():  # a NaN interval is reported as NaN below, not warned about
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        result = stats.bootstrap((np.arange(n_cases),), on_cases, n_resamples=n, vectorized=False,
                                 confidence_level=1 - alpha, method=method, rng=np.random.default_rng(seed))
    lo, hi = result.confidence_interval
    values = result.bootstrap_distribution
    if method == "percentile" and np.isnan(values).any():
        values = values[np.isfinite(values)]
        if len(values) == 0:
            return point, NAN, NAN
        lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return point, float(lo), float(hi)


def delong_test(y_true, scores_a, scores_b) -> tuple[float, float, float, float]:
    """DeLong's test of AUROC(a) = AUROC(b) for two scores of the SAME cases (so the AUROCs are correlated).

    Returns (auc_a, auc_b, z, p_value), p two-sided from the normal distribution. The covariance of the two AUROCs
    is DeLong et al.'s (1988) from the structural components V10 (each positive's share of negatives it outranks)
    and V01 (each negative's share of positives outranking it), computed from midranks as in the fast algorithm of
    Sun & Xu (2014): Cov = S10 / m + S01 / n over m positives and n negatives. Hand-written: neither scikit-learn
    nor scipy has DeLong's test. Identical scores give z = 0, p = 1. Needs at least two cases of each class.
    """
    y, s_a = _check_binary(y_true, scores_a)
    _, s_b = _check_binary(y_true, scores_b)
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        raise UserError("DeLong's test needs at least two positive and two negative cases.")
    scores = np.stack([s_a, s_b])                      # (2 modalities, cases)
    pos, neg = scores[:, y], scores[:, ~y]
    rank_all = stats.rankdata(np.concatenate([pos, neg], axis=1), axis=1)   # midranks: ties share their mean
    rank_pos, rank_neg = stats.rankdata(pos, axis=1), stats.rankdata(neg, axis=1)
    v10 = (rank_all[:, :m] - rank_pos) / n             # negatives each positive outranks (ties 1/2), as a share
    v01 = 1.0 - (rank_all[:, m:] - rank_neg) / m       # positives outranking each negative, as a share
    aucs = v10.mean(axis=1)
    cov = np.cov(v10) / m + np.cov(v01) / n
    variance = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    difference = aucs[0] - aucs[1]
    if variance <= 1e-15 * max(1.0, cov[0, 0] + cov[1, 1]):   # no spread in the difference (same rankings)
        z = 0.0 if abs(difference) < 1e-12 else math.copysign(math.inf, difference)
    else:
        z = difference / math.sqrt(variance)
    return float(aucs[0]), float(aucs[1]), float(z), float(2 * stats.norm.sf(abs(z)))


def _git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                                capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def _to_json(value, digits: int):
    """numpy -> Python, NaN/inf -> None, floats rounded to `digits` decimals."""
    if isinstance(value, dict):
        return {str(k): _to_json(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_to_json(v, digits) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return round(float(value), digits) if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)


def map_at_k_bounds(labels, ks: Sequence[int] = (1, 5, 10, 50), *, n_random: int = 20, seed: int = 0,
                    abnormal_gallery_only: bool = True) -> dict:
    """What MAP@K can be on this label set: "oracle" ranks the candidates by their true label IoU with the query
    (no embedding can do better, since MAP@K averages exactly that IoU over the top K), "random" is the mean over
    `n_random` random 64-d embeddings. A study without any label scores 0 as a query whatever the model does
    (every candidate is abnormal), so the oracle stays well below 1 when the labels are diverse.
    Returns {"oracle": {"MAP@K": ...}, "random": {...}}."""
    y = np.asarray(labels).astype(bool)
    oracle = map_at_k(label_iou(y[:, None, :], y[None, :, :]), y, ks, is_similarity=True,
                      abnormal_gallery_only=abnormal_gallery_only)
    rng = np.random.default_rng(seed)
    draws = [map_at_k(rng.standard_normal((len(y), 64)), y, ks, abnormal_gallery_only=abnormal_gallery_only)
             for _ in range(n_random)]
    return {"oracle": oracle, "random": {k: float(np.mean([d[k] for d in draws])) for k in oracle}}


def map_at_k_read_labels(probs, labels, read: Sequence[int], ks: Sequence[int] = (1, 5, 10, 50), *,
                         abnormal_gallery_only: bool = True) -> dict:
    """Where volume -> volume MAP@K is lost: rank by the studies' label vectors in which the columns `read` are the
    model's zero-shot probabilities and every other column is the truth. read=() is the oracle of map_at_k_bounds;
    all 18 read is a ranking by the reading alone; one label read says what reading that label costs.
    Similarity = sum(min) / sum(max) of two vectors (the weighted Jaccard index: the label IoU on 0/1 vectors, 0 when
    both are all-zero). probs, labels: (N, L). Returns {"MAP@K": ...}."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    if p.shape != y.shape or p.ndim != 2:
        raise UserError(f"Expected (N, L) probabilities and labels of one shape, got {p.shape} and {y.shape}.")
    mixed = y.astype(np.float64)
    read = list(read)
    mixed[:, read] = p[:, read]
    sim = np.empty((len(y), len(y)))
    for start in range(0, len(y), 256):                            # blocks of queries bound the memory
        rows = mixed[start:start + 256, None, :]
        top = np.minimum(rows, mixed[None]).sum(-1)
        bottom = np.maximum(rows, mixed[None]).sum(-1)
        sim[start:start + 256] = np.divide(top, bottom, out=np.zeros_like(top), where=bottom > 0)
    return map_at_k(sim, y, ks, is_similarity=True, abnormal_gallery_only=abnormal_gallery_only)


def pointing_game(heat_maps, masks, labels: Sequence[str], *, tolerance: int = 1) -> dict:
    """The pointing game on token grids: for each (study, finding) pair, the heat map's maximum token (the first in
    C order on ties) is a hit when a token of the finding's mask lies within `tolerance` tokens of it in every axis
    (Chebyshev distance; 1 = the 3 x 3 x 3 neighbourhood).

    heat_maps (n, t, h, w) float and masks (n, t, h, w) bool (tokens holding any voxel of the finding), one row per
    pair; labels (n,) the pair's finding name. Pairs with an empty mask raise (nothing to point at).
    Returns {"per_label": {label: {"hits", "n", "rate"}}, "overall": {"hits", "n", "rate"}}."""
    heat_maps, masks = np.asarray(heat_maps, dtype=np.float64), np.asarray(masks, dtype=bool)
    if heat_maps.shape != masks.shape or heat_maps.ndim != 4 or len(labels) != len(heat_maps):
        raise ValueError("heat_maps and masks must be (n, t, h, w) of one shape, with one label per row")
    if not masks.reshape(len(masks), -1).any(axis=1).all():
        raise ValueError("every pair needs a non-empty mask")
    hits = []
    for heat, mask in zip(heat_maps, masks):
        peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
        window = tuple(slice(max(0, p - tolerance), p + tolerance + 1) for p in peak)
        hits.append(bool(mask[window].any()))
    per_label = {}
    for label in dict.fromkeys(labels):
        h = [hit for hit, name in zip(hits, labels) if name == label]
        per_label[label] = {"hits": int(sum(h)), "n": len(h), "rate": sum(h) / len(h)}
    overall = {"hits": int(sum(hits)), "n": len(hits), "rate": sum(hits) / len(hits) if hits else float("nan")}
    return {"per_label": per_label, "overall": overall}


def _probe_scores(x_fit: np.ndarray, y_fit: np.ndarray, x_held: np.ndarray, l2: float) -> np.ndarray:
    """Decision values on x_held of a standardised L2 logistic regression fitted on (x_fit, y_fit).

    The old hand-written loss, mean log-loss + l2 / (2 N) |w|^2 (intercept free), is sklearn's
    C * sum log-loss + |w|^2 / 2 divided by C N: the same fit with C = 1 / l2."""
    if not _both_classes(y_fit):                       # nothing to learn: every held-out case scores alike
        return np.zeros(len(x_held))
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0 / l2, tol=1e-6, max_iter=1000))
    return model.fit(x_fit, y_fit).decision_function(x_held)


def linear_probe_auroc(features, labels, names: Sequence[str] = LABELS, *, fit_features=None, fit_labels=None,
                       folds: int = 5, l2: float = 1.0, seed: int = 0) -> dict:
    """Per-label AUROC of a logistic regression on `features` (N, D) against `labels` (N, L).

    With `fit_features`/`fit_labels` (e.g. the training split's latents) the regressions are fitted on those and
    score every case of `features` (held out); without, `folds`-fold cross-validation on `features` itself (every
    case scored by a model that did not see it; weak when N is not much larger than D; case i in fold
    permutation(N)[i] % folds of numpy's default_rng(seed)). Features are standardised with the fitting set's mean
    and spread (sklearn's StandardScaler).
    Returns {"per_label": {name: auroc}, "macro": mean, "fitted_on": N_fit or "k-fold"}."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y) or y.shape[1] != len(names):
        raise UserError(f"linear_probe_auroc needs features (N, D) and labels (N, {len(names)}), "
                        f"got {tuple(x.shape)} and {y.shape}.")
    if fit_features is not None:
        xf = np.asarray(fit_features, dtype=np.float64)
        yf = np.asarray(fit_labels).astype(bool)
        if xf.ndim != 2 or xf.shape[1] != x.shape[1] or yf.shape != (len(xf), y.shape[1]):
            raise UserError("linear_probe_auroc: fit_features/fit_labels must match the features' width and labels.")
        splits = [(xf, yf, np.arange(len(x)))]
    else:
        if folds < 2:
            raise UserError(f"Cross-validation needs at least 2 folds, got {folds}.")
        fold_of = np.random.default_rng(seed).permutation(len(x)) % folds     # the folds the probe always used
        splits = [(x[fit], y[fit], held) for fit, held in PredefinedSplit(fold_of).split()]
    scores = np.zeros(y.shape)
    for x_fit, y_fit, held in splits:
        for j in range(y.shape[1]):
            scores[held, j] = _probe_scores(x_fit, y_fit[:, j], x[held], l2)
    per_label = {name: auroc(y[:, j], scores[:, j]) for j, name in enumerate(names)}
    valid = [v for v in per_label.values() if not math.isnan(v)]
    return {"per_label": per_label, "macro": float(np.mean(valid)) if valid else float("nan"),
            "fitted_on": len(fit_features) if fit_features is not None else f"{folds}-fold"}


def merge_metrics_json(path, key: str, block: dict, *, digits: int = 4) -> dict:
    """Set one top-level `key` of an existing metrics.json to `block` (rounded as write_metrics_json rounds), every
    other key and the "meta" block kept as they are (a later figure next to the evaluation's, not a new
    evaluation). The block records its own date and git commit. Atomic. Returns the whole document."""
    path = Path(path)
    document = json.loads(path.read_text()) if path.is_file() else {}
    stamp = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "git_commit": _git_commit()}
    document[key] = _to_json({**block, **stamp}, digits)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return document


def write_metrics_json(path, metrics: dict, *, n: int | None = None, digits: int = 4, **meta) -> dict:
    """Write `metrics` as JSON (NaN -> null, floats rounded to `digits`) with a "meta" block
    {n, date (UTC ISO 8601), git_commit (or null), **meta}. Atomic (temp file + rename). Returns what was written."""
    if n is None:
        n = metrics.get("n") if isinstance(metrics, dict) else None
    document = _to_json(dict(metrics), digits)
    document["meta"] = _to_json({"n": n, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                                 "git_commit": _git_commit(), **meta}, digits)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return document
