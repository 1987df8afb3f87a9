"""The "Generate" tab: type a report, generate a SYNTHETIC CT (engine.pipelines.generate), browse it in the shared
viewer, compare what the CT CLIP reads in it with what the prompt asked for, download it as NIfTI.

Progress moves during sampling and decoding (the pipeline's progress callback drives gr.Progress); Cancel stops the
generation at the next step boundary (a per-browser-session threading.Event), and the app stays usable. One
generation runs at a time (GeneratorModels.lock and the event's concurrency limit): a second tab waits its turn.
"""
from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import gradio as gr

from app.viewer import ct_viewer
from app.zeroshot_panel import zero_shot_figure
from engine.errors import UserError

EXAMPLES = [
    "Findings: Moderate right pleural effusion with adjacent passive atelectasis. The heart is enlarged. "
    "Impression: Right pleural effusion. Cardiomegaly.",
    "Findings: Centrilobular emphysema in both upper lobes. No pleural effusion. Impression: Emphysema.",
    "Findings: The lungs are clear. No pleural effusion. Heart size is normal. Impression: No acute findings.",
]
SYNTHETIC_NOTE = ("**Synthetic**: every volume made here is generated from text by a model trained on digital "
                  "phantoms. It is not a patient and not for clinical use; its NIfTI header says so too.")
_cancel_events: dict[str, threading.Event] = {}


def _event_for(request: gr.Request | None) -> threading.Event:
    key = getattr(request, "session_hash", None) or "default"
    return _cancel_events.setdefault(key, threading.Event())


def cancel(request: gr.Request):
    _event_for(request).set()
    return gr.Markdown("Cancelling at the next step...")


def generate(models, text, steps, guidance, seed, request: gr.Request, progress=gr.Progress()):
    """(volume, NIfTI path, status, asked figure, found figure) for one prompt; bad input is one sentence."""
    from engine.pipelines.base import Cancelled
    from engine.pipelines.generate import write_synthetic_nifti

    event = _event_for(request)
    event.clear()
    try:
        pipeline = models.pipeline()
        pipeline.check_request(text, int(steps), float(guidance))
        with models.lock:
            result = pipeline.generate(text, steps=int(steps), guidance=float(guidance), seed=int(seed),
                                       progress=lambda f, m: progress(f, desc=m), cancel=event)
        out = Path(tempfile.mkdtemp(prefix="generated-")) / f"synthetic_seed{int(seed)}.nii.gz"
        write_synthetic_nifti(result.volume, out)
        reading = pipeline.read(result.volume, result.text_latent) or {}
    except Cancelled:
        raise gr.Error("Generation cancelled.", print_exception=False) from None
    except (UserError, ValueError) as err:
        raise gr.Error(str(err), print_exception=False) from None
    result.volume.source = "SYNTHETIC (generated from text)"
    timings = result.timings_s
    status = (f"Synthetic volume, seed {int(seed)}, {result.steps} steps, guidance {result.guidance:g}: sampling "
              f"{timings['sampling']:.1f} s, decoding {timings['decoding']:.1f} s.")
    asked = zero_shot_figure(reading["asked"]) if reading.get("asked") else None
    found = zero_shot_figure(reading["findings"]) if reading.get("findings") else None
    return result.volume, str(out), gr.Markdown(status), asked, found


def generate_tab(models):
    """Build the tab in the current Blocks context; `models` is app.models.GeneratorModels. Returns its CTViewer."""
    from engine.settings import generator_dir

    gr.Markdown(SYNTHETIC_NOTE)
    if models.preset == "demo" and not (generator_dir() / "unet" / "config.json").is_file():
        gr.Markdown(f"No trained generator in {generator_dir()}: train one with `python -m training vae --preset "
                    "demo`, then `python -m training ldm --preset demo` and `python -m training ldm-export`.")
    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(label="Report (Findings and Impression)", lines=5, max_lines=12,
                                placeholder="Findings: ... Impression: ...")
            gr.Examples(EXAMPLES, inputs=prompt, label="Example reports")
        with gr.Column(scale=1):
            steps = gr.Slider(1, 50, value=15, step=1, label="Sampling steps")
            guidance = gr.Slider(0.0, 15.0, value=5.0, step=0.5, label="Guidance scale")
            seed = gr.Number(value=0, precision=0, label="Seed (same seed, same volume)")
            with gr.Row():
                run = gr.Button("Generate", variant="primary")
                stop = gr.Button("Cancel")
    status = gr.Markdown(elem_classes=["generate-status"])
    download = gr.File(label="Synthetic CT (NIfTI)", interactive=False)
    viewer = ct_viewer()
    with gr.Row():
        with gr.Column():
            gr.Markdown("**What the prompt asked for** (label probabilities of its own text latent)")
            asked = gr.Plot(show_label=False)
        with gr.Column():
            gr.Markdown("**What the CT CLIP reads in the generated volume** (zero-shot)")
            found = gr.Plot(show_label=False)

    def on_generate(text, n_steps, scale, seed_value, request: gr.Request, progress=gr.Progress()):
        return generate(models, text, n_steps, scale, seed_value, request, progress)

    event = run.click(on_generate, [prompt, steps, guidance, seed], [viewer.volume, download, status, asked, found],
                      concurrency_limit=1, concurrency_id="generate", api_name="generate_ct")
    viewer.open_after(event)
    stop.click(cancel, None, status, queue=False)
    return viewer
