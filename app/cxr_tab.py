"""The "Chest X-ray" tab (X2CT-CLIP): a frontal chest radiograph -> the 18 CT-level findings, the most similar CT
studies (each opens in the tab's viewer with its report) and where on the film a chosen finding is read.

The film is an upload (PNG, JPEG or DICOM: engine.radiograph.read_radiograph) or a radiograph simulated from the CT
most recently opened in any viewer of this browser (engine.drr.simulate_radiograph, PA; app/viewer.py
follow_open_study keeps that CT). Either way engine.radiograph_view.check_frontal_chest refuses a CT slice or a
lateral view with one sentence, then engine.pipelines.cxr.CXRPipeline reads it: findings through the CT CLIP's
prompts (bars of app/zeroshot_panel.py), a latent searched over the study library, and the finding's exact class
activation map (CXRPipeline.location_map) blended over the film. Every step is its own event: the film shows first.
"""
from __future__ import annotations

from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd

from app.find_tab import (COLUMNS, display_heat, open_clicked_results, results_table,
                          show_model_status)
from app.models import CTClipModels, CXRModels
from app.viewer import ct_viewer
from app.zeroshot_panel import RADIOGRAPH_READING_TITLE, zero_shot_figure
from engine.errors import UserError
from engine.labels import LABELS

DEFAULT_K = 10
MAX_K = 50
DEMO_NOTE = ("The demo chest X-ray model learned from radiographs simulated from a digital chest phantom, not from "
             "real films, so on a real radiograph its findings are not calibrated.")
NO_FILM = "Upload a frontal chest radiograph, or simulate one from the CT open in a viewer."
NO_CT_OPEN = ("No CT is open yet: open one in Library, Find CTs or Open a CT (or a similar study below), then press "
              "Simulate again.")


def _fail(err: UserError):
    return gr.Error(str(err), print_exception=False)


# --------------------------------------------------------------------------------------------------- the film

def load_film(path):
    """An uploaded file -> (Radiograph, film image, note); one sentence in a notification when it is refused."""
    from engine.radiograph import read_radiograph
    from engine.radiograph_view import check_frontal_chest

    if not path:
        raise gr.Error("Choose a radiograph file to upload.", print_exception=False)
    try:
        film = read_radiograph(path)
        check_frontal_chest(film)
    except UserError as err:
        raise _fail(err) from None
    film.source = Path(path).name
    for warning in film.warnings:
        gr.Warning(warning)
    return film, _film_image(film), f"Reading **{film.source}**…"


def simulate_film(volume):
    """The CT in the viewer -> a simulated PA radiograph (Radiograph, film image, note)."""
    from engine.drr import simulate_radiograph
    from engine.radiograph_view import check_frontal_chest

    if volume is None:
        raise gr.Error(NO_CT_OPEN, print_exception=False)
    try:
        film = simulate_radiograph(volume, view="pa")
        check_frontal_chest(film)
    except UserError as err:
        raise _fail(err) from None
    name = Path(volume.source).name if volume.source else "the open CT"
    film.source = f"radiograph simulated from {name}"
    return film, _film_image(film), f"Reading the **{film.source}**…"


def _film_image(film, heat: np.ndarray | None = None) -> np.ndarray:
    from engine.viewing import radiograph_image

    return radiograph_image(film.image, overlay=heat)


# --------------------------------------------------------------------------------------------------- the reading

def read_film(cxr: CXRModels, ctclip: CTClipModels, film, k):
    """(note, findings plot, table, results, finding to map): the film's 18 findings and its K closest studies."""
    if film is None:
        return NO_FILM, gr.Plot(visible=False), gr.skip(), gr.skip(), gr.skip()
    try:
        pipeline = cxr.pipeline()
        latent = pipeline.embed_radiograph(film)
        found = [r.to_json() for r in ctclip.library().search(latent, int(k))]
    except UserError as err:
        return f"⚠ {err}", gr.Plot(visible=False), gr.skip(), gr.skip(), gr.skip()
    probabilities = pipeline.ctclip.zero_shot_from_latent(latent)
    top = max(probabilities, key=probabilities.get)
    note = (f"The 18 findings read from the {film.source or 'radiograph'} and the **{len(found)}** CT studies closest "
            f"to it; click a study to open it below.")
    table = results_table(found, ctclip.library())
    figure = zero_shot_figure(probabilities, title=RADIOGRAPH_READING_TITLE, auroc=pipeline.zero_shot_auroc)
    return note, gr.Plot(value=figure, visible=True), table, found, top


