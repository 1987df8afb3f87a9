"""CT-RATE for the paper preset: tables, volume paths, HU handling and CT-CLIP preprocessing.

CT-RATE layout (Hugging Face ibrahimhamamci/CT-RATE, `dataset/`):
    {root}/train/train_1/train_1_a/train_1_a_1.nii.gz        VolumeName "train_1_a_1.nii.gz"
    {root}/valid/valid_7/valid_7_b/valid_7_b_2.nii.gz         VolumeName "valid_7_b_2.nii.gz"
Tables (all keyed by VolumeName):
- reports CSV:  VolumeName, ClinicalInformation_EN, Technique_EN, Findings_EN, Impressions_EN
- labels CSV:   VolumeName + the 18 labels (0/1) in CT-CLIP order
- metadata CSV: VolumeName, ..., XYSpacing (a STRING such as "[0.75, 0.75]" = DICOM PixelSpacing [row (y), column (x)]
  mm), ZSpacing (mm), RescaleSlope, RescaleIntercept, ...

HU pitfall: the first release stored raw values (HU = slope * value + intercept, from the metadata); the "v2" files
are already HU, and applying the metadata rescale again shifts everything by the intercept (air at -2048). We decide
from the values (engine.volume.classify_intensities: air near -1000 HU means HU) and rescale only raw files.

CT-CLIP preprocessing (engine.transforms.CTCLIP): orient LPS, spacing from the metadata, resample to (x, y, z) =
(0.75, 0.75, 1.5) mm (linear), clip [-1000, 1000] HU, / 1000, centre crop/pad to (z, y, x) = 240 x 480 x 480 with -1
-> tensor (1, 240, 480, 480). The reference does not reorient; we do (explicit LPS), which only matters for files
stored in another orientation.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch

from engine.errors import UserError
from engine.labels import LABELS
from engine.transforms import CTCLIP, Preprocessing, to_model_tensor
from engine.volume import Volume, classify_intensities

_NAME = re.compile(r"^(?P<split>[a-z]+)_(?P<patient>\d+)_(?P<scan>[a-z]+)_(?P<recon>\d+)\.nii(\.gz)?$")


def volume_path(root: Path, volume_name: str) -> Path:
    """CT-RATE's nested path of a volume: train_1_a_1.nii.gz -> {root}/train/train_1/train_1_a/train_1_a_1.nii.gz."""
    m = _NAME.match(volume_name)
    if not m:
        raise UserError(f"{volume_name!r} is not a CT-RATE volume name like 'train_1_a_1.nii.gz'.")
    split, patient, scan = m["split"], f"{m['split']}_{m['patient']}", f"{m['split']}_{m['patient']}_{m['scan']}"
    return Path(root) / split / patient / scan / volume_name


def parse_xy_spacing(value) -> tuple[float, float]:
    """XYSpacing "[0.75, 0.75]" (a string in the CSV; also accepts a list) -> (row/y, column/x) mm."""
    if isinstance(value, str):
        value = ast.literal_eval(value.strip())
    row, col = (float(v) for v in value)
    return row, col


def read_reports(csv_path: Path) -> pd.DataFrame:
    """VolumeName-indexed reports with columns findings, impression (empty strings where missing)."""
    df = pd.read_csv(csv_path)
    missing = {"VolumeName", "Findings_EN"} - set(df.columns)
    if missing:
        raise UserError(f"The reports table {Path(csv_path).name!r} lacks the column(s) {', '.join(sorted(missing))}.")
    out = pd.DataFrame({
        "findings": df["Findings_EN"].fillna("").astype(str).str.strip(),
        "impression": (df["Impressions_EN"] if "Impressions_EN" in df else pd.Series([""] * len(df)))
        .fillna("").astype(str).str.strip().values,
    })
    out.index = df["VolumeName"].astype(str).values
    return out


def read_labels(csv_path: Path) -> pd.DataFrame:
    """VolumeName-indexed (N, 18) 0/1 labels in CT-CLIP order."""
    df = pd.read_csv(csv_path)
    missing = [n for n in ("VolumeName", *LABELS) if n not in df.columns]
    if missing:
        raise UserError(f"The labels table {Path(csv_path).name!r} lacks the column {missing[0]!r}.")
    out = df[list(LABELS)].astype(np.int64)
    out.index = df["VolumeName"].astype(str).values
    return out


