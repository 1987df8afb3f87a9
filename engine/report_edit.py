"""Which of the 18 findings a report states (present or negated), and the same report with one finding toggled: the
text side of "what one finding changes" (issue 15 item 7: the same seed with and without one finding).

Reading (`stated_findings`): the report is cut into sentences, each sentence into scopes at the words that end a
negation's reach (";", ":", "but", "however", "although", "except", "whereas", "while", "which", ", and", ...); a label
is mentioned where one of its patterns (MENTIONS: the report writer's wording and CT-RATE's) matches, and the mention
is negated when a negation cue precedes it in its scope ("no", "without", "free of", "negative for", "neither") or a
negating predicate follows it in its scope ("was not observed", "is normal", "are natural", "within normal limits").
These are NegEx's rules (Chapman et al. 2001), written here because the dozen cue phrases of a CT-RATE report do not
justify spaCy and medspacy/negspacy (hundreds of MB, seconds to import) in the engine.

Toggling (`toggle_finding`): a finding stated present is removed (the sentence that states it, or only its clause
when the sentence states another finding too, in Findings and Impression; an Impression left empty becomes the
writer's normal one). No negation is put in its place: the two prompts then differ by the finding's words only, and
the demo CT CLIP's reading of the finding drops more without one (0.39 against 0.37 on average over the app's examples
and 15 phantom reports, in the right direction 97 % of the time either way). A finding not stated present is added:
negations of it and normal statements it contradicts go, one sentence from `engine.report_writer.describe_finding` (a
typical instance of the finding, TOGGLE_FINDINGS) goes where the first of them was (else at the end of Findings), and
its impression phrase joins the Impression (whose normal statement, if any, goes). Everything else stays word for
word, so the two prompts differ by that finding only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from engine.errors import UserError
from engine.labels import LABELS, Finding
# The writer's own normal statements and impression phrases (its templates' one home), so an edited report reads like
# the reports the generator learned from.
from engine.report_writer import _NORMAL, _NORMAL_IMPRESSIONS, _impression_item, describe_finding

# When a label is mentioned: regular expressions (case-insensitive) matched inside one scope of a sentence.
MENTIONS: dict[str, str] = {
    "Medical material": r"medical material|sternotomy|pacemaker|prosthe(tic|sis)|port catheter|\bcatheter|\bstents?\b"
                        r"|surgical (clip|suture|material)|\bwires?\b|\bimplant|cardiac (device|valve replacement)",
    "Arterial wall calcification": r"(calcif\w*|atherom\w*|atheroscl\w*|plaques?)\b(?:(?!coronar)[^;])*\b(aort\w*|arch|"
                                   r"arterial wall|vascular wall|vascular structures)|\baort\w*\b(?:(?!coronar)[^;])*"
                                   r"(calcif|atherom|atheroscl|plaque)|arterial wall calcif|vascular calcif",
    "Cardiomegaly": r"cardiomegaly|(enlarged|increased) heart|heart (is |was )?enlarged|cardiothoracic ratio|"
                    r"heart (size|dimensions?|contour)|(size|dimensions?) of the heart|\bheart\b[^;]{0,30}\b(size|"
                    r"dimensions?) (is|are|was|were)\b",
    "Pericardial effusion": r"pericardi\w*[- ](effusion|fluid|thickening)|effusion[^;]{0,30}pericardi|"
                            r"pericardial space",
    "Coronary artery wall calcification": r"coronar\w*|\bLAD\b|circumflex",
    "Hiatal hernia": r"hiat\w* hernia|sliding[- ]type hernia|herniates? through the (o)?esophageal hiatus",
    "Lymphadenopathy": r"lymphadenopath\w*|\bLAPs?\b|lymph ?nodes?\b|\badenopath",  # CT-RATE labels any node named
    "Emphysema": r"emphysema\w*|\bbullae?\b|\bbullous",
    "Atelectasis": r"atelecta\w*",
    "Lung nodule": r"\bnodules?\b|\b(lung|pulmonary) mass",
    "Lung opacity": r"opacit\w*|ground[- ]glass(?! (density )?(pulmonary |lung )?nodul)|\bdensity (increase|areas?)|"
                    r"(increased|patchy) densit\w*|\binfiltrat\w*",
    "Pulmonary fibrotic sequela": r"fibro\w*|sequela\w*|scar\b|\bscar bands?",
    "Pleural effusion": r"pleural (effusion|fluid)|"
                        r"(?<!pericardial )(?<!pericardial-)\beffusion\b(?![^;.]{0,30}pericardi)",
    "Mosaic attenuation pattern": r"mosaic",
    "Peribronchial thickening": r"peribronch\w*|bronchial wall thicken\w*",
    "Consolidation": r"consolidat\w*|air bronchogram",
    "Bronchiectasis": r"bronchiecta\w*",
    "Interlobular septal thickening": r"(inter)?lobular sept\w*|septal thicken\w*|thickening of the interlobular",
}
_MENTION_RES = {label: re.compile(pattern, re.I) for label, pattern in MENTIONS.items()}
assert set(MENTIONS) == set(LABELS)

# NegEx's cue phrases (CT-RATE's wording): a negation before a mention, a negating predicate after it, the words that
# end a negation's reach.
PRE_NEGATION = re.compile(r"\b(no|without|free of|negative for|absence of|neither|nor|rather than|"
                          r"no evidence of)\b", re.I)
POST_NEGATION = re.compile(r"\b((is|are|was|were|has|have been|could be) not (seen|observed|detected|present|"
                           r"identified|noted|visualized|found)|not (seen|observed|detected|present|identified)|"
                           r"(is|are|was|were|appears?|seems?) (to be )?(within )?(the )?(normal|natural)|"
                           r"within (the )?normal (limits|range)|(is|are) preserved|unremarkable|absent|"
                           r"(is|are|was|were) not)\b", re.I)
SCOPE_ENDS = re.compile(r"[;:]|\b(but|however|although|except|whereas|while|which|apart from|other than)\b|"
                        r",? and (there|a|an|the)\b|, (there|a|an)\b", re.I)
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+(?=[\"'•(]*[A-Z0-9])|\s+(?=•)")
_CLAUSE_SPLIT = re.compile(r",\s*|;\s*|\s+(?:with|and|as well as|along with|accompanied by)\s+", re.I)
_SECTIONS = re.compile(r"^\s*(?:findings\s*:)?\s*(?P<findings>.*?)\s*(?:\bimpressions?\s*:\s*(?P<impression>.*))?$",
                       re.I | re.S)
# Normal statements about the whole lung that any parenchymal finding contradicts ("The lungs are clear.").
PARENCHYMAL = frozenset({"Emphysema", "Atelectasis", "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela",
                         "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
                         "Interlobular septal thickening"})
CLEAR_LUNGS = r"(lungs?|lung fields|lung parenchyma) (are|is|appears?) (clear|normal|unremarkable)|clear lungs"
_NORMAL_IMPRESSION = re.compile(r"within normal limits|no (acute|significant|abnormal)|normal (chest|thorax|"
                                r"thoracic|ct)|unremarkable|no pathology", re.I)

# The typical instance of each finding that `toggle_finding` describes when it adds one (moderate, a usual place).
TOGGLE_FINDINGS: dict[str, Finding] = {
    "Medical material": Finding("Medical material", kind="sternotomy wires"),
    "Arterial wall calcification": Finding("Arterial wall calcification"),
    "Cardiomegaly": Finding("Cardiomegaly"),
    "Pericardial effusion": Finding("Pericardial effusion", size_mm=10.0),
    "Coronary artery wall calcification": Finding("Coronary artery wall calcification", kind="LAD"),
    "Hiatal hernia": Finding("Hiatal hernia", size_mm=30.0),
    "Lymphadenopathy": Finding("Lymphadenopathy", size_mm=15.0, stations=("subcarinal",)),
    "Emphysema": Finding("Emphysema", side="bilateral", kind="centrilobular"),
    "Atelectasis": Finding("Atelectasis", side="right", lobe="right lower lobe", kind="plate-like"),
    "Lung nodule": Finding("Lung nodule", side="right", lobe="right upper lobe", size_mm=15.0, kind="solid"),
    "Lung opacity": Finding("Lung opacity", side="left", lobe="left lower lobe", kind="ground-glass"),
    "Pulmonary fibrotic sequela": Finding("Pulmonary fibrotic sequela", side="left", lobe="left upper lobe"),
    "Pleural effusion": Finding("Pleural effusion", side="right", size_mm=30.0),
    "Mosaic attenuation pattern": Finding("Mosaic attenuation pattern", side="bilateral"),
    "Peribronchial thickening": Finding("Peribronchial thickening", side="bilateral"),
    "Consolidation": Finding("Consolidation", side="right", lobe="right lower lobe"),
    "Bronchiectasis": Finding("Bronchiectasis", side="bilateral", kind="cylindrical"),
    "Interlobular septal thickening": Finding("Interlobular septal thickening", side="bilateral"),
}
assert set(TOGGLE_FINDINGS) == set(LABELS)


@dataclass(frozen=True)
class ToggledReport:
    """A report with one finding toggled: `text` states `label` present when `added`, else no longer states it."""
    text: str
    label: str
    added: bool


# ------------------------------------------------------------------------------------------------------- reading

def split_sentences(text: str) -> list[str]:
    """A report's sentences (a sentence ends at . ! ? or ; before a capital letter, or before an opening quote or
    bullet); decimals such as "7.5 mm" stay whole."""
    return [s.strip() for s in _SENTENCE_END.split(" ".join(str(text).split())) if s.strip()]


def _scopes(sentence: str) -> list[str]:
    pieces, start = [], 0
    for end in SCOPE_ENDS.finditer(sentence):
        pieces.append(sentence[start:end.start()])
        start = end.end()
    return pieces + [sentence[start:]]


def sentence_statements(sentence: str) -> dict[str, bool]:
    """{label: True (stated present) or False (negated)} for every label the sentence mentions; a label mentioned
    both ways in one sentence counts as present."""
    out: dict[str, bool] = {}
    for scope in _scopes(sentence):
        pre = [m.end() for m in PRE_NEGATION.finditer(scope)]
        post = [m.start() for m in POST_NEGATION.finditer(scope)]
        for label, pattern in _MENTION_RES.items():
            for m in pattern.finditer(scope):
                negated = any(p <= m.start() for p in pre) or any(p >= m.end() for p in post)
                out[label] = out.get(label, False) or not negated
    return out


def stated_findings(text: str) -> dict[str, bool]:
    """{label: True if the report states it present anywhere, False if it only negates it}; labels the report does
    not mention are left out. Keys in CT-CLIP order."""
    found: dict[str, bool] = {}
    for sentence in split_sentences(text):
        for label, present in sentence_statements(sentence).items():
            found[label] = found.get(label, False) or present
    return {label: found[label] for label in LABELS if label in found}


def present_findings(text: str) -> list[str]:
    """The labels a report states present, in CT-CLIP order."""
    return [label for label, present in stated_findings(text).items() if present]


# ------------------------------------------------------------------------------------------------------ toggling

def _split_report(text: str) -> tuple[list[str], list[str]]:
    match = _SECTIONS.match(" ".join(str(text).split()))
    return split_sentences(match["findings"] or ""), split_sentences(match["impression"] or "")


def _join_report(findings: list[str], impression: list[str]) -> str:
    text = "Findings: " + " ".join(findings) if findings else "Findings:"
    return text + (" Impression: " + " ".join(impression) if impression else "")


def _without_label(sentence: str, label: str) -> str | None:
    """The sentence with the clauses that mention `label` taken out (None when nothing else of it is worth keeping:
    it mentioned no other finding, or every clause mentioned the label)."""
    if set(sentence_statements(sentence)) <= {label}:
        return None
    clauses = [c for c in _CLAUSE_SPLIT.split(sentence.rstrip(".;:! ")) if c and c.strip()]
    kept = [c.strip() for c in clauses if not _MENTION_RES[label].search(c)]
    if not kept or len(kept) == len(clauses):
        return None if not kept else sentence
    text = ", ".join(kept).lstrip("\"'•( ")
    return text[:1].upper() + text[1:] + "."


def _remove_mentions(sentences: list[str], label: str, extra: re.Pattern | None = None) -> tuple[list[str], int]:
    """Sentences without any mention of `label` (nor, with `extra`, sentences matching it), and the index where the
    first change happened (len(result) when nothing changed)."""
    out, first = [], None
    for sentence in sentences:
        mentioned = label in sentence_statements(sentence) or (extra is not None and extra.search(sentence))
        if not mentioned:
            out.append(sentence)
            continue
        edited = _without_label(sentence, label) if label in sentence_statements(sentence) else None
        if first is None:
            first = len(out) + bool(edited)  # a new sentence goes after what is left of this one
        if edited:
            out.append(edited)
    return out, len(out) if first is None else first


def _contradicting_normals(label: str) -> re.Pattern | None:
    """The writer's normal statements that would contradict `label` present (e.g. "Heart size is within normal
    limits." for Cardiomegaly; "The lungs are clear." for a finding in the lungs), as one pattern."""
    sentences = [o for blocked_by, options in _NORMAL.values() if label in blocked_by for o in options]
    patterns = [re.escape(s.rstrip(".")) for s in sentences] + ([CLEAR_LUNGS] if label in PARENCHYMAL else [])
    return re.compile("|".join(patterns), re.I) if patterns else None


