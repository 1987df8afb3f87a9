"""The speech pipeline: a dictation (file, upload or microphone) -> the CT CLIP's latent -> studies and findings.

    audio (engine.audio.read_audio: any format and rate -> 16 kHz mono) -> checks (at least MIN_DICTATION_S of
        sound; clipping and non-speech are warnings) -> SpeechEncoder (30 s windows, 2 s overlap, averaged)
        -> unit latent in the CT CLIP space -> StudyLibrary.search (top-K studies) and the CT CLIP's zero-shot
        rule against its cached prompt latents (the 18 label probabilities; no speech recognition involved)
Streaming (`Dictation`): samples arrive in chunks; `update()` re-embeds when at least UPDATE_EVERY_S new seconds
arrived, encoding only the last (unfinished) window, finished windows coming from a StreamingCache.
Calls follow engine/pipelines/base.py (progress, cancel; deterministic: no seed).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.audio import SAMPLE_RATE, Audio, rms_dbfs
from engine.errors import UserError
from engine.pipelines.base import CancelSignal, ProgressCallback, RunControl

MIN_DICTATION_S = 1.0        # shorter recordings hold at most a word: refused with one sentence
CLIPPED_SHARE = 0.01         # more than 1 % of samples at full scale: the level was too high (a warning)
UPDATE_EVERY_S = 3.0         # streaming: a new ranking after this much new speech
TRAIN_HINT = "train one with 'python -m training speech --preset demo'"


def dictation_warnings(audio: Audio) -> list[str]:
    """Problems that still allow an answer: clipping, a very low level, little of the recording above the noise."""
    warnings = []
    samples = audio.samples
    if np.mean(np.abs(samples) >= 0.99) > CLIPPED_SHARE:
        warnings.append("The recording is clipped (too loud); results may be less reliable.")
    if rms_dbfs(samples) < -45.0:
        warnings.append("The recording is very quiet; speak closer to the microphone.")
    frame = SAMPLE_RATE // 50  # 20 ms frames: speech alternates loud syllables and pauses, steady noise/music less
    levels = [rms_dbfs(samples[i:i + frame]) for i in range(0, samples.size - frame + 1, frame)]
    if len(levels) >= 10 and np.percentile(levels, 90) - np.percentile(levels, 10) < 10.0:
        warnings.append("The recording sounds steady, like noise or music rather than speech; results may be "
                        "meaningless.")
    return warnings


class SpeechPipeline:
    """A SpeechEncoder with the CT CLIP pipeline whose space it was trained into."""

    def __init__(self, encoder, ctclip, directory: Path | None = None):
        self.encoder = encoder.eval()
        self.ctclip = ctclip
        self.directory = directory
        if encoder.config.latent_dim != ctclip.model.config.latent_dim:
            raise UserError(f"The speech encoder projects into {encoder.config.latent_dim} dimensions, the CT CLIP's "
                            f"latent has {ctclip.model.config.latent_dim}: it was trained for another CT CLIP.")

    @classmethod
    def from_pretrained(cls, directory: str | Path | None = None, ctclip=None) -> "SpeechPipeline":
        """The speech encoder in `directory` (default settings.speech_dir()) with `ctclip` (default: the demo CT CLIP
        pipeline). A missing checkpoint is one sentence saying how to train it."""
        from engine.models.speech_encoder import SpeechEncoder

        directory = cls.checkpoint_dir(directory)
        if ctclip is None:
            from engine.pipelines.ctclip import CTClipPipeline

            ctclip = CTClipPipeline.from_pretrained(preset="demo")
        return cls(SpeechEncoder.from_pretrained(directory), ctclip, directory)

    @staticmethod
    def checkpoint_dir(directory: str | Path | None = None) -> Path:
        """The speech checkpoint folder (default settings.speech_dir()); a missing one is one sentence saying how to
        train it (callers ask before loading the CT CLIP, so the refusal is immediate)."""
        from engine.settings import speech_dir

        directory = Path(directory) if directory else speech_dir()
        if not (directory / "config.json").is_file():
            raise UserError(f"No speech encoder checkpoint in '{directory}': {TRAIN_HINT}.")
        return directory

    @staticmethod
    def check(audio: Audio) -> Audio:
        if audio.seconds < MIN_DICTATION_S:
            raise UserError(f"The recording lasts {audio.seconds:.2f} s; dictate at least {MIN_DICTATION_S:.0f} s.")
        return audio

    def embed_audio(self, audio: Audio, *, progress: ProgressCallback | None = None,
                    cancel: CancelSignal | None = None, cache=None) -> np.ndarray:
        """Unit latent (D,) float32 of a checked recording (windows encoded one by one, cancellable between)."""
        control = RunControl(progress, cancel)
        control.step(0.0, "encoding the dictation")
        latent = self.encoder.embed(self.check(audio).samples, cache=cache)
        control.step(1.0, "encoded")
        return latent

    def findings(self, latent: np.ndarray) -> dict[str, float]:
        """P(stated) of the 18 labels read from the speech latent against the CT CLIP's cached prompt latents by its
        prompt-feature reader (CTClipPipeline.text_reading_from_latent, source "speech": the speech latent is
        distilled from the text latent)."""
        return self.ctclip.text_reading_from_latent(latent, source="speech")


@dataclass
class Dictation:
    """One growing recording being dictated (16 kHz samples) and what its last ranking was made from."""
    pipeline: SpeechPipeline
    samples: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    embedded_samples: int = 0
    latent: np.ndarray | None = None

    def __post_init__(self):
        from engine.models.speech_encoder import StreamingCache

        self.cache = StreamingCache()

    @property
    def seconds(self) -> float:
        return self.samples.size / SAMPLE_RATE

    def add(self, chunk: np.ndarray) -> None:
        """Append 16 kHz mono float32 samples."""
        self.samples = np.concatenate([self.samples, np.asarray(chunk, np.float32)])

    def update(self, force: bool = False) -> np.ndarray | None:
        """A new latent when UPDATE_EVERY_S seconds arrived since the last one (or `force`, e.g. on stop) and the
        recording holds at least MIN_DICTATION_S; otherwise None."""
        new_s = (self.samples.size - self.embedded_samples) / SAMPLE_RATE
        if self.seconds < MIN_DICTATION_S or (new_s < UPDATE_EVERY_S and not force) or new_s <= 0:
            return None
        self.latent = self.pipeline.encoder.embed(self.samples, cache=self.cache)
        self.embedded_samples = self.samples.size
        return self.latent
