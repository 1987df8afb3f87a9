"""The zero-shot panel: the CT CLIP's reading of the 18 CT-RATE findings of whatever CT a viewer shows, as bars.

    models = CTClipModels(preset="demo", weights=None).start()      # app/models.py
    panel = zeroshot_panel()                         # in a Blocks context, next to a viewer
    dep.success(lambda volume: read_findings(models, volume), viewer.volume, panel.outputs)
"""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import numpy as np
import plotly.graph_objects as go
# plotly imports its figure classes on first use; two request threads making their first figures at once (the
# Library's bars at page load and a generation's) deadlock in that import, so they are imported here, at start-up
from plotly.graph_objs import Bar, Figure, Scatter  # noqa: E402,F401

from app.models import CTClipModels
from engine.errors import UserError
from engine.labels import LABELS

PRESENT_COLOUR = "#e4572e"    # a label the study's report states (Library, Find CTs)
ABSENT_COLOUR = "#9db4cc"     # a label the report does not state
UNKNOWN_COLOUR = "#0284c7"    # an uploaded CT: no report to compare with
GREYED_COLOUR = "#cbd5e1"     # every bar of a scan the out-of-distribution check flags (engine/ood.py)
GREYED_TEXT_COLOUR = "#94a3b8"
WAITING = "Reading the CT's findings…"
DEMO_ON_REAL_CT = ("The demo CT CLIP learned from simulated phantom CTs, so on a real scan these bars are not "
                   "calibrated; for CT-CLIP's own reading run "
                   "`python app.py --preset paper --weights DIR`.")
OUT_OF_DISTRIBUTION = ("This scan does not look like the phantoms the demo model learned from; the bars are shown "
                       "greyed and should not be read as findings.")


# --------------------------------------------------------------------------------------------------- the chart

ZERO_SHOT_TITLE = "CT CLIP zero-shot reading: P(present) per label"
RADIOGRAPH_READING_TITLE = "CT findings read from the radiograph: P(present) per label"
TEXT_READING_TITLE = "What the text states: P(stated) per label, read from its latent"
SPEECH_READING_TITLE = "What the dictation states: P(stated) per label"
SPEECH_READING_SUBTITLE = "read from the speech itself, not from a transcript"
UNCALIBRATED_TEXT_TITLE = "Zero-shot rule on a text latent (uncalibrated: most labels read high)"
WEAK_AUROC = 0.80             # a label whose held-out AUROC is below this is named under the chart
FOOTNOTE_LABELS_PER_LINE = 2  # the footnote's labels per line, so it stays inside a narrow chart (Find CTs' column)


def weak_labels_footnote(auroc: dict[str, float] | None) -> str | None:
    """The chart's footnote naming the labels the checkpoint's held-out test read least reliably (AUROC <
    WEAK_AUROC), weakest first, e.g. "Read with care (held-out AUROC):<br>Lymphadenopathy 0.73, Lung nodule 0.76":
    the heading on its own line, then FOOTNOTE_LABELS_PER_LINE labels a line (plotly's <br>); None when no label is
    weak."""
    weak = sorted((a, label) for label, a in (auroc or {}).items() if a < WEAK_AUROC)
    if not weak:
        return None
    named = [f"{label} {a:.2f}" for a, label in weak]
    lines = [", ".join(named[i:i + FOOTNOTE_LABELS_PER_LINE]) for i in range(0, len(named), FOOTNOTE_LABELS_PER_LINE)]
    return "Read with care (held-out AUROC):<br>" + ",<br>".join(lines)


def text_reading_title(calibrated: bool, spoken: bool = False) -> str:
    """The title of a text or speech latent's bars: what it states, or a warning when the CT CLIP has no reader."""
    if not calibrated:
        return UNCALIBRATED_TEXT_TITLE
    return SPEECH_READING_TITLE if spoken else TEXT_READING_TITLE


