"""The papers' evaluation metrics, shared by every model of the project (CT CLIP, speech, CXR).

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
- `bootstrap_ci`: percentile confidence interval by resampling cases with replacement (the reference's bootstrap
  script forgets to apply its resampled indices).
- `linear_probe_auroc`: how much of each label an embedding carries, whatever the text side does: a logistic
  regression per label on the (standardised) image latents, fitted on training-split latents (or k-fold), scored
  by AUROC on held-out ones. The zero-shot score is itself linear in the image latent (scale * (pos - neg) . z),
  so the probe shows what a better text side could reach with this image encoder.
- `write_metrics_json`: the metrics.json written next to each shipped checkpoint.

AUROC and average precision are computed here with numpy rather than scikit-learn (not a pinned dependency):
both are a dozen exact lines over the ROC/PR step points, with tied scores grouped into one step as sklearn does.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import subprocess
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

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


def roc_points(y_true, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC operating points (fpr, tpr, thresholds), thresholds descending, one point per distinct score.

    A case is called positive when its score >= threshold; tied scores move together (one diagonal step).
    The trivial point (0, 0) "call nothing positive" is not listed. Requires both classes present.
    """
    y, s = _check_binary(y_true, scores)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise UserError("The ROC needs at least one positive and one negative case.")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_group = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s) - 1]   # last index of each run of equal scores
    tps = np.cumsum(y_sorted)[last_of_group]
    fps = (last_of_group + 1) - tps
    return fps / n_neg, tps / n_pos, s_sorted[last_of_group]


def auroc(y_true, scores) -> float:
    """Area under the ROC curve (trapezoids through the step points; ties count one half). NaN if one class only."""
    y, s = _check_binary(y_true, scores)
    if y.all() or not y.any():
        return NAN
    fpr, tpr, _ = roc_points(y, s)
    fpr, tpr = np.r_[0.0, fpr], np.r_[0.0, tpr]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def average_precision(y_true, scores) -> float:
    """PR-AUC as average precision: sum over distinct thresholds of (recall step) x precision (no interpolation,
    sklearn's definition). NaN if one class only."""
    y, s = _check_binary(y_true, scores)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        return NAN
    fpr, tpr, _ = roc_points(y, s)
    tps = tpr * n_pos
    fps = fpr * (len(y) - n_pos)
    precision = tps / (tps + fps)
    recall = np.r_[0.0, tpr]
    return float(np.sum(np.diff(recall) * precision))


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
    if y.all() or not y.any():
        return NAN
    if rule == "roc":
        fpr, tpr, thresholds = roc_points(y, s)
    elif rule == "grid100":
        thresholds = np.linspace(0.0, 1.0, 100)
        called = s[None, :] > thresholds[:, None]
        tpr = (called & y).sum(1) / y.sum()
        fpr = (called & ~y).sum(1) / (~y).sum()
    else:
        raise UserError(f"Unknown threshold rule {rule!r}; use 'roc' or 'grid100'.")
    distance = np.sqrt((1.0 - tpr) ** 2 + fpr ** 2)
    best = np.flatnonzero(distance <= distance.min() + 1e-12)
    return float(thresholds[best].max())


def _confusion(y: np.ndarray, pred: np.ndarray) -> tuple[int, int, int, int]:
    tp = int(np.sum(y & pred))
    fp = int(np.sum(~y & pred))
    fn = int(np.sum(y & ~pred))
    tn = int(np.sum(~y & ~pred))
    return tp, fp, fn, tn


def _f1(tp: int, fp: int, fn: int) -> float:
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


