"""Tests of engine/report_writer.py.

The reports are read back by an independent rule-based label extractor (regexes with sentence-level negation
handling, in the spirit of CT-RATE's text classifier), which is first validated against the 800 hand-labelled
CT-RATE reports in ../shared/data/ctrate_reports, and then must read back exactly the drawn label set.
"""
from __future__ import annotations

import itertools
import re
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from engine.errors import UserError
from engine.labels import KINDS, LABELS, LOBES, NODE_STATIONS, SEVERITIES, Finding
from engine.report_writer import (Report, describe_finding, write_brief_report, write_query, write_report,
                                  write_typed_prompt)

# ----------------------------------------------------------------------------------------------------------------
# an independent rule-based label extractor (written from the real CT-RATE reports, not from the writer's templates)

SENTENCE_SPLIT = re.compile(r'(?<=[.;:!?])\s+|["“”•·]|\s-\s')
PRE_NEGATION = re.compile(r"\b(no|not|without|neither|nor|absence of|free of|negative for|rather than)\b", re.I)
POST_NEGATION = re.compile(
    r"\b(not (been )?(observed|detected|seen|present|found|noted|identified|visualized|evident|reached|reach|"
    r"demonstrated|distinguished|monitored|encountered)|were not|was not|is not|are not|absent|excluded|did not)\b",
    re.I)
SCOPE_END = re.compile(r"\b(but|however|except|apart from|other than|although|whereas|while|on the other hand)\b|;",
                       re.I)

