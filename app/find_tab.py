"""The "Find CTs" tab: type a report (or a few words), get the K closest CTs, open one with the query's heat map.

Search: the query's CT CLIP text latent against every study's image latent (engine.study_library.StudyLibrary: the demo
phantoms plus the user's indexed CTs), ranked by cosine. Opening a result (the first opens by itself) renders its
volume in the tab's viewer, shows its report and label vector, draws the heat map of the query on the volume
(CTClipPipeline.heatmap: which CT-ViT tokens raise the score) over the three planes, and reads its 18 findings
zero-shot. Every step is a separate event, so the planes appear first and the heat map and bars follow.
"""
from __future__ import annotations

import gradio as gr
import numpy as np
import pandas as pd

from app.library_tab import first_words, report_markdown
from app.viewer import ct_viewer
from app.models import CTClipModels
from app.zeroshot_panel import read_findings, waiting_updates, zeroshot_panel
from engine.errors import UserError
from engine.labels import LABELS

PLACEHOLDER = "Type or paste a report, or a few words: right pleural effusion and emphysema"
EXAMPLES = ["Right pleural effusion and emphysema.",
            "Cardiomegaly and pericardial effusion.",
            "Multiple pulmonary nodules in both lungs, the largest in the right upper lobe.",
            "Lung opacity and consolidation in the left lower lobe.",
            "No abnormality: lungs clear, heart normal in size."]
COLUMNS = ["Rank", "Study", "Score", "Labels", "Report", "Source"]
DEFAULT_K = 10
MAX_K = 50
SHOW_HEAT = "Show where the query matches"
NO_RESULT = "Search, then click a result to open it here."
HEAT_FLOOR = 0.25  # heat below this fraction of the peak is not drawn: a faint wash over the whole CT hides it


def display_heat(heat_map: np.ndarray, floor: float = HEAT_FLOOR) -> np.ndarray:
    """The heat map as the viewer draws it: values below `floor` (of the peak, the map is 0..1) left out."""
    return np.where(heat_map >= floor, heat_map, 0.0).astype(np.float32)


# --------------------------------------------------------------------------------------------------- helpers

def _fail(err: UserError):
    """The engine's one sentence as a notification (never a traceback)."""
    return gr.Error(str(err), print_exception=False)


def results_table(results: list[dict], library) -> pd.DataFrame:
    """One row per result: rank, id, cosine, labels present, first words of the impression (or report), source."""
    rows = []
    for rank, r in enumerate(results, 1):
        if r["labels"] is None:
            labels = "unknown (your CT)"
        else:
            labels = ", ".join(label for label in LABELS if r["labels"].get(label)) or "no abnormality"
        if r["source"] == "phantom":
            text = library.demo.get(r["id"]).report_impression
        else:
            text = r["report"] or ""
        rows.append([rank, r["id"], f"{r['score']:.3f}", labels, first_words(text), r["source"]])
    return pd.DataFrame(rows, columns=COLUMNS)


def result_markdown(result: dict, library, rank: int | None = None) -> str:
    """The full report and label vector of a phantom study, or what is known about a user's CT file."""
    head = f"Result {rank} · cosine {result['score']:.3f}" if rank else f"cosine {result['score']:.3f}"
    if result["source"] == "phantom":
        return f"{head}\n\n" + report_markdown(library.demo.get(result["id"]))
    text = result["report"] or "No report was indexed with this CT."
    return f"{head}\n\n### {result['id']}\nYour CT: `{result['path']}`\n\n{text}"


def _find(results: list[dict], result_id: str) -> tuple[int, dict]:
    for rank, r in enumerate(results or [], 1):
        if r["id"] == result_id:
            return rank, r
    raise gr.Error("That result is no longer in the list: search again.", print_exception=False)


