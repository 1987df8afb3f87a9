"""The Find CTs tab's and zero-shot panel's pieces without a browser: the bar chart, the results table, the model
loader's one sentence when there is no checkpoint. (The browser test drives them end to end.)"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from app.find_tab import COLUMNS, result_markdown, results_table
from app.models import CTClipModels
from app.zeroshot_panel import ABSENT_COLOUR, PRESENT_COLOUR, read_findings, zero_shot_figure
from engine.labels import LABELS
from engine.library import DemoLibrary


def test_zero_shot_figure_has_one_bar_per_label_coloured_by_the_report():
    probs = {label: p for label, p in zip(LABELS, np.linspace(0.05, 0.95, len(LABELS)))}
    truth = {label: int(i % 3 == 0) for i, label in enumerate(LABELS)}
    fig = zero_shot_figure(probs, truth)
    bars = {y: (x, trace.marker.color) for trace in fig.data for x, y in zip(trace.x, trace.y)}
    assert sorted(bars) == sorted(LABELS)
    for label in LABELS:
        assert bars[label][0] == probs[label]
        assert bars[label][1] == (PRESENT_COLOUR if truth[label] else ABSENT_COLOUR)
    assert list(fig.layout.yaxis.categoryarray) == list(LABELS)
    unknown = zero_shot_figure(probs)  # an uploaded CT: one colour, no legend
    assert len(unknown.data) == 1 and len(unknown.data[0].x) == len(LABELS) and not unknown.layout.showlegend


def test_zero_shot_figure_marks_each_labels_threshold():
    probs = {label: 0.6 for label in LABELS}
    thresholds = {label: 0.4 + i / 100 for i, label in enumerate(LABELS[:10])}   # 8 labels without one
    fig = zero_shot_figure(probs, thresholds=thresholds)
    ticks = [trace for trace in fig.data if trace.name == "decision threshold"]
    assert len(ticks) == 1 and dict(zip(ticks[0].y, ticks[0].x)) == thresholds
    assert fig.layout.showlegend


def test_pipeline_reads_the_thresholds_and_aurocs_of_its_checkpoint(tmp_path):
    import json
    from engine.pipelines.ctclip import CTClipPipeline
    pipe = CTClipPipeline.__new__(CTClipPipeline)
    pipe.directory = tmp_path
    assert pipe.zero_shot_thresholds == {} and pipe.zero_shot_auroc == {}    # no metrics.json: no ticks, no error
    per_label = {label: {"threshold": 0.5 + i / 100, "auroc": 0.6 + i / 50} for i, label in enumerate(LABELS)}
    del per_label[LABELS[3]]["auroc"]                             # a label the evaluation could not score
    (tmp_path / "metrics.json").write_text(json.dumps({"zero_shot": {"per_label": per_label}}))
    del pipe.zero_shot_thresholds, pipe.zero_shot_auroc           # cached_property: read again
    assert pipe.zero_shot_thresholds == {label: per_label[label]["threshold"] for label in LABELS}
    assert pipe.zero_shot_auroc == {label: 0.6 + i / 50 for i, label in enumerate(LABELS) if i != 3}


def test_the_labels_read_least_reliably_are_named_under_the_bars():
    """Hand-worked: of AUROCs 0.7255, 0.757, 0.80 and 0.95, the two under 0.80 are named, weakest first, rounded to two
    places; 0.80 itself is not weak. The heading has its own line, then two labels a line (three weak labels take two
    lines). The footnote gets its own room under the bars (the bars keep their height: 32 px for the first line, 16 px
    a line more); each bar's hover says its label's AUROC; a greyed
    (out-of-distribution) chart names none, and no AUROCs means no footnote."""
    from app.zeroshot_panel import weak_labels_footnote

    auroc = {"Lung nodule": 0.757, "Lymphadenopathy": 0.7255, "Emphysema": 0.80, "Cardiomegaly": 0.95}
    expected = "Read with care (held-out AUROC):<br>Lymphadenopathy 0.73, Lung nodule 0.76"
    assert weak_labels_footnote(auroc) == expected
    assert weak_labels_footnote({"Emphysema": 0.80}) is None and weak_labels_footnote(None) is None
    assert weak_labels_footnote({"A": 0.5, "B": 0.6, "C": 0.7}) == \
        "Read with care (held-out AUROC):<br>A 0.50, B 0.60,<br>C 0.70"
    probs = {label: 0.5 for label in LABELS}
    plain, fig = zero_shot_figure(probs), zero_shot_figure(probs, auroc=auroc)
    assert [a.text for a in fig.layout.annotations if a.name == "weak labels"] == [expected]
    assert not [a for a in plain.layout.annotations if a.name == "weak labels"]
    assert fig.layout.margin.b - plain.layout.margin.b == fig.layout.height - plain.layout.height == 32 + 16
    hover = dict(zip(fig.data[0].y, fig.data[0].customdata))
    assert hover["Lymphadenopathy"] == "; held-out AUROC 0.73" and hover["Cardiomegaly"] == "; held-out AUROC 0.95"
    assert hover["Atelectasis"] == ""                             # no figure for it: nothing claimed
    assert "%{customdata}" in fig.data[0].hovertemplate
    greyed = zero_shot_figure(probs, auroc=auroc, out_of_distribution=True)
    assert not [a for a in greyed.layout.annotations if a.name == "weak labels"]


def test_a_phantoms_bars_name_the_labels_the_shipped_checkpoint_reads_least_reliably():
    """The Library / Open / Find panels read the checkpoint's own metrics.json: the footnote under the bars is the one
    its held-out figures give (read here from the file itself, not through the pipeline)."""
    import json

    from app.zeroshot_panel import weak_labels_footnote
    from engine.phantom import make_study
    from engine.settings import ctclip_dir

    models = CTClipModels(preset="demo")
    if models.unavailable():
        import pytest
        pytest.skip(models.unavailable())
    per_label = json.loads((ctclip_dir() / "metrics.json").read_text())["zero_shot"]["per_label"]
    auroc = {label: per_label[label]["auroc"] for label in LABELS}
    _, plot = read_findings(models, make_study(2_900_101).volume)
    assert plot.visible is True and plot.value["type"] == "plotly"
    layout = json.loads(plot.value["plot"])["layout"]               # the figure as Gradio sends it to the page
    notes = [a["text"] for a in layout.get("annotations", []) if a.get("name") == "weak labels"]
    expected = weak_labels_footnote(auroc)
    assert notes == ([expected] if expected else []), notes


def test_results_table_and_report_of_demo_studies():
    demo = DemoLibrary.load()
    library = SimpleNamespace(demo=demo)
    studies = demo.studies[:3]
    found = [{"id": s.id, "score": 0.5 - i / 10, "labels": s.label_dict, "report": s.report_text, "source": "phantom",
              "path": None} for i, s in enumerate(studies)]
    found.append({"id": "mine-1234", "score": 0.1, "labels": None, "report": None, "source": "file",
                  "path": "/data/mine.nii.gz"})
    table = results_table(found, library)
    assert list(table.columns) == COLUMNS and len(table) == 4
    assert list(table["Rank"]) == [1, 2, 3, 4]
    for row, study in zip(table.itertuples(index=False), studies):
        assert row.Study == study.id and row.Source == "phantom"
        assert row.Labels == (", ".join(l for l in LABELS if l in study.labels) or "no abnormality")
        assert study.report_impression.replace("•", " ").replace('"', " ").split()[0] in row.Report
    assert table.iloc[3]["Labels"] == "unknown (your CT)" and table.iloc[3]["Source"] == "file"
    md = result_markdown(found[1], library, rank=2)
    assert studies[1].id in md and studies[1].report_impression.split()[-1] in md and "Label vector" in md
    assert "/data/mine.nii.gz" in result_markdown(found[3], library, rank=4)


def test_no_checkpoint_is_one_sentence_saying_how_to_train(tmp_path):
    models = CTClipModels(preset="demo", weights=str(tmp_path / "nothing"))
    problem = models.unavailable()
    assert problem and "python -m training ctclip --preset demo" in problem and problem.endswith(".")
    note, plot = read_findings(models, volume=SimpleNamespace(array=np.zeros((2, 2, 2), np.float32)))
    assert note.value == problem and plot.visible is False


def test_findings_panel_carries_the_warnings_of_the_ct_reading(shared_data):
    """A single DICOM slice is read with warnings; the bars come with them, above the chart (issue 11: every answer
    about a CT carries the caveats of its reading)."""
    from engine.volume import read_ct

    volume = read_ct(shared_data / "ct" / "lidc_slice_0.dcm")
    assert any("single CT slice" in w for w in volume.warnings)
    note, plot = read_findings(CTClipModels(preset="demo"), volume)
    assert plot.visible is True
    for warning in volume.warnings:
        assert f"Caution: {warning}" in note.value
    assert note.visible is True and "not calibrated" in note.value


def test_a_subtitle_gets_the_room_it_needs():
    """The dictation's bars carry a subtitle (no transcript is involved): the top margin grows by its line, so the
    title stays inside the figure and does not run into the bars."""
    from app.zeroshot_panel import SPEECH_READING_SUBTITLE, SPEECH_READING_TITLE, TEXT_READING_TITLE, text_reading_title

    probs = {label: 0.5 for label in LABELS}
    assert text_reading_title(True, spoken=True) == SPEECH_READING_TITLE
    assert text_reading_title(True) == TEXT_READING_TITLE
    one = zero_shot_figure(probs, title=TEXT_READING_TITLE)
    two = zero_shot_figure(probs, title=SPEECH_READING_TITLE, subtitle=SPEECH_READING_SUBTITLE)
    assert two.layout.margin.t == one.layout.margin.t + 18
    assert two.layout.title.subtitle.text == SPEECH_READING_SUBTITLE and not one.layout.title.subtitle.text