TERMS = {
    "Medical material": r"catheter|pacemaker|pace ?maker|\bstents?\b|stenting|sternotomy|\bwires?\b|prosthe|\bclips?\b|"
                        r"sutures?|cannula|\btubes?\b|\bport\b|metallic|\bicd\b|cabg|acbg|drain|implant|\bleads?\b|"
                        r"graft|valve replacement|operation materials?|surgical material|medical material|tracheostomy|"
                        r"tracheaostomy",
    "Arterial wall calcification": r"(calcif\w*|atherom\w*|atheroscl\w*|plaques?)[^.]{0,80}(aort|(?<!coronary )arter|"
                                   r"arcus|carotid|iliac|subclavian|brachiocephalic|(?<!coronary )vascular|"
                                   r"(?<!coronary )vessel)|(aort\w*|arterial|arcus)[^.]{0,40}"
                                   r"(calcif|atherom|atheroscl|plaque)",
    "Cardiomegaly": r"cardiomegal|heart (size|dimensions?|contours?)[^.]{0,20}(increased|enlarged|large)|"
                    r"(increase|enlargement)[^.]{0,15}heart size|enlarged heart|heart is enlarged|"
                    r"\bctr\b[^.]{0,25}(increased|above)|cardiothoracic (ratio|index)[^.]{0,25}(increased|above)|"
                    r"heart sizes? (have |has )?increased",
    "Pericardial effusion": r"pericardial (effusion|fluid)|effusion[^.]{0,40}pericardi|pericardi\w*[^.]{0,30}effusion",
    "Coronary artery wall calcification": r"(calcif\w*|atherom\w*|atheroscl\w*|plaques?)[^.]{0,80}"
                                          r"(coronar|\blad\b|\brca\b|circumflex)|(coronar\w*|\blad\b|\brca\b|"
                                          r"circumflex)[^.]{0,40}(calcif|atherom|atheroscl|plaque)",
    "Hiatal hernia": r"hiatal hernia|hiatus hernia|hernia[^.]{0,40}(hiatus|hiatal|esophag|oesophag)|"
                     r"(esophag|oesophag|hiatus|hiatal)[^.]{0,40}hernia",
    "Lymphadenopathy": r"lymph ?nodes?|lymphadenopath|\blaps?\b|lymphadenomegal|adenopathy",
    "Emphysema": r"emphysem|bullae?\b|bullous|\bblebs?\b",
    "Atelectasis": r"(?<!fibro)(?<!fibro )atelecta",
    "Lung nodule": r"nodul\w*|\bnodules?\b",
    "Lung opacity": r"ground[- ]?glass|opacit|density increase|increased density|increase in density|infiltrat|"
                    r"crazy paving",
    "Pulmonary fibrotic sequela": r"sequel|fibro|parenchymal bands?|\bscar|honeycomb|reticular|structural distortion",
    "Pleural effusion": r"pleural (effusion|fluid)|(?<!pericardial )effusion|hydrothorax|hydropneumothorax|hemothorax",
    "Mosaic attenuation pattern": r"mosaic",
    "Peribronchial thickening": r"peribronch\w*[^.]{0,40}(thicken|thickness)|bronchial wall[^.]{0,20}thicken|"
                                r"(thicken|thickness)[^.]{0,30}(peribronch|bronchial wall)",
    "Consolidation": r"consolidat",
    "Bronchiectasis": r"bronchiect",
    "Interlobular septal thickening": r"(interlobular|(?<!para)septal|septa\b|septum)[^.]{0,40}(thicken|thickness)|"
                                      r"(thicken|thickness)[^.]{0,40}(interlobular|septa\b|(?<!para)septal|septum)",
}
# a term is not counted when these occur within 30 characters around it (other organ, other label)
EXCLUDE_AROUND = {
    "Medical material": r"portal|tubular|tubercul|\bport\w*venous",
    "Lung nodule": r"schmorl|thyroid|adrenal|breast|liver|hepat|spleen|splen|kidney|renal|peritone|"
                   r"(?<!sub)pleura\w* nodul|"
                   r"nodular (thicken|ground|consolid|infiltrat|density|opacit|calcif)|centri\w* nodul|lymph|"
                   r"(nodule|nodular)[^.]{0,20}(mass|lesion)?[^.]{0,5}(infiltrat)",
    "Pulmonary fibrotic sequela": r"kidney|renal|liver|spleen|hepat|breast|fibroadenoma|fibroid|fibrous dysplasia|"
                                  r"calcific lymph",
    "Lung opacity": r"sequel|fibro|atelecta|ground[- ]?glass (density )?(pulmonary |lung )?nodul|"
                    r"liver|hepat|spleen|splen|pancrea|kidney|"
                    r"renal|bone|vertebra|adrenal|breast|fat|soft tissue",
}
# a term is not counted when these follow it within 40 characters
EXCLUDE_AFTER = {"Pleural effusion": r"^effusion[^.,;]{0,30}pericardi|joint|abdom|ascites"}


def _negated(sentence: str, start: int, end: int) -> bool:
    before = sentence[:start]
    scope_start = max([m.end() for m in SCOPE_END.finditer(before)] + [0])
    if PRE_NEGATION.search(before[scope_start:]):
        return True
    after = sentence[end:]
    stop = SCOPE_END.search(after)
    return bool(POST_NEGATION.search(after[: stop.start()] if stop else after))


def _labels_in_sentence(sentence: str) -> set[str]:
    found = set()
    for label, pattern in TERMS.items():
        for m in re.finditer(pattern, sentence, re.I):
            around = sentence[max(0, m.start() - 30): m.end() + 30]
            if label in EXCLUDE_AROUND and re.search(EXCLUDE_AROUND[label], around, re.I):
                continue
            if label in EXCLUDE_AFTER and re.search(EXCLUDE_AFTER[label], sentence[m.start(): m.end() + 40], re.I):
                continue
            if not _negated(sentence, m.start(), m.end()):
                found.add(label)
                break
    return found


def extract_labels(text: str) -> set[str]:
    """The set of the 18 labels a reader assigns to a report (present and not negated)."""
    labels: set[str] = set()
    for sentence in SENTENCE_SPLIT.split(text):
        labels |= _labels_in_sentence(sentence)
    return labels


# ----------------------------------------------------------------------------------------------------------------
# random findings in the Finding vocabulary

