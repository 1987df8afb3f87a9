"""CT-RATE-style chest CT reports written from the phantom's drawn findings.

The phantom (engine/phantom.py) draws abnormalities described by `engine.labels.Finding` records; this module
writes the matching report, so the text side of the demo training data says exactly what the volume shows:

- every drawn label is stated present (with the Finding's side, lobe, size in mm, severity and kind, never invented);
- no undrawn label is stated present; normal statements negate absent findings only
  (e.g. "Heart contour and size are normal." is never written when Cardiomegaly is drawn).

Layout follows CT-RATE: Findings in a fixed order (trachea and main bronchi; mediastinum, heart, pericardium;
thoracic aorta; esophagus; lymph nodes; "When examined in the lung parenchyma window;" the lungs: aeration,
emphysema, nodules, opacities, consolidation, atelectasis, fibrotic sequelae, interstitium, bronchi, pleura; upper
abdominal organs; bones), then an Impression listing the main findings or a normal statement. Wording is varied
(several templates per finding and per normal statement, chosen with the caller's numpy Generator) and sometimes
echoes the translated-report quirks of CT-RATE ("natural", "calibration", "effusion-thickening"). The templates are
this project's own; no sentence is copied from CT-RATE.

Everything is deterministic given the Generator's state.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.errors import UserError
from engine.labels import LABEL_INDEX, LABELS, LOBES, Finding


@dataclass
class Report:
    findings: str
    impression: str

    @property
    def text(self) -> str:
        """Text2CT's conditioning format."""
        return f"Findings: {self.findings} Impression: {self.impression}"


# ----------------------------------------------------------------------------------------------------------------
# small helpers


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _chance(rng: np.random.Generator, p: float) -> bool:
    return bool(rng.random() < p)


def _cap(s: str) -> str:
    s = s.strip()
    return s[:1].upper() + s[1:] if s else s


def _sentence(s: str) -> str:
    s = " ".join(_cap(s).split())
    return s if s.endswith((".", ";", ":")) else s + "."


def _a(phrase: str) -> str:
    """'a' or 'an' + phrase (an 8 mm nodule, an 11 mm node, a 12 mm node)."""
    first = phrase.split()[0].lower() if phrase.split() else ""
    vowel = first[:1] in "aeiou" or first.startswith(("8", "11", "18"))
    return ("an " if vowel else "a ") + phrase


def _mm(size_mm: float | None) -> str:
    """'12 mm' / '7.5 mm' (one decimal at most)."""
    return f"{round(float(size_mm), 1):g} mm"


