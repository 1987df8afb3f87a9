"""CT-RATE loader (paper preset): tables, the nested path layout, the v2 HU pitfall, CT-CLIP preprocessing."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from engine.errors import UserError
from engine.labels import LABELS
from engine.transforms import Preprocessing
from training.ctrate import (CTRATEDataset, load_volume, parse_xy_spacing, read_labels, read_metadata, read_reports,
                             volume_path)


def test_volume_path_layout(tmp_path):
    assert volume_path(tmp_path, "train_1_a_1.nii.gz") == tmp_path / "train/train_1/train_1_a/train_1_a_1.nii.gz"
    assert volume_path(tmp_path, "valid_123_b_2.nii.gz") == \
        tmp_path / "valid/valid_123/valid_123_b/valid_123_b_2.nii.gz"
    with pytest.raises(UserError):
        volume_path(tmp_path, "scan.nii.gz")


def test_xy_spacing_string():
    assert parse_xy_spacing("[0.75, 0.75]") == (0.75, 0.75)
    assert parse_xy_spacing("[0.341796875, 0.5]") == (0.341796875, 0.5)


def test_real_validation_tables_parse(shared_data):
    meta = read_metadata(shared_data / "ctrate_labels" / "validation_metadata.csv")
    labels = read_labels(shared_data / "ctrate_labels" / "valid_predicted_labels.csv")
    assert len(meta) == 3039 and len(labels) == 3039
    assert list(labels.columns) == list(LABELS)
    row = meta.loc["valid_1_a_1.nii.gz"]
    assert row["spacing_x"] == pytest.approx(0.341796875) and row["spacing_z"] == pytest.approx(1.5)
    assert row["intercept"] == -1024 and row["slope"] == 1
    assert meta["spacing_x"].between(0.2, 1.5).all() and meta["spacing_z"].between(0.3, 10).all()
    assert labels.loc["valid_1_a_1.nii.gz", "Lung nodule"] == 1
    assert set(np.unique(labels.to_numpy())) <= {0, 1}


def _chest_hu(shape_zyx=(12, 40, 40)) -> np.ndarray:
    """A small body-in-air HU block: air -1000 outside, soft tissue 40 inside, lung -850, a bone rod 700."""
    z, y, x = np.mgrid[:shape_zyx[0], :shape_zyx[1], :shape_zyx[2]]
    cy, cx = shape_zyx[1] / 2, shape_zyx[2] / 2
    hu = np.full(shape_zyx, -1000.0, dtype=np.float32)
    body = ((y - cy) / 16) ** 2 + ((x - cx) / 18) ** 2 <= 1
    hu[body] = 40
    hu[body & (np.abs(x - cx) > 4) & (((y - cy) / 10) ** 2 + ((np.abs(x - cx) - 9) / 6) ** 2 <= 1)] = -850
    hu[body & (np.abs(x - cx) <= 2) & (y > cy + 10)] = 700
    return hu


def _write(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array.astype(np.int16))
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


@pytest.fixture
def fake_ctrate(tmp_path):
    """Two volumes: train_1_a_1 stored as raw values (HU + 1024, v1), train_2_a_1 already in HU (v2)."""
    hu = _chest_hu()
    _write(volume_path(tmp_path, "train_1_a_1.nii.gz"), hu + 1024)
    _write(volume_path(tmp_path, "train_2_a_1.nii.gz"), hu)
    pd.DataFrame({"VolumeName": ["train_1_a_1.nii.gz", "train_2_a_1.nii.gz", "train_3_a_1.nii.gz"],
                  "ClinicalInformation_EN": ["x", "y", "z"], "Technique_EN": ["t"] * 3,
                  "Findings_EN": ["Right pleural effusion.", "Emphysema in both lungs.", "Not on disk."],
                  "Impressions_EN": ["Effusion.", None, "n"]}).to_csv(tmp_path / "reports.csv", index=False)
    pd.DataFrame({"VolumeName": ["train_1_a_1.nii.gz", "train_2_a_1.nii.gz"],
                  "XYSpacing": ["[2.0, 2.0]", "[2.5, 2.5]"], "ZSpacing": [5.0, 5.0],
                  "RescaleSlope": [1, 1], "RescaleIntercept": [-1024, -1024]}
                 ).to_csv(tmp_path / "meta.csv", index=False)
    rows = {"VolumeName": ["train_1_a_1.nii.gz", "train_2_a_1.nii.gz"]}
    rows.update({n: [int(n == "Pleural effusion"), int(n == "Emphysema")] for n in LABELS})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    return tmp_path, hu


def test_hu_detection_rescales_raw_but_not_v2(fake_ctrate):
    root, hu = fake_ctrate
    meta = read_metadata(root / "meta.csv")
    raw = load_volume(volume_path(root, "train_1_a_1.nii.gz"), meta.loc["train_1_a_1.nii.gz"])
    v2 = load_volume(volume_path(root, "train_2_a_1.nii.gz"), meta.loc["train_2_a_1.nii.gz"])
    np.testing.assert_allclose(raw.array, hu)        # rescaled once
    np.testing.assert_allclose(v2.array, hu)         # not rescaled a second time (would put air at -2024)
    assert raw.warnings and not v2.warnings
    assert raw.spacing == (2.0, 2.0, 5.0) and v2.spacing == (2.5, 2.5, 5.0)   # metadata spacing wins


def test_dataset_pairs_by_name_and_preprocesses(fake_ctrate):
    root, _ = fake_ctrate
    small = Preprocessing("tiny-ctclip", (2.0, 2.0, 4.0), (16, 48, 48))
    ds = CTRATEDataset(root, root / "reports.csv", root / "meta.csv", root / "labels.csv", preset=small)
    assert ds.names == ["train_1_a_1.nii.gz", "train_2_a_1.nii.gz"]       # train_3 has no metadata / labels
    x, text = ds[0]
    assert text == "Right pleural effusion."
    assert ds.label_vector(0)[LABELS.index("Pleural effusion")] == 1
    assert isinstance(x, torch.Tensor) and x.shape == (1, 16, 48, 48)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert float(x.min()) == pytest.approx(-1.0)                          # air and padding at -1
    assert float(x.max()) == pytest.approx(0.7, abs=0.05)                # the 700 HU bone rod
    full = CTRATEDataset(root, root / "reports.csv", root / "meta.csv", findings_only=False, preset=small)
    assert full.text(0) == "Findings: Right pleural effusion. Impression: Effusion."
    assert full.text(1) == "Emphysema in both lungs."


def test_reports_table_needs_findings(tmp_path):
    pd.DataFrame({"VolumeName": ["a"], "Report": ["x"]}).to_csv(tmp_path / "r.csv", index=False)
    with pytest.raises(UserError):
        read_reports(tmp_path / "r.csv")
