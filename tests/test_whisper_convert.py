"""engine/convert/whisper.py: the offline CTranslate2 Whisper converted into transformers' layout.

The converted encoder must give CTranslate2's own encoder output on real (espeak-ng) speech, the converted model
must transcribe a sentence through transformers' generate, and conversion happens once per cache folder."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch

from engine.audio import read_audio
from engine.convert.whisper import (map_ctranslate2_whisper, offline_whisper_dir, offline_whisper_source,
                                    read_ctranslate2, read_model_bin)
from engine.errors import UserError


def espeak(path, text: str):
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "140", "-w", str(path), text], check=True)
    return read_audio(path)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """tiny.en converted into a fresh cache folder (the conversion under test)."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CT_WORKSTATION_CACHE", str(cache))
        folder = offline_whisper_dir("tiny.en")
        assert folder == cache / "whisper" / "tiny.en"
        stamp = (folder / "model.safetensors").stat().st_mtime_ns
        assert offline_whisper_dir("tiny.en") == folder  # second call: reused, not converted again
        assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    return folder


def test_encoder_matches_ctranslate2(converted, tmp_path):
    ctranslate2 = pytest.importorskip("ctranslate2")
    from transformers import WhisperFeatureExtractor, WhisperModel

    audio = espeak(tmp_path / "s.wav", "There is a small right pleural effusion.")
    features = WhisperFeatureExtractor.from_pretrained(converted)(
        audio.samples, sampling_rate=16000, return_tensors="np").input_features
    model = WhisperModel.from_pretrained(converted, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = model.encoder(torch.from_numpy(features)).last_hidden_state[0].numpy()
    source, _ = offline_whisper_source("tiny.en")
    reference = ctranslate2.models.Whisper(str(source), device="cpu", compute_type="float32")
    theirs = np.array(reference.encode(ctranslate2.StorageView.from_array(features))).reshape(ours.shape)
    assert ours.shape == (1500, 384)
    cosine = (ours * theirs).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(theirs, axis=-1)
    assert cosine.min() > 0.9999
    assert np.abs(ours - theirs).max() < 1e-3


def test_converted_model_transcribes(converted, tmp_path):
    from transformers import PreTrainedTokenizerFast, WhisperFeatureExtractor, WhisperForConditionalGeneration

    audio = espeak(tmp_path / "s.wav", "The heart is enlarged.")
    features = WhisperFeatureExtractor.from_pretrained(converted)(
        audio.samples, sampling_rate=16000, return_tensors="pt").input_features
    model = WhisperForConditionalGeneration.from_pretrained(converted, dtype=torch.float32).eval()
    tokens = model.generate(features, max_new_tokens=20)
    text = PreTrainedTokenizerFast(tokenizer_file=str(converted / "tokenizer.json")).decode(
        tokens[0], skip_special_tokens=True)
    assert text.strip().lower().rstrip(".") == "the heart is enlarged"


def test_every_variable_has_a_fate():
    folder, parts = offline_whisper_source("tiny.en")
    meta, variables = read_ctranslate2(read_model_bin(folder, parts))
    assert meta["spec"] == "WhisperSpec"
    state, fate = map_ctranslate2_whisper(variables, d_model=384)
    assert set(fate) == set(variables)
    # fused q/k/v split in three; Whisper's key projection has no bias
    assert state["model.encoder.layers.0.self_attn.k_proj.weight"].shape == (384, 384)
    assert "model.encoder.layers.0.self_attn.k_proj.bias" not in state
    assert torch.equal(state["model.encoder.layers.0.self_attn.v_proj.weight"],
                       torch.from_numpy(variables["encoder/layer_0/self_attention/linear_0/weight"][768:].astype(np.float32)))


def test_damaged_file_is_one_sentence():
    folder, parts = offline_whisper_source("tiny.en")
    data = read_model_bin(folder, parts)
    with pytest.raises(UserError, match="not a CTranslate2 model file"):
        read_ctranslate2(data[: len(data) // 3])
