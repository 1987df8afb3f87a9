"""The CT CLIP's out-of-distribution check (engine/ood.py, training/ctclip_ood.py, issue 12 item 7): the distance on
hand-worked cases, the calibration quantile, the statistics files, the CLI fields and the app's greyed bars.

Checkpoint copies are folders of symlinks to assets/ctclip's files (nothing is written into assets/): whichever CT
CLIP is shipped, the tests hold."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.labels import LABELS
from engine.ood import STATISTICS_JSON, STATISTICS_TENSORS, UNKNOWN, LatentStatistics, fit_latent_statistics
from engine.settings import ctclip_dir

# ------------------------------------------------------------------------------------------------ the distance


def test_mahalanobis_distance_on_a_hand_worked_2d_gaussian():
    """Covariance [[2, 1], [1, 2]] has inverse [[2, -1], [-1, 2]] / 3. From the mean (1, 2):
    x - mean = (1, 1):  d^2 = (2 - 1 - 1 + 2) / 3 = 2/3;   x - mean = (1, -1): d^2 = (2 + 1 + 1 + 2) / 3 = 2;
    x - mean = (2, 0):  d^2 = 2 * 4 / 3 = 8/3 (the Euclidean distance would be 2 for both of the last two)."""
    stats = LatentStatistics(mean=np.array([1.0, 2.0], np.float32),
                             precision=np.linalg.inv(np.array([[2.0, 1.0], [1.0, 2.0]])).astype(np.float32),
                             threshold=2.0, info={})
    d = stats.distances(np.array([[2.0, 3.0], [2.0, 1.0], [3.0, 2.0], [1.0, 2.0]]))
    np.testing.assert_allclose(d, [math.sqrt(2 / 3), math.sqrt(2), math.sqrt(8 / 3), 0.0], rtol=1e-6)
    check = stats.check(np.array([2.0, 1.0]))
    assert check.in_distribution is True and check.ood_score == pytest.approx(math.sqrt(2) / 2, rel=1e-6)
    far = stats.check(np.array([4.0, 2.0]))          # x - mean = (3, 0): d^2 = 9 * 2/3 = 6, d / 2 = 1.2247
    assert far.in_distribution is False and far.ood_score == pytest.approx(math.sqrt(6) / 2, rel=1e-6)
    assert far.warning and "1.22" in far.warning and far.to_json() == {"in_distribution": False,
                                                                       "ood_score": round(math.sqrt(6) / 2, 4)}


def test_calibrated_threshold_is_the_chi_square_quantile_and_flags_one_percent_of_new_samples():
    """For a 2-D Gaussian, d^2 is chi-square with 2 degrees of freedom: P(d^2 > t) = exp(-t / 2), so the 99th
    percentile of d is sqrt(2 ln 100) = 3.0349. Fitted (Ledoit-Wolf) on 20 000 samples and calibrated on 20 000 others,
    the threshold lands there, and about 1 % of a third, unseen sample is flagged."""
    rng = np.random.default_rng(0)
    mean, cov = np.array([1.0, 2.0]), np.array([[2.0, 1.0], [1.0, 2.0]])
    draw = lambda n: rng.multivariate_normal(mean, cov, size=n)  # noqa: E731
    stats = fit_latent_statistics(draw(20_000), draw(20_000), quantile=0.99)
    assert stats.threshold == pytest.approx(math.sqrt(2 * math.log(100)), rel=0.02)
    assert stats.info["shrinkage"] < 0.01 and stats.info["n_fit"] == 20_000 and stats.info["quantile"] == 0.99
    np.testing.assert_allclose(stats.precision, np.linalg.inv(cov), atol=0.03)
    flagged = np.mean([not stats.check(x).in_distribution for x in draw(4000)])
    assert 0.005 <= flagged <= 0.02


def test_calibration_quantile_sets_the_held_out_flag_rate():
    """The threshold is the chosen quantile of the held-out distances: with 0.975 over 400 held-out points,
    10 of them lie beyond it (2.5 %), whatever the fit."""
    rng = np.random.default_rng(1)
    fit, held_out = rng.standard_normal((300, 8)), rng.standard_normal((400, 8)) * 1.3    # held out: wider
    stats = fit_latent_statistics(fit, held_out, quantile=0.975)
    assert np.sum(stats.distances(held_out) > stats.threshold) == 10
    assert stats.info["calibration_flag_rate"] == pytest.approx(0.025)
    with pytest.raises(ValueError):
        fit_latent_statistics(fit, held_out, quantile=1.0)


def test_statistics_files_round_trip_and_belong_to_one_model(tmp_path):
    rng = np.random.default_rng(2)
    stats = fit_latent_statistics(rng.standard_normal((50, 4)), rng.standard_normal((20, 4)), quantile=0.9,
                                  info={"model_id": "ctclip-aaaa"})
    stats.save(tmp_path)
    loaded = LatentStatistics.load(tmp_path, "ctclip-aaaa")
    assert loaded is not None and loaded.threshold == stats.threshold and loaded.precision.dtype == np.float32
    x = rng.standard_normal(4)
    assert loaded.check(x) == stats.check(x)
    assert LatentStatistics.load(tmp_path, "ctclip-bbbb") is None          # fitted for other weights: unknown
    assert LatentStatistics.load(tmp_path / "nothing", None) is None
    (tmp_path / STATISTICS_TENSORS).write_bytes(b"not a safetensors file")
    assert LatentStatistics.load(tmp_path, "ctclip-aaaa") is None          # damaged: unknown, never a traceback
    assert UNKNOWN.to_json() == {"in_distribution": None, "ood_score": None} and UNKNOWN.warning is None


def test_calibration_seeds_are_their_own_range():
    """The threshold's held-out phantoms share no seed with training (generated or real-report, retries included),
    with the ctclip-eval test split or with the demo library."""
    from training.ctclip_data import (CALIBRATION_SEED_BASE, LIBRARY_SEED_MIN, REAL_RETRIES, REAL_RETRY_STRIDE,
                                      REAL_SEED_BASE, TEST_SEED_BASE, CachePlan)
    plan = CachePlan("calibration", 100_000)
    seeds = [plan.job(i)["seed"] for i in (0, 99_999)]
    assert seeds == [CALIBRATION_SEED_BASE, TEST_SEED_BASE - 1]
    assert REAL_SEED_BASE + 799 + (REAL_RETRIES - 1) * REAL_RETRY_STRIDE < CALIBRATION_SEED_BASE
    assert CachePlan("test", 100_000).job(99_999)["seed"] < LIBRARY_SEED_MIN
    with pytest.raises(ValueError):
        CachePlan("calibration", 100_001)
    with pytest.raises(ValueError):
        CachePlan("calibration", 10, n_real=2)


# --------------------------------------------------------------------------------- checkpoint copies and the CLI

def checkpoint_copy(root: Path) -> Path:
    """The shipped CT CLIP as a folder of symlinks (same model_id), without any latent statistics it may have."""
    root.mkdir(parents=True)
    for item in ctclip_dir().iterdir():
        if item.name not in (STATISTICS_TENSORS, STATISTICS_JSON, "metrics.json"):
            (root / item.name).symlink_to(item.resolve())
    if (ctclip_dir() / "metrics.json").is_file():
        shutil.copy(ctclip_dir() / "metrics.json", root / "metrics.json")
    return root


def unit_sphere_statistics(directory: Path, threshold: float) -> None:
    """Statistics whose distance is hand-known for ANY unit latent: mean 0 and identity precision give d = |x| = 1,
    so every scan's ood_score is 1 / threshold."""
    from engine.pipelines.ctclip import model_id
    dim = json.loads((directory / "config.json").read_text())["latent_dim"]
    LatentStatistics(mean=np.zeros(dim, np.float32), precision=np.eye(dim, dtype=np.float32), threshold=threshold,
                     info={"model_id": model_id(directory)}).save(directory)


