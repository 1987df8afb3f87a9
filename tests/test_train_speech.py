"""training/train_speech.py: the loss, the cached Whisper prefix and what is trained, on real espeak-ng speech."""
from __future__ import annotations

import subprocess

import pytest
import torch
import torch.nn.functional as F

from engine.audio import read_audio
from engine.models.losses import symmetric_infonce
from engine.models.speech_encoder import SpeechEncoder, SpeechEncoderConfig
from training.train_speech import SpeechStep, SpeechTrainConfig, WhisperPrefixCache, make_optimizer_factory

SENTENCES = ["Right pleural effusion.", "The heart is enlarged.", "Emphysema in both upper lobes."]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    out = {}
    for i, text in enumerate(SENTENCES):
        path = folder / f"{i}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "140", "-w", str(path), text], check=True)
        out[f"clip{i}"] = read_audio(path).samples
    return out


@pytest.fixture(scope="module")
def model():
    return SpeechEncoder.from_whisper(SpeechEncoderConfig.demo(latent_dim=16), seed=0)


def test_cached_prefix_gives_the_full_pass(model, clips, tmp_path):
    cache = WhisperPrefixCache(model, tmp_path)
    windows = cache.get("clip0", lambda: clips["clip0"])
    again = cache.get("clip0", lambda: pytest.fail("the prefix must come from the cache"))
    assert torch.equal(windows[0][0], again[0][0]) and windows[0][1] == again[0][1]
    step = SpeechStep(model, logit_scale=10.0, distill_weight=1.0).eval()
    with torch.no_grad():
        from_cache = step.audio_latents([windows])[0]
        full = torch.from_numpy(model.embed(clips["clip0"]))
    assert torch.allclose(from_cache, full, atol=2e-3)  # float16 storage of the prefix


def test_loss_is_contrastive_plus_distillation(model, clips, tmp_path):
    cache = WhisperPrefixCache(model, tmp_path)
    batch = [cache.get(k, lambda k=k: clips[k]) for k in clips]
    ct = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    text = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    with torch.no_grad():
        audio = SpeechStep(model, 10.0, 0.0).audio_latents(batch)
        plain, logs = SpeechStep(model, 10.0, 0.0)(batch, ct, text)
        distilled, _ = SpeechStep(model, 10.0, 0.5)(batch, ct, text)
    expected_contrastive = symmetric_infonce(10.0 * audio @ ct.T)
    expected_distill = (1 - (audio * text).sum(-1)).mean()
    assert torch.allclose(plain, expected_contrastive, atol=1e-5)
    assert torch.allclose(distilled, expected_contrastive + 0.5 * expected_distill, atol=1e-5)
    assert torch.allclose(logs["distill"], expected_distill, atol=1e-5)


def test_only_the_top_is_trained(model, clips, tmp_path):
    cache = WhisperPrefixCache(model, tmp_path)
    batch = [cache.get(k, lambda k=k: clips[k]) for k in clips]
    ct = F.normalize(torch.randn(3, 16), dim=-1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = make_optimizer_factory(model, SpeechTrainConfig(lr=1e-3))()
    loss, _ = SpeechStep(model, 10.0, 1.0)(batch, ct, ct)
    loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "to_latent.weight" in changed and any(n.startswith("whisper.layers.3.") for n in changed)
    assert not any(n.startswith(("whisper.layers.0.", "whisper.layers.1.", "whisper.conv")) for n in changed)
