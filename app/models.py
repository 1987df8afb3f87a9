"""The models as the app uses them: loaded once per process and shared by every tab and every browser session.

Each holder loads its engine pipeline on first use (the app holds no model code) and remembers a failed load as the
one sentence that says how to fix it, so every panel shows that sentence instead of failing:
- `CTClipModels`: `CTClipPipeline.from_pretrained(weights, preset)` with app.py's --weights/--preset, and one
  `StudyLibrary` over it (engine.pipelines.ctclip, engine.study_library). Loading starts in a background thread when
  the app is built, so the first page answers at once; the first request that needs the model waits for it.
- `GeneratorModels` (engine.pipelines.generate), `SpeechModels` (engine.pipelines.speech) and `CXRModels`
  (engine.pipelines.cxr), all over the same CT CLIP pipeline, not a second copy.

    models = CTClipModels(preset="demo", weights=None).start()
    pipeline = models.pipeline()                      # waits for the load; UserError with one sentence if it failed
"""
from __future__ import annotations

import threading

from engine.errors import UserError


class LoadedOnce:
    """A model loaded once per process on first use (thread-safe). `what` and `retrain` make the sentence a damaged
    checkpoint gets; a UserError from the engine (no checkpoint: how to train one) is kept as it is."""

    what = "The model"
    retrain = ""

    def __init__(self):
        self._lock = threading.Lock()
        self._loaded = None
        self._error: str | None = None

    def _build(self):
        raise NotImplementedError

    def _load(self):
        with self._lock:
            if self._error is not None:
                raise UserError(self._error)
            if self._loaded is None:
                try:
                    self._loaded = self._build()
                except UserError as err:
                    self._error = str(err)
                    raise
                except Exception as err:  # a damaged checkpoint: one sentence, never a traceback in the page
                    self._error = (f"{self.what} could not be loaded ({type(err).__name__}); retrain it with "
                                   f"{self.retrain}.")
                    raise UserError(self._error) from None
            return self._loaded

    def unavailable(self) -> str | None:
        """None when the model loads, else the one sentence that says why not and how to fix it."""
        try:
            self._load()
        except UserError as err:
            return str(err)
        return None


class CTClipModels(LoadedOnce):
    """The CT CLIP pipeline and the study library, loaded once per app process (lazily or in the background).
    `pipeline()` / `library()` raise UserError with one sentence when they cannot be loaded."""

    what = "The CT CLIP checkpoint"
    retrain = "`python -m training ctclip --preset demo`"

    def __init__(self, preset: str = "demo", weights: str | None = None):
        super().__init__()
        self.preset = preset
        self.weights = weights
        self._thread: threading.Thread | None = None

    def start(self) -> "CTClipModels":
        """Load in a daemon thread now (the page does not wait for it; the first request that needs it does)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self.unavailable, name="ctclip-load", daemon=True)
            self._thread.start()
        return self

    def _build(self):
        from engine.pipelines.ctclip import CTClipPipeline
        from engine.study_library import StudyLibrary

        pipeline = CTClipPipeline.from_pretrained(self.weights, self.preset)
        library = StudyLibrary(pipeline)
        pipeline.prompt_latents  # the 36 zero-shot prompts, encoded once here rather than on first use
        return pipeline, library

    def pipeline(self):
        """The engine.pipelines.ctclip.CTClipPipeline (waits for a load in progress)."""
        return self._load()[0]

    def library(self):
        """The engine.study_library.StudyLibrary over the pipeline (demo studies + the user's indexed CTs)."""
        return self._load()[1]


class GeneratorModels(LoadedOnce):
    """The text -> CT generator (engine.pipelines.generate.GeneratePipeline), conditioned on and read by the app's
    CT CLIP. One generation runs at a time (`lock`): a second browser tab's request waits for the first."""

    what = "The generator"
    retrain = "`python -m training vae --preset demo` then `python -m training ldm --preset demo`"

    def __init__(self, ctclip_models: CTClipModels, preset: str = "demo", weights: str | None = None):
        super().__init__()
        self.ctclip_models, self.preset, self.weights = ctclip_models, preset, weights
        self.lock = threading.Lock()  # held for the whole of one generation

    def _build(self):
        from engine.pipelines.generate import GeneratePipeline

        return GeneratePipeline.from_pretrained(self.weights if self.preset == "paper" else None, preset=self.preset,
                                                ctclip=self.ctclip_models.pipeline())

    def pipeline(self):
        """The GeneratePipeline; UserError with one sentence (how to train it) when there is none."""
        return self._load()


class SpeechModels(LoadedOnce):
    """The speech pipeline (engine.pipelines.speech) over the process's CT CLIP. `pipeline()` raises UserError with
    one sentence (e.g. how to train the speech encoder) when it cannot load."""

    what = "The speech encoder"
    retrain = "`python -m training speech --preset demo`"

    def __init__(self, ctclip: CTClipModels, weights: str | None = None):
        super().__init__()
        self.ctclip = ctclip
        self.weights = weights

    def _build(self):
        from engine.pipelines.speech import SpeechPipeline

        pipeline = SpeechPipeline.from_pretrained(self.weights, ctclip=self.ctclip.pipeline())
        pipeline.ctclip.prompt_latents  # the 36 prompts, once
        return pipeline

    def pipeline(self):
        return self._load()


class CXRModels(LoadedOnce):
    """The chest X-ray pipeline (engine.pipelines.cxr.CXRPipeline: X2CT-CLIP's radiograph encoder) over the process's
    CT CLIP. `pipeline()` raises UserError with one sentence (how to train the encoder) when there is none."""

    what = "The chest X-ray encoder"
    retrain = "`python -m training x2ct --preset demo`"

    def __init__(self, ctclip: CTClipModels, weights: str | None = None):
        super().__init__()
        self.ctclip = ctclip
        self.weights = weights   # an encoder folder; None: settings.x2ct_dir() (assets/x2ct or $CT_X2CT_DIR)

    def _build(self):
        from engine.pipelines.cxr import CXRPipeline, cxr_model_dir

        directory = cxr_model_dir(self.weights)     # no encoder: how to train one, before the CT CLIP is waited for
        pipeline = CXRPipeline.from_pretrained(directory, ctclip=self.ctclip.pipeline())
        pipeline.ctclip.prompt_latents  # the 36 prompts, once
        return pipeline

    def pipeline(self):
        return self._load()
