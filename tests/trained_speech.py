"""Shared by the tests that need the TRAINED speech encoder (engine.settings.speech_dir(): assets/speech unless
$CT_SPEECH_DIR says otherwise): they skip with one line while no checkpoint is shipped, and they judge retrieval by
the labels the retrieved studies share with the dictated report, against what a random draw from the same library
shares (never against a threshold tuned to one checkpoint)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

SKIP_REASON = ("no trained speech encoder in {folder} (shipped as assets/speech; "
               "'python -m training speech --preset demo' trains one)")


def trained_speech_dir() -> Path:
    """The speech checkpoint folder, or skip the calling test with one line."""
    from engine.settings import speech_dir

    folder = speech_dir()
    if not (folder / "config.json").is_file():
        pytest.skip(SKIP_REASON.format(folder=folder))
    return folder


def espeak_wav(text: str, path: Path, words_per_minute: int = 140, voice: str = "en-us") -> Path:
    """`text` read by espeak-ng into a WAV file (22050 Hz mono, espeak's own rate)."""
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(words_per_minute), "-w", str(path), text], check=True)
    return path


def shared_labels(query: set[str], studies: list[set[str]]) -> np.ndarray:
    """Per study: how many of the query's labels it carries."""
    return np.array([len(query & study) for study in studies], dtype=float)


def chance_shared_labels(query: set[str], library: list[set[str]]) -> float:
    """The expected mean of shared_labels over a random 10 (any size) drawn from `library`: its mean over all."""
    return float(shared_labels(query, library).mean())