def run_cli(capsys, *args: str) -> dict:
    from engine.cli import main
    code = main([*args, "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(out) == 1, out
    return json.loads(out[0])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Three copies: no statistics, unit-sphere statistics flagging every scan (threshold 0.5 -> score 2), and
    unit-sphere statistics passing every scan (threshold 4 -> score 0.25)."""
    root = tmp_path_factory.mktemp("ood-checkpoints")
    plain = checkpoint_copy(root / "plain")
    flagging = checkpoint_copy(root / "flagging")
    unit_sphere_statistics(flagging, threshold=0.5)
    passing = checkpoint_copy(root / "passing")
    unit_sphere_statistics(passing, threshold=4.0)
    return {"plain": plain, "flagging": flagging, "passing": passing}


@pytest.fixture(scope="module")
def phantom_path(tmp_path_factory):
    from engine.phantom import make_study
    from engine.volume import write_nifti
    path = tmp_path_factory.mktemp("ood-phantom") / "phantom.nii.gz"
    write_nifti(make_study(3, labels=["Pleural effusion"]).volume, path)
    return path


def test_zeroshot_json_carries_the_check_on_a_real_ct_and_on_a_phantom(capsys, checkpoints, shared_data,
                                                                         phantom_path):
    real = shared_data / "ct" / "lung1_image_small128.nii.gz"
    unknown = run_cli(capsys, "zeroshot", "--ct", str(real), "--weights", str(checkpoints["plain"]))
    assert unknown["in_distribution"] is None and unknown["ood_score"] is None         # no statistics: unknown
    assert not any("ood_score" in w for w in unknown["warnings"])
    flagged = run_cli(capsys, "zeroshot", "--ct", str(real), "--weights", str(checkpoints["flagging"]))
    assert flagged["in_distribution"] is False and flagged["ood_score"] == pytest.approx(2.0, abs=1e-3)
    assert sum("should not be read as findings" in w for w in flagged["warnings"]) == 1
    assert flagged["findings"] == unknown["findings"] and set(flagged["findings"]) == set(LABELS)
    phantom = run_cli(capsys, "zeroshot", "--ct", str(phantom_path), "--weights", str(checkpoints["passing"]))
    assert phantom["in_distribution"] is True and phantom["ood_score"] == pytest.approx(0.25, abs=1e-3)
    assert not any("ood_score" in w for w in phantom["warnings"])


def test_index_json_carries_the_check_of_each_ct(capsys, checkpoints, shared_data, tmp_path):
    ct = shared_data / "ct" / "lung1_image_small128.nii.gz"
    out = run_cli(capsys, "index", "--ct", str(ct), "--library", str(tmp_path / "lib"),
                  "--weights", str(checkpoints["flagging"]))
    entry = out["indexed"][0]
    assert entry["in_distribution"] is False and entry["ood_score"] == pytest.approx(2.0, abs=1e-3)
    assert any("should not be read as findings" in w for w in entry["warnings"])


# ------------------------------------------------------------------------------------------ the training command

def test_ctclip_ood_fits_calibrates_and_merges_its_figures(tmp_path, capsys, shared_data):
    """A few phantoms (the statistics are poor, the plumbing is real): the files load back into the pipeline, the
    calibration split is its own seed range, metrics.json keeps every other key, and the real CT's figure in
    metrics.json is exactly what the CLI answers for that file."""
    from training.ctclip_data import CALIBRATION_SEED_BASE
    from training.ctclip_ood import fit_ood

    checkpoint = checkpoint_copy(tmp_path / "ckpt")
    before = json.loads((checkpoint / "metrics.json").read_text()) if (checkpoint / "metrics.json").is_file() else {}
    real = shared_data / "ct" / "lung1_image_small128.nii.gz"
    block = fit_ood(checkpoint, cache_root=tmp_path / "cache", n_fit=6, n_calibrate=4, n_test=0, quantile=0.9,
                    workers=1, real_cts=[real], progress=False)
    info = json.loads((checkpoint / STATISTICS_JSON).read_text())
    assert info["n_fit"] == 6 and info["n_calibrate"] == 4 and info["quantile"] == 0.9
    assert info["seeds"]["calibration"].startswith(f"{CALIBRATION_SEED_BASE}..")
    assert info["seeds"]["fit"].startswith("0..")
    metrics = json.loads((checkpoint / "metrics.json").read_text())
    assert {k: v for k, v in metrics.items() if k != "ood"} == {k: v for k, v in before.items() if k != "ood"}
    assert metrics["ood"]["threshold"] == pytest.approx(block["threshold"], rel=1e-4)
    answer = run_cli(capsys, "zeroshot", "--ct", str(real), "--weights", str(checkpoint))
    assert answer["in_distribution"] == metrics["ood"]["real_ct"][real.name]["in_distribution"]
    assert answer["ood_score"] == pytest.approx(metrics["ood"]["real_ct"][real.name]["ood_score"], abs=1e-4)
    assert (real.name in metrics["ood"]["real_ct_flagged"]) == (answer["in_distribution"] is False)


# ------------------------------------------------------------------------------------------------------ the app

def test_greyed_bars_and_one_sentence_for_a_flagged_scan(checkpoints, shared_data):
    from app.models import CTClipModels
    from app.zeroshot_panel import GREYED_COLOUR, OUT_OF_DISTRIBUTION, read_findings, zero_shot_figure
    from engine.volume import read_ct

    probs = {label: 0.9 for label in LABELS}
    truth = {label: int(i % 2 == 0) for i, label in enumerate(LABELS)}
    thresholds = {label: 0.5 for label in LABELS}
    greyed = zero_shot_figure(probs, truth, thresholds, out_of_distribution=True)
    bars = [t for t in greyed.data if t.type == "bar"]
    assert sum(len(t.x) for t in bars) == len(LABELS) and {t.marker.color for t in bars} == {GREYED_COLOUR}
    assert not [t for t in greyed.data if t.name == "decision threshold"]    # no tick reads as "present"
    assert "not findings" in greyed.layout.title.text
    normal = zero_shot_figure(probs, truth, thresholds)
    assert GREYED_COLOUR not in {t.marker.color for t in normal.data if t.type == "bar"}

    volume = read_ct(shared_data / "ct" / "lung1_image_small128.nii.gz")
    note, plot = read_findings(CTClipModels(preset="demo", weights=str(checkpoints["flagging"])), volume)
    assert OUT_OF_DISTRIBUTION in note.value and plot.visible is True
    shown = json.loads(plot.value["plot"])                     # the figure as gradio sends it to the page
    assert {t["marker"]["color"] for t in shown["data"] if t["type"] == "bar"} == {GREYED_COLOUR}