LUNG_LABELS = {"Emphysema", "Atelectasis", "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela",
               "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
               "Interlobular septal thickening"}
SIZE_RANGE = {"Lung nodule": (3, 30), "Pleural effusion": (5, 60), "Pericardial effusion": (4, 20),
              "Emphysema": (10, 60), "Hiatal hernia": (20, 60), "Lymphadenopathy": (10, 30)}


def random_finding(label: str, rng: np.random.Generator) -> Finding:
    side = lobe = size = kind = None
    stations: tuple[str, ...] = ()
    if label in LUNG_LABELS:
        where = rng.integers(4)
        if where == 0:
            lobe = str(rng.choice(LOBES))
        elif where == 1:
            side = str(rng.choice(["right", "left", "bilateral"]))
        elif where == 2:
            lobe = str(rng.choice(LOBES))
            side = "bilateral" if rng.random() < 0.3 else lobe.split()[0].replace("lingula", "left")
    if label == "Pleural effusion":
        side = str(rng.choice(["right", "left", "bilateral", "none"]))
        side = None if side == "none" else side
    if label == "Medical material" and rng.random() < 0.5:
        side = str(rng.choice(["right", "left"]))
    if label == "Lymphadenopathy":
        k = int(rng.integers(1, 4))
        stations = tuple(str(s) for s in rng.choice(NODE_STATIONS, size=k, replace=False))
    if label in SIZE_RANGE and rng.random() < 0.85:
        lo, hi = SIZE_RANGE[label]
        size = float(rng.integers(lo, hi)) if rng.random() < 0.6 else round(float(rng.uniform(lo, hi)), 1)
    if KINDS[label] and rng.random() < 0.85:
        kind = str(rng.choice(KINDS[label]))
    return Finding(label=label, side=side, lobe=lobe, size_mm=size, severity=str(rng.choice(SEVERITIES)), kind=kind,
                   stations=stations)


def random_findings(labels, rng) -> list[Finding]:
    out = []
    for label in labels:
        out.append(random_finding(label, rng))
        if label in ("Lung nodule", "Consolidation") and rng.random() < 0.3:  # several nodules / foci
            out.append(random_finding(label, rng))
    return out


def _mm(x: float) -> str:
    return f"{round(x, 1):g} mm"


def _lobe_pattern(lobe: str) -> str:
    if lobe == "lingula":
        return r"lingula"
    side, part = lobe.split()[:2]
    return rf"{side} {part} lobe|{part} lobe of the {side} lung|{side} lung {part} lobe"


# ----------------------------------------------------------------------------------------------------------------
# the extractor itself, on real reports


@pytest.fixture(scope="module")
def real_reports(shared_data) -> pd.DataFrame:
    return pd.read_csv(shared_data / "ctrate_reports" / "reports_with_labels.csv")


def test_extractor_agrees_with_ctrate_hand_labels(real_reports):
    extracted = [extract_labels(t) for t in real_reports.report_text]
    predicted = np.array([[label in found for label in LABELS] for found in extracted])
    truth = real_reports[list(LABELS)].to_numpy().astype(bool)
    f1 = {}
    for i, label in enumerate(LABELS):
        tp = int((predicted[:, i] & truth[:, i]).sum())
        fp = int((predicted[:, i] & ~truth[:, i]).sum())
        fn = int((~predicted[:, i] & truth[:, i]).sum())
        f1[label] = 2 * tp / (2 * tp + fp + fn)
    assert np.mean(list(f1.values())) > 0.85, f1
    assert min(f1.values()) > 0.7, f1


def test_extractor_reads_negations():
    assert extract_labels("No pleural or pericardial effusion was detected.") == set()
    assert extract_labels("Pericardial effusion-thickening was not observed.") == set()
    assert extract_labels("There is a 6 mm pericardial effusion.") == {"Pericardial effusion"}
    assert extract_labels("Minimal pleural effusion is seen on the right.") == {"Pleural effusion"}
    assert extract_labels("No enlarged lymph nodes in prevascular, subcarinal or hilar regions were detected.") == set()


