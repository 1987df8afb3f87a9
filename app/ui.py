"""The app's layout: a title, a one-line "how to use", and one tab per way into the engine."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import gradio as gr

from app.cxr_tab import cxr_tab
from app.dictate_tab import dictate_tab
from app.find_tab import find_tab
from app.generate_tab import generate_tab
from app.library_tab import library_tab
from app.open_tab import open_tab
from app.models import CTClipModels, CXRModels, GeneratorModels, SpeechModels
from app.server import ServerLimits, install_atomic_image_cache
from app.viewer import follow_open_study


@dataclass
class AppConfig:
    """What the app was started with (`python app.py --preset ... --weights ...`); the engine reads the models."""
    preset: str = "demo"          # "demo" (embedded small models) | "paper" (published architectures)
    weights: str | None = None    # folder of checkpoints for the paper preset
    library_path: str | None = None  # demo library JSON (default: assets/library/studies.json)
    preload: bool = True          # load the CT CLIP in a background thread at start-up (else on first use)
    limits: ServerLimits = field(default_factory=ServerLimits)  # upload size, queue, temporary-file lifetime


TITLE = "Chest-CT workstation"
HOW_TO = ("Pick a study in **Library**, describe what you are looking for in **Find CTs**, or upload your own CT in "
          "**Open a CT**; the CT CLIP reads the 18 findings of whatever CT is open. Move the slice sliders to scroll, "
          "choose a window (Lung, Mediastinum, Bone or your own level and width), and press **Show 3-D** for a "
          "surface view of bone and lungs. **Generate** makes a synthetic CT from a report, **Dictate** finds CTs "
          "from your voice and **Chest X-ray** reads a radiograph; each says how to train its model until one is "
          "installed.")

THEME = gr.themes.Soft(primary_hue="sky", neutral_hue="slate")
# CT planes on black, centred, never stretched (the image keeps its physical aspect inside its box).
CSS = """
.ct-plane img { background: #000; object-fit: contain; }
.ct-plane .image-container, .ct-plane .image-frame { background: #000; }
.ct-info { font-size: 0.92em; }
.find-status p, .find-heat-note p, .zeroshot-note p { margin: 0.2em 0; }
"""


def load_library(config: AppConfig):
    """The demo library, or None when it has not been built (the Library tab then says how to build it)."""
    from engine.errors import UserError
    from engine.library import DEFAULT_LIBRARY_PATH, DemoLibrary

    try:
        return DemoLibrary.load(config.library_path or DEFAULT_LIBRARY_PATH)
    except UserError:
        return None


def build_app(config: AppConfig | None = None) -> gr.Blocks:
    config = config or AppConfig()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    install_atomic_image_cache()    # pictures shown twice must not be rewritten while a browser downloads them
    library = load_library(config)
    models = CTClipModels(preset=config.preset, weights=config.weights)  # one CT CLIP per process, for every tab
    if config.preload:
        models.start()
    with gr.Blocks(title=TITLE, analytics_enabled=False, **config.limits.blocks_kwargs()) as demo:
        gr.Markdown(f"# {TITLE}\n{HOW_TO}")
        current = gr.State(None)    # the CT most recently opened in any tab's viewer (the Chest X-ray tab's DRR source)
        with gr.Tabs():
            # Library first: it opens a study the moment the page loads (no model needed) while the CT CLIP loads in
            # the background; Find CTs, the CT CLIP's own flow, is one click away.
            with gr.Tab("Library", id="library", elem_id="tab-library"):
                viewers = [library_tab(library, demo, models)]
            with gr.Tab("Find CTs", id="find", elem_id="tab-find"):
                viewers.append(find_tab(models, demo))
            with gr.Tab("Open a CT", id="open", elem_id="tab-open"):
                viewers.append(open_tab(models, max_upload_mb=config.limits.max_upload_mb))
            with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
                viewers.append(generate_tab(GeneratorModels(models, preset=config.preset, weights=config.weights)))
            with gr.Tab("Dictate", id="dictate", elem_id="tab-dictate"):
                viewers.append(dictate_tab(models, SpeechModels(models), demo))
            with gr.Tab("Chest X-ray", id="cxr", elem_id="tab-cxr"):
                viewers.append(cxr_tab(models, CXRModels(models), current, demo))
        follow_open_study(viewers, current)
        gr.Markdown(f"Preset: **{config.preset}**" + (f" · weights: `{config.weights}`" if config.weights else "")
                    + " · research demo, not for clinical use.", elem_classes=["footer-note"])
    return demo
