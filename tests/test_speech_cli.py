"""`python -m engine retrieve --audio` and `dictate`: the design note's JSON on real (espeak-ng) dictations, and one
sentence for recordings that cannot be answered. The speech encoder here is the untrained demo architecture (the
pretrained Whisper with a random head): these tests check the contract, not retrieval quality."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import soundfile

from engine.cli import main
from engine.labels import LABELS

REPORT = ("Findings: There is a moderate right pleural effusion with adjacent atelectasis. The heart is enlarged. "
          "Calcified plaques are seen in the coronary arteries and the thoracic aorta. There is a ten millimetre "
          "solid nodule in the left upper lobe. No lymphadenopathy. Impression: Right pleural effusion, "
          "cardiomegaly, coronary artery calcification and a left upper lobe nodule.")


@pytest.fixture(scope="module")
def speech_weights(tmp_path_factory):
    from engine.models.ctclip import CTCLIP
    from engine.models.speech_encoder import SpeechEncoder, SpeechEncoderConfig
    from engine.settings import ctclip_dir

    latent = CTCLIP.read_config(ctclip_dir()).latent_dim
    folder = tmp_path_factory.mktemp("speech") / "speech"
    SpeechEncoder.from_whisper(SpeechEncoderConfig.demo(latent), seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dictation(tmp_path_factory):
    """About 90 s of dictated report (espeak-ng, 16 kHz mono WAV) and its samples."""
    path = tmp_path_factory.mktemp("audio") / "report90.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "120", "-w", str(path), " ".join([REPORT] * 3)], check=True)
    samples, rate = soundfile.read(str(path), dtype="float32")
    return path, samples, rate


def run(capsys, *argv):
    status = main([*argv, "--json"])
    return status, json.loads(capsys.readouterr().out)


def test_ninety_second_dictation(capsys, dictation, speech_weights):
    path, samples, rate = dictation
    assert 70 < samples.size / rate < 120
    status, out = run(capsys, "retrieve", "--audio", str(path), "--k", "5", "--speech-weights", str(speech_weights))
    assert status == 0, out
    assert out["query"] == {"kind": "audio", "seconds": pytest.approx(samples.size / rate, abs=0.05)}
    assert len(out["results"]) == 5 and all({"id", "score", "labels", "report", "source"} <= set(r)
                                            for r in out["results"])
    scores = [r["score"] for r in out["results"]]
    assert scores == sorted(scores, reverse=True)
    assert list(out["findings"]) == list(LABELS) and all(0 <= p <= 1 for p in out["findings"].values())
    assert out["warnings"] == []


def test_stereo_48k_and_clipped(capsys, dictation, speech_weights, tmp_path):
    from math import gcd

    from scipy.signal import resample_poly

    _, samples, rate = dictation                                                  # espeak-ng writes 22050 Hz
    g = gcd(48000, rate)
    piece = resample_poly(samples[: 8 * rate], 48000 // g, rate // g).astype(np.float32)   # 8 s at 48 kHz
    stereo = tmp_path / "stereo48k.flac"
    soundfile.write(str(stereo), np.stack([piece, 0.5 * piece], axis=1), 48000)
    status, out = run(capsys, "retrieve", "--audio", str(stereo), "--speech-weights", str(speech_weights))
    assert status == 0 and out["query"]["seconds"] == pytest.approx(8.0, abs=0.05)
    clipped = tmp_path / "clipped.wav"
    soundfile.write(str(clipped), np.clip(samples[: 8 * rate] * 30, -1, 1), rate)
    status, out = run(capsys, "retrieve", "--audio", str(clipped), "--speech-weights", str(speech_weights))
    assert status == 0 and any("clipped" in w for w in out["warnings"])


def test_noise_is_answered_with_a_warning(capsys, speech_weights, tmp_path):
    noise = tmp_path / "noise.wav"
    soundfile.write(str(noise), np.random.default_rng(0).normal(0, 0.1, 5 * 16000).astype(np.float32), 16000)
    status, out = run(capsys, "retrieve", "--audio", str(noise), "--speech-weights", str(speech_weights))
    assert status == 0 and any("noise or music" in w for w in out["warnings"])


def music(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    """Stereo music (rate Hz): a piano-like melody, 4 decaying notes a second with 3 harmonics, over a held A major
    chord."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    chord = sum(0.08 * np.sin(2 * np.pi * f * t) for f in (220.0, 277.18, 329.63))
    melody, note = np.zeros_like(t), rate // 4
    scale = 440.0 * 2 ** (np.array([0, 2, 4, 5, 7, 9, 11, 12]) / 12)
    for start in range(0, t.size, note):
        f, tt = scale[rng.integers(len(scale))], t[: min(note, t.size - start)]
        harmonics = sum(0.25 / h * np.sin(2 * np.pi * f * h * tt) for h in (1, 2, 3))
        melody[start:start + tt.size] = harmonics * np.exp(-6 * tt)
    return np.stack([chord + melody] * 2, axis=1).astype(np.float32)


def test_music_is_answered_with_a_warning(capsys, speech_weights, tmp_path):
    path = tmp_path / "music.ogg"                                       # Ogg Vorbis, 44.1 kHz stereo
    soundfile.write(str(path), music(8.0, 44100), 44100, format="OGG", subtype="VORBIS")
    status, out = run(capsys, "retrieve", "--audio", str(path), "--k", "3", "--speech-weights", str(speech_weights))
    assert status == 0 and len(out["results"]) == 3, out
    assert out["query"]["seconds"] == pytest.approx(8.0, abs=0.05)
    assert any("noise or music" in w for w in out["warnings"]), out["warnings"]


@pytest.mark.parametrize("kind, expected", [("short", "at least 1 s"), ("silent", "silent"),
                                            ("corrupt", "could not be decoded")])
def test_unanswerable_recordings_are_one_sentence(capsys, tmp_path, kind, expected):
    path = tmp_path / f"{kind}.wav"
    if kind == "short":
        soundfile.write(str(path), 0.3 * np.sin(np.arange(8000) / 5.0).astype(np.float32), 16000)
    elif kind == "silent":
        soundfile.write(str(path), np.zeros(3 * 16000, np.float32), 16000)
    else:
        path.write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage" * 20)
    status, out = run(capsys, "retrieve", "--audio", str(path))
    assert status == 2 and expected in out["error"] and out["error"].count(".") <= 2


def test_missing_checkpoint_says_how_to_train(capsys, dictation, tmp_path):
    status, out = run(capsys, "retrieve", "--audio", str(dictation[0]), "--speech-weights", str(tmp_path / "none"))
    assert status == 2 and "python -m training speech --preset demo" in out["error"]


def test_dictate_without_a_microphone(capsys):
    status, out = run(capsys, "dictate", "--seconds", "2")
    assert status == 2 and "No microphone" in out["error"]
