"""Drawing findings for a label set (side, lobe, size, severity, kind, stations), and the one home of "which lung".

`finding_lung` and `finding_sides` answer, for the drawing and the painting alike, which lung a finding lies in and
which sides a sided finding covers; `finding_rng` gives each finding its own random stream.
"""
from __future__ import annotations

import numpy as np

from engine.labels import KINDS, LABEL_INDEX, LABELS, LEFT_LOBES, NODE_STATIONS, RIGHT_LOBES, Finding, check_labels

SEV = {"mild": 0, "moderate": 1, "severe": 2}


def finding_lung(f: Finding) -> str:
    """The lung a lobar finding lies in: from its lobe, else its side ('right' when neither says)."""
    if f.lobe in RIGHT_LOBES:
        return "right"
    if f.lobe in LEFT_LOBES:
        return "left"
    return f.side or "right"


def finding_sides(side: str | None) -> tuple[str, ...]:
    """The lungs a sided finding covers: both for 'bilateral' or no side, else the one named."""
    return ("right", "left") if side in (None, "bilateral") else (side,)


def severity_level(f: Finding) -> int:
    """0 mild, 1 moderate, 2 severe (moderate when the finding names none of these)."""
    return SEV.get(f.severity, 1)


def finding_rng(seed: int, label: str, j: int) -> np.random.Generator:
    """The random stream of finding number j of a label in a study: SeedSequence([seed, 1, label index, j])."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), 1, LABEL_INDEX[label], int(j)]))


def _pick(rng, options, p=None):
    return options[int(rng.choice(len(options), p=p))]


def _severity(rng, p=(0.45, 0.35, 0.2)) -> str:
    return _pick(rng, ("mild", "moderate", "severe"), p)


def _side(rng, p=(0.4, 0.3, 0.3)) -> str:
    return _pick(rng, ("right", "left", "bilateral"), p)


def _lobe_for(rng, side: str, prefer=None) -> str:
    lobes = RIGHT_LOBES if side == "right" else LEFT_LOBES
    if prefer is not None:
        lobes = [lobe for lobe in lobes if lobe in prefer] or lobes
    return _pick(rng, tuple(lobes))


LOWER = ("right lower lobe", "left lower lobe")
UPPER = ("right upper lobe", "left upper lobe")


# ---------------------------------------------------------------- one sampler per label

def _medical_material(label: str, sev: str, level: int, rng: np.random.Generator) -> list[Finding]:
    findings: list[Finding] = []
    kind = _pick(rng, KINDS[label], (0.35, 0.3, 0.15, 0.2))
    side = "left" if kind == "pacemaker" and rng.random() < 0.85 else (
        "right" if kind == "port catheter" and rng.random() < 0.8 else None)
    if kind in ("pacemaker", "port catheter") and side is None:
        side = "right" if kind == "pacemaker" else "left"
    findings.append(Finding(label, side=side, severity="mild", kind=kind))
    if kind == "prosthetic valve" and rng.random() < 0.7:          # valve replacement comes with wires
        findings.append(Finding(label, severity="mild", kind="sternotomy wires"))
    return findings


def _arterial_wall_calcification(label: str, sev: str, level: int, rng: np.random.Generator) -> list[Finding]:
    return [Finding(label, severity=sev)]


def _cardiomegaly(label: str, sev: str, level: int, rng: np.random.Generator) -> list[Finding]:
    return [Finding(label, severity=sev)]


def _pericardial_effusion(label: str, sev: str, level: int, rng: np.random.Generator) -> list[Finding]:
    size = float(np.round(rng.uniform(*((5, 9), (9, 15), (15, 25))[level])))
    return [Finding(label, size_mm=size, severity=sev)]


def _coronary_artery_wall_calcification(label: str, sev: str, level: int,
                                        rng: np.random.Generator) -> list[Finding]:
    kind = _pick(rng, KINDS[label], ((0.6, 0.3, 0.1), (0.3, 0.4, 0.3), (0.1, 0.3, 0.6))[level])
    return [Finding(label, severity=sev, kind=kind)]


def _hiatal_hernia(label: str, sev: str, level: int, rng: np.random.Generator) -> list[Finding]:
    size = float(np.round(rng.uniform(*((25, 35), (35, 50), (50, 70))[level])))
    return [Finding(label, size_mm=size, severity=sev)]


def _lymphadenopathy(label: str, sev: str, level: int, rng: np.random.Generator) -> list[Finding]:
    n = int(rng.integers(1, 4))
    stations = tuple(sorted(rng.choice(len(NODE_STATIONS), size=n, replace=False,
                                       p=np.array([2, 3, 2, 3, 2, 2, 1, 1]) / 16)))
    size = float(np.round(rng.uniform(*((11, 14), (14, 20), (20, 30))[level])))
    return [Finding(label, size_mm=size, severity=sev, stations=tuple(NODE_STATIONS[i] for i in stations))]


def _emphysema(label: str, sev: str, level: int, rng: np.random.Generator) -> list[Finding]:
    kind = _pick(rng, KINDS[label], (0.6, 0.2, 0.2))
    side = _side(rng, (0.1, 0.1, 0.8))
    size = float(np.round(rng.uniform(25, 60))) if kind == "bullous" else None
    return [Finding(label, side=side, severity=sev, kind=kind, size_mm=size)]


def _atelectasis(label: str, sev: str, level: int, rng: np.random.Generator) -> list[Finding]:
    findings: list[Finding] = []
    kind = _pick(rng, KINDS[label], (0.55, 0.45))
    side = _side(rng, (0.4, 0.35, 0.25))
    for s in finding_sides(side):
        lobe = _lobe_for(rng, s, LOWER + ("right middle lobe", "lingula") if rng.random() < 0.3 else LOWER)
        findings.append(Finding(label, side=s, lobe=lobe, severity=sev, kind=kind))
    return findings


def _lung_nodule(label: str, sev: str, level: int, rng: np.random.Generator) -> list[Finding]:
    findings: list[Finding] = []
    for _ in range(int(rng.choice([1, 1, 1, 2, 2, 3]))):
        side = _pick(rng, ("right", "left"), (0.55, 0.45))
        lobe = _lobe_for(rng, side, UPPER if rng.random() < 0.5 else None)
        kind = _pick(rng, KINDS[label], (0.75, 0.25))
        size = float(np.round(min(30.0, 4.0 + rng.gamma(1.5, 3.5) * (1 + level)), 0))
        findings.append(Finding(label, side=side, lobe=lobe, size_mm=size, severity=sev, kind=kind))
    return findings


def _lung_opacity(label: str, sev: str, level: int, rng: np.random.Generator) -> list[Finding]:
    side = _side(rng, (0.25, 0.2, 0.55))
    lobe = None if side == "bilateral" else _lobe_for(rng, side)
    return [Finding(label, side=side, lobe=lobe, severity=sev, kind="ground-glass")]


def _pulmonary_fibrotic_sequela(label: str, sev: str, level: int, rng: np.random.Generator) -> list[Finding]:
    findings: list[Finding] = []
    side = _side(rng, (0.35, 0.3, 0.35))
    for s in finding_sides(side):
        findings.append(Finding(label, side=s, lobe=_lobe_for(rng, s), severity=sev))
    return findings


def _pleural_effusion(label: str, sev: str, level: int, rng: np.random.Generator) -> list[Finding]:
    side = _side(rng, (0.35, 0.25, 0.4))
    size = float(np.round(rng.uniform(*((10, 20), (20, 40), (40, 70))[level])))
    return [Finding(label, side=side, size_mm=size, severity=sev)]


def _mosaic_attenuation_pattern(label: str, sev: str, level: int, rng: np.random.Generator) -> list[Finding]:
    return [Finding(label, side="bilateral", severity=sev)]


def _peribronchial_thickening(label: str, sev: str, level: int, rng: np.random.Generator) -> list[Finding]:
    side = _side(rng, (0.15, 0.15, 0.7))
    lobe = None if side == "bilateral" else _lobe_for(rng, side, LOWER)
    return [Finding(label, side=side, lobe=lobe, severity=sev)]


def _consolidation(label: str, sev: str, level: int, rng: np.random.Generator) -> list[Finding]:
    findings: list[Finding] = []
    side = _side(rng, (0.45, 0.35, 0.2))
    for s in finding_sides(side):
        lobe = _lobe_for(rng, s, LOWER if rng.random() < 0.6 else None)
        findings.append(Finding(label, side=s, lobe=lobe, severity=sev))
    return findings


def _bronchiectasis(label: str, sev: str, level: int, rng: np.random.Generator) -> list[Finding]:
    findings: list[Finding] = []
    kind = _pick(rng, KINDS[label], (0.6, 0.25, 0.15))
    side = _side(rng, (0.3, 0.25, 0.45))
    for s in finding_sides(side):
        lobe = _lobe_for(rng, s, LOWER + ("right middle lobe", "lingula"))
        findings.append(Finding(label, side=s, lobe=lobe, severity=sev, kind=kind))
    return findings


def _interlobular_septal_thickening(label: str, sev: str, level: int, rng: np.random.Generator) -> list[Finding]:
    return [Finding(label, side=_side(rng, (0.1, 0.1, 0.8)), severity=sev)]


# label -> its sampler (label, severity word, severity level 0-2, rng) -> findings; each draws from the shared
# rng in turn, after the severity, so the order of draws is the order of labels in CT-CLIP order
SAMPLERS = {
    "Medical material": _medical_material,
    "Arterial wall calcification": _arterial_wall_calcification,
    "Cardiomegaly": _cardiomegaly,
    "Pericardial effusion": _pericardial_effusion,
    "Coronary artery wall calcification": _coronary_artery_wall_calcification,
    "Hiatal hernia": _hiatal_hernia,
    "Lymphadenopathy": _lymphadenopathy,
    "Emphysema": _emphysema,
    "Atelectasis": _atelectasis,
    "Lung nodule": _lung_nodule,
    "Lung opacity": _lung_opacity,
    "Pulmonary fibrotic sequela": _pulmonary_fibrotic_sequela,
    "Pleural effusion": _pleural_effusion,
    "Mosaic attenuation pattern": _mosaic_attenuation_pattern,
    "Peribronchial thickening": _peribronchial_thickening,
    "Consolidation": _consolidation,
    "Bronchiectasis": _bronchiectasis,
    "Interlobular septal thickening": _interlobular_septal_thickening,
}
assert set(SAMPLERS) == set(LABELS), "one sampler per CT-RATE label"


def sample_findings(labels: list[str], rng: np.random.Generator) -> list[Finding]:
    """One or more `Finding` per label with plausible side, lobe, size (mm), severity, kind and node stations."""
    findings: list[Finding] = []
    for label in check_labels(labels):
        sev = _severity(rng)
        findings += SAMPLERS[label](label, sev, ("mild", "moderate", "severe").index(sev), rng)
    return findings
