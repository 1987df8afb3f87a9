"""app/dictate_tab.py's handlers on a real (espeak-ng) dictation streamed in 1 s microphone chunks (int16, 48 kHz as
browsers record): no ranking before 3 s of speech, a ranking at least every 3 s while speaking, a final one on stop.
The speech encoder is the untrained demo architecture (the contract, not retrieval quality)."""
from __future__ import annotations

import subprocess

import gradio as gr
import numpy as np
import pytest
import soundfile

from app.dictate_tab import on_chunk, on_upload
from app.models import CTClipModels, SpeechModels


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from engine.models.ctclip import CTCLIP
    from engine.models.speech_encoder import SpeechEncoder, SpeechEncoderConfig
    from engine.settings import ctclip_dir

    folder = tmp_path_factory.mktemp("speech") / "speech"
    latent = CTCLIP.read_config(ctclip_dir()).latent_dim
    SpeechEncoder.from_whisper(SpeechEncoderConfig.demo(latent), seed=0).save_pretrained(folder)
    ctclip = CTClipModels(preset="demo")
    return ctclip, SpeechModels(ctclip, weights=str(folder))


@pytest.fixture(scope="module")
def microphone(tmp_path_factory):
    """About 8 s of dictation as 48 kHz int16 chunks of 1 s."""
    from math import gcd

    from scipy.signal import resample_poly

    path = tmp_path_factory.mktemp("mic") / "d.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "140", "-w", str(path),
                    "Right pleural effusion. The heart is enlarged. Emphysema in both upper lobes."], check=True)
    samples, rate = soundfile.read(str(path), dtype="float32")
    g = gcd(48000, rate)
    pcm = (resample_poly(samples, 48000 // g, rate // g) * 20000).astype(np.int16)
    return path, [pcm[i:i + 48000] for i in range(0, pcm.size, 48000)]


def test_streaming_updates_and_final(models, microphone):
    ctclip, speech = models
    _, chunks = microphone
    session, updates = None, []
    for i, chunk in enumerate(chunks, 1):
        table, found, figure, status, session = on_chunk((48000, chunk), session, 5, speech, ctclip)
        if not isinstance(found, type(gr.skip())):
            updates.append(i)
            assert len(found) == 5 and len(table) == 5
    assert updates and updates[0] == 3                    # first ranking after 3 s
    assert all(b - a <= 3 for a, b in zip([0] + updates, updates + [len(chunks)]))  # then at least every 3 s
    table, found, figure, status, session = on_chunk(None, session, 5, speech, ctclip, final=True)
    assert status.startswith("Final ranking") and len(found) == 5
    assert len(figure.data[0].y) == 18                     # the 18 findings read from the speech


def test_upload_gives_the_final_ranking(models, microphone):
    ctclip, speech = models
    path, _ = microphone
    table, found, _, status = on_upload(str(path), 3, speech, ctclip)
    assert len(found) == 3 and status.startswith("Final ranking")


def test_without_checkpoint_one_sentence(tmp_path):
    speech = SpeechModels(CTClipModels(preset="demo"), weights=str(tmp_path / "none"))
    assert "python -m training speech --preset demo" in speech.unavailable()
