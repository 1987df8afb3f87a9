"""training/evaluate.py on tiny cases whose answers are worked out by hand in the comments."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from engine.errors import UserError
from engine.labels import LABELS
from training.evaluate import (auroc, average_precision, bootstrap_ci, classification_at, delong_test, label_iou,
                               macro_auroc, map_at_k, map_at_k_bounds, map_at_k_read_labels, recall_at_k, roc_points, top_left_threshold,
                               write_metrics_json, zero_shot_metrics)

# The 6-sample case used throughout: scores descending, labels 1 0 1 1 0 0.
S6 = np.array([0.9, 0.8, 0.7, 0.6, 0.4, 0.2])
Y6 = np.array([1, 0, 1, 1, 0, 0])


# --- AUROC / PR-AUC -----------------------------------------------------------------------------------------------

def test_auroc_perfect_inverted_and_tied():
    y = np.array([0, 0, 1, 1])
    assert auroc(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert auroc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert auroc(y, [0.5, 0.5, 0.5, 0.5]) == 0.5                     # every pair tied: 1/2 each
    # positives {0.8, 0.5}, negatives {0.5, 0.2}: pairs 0.8>0.5, 0.8>0.2, 0.5=0.5 (1/2), 0.5>0.2 -> 3.5 / 4
    assert auroc([1, 1, 0, 0], [0.8, 0.5, 0.5, 0.2]) == pytest.approx(0.875)


def test_auroc_six_samples_and_random():
    # positives {.9, .7, .6} vs negatives {.8, .4, .2}: .9 beats 3, .7 beats 2, .6 beats 2 -> 7/9
    assert auroc(Y6, S6) == pytest.approx(7 / 9)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 4000)
    assert abs(auroc(y, rng.random(4000)) - 0.5) < 0.03              # uninformative scores
    assert math.isnan(auroc([1, 1, 1], [0.1, 0.2, 0.3]))             # one class only


def test_average_precision_by_hand():
    # ranked 1 0 1 1 0 0: hits at ranks 1, 3, 4 with precision 1, 2/3, 3/4, recall steps of 1/3 each
    assert average_precision(Y6, S6) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    # tie group {0.5: one positive, one negative}: recall 1/2 at precision 1, then recall 1 at precision 2/3
    assert average_precision([1, 1, 0, 0], [0.8, 0.5, 0.5, 0.2]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert math.isnan(average_precision([0, 0], [0.3, 0.4]))


def test_roc_points_group_ties():
    fpr, tpr, thr = roc_points([1, 1, 0, 0], [0.8, 0.5, 0.5, 0.2])
    np.testing.assert_allclose(thr, [0.8, 0.5, 0.2])
    np.testing.assert_allclose(tpr, [0.5, 1.0, 1.0])
    np.testing.assert_allclose(fpr, [0.0, 0.5, 1.0])


# --- threshold and metrics at it ----------------------------------------------------------------------------------

def test_top_left_threshold_six_samples():
    # ROC points (fpr, tpr) and distance to (0, 1):
    # t=.9 (0, 1/3) .667 | t=.8 (1/3, 1/3) .745 | t=.7 (1/3, 2/3) .471 | t=.6 (1/3, 1) .333 | t=.4 (2/3, 1) .667
    assert top_left_threshold(Y6, S6) == 0.6
    # the reference's 100-point grid with "score > t" lands on the grid point just below 0.6
    assert top_left_threshold(Y6, S6, rule="grid100") == pytest.approx(59 / 99)


def test_top_left_threshold_tie_goes_to_higher_threshold():
    # labels 1 1 0 1 0 0: t=.8 gives (0, 2/3) and t=.6 gives (1/3, 1), both at distance 1/3 -> the higher, 0.8
    assert top_left_threshold([1, 1, 0, 1, 0, 0], S6) == 0.8


def test_weighted_f1_accuracy_precision_by_hand():
    # threshold 0.6 calls 1 1 1 1 0 0 against truth 1 0 1 1 0 0: TP 3, FP 1, FN 0, TN 2
    # F1(pos) = 6/7, F1(neg) = 2*2/(4+0+1) = 4/5, support 3 and 3 -> (6/7 + 4/5) / 2 = 29/35
    out = classification_at(Y6, S6 >= 0.6)
    assert out["f1_weighted"] == pytest.approx(29 / 35)
    assert out["accuracy"] == pytest.approx(5 / 6)
    assert out["precision"] == pytest.approx(3 / 4)
    # unequal support: truth 1 0 0 0, called 1 1 0 0: F1(pos)=2/3 (w 1), F1(neg)=2*2/(4+1+0)=4/5 (w 3)
    out = classification_at([1, 0, 0, 0], [1, 1, 0, 0])
    assert out["f1_weighted"] == pytest.approx((2 / 3 + 3 * 4 / 5) / 4)
    assert classification_at([1, 0], [0, 0])["precision"] == 0.0     # nothing called positive


def test_zero_shot_metrics_table():
    perfect = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    probs = np.stack([S6, perfect, S6], axis=1)
    labels = np.stack([Y6, [0, 0, 0, 1, 1, 1], [0] * 6], axis=1)    # third label: no positive case at all
    out = zero_shot_metrics(probs, labels, names=["a", "b", "c"])
    a, b = out["per_label"]["a"], out["per_label"]["b"]
    assert a["auroc"] == pytest.approx(7 / 9) and a["threshold"] == 0.6
    assert a["f1_weighted"] == pytest.approx(29 / 35) and a["precision"] == pytest.approx(3 / 4)
    assert b["auroc"] == 1.0 and b["threshold"] == 0.7 and b["accuracy"] == 1.0 and b["pr_auc"] == 1.0
    assert out["excluded_labels"] == ["c"] and math.isnan(out["per_label"]["c"]["auroc"])
    assert out["macro"]["auroc"] == pytest.approx((7 / 9 + 1) / 2)      # NaN label left out of the mean
    assert out["weighted"]["accuracy"] == pytest.approx((3 * 5 / 6 + 3 * 1) / 6)
    assert any("excluded" in note for note in out["notes"])


def test_macro_auroc_is_the_tables_macro_mean():
    probs = np.stack([S6, np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9]), S6], axis=1)
    labels = np.stack([Y6, [0, 0, 0, 1, 1, 1], [0] * 6], axis=1)     # as above: 7/9, 1 and an undefined label
    assert macro_auroc(probs, labels) == pytest.approx((7 / 9 + 1) / 2)
    assert macro_auroc(probs[:, [0, 2]], labels[:, [0, 2]]) == pytest.approx(7 / 9)   # one defined label left
    assert math.isnan(macro_auroc(probs[:, [2]], labels[:, [2]]))
    rng = np.random.default_rng(8)
    p, y = rng.random((50, 18)), rng.random((50, 18)) < 0.2
    assert macro_auroc(p, y) == pytest.approx(zero_shot_metrics(p, y)["macro"]["auroc"], abs=1e-12)


def test_zero_shot_metrics_defaults_to_the_18_labels_and_checks_shapes():
    rng = np.random.default_rng(1)
    out = zero_shot_metrics(rng.random((40, 18)), rng.integers(0, 2, (40, 18)))
    assert list(out["per_label"]) == list(LABELS) and out["n"] == 40
    with pytest.raises(UserError):
        zero_shot_metrics(rng.random((40, 18)), rng.integers(0, 2, (40, 17)))
    with pytest.raises(UserError):
        zero_shot_metrics(rng.random((4, 18)), np.full((4, 18), 2))


# --- Recall@K ------------------------------------------------------------------------------------------------------

GALLERY = ["s3", "s1", "s4", "s0", "s2"]
QUERIES = ["s0", "s1", "s2", "s3"]
SIM = np.array([
    [0.1, 0.2, 0.3, 0.9, 0.4],      # s0 is column 3: best -> rank 1
    [0.8, 0.7, 0.1, 0.2, 0.3],      # s1 is column 1: one higher -> rank 2
    [0.9, 0.1, 0.8, 0.2, 0.5],      # s2 is column 4: two higher -> rank 3
    [0.0, 0.5, 0.4, 0.3, 0.2],      # s3 is column 0: last -> rank 5
])


def test_recall_at_k_matches_by_study_id():
    out = recall_at_k(SIM, QUERIES, GALLERY, ks=(1, 2, 3, 4, 5, 100))
    assert out == {"R@1": 0.25, "R@2": 0.5, "R@3": 0.75, "R@4": 0.75, "R@5": 1.0, "R@100": 1.0}
    # same answer with column indices, and with the gallery columns shuffled again
    assert recall_at_k(SIM, [3, 1, 4, 0], ks=(1, 2, 3)) == {"R@1": 0.25, "R@2": 0.5, "R@3": 0.75}
    perm = [4, 2, 0, 3, 1]
    shuffled = recall_at_k(SIM[:, perm], QUERIES, [GALLERY[i] for i in perm], ks=(1, 2, 3, 4, 5))
    assert shuffled == {k: v for k, v in out.items() if k != "R@100"}
    # pairing by position (query i <-> column i) would give a different answer: R@1 would be 0
    assert recall_at_k(SIM, [0, 1, 2, 3], ks=(1,))["R@1"] == 0.0


def test_recall_at_k_ties_and_bad_ids():
    flat = np.ones((3, 3))
    assert recall_at_k(flat, ["a", "b", "c"], ["c", "a", "b"], ks=(1, 2, 3)) == {"R@1": 0.0, "R@2": 0.0, "R@3": 1.0}
    with pytest.raises(UserError, match="no volume"):
        recall_at_k(SIM, ["s0", "s1", "s2", "zz"], GALLERY)
    with pytest.raises(UserError):
        recall_at_k(SIM, QUERIES, GALLERY, ks=(0,))


# --- MAP@K ---------------------------------------------------------------------------------------------------------

# Four studies, four labels. IoU: A-B 1/2, A-C 1/3, A-D 0, B-C 0, B-D 0, C-D 1/3.
TOY_LABELS = np.array([[1, 1, 0, 0],    # A
                       [1, 0, 0, 0],    # B
                       [0, 1, 1, 0],    # C
                       [0, 0, 1, 1]])   # D
TOY_SIM = np.array([[1.0, 0.9, 0.5, 0.1],     # A retrieves B, C, D
                    [0.5, 1.0, 0.1, 0.9],     # B retrieves D, A, C
                    [0.6, 0.2, 1.0, 0.8],     # C retrieves D, A, B
                    [0.3, 0.7, 0.6, 1.0]])    # D retrieves B, C, A
# per query top-1 / mean top-2 / mean top-3 IoU:
#   A: 1/2, (1/2+1/3)/2=5/12, 5/18   B: 0, 1/4, 1/6   C: 1/3, 1/3, 2/9   D: 0, 1/6, 1/9
EXPECTED = {"MAP@1": 5 / 24, "MAP@2": 7 / 24, "MAP@3": 7 / 36, "MAP@50": 7 / 36}


def test_label_iou():
    np.testing.assert_allclose(label_iou(TOY_LABELS[0], TOY_LABELS[1:]), [1 / 2, 1 / 3, 0])
    assert label_iou([0, 0], [0, 0]) == 1.0 and label_iou([0, 0], [0, 0], empty=0.0) == 0.0


def test_map_at_k_toy_excludes_query_and_k_are_independent():
    out = map_at_k(TOY_SIM, TOY_LABELS, ks=(1, 2, 3, 50), is_similarity=True)
    assert out == pytest.approx(EXPECTED)                       # self-match (IoU 1) would give MAP@1 = 1
    for k in (1, 2, 3):                                          # no accumulator carried from another K
        assert map_at_k(TOY_SIM, TOY_LABELS, ks=(k,), is_similarity=True)[f"MAP@{k}"] == pytest.approx(
            EXPECTED[f"MAP@{k}"])
    assert map_at_k(TOY_SIM, TOY_LABELS, ks=(3, 1), is_similarity=True) == pytest.approx(
        {"MAP@3": 7 / 36, "MAP@1": 5 / 24})


def test_map_at_k_normal_study_is_a_query_but_not_a_candidate():
    # add E with no positive label, the nearest neighbour of everyone (0.95) but not in the reference's gallery
    sim = np.full((5, 5), 0.95)
    sim[:4, :4] = TOY_SIM
    sim[4] = [0.1, 0.2, 0.3, 0.4, 1.0]
    labels = np.vstack([TOY_LABELS, np.zeros(4, int)])
    # E's top-1 is D with IoU 0: MAP@1 = (4 * 5/24 + 0) / 5
    assert map_at_k(sim, labels, ks=(1,), is_similarity=True)["MAP@1"] == pytest.approx(1 / 6)
    # with everyone a candidate, E is everyone's top-1 (IoU 0) and D is E's: MAP@1 = 0
    assert map_at_k(sim, labels, ks=(1,), is_similarity=True, abnormal_gallery_only=False)["MAP@1"] == 0.0


def test_map_at_k_from_embeddings_equals_loop():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(30, 8))
    labels = rng.integers(0, 2, (30, 5))
    labels[0] = 0
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = unit @ unit.T
    expected = {}
    for k in (1, 5, 10):
        per_query = []
        for q in range(30):
            candidates = [j for j in range(30) if j != q and labels[j].any()]
            top = sorted(candidates, key=lambda j: -sim[q, j])[:k]
            per_query.append(np.mean([label_iou(labels[q], labels[j]) for j in top]))
        expected[f"MAP@{k}"] = float(np.mean(per_query))
    assert map_at_k(emb, labels, ks=(1, 5, 10)) == pytest.approx(expected)


# --- bootstrap and metrics.json ------------------------------------------------------------------------------------

def test_bootstrap_ci_contains_point_and_narrows_with_more_cases():
    rng = np.random.default_rng(0)
    data = rng.normal(1.0, 1.0, 2000)
    point, lo, hi = bootstrap_ci(np.mean, data, n=300)
    assert point == pytest.approx(data.mean()) and lo < point < hi
    _, lo_small, hi_small = bootstrap_ci(np.mean, data[:50], n=300)
    assert (hi - lo) < (hi_small - lo_small) / 3                   # width ~ 1/sqrt(cases): about 6x narrower
    assert bootstrap_ci(np.mean, data[:50], n=300, seed=1) == bootstrap_ci(np.mean, data[:50], n=300, seed=1)


def test_bootstrap_ci_resamples_arrays_together():
    y = np.array([0, 0, 0, 1, 1, 1] * 5)
    s = y + 0.01 * np.arange(30)                                   # perfectly separated -> every resample AUROC 1
    assert bootstrap_ci(auroc, y, s, n=200) == pytest.approx((1.0, 1.0, 1.0))   # independent resampling: ~0.5
    with pytest.raises(UserError):
        bootstrap_ci(auroc, y, s[:-1])


def test_bootstrap_ci_bca_and_percentile_agree_with_the_normal_interval_of_a_mean():
    # the mean of 400 N(1, 1) draws: any sound 95 % interval is about mean +- 1.96 s / sqrt(n) (= +- 0.1)
    rng = np.random.default_rng(2)
    data = rng.normal(1.0, 1.0, 400)
    half = 1.96 * data.std(ddof=1) / math.sqrt(len(data))
    for method in ("percentile", "BCa"):
        point, lo, hi = bootstrap_ci(np.mean, data, n=1000, method=method)
        assert lo == pytest.approx(point - half, abs=0.15 * half) and hi == pytest.approx(point + half, abs=0.15 * half)
    # an undefined resample (one class only) is left out of the percentiles, not turned into a NaN interval:
    # 2 positives in 8 cases leave no positive in about (6/8)^8 = 10 % of the resamples
    y, s = np.array([1, 1, 0, 0, 0, 0, 0, 0]), np.array([0.9, 0.3, 0.8, 0.2, 0.1, 0.4, 0.5, 0.6])
    point, lo, hi = bootstrap_ci(auroc, y, s, n=300)
    assert point == pytest.approx(8 / 12) and 0.0 <= lo < point < hi <= 1.0    # .9 beats 6 negatives, .3 beats 2


# --- DeLong's test -------------------------------------------------------------------------------------------------

def test_delong_hand_worked():
    """Three positives, two negatives, ties in both scores. psi(x, y) = 1 if x > y, 1/2 if x = y, else 0.

    a: positives .9 .4 .6, negatives .6 .2
       V10 (each positive vs both negatives) = 1, 1/2, 3/4 (.6 ties .6)   V01 (each negative vs the 3 positives)
       = 1/2 (.6: beaten by .9, tied by .6), 1                              AUROC = mean V10 = 3/4
    b: positives .8 .7 .1, negatives .9 .1
       V10 = 1/2, 1/2, 1/4 (.1 ties .1)   V01 = 0, 5/6 (.1: beaten by .8 .7, tied by .1)   AUROC = 5/12
    S10 = sample covariance over the 3 positives (divide by 2): var a = (1/16 + 1/16) / 2 = 1/16,
          var b = (1/144 + 1/144 + 4/144) / 2 = 1/48, cov = (1/4 * 1/12 - 1/4 * 1/12 + 0) / 2 = 0
    S01 = over the 2 negatives (divide by 1): var a = 1/16 + 1/16 = 1/8, var b = 2 * (5/12)^2 = 25/72,
          cov = 2 * (1/4 * 5/12) = 5/24
    Var(AUROC) = S10 / 3 + S01 / 2: var a = 1/48 + 1/16 = 1/12, var b = 1/144 + 25/144 = 13/72, cov = 5/48
    Var(a - b) = 1/12 + 13/72 - 2 * 5/48 = (12 + 26 - 30) / 144 = 1/18
    z = (3/4 - 5/12) / sqrt(1/18) = (1/3) sqrt(18) = sqrt(2);  p = 2 (1 - Phi(sqrt 2)) = 0.15730
    """
    y = [1, 1, 1, 0, 0]
    auc_a, auc_b, z, p = delong_test(y, [0.9, 0.4, 0.6, 0.6, 0.2], [0.8, 0.7, 0.1, 0.9, 0.1])
    assert auc_a == pytest.approx(3 / 4) and auc_b == pytest.approx(5 / 12)
    assert z == pytest.approx(math.sqrt(2)) and p == pytest.approx(0.157299, abs=1e-6)
    # swapping the scores swaps the AUROCs and the sign of z, not p
    assert delong_test(y, [0.8, 0.7, 0.1, 0.9, 0.1], [0.9, 0.4, 0.6, 0.6, 0.2]) == pytest.approx(
        (5 / 12, 3 / 4, -math.sqrt(2), p))


def test_delong_identical_scores_and_strong_separation():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 200)
    noise = rng.random(200)
    auc_a, auc_b, z, p = delong_test(y, noise, noise)
    assert auc_a == auc_b == pytest.approx(auroc(y, noise)) and z == 0.0 and p == 1.0
    strong = y + 0.5 * rng.random(200)                        # separates the classes perfectly
    auc_a, auc_b, z, p = delong_test(y, strong, noise)
    assert auc_a == 1.0 and abs(auc_b - 0.5) < 0.1 and z > 5 and p < 1e-6
    # a monotone transform ranks every pair alike: the same AUROC, p = 1
    assert delong_test(y, noise, np.exp(3 * noise))[3] == pytest.approx(1.0)
    with pytest.raises(UserError):
        delong_test([1, 0, 0], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])    # one positive: no variance to estimate


def test_delong_variance_equals_the_pairwise_definition():
    # DeLong 1988 directly: V10_i = mean_j psi(x_i, y_j), V01_j = mean_i psi(x_i, y_j), O(m n), with many ties
    rng = np.random.default_rng(6)
    y = rng.integers(0, 2, 60).astype(bool)
    a, b = rng.integers(0, 5, 60) + 2 * y, rng.integers(0, 7, 60) + y
    components = []
    for s in (a, b):
        diff = s[y][:, None] - s[~y][None, :]
        psi = (diff > 0) + 0.5 * (diff == 0)
        components.append((psi.mean(1), psi.mean(0)))
    v10, v01 = np.stack([c[0] for c in components]), np.stack([c[1] for c in components])
    cov = np.cov(v10) / y.sum() + np.cov(v01) / (~y).sum()
    want_z = (v10[0].mean() - v10[1].mean()) / math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    auc_a, auc_b, z, _ = delong_test(y, a, b)
    assert (auc_a, auc_b) == pytest.approx((auroc(y, a), auroc(y, b))) and z == pytest.approx(want_z)


def test_write_metrics_json(tmp_path):
    path = tmp_path / "sub" / "metrics.json"
    written = write_metrics_json(path, {"auroc": np.float32(0.123456), "bad": float("nan"), "k": np.int64(3),
                                        "per": {"x": [np.nan, 0.5]}}, n=12, preset="demo")
    loaded = json.loads(path.read_text())                          # strict JSON: no NaN tokens
    assert loaded == written
    assert loaded["auroc"] == 0.1235 and loaded["bad"] is None and loaded["k"] == 3
    assert loaded["per"]["x"] == [None, 0.5]
    assert loaded["meta"]["n"] == 12 and loaded["meta"]["preset"] == "demo"
    assert "date" in loaded["meta"] and "git_commit" in loaded["meta"]


def test_map_bounds_oracle_beats_every_embedding_and_normals_cap_it():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, (40, 6))
    labels[:4] = 0                                               # 4 normal studies: 0 as queries, always
    bounds = map_at_k_bounds(labels, ks=(1, 5, 10), n_random=5)
    for _ in range(5):
        got = map_at_k(rng.normal(size=(40, 8)), labels, ks=(1, 5, 10))
        assert all(got[k] <= bounds["oracle"][k] + 1e-12 for k in got)
    assert bounds["oracle"]["MAP@1"] <= 36 / 40                  # the 4 normal queries contribute nothing
    assert bounds["random"]["MAP@10"] < bounds["oracle"]["MAP@10"]
    identical = np.tile([1, 0, 1, 0, 0, 0], (10, 1))             # every study alike: the oracle is perfect
    assert map_at_k_bounds(identical, ks=(5,), n_random=1)["oracle"]["MAP@5"] == pytest.approx(1.0)


def test_linear_probe_fit_minimises_the_documented_loss():
    """_probe_scores' regression minimises mean log-loss + l2 / (2 N) |w|^2 on the standardised features (the
    loss the probe was written with before scikit-learn; sklearn's C = 1 / l2). At the minimum the gradient is 0:
    Xs^T (sigmoid(d) - t) / N + l2 / N w = 0 and sum(sigmoid(d) - t) = 0, with d = Xs w + b."""
    from training.evaluate import _probe_scores
    rng = np.random.default_rng(7)
    x = rng.standard_normal((120, 4)) * [1.0, 3.0, 0.5, 2.0] + 5.0
    t = (x[:, 0] - 5 + 0.5 * rng.standard_normal(120) > 0).astype(float)
    xs = (x - x.mean(0)) / x.std(0)
    for l2 in (0.1, 10.0):
        d = _probe_scores(x, t.astype(bool), x, l2)
        wb = np.linalg.lstsq(np.c_[xs, np.ones(120)], d, rcond=None)[0]     # d is exactly linear in xs
        w = wb[:-1]
        residual = 1 / (1 + np.exp(-d)) - t
        np.testing.assert_allclose((xs.T @ residual + l2 * w) / 120, 0, atol=1e-5)   # C = l2 would miss by ~0.1
        assert abs(residual.mean()) < 1e-5


def test_linear_probe_finds_the_label_a_feature_carries_and_nothing_in_noise():
    from training.evaluate import linear_probe_auroc
    rng = np.random.default_rng(0)
    labels = rng.random((300, 3)) < 0.3
    noise = rng.standard_normal((300, 6))
    features = noise.copy()
    features[:, 0] += 3.0 * labels[:, 0]              # label 0 shifts one feature: separable
    features[:, 1] += 0.7 * labels[:, 1]              # label 1 weakly; label 2 not at all
    out = linear_probe_auroc(features, labels, names=("a", "b", "c"))
    assert out["per_label"]["a"] > 0.97
    assert 0.6 < out["per_label"]["b"] < 0.85
    assert abs(out["per_label"]["c"] - 0.5) < 0.12     # cross-validated: no fitting of noise
    assert out["macro"] == pytest.approx(np.mean(list(out["per_label"].values())))
    # fitted on one set, scored on another (held out): the same answers
    held = linear_probe_auroc(features[:100], labels[:100], names=("a", "b", "c"),
                              fit_features=features[100:], fit_labels=labels[100:])
    assert held["fitted_on"] == 200 and held["per_label"]["a"] > 0.97 and abs(held["per_label"]["c"] - 0.5) < 0.15
    with pytest.raises(UserError):
        linear_probe_auroc(features, labels)           # 3 label columns, 18 names
    with pytest.raises(UserError):
        linear_probe_auroc(features, labels, names=("a", "b", "c"), folds=1)


def test_map_read_labels_hand_worked():
    """Labels A, A, B. Nothing read: query 0 finds 1, query 1 finds 0 (IoU 1 each), query 2 ties at 0 and takes 0
    in index order (IoU 0): MAP@1 = 2/3, the oracle. Label A read as 0.9, 0.1, 0.8: vectors (0.9, 0), (0.1, 0),
    (0.8, 1); weighted Jaccard 0-1 = 0.1/0.9 = 0.111, 0-2 = 0.8/1.9 = 0.421, 1-2 = 0.1/1.8 = 0.056. Query 0 now
    takes 2 (IoU 0), query 1 takes 0 (IoU 1), query 2 takes 0 (IoU 0): MAP@1 = 1/3."""
    labels = np.array([[1, 0], [1, 0], [0, 1]])
    probs = np.array([[0.9, 0.5], [0.1, 0.5], [0.8, 0.5]])
    assert map_at_k_read_labels(probs, labels, (), ks=(1,))["MAP@1"] == pytest.approx(2 / 3)
    assert map_at_k_read_labels(probs, labels, (), ks=(1,)) == map_at_k_bounds(labels, ks=(1,), n_random=1)["oracle"]
    assert map_at_k_read_labels(probs, labels, (0,), ks=(1,))["MAP@1"] == pytest.approx(1 / 3)
    with pytest.raises(UserError):
        map_at_k_read_labels(probs[:, :1], labels, (0,))
