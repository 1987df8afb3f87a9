"""Search-box queries for a set of findings (a radiologist's few words, naming up to two labels), in the report
writer's vocabulary (engine/report_writer.py, whose helpers it shares)."""
from __future__ import annotations

import numpy as np

from engine.labels import LABEL_INDEX, LOBES, Finding
from engine.report_writer import _pick, _with, _mm, _node_region, _EMPHYSEMA_KIND, _chance, _check, _by_label


def _query_phrase(f: Finding, rng) -> str:
    label = f.label
    side = f.side if f.side in ("right", "left", "bilateral") else ""
    if label == "Medical material":
        return f.kind or "medical material"
    if label == "Arterial wall calcification":
        return _pick(rng, ("aortic calcification", "arterial wall calcification", "calcified aortic plaques"))
    if label == "Coronary artery wall calcification":
        return _pick(rng, ("coronary calcification", "coronary artery calcification", "calcified coronary arteries"))
    if label == "Cardiomegaly":
        return _pick(rng, ("cardiomegaly", "enlarged heart"))
    if label == "Pericardial effusion":
        return "pericardial effusion"
    if label == "Hiatal hernia":
        return "hiatal hernia"
    if label == "Lymphadenopathy":
        return _pick(rng, (f"{_node_region(f)} lymphadenopathy", "lymphadenopathy", "enlarged lymph nodes"))
    if label == "Emphysema":
        return _with(f.kind if f.kind in _EMPHYSEMA_KIND else "", "emphysema")
    if label == "Atelectasis":
        return _with(f.kind or "", "atelectasis")
    if label == "Lung nodule":
        lobe = f.lobe if f.lobe in LOBES and _chance(rng, 0.5) else ""
        return _pick(rng, (_with(f.kind or "", "nodule", f"in the {lobe}" if lobe else ""),
                           _with(_mm(f.size_mm) if f.size_mm else "", "lung nodule")))
    if label == "Lung opacity":
        return "ground-glass opacity" if f.kind == "ground-glass" else "lung opacity"
    if label == "Pulmonary fibrotic sequela":
        return _pick(rng, ("fibrotic sequelae", "pulmonary fibrotic sequela"))
    if label == "Pleural effusion":
        return _with(side, "pleural effusion")
    if label == "Mosaic attenuation pattern":
        return "mosaic attenuation"
    if label == "Peribronchial thickening":
        return "peribronchial thickening"
    if label == "Consolidation":
        return _with("consolidation", f"in the {f.lobe}" if f.lobe in LOBES and _chance(rng, 0.5) else "")
    if label == "Bronchiectasis":
        return _with(f.kind or "", "bronchiectasis")
    if label == "Interlobular septal thickening":
        return "interlobular septal thickening"
    raise ValueError(f"The report writer has no query phrase for the label {label!r}.")


_NORMAL_QUERIES = ("no acute findings", "normal chest CT", "unremarkable chest CT", "chest CT within normal limits",
                   "no abnormality in the chest")


def write_query(findings: list[Finding], rng: np.random.Generator, max_findings: int = 2) -> str:
    """A short query as a radiologist types it into a search box (3-12 words), naming up to `max_findings` labels."""
    findings = _check(findings)
    if not findings:
        return _pick(rng, _NORMAL_QUERIES)
    first_of_label = list(_by_label(sorted(findings, key=lambda f: LABEL_INDEX[f.label])).values())
    chosen_idx = sorted(rng.permutation(len(first_of_label))[:max(1, max_findings)])
    phrases = [_query_phrase(first_of_label[i][0], rng) for i in chosen_idx]
    while len(phrases) > 1 and sum(len(p.split()) + 1 for p in phrases) > 12:  # a search box query stays short
        phrases.pop()
    if len(phrases) == 1:
        query = phrases[0]
    else:
        joiner = _pick(rng, (" and ", " with ", ", "))
        query = joiner.join(phrases[:-1]) + (" and " if joiner == ", " else joiner) + phrases[-1]
    if len(query.split()) < 3:
        query = _pick(rng, ("chest CT with {}", "{} on chest CT", "CT showing {}", "findings of {}")).format(query)
    return query
