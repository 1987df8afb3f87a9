"""Audio for dictated reports: any recording -> float32 mono samples at 16 kHz, and 30 s windows for the speech encoder.

`read_audio` takes a file path, raw bytes (an upload) or a numpy array with its rate (Gradio's microphone hands
(rate, int16 array)). Files (WAV, FLAC, OGG/Vorbis, OGG/Opus, WebM/Opus as browsers' MediaRecorder writes, MP3, ...)
are decoded and resampled to 16 kHz mono by PyAV (FFmpeg's decoders and libswresample); arrays are converted to
float in [-1, 1], averaged over channels (files are downmixed by libswresample's default matrix) and resampled
with scipy.signal.resample_poly (polyphase, anti-aliased).
Refused with one sentence (UserError): not audio, empty, shorter than MIN_SECONDS, longer than MAX_SECONDS, or
silent, i.e. an RMS level below SILENCE_DBFS (-60 dBFS; normal speech into a microphone is about -35..-15 dBFS, a
muted or disconnected microphone below -70 dBFS).

`split_windows` cuts long recordings the way SpeechCT-CLIP does: 30 s windows with 2 s overlap (hop 28 s); the last
window may be shorter; each window is encoded and the embeddings averaged (by the caller).
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from math import gcd
from pathlib import Path

import numpy as np

from engine.errors import UserError

SAMPLE_RATE = 16000        # Hz, what Whisper's feature extractor expects
MIN_SECONDS = 0.1          # shorter recordings hold no word
MAX_SECONDS = 600.0        # 10 minutes; a dictated chest CT report takes 1-3 minutes
SILENCE_DBFS = -60.0       # RMS level (dB relative to full scale) below which a recording counts as silent
MIN_SAMPLE_RATE = 8000     # Hz; telephone speech, the lowest rate that still carries words
CLIPPED_SHARE = 0.01       # share of samples at full scale (|x| >= 0.999) above which a recording is called clipped


@dataclass
class Audio:
    """Mono float32 samples in [-1, 1] at `sample_rate` Hz (always 16000) and the duration in seconds."""
    samples: np.ndarray
    sample_rate: int = SAMPLE_RATE
    seconds: float = 0.0
    source: str = ""
    warnings: list[str] = field(default_factory=list)


def read_audio(source, rate: int | None = None) -> Audio:
    """Decode `source` to 16 kHz mono float32.

    `source`: a path (str/Path), bytes/bytearray (a whole file), a numpy array together with `rate` (Hz), or a
    (rate, array) tuple as Gradio's microphone gives. Array layout: (n,) or (n, channels) (or (channels, n) when
    channels <= 8 < n); int16/int32/uint8 are scaled to [-1, 1], float taken as is.
    """
    if isinstance(source, tuple) and len(source) == 2 and np.isscalar(source[0]):
        rate, source = source
    if isinstance(source, np.ndarray):
        if not rate or rate <= 0:
            raise UserError("An audio array needs its sample rate in Hz.")
        shown, origin = "from the microphone", "microphone"
        _check_rate(int(rate), shown)
        samples = _from_array(source, int(rate))
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise UserError("The uploaded audio is empty.")
        shown, origin = "'upload'", "upload"
        samples, rate = _decode(io.BytesIO(bytes(source)), shown)
    else:
        path = Path(source)
        if path.is_dir():
            raise UserError(f"The audio path {path.name!r} is a folder, not a recording.")
        if not path.is_file():
            raise UserError(f"The audio file {path.name!r} does not exist.")
        if path.stat().st_size == 0:
            raise UserError(f"The audio file {path.name!r} is empty.")
        shown = repr(path.name)
        (samples, rate), origin = _decode(str(path), shown), str(path)
    return _checked(samples, shown, origin, int(rate))


def _check_rate(rate: int, shown: str) -> None:
    if rate < MIN_SAMPLE_RATE:
        raise UserError(f"The recording {shown} has a sample rate of {rate} Hz; speech needs at least "
                        f"{MIN_SAMPLE_RATE} Hz.")


def _checked(samples: np.ndarray, shown: str, origin: str, rate: int) -> Audio:
    """Refuse recordings that hold non-numbers, are too short or silent; clip to [-1, 1]; warn about a low source
    rate (`rate`, Hz, before resampling) and clipping."""
    samples = samples.astype(np.float32, copy=False)
    finite = np.isfinite(samples)
    if not finite.all():
        bad = np.count_nonzero(~finite)
        what = "no numbers at all" if not finite.any() else f"{bad:,} samples that are not numbers"
        raise UserError(f"The recording {shown} holds {what} (NaN or infinity), so it is damaged.")
    samples = np.clip(samples, -1.0, 1.0)
    seconds = samples.size / SAMPLE_RATE
    if seconds < MIN_SECONDS:
        raise UserError(f"The recording {shown} lasts {seconds:.2f} s, too short to hold speech.")
    level = rms_dbfs(samples)
    if level < SILENCE_DBFS:
        raise UserError(f"The recording {shown} is silent (its level is below {SILENCE_DBFS:.0f} dBFS); "
                        "check the microphone.")
    warnings = []
    if rate < SAMPLE_RATE:
        warnings.append(f"The recording was made at {rate} Hz, below the {SAMPLE_RATE} Hz the speech model hears; "
                        "it was upsampled, so high frequencies are missing.")
    clipped = float(np.mean(np.abs(samples) >= 0.999))
    if clipped > CLIPPED_SHARE:
        warnings.append(f"The recording is clipped ({clipped:.1%} of its samples are at full scale), so words may "
                        "be distorted.")
    return Audio(samples=np.ascontiguousarray(samples), sample_rate=SAMPLE_RATE, seconds=seconds, source=origin,
                 warnings=warnings)


def rms_dbfs(samples: np.ndarray) -> float:
    """Root-mean-square level in dB relative to full scale (a full-scale sine is -3 dBFS); -inf-safe (>= -200)."""
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if samples.size else 0.0
    return 20.0 * np.log10(max(rms, 1e-10))


# --------------------------------------------------------------------------------------------------------- decoding

def _decode(file, shown: str) -> tuple[np.ndarray, int]:
    """PyAV: the first audio stream, resampled by libswresample to 16 kHz mono float32, at most MAX_SECONDS.
    Returns (samples, the stream's own sample rate in Hz)."""
    import av

    limit = int(MAX_SECONDS * SAMPLE_RATE)
    chunks, total = [], 0
    try:
        with av.open(file, mode="r") as container:
            if not container.streams.audio:
                raise UserError(f"The file {shown} holds no audio stream.")
            stream = container.streams.audio[0]
            source_rate = int(stream.rate or stream.codec_context.sample_rate or 0)
            if (stream.codec_context.channels or 0) < 1:
                raise UserError(f"The file {shown} holds an audio stream with no channels.")
            _check_rate(source_rate, shown)
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    total += chunks[-1].size
                if total > limit:
                    raise UserError(f"The recording {shown} is longer than {MAX_SECONDS / 60:.0f} minutes.")
            for out in resampler.resample(None):  # flush the resampler's delay line
                chunks.append(out.to_ndarray().reshape(-1))
    except UserError:
        raise
    except (av.FFmpegError, ValueError, EOFError, OSError):
        raise UserError(f"The file {shown} could not be decoded as audio.") from None
    return (np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)), source_rate


