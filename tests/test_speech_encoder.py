"""engine/models/speech_encoder.py on real (espeak-ng) speech with the offline Whisper tiny.en."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch

from engine.audio import read_audio
from engine.models.speech_encoder import SpeechEncoder, SpeechEncoderConfig, StreamingCache


@pytest.fixture(scope="module")
def encoder():
    return SpeechEncoder.from_whisper(SpeechEncoderConfig.demo(latent_dim=32), seed=0).eval()


@pytest.fixture(scope="module")
def sentence(tmp_path_factory):
    path = tmp_path_factory.mktemp("speech") / "s.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "140", "-w", str(path),
                    "Bilateral pleural effusion. The heart is enlarged."], check=True)
    return read_audio(path).samples


def test_padded_path_is_transformers_whisper(encoder, sentence):
    """spoken_frames_only=False runs exactly transformers' WhisperEncoder (the paper preset's path)."""
    window = encoder.window(sentence)
    encoder.config.spoken_frames_only = False
    try:
        with torch.no_grad():
            ours = encoder.run_encoder(window)
            theirs = encoder.whisper(window.mel[None]).last_hidden_state[0]
    finally:
        encoder.config.spoken_frames_only = True
    assert ours.shape == (1500, 384)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_spoken_frames_and_windows(encoder):
    """20 ms per encoder frame: 9 s -> 450 frames; 65 s -> windows at 0, 28, 56 s (30, 30, 9 s)."""
    samples = np.zeros(65 * 16000, dtype=np.float32)
    windows = encoder.windows(samples)
    assert [w.spoken_frames for w in windows] == [1500, 1500, 450]
    assert all(w.mel.shape == (80, 3000) for w in windows)
    with torch.no_grad():
        hidden = encoder.run_encoder(windows[2])
    assert hidden.shape == (450, 384)  # the demo encodes the spoken frames only


def test_what_is_trainable(encoder):
    """Demo: Whisper frozen whole, the attention pooling and the head train; paper: the top 2 layers too."""
    from dataclasses import replace

    trainable = {n.split(".")[0] for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable == {"pool_queries", "pool_attention", "to_latent"}
    assert encoder.to_latent.in_features == 4 * 384           # 4 learned queries, each a 384-d output
    paper_like = SpeechEncoder.from_whisper(replace(encoder.config, trainable_layers=2, pooling="mean"), seed=0)
    layers = {int(n.split(".")[2]) for n, p in paper_like.named_parameters() if p.requires_grad and ".layers." in n}
    assert layers == {2, 3} and not paper_like.whisper.conv1.weight.requires_grad


def test_attention_pooling_reads_only_the_spoken_frames(encoder, sentence):
    window = encoder.window(sentence)
    with torch.no_grad():
        hidden = encoder.run_encoder(window)
        pooled = encoder.pool(hidden, window)
        assert pooled.shape == (4 * 384,)
        padded = torch.cat([hidden, 100 * torch.randn(50, hidden.shape[1])])   # frames past the spoken ones
        assert torch.equal(encoder.pool(padded, window), pooled)
        # the frames' order carries nothing here (no positions in the pooling), their content does
        assert torch.allclose(encoder.pool(hidden.flip(0), window), pooled, atol=1e-5)
        first_half = encoder.pool(hidden, type(window)(mel=window.mel, spoken_frames=window.spoken_frames // 2))
        assert not torch.allclose(first_half, pooled, atol=1e-3)


def test_streaming_cache_gives_the_same_latent(encoder, sentence):
    """A 33 s recording (two windows): the cached first window gives the latent of a fresh pass, and a growing
    recording reuses it."""
    reps = int(np.ceil(33 * 16000 / sentence.size))
    long = np.tile(sentence, reps)[: 33 * 16000]
    cache = StreamingCache()
    first = encoder.embed(long[: 31 * 16000], cache=cache)
    assert set(cache.latents) == {0}
    cached_window = cache.latents[0]
    streamed = encoder.embed(long, cache=cache)
    assert cache.latents[0] is cached_window
    fresh = encoder.embed(long)
    np.testing.assert_allclose(streamed, fresh, atol=1e-5)
    assert np.isclose(np.linalg.norm(fresh), 1.0, atol=1e-5)
    assert not np.allclose(first, fresh, atol=1e-3)  # the last window changed


def test_round_trip(encoder, sentence, tmp_path):
    encoder.save_pretrained(tmp_path / "speech")
    loaded = SpeechEncoder.from_pretrained(tmp_path / "speech")
    assert loaded.config == encoder.config
    np.testing.assert_allclose(loaded.embed(sentence), encoder.embed(sentence), atol=2e-3)
