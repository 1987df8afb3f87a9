"""The "Library" tab: the demo studies in a table; a row opens its phantom in the viewer with its report and labels."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from app.viewer import ct_viewer
from app.zeroshot_panel import read_findings, zeroshot_panel
from engine.errors import UserError
from engine.labels import LABELS

ALL_LABELS = "All studies"
IMPRESSION_WORDS = 12
COLUMNS = ["Study", "Labels", "Impression"]


def first_words(text: str, n: int = IMPRESSION_WORDS) -> str:
    """The first n words, without list bullets and quotes (the table shows one line per study)."""
    words = text.replace("•", " ").replace('"', " ").split()
    return " ".join(words[:n]) + (" …" if len(words) > n else "")


def library_table(library, label: str = ALL_LABELS) -> pd.DataFrame:
    """One row per study (id, labels, first words of the impression), optionally only studies with `label`."""
    rows = [[s.id, ", ".join(s.labels) or "no abnormality", first_words(s.report_impression)]
            for s in library if label in (None, ALL_LABELS) or label in s.labels]
    return pd.DataFrame(rows, columns=COLUMNS)


def report_markdown(study) -> str:
    vector = " ".join(str(int(v)) for v in study.label_vector)
    return (f"### {study.id}\n**Findings.** {study.report_findings}\n\n**Impression.** {study.report_impression}"
            f"\n\nLabel vector (CT-CLIP order): `{vector}`")


def library_tab(library, demo: gr.Blocks | None = None, models=None):
    """Build the tab's content in the current context. `library` is an engine.library.DemoLibrary or None; when
    `demo` (the enclosing Blocks) is given, the first study opens as soon as the page loads; with `models`
    (app.models.CTClipModels) the CT CLIP's zero-shot reading of the open study is shown next to its labels.
    Returns the tab's CTViewer (None without a library)."""
    if library is None:
        gr.Markdown("The demo library is missing: build it with `python -m training.build_library`.")
        return None
    gr.Markdown(f"{len(library)} phantom studies with CT-RATE-style reports. Click a row to open the study.")
    with gr.Row():
        with gr.Column(scale=3):
            label_filter = gr.Dropdown([ALL_LABELS, *LABELS], value=ALL_LABELS, label="Show studies with",
                                       elem_classes=["library-filter"])
            table = gr.Dataframe(library_table(library), interactive=False, wrap=False, max_height=400,
                                 max_chars=70, column_widths=["15%", "40%", "45%"], show_search="search",
                                 elem_classes=["library-table"])
        with gr.Column(scale=2):
            report = gr.Markdown("Select a study to read its report.", elem_classes=["library-report"],
                                 max_height=470)
    with gr.Row(equal_height=False):
        # The study's own labels and, beside them, what the CT CLIP reads in its image (bars coloured by the labels).
        labels = gr.CheckboxGroup(list(LABELS), value=[], label="The 18 CT-RATE labels of this study",
                                  interactive=False, elem_classes=["library-labels"])
        if models is not None:
            with gr.Column():
                panel = zeroshot_panel()
        else:
            panel = None
    viewer = ct_viewer()

    def open_study(study_id: str):
        try:
            study = library.get(study_id)
            volume = library.volume(study.id)
        except UserError as err:
            raise gr.Error(str(err), print_exception=False) from None
        return volume, report_markdown(study), list(study.labels)

    def open_selected(evt: gr.SelectData):
        row = evt.row_value or []
        if not row:
            raise gr.Error("Click a row of the table to open a study.", print_exception=False)
        return open_study(str(row[0]))

    def read(opened):
        """After the planes: the zero-shot bars, coloured by the study's own labels (the ticked boxes)."""
        if panel is not None:
            opened.success(lambda volume, ticked: read_findings(models, volume, {l: int(l in ticked) for l in LABELS}),
                           [viewer.volume, labels], panel.outputs, show_progress="hidden")

    label_filter.input(lambda name: library_table(library, name), label_filter, table)
    read(viewer.open_after(table.select(open_selected, None, [viewer.volume, report, labels])))
    if demo is not None and len(library):
        first = library.studies[0].id
        read(viewer.open_after(demo.load(lambda: open_study(first), None, [viewer.volume, report, labels])))
    return viewer
