"""Tests of engine/report_edit.py: which findings a report states, and a report with one finding toggled.

The reader is checked against the 800 hand-labelled CT-RATE reports in ../shared/data/ctrate_reports; the toggle is
checked by hand on the app's example reports, then on phantom-style and real reports through the INDEPENDENT label
extractor of tests/test_report_writer.py (written from the real reports, not from this module): toggling a label
must change the set it reads by exactly that label.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from engine.errors import UserError
from engine.labels import LABELS
from engine.query import check_query_text
from engine.report_edit import (check_finding_label, present_findings, split_sentences, stated_findings,
                                toggle_finding)
from engine.report_writer import write_report
from tests.conftest import SHARED_DATA
from tests.test_report_writer import extract_labels, random_finding

EFFUSION_REPORT = ("Findings: Moderate right pleural effusion with adjacent passive atelectasis. The heart is "
                   "enlarged. Impression: Right pleural effusion. Cardiomegaly.")
EMPHYSEMA_REPORT = "Findings: Centrilobular emphysema in both upper lobes. No pleural effusion. Impression: Emphysema."


@pytest.fixture(scope="module")
def real_reports() -> pd.DataFrame:
    return pd.read_csv(SHARED_DATA / "ctrate_reports" / "reports_with_labels.csv")


def test_reads_present_and_negated_findings_in_hand_written_sentences():
    assert stated_findings(EFFUSION_REPORT) == {"Cardiomegaly": True, "Atelectasis": True, "Pleural effusion": True}
    assert stated_findings(EMPHYSEMA_REPORT) == {"Emphysema": True, "Pleural effusion": False}
    assert stated_findings("Heart dimensions and compartments appear natural. Both pleural spaces are free of "
                           "effusion. Pericardial effusion-thickening was not observed.") == {
        "Cardiomegaly": False, "Pericardial effusion": False, "Pleural effusion": False}
    # a negation reaches to the end of its scope only: "but" ends it
    assert stated_findings("No pleural effusion but a 6 mm nodule in the right upper lobe.") == {
        "Lung nodule": True, "Pleural effusion": False}
    assert split_sentences("A 7.5 mm nodule is seen. • Emphysema. • 12 mm node.") == [
        "A 7.5 mm nodule is seen.", "• Emphysema.", "• 12 mm node."]


def test_reader_agrees_with_the_hand_labels_of_800_real_reports(real_reports):
    """Measured: macro F1 0.916 (lowest: lung opacity 0.815, medical material 0.832, cardiomegaly 0.819)."""
    read = [set(present_findings(text)) for text in real_reports.report_text]
    predicted = np.array([[label in found for label in LABELS] for found in read])
    truth = real_reports[list(LABELS)].to_numpy().astype(bool)
    scores = [f1_score(truth[:, i], predicted[:, i]) for i in range(len(LABELS))]
    assert np.mean(scores) >= 0.88, dict(zip(LABELS, np.round(scores, 3)))
    assert min(scores) >= 0.75, dict(zip(LABELS, np.round(scores, 3)))


def test_toggle_by_hand_on_the_example_reports():
    removed = toggle_finding(EFFUSION_REPORT, "Atelectasis")
    assert not removed.added
    assert removed.text == ("Findings: Moderate right pleural effusion. The heart is enlarged. Impression: Right "
                            "pleural effusion. Cardiomegaly.")
    added = toggle_finding(EMPHYSEMA_REPORT, "pleural EFFUSION")  # any letter case
    assert added.added and added.label == "Pleural effusion"
    assert added.text == ("Findings: Centrilobular emphysema in both upper lobes. There is right pleural effusion "
                          "measuring 30 mm at its deepest point. Impression: Emphysema. Moderate right pleural "
                          "effusion.")
    # the last finding removed: the Impression becomes the writer's normal one
    normal = toggle_finding(EMPHYSEMA_REPORT, "Emphysema")
    assert normal.text == ("Findings: No pleural effusion. Impression: Thoracic CT examination within normal "
                           "limits.")
    # added to a normal report: the normal statements it contradicts go
    clear = "Findings: The lungs are clear. Heart size is normal. Impression: No acute findings."
    assert toggle_finding(clear, "Consolidation").text.startswith("Findings: ") and \
        "lungs are clear" not in toggle_finding(clear, "Consolidation").text
    assert "Heart size is normal" not in toggle_finding(clear, "Cardiomegaly").text
    assert "No acute findings" not in toggle_finding(clear, "Cardiomegaly").text


def test_toggle_changes_exactly_that_finding_in_phantom_reports():
    """Reports written by the report writer from random findings: for every label, the independent extractor reads
    the toggled report's set as the original's with that label flipped, and toggling back flips it again."""
    rng = np.random.default_rng(15)
    for _ in range(12):
        labels = list(rng.choice(LABELS, size=int(rng.integers(0, 4)), replace=False))
        text = write_report([random_finding(label, rng) for label in labels], rng).text
        before = extract_labels(text)
        for label in LABELS:
            toggled = toggle_finding(text, label)
            assert toggled.added == (label not in before), (label, text)
            after = extract_labels(toggled.text)
            assert before ^ after == {label}, (label, text, toggled.text)
            assert extract_labels(toggle_finding(toggled.text, label).text) == before
            check_query_text(toggled.text)  # still a valid prompt


def test_toggle_changes_exactly_that_finding_in_most_real_reports(real_reports):
    """Real CT-RATE reports (free wording, several findings per sentence): measured 96 % of (report, label) toggles
    change the extractor's set by exactly the label on the first 60 reports."""
    rows = real_reports.head(30)
    exact = total = 0
    for findings, impression in zip(rows.findings, rows.impression):
        text = f"Findings: {findings}" + (f" Impression: {impression}" if isinstance(impression, str) else "")
        before = extract_labels(text)
        for label in LABELS:
            total += 1
            exact += before ^ extract_labels(toggle_finding(text, label).text) == {label}
    assert exact / total >= 0.93, f"{exact} of {total}"


def test_unknown_finding_is_one_sentence():
    assert check_finding_label(" lung   NODULE ") == "Lung nodule"
    for bad in ("Pneumothorax", "", None):
        with pytest.raises(UserError, match="choose one of the 18 labels"):
            toggle_finding(EFFUSION_REPORT, bad)