def _from_array(array: np.ndarray, rate: int) -> np.ndarray:
    """Integer or float samples, any channel layout and rate -> 16 kHz mono float32."""
    from scipy.signal import resample_poly

    array = np.asarray(array)
    if array.ndim == 2 and array.shape[0] <= 8 < array.shape[1]:
        array = array.T                               # (channels, n) -> (n, channels)
    if array.ndim not in (1, 2) or array.size == 0:
        if array.size == 0:
            raise UserError("The recording is empty (0 seconds).")
        raise UserError("The audio array must be (samples,) or (samples, channels).")
    if array.dtype.kind == "u":
        half = 2.0 ** (8 * array.dtype.itemsize - 1)
        floats = (array.astype(np.float64) - half) / half
    elif array.dtype.kind == "i":
        floats = array.astype(np.float64) / 2.0 ** (8 * array.dtype.itemsize - 1)
    elif array.dtype.kind == "f":
        floats = array.astype(np.float64)
    else:
        raise UserError("The audio array must hold integer or float samples.")
    if floats.ndim == 2:
        floats = floats.mean(axis=1)
    if floats.size > MAX_SECONDS * rate:
        raise UserError(f"The recording is longer than {MAX_SECONDS / 60:.0f} minutes.")
    if rate != SAMPLE_RATE:
        g = gcd(rate, SAMPLE_RATE)
        floats = resample_poly(floats, SAMPLE_RATE // g, rate // g)
    return floats.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------- windows

def split_windows(samples: np.ndarray, rate: int = SAMPLE_RATE, window_s: float = 30.0,
                  overlap_s: float = 2.0) -> list[np.ndarray]:
    """Cut samples into windows of `window_s` seconds starting every `window_s - overlap_s` seconds (SpeechCT-CLIP:
    30 s, 2 s overlap). Windows start at 0, 28, 56, ... s until one reaches the end; that last one may be shorter.
    0.5 s -> [0.5 s]; 30 s -> [30 s]; 31 s -> [30 s, 3 s]; 65 s -> [30 s, 30 s, 9 s]. Empty input -> []."""
    window, hop = int(round(window_s * rate)), int(round((window_s - overlap_s) * rate))
    if window <= 0 or hop <= 0:
        raise ValueError("window_s must be positive and larger than overlap_s")
    windows, start = [], 0
    while start < len(samples):
        windows.append(samples[start:start + window])
        if start + window >= len(samples):
            break
        start += hop
    return windows