# ----------------------------------------------------------------------------------------------------------------
# consistency: the report states exactly the drawn labels


def _assert_reads_back(findings, seed):
    report = write_report(findings, np.random.default_rng(seed))
    drawn = {f.label for f in findings}
    assert extract_labels(report.text) == drawn, (drawn, report.text)
    if drawn:  # the impression alone also names every drawn label and nothing else
        assert extract_labels(report.impression) == drawn, (drawn, report.impression)


@pytest.mark.parametrize("label", LABELS)
def test_each_label_alone_reads_back(label):
    rng = np.random.default_rng(LABELS.index(label))
    for seed in range(40):
        _assert_reads_back(random_findings([label], rng), seed)


def test_all_label_pairs_read_back():
    rng = np.random.default_rng(1)
    for seed, pair in enumerate(itertools.combinations(LABELS, 2)):
        _assert_reads_back(random_findings(pair, rng), seed)


def test_ctrate_label_combinations_read_back(shared_data):
    table = pd.read_csv(shared_data / "ctrate_labels" / "train_predicted_labels.csv", nrows=5000)
    rng = np.random.default_rng(2)
    rows = table[list(LABELS)].to_numpy()[rng.choice(len(table), size=300, replace=False)]
    for seed, row in enumerate(rows):
        labels = [label for label, v in zip(LABELS, row) if v]
        _assert_reads_back(random_findings(labels, rng), seed)


def test_all_labels_at_once_read_back():
    rng = np.random.default_rng(3)
    for seed in range(20):
        _assert_reads_back(random_findings(LABELS, rng), seed)


def test_brief_reports_state_exactly_the_drawn_labels_and_no_normal_structure(shared_data):
    """The brief style (the Generate tab's examples; the text reader's fit): the independent extractor reads back
    exactly the drawn labels over 300 CT-RATE label rows; a normal study's brief report states no finding; it is
    shorter than the full report and names no normal structure beyond the lungs, pleura and heart."""
    table = pd.read_csv(shared_data / "ctrate_labels" / "train_predicted_labels.csv", nrows=300)
    rng = np.random.default_rng(11)
    rows = [[label for label, v in zip(LABELS, row) if v] for row in table[list(LABELS)].to_numpy()]
    for seed, labels in enumerate(rows):
        findings = random_findings(labels, rng)
        brief = write_brief_report(findings, np.random.default_rng(seed))
        assert extract_labels(brief.text) == set(labels), (labels, brief.text)
        full = write_report(findings, np.random.default_rng(seed))
        assert len(brief.text) < len(full.text)
        assert not re.search(r"\btrachea\b|vertebra|adrenal|liver|bone", brief.text, re.I), brief.text
    normals = {write_brief_report([], np.random.default_rng(seed)).text for seed in range(20)}
    assert all(extract_labels(t) == set() for t in normals) and len(normals) >= 4


def _extract_list(sentence: str) -> set[str]:
    """The extractor on a one-sentence list ("A, B and C."), item by item: it reads a sentence at a time, and its
    exclusions (opacity is not counted beside "atelectasis") must look at one finding's words. A piece that names
    nothing ("calcified plaques in the left anterior descending" of "... descending and circumflex coronary
    arteries") is joined to the next one."""
    labels, pending = set(), ""
    for piece in re.split(r", | and ", sentence.rstrip(".")):
        pending = f"{pending} and {piece}" if pending else piece
        found = _labels_in_sentence(pending)
        if found:
            labels |= found
            pending = ""
    return labels


