"""The "Generate" tab: type a report, generate a SYNTHETIC CT (engine.pipelines.generate), browse it in the shared
viewer, compare what the CT CLIP reads in it with what the prompt asked for, download it as NIfTI; then "What one
finding changes": the last prompt with one finding toggled (engine.report_edit), generated from the same seed, shown
beside the first (without | with | |difference| over with, app/viewer.comparison_viewer) with the two readings of
that finding.

Progress moves during sampling and decoding (the pipeline's progress callback drives gr.Progress); Cancel stops the
generation at the next step boundary (a per-browser-session threading.Event), and the app stays usable. One
generation runs at a time (GeneratorModels.lock and the events' shared concurrency limit): a second tab waits its
turn.
"""
from __future__ import annotations

import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from app.viewer import Comparison, comparison_viewer, ct_viewer
from app.zeroshot_panel import text_reading_title, zero_shot_figure
from engine.errors import UserError
from engine.labels import LABELS

EXAMPLES = [
    "Findings: Moderate right pleural effusion with adjacent passive atelectasis. The heart is enlarged. "
    "Impression: Right pleural effusion. Cardiomegaly.",
    "Findings: Centrilobular emphysema in both upper lobes. No pleural effusion. Impression: Emphysema.",
    "Findings: The lungs are clear. No pleural effusion. Heart size is normal. Impression: No acute findings.",
]
SYNTHETIC_NOTE = ("**Synthetic**: every volume made here is generated from text by a model trained on digital "
                  "phantoms. It is not a patient and not for clinical use; its NIfTI header says so too.")
TOGGLE_NOTE = ("### What one finding changes\nThe last prompt with one finding toggled (added when the prompt does not "
               "state it, removed when it does), generated from the same seed, steps and guidance: both **synthetic** "
               "volumes side by side at the same slice, and where they differ coloured over the one with the finding "
               "(|difference| transparent up to 30 HU, blue to red from there to 300 HU or more).")
NO_LAST_PROMPT = "Generate a volume first: the toggle works on the last prompt."
_cancel_events: dict[str, threading.Event] = {}


@dataclass
class LastRequest:
    """The last successful generation of a browser session, for the toggle (same prompt, steps, guidance, seed)."""
    text: str
    steps: int
    guidance: float
    seed: int
    generation: object          # engine.pipelines.generate.Generation (reused: a fixed seed reproduces it exactly)


def _event_for(request: gr.Request | None) -> threading.Event:
    key = getattr(request, "session_hash", None) or "default"
    return _cancel_events.setdefault(key, threading.Event())


def cancel(request: gr.Request):
    _event_for(request).set()
    return gr.Markdown("Cancelling at the next step...")


def generate(models, text, steps, guidance, seed, request: gr.Request, progress=gr.Progress()):
    """(volume, NIfTI path, status, asked figure, found figure, LastRequest) for one prompt; bad input is one
    sentence (gr.Error)."""
    from engine.pipelines.base import Cancelled
    from engine.pipelines.generate import check_seed, write_synthetic_nifti

    event = _event_for(request)
    event.clear()
    try:
        pipeline = models.pipeline()
        text, steps, guidance = pipeline.check_request(text, steps, guidance)
        seed = check_seed(seed)
        with models.lock:
            result = pipeline.generate(text, steps=steps, guidance=guidance, seed=seed,
                                       progress=lambda f, m: progress(f, desc=m), cancel=event)
        out = Path(tempfile.mkdtemp(prefix="generated-")) / f"synthetic_seed{seed}.nii.gz"
        write_synthetic_nifti(result.volume, out)
        reading = pipeline.read(result.volume, result.text_latent) or {}
    except Cancelled:
        raise gr.Error("Generation cancelled.", print_exception=False) from None
    except (UserError, ValueError) as err:
        raise gr.Error(str(err), print_exception=False) from None
    result.volume.source = "SYNTHETIC (generated from text)"
    timings = result.timings_s
    status = (f"Synthetic volume, seed {seed}, {result.steps} steps, guidance {result.guidance:g}: sampling "
              f"{timings['sampling']:.1f} s, decoding {timings['decoding']:.1f} s.")
    calibrated = pipeline.reader is not None and pipeline.reader.text_reader is not None
    asked = zero_shot_figure(reading["asked"], title=text_reading_title(calibrated)) if reading.get("asked") else None
    found = (zero_shot_figure(reading["findings"], auroc=pipeline.reader.zero_shot_auroc)
             if reading.get("findings") else None)
    last = LastRequest(text, result.steps, result.guidance, seed, result)
    return result.volume, str(out), gr.Markdown(status), asked, found, last


def toggle(models, last: LastRequest | None, label, request: gr.Request, progress=gr.Progress()):
    """(Comparison, toggled prompt, status) for the last prompt with `label` toggled, from the same seed; one
    sentence (gr.Error) without a last prompt, for a label that is not one of the 18, or when cancelled."""
    from engine.pipelines.base import Cancelled

    if last is None:
        raise gr.Error(NO_LAST_PROMPT, print_exception=False)
    event = _event_for(request)
    event.clear()
    try:
        pipeline = models.pipeline()
        with models.lock:
            comparison = pipeline.compare_finding(last.text, label, steps=last.steps, guidance=last.guidance,
                                                  seed=last.seed, base=last.generation, cancel=event,
                                                  progress=lambda f, m: progress(f, desc=m))
        readings = pipeline.read_comparison(comparison)
    except Cancelled:
        raise gr.Error("Generation cancelled.", print_exception=False) from None
    except (UserError, ValueError) as err:
        raise gr.Error(str(err), print_exception=False) from None
    return (comparison_pair(comparison), comparison.toggled.text,
            gr.Markdown(comparison_status(comparison, readings, last)))