def classification_at(y_true, predicted) -> dict:
    """Weighted F1 (F1 of each class weighted by its support, sklearn's average='weighted'), accuracy and
    precision of the positive class (0 when nothing is called positive, sklearn's zero_division default)."""
    y = np.asarray(y_true).astype(bool)
    pred = np.asarray(predicted).astype(bool)
    tp, fp, fn, tn = _confusion(y, pred)
    n = len(y)
    f1_positive = _f1(tp, fp, fn)
    f1_negative = _f1(tn, fn, fp)                     # the negative class: its "true positives" are the TNs
    n_pos, n_neg = tp + fn, tn + fp
    return {
        "f1_weighted": (n_pos * f1_positive + n_neg * f1_negative) / n,
        "accuracy": (tp + tn) / n,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
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
                 seed: int = 0) -> tuple[float, float, float]:
    """(point, lo, hi): metric_fn(*arrays) and its percentile (1 - alpha) interval over `n` resamples of the
    cases (axis 0 of every array, the same indices for all) drawn with replacement. Resamples where the metric
    is undefined (NaN, e.g. one class only) are skipped."""
    if not arrays:
        raise UserError("bootstrap_ci needs at least one array of cases.")
    arrays = [np.asarray(a) for a in arrays]
    n_cases = len(arrays[0])
    if any(len(a) != n_cases for a in arrays):
        raise UserError("All arrays given to bootstrap_ci must have the same number of cases.")
    point = float(metric_fn(*arrays))
    rng = np.random.default_rng(seed)
    values = np.empty(n)
    for i in range(n):
        index = rng.integers(0, n_cases, size=n_cases)
        values[i] = metric_fn(*(a[index] for a in arrays))
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return point, NAN, NAN
    lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return point, float(lo), float(hi)


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


def _fit_logistic(x, t, l2: float):
    """L2-regularised logistic regression (mean log-loss + l2 / (2 N) |w|^2) by L-BFGS; returns (w, b)."""
    import torch
    w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w[:-1] + w[-1], t) \
            + l2 / (2 * len(t)) * (w[:-1] ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return w[:-1].detach(), w[-1].detach()


def linear_probe_auroc(features, labels, names: Sequence[str] = LABELS, *, fit_features=None, fit_labels=None,
                       folds: int = 5, l2: float = 1.0, seed: int = 0) -> dict:
    """Per-label AUROC of a logistic regression on `features` (N, D) against `labels` (N, L).

    With `fit_features`/`fit_labels` (e.g. the training split's latents) the regressions are fitted on those and
    score every case of `features` (held out); without, `folds`-fold cross-validation on `features` itself (every
    case scored by a model that did not see it; weak when N is not much larger than D). Features are standardised
    with the fitting set's mean and spread. Written with torch's L-BFGS because scikit-learn is not a pinned
    dependency. Returns {"per_label": {name: auroc}, "macro": mean, "fitted_on": N_fit or "k-fold"}."""
    import torch
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    y = np.asarray(labels).astype(bool)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y) or y.shape[1] != len(names):
        raise UserError(f"linear_probe_auroc needs features (N, D) and labels (N, {len(names)}), "
                        f"got {tuple(x.shape)} and {y.shape}.")
    if fit_features is not None:
        xf = torch.as_tensor(np.asarray(fit_features), dtype=torch.float64)
        yf = np.asarray(fit_labels).astype(bool)
        if xf.ndim != 2 or xf.shape[1] != x.shape[1] or yf.shape != (len(xf), y.shape[1]):
            raise UserError("linear_probe_auroc: fit_features/fit_labels must match the features' width and labels.")
        splits = [(xf, yf, torch.ones(len(x), dtype=torch.bool))]
    else:
        fold_of = torch.as_tensor(np.random.default_rng(seed).permutation(len(x)) % folds)
        splits = [(x[fold_of != f], y[(fold_of != f).numpy()], fold_of == f) for f in range(folds)]
    scores = np.zeros(y.shape)
    for x_fit, y_fit, held in splits:
        mean, std = x_fit.mean(0), x_fit.std(0) + 1e-8
        x_fit, x_held = (x_fit - mean) / std, (x[held] - mean) / std
        for j in range(y.shape[1]):
            w, b = _fit_logistic(x_fit, torch.as_tensor(y_fit[:, j], dtype=torch.float64), l2)
            scores[held.numpy(), j] = (x_held @ w + b).numpy()
    per_label = {name: (auroc(y[:, j], scores[:, j]) if 0 < y[:, j].sum() < len(y) else float("nan"))
                 for j, name in enumerate(names)}
    valid = [v for v in per_label.values() if not math.isnan(v)]
    return {"per_label": per_label, "macro": float(np.mean(valid)) if valid else float("nan"),
            "fitted_on": len(fit_features) if fit_features is not None else f"{folds}-fold"}


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