def test_typed_prompts_state_exactly_the_drawn_labels_in_every_shape(shared_data):
    """The typed style (the text reader's fit: prompts as people type them): over 400 CT-RATE label rows the
    independent extractor reads back exactly the drawn labels, whichever of the five shapes was drawn and whatever
    negations of absent findings were added; the shapes occur, told apart as headed (the brief report), negated,
    one sentence and several sentences (the two shapes of several sentences look alike), at least 20 times each, and
    a normal study's prompt states nothing."""
    table = pd.read_csv(shared_data / "ctrate_labels" / "train_predicted_labels.csv", nrows=400)
    rng = np.random.default_rng(12)
    rows = [[label for label, v in zip(LABELS, row) if v] for row in table[list(LABELS)].to_numpy()]
    shapes = Counter()
    for seed, labels in enumerate(rows):
        text = write_typed_prompt(random_findings(labels, rng), np.random.default_rng(seed))
        one_sentence = text.count(". ") == 0
        assert (_extract_list(text) if one_sentence else extract_labels(text)) == set(labels), (labels, text)
        if labels:
            shapes["headed" if text.startswith("Findings:") else "negated" if PRE_NEGATION.search(text) or
                   POST_NEGATION.search(text) else "one sentence" if one_sentence else "sentences"] += 1
    assert set(shapes) == {"headed", "negated", "one sentence", "sentences"} and min(shapes.values()) >= 20, shapes
    normals = [write_typed_prompt([], np.random.default_rng(seed)) for seed in range(30)]
    assert all(extract_labels(t) == set() for t in normals) and len(set(normals)) >= 20


def test_normal_reports_state_no_finding_and_vary():
    texts = [write_report([], np.random.default_rng(seed)).text for seed in range(100)]
    for t in texts:
        assert extract_labels(t) == set(), t
    assert len(set(texts)) >= 95
    # normal structures are stated as normal, in CT-RATE's order
    t = texts[0]
    order = [re.search(p, t, re.I).start() for p in (r"trache", r"heart|cardiothoracic", r"aort", r"esophag",
                                                     r"lymph|LAP", r"lung", r"abdom|liver|adrenal",
                                                     r"bone|vertebra")]
    assert order == sorted(order), t


def test_normal_statements_never_contradict_drawn_findings():
    """No sentence about the structure of a drawn finding calls it normal or negates something there."""
    topics = {"Cardiomegaly": r"heart|cardiothoracic", "Pericardial effusion": r"pericardi",
              "Pleural effusion": r"pleura(?!l plaque)", "Hiatal hernia": r"esophag|hiat",
              "Lymphadenopathy": r"lymph|\bLAP\b", "Emphysema": r"aerat|ventilat|emphysem|bulla"}
    normal_words = re.compile(r"\b(no|not|neither|free of|normal|natural|within)\b", re.I)
    rng = np.random.default_rng(4)
    for label, topic in topics.items():
        for seed in range(60):
            report = write_report(random_findings([label], rng), np.random.default_rng(seed))
            for sentence in SENTENCE_SPLIT.split(report.findings):
                if re.search(topic, sentence, re.I):
                    assert not normal_words.search(sentence), (label, sentence)


# ----------------------------------------------------------------------------------------------------------------
# truthful attributes


