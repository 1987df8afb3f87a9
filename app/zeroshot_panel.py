"""The CT CLIP as the app uses it: loaded once per process (`CTClipModels`), and the zero-shot panel that reads the 18
CT-RATE findings of whatever CT a viewer shows (`zeroshot_panel`).

The models come from engine.pipelines (the app holds no model code): `CTClipPipeline.from_pretrained(weights, preset)`
with app.py's --weights/--preset, and one `StudyLibrary` over it. Loading starts in a background thread when the app
is built, so the first page answers at once; the first request that needs the model waits for it. Without a
checkpoint every panel shows one sentence saying how to train it instead of failing.

    models = CTClipModels(preset="demo", weights=None).start()
    panel = zeroshot_panel()                         # in a Blocks context, next to a viewer
    dep.success(lambda volume: read_findings(models, volume), viewer.volume, panel.outputs)
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import gradio as gr
import numpy as np
import plotly.graph_objects as go

from engine.errors import UserError
from engine.labels import LABELS

PRESENT_COLOUR = "#e4572e"    # a label the study's report states (Library, Find CTs)
ABSENT_COLOUR = "#9db4cc"     # a label the report does not state
UNKNOWN_COLOUR = "#0284c7"    # an uploaded CT: no report to compare with
WAITING = "Reading the CT's findings…"
DEMO_ON_REAL_CT = ("The demo CT CLIP learned from simulated phantom CTs, so on a real scan these bars are not "
                   "calibrated; for CT-CLIP's own reading run "
                   "`python app.py --preset paper --weights DIR`.")


# --------------------------------------------------------------------------------------------------- the models

class CTClipModels:
    """The CT CLIP pipeline and the study library, loaded once per app process (thread-safe, lazily or in the
    background). `pipeline()` / `library()` raise UserError with one sentence when they cannot be loaded."""

    def __init__(self, preset: str = "demo", weights: str | None = None):
        self.preset = preset
        self.weights = weights
        self._lock = threading.Lock()
        self._pipeline = None
        self._library = None
        self._error: str | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "CTClipModels":
        """Load in a daemon thread now (the page does not wait for it; the first request that needs it does)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._quiet_load, name="ctclip-load", daemon=True)
            self._thread.start()
        return self

    def _quiet_load(self) -> None:
        try:
            self._load()
        except UserError:
            pass  # kept in self._error; shown where the model is needed

    def _load(self):
        with self._lock:
            if self._error is not None:
                raise UserError(self._error)
            if self._pipeline is None:
                from engine.pipelines.ctclip import CTClipPipeline
                from engine.study_library import StudyLibrary

                try:
                    pipeline = CTClipPipeline.from_pretrained(self.weights, self.preset)
                    library = StudyLibrary(pipeline)
                    pipeline.prompt_latents  # the 36 zero-shot prompts, encoded once here rather than on first use
                except UserError as err:
                    self._error = str(err)
                    raise
                except Exception as err:  # a damaged checkpoint: one sentence, never a traceback in the page
                    self._error = (f"The CT CLIP checkpoint could not be loaded ({type(err).__name__}); retrain it "
                                   "with `python -m training ctclip --preset demo`.")
                    raise UserError(self._error) from None
                self._pipeline, self._library = pipeline, library
            return self._pipeline, self._library

    def pipeline(self):
        """The engine.pipelines.CTClipPipeline (waits for a load in progress)."""
        return self._load()[0]

    def library(self):
        """The engine.pipelines.StudyLibrary over the pipeline (demo studies + the user's indexed CTs)."""
        return self._load()[1]

    def unavailable(self) -> str | None:
        """None when the models load, else the one sentence that says why not and how to fix it."""
        try:
            self._load()
        except UserError as err:
            return str(err)
        return None


# --------------------------------------------------------------------------------------------------- the chart

