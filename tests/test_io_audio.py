"""Audio reading on speech synthesised by espeak-ng and converted by ffmpeg to the formats users and browsers produce
(FLAC, OGG/Vorbis, OGG/Opus, WebM/Opus, 44.1 kHz stereo WAV, 8 kHz WAV), raw bytes, and Gradio's (rate, int16)."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import soundfile

from engine.audio import SAMPLE_RATE, read_audio, rms_dbfs, split_windows

TEXT = "Findings: the lungs are clear. There is no pleural effusion. The heart size is normal."

pytestmark = pytest.mark.skipif(not (shutil.which("espeak-ng") and shutil.which("ffmpeg")),
                                reason="espeak-ng and ffmpeg are needed to make test speech (make test-env)")

CONVERSIONS = {                                       # name -> ffmpeg output options
    "speech.flac": ["-c:a", "flac"],
    "speech_vorbis.ogg": ["-c:a", "libvorbis"],
    "speech_opus.ogg": ["-c:a", "libopus", "-b:a", "32k"],
    "speech.webm": ["-c:a", "libopus", "-b:a", "32k"],  # what MediaRecorder writes in Chrome/Firefox
    "speech_44k_stereo.wav": ["-ar", "44100", "-ac", "2"],
    "speech_8k.wav": ["-ar", "8000"],
    "speech_48k_stereo.flac": ["-ar", "48000", "-ac", "2", "-c:a", "flac"],
}


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    folder = tmp_path_factory.mktemp("speech")
    wav = folder / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), TEXT], check=True, capture_output=True)
    for name, options in CONVERSIONS.items():
        subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-i", str(wav), *options,
                        str(folder / name)], check=True)
    return folder


def source_seconds(speech) -> float:
    info = soundfile.info(str(speech / "speech.wav"))
    return info.frames / info.samplerate


def test_wav_from_espeak(speech):
    audio = read_audio(speech / "speech.wav")
    assert audio.sample_rate == SAMPLE_RATE == 16000
    assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert audio.seconds == pytest.approx(source_seconds(speech), abs=1e-3) and audio.seconds > 3
    assert audio.samples.size == round(audio.seconds * 16000)
    assert -40 < rms_dbfs(audio.samples) < -3 and np.abs(audio.samples).max() <= 1.0


@pytest.mark.parametrize("name", sorted(CONVERSIONS))
def test_every_format_decodes_to_the_same_speech(speech, name):
    reference = read_audio(speech / "speech.wav")
    audio = read_audio(speech / name)
    assert audio.sample_rate == 16000 and audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert audio.seconds == pytest.approx(reference.seconds, abs=0.03)   # codec padding is trimmed
    assert abs(rms_dbfs(audio.samples) - rms_dbfs(reference.samples)) < 1.0
    n = min(audio.samples.size, reference.samples.size)
    if name.endswith(".flac") and "48k" not in name:
        np.testing.assert_allclose(audio.samples[:n], reference.samples[:n], atol=1e-4)   # lossless
    else:  # lossy or resampled twice: the same waveform up to small differences
        envelope = [np.convolve(np.abs(x[:n]), np.ones(400) / 400, "valid") for x in (audio.samples, reference.samples)]
        assert np.corrcoef(*envelope)[0, 1] > 0.95


def test_bytes_upload_like_a_browser(speech):
    audio = read_audio((speech / "speech.webm").read_bytes())
    assert audio.seconds == pytest.approx(source_seconds(speech), abs=0.03) and audio.source == "upload"


def test_gradio_microphone_tuple(speech):
    data, rate = soundfile.read(str(speech / "speech_44k_stereo.wav"), dtype="int16")
    assert data.ndim == 2 and rate == 44100
    audio = read_audio((rate, data))                               # what gr.Audio(type="numpy") hands over
    reference = read_audio(speech / "speech.wav")
    assert audio.seconds == pytest.approx(reference.seconds, abs=1e-3)
    channel_mean = data.mean(axis=1) / 32768                     # arrays are downmixed by averaging channels
    assert abs(rms_dbfs(audio.samples) - rms_dbfs(channel_mean)) < 0.2
    mono_float = read_audio(data.mean(axis=1).astype(np.float32) / 32768, rate=rate)
    np.testing.assert_allclose(mono_float.samples, audio.samples, atol=1e-4)


@pytest.mark.parametrize("seconds, expected", [(0.5, [0.5]), (30.0, [30.0]), (31.0, [30.0, 3.0]),
                                               (65.0, [30.0, 30.0, 9.0])])
def test_split_windows(seconds, expected):
    samples = np.arange(int(seconds * 16000), dtype=np.float32)
    windows = split_windows(samples, rate=16000, window_s=30.0, overlap_s=2.0)
    assert [len(w) / 16000 for w in windows] == expected
    for i, window in enumerate(windows):                           # start every 28 s: 2 s shared with the previous
        assert window[0] == i * 28 * 16000
    assert windows[-1][-1] == samples[-1]
    assert split_windows(np.zeros(0, np.float32)) == []
