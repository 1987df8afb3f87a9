"""The 18 CT-RATE abnormality labels (in CT-CLIP order) and the structured findings drawn by the phantom.

A `Finding` is the one description of an abnormality that both the phantom (which draws it into a volume)
and the report writer (which describes it in words) read, so the picture and the text cannot disagree.

Vocabulary (every field is optional except `label`):
- side: "right" | "left" | "bilateral" | None (midline or not applicable)
- lobe: one of LOBES or None
- size_mm: the characteristic size in millimetres (nodule diameter, node short axis, effusion depth,
  pericardial rim thickness, bulla diameter, hernia sac diameter) or None
- severity: "mild" | "moderate" | "severe"
- kind: a sub-type, one of KINDS[label] (e.g. "solid" / "ground-glass" for a lung nodule) or None
- stations: lymph-node stations for lymphadenopathy (subset of NODE_STATIONS), else ()
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

LABELS: tuple[str, ...] = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)
LABEL_INDEX = {name: i for i, name in enumerate(LABELS)}

LOBES: tuple[str, ...] = (
    "right upper lobe", "right middle lobe", "right lower lobe",
    "left upper lobe", "lingula", "left lower lobe",
)
RIGHT_LOBES = LOBES[:3]
LEFT_LOBES = LOBES[3:]
SEVERITIES = ("mild", "moderate", "severe")
NODE_STATIONS = ("prevascular", "right paratracheal", "left paratracheal", "subcarinal", "right hilar", "left hilar",
                 "right axillary", "left axillary")

# Sub-types per label (None where a label has no sub-type).
KINDS: dict[str, tuple[str, ...] | None] = {
    "Medical material": ("sternotomy wires", "pacemaker", "prosthetic valve", "port catheter"),
    "Arterial wall calcification": None,
    "Cardiomegaly": None,
    "Pericardial effusion": None,
    "Coronary artery wall calcification": ("LAD", "LAD and circumflex", "three-vessel"),
    "Hiatal hernia": None,
    "Lymphadenopathy": None,
    "Emphysema": ("centrilobular", "paraseptal", "bullous"),
    "Atelectasis": ("plate-like", "segmental"),
    "Lung nodule": ("solid", "ground-glass"),
    "Lung opacity": ("ground-glass",),
    "Pulmonary fibrotic sequela": None,
    "Pleural effusion": None,
    "Mosaic attenuation pattern": None,
    "Peribronchial thickening": None,
    "Consolidation": None,
    "Bronchiectasis": ("cylindrical", "varicose", "cystic"),
    "Interlobular septal thickening": None,
}


def check_labels(names) -> list[str]:
    """Return the names in CT-CLIP order; raise ValueError naming the first unknown label (case-insensitive)."""
    lookup = {n.lower(): n for n in LABELS}
    out = []
    for name in names:
        key = name.strip().lower()
        if not key:
            continue
        if key not in lookup:
            raise ValueError(f"Unknown label {name.strip()!r}; the 18 labels are: {', '.join(LABELS)}.")
        out.append(lookup[key])
    return sorted(set(out), key=LABEL_INDEX.__getitem__)


def label_vector(names) -> np.ndarray:
    """0/1 int vector of length 18 in CT-CLIP order."""
    vec = np.zeros(len(LABELS), dtype=np.int64)
    for n in check_labels(names):
        vec[LABEL_INDEX[n]] = 1
    return vec


def label_dict(names) -> dict[str, int]:
    present = set(check_labels(names))
    return {n: int(n in present) for n in LABELS}


@dataclass(frozen=True)
class Finding:
    """One drawn abnormality. See the module docstring for the vocabulary of each field."""
    label: str
    side: str | None = None
    lobe: str | None = None
    size_mm: float | None = None
    severity: str = "moderate"
    kind: str | None = None
    stations: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict:
        d = asdict(self)
        d["stations"] = list(self.stations)
        return d

    @staticmethod
    def from_json(d: dict) -> "Finding":
        d = dict(d)
        d["stations"] = tuple(d.get("stations") or ())
        return Finding(**d)
