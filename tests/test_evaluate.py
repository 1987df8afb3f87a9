"""training/evaluate.py on tiny cases whose answers are worked out by hand in the comments."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from engine.errors import UserError
from engine.labels import LABELS
from training.evaluate import (auroc, average_precision, bootstrap_ci, classification_at, label_iou, map_at_k,
                               map_at_k_bounds,
                               recall_at_k, roc_points, top_left_threshold, write_metrics_json, zero_shot_metrics)

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