def show_map(cxr: CXRModels, film, label):
    """(film image with the finding's class activation map, sentence): where on the film `label` is read."""
    if film is None or not label:
        return gr.skip(), ""
    try:
        heat, gap = cxr.pipeline().location_map(film, label)
    except UserError as err:
        return _film_image(film), f"⚠ {err}"
    sentence = (f"Where **{label}** is read on this film: red raises its score most (the exact share of each region "
                f"of the present-minus-absent cosine, {gap:+.3f}; regions that lower it are not drawn).")
    return _film_image(film, display_heat(heat)), sentence


# --------------------------------------------------------------------------------------------------- the tab

def cxr_tab(ctclip: CTClipModels, cxr: CXRModels, current: gr.State, demo: gr.Blocks | None = None):
    """Build the tab in the current context. `current` is the gr.State holding the CT most recently opened in any
    viewer (app/viewer.py follow_open_study). Returns the tab's CTViewer."""
    gr.Markdown("Show the workstation a frontal chest radiograph: the X-ray encoder reads the 18 findings a CT would "
                "show and ranks the CT studies most like it. " + DEMO_NOTE, elem_id="cxr-intro")
    status = gr.Markdown(NO_FILM, elem_id="cxr-status")
    with gr.Row(equal_height=False):
        upload = gr.File(label="Chest radiograph (PNG, JPEG or DICOM)", file_count="single", type="filepath",
                         height=120, scale=3, elem_id="cxr-upload")
        with gr.Column(scale=2, min_width=260):
            simulate = gr.Button("Simulate from the CT in the viewer", variant="secondary", elem_id="cxr-simulate")
            k = gr.Slider(1, MAX_K, value=DEFAULT_K, step=1, label="CTs to show (K)", elem_id="cxr-k")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            film_image = gr.Image(label="Radiograph", type="numpy", format="png", interactive=False, height=420,
                                  buttons=["fullscreen"], elem_id="cxr-film")
            finding = gr.Dropdown(list(LABELS), value=None, label="Show where this finding is read",
                                  elem_id="cxr-finding")
            map_note = gr.Markdown("", elem_id="cxr-map-note")
        with gr.Column(scale=3):
            findings = gr.Plot(label="CT-level findings read from the radiograph", show_label=False, visible=False,
                               elem_id="cxr-findings")
    table = gr.Dataframe(pd.DataFrame(columns=COLUMNS), interactive=False, wrap=False, max_height=330, max_chars=80,
                         label="Most similar CT studies (click a row to open it)", elem_id="cxr-results")
    report = gr.Markdown("", elem_id="cxr-report", max_height=400)
    viewer = ct_viewer()
    film = gr.State(None)        # the engine.radiograph.Radiograph on show
    results = gr.State([])       # SearchResult.to_json() dicts on show

    def read(f, kk):
        return read_film(cxr, ctclip, f, kk)

    def draw(f, label):
        return show_map(cxr, f, label)

    def wire(loaded):
        read_event = loaded.success(read, [film, k], [status, findings, table, results, finding],
                                    concurrency_limit=2, concurrency_id="cxr-read")
        read_event.success(draw, [film, finding], [film_image, map_note], show_progress="hidden")

    wire(upload.upload(load_film, upload, [film, film_image, status], api_name="read_cxr_upload"))
    simulated = simulate.click(simulate_film, current, [film, film_image, status])
    simulated.success(lambda: None, None, upload, show_progress="hidden")   # the film on show is no longer the upload
    wire(simulated)
    finding.input(draw, [film, finding], [film_image, map_note], show_progress="hidden")

    open_clicked_results(ctclip, table, results, viewer, report)
    if demo is not None:
        show_model_status(demo, cxr, NO_FILM, status)
    return viewer