def open_library_result(models: CTClipModels, found: list[dict], result_id: str):
    """(rank, result, volume, markdown) of a listed result, opened from the library; one sentence when it fails.
    Every tab that lists CT studies (Find, Dictate, Chest X-ray) opens a clicked row through here."""
    rank, result = _find(found, result_id)
    try:
        volume = models.library().volume(result["id"])
    except UserError as err:
        raise _fail(err) from None
    return rank, result, volume, result_markdown(result, models.library(), rank)


def open_clicked_results(models: CTClipModels, table, results, viewer, report) -> None:
    """A results table whose clicked row opens that study in the tab's viewer and its report (the Dictate and
    Chest X-ray tabs; the Find tab also draws a heat map)."""
    def open_selected(found, evt: gr.SelectData):
        _, _, volume, md = open_library_result(models, found, selected_result_id(evt))
        return volume, None, md

    viewer.open_after(table.select(open_selected, results, [viewer.volume, viewer.overlay, report]))


def show_model_status(demo, holder, ready: str, status) -> None:
    """On page load, the status says why the tab's model is unavailable (one sentence after ⚠), else `ready`."""
    def model_status():
        problem = holder.unavailable()
        return f"⚠ {problem}" if problem else ready
    demo.load(model_status, None, status, show_progress="hidden")


def selected_result_id(evt: gr.SelectData) -> str:
    """The study id of a clicked results-table row (its second column)."""
    row = evt.row_value or []
    if len(row) < 2:
        raise gr.Error("Click a row of the results to open it.", print_exception=False)
    return str(row[1])


def search_library(models: CTClipModels, text, k_value):
    """The Find tab's search: (table, results, the query as searched, status line)."""
    try:
        library = models.library()
        latent = models.pipeline().embed_query(text)
        found = [r.to_json() for r in library.search(latent, int(k_value))]
    except UserError as err:
        raise _fail(err) from None
    if not found:
        raise gr.Error("The library is empty: there is no CT to search yet.", print_exception=False)
    line = (f"The **{len(found)}** CTs whose image latents are closest (cosine) to the query. "
            f"Showing result 1; click another row to open it.")
    return results_table(found, library), found, " ".join(str(text).split()), line


def check_query(text):
    """A bad query is refused before the search touches the table (no error badge on stale results)."""
    from engine.query import check_query_text

    try:
        check_query_text(text)
    except UserError as err:
        raise _fail(err) from None


def query_heat(models: CTClipModels, n_sliders: int, volume, text, show):
    """The query's heat map on the opened CT (drawn from HEAT_FLOOR up) and the slices through its peak:
    (heat map, overlay shown or None, note, one index per slider)."""
    if volume is None or not text:
        return None, None, NO_RESULT, *(gr.skip() for _ in range(n_sliders))
    try:
        heat_map, score = models.pipeline().heatmap(volume, text)
    except UserError as err:
        raise _fail(err) from None
    shown = display_heat(heat_map)
    peak = np.unravel_index(int(np.argmax(heat_map)), heat_map.shape)  # (z, y, x): axial, coronal, sagittal
    note = (f"Heat map of the query on this CT (cosine {score:.3f}): the regions that raise the match, red = "
            "strongest; the slices go through the strongest one.")
    return shown, (shown if show else None), note, *(int(index) for index in peak)


def library_status(models: CTClipModels) -> str:
    """On page load: why there is nothing to search, if so (no checkpoint, or latents of another one)."""
    problem = models.unavailable()
    if problem:
        return f"⚠ {problem}"
    if len(models.library()) == 0:
        return ("⚠ The demo library has no latents for this checkpoint "
                "(assets/library/ctclip_embeddings.safetensors was made with another one), so there is "
                "nothing to search yet.")
    return ""


# --------------------------------------------------------------------------------------------------- the tab