def read_metadata(csv_path: Path) -> pd.DataFrame:
    """VolumeName-indexed spacing (x, y, z mm) and rescale: columns spacing_x/y/z, slope, intercept."""
    df = pd.read_csv(csv_path)
    missing = [n for n in ("VolumeName", "XYSpacing", "ZSpacing") if n not in df.columns]
    if missing:
        raise UserError(f"The metadata table {Path(csv_path).name!r} lacks the column {missing[0]!r}.")
    rows_cols = [parse_xy_spacing(v) for v in df["XYSpacing"]]
    out = pd.DataFrame({
        "spacing_x": [c for _, c in rows_cols],
        "spacing_y": [r for r, _ in rows_cols],
        "spacing_z": df["ZSpacing"].astype(float).values,
        "slope": df["RescaleSlope"].fillna(1.0).astype(float).values if "RescaleSlope" in df else 1.0,
        "intercept": df["RescaleIntercept"].fillna(0.0).astype(float).values if "RescaleIntercept" in df else 0.0,
    })
    out.index = df["VolumeName"].astype(str).values
    return out


def load_volume(path: Path, meta: pd.Series | None = None) -> Volume:
    """Read one CT-RATE NIfTI as an HU Volume in LPS with the metadata's spacing.

    Rescales with the metadata's slope/intercept only when the stored values are not already HU (the v2 pitfall).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"The CT-RATE volume {path.name!r} is not under the data root.")
    image = sitk.ReadImage(str(path))
    image = sitk.DICOMOrient(image, "LPS")
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    warnings = []
    if classify_intensities(array) != "hu":
        slope, intercept = (float(meta["slope"]), float(meta["intercept"])) if meta is not None else (1.0, -1024.0)
        array = array * np.float32(slope) + np.float32(intercept)
        warnings.append(f"Raw stored values were rescaled to HU (slope {slope:g}, intercept {intercept:g}).")
        if classify_intensities(array) != "hu":
            raise UserError(f"The CT-RATE volume {path.name!r} does not look like CT in HU even after the rescale.")
    spacing = tuple(image.GetSpacing())
    if meta is not None:
        spacing = (float(meta["spacing_x"]), float(meta["spacing_y"]), float(meta["spacing_z"]))
    return Volume(array=array, spacing=spacing, origin=tuple(image.GetOrigin()), direction=tuple(image.GetDirection()),
                  is_hu=True, warnings=warnings, source=str(path))


def report_text(findings: str, impression: str = "", findings_only: bool = True) -> str:
    """The training text: Findings only (the official CT-CLIP recipe) or "Findings: ... Impression: ..."."""
    if findings_only or not impression:
        return findings
    return f"Findings: {findings} Impression: {impression}"


class CTRATEDataset(torch.utils.data.Dataset):
    """CT-RATE (volume tensor in CT-CLIP units, report text) pairs, matched by VolumeName (never by listing order).

    `root` holds the split folders (train/, valid/). Only volumes present in all three tables are used; files missing
    on disk raise when read. `labels[i]` is the (18,) label vector of item i when a labels table is given.
    """

    def __init__(self, root: Path, reports_csv: Path, metadata_csv: Path, labels_csv: Path | None = None,
                 preset: Preprocessing = CTCLIP, findings_only: bool = True):
        self.root, self.preset, self.findings_only = Path(root), preset, findings_only
        self.reports = read_reports(reports_csv)
        self.metadata = read_metadata(metadata_csv)
        self.labels_table = read_labels(labels_csv) if labels_csv else None
        names = [n for n in self.reports.index if n in self.metadata.index]
        if self.labels_table is not None:
            names = [n for n in names if n in self.labels_table.index]
        names = [n for n in names if self.reports.loc[n, "findings"]]
        if not names:
            raise UserError("No CT-RATE volume is named in the reports, metadata (and labels) tables at once.")
        self.names = names

    def __len__(self):
        return len(self.names)

    def text(self, i: int) -> str:
        r = self.reports.loc[self.names[i]]
        return report_text(r["findings"], r["impression"], self.findings_only)

    def label_vector(self, i: int) -> np.ndarray:
        return self.labels_table.loc[self.names[i]].to_numpy()

    def __getitem__(self, i: int):
        name = self.names[i]
        volume = load_volume(volume_path(self.root, name), self.metadata.loc[name])
        return to_model_tensor(volume, self.preset), self.text(i)