def check_finding_label(label) -> str:
    """One of the 18 label names (any letter case) as LABELS spells it; UserError with the list otherwise."""
    lookup = {name.lower(): name for name in LABELS}
    name = lookup.get(" ".join(str(label or "").split()).lower())
    if name is None:
        raise UserError(f"Unknown finding {label!r}; choose one of the 18 labels: {', '.join(LABELS)}.")
    return name


def toggle_finding(text: str, label: str) -> ToggledReport:
    """The report with `label` toggled (see the module docstring): removed when the report states it present, else
    added. UserError for a label that is not one of the 18."""
    label = check_finding_label(label)
    findings, impression = _split_report(text)
    rng = np.random.default_rng(0)  # the writer's template choice: fixed, so a toggle is reproducible
    if stated_findings(text).get(label):
        findings, _ = _remove_mentions(findings, label)
        impression, _ = _remove_mentions(impression, label)
        if not impression and not present_findings(" ".join(findings)):
            impression = [_NORMAL_IMPRESSIONS[0]]
        return ToggledReport(_join_report(findings, impression), label, added=False)
    finding = TOGGLE_FINDINGS[label]
    findings, at = _remove_mentions(findings, label, _contradicting_normals(label))
    findings.insert(at, describe_finding(finding, rng))
    impression = [s for s in impression if not _NORMAL_IMPRESSION.search(s)]
    impression, _ = _remove_mentions(impression, label)
    phrase = _impression_item(finding, rng).strip()
    impression.append(phrase[:1].upper() + phrase[1:] + ".")
    return ToggledReport(_join_report(findings, impression), label, added=True)
