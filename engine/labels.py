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
from functools import lru_cache

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
# Findings drawn in one place (a lesion with a mask), as issue 12's pointing game lists them: the heat map of
# "{label} is present." should peak on them. The others are diffuse (emphysema, mosaic) or everywhere along a tree.
FOCAL_LABELS: tuple[str, ...] = ("Lung nodule", "Consolidation", "Atelectasis", "Pleural effusion",
                                 "Pericardial effusion", "Lymphadenopathy", "Hiatal hernia", "Medical material")

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


# Words that mark a query as English report text (see `english_word_share`). Hand-written rather than scikit-learn's
# ENGLISH_STOP_WORDS because importing scikit-learn takes seconds, and a bad query must be refused at once.
ENGLISH_FUNCTION_WORDS = frozenset("""
a about above after all also an and any are as at be been below between both but by can could did do does down
during each either few for from had has have here how if in into is it its may might more most much must near neither
no nor not of off on only or other our over per same seen shall should show shows since so some such than that the
their them then there these they this those through to too under up upon very was we were what when where which while
who whose will with within without would yet""".split())
REPORT_VOCABULARY = frozenset("""
abdomen abnormal abnormality acute adenopathy adrenal air airway airways anterior aorta aortic apex apical appear
artery ascending axial basal base bibasilar bilateral bilaterally bile bladder bone bones bronchi bronchial
bronchiolitis bronchus calcification calcified cardiac cardiomegaly change changes chest chronic clear clinical cm
collapse compared compatible consistent contour contrast control coronary correlation ct cyst cystic density
dependent descending detected diameter diffuse diffusely dilatation dilated disc distal distance duct due effusion
emphysema enlarged enlargement esophageal evaluated evaluation evidence examination fat fatty fibrosis fibrotic
finding findings fluid focal followed fracture gland glass ground heart hernia hilar history however identified
image images impression increased inferior infiltrate infiltration inflammatory interstitial intervertebral kidney
large lateral left lesion likely liver lobar lobe lobes lower lung lungs lymph malignant mass measuring mediastinal
mediastinum middle mild minimal minimally mm moderate multiple narrowed natural naturally node nodes nodular nodule
normal noted observed oesophageal opacities opacity organising organizing pancreas parenchymal patchy pathology
patient pattern peripheral plane pleural pneumonia pneumonitis pneumothorax post posterior present preserved
previous prior probably pulmonary recommended reticular right scan seen segment segmental severe significant size
small soft spine spleen stable structures study subpleural superior thickening thickness thoracic thorax tissue
trachea treatment tree tumor tumour upper vascular vertebral vessels wall widespread""".split())


def english_word_share(text: str) -> tuple[int, float]:
    """(number of words, share of them that are English function words or radiology terms), case-insensitive;
    a plural "-s"/"-es" is also looked up without it. Words are runs of letters."""
    import re

    words = re.findall(r"[^\W\d_]+", text.lower())
    known = _known_english_words()
    hits = sum(w in known or w.rstrip("s") in known or (w.endswith("es") and w[:-2] in known) for w in words)
    return len(words), hits / max(len(words), 1)


@lru_cache(maxsize=1)
def _known_english_words() -> frozenset[str]:
    """ENGLISH_FUNCTION_WORDS, REPORT_VOCABULARY and every word of the label, lobe, severity, station and kind names."""
    import re

    known = set(ENGLISH_FUNCTION_WORDS) | REPORT_VOCABULARY
    for name in (*LABELS, *LOBES, *SEVERITIES, *NODE_STATIONS, *(k for ks in KINDS.values() if ks for k in ks)):
        known.update(re.findall(r"[^\W\d_]+", name.lower()))
    return frozenset(known)


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


def parse_label_list(text: str) -> list[str]:
    """A comma-separated list of label names (as typed on a command line) -> names in CT-CLIP order.

    "" (or only spaces) is a normal study: []. A list whose items are all empty (",,,") names nothing, which is a
    typing error rather than a normal study: ValueError, as for an unknown label."""
    if not text.strip():
        return []
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise ValueError(f"The label list {text!r} names no label; give names separated by commas, "
                         'or "" for a normal study.')
    return check_labels(item for item in items if item)


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
