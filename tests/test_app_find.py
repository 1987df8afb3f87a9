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


def test_pipeline_reads_the_thresholds_of_its_checkpoint(tmp_path):
    import json
    from engine.pipelines.ctclip import CTClipPipeline
    pipe = CTClipPipeline.__new__(CTClipPipeline)
    pipe.directory = tmp_path
    assert pipe.zero_shot_thresholds == {}                        # no metrics.json: no ticks, no error
    per_label = {label: {"threshold": 0.5 + i / 100} for i, label in enumerate(LABELS)}
    (tmp_path / "metrics.json").write_text(json.dumps({"zero_shot": {"per_label": per_label}}))
    del pipe.zero_shot_thresholds                                 # cached_property: read again
    assert pipe.zero_shot_thresholds == {label: per_label[label]["threshold"] for label in LABELS}


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