def comparison_pair(comparison) -> Comparison:
    """The viewer's pair: without | with | |difference| over with, every title saying synthetic."""
    from engine.viewing import difference_heat

    label = comparison.label
    for generation in (comparison.with_finding, comparison.without_finding):
        generation.volume.source = "SYNTHETIC (generated from text)"
    return Comparison(comparison.without_finding.volume, comparison.with_finding.volume,
                      (f"Without {label} (synthetic)", f"With {label} (synthetic)",
                       f"|With - without| over with {label} (synthetic)"),
                      difference_heat(comparison.difference_hu))


def comparison_status(comparison, readings: dict | None, last: LastRequest) -> str:
    """What was toggled, the two readings of the label (asked by each prompt, found in each volume) and how much
    the volumes differ, as Markdown."""
    import numpy as np

    label = comparison.label
    done = "added to" if comparison.added else "removed from"
    diff = np.abs(comparison.difference_hu)
    lines = [f"**Synthetic pair**, seed {last.seed}, {last.steps} steps, guidance {last.guidance:g}: *{label}* "
             f"{done} the last prompt. The volumes differ by {float(diff.mean()):.1f} HU on average "
             f"({float((diff >= 100).mean()) * 100:.1f} % of voxels by 100 HU or more).", ""]
    if readings:
        def cell(value):
            return "n/a" if value is None else f"{value:.2f}"
        lines += [f"| {label} | without | with |", "|---|---|---|",
                  "| asked by the prompt (its own text latent) | "
                  f"{cell(readings['without_finding']['asked'])} | {cell(readings['with_finding']['asked'])} |",
                  "| read in the synthetic volume (zero-shot) | "
                  f"{cell(readings['without_finding']['found'])} | {cell(readings['with_finding']['found'])} |"]
    return "\n".join(lines)


def _missing_generator_note(models) -> None:
    from engine.settings import generator_dir

    if models.preset == "demo" and not (generator_dir() / "unet" / "config.json").is_file():
        gr.Markdown(f"No trained generator in {generator_dir()}: train one with `python -m training vae --preset "
                    "demo`, then `python -m training ldm --preset demo` and `python -m training ldm-export`.")


def _toggle_section(models, last: gr.State):
    """The "What one finding changes" controls and side-by-side viewer, wired to `toggle`."""
    gr.Markdown(TOGGLE_NOTE)
    with gr.Row(equal_height=True):
        label = gr.Dropdown(list(LABELS), value="Pleural effusion", label="Finding", scale=3,
                            elem_id="generate-toggle-label")
        button = gr.Button("Toggle this finding on the last prompt", scale=2, elem_id="generate-toggle")
    toggled = gr.Textbox(label="The toggled prompt", lines=3, interactive=False, elem_id="generate-toggled-prompt")
    summary = gr.Markdown(elem_classes=["generate-toggle-status"])
    compare = comparison_viewer("generate-compare", ("Without the finding (synthetic)", "With the finding (synthetic)",
                                                     "|With - without| over with (synthetic)"))

    def on_toggle(last_request, name, request: gr.Request, progress=gr.Progress()):
        return toggle(models, last_request, name, request, progress)

    event = button.click(on_toggle, [last, label], [compare.pair, toggled, summary], concurrency_limit=1,
                         concurrency_id="generate", api_name="toggle_finding")
    compare.open_after(event)
    return compare


def generate_tab(models):
    """Build the tab in the current Blocks context; `models` is app.models.GeneratorModels. Returns its CTViewer."""
    gr.Markdown(SYNTHETIC_NOTE)
    _missing_generator_note(models)
    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(label="Report (Findings and Impression)", lines=5, max_lines=12,
                                placeholder="Findings: ... Impression: ...", elem_id="generate-prompt")
            gr.Examples(EXAMPLES, inputs=prompt, label="Example reports")
        with gr.Column(scale=1):
            steps = gr.Slider(1, 50, value=15, step=1, label="Sampling steps", elem_id="generate-steps")
            guidance = gr.Slider(0.0, 15.0, value=5.0, step=0.5, label="Guidance scale")
            seed = gr.Number(value=0, precision=0, label="Seed (same seed, same volume)")
            with gr.Row():
                run = gr.Button("Generate", variant="primary", elem_id="generate-run")
                stop = gr.Button("Cancel", elem_id="generate-cancel")
    status = gr.Markdown(elem_classes=["generate-status"])
    download = gr.File(label="Synthetic CT (NIfTI)", interactive=False, elem_id="generate-download")
    viewer = ct_viewer()
    with gr.Row():
        with gr.Column():
            gr.Markdown("**What the prompt asked for** (what its own text latent states, read against the "
                        "CT CLIP's label prompts)")
            asked = gr.Plot(show_label=False)
        with gr.Column():
            gr.Markdown("**What the CT CLIP reads in the generated volume** (zero-shot)")
            found = gr.Plot(show_label=False)
    last = gr.State(None)

    def on_generate(text, n_steps, scale, seed_value, request: gr.Request, progress=gr.Progress()):
        return generate(models, text, n_steps, scale, seed_value, request, progress)

    event = run.click(on_generate, [prompt, steps, guidance, seed],
                      [viewer.volume, download, status, asked, found, last],
                      concurrency_limit=1, concurrency_id="generate", api_name="generate_ct")
    viewer.open_after(event)
    stop.click(cancel, None, status, queue=False)
    _toggle_section(models, last)
    return viewer