def zero_shot_figure(probabilities: dict[str, float], truth: dict[str, int] | None = None,
                     thresholds: dict[str, float] | None = None) -> go.Figure:
    """18 horizontal bars, P(present) per label in CT-CLIP order (top to bottom), a dashed line at 0.5.

    With `truth` (label -> 0|1 from the study's report) the bars are coloured by it, so a user compares the model's
    reading with the report at a glance. With `thresholds` (label -> P, from the checkpoint's held-out evaluation)
    each bar carries a black tick where that label's decision line is: a bar past its tick reads "present"."""
    labels = list(LABELS)
    probs = np.array([float(probabilities[label]) for label in labels])
    groups = ([("stated in the report", PRESENT_COLOUR, 1), ("not in the report", ABSENT_COLOUR, 0)] if truth
              else [("P(present)", UNKNOWN_COLOUR, None)])
    fig = go.Figure()
    for name, colour, value in groups:
        keep = [i for i, label in enumerate(labels) if value is None or int(truth.get(label, 0)) == value]
        fig.add_trace(go.Bar(
            x=probs[keep], y=[labels[i] for i in keep], orientation="h", name=name, marker_color=colour,
            text=[f"{probs[i]:.0%}" for i in keep], textposition="outside", cliponaxis=False,
            hovertemplate="%{y}: P(present) = %{x:.3f}<extra></extra>"))
    fig.add_vline(x=0.5, line_dash="dash", line_color="#64748b", line_width=1)
    marked = [label for label in labels if thresholds and label in thresholds]
    if marked:
        fig.add_trace(go.Scatter(
            x=[thresholds[label] for label in marked], y=marked, mode="markers", name="decision threshold",
            marker=dict(symbol="line-ns", size=16, line=dict(width=3, color="#111827")),
            hovertemplate="%{y}: present above %{x:.3f} (threshold from the held-out test)<extra></extra>"))
    fig.update_layout(
        height=110 + 20 * len(labels), margin=dict(l=10, r=40, t=64 if (truth or marked) else 40, b=10), barmode="overlay",
        bargap=0.25, title=dict(text="CT CLIP zero-shot reading: P(present) per label", font=dict(size=14), x=0.01,
                                y=0.99, yanchor="top"),
        xaxis=dict(range=[0, 1.1], tickformat=".0%", dtick=0.25, title=None, fixedrange=True),
        yaxis=dict(categoryorder="array", categoryarray=labels, autorange="reversed", title=None, fixedrange=True,
                   tickfont=dict(size=12)),
        legend=dict(orientation="h", yanchor="bottom", y=1.0, x=0, font=dict(size=12)),
        showlegend=bool(truth) or bool(marked), plot_bgcolor="white", paper_bgcolor="white")
    fig.update_xaxes(showgrid=True, gridcolor="#e2e8f0")
    return fig


# --------------------------------------------------------------------------------------------------- the panel

@dataclass
class ZeroShotPanel:
    note: gr.Markdown   # a status sentence (model missing, reading...) or empty
    plot: gr.Plot       # the 18 bars

    @property
    def outputs(self) -> list:
        return [self.note, self.plot]


def waiting_updates():
    """(note, plot) updates that empty the panel while a new CT opens (no stale bars next to a new CT)."""
    return gr.Markdown(WAITING, visible=True), gr.Plot(value=None, visible=False)


def read_findings(models: CTClipModels, volume, truth: dict | None = None):
    """(note, plot) updates: the zero-shot bars for `volume`, or one sentence when there is no model or CT."""
    if volume is None:
        return gr.Markdown("Open a CT to read its findings.", visible=True), gr.Plot(value=None, visible=False)
    try:
        pipeline = models.pipeline()
        probabilities = pipeline.zero_shot(volume)
    except UserError as err:
        return gr.Markdown(str(err), visible=True), gr.Plot(value=None, visible=False)
    figure = zero_shot_figure(probabilities, truth, pipeline.zero_shot_thresholds)
    if truth is None and models.preset == "demo":   # the user's own CT: say what the demo model can and cannot read
        return gr.Markdown(DEMO_ON_REAL_CT, visible=True), gr.Plot(value=figure, visible=True)
    return gr.Markdown("", visible=False), gr.Plot(value=figure, visible=True)


def zeroshot_panel() -> ZeroShotPanel:
    """Build the panel in the current Blocks context (a note line above a plotly bar chart)."""
    note = gr.Markdown("Open a CT to read its findings.", elem_classes=["zeroshot-note"])
    plot = gr.Plot(label="Findings read by the CT CLIP (zero-shot)", show_label=False, visible=False,
                   elem_classes=["zeroshot-plot"])
    return ZeroShotPanel(note=note, plot=plot)