def zero_shot_figure(probabilities: dict[str, float], truth: dict[str, int] | None = None,
                     thresholds: dict[str, float] | None = None, out_of_distribution: bool = False,
                     title: str = ZERO_SHOT_TITLE, subtitle: str | None = None,
                     auroc: dict[str, float] | None = None) -> go.Figure:
    """18 horizontal bars, P(present) per label in CT-CLIP order (top to bottom), a dashed line at 0.5.

    With `truth` (label -> 0|1 from the study's report) the bars are coloured by it, so a user compares the model's
    reading with the report at a glance. With `thresholds` (label -> P, from the checkpoint's held-out evaluation)
    each bar carries a black tick where that label's decision line is: a bar past its tick reads "present".
    With `out_of_distribution` (the scan was flagged by the CT CLIP's check) every bar is grey, without threshold
    ticks, and the title says the bars are not findings. `subtitle`: a smaller second line under the title.
    With `auroc` (label -> zero-shot AUROC on the checkpoint's held-out test) each bar's hover says how well that
    label was read, and a footnote under the bars names the labels read least reliably (weak_labels_footnote; not
    on a greyed chart, whose bars are not findings at all)."""
    labels = list(LABELS)
    probs = np.array([float(probabilities[label]) for label in labels])
    auroc = auroc or {}
    footnote = None if out_of_distribution else weak_labels_footnote(auroc)
    groups = ([("stated in the report", PRESENT_COLOUR, 1), ("not in the report", ABSENT_COLOUR, 0)] if truth
              else [("P(present)", UNKNOWN_COLOUR, None)])
    if out_of_distribution:     # keep the report's grouping (legend) but no colour that reads as a finding
        groups = [(name, GREYED_COLOUR, value) for name, _, value in groups]
        thresholds = None
    fig = go.Figure()
    for name, colour, value in groups:
        keep = [i for i, label in enumerate(labels) if value is None or int(truth.get(label, 0)) == value]
        fig.add_trace(go.Bar(
            x=probs[keep], y=[labels[i] for i in keep], orientation="h", name=name, marker_color=colour,
            text=[f"{probs[i]:.0%}" for i in keep], textposition="outside", cliponaxis=False,
            textfont=dict(color=GREYED_TEXT_COLOUR) if out_of_distribution else None,
            customdata=[f"; held-out AUROC {auroc[labels[i]]:.2f}" if labels[i] in auroc else "" for i in keep],
            hovertemplate="%{y}: P(present) = %{x:.3f}%{customdata}<extra></extra>"))
    fig.add_vline(x=0.5, line_dash="dash", line_color="#64748b", line_width=1)
    marked = [label for label in labels if thresholds and label in thresholds]
    if marked:
        fig.add_trace(go.Scatter(
            x=[thresholds[label] for label in marked], y=marked, mode="markers", name="decision threshold",
            marker=dict(symbol="line-ns", size=16, line=dict(width=3, color="#111827")),
            hovertemplate="%{y}: present above %{x:.3f} (threshold from the held-out test)<extra></extra>"))
    footnote_room = 32 + 16 * footnote.count("<br>") if footnote else 0     # px under the x axis's tick labels
    fig.update_layout(
        height=110 + 20 * len(labels) + footnote_room,
        # top margin: the title, its subtitle, and the legend's row under them
        margin=dict(l=10, r=40, t=40 + (18 if subtitle else 0) + (24 if (truth or marked) else 0),
                    b=10 + footnote_room),
        barmode="overlay",
        bargap=0.25, title=dict(text=title
                                + (" (out of distribution: not findings)" if out_of_distribution else ""),
                                font=dict(size=14, color=GREYED_TEXT_COLOUR if out_of_distribution else None),
                                subtitle=dict(text=subtitle or "", font=dict(size=11, color="#64748b")),
                                x=0.01, y=0.99, yanchor="top"),
        xaxis=dict(range=[0, 1.1], tickformat=".0%", dtick=0.25, title=None, fixedrange=True),
        yaxis=dict(categoryorder="array", categoryarray=labels, autorange="reversed", title=None, fixedrange=True,
                   tickfont=dict(size=12)),
        legend=dict(orientation="h", yanchor="bottom", y=1.0, x=0, font=dict(size=12)),
        showlegend=bool(truth) or bool(marked), plot_bgcolor="white", paper_bgcolor="white")
    fig.update_xaxes(showgrid=True, gridcolor="#e2e8f0")
    if footnote:        # under the x axis's tick labels, in the bottom margin made for it above
        fig.add_annotation(text=footnote, xref="paper", yref="paper", x=0, y=0, xanchor="left", yanchor="top",
                           yshift=-22, showarrow=False, align="left", font=dict(size=11, color="#64748b"),
                           name="weak labels")
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


def reading_caveats(volume) -> list[str]:
    """The warnings of the CT's reading (engine.volume: not a chest CT, NaN voxels replaced, one slice...), which every
    answer about that CT carries: the findings are only as good as the volume they were read from."""
    return [str(w) for w in (getattr(volume, "warnings", None) or [])]


def _note(sentences: list[str]) -> gr.Markdown:
    text = "\n".join(f"- {s}" for s in sentences) if len(sentences) > 1 else "".join(sentences)
    return gr.Markdown(text, visible=bool(sentences))


def read_findings(models: CTClipModels, volume, truth: dict | None = None):
    """(note, plot) updates: the zero-shot bars for `volume`, or one sentence when there is no model or CT. The note
    carries the CT's reading warnings above the bars (the CLI's zeroshot returns the same ones); when the CT CLIP's
    out-of-distribution check flags the scan, the bars are greyed and the note says so in one sentence."""
    if volume is None:
        return gr.Markdown("Open a CT to read its findings.", visible=True), gr.Plot(value=None, visible=False)
    try:
        pipeline = models.pipeline()
        probabilities, check = pipeline.zero_shot_checked(volume)
    except UserError as err:
        return gr.Markdown(str(err), visible=True), gr.Plot(value=None, visible=False)
    figure = zero_shot_figure(probabilities, truth, pipeline.zero_shot_thresholds, out_of_distribution=check.flagged,
                              auroc=pipeline.zero_shot_auroc)
    sentences = [f"Caution: {w}" for w in reading_caveats(volume)]
    if check.flagged:
        sentences.append(OUT_OF_DISTRIBUTION)
    if truth is None and models.preset == "demo":   # the user's own CT: say what the demo model can and cannot read
        sentences.append(DEMO_ON_REAL_CT)
    return _note(sentences), gr.Plot(value=figure, visible=True)


def zeroshot_panel() -> ZeroShotPanel:
    """Build the panel in the current Blocks context (a note line above a plotly bar chart)."""
    note = gr.Markdown("Open a CT to read its findings.", elem_classes=["zeroshot-note"])
    plot = gr.Plot(label="Findings read by the CT CLIP (zero-shot)", show_label=False, visible=False,
                   elem_classes=["zeroshot-plot"])
    return ZeroShotPanel(note=note, plot=plot)