def test_sides_lobes_sizes_kinds_come_from_the_finding():
    rng = np.random.default_rng(5)
    for label in LABELS:
        for seed in range(30):
            f = random_finding(label, rng)
            sentence = describe_finding(f, np.random.default_rng(seed))
            low = sentence.lower()
            size_is_drawn = label != "Medical material" and not (label == "Emphysema" and f.kind != "bullous")
            if f.size_mm is not None and size_is_drawn:  # emphysema's size is the bulla diameter
                if label == "Hiatal hernia":  # the sac size is optional in the hernia sentence
                    assert _mm(f.size_mm) in sentence or "mm" not in sentence, (f, sentence)
                else:
                    assert _mm(f.size_mm) in sentence, (f, sentence)
            if f.lobe:
                assert re.search(_lobe_pattern(f.lobe), low), (f, sentence)
            if f.side in ("right", "left") and label != "Medical material" and f.lobe != "lingula":
                assert f.side in low, (f, sentence)
            if f.side == "bilateral":
                assert re.search(r"both|bilateral", low), (f, sentence)
            if label in LUNG_LABELS and f.side in ("right", "left") and not f.lobe:
                assert ({"right", "left"} - {f.side}).pop() not in low, (f, sentence)
            if f.severity == "mild":
                assert not re.search(r"severe|marked|\blarge\b", low), (f, sentence)
            if f.severity == "severe":
                assert not re.search(r"\b(mild|minimal|slight|small)\b(?! (airway|vessel))", low), (f, sentence)
            if f.kind and label in ("Lung nodule", "Bronchiectasis", "Atelectasis"):
                assert f.kind in low, (f, sentence)
            if f.kind and label == "Medical material":
                assert f.kind.split()[0] in low, (f, sentence)
            for station in f.stations:
                assert station in low, (f, sentence)
            mm_in_text = re.findall(r"(\d+(?:\.\d+)?) mm", sentence)
            assert all(f.size_mm is not None and float(x) == round(f.size_mm, 1) for x in mm_in_text), (f, sentence)


def test_attributes_reach_the_full_report():
    rng = np.random.default_rng(6)
    findings = [Finding("Lung nodule", side="right", lobe="right upper lobe", size_mm=8.0, kind="solid"),
                Finding("Pleural effusion", side="left", size_mm=23.5, severity="mild"),
                Finding("Lymphadenopathy", size_mm=14.0, stations=("subcarinal", "right hilar"))]
    for seed in range(20):
        text = write_report(findings, np.random.default_rng(seed)).text
        assert re.search(_lobe_pattern("right upper lobe"), text), text
        assert "8 mm" in text and "23.5 mm" in text and "14 mm" in text, text
        assert "subcarinal" in text and "right hilar" in text, text
        assert re.search(r"\bleft\b", text, re.I) and re.search(r"\bsolid\b", text, re.I), text
    del rng


# ----------------------------------------------------------------------------------------------------------------
# variety, determinism, format, length


def test_variety_over_many_reports_of_the_same_label_set():
    findings = [Finding("Emphysema", side="bilateral", kind="centrilobular", severity="moderate"),
                Finding("Lung nodule", side="left", lobe="left lower lobe", size_mm=6.0, kind="ground-glass"),
                Finding("Arterial wall calcification", severity="mild")]
    texts = [write_report(findings, np.random.default_rng(seed)).text for seed in range(200)]
    assert len(set(texts)) == 200
    for f in findings:
        sentences = {describe_finding(f, np.random.default_rng(seed)) for seed in range(200)}
        assert len(sentences) >= 6, (f, sentences)
    # each label, with its attributes drawn at random, is described in many ways
    rng = np.random.default_rng(7)
    for label in LABELS:
        sentences = {describe_finding(random_finding(label, rng), np.random.default_rng(s)) for s in range(200)}
        assert len(sentences) >= 10, (label, len(sentences))
    # the exact label name is used now and then, as in the zero-shot prompts
    named = Counter()
    for seed in range(400):
        r = write_report(random_findings(LABELS, np.random.default_rng(seed)), np.random.default_rng(seed))
        for label in LABELS:
            named[label] += label.lower() in r.text.lower()
    assert sum(v > 0 for v in named.values()) >= 12, named


def test_deterministic_given_the_rng_state():
    findings = random_findings(["Cardiomegaly", "Pleural effusion", "Lung nodule"], np.random.default_rng(8))
    a = write_report(findings, np.random.default_rng(42))
    b = write_report(findings, np.random.default_rng(42))
    c = write_report(findings, np.random.default_rng(43))
    assert a == b and a.text == b.text
    assert a.text != c.text
    assert write_query(findings, np.random.default_rng(1)) == write_query(findings, np.random.default_rng(1))
    first = findings[0]
    assert describe_finding(first, np.random.default_rng(5)) == describe_finding(first, np.random.default_rng(5))