def _join(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


# Severity words: each is a synonym of the Finding's severity, never of another one.
_SEVERITY_WORDS = {"mild": ("mild", "minimal", "slight"), "moderate": ("moderate", ""), "severe": ("marked", "severe")}


def _sev(f: Finding, rng, p: float = 0.7) -> str:
    """A severity adjective for the Finding, or '' (omitting the severity is always truthful)."""
    words = _SEVERITY_WORDS.get(f.severity or "", ("",))
    return _pick(rng, words) if _chance(rng, p) else ""


def _with(*words: str) -> str:
    return " ".join(w for w in words if w)


def _lobe_phrase(lobe: str, rng) -> str:
    """'the right upper lobe' / 'the upper lobe of the right lung' / 'the right lung upper lobe' ..."""
    if lobe == "lingula":
        return _pick(rng, ("the lingula", "the lingular segment of the left upper lobe", "the left lung lingula"))
    side, part = lobe.split()[0], lobe.split()[1]
    return _pick(rng, (f"the {lobe}", f"the {part} lobe of the {side} lung", f"the {side} lung {part} lobe"))


def _lung_where(f: Finding, rng, allow_empty: bool = True) -> str:
    """Where in the lungs, from the Finding's lobe and side only ('' when neither is known)."""
    if f.lobe in LOBES:
        lobe = _lobe_phrase(f.lobe, rng)
        if f.side == "bilateral":
            return _pick(rng, (f"in both lungs, most prominently in {lobe}", f"bilaterally, more prominent in {lobe}"))
        return f"in {lobe}"
    if f.side == "bilateral":
        return _pick(rng, ("in both lungs", "bilaterally", "in both lung parenchyma", "in bilateral lungs"))
    if f.side in ("right", "left"):
        return _pick(rng, (f"in the {f.side} lung", f"in the {f.side} lung parenchyma", f"on the {f.side}"))
    if allow_empty and _chance(rng, 0.5):
        return ""
    return _pick(rng, ("in the lung parenchyma", "in the lungs"))


def _lung_where_short(f: Finding) -> str:
    """A fixed, short location for impressions and queries."""
    if f.lobe in LOBES:
        return f"in the {f.lobe}"
    if f.side == "bilateral":
        return "in both lungs"
    if f.side in ("right", "left"):
        return f"in the {f.side} lung"
    return ""


# ----------------------------------------------------------------------------------------------------------------
# one sentence per finding (positive statements)


def _medical_material(f: Finding, rng) -> str:
    side = f"{f.side} " if f.side in ("right", "left") else ""
    if f.kind == "sternotomy wires":
        opts = ("Median sternotomy wires are observed in the sternum (post-operative).",
                "Sternotomy wires secondary to previous cardiac surgery are seen in the sternum.",
                "There are metallic sternotomy wires in the sternum.",
                "Medical material compatible with sternotomy wires is observed.")
    elif f.kind == "pacemaker":
        opts = (f"A pacemaker is present in the {side}pectoral region, "
                "its lead extending into the right heart chambers.",
                f"A {side}pacemaker generator is observed, with a pacemaker lead ending in the right ventricle.",
                "A pacemaker lead extending through the superior vena cava to the right ventricle is observed.",
                "Medical material is observed: a pacemaker with its lead in the right heart.")
    elif f.kind == "prosthetic valve":
        opts = ("A prosthetic heart valve with metallic density is observed.",
                "Metallic prosthetic valve ring is seen at the level of the cardiac valves (valve replacement).",
                "There is a prosthetic cardiac valve (post-operative medical material).")
        side = ""
    elif f.kind == "port catheter":
        opts = (f"A {side}port catheter is observed, its tip at the superior vena cava-right atrium junction.",
                f"There is a port catheter in the {side}anterior chest wall extending to the superior vena cava.",
                "A port catheter extending to the cavoatrial junction is seen.")
    else:
        opts = ("Metallic medical material is observed.",
                "Medical material with metallic density is seen in the thorax.")
    return _pick(rng, opts)


def _arterial(f: Finding, rng) -> str:
    sev = _sev(f, rng)
    where = _pick(rng, ("the wall of the thoracic aorta", "the aortic arch and descending aorta",
                        "the thoracic aorta", "the aortic wall"))
    opts = (f"{_with(sev, 'calcified atheroma plaques')} are observed in {where}.",
            f"There are {_with(sev, 'atherosclerotic calcifications')} along {where}.",
            f"{_with(sev, 'calcific atheromatous plaques')} were seen in {where}.",
            f"Arterial wall calcification is noted in {where}.",
            f"{_with(sev, 'arterial wall calcification')} in {where} was observed.")
    return _pick(rng, opts)


def _coronary_vessels(f: Finding, rng) -> str:
    # Every mention of an artery here says "coronary", so a reader never takes it for aortic calcification.
    if f.kind == "LAD":
        return _pick(rng, ("the LAD", "the left anterior descending coronary artery", "the LAD coronary artery"))
    if f.kind == "LAD and circumflex":
        return _pick(rng, ("the LAD and circumflex coronary arteries", "the LAD and Cx coronary arteries",
                           "the left anterior descending and circumflex coronary arteries"))
    if f.kind == "three-vessel":
        return _pick(rng, ("all three coronary arteries", "the LAD, circumflex and right coronary arteries"))
    return _pick(rng, ("the coronary arteries", "the coronary artery walls"))


def _coronary(f: Finding, rng) -> str:
    sev = _sev(f, rng)
    v = _coronary_vessels(f, rng)
    opts = (f"{_with(sev, 'calcified plaques')} are observed in {v}.",
            f"There are {_with(sev, 'calcifications')} in the wall of {v}.",
            f"Coronary artery wall calcification is present in {v}.",
            f"{_with(sev, 'calcific atherosclerotic plaques')} are seen along {v}.")
    return _pick(rng, opts)


def _aorta_and_coronary(aortic: Finding, coronary: Finding, rng) -> str:
    """One sentence for aortic and coronary wall calcification together (severity only when both share it)."""
    sev = _sev(aortic, rng) if aortic.severity == coronary.severity else ""
    v = _coronary_vessels(coronary, rng)
    opts = (f"{_with(sev, 'calcified atheroma plaques')} are observed in the wall of the thoracic aorta and in {v}.",
            f"There are {_with(sev, 'atherosclerotic calcifications')} in the aortic wall and along {v}.",
            f"{_with(sev, 'calcific atheromatous plaques')} were seen in the thoracic aorta and {v}.")
    return _sentence(_pick(rng, opts))


def _cardiomegaly(f: Finding, rng) -> str:
    sev = _sev(f, rng)
    opts = (f"{_with(sev, 'cardiomegaly')} is observed.",
            "The heart is enlarged (cardiomegaly).",
            f"Heart size is {_with(_SEVERITY_ADVERBS.get(f.severity or '', ''), 'increased')}.",
            "The cardiothoracic ratio is increased in favour of the heart.",
            f"Heart dimensions are increased, consistent with {_with(sev, 'cardiomegaly')}.")
    return _pick(rng, opts)


_SEVERITY_ADVERBS = {"mild": "mildly", "moderate": "moderately", "severe": "markedly"}


def _pericardial(f: Finding, rng) -> str:
    sev = _sev(f, rng)
    if f.size_mm:
        s = _mm(f.size_mm)
        opts = (f"Pericardial effusion reaching {s} in thickness is observed.",
                f"There is {_with(sev, 'pericardial effusion')} with a maximum thickness of {s}.",
                f"{_a(_with(sev, 'pericardial effusion'))} measuring {s} at its thickest part is seen "
                "around the heart.")
    else:
        opts = (f"There is {_with(sev, 'pericardial effusion')}.", f"{_with(sev, 'pericardial effusion')} is observed.")
    return _pick(rng, opts)


_HERNIA_SIZE_WORDS = {"mild": ("small",), "moderate": ("",), "severe": ("large",)}


def _hiatal(f: Finding, rng) -> str:
    size_word = _pick(rng, _HERNIA_SIZE_WORDS.get(f.severity or "", ("",))) if _chance(rng, 0.6) else ""
    tail = f", with a sac of about {_mm(f.size_mm)}" if f.size_mm and _chance(rng, 0.7) else ""
    opts = (f"{_a(_with(size_word, 'sliding-type hiatal hernia'))} is observed at the lower end of the "
            f"esophagus{tail}.",
            f"There is {_a(_with(size_word, 'hiatal hernia'))}{tail}.",
            f"{_with(size_word, 'hiatal hernia')} was observed in the distal esophagus{tail}.",
            f"Part of the stomach herniates through the esophageal hiatus ({_with(size_word, 'hiatal hernia')}){tail}.")
    return _pick(rng, opts)


def _stations(f: Finding) -> list[str]:
    return [s for s in f.stations if s]


def _node_region(f: Finding) -> str:
    st = _stations(f)
    if st and all("axillary" in s for s in st):
        return "axillary"
    if st and all("hilar" in s for s in st):
        return "hilar"
    if any("hilar" in s for s in st) and not all("hilar" in s or "axillary" in s for s in st):
        return "mediastinal and hilar"
    return "mediastinal"


def _lymph(f: Finding, rng) -> str:
    st = _stations(f)
    where = _join(st) + (" regions" if len(st) > 1 else " region") if st else _pick(rng, ("the mediastinum",))
    where_in = f"in the {where}" if st else "in the mediastinum"
    size = f"{_mm(f.size_mm)} in short axis" if f.size_mm else ""
    largest = f", the largest measuring {size}" if size else ""
    opts = (f"Lymph nodes of pathological size are observed {where_in}{largest}.",
            f"There is lymphadenopathy {where_in}{largest}.",
            f"Enlarged lymph nodes are seen {where_in}{largest}.",
            f"LAP is observed {where_in}{', short axis up to ' + _mm(f.size_mm) if f.size_mm else ''}.")
    return _pick(rng, opts)


_EMPHYSEMA_KIND = {"centrilobular": ("centrilobular", "centriacinar"), "paraseptal": ("paraseptal",),
                   "bullous": ("bullous",)}


def _emphysema(f: Finding, rng) -> str:
    sev = _sev(f, rng)
    kind = _pick(rng, _EMPHYSEMA_KIND[f.kind]) if f.kind in _EMPHYSEMA_KIND else ""
    where = _lung_where(f, rng, allow_empty=False)
    if f.kind == "bullous" and f.size_mm:
        s = _mm(f.size_mm)
        opts = (f"Bullous emphysema is observed {where}, the largest bulla measuring {s}.",
                f"Bullae up to {s} in diameter are seen {where} (bullous emphysema).",
                f"There are {_with(sev, 'emphysematous changes')} with bulla formations {where}, the largest {s}.")
    else:
        opts = (f"There are {_with(sev, kind, 'emphysematous changes')} {where}.",
                f"{_with(sev, kind, 'emphysema')} is observed {where}.",
                f"{_with(sev, kind, 'emphysematous areas')} are seen {where}.",
                f"Emphysema ({_with(sev, kind) or 'emphysematous change'}) is present {where}.")
    return _pick(rng, opts)


def _atelectasis(f: Finding, rng) -> str:
    kinds = {"plate-like": _pick(rng, ("plate-like", "linear plate-like")), "segmental": "segmental"}
    kind = kinds.get(f.kind or "", "")
    sev = _sev(f, rng, p=0.4)
    where = _lung_where(f, rng, allow_empty=False)
    opts = (f"{_with(sev, kind, 'atelectasis')} is observed {where}.",
            f"There are areas of {_with(sev, kind, 'atelectasis')} {where}.",
            f"{_with(sev, kind, 'atelectatic changes')} are seen {where}.",
            f"{_cap(where)}, {_with(sev, kind, 'atelectasis')} was observed.")
    return _pick(rng, opts)


def _nodule(f: Finding, rng) -> str:
    kinds = {"solid": "solid", "ground-glass": _pick(rng, ("ground-glass", "ground-glass density"))}
    kind = kinds.get(f.kind or "", "")
    where = _lung_where(f, rng, allow_empty=False)
    if f.size_mm:
        s = _mm(f.size_mm)
        opts = (f"{_a(_with(kind, 'nodule'))} measuring {s} is observed {where}.",
                f"There is {_a(_with(s, kind, 'nodule'))} {where}.",
                f"{_cap(where)}, {_a(_with(kind, 'pulmonary nodule'))} {s} in diameter was observed.",
                f"{_a(_with(kind, 'nodule'))} with a diameter of {s} is seen {where}.",
                f"{_with(kind, 'lung nodule')} of {s} {where}.")
    else:
        opts = (f"{_a(_with(kind, 'nodule'))} is observed {where}.",
                f"There is {_a(_with(kind, 'pulmonary nodule'))} {where}.")
    return _pick(rng, opts)


def _opacity(f: Finding, rng) -> str:
    sev = _sev(f, rng, p=0.5)
    where = _lung_where(f, rng, allow_empty=False)
    if f.kind == "ground-glass":
        opts = (f"{_with(sev, 'ground-glass opacities')} are observed {where}.",
                f"Areas of {_with(sev, 'ground-glass density')} are seen {where}.",
                f"There are {_with(sev, 'patchy ground glass')} areas {where}.",
                f"Lung opacity of ground-glass type is present {where}.")
    else:
        opts = (f"{_with(sev, 'patchy opacities')} are observed {where}.",
                f"Lung opacity is present {where}.",
                f"Areas of {_with(sev, 'increased density')} (opacity) are seen {where}.")
    return _pick(rng, opts)


def _fibrotic(f: Finding, rng) -> str:
    where = _lung_where(f, rng, allow_empty=False)
    opts = (f"Fibrotic sequelae changes are observed {where}.",
            f"Pleuroparenchymal sequelae bands are seen {where}.",
            f"There are linear fibrotic scar bands {where}.",
            f"Pulmonary fibrotic sequela is noted {where}.",
            f"Sequelae fibrotic parenchymal bands were observed {where}.")
    return _pick(rng, opts)


def _pleural(f: Finding, rng) -> str:
    sev = _sev(f, rng)
    if f.side == "bilateral":
        side_adj, where = "bilateral", _pick(rng, ("in both hemithoraces", "on both sides"))
    elif f.side in ("right", "left"):
        side_adj, where = f.side, _pick(rng, (f"in the {f.side} hemithorax", f"on the {f.side}"))
    else:
        side_adj, where = "", _pick(rng, ("in the pleural space", "in the pleural cavity"))
    depth = _mm(f.size_mm) if f.size_mm else ""
    if depth:
        opts = (f"Pleural effusion reaching {depth} in depth is observed {where}.",
                f"There is {_with(sev, side_adj, 'pleural effusion')} measuring {depth} at its deepest point.",
                f"{_with(sev, side_adj, 'pleural effusion')} with a thickness of {depth} was observed.",
                f"{_cap(where)}, pleural effusion up to {depth} deep is seen.")
    else:
        opts = (f"There is {_with(sev, side_adj, 'pleural effusion')}.", f"Pleural effusion is observed {where}.")
    return _pick(rng, opts)


def _mosaic(f: Finding, rng) -> str:
    where = _lung_where(f, rng, allow_empty=False)
    tail = _pick(rng, ("", " (small airway or small vessel disease?)", " (small airway disease?)"))
    opts = (f"A mosaic attenuation pattern is observed {where}{tail}.",
            f"Mosaic attenuation is seen {where}{tail}.",
            f"There is a mosaic attenuation pattern {where}{tail}.")
    return _pick(rng, opts)


def _peribronchial(f: Finding, rng) -> str:
    sev = _sev(f, rng)
    where = _lung_where(f, rng, allow_empty=False)
    opts = (f"{_with(sev, 'peribronchial thickening')} is observed {where}.",
            f"Bronchial wall thickening (peribronchial cuffing) is seen {where}.",
            f"There are {_with(sev, 'peribronchial thickenings')} {where}.",
            f"Peribronchial wall thickness is increased {where}.")
    return _pick(rng, opts)


def _consolidation(f: Finding, rng) -> str:
    sev = _sev(f, rng, p=0.4)
    where = _lung_where(f, rng, allow_empty=False)
    opts = (f"An area of consolidation with air bronchograms is observed {where}.",
            f"{_with(sev, 'consolidation')} is seen {where}.",
            f"There is {_with(sev, 'consolidation')} {where}, containing air bronchograms.",
            f"{_cap(where)}, a consolidated area with air bronchograms was observed.")
    return _pick(rng, opts)


def _bronchiectasis(f: Finding, rng) -> str:
    kind = f.kind if f.kind in ("cylindrical", "varicose", "cystic") else ""
    if kind == "cylindrical" and _chance(rng, 0.4):
        kind = "cylindrical (tubular)"
    where = _lung_where(f, rng, allow_empty=False)
    opts = (f"{_with(kind, 'bronchiectasis')} is observed {where}.",
            f"There are {_with(kind, 'bronchiectatic changes')} {where}.",
            f"{_with(kind, 'bronchiectasis')} is present {where}.")
    return _pick(rng, opts)


def _septal(f: Finding, rng) -> str:
    sev = _sev(f, rng, p=0.4)
    where = _lung_where(f, rng, allow_empty=False)
    opts = (f"{_with(sev, 'interlobular septal thickening')} is observed {where}.",
            f"Thickening of the interlobular septa is seen {where}.",
            f"There are {_with(sev, 'interlobular septal thickenings')} {where}.")
    return _pick(rng, opts)


_DESCRIBE = {
    "Medical material": _medical_material,
    "Arterial wall calcification": _arterial,
    "Cardiomegaly": _cardiomegaly,
    "Pericardial effusion": _pericardial,
    "Coronary artery wall calcification": _coronary,
    "Hiatal hernia": _hiatal,
    "Lymphadenopathy": _lymph,
    "Emphysema": _emphysema,
    "Atelectasis": _atelectasis,
    "Lung nodule": _nodule,
    "Lung opacity": _opacity,
    "Pulmonary fibrotic sequela": _fibrotic,
    "Pleural effusion": _pleural,
    "Mosaic attenuation pattern": _mosaic,
    "Peribronchial thickening": _peribronchial,
    "Consolidation": _consolidation,
    "Bronchiectasis": _bronchiectasis,
    "Interlobular septal thickening": _septal,
}
assert set(_DESCRIBE) == set(LABELS)


def _check(findings) -> list[Finding]:
    out = []
    for f in findings:
        if not isinstance(f, Finding):
            raise UserError(f"A finding must be an engine.labels.Finding, got {type(f).__name__}.")
        if f.label not in LABEL_INDEX:
            raise UserError(f"Unknown label {f.label!r}; the 18 labels are: {', '.join(LABELS)}.")
        out.append(f)
    return out


def describe_finding(finding: Finding, rng: np.random.Generator) -> str:
    """One sentence stating the finding present, with its own side, lobe, size (mm), severity and kind."""
    (finding,) = _check([finding])
    return _sentence(_DESCRIBE[finding.label](finding, rng))


# ----------------------------------------------------------------------------------------------------------------
# normal statements: each lists the labels it would contradict, and is only written when none of them is drawn

_NORMAL = {
    "trachea": ((), ("The trachea and the two main bronchi are open.",
                     "The trachea and both main bronchi are patent and no obstructive lesion is seen in their lumen.",
                     "Trachea is in the midline; both main bronchi are open.",
                     "Tracheal calibration is natural and both main bronchi are patent.",
                     "The trachea and main bronchi are of normal width and open.")),
    "airway_lumen": ((), ("No occlusive lesion is seen in the tracheal and main bronchial lumen.",
                          "No obstructive lesion was observed in the tracheobronchial lumen.")),
    "technique": ((), ("Non-contrast axial images of the thorax were evaluated from the lung apices to the adrenal "
                       "glands.",
                       "The examination was performed without intravenous contrast material.")),
    "contrast": ((), ("The mediastinum could not be evaluated optimally since the examination is non-contrast. "
                      "As far as can be seen:",
                      "Mediastinal structures were evaluated suboptimally because no contrast material was given.")),
    "vessels": ((), ("Mediastinal main vascular structures have a natural appearance.",
                     "Mediastinal main vascular structures are of normal width.",
                     "Calibration of the mediastinal great vascular structures is natural.")),
    "heart": (("Cardiomegaly",), ("Heart contour and dimensions are normal.", "Heart size is within normal limits.",
                                   "The heart is of natural size and configuration.",
                                   "Cardiothoracic ratio is within the normal range.",
                                   "Heart dimensions and chambers appear natural.")),
    "vessels_heart": (("Cardiomegaly",), ("Mediastinal main vascular structures, heart contour and size are natural.",
                                          "The heart and mediastinal vascular structures are of normal size.")),
    "pericardium": (("Pericardial effusion",), ("Pericardial effusion-thickening is not seen.",
                                                "No pericardial effusion or thickening is seen.",
                                                "Thickening-effusion of the pericardium was not detected.",
                                                "No effusion is seen in the pericardial space.")),
    "aorta": ((), ("The diameter of the thoracic aorta is within normal limits.", "The thoracic aorta is of normal calibre.",
                   "No dilatation of the thoracic aorta is seen.")),
    "no_arterial": (("Arterial wall calcification",), ("No calcified plaque was seen in the aortic wall.",
                                                      "No atherosclerotic calcification is seen in the thoracic "
                                                      "aorta.")),
    "no_coronary": (("Coronary artery wall calcification",), ("No calcification was seen in the coronary arteries.",
                                                             "No calcified plaque is seen along the coronary "
                                                             "arteries.")),
    "esophagus": (("Hiatal hernia",), ("Thoracic esophagus calibration is normal and no significant wall thickening "
                                       "was detected.",
                                       "The esophagus is of natural calibre within the sections.",
                                       "No pathological wall thickening was observed in the esophagus.",
                                       "Esophagus is within normal limits; no hiatal hernia is seen.")),
    "lymph": (("Lymphadenopathy",), ("No lymph nodes of pathological size were detected in the prevascular, "
                                     "paratracheal, subcarinal, hilar or axillary regions.",
                                     "There are no pathologically enlarged lymph nodes in the mediastinum and both "
                                     "hila.",
                                     "No mediastinal, hilar or axillary lymphadenopathy was detected.",
                                     "Lymph nodes in the mediastinum and axillae are not of pathological size.",
                                     "No LAP of pathological size is seen in the mediastinum.")),
    "lung_window": ((), ("When examined in the lung parenchyma window;", "Evaluating both lungs in the parenchyma window;",
                         "In the lung parenchyma window:", "Evaluated in the lung window;")),
    "aeration": (("Emphysema", "Atelectasis", "Consolidation", "Lung opacity", "Mosaic attenuation pattern"),
                 ("Aeration of both lungs is normal.", "Both lung parenchyma are normally aerated.",
                  "Both lungs are ventilated naturally.")),
    "no_lesion": (("Lung nodule", "Lung opacity", "Consolidation"),
                  ("No nodular or infiltrative lesion is detected in the lung parenchyma.",
                   "No mass, nodule or infiltration was seen in either lung.",
                   "No space-occupying lesion or active infiltration was detected in both lungs.")),
    "no_nodule": (("Lung nodule",), ("No suspicious pulmonary nodule or mass was detected.",
                                     "No nodule was observed in either lung.")),
    "no_infiltrate": (("Lung opacity", "Consolidation"), ("No active infiltration was detected in the lungs.",
                                                         "No consolidation or ground-glass opacity was observed.")),
    "pleura": (("Pleural effusion",), ("Pleural effusion-thickening was not seen on either side.",
                                       "No pleural effusion was observed in either hemithorax.",
                                       "Both pleural spaces are free of effusion.",
                                       "No pleural effusion-thickening is present in either hemithorax.")),
    "pleura_pericardium": (("Pleural effusion", "Pericardial effusion"),
                           ("No pleural or pericardial effusion is seen.",
                            "Neither pleural nor pericardial effusion is present.")),
    "abdomen": ((), ("Upper abdominal organs that enter the sections appear normal.",
                     "No space-occupying lesion was detected in the liver within the sections.",
                     "Both adrenal glands are natural in the sections passing through the upper abdomen.",
                     "The liver and spleen appear normal as far as included in the sections.",
                     "No free fluid or collection was detected in the upper abdominal sections.")),
    "bones": ((), ("Bony structures within the scan area appear natural.", "Heights of the vertebral bodies are maintained.",
                   "No lytic or destructive lesion was detected in the bone structures.",
                   "Thoracic vertebral heights and alignment are normal.")),
}

# optional negations of absent lung findings (CT-RATE mentions some of them now and then)
_OPTIONAL_LUNG_NEGATIONS = {
    "Emphysema": ("No emphysematous change is seen.", "There is no emphysema."),
    "Bronchiectasis": ("No bronchiectasis is observed.",),
    "Atelectasis": ("No atelectasis was detected.",),
    "Interlobular septal thickening": ("No interlobular septal thickening is seen.",),
    "Mosaic attenuation pattern": ("No mosaic attenuation pattern was observed.",),
    "Pulmonary fibrotic sequela": ("No fibrotic sequelae were detected.",),
    "Peribronchial thickening": ("No peribronchial thickening is seen.",),
}


def _normal(key: str, drawn: set[str], rng, count: int = 1) -> list[str]:
    """`count` different phrasings of the normal statement `key`, or [] if it would contradict a drawn label."""
    blocked_by, options = _NORMAL[key]
    if drawn.intersection(blocked_by):
        return []
    idx = rng.permutation(len(options))[:count]
    return [options[i] for i in sorted(idx)]


# ----------------------------------------------------------------------------------------------------------------
# the report


_LUNG_ORDER = ("Emphysema", "Lung nodule", "Lung opacity", "Consolidation", "Atelectasis", "Pulmonary fibrotic sequela",
               "Mosaic attenuation pattern", "Interlobular septal thickening", "Bronchiectasis",
               "Peribronchial thickening", "Pleural effusion")


def _by_label(findings: list[Finding]) -> dict[str, list[Finding]]:
    out: dict[str, list[Finding]] = {}
    for f in findings:
        out.setdefault(f.label, []).append(f)
    return out


def _findings_text(found: dict[str, list[Finding]], rng) -> str:
    drawn = set(found)
    say = lambda label: [describe_finding(f, rng) for f in found.get(label, [])]  # noqa: E731
    s: list[str] = []

    if _chance(rng, 0.2):
        s += _normal("technique", drawn, rng)
    s += _normal("trachea", drawn, rng)
    if _chance(rng, 0.5):
        s += _normal("airway_lumen", drawn, rng)
    material_first = _chance(rng, 0.5)
    if material_first:
        s += say("Medical material")
    if _chance(rng, 0.3):
        s += _normal("contrast", drawn, rng)
    # mediastinum, heart, pericardium
    if "Cardiomegaly" in drawn or _chance(rng, 0.5):
        s += _normal("vessels", drawn, rng) + say("Cardiomegaly") + _normal("heart", drawn, rng)
    else:
        s += _normal("vessels_heart", drawn, rng)
    pleura_with_pericardium = _chance(rng, 0.3) and not drawn & {"Pleural effusion", "Pericardial effusion"}
    if pleura_with_pericardium:
        s += _normal("pleura_pericardium", drawn, rng)
    else:
        s += say("Pericardial effusion") + _normal("pericardium", drawn, rng)
    # thoracic aorta, arterial and coronary calcification
    s += _normal("aorta", drawn, rng)
    arterial = found.get("Arterial wall calcification", [])
    coronary = found.get("Coronary artery wall calcification", [])
    if len(arterial) == 1 and len(coronary) == 1 and _chance(rng, 0.4):
        s.append(_aorta_and_coronary(arterial[0], coronary[0], rng))  # the usual CT-RATE pairing in one sentence
    else:
        s += say("Arterial wall calcification") + say("Coronary artery wall calcification")
    if _chance(rng, 0.2):
        s += _normal("no_arterial", drawn, rng)
    if _chance(rng, 0.2):
        s += _normal("no_coronary", drawn, rng)
    if not material_first:
        s += say("Medical material")
    # esophagus
    s += say("Hiatal hernia") + _normal("esophagus", drawn, rng)
    # lymph nodes
    s += say("Lymphadenopathy") + _normal("lymph", drawn, rng, count=1 + int(_chance(rng, 0.3)))
    # lungs
    s += _normal("lung_window", drawn, rng)
    s += _normal("aeration", drawn, rng)
    for label in _LUNG_ORDER:
        if label == "Pleural effusion" and not pleura_with_pericardium:
            s += _normal("pleura", drawn, rng)
        s += say(label)
    if drawn.isdisjoint(("Lung nodule", "Lung opacity", "Consolidation")) and _chance(rng, 0.8):
        s += _normal("no_lesion", drawn, rng)
    else:
        if _chance(rng, 0.6):
            s += _normal("no_nodule", drawn, rng)
        if _chance(rng, 0.5):
            s += _normal("no_infiltrate", drawn, rng)
    for label, options in _OPTIONAL_LUNG_NEGATIONS.items():
        if label not in drawn and _chance(rng, 0.12):
            s.append(_pick(rng, options))
    # upper abdomen and bones
    s += _normal("abdomen", drawn, rng, count=2 + int(rng.integers(3)))
    s += _normal("bones", drawn, rng, count=2 + int(rng.integers(2)))
    return " ".join(_sentence(x) if not x.endswith((";", ":")) else x for x in s)


def _impression_item(f: Finding, rng) -> str:
    """A short noun phrase naming the finding with its own attributes."""
    where = _lung_where_short(f)
    sev = _sev(f, rng, p=0.4)
    label = f.label
    if label == "Medical material":
        return _pick(rng, (f.kind or "medical material", f"{f.kind or 'metallic medical material'} (medical material)"))
    if label == "Arterial wall calcification":
        return _pick(rng, ("atherosclerotic calcification of the thoracic aorta", "arterial wall calcification",
                           f"{_with(sev, 'calcified atheroma plaques')} in the aorta"))
    if label == "Coronary artery wall calcification":
        return _pick(rng, (f"calcified plaques in {_coronary_vessels(f, rng)}", "coronary artery wall calcification",
                           "coronary artery calcification"))
    if label == "Cardiomegaly":
        return _pick(rng, (_with(sev, "cardiomegaly"), "cardiomegaly", "increased heart size"))
    if label == "Pericardial effusion":
        return _with(sev, "pericardial effusion") + (f" ({_mm(f.size_mm)})" if f.size_mm and _chance(rng, 0.5) else "")
    if label == "Hiatal hernia":
        return _pick(rng, ("hiatal hernia", "sliding-type hiatal hernia"))
    if label == "Lymphadenopathy":
        region = _node_region(f)
        st = _stations(f)
        return _pick(rng, (f"{region} lymphadenopathy",
                           f"pathologically enlarged {_join(st)} lymph nodes" if st else "lymphadenopathy"))
    if label == "Emphysema":
        kind = f.kind if f.kind in _EMPHYSEMA_KIND else ""
        return _with(sev, kind, _pick(rng, ("emphysema", "emphysematous changes")), where)
    if label == "Atelectasis":
        return _with(sev, f.kind or "", "atelectasis", where)
    if label == "Lung nodule":
        size = _mm(f.size_mm) if f.size_mm else ""
        return _with(size, f.kind or "", _pick(rng, ("nodule", "pulmonary nodule")), where)
    if label == "Lung opacity":
        return _with(sev, "ground-glass opacities" if f.kind == "ground-glass" else "lung opacity", where)
    if label == "Pulmonary fibrotic sequela":
        return _with(_pick(rng, ("fibrotic sequelae", "pleuroparenchymal sequelae changes")), where)
    if label == "Pleural effusion":
        side = f.side if f.side in ("right", "left", "bilateral") else ""
        return _with(sev, side, "pleural effusion")
    if label == "Mosaic attenuation pattern":
        return _with("mosaic attenuation pattern", where)
    if label == "Peribronchial thickening":
        return _with(sev, "peribronchial thickening", where)
    if label == "Consolidation":
        return _with("consolidation", where)
    if label == "Bronchiectasis":
        return _with(f.kind or "", "bronchiectasis", where)
    if label == "Interlobular septal thickening":
        return _with(sev, "interlobular septal thickening", where)
    raise ValueError(f"The report writer has no impression phrase for the label {label!r}.")


_NORMAL_IMPRESSIONS = ("Thoracic CT examination within normal limits.",
                       "No significant pathology was detected in the thorax.",
                       "Normal chest CT.", "No acute thoracic pathology.", "Findings within normal limits.",
                       "Thorax CT within normal limits.")


def _impression_text(findings: list[Finding], rng) -> str:
    if not findings:
        return _pick(rng, _NORMAL_IMPRESSIONS)
    ordered = sorted(findings, key=lambda f: LABEL_INDEX[f.label])
    if _chance(rng, 0.3):  # radiologists do not always list in the same order
        ordered = [ordered[i] for i in rng.permutation(len(ordered))]
    items = [_cap(_impression_item(f, rng)) for f in ordered]
    style = int(rng.integers(3))
    if style == 0:
        return " ".join(_sentence(x) for x in items)
    if style == 1:
        return " ".join("• " + _sentence(x) for x in items)
    return " ".join('"' + _sentence(x) + '"' for x in items)


def write_report(findings: list[Finding], rng: np.random.Generator) -> Report:
    """A CT-RATE-style report (Findings + Impression) stating exactly the drawn labels."""
    findings = _check(findings)
    found = _by_label(findings)
    return Report(findings=_findings_text(found, rng), impression=_impression_text(findings, rng))


_BRIEF_NORMAL = ("The lungs are clear.", "The lungs are clear. No pleural effusion. Heart size is normal.",
                 "No focal lung lesion. No pleural or pericardial effusion.", "Normal heart size. Clear lungs.")


def write_brief_report(findings: list[Finding], rng: np.random.Generator) -> Report:
    """A brief report as typed into a prompt box (the Generate tab's examples): each drawn finding in one sentence
    (describe_finding) and the impression, without the normal statements of write_report; it states exactly the
    drawn labels. A study with no finding gets one or two normal sentences."""
    findings = _check(findings)
    if not findings:
        return Report(findings=_pick(rng, _BRIEF_NORMAL), impression=_pick(rng, _NORMAL_IMPRESSIONS))
    ordered = sorted(findings, key=lambda f: LABEL_INDEX[f.label])
    return Report(findings=" ".join(describe_finding(f, rng) for f in ordered),
                  impression=_impression_text(findings, rng))


# absent findings a typed prompt may negate: normal statements (each written only when none of its labels is drawn)
_TYPED_NEGATION_KEYS = ("heart", "pericardium", "pleura", "pleura_pericardium", "lymph", "esophagus", "no_arterial",
                        "no_coronary", "aeration", "no_lesion", "no_nodule", "no_infiltrate")


def _typed_negations(drawn: set[str], rng, count: int) -> list[str]:
    """Up to `count` short statements that absent findings are absent (never one contradicting a drawn label)."""
    options = [s for key in _TYPED_NEGATION_KEYS for s in _normal(key, drawn, rng)]
    options += [_pick(rng, negations) for label, negations in _OPTIONAL_LUNG_NEGATIONS.items() if label not in drawn]
    if not options or count <= 0:
        return []
    return [options[i] for i in rng.permutation(len(options))[:count]]


def write_typed_prompt(findings: list[Finding], rng: np.random.Generator) -> str:
    """A prompt as people type one (the Generate tab's box, a search box), stating exactly the drawn labels, in one of
    five shapes: the impression's noun phrases as sentences ("Right pleural effusion. Cardiomegaly."), the same in one
    sentence joined by "and", each finding's sentence (describe_finding) in any order, those sentences mixed with one
    to three statements that absent findings are absent ("Heart size is within normal limits."), or the brief report
    (write_brief_report) with such statements added. A study with no finding gets normal statements only. Written for
    the text reader's fit (training/ctclip_text_reading.py), which must read short prompts, not only whole reports."""
    findings = _check(findings)
    drawn = {f.label for f in findings}
    if not findings:
        normal = [_pick(rng, _BRIEF_NORMAL)] if _chance(rng, 0.5) else []
        normal += _typed_negations(drawn, rng, 1 + int(rng.integers(3)))
        return " ".join(_sentence(x) for x in normal)
    ordered = [findings[i] for i in rng.permutation(len(findings))]
    shape = int(rng.integers(5))
    if shape == 0:
        return " ".join(_sentence(_cap(_impression_item(f, rng))) for f in ordered)
    if shape == 1:
        return _sentence(_cap(_join([_impression_item(f, rng) for f in ordered])))
    if shape == 2:
        return " ".join(describe_finding(f, rng) for f in ordered)
    negations = _typed_negations(drawn, rng, 1 + int(rng.integers(3)))
    if shape == 3:
        sentences = [describe_finding(f, rng) for f in ordered] + [_sentence(x) for x in negations]
        return " ".join(sentences[i] for i in rng.permutation(len(sentences)))
    brief = write_brief_report(findings, rng)
    return Report(findings=" ".join([brief.findings] + [_sentence(x) for x in negations]),
                  impression=brief.impression).text


from engine.report_queries import write_query  # noqa: E402,F401  (the short queries: their own module)