def find_tab(models: CTClipModels, demo: gr.Blocks | None = None):
    """Build the tab's content in the current context. `models` loads the CT CLIP once per process; when `demo` (the
    enclosing Blocks) is given, the tab says on page load if there is no checkpoint (and how to train one). Returns the
    tab's CTViewer."""
    gr.Markdown("Describe what you are looking for, as a radiologist would write it. The CT CLIP ranks every CT in the "
                "library by how well its image matches your words.", elem_classes=["find-intro"])
    with gr.Row(equal_height=False):
        query = gr.Textbox(label="Report or findings", placeholder=PLACEHOLDER, lines=1, max_lines=8, scale=5,
                           max_length=None, autofocus=False, elem_classes=["find-query"])
        with gr.Column(scale=1, min_width=280):
            k = gr.Slider(1, MAX_K, value=DEFAULT_K, step=1, label="CTs to show (K)", elem_classes=["find-k"])
            search = gr.Button("Search", variant="primary", elem_classes=["find-search"])
    gr.Examples(EXAMPLES, inputs=query, label="Examples (click one, then Search)")
    status = gr.Markdown("", elem_classes=["find-status"])
    table = gr.Dataframe(pd.DataFrame(columns=COLUMNS), interactive=False, wrap=False, max_height=330, max_chars=80,
                         column_widths=["6%", "11%", "8%", "30%", "37%", "8%"], label="Closest CTs (click a row)",
                         elem_classes=["find-results"])
    with gr.Row(equal_height=False):
        show_heat = gr.Checkbox(True, label=SHOW_HEAT, scale=1, min_width=260, elem_classes=["find-show-heat"])
        heat_note = gr.Markdown(NO_RESULT, elem_classes=["find-heat-note"])
    viewer = ct_viewer()
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            report = gr.Markdown(NO_RESULT, elem_classes=["find-report"], max_height=520)
        with gr.Column(scale=2):
            panel = zeroshot_panel()

    results = gr.State([])      # the SearchResult.to_json() dicts on show
    searched = gr.State("")     # the query as searched (the heat map uses it even if the box is edited since)
    truth = gr.State(None)      # label dict of the opened result (None for a user's CT)
    heat = gr.State(None)       # the heat map of the opened result, shown or not

    # --- open a result ----------------------------------------------------------------------------------------
    def open_result(result_id, found):
        rank, result, volume, md = open_library_result(models, found, result_id)
        note = f"Computing where the query matches study {result['id']}…"
        return (volume, None, None, result["labels"], md, note, *waiting_updates())

    def open_first(found):
        if not found:
            raise gr.Error("No result to open.", print_exception=False)
        return open_result(found[0]["id"], found)

    def open_selected(found, evt: gr.SelectData):
        return open_result(selected_result_id(evt), found)

    open_outputs = [viewer.volume, viewer.overlay, heat, truth, report, heat_note, *panel.outputs]

    def wire_open(dependency):
        opened = viewer.open_after(dependency)
        heated = opened.success(lambda volume, text, show: query_heat(models, len(viewer.sliders), volume, text,
                                                                      show),
                                [viewer.volume, searched, show_heat],
                                [heat, viewer.overlay, heat_note, *viewer.sliders],
                                show_progress="hidden")
        read = viewer.redraw_after(heated).success(
            lambda volume, labels: read_findings(models, volume, labels), [viewer.volume, truth], panel.outputs,
            show_progress="hidden")
        return read

    checked = gr.on([search.click, query.submit], check_query, query, None, show_progress="hidden")
    searching = checked.success(lambda text, k_value: search_library(models, text, k_value), [query, k],
                                [table, results, searched, status], concurrency_limit=1,
                                concurrency_id="find-open", api_name="search")
    wire_open(searching.success(open_first, results, open_outputs, concurrency_limit=1, concurrency_id="find-open",
                                api_name="open_first_result"))
    wire_open(table.select(open_selected, results, open_outputs, concurrency_limit=1, concurrency_id="find-open"))
    viewer.redraw_after(show_heat.input(lambda heat_map, show: heat_map if show else None, [heat, show_heat],
                                        viewer.overlay, show_progress="hidden"))

    if demo is not None:
        demo.load(lambda: library_status(models), None, status, show_progress="hidden")
    return viewer
