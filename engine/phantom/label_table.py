"""CT-RATE's label table: load it (the compact copy shipped in assets/, or the CSV) and draw label sets from it."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from engine import settings
from engine.errors import UserError
from engine.labels import LABELS


def label_table_csv() -> Path:
    """CT-RATE's train_predicted_labels.csv in the shared data folder (settings.shared_data(), read when asked)."""
    return settings.shared_data() / "ctrate_labels" / "train_predicted_labels.csv"


def load_label_table(path: str | Path | None = None) -> np.ndarray:
    """CT-RATE's label table as an (N, 18) uint8 0/1 array in CT-CLIP label order.

    path None: the compact assets/phantom/label_sets.json shipped with the project (unique label vectors + counts of
    train_predicted_labels.csv, expanded back to rows in code order), always, so the same seed draws the same label
    set on every machine, with or without the CSV beside the project.
    A .csv path must have the 18 label columns; a .json path must be in build_label_sets_json's format.
    """
    if path is None:
        path = settings.phantom_label_sets()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"The CT-RATE label table {path} does not exist.")
    return _load_label_table_cached(str(path)).copy()


@functools.lru_cache(maxsize=4)
def _load_label_table_cached(path: str) -> np.ndarray:
    if path.endswith(".json"):
        data = json.loads(Path(path).read_text())
        if list(data["labels"]) != list(LABELS):
            raise UserError(f"The label sets in {path} are not in CT-CLIP label order.")
        codes = np.asarray(data["codes"], dtype=np.int64)
        bits = (codes[:, None] >> np.arange(len(LABELS))[None, :]) & 1
        return np.repeat(bits.astype(np.uint8), np.asarray(data["counts"], dtype=np.int64), axis=0)
    import pandas as pd

    frame = pd.read_csv(path)
    missing = [name for name in LABELS if name not in frame.columns]
    if missing:
        raise UserError(f"The label table {path} lacks the column {missing[0]!r}.")
    return (frame[list(LABELS)].to_numpy() > 0).astype(np.uint8)


def build_label_sets_json(csv_path: str | Path | None = None, out_path: str | Path | None = None) -> dict:
    """Write the compact label table (unique label vectors as 18-bit codes + how often each occurs) shipped in assets/.

    Bit i of a code is label i in CT-CLIP order (defaults: label_table_csv() -> settings.phantom_label_sets()).
    Returns the written dictionary.
    """
    table = load_label_table(csv_path or label_table_csv())
    codes = (table.astype(np.int64) << np.arange(len(LABELS))[None, :]).sum(1)
    unique, counts = np.unique(codes, return_counts=True)
    data = {
        "source": "CT-RATE train_predicted_labels.csv (ibrahimhamamci/CT-RATE), reduced to unique label vectors",
        "license": "CC BY-NC-SA 4.0 (CT-RATE): non-commercial use, share-alike, attribution to the CT-RATE authors",
        "labels": list(LABELS),
        "encoding": "bit i of each code = label i in the order of 'labels'; counts = number of CT-RATE volumes",
        "n_rows": int(counts.sum()),
        "codes": unique.tolist(),
        "counts": counts.tolist(),
    }
    out_path = Path(out_path or settings.phantom_label_sets())
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    return data


def sample_label_set(rng: np.random.Generator, table: np.ndarray | None = None) -> list[str]:
    """One row of CT-RATE's label table drawn uniformly (so label priors, co-occurrence and the share of normal
    studies are CT-RATE's); returns the positive label names in CT-CLIP order ([] for a normal study)."""
    if table is None:
        table = _load_label_table_cached(str(settings.phantom_label_sets()))
    row = table[int(rng.integers(len(table)))]
    return [LABELS[i] for i in np.flatnonzero(row)]