def test_report_format_and_length():
    r = write_report([], np.random.default_rng(0))
    assert isinstance(r, Report)
    assert r.text == f"Findings: {r.findings} Impression: {r.impression}"
    normal_words = np.array([len(write_report([], np.random.default_rng(s)).text.split()) for s in range(200)])
    assert normal_words.min() >= 100 and normal_words.max() <= 300, (normal_words.min(), normal_words.max())
    assert 120 <= np.median(normal_words) <= 300
    assert np.mean(normal_words >= 120) > 0.9
    rng = np.random.default_rng(9)
    busy = [len(write_report(random_findings(rng.choice(LABELS, 6, replace=False), rng), rng).text.split())
            for _ in range(100)]
    assert 150 <= min(busy) and max(busy) <= 600, (min(busy), max(busy))
    assert np.median(busy) > np.median(normal_words)


def test_impression_of_a_normal_study_is_a_normal_statement():
    impressions = {write_report([], np.random.default_rng(s)).impression for s in range(50)}
    assert len(impressions) >= 3
    for imp in impressions:
        assert re.search(r"normal|no (significant|acute)", imp, re.I), imp


# ----------------------------------------------------------------------------------------------------------------
# queries


def test_queries_name_drawn_labels_and_are_short():
    rng = np.random.default_rng(10)
    for seed in range(300):
        k = int(rng.integers(1, 5))
        findings = random_findings(rng.choice(LABELS, k, replace=False), rng)
        q = write_query(findings, np.random.default_rng(seed), max_findings=2)
        words = q.split()
        assert 3 <= len(words) <= 12, q
        named = extract_labels(q)
        assert named and named <= {f.label for f in findings}, (q, findings)
        assert len(named) <= 2, q
    for seed in range(100):  # more findings allowed: still short, still only drawn labels
        findings = random_findings(rng.choice(LABELS, 6, replace=False), rng)
        q = write_query(findings, np.random.default_rng(seed), max_findings=4)
        assert 3 <= len(q.split()) <= 12 and 1 <= len(extract_labels(q)) <= 4, q
        assert extract_labels(q) <= {f.label for f in findings}, q
        q = write_query(findings, np.random.default_rng(seed), max_findings=1)
        assert len(extract_labels(q)) == 1, q
    for label in LABELS:  # every label is recognisable in a one-finding query
        q = write_query([random_finding(label, rng)], np.random.default_rng(0))
        assert extract_labels(q) == {label}, (label, q)


def test_normal_queries():
    queries = {write_query([], np.random.default_rng(s)) for s in range(40)}
    assert len(queries) >= 3
    for q in queries:
        assert extract_labels(q) == set() and 3 <= len(q.split()) <= 12, q


def test_bad_input_raises_user_error():
    with pytest.raises(UserError, match="Unknown label"):
        write_report([Finding("Pneumothorax")], np.random.default_rng(0))
    with pytest.raises(UserError):
        describe_finding("Cardiomegaly", np.random.default_rng(0))


def test_a_label_the_writer_has_no_words_for_raises(monkeypatch):
    """A label added to the vocabulary (engine.labels) but not to the writer must not be written as another label:
    the impression and the query dispatchers raise instead of falling back to "interlobular septal thickening"."""
    import engine.report_queries as report_queries
    import engine.report_writer as report_writer

    for module in (report_writer, report_queries):
        monkeypatch.setattr(module, "LABEL_INDEX", {**report_writer.LABEL_INDEX, "Pneumothorax": len(LABELS)})
    new = Finding("Pneumothorax", side="right", severity="moderate")
    with pytest.raises(ValueError, match="no impression phrase for the label 'Pneumothorax'"):
        write_report([new], np.random.default_rng(0))
    with pytest.raises(ValueError, match="no query phrase for the label 'Pneumothorax'"):
        write_query([new], np.random.default_rng(0))
