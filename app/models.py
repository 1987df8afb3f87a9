"""The models as the app uses them: loaded once per process and shared by every tab and every browser session.

`CTClipModels` holds the CT CLIP pipeline and the study library (engine.pipelines.ctclip, engine.study_library;
the app holds no model code):
`CTClipPipeline.from_pretrained(weights, preset)` with app.py's --weights/--preset, and one `StudyLibrary` over it.
Loading starts in a background thread when the app is built, so the first page answers at once; the first request
that needs the model waits for it. Without a checkpoint every panel shows one sentence saying how to train it
instead of failing. The flows still to come (speech, chest X-ray, generation) add their models here, the same way.

    models = CTClipModels(preset="demo", weights=None).start()
    pipeline = models.pipeline()                      # waits for the load; UserError with one sentence if it failed
"""
from __future__ import annotations

import threading

from engine.errors import UserError


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
        """The engine.pipelines.ctclip.CTClipPipeline (waits for a load in progress)."""
        return self._load()[0]

    def library(self):
        """The engine.study_library.StudyLibrary over the pipeline (demo studies + the user's indexed CTs)."""
        return self._load()[1]

    def unavailable(self) -> str | None:
        """None when the models load, else the one sentence that says why not and how to fix it."""
        try:
            self._load()
        except UserError as err:
            return str(err)
        return None


class GeneratorModels:
    """The text -> CT generator (engine.pipelines.generate.GeneratePipeline), loaded once per app process on first
    use, conditioned on and read by the app's CT CLIP (the same CTClipModels pipeline, not a second copy). One
    generation runs at a time (`lock`): a second browser tab's request waits for the first."""

    def __init__(self, ctclip_models: CTClipModels, preset: str = "demo", weights: str | None = None):
        self.ctclip_models, self.preset, self.weights = ctclip_models, preset, weights
        self._lock = threading.Lock()
        self.lock = threading.Lock()  # held for the whole of one generation
        self._pipeline = None
        self._error: str | None = None

    def pipeline(self):
        """The GeneratePipeline; UserError with one sentence (how to train it) when there is none."""
        with self._lock:
            if self._error is not None:
                raise UserError(self._error)
            if self._pipeline is None:
                from engine.pipelines.generate import GeneratePipeline

                try:
                    ctclip = self.ctclip_models.pipeline()
                    self._pipeline = GeneratePipeline.from_pretrained(
                        self.weights if self.preset == "paper" else None, preset=self.preset, ctclip=ctclip)
                except UserError as err:
                    self._error = str(err)
                    raise
                except Exception as err:  # a damaged checkpoint: one sentence
                    self._error = (f"The generator could not be loaded ({type(err).__name__}); retrain it with "
                                   "`python -m training vae --preset demo` then `python -m training ldm --preset "
                                   "demo`.")
                    raise UserError(self._error) from None
            return self._pipeline


class SpeechModels:
    """The speech pipeline (engine.pipelines.speech) over the process's CT CLIP, loaded once on first use.
    `pipeline()` raises UserError with one sentence (e.g. how to train the speech encoder) when it cannot load."""

    def __init__(self, ctclip: CTClipModels, weights: str | None = None):
        self.ctclip = ctclip
        self.weights = weights
        self._lock = threading.Lock()
        self._pipeline = None
        self._error: str | None = None

    def pipeline(self):
        with self._lock:
            if self._error is not None:
                raise UserError(self._error)
            if self._pipeline is None:
                from engine.pipelines.speech import SpeechPipeline

                try:
                    self._pipeline = SpeechPipeline.from_pretrained(self.weights, ctclip=self.ctclip.pipeline())
                    self._pipeline.ctclip.prompt_latents  # the 36 prompts, once
                except UserError as err:
                    self._error = str(err)
                    raise
                except Exception as err:  # a damaged checkpoint: one sentence, never a traceback in the page
                    self._error = (f"The speech encoder could not be loaded ({type(err).__name__}); retrain it with "
                                   "`python -m training speech --preset demo`.")
                    raise UserError(self._error) from None
            return self._pipeline

    def unavailable(self) -> str | None:
        try:
            self.pipeline()
        except UserError as err:
            return str(err)
        return None
