"""What a report (or a dictation) states, read from its latent (engine/text_reading.py, training/ctclip_text_reading.py):
the prompt features by hand, the per-label fit on a known logistic model, the file and its refusals, and the shipped
CT CLIP's reader on reports it never saw (written fresh by the report writer, so their labels are known exactly).

Checkpoint copies are folders of symlinks to assets/ctclip's files (nothing is written into assets/)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.labels import LABELS
from engine.settings import ctclip_dir
from engine.text_reading import (TEXT_LATENT_READING, TEXT_READING_JSON, LatentReader, TextReader,
                                 fit_latent_reader, fit_text_reader, prompt_features)

PROMPTS = [f"prompt {i}" for i in range(36)]


def test_prompt_features_are_scaled_cosines_in_prompt_order():
    """Two unit latents against a (18, 2, 4) prompt table whose first pair is e0 / e1: features 0 and 1 are
    scale * cos to them, in all_zero_shot_prompts() order (label by label, present then not present)."""
    table = np.zeros((len(LABELS), 2, 4))
    table[0, 0, 0] = table[0, 1, 1] = 1.0
    table[1:, :, 3] = 1.0
    latents = np.array([[1.0, 0.0, 0.0, 0.0], [0.6, 0.8, 0.0, 0.0]])
    features = prompt_features(latents, table, scale=10.0)
    assert features.shape == (2, 36)
    np.testing.assert_allclose(features[:, :2], [[10.0, 0.0], [6.0, 8.0]])
    np.testing.assert_allclose(features[:, 2:], 0.0)
    np.testing.assert_allclose(prompt_features(latents[0], table, 10.0), features[:1])    # one latent -> (1, 36)


def test_fit_recovers_a_known_logistic_model_per_label():
    """Label 0 is drawn as Bernoulli(sigmoid(1.5 x0 - 2)) of feature 0 and label 1 as Bernoulli(sigmoid(-x5 + x7 + 1))
    of features 5 and 7 (a label read from other labels' prompts); the others never occur. With 20 000 texts (36
    standard-normal features each) the fit finds those weights within sampling error and about zero elsewhere; a
    label never seen gets zero weights and the log-odds of (0 + 0.5) / (20 000 + 1), whatever its features."""
    rng = np.random.default_rng(0)
    n = 20_000
    x = rng.standard_normal((n, 36))
    labels = np.zeros((n, len(LABELS)), dtype=np.int64)
    labels[:, 0] = rng.random(n) < 1 / (1 + np.exp(-(1.5 * x[:, 0] - 2.0)))
    labels[:, 1] = rng.random(n) < 1 / (1 + np.exp(-(-x[:, 5] + x[:, 7] + 1.0)))
    reader = fit_text_reader(x, labels, PROMPTS, info={"model_id": "m"})
    assert reader.weights[0, 0] == pytest.approx(1.5, abs=0.1) and reader.intercepts[0] == pytest.approx(-2.0, abs=0.1)
    assert np.abs(np.delete(reader.weights[0], 0)).max() < 0.1
    assert reader.weights[1, 5] == pytest.approx(-1.0, abs=0.08) and reader.weights[1, 7] == pytest.approx(1.0, abs=0.08)
    assert reader.intercepts[1] == pytest.approx(1.0, abs=0.08)
    np.testing.assert_allclose(reader.weights[2:], 0.0)
    np.testing.assert_allclose(reader.intercepts[2:], np.log(0.5 / (n + 0.5)))
    at_the_line = np.zeros(36)
    at_the_line[0] = 4 / 3                                     # 1.5 * 4/3 - 2 = 0: P = 0.5
    probs = reader.probabilities(at_the_line)[0]
    assert probs[0] == pytest.approx(0.5, abs=0.03) and probs[2] < 1e-4
    assert reader.info["n_fit"] == n and reader.info["model_id"] == "m"


def test_reader_file_round_trip_and_refusals(tmp_path):
    rng = np.random.default_rng(1)
    reader = TextReader(weights=rng.standard_normal((len(LABELS), 36)), intercepts=rng.standard_normal(len(LABELS)),
                        prompts=PROMPTS, info={"model_id": "ct-a"})
    reader.save(tmp_path)
    loaded = TextReader.load(tmp_path, "ct-a", PROMPTS)
    np.testing.assert_allclose(loaded.weights, reader.weights)
    np.testing.assert_allclose(loaded.intercepts, reader.intercepts)
    x = rng.standard_normal((3, 36))
    np.testing.assert_allclose(loaded.probabilities(x), 1 / (1 + np.exp(-(x @ reader.weights.T + reader.intercepts))))
    assert TextReader.load(tmp_path, "ct-b", PROMPTS) is None                 # fitted for other weights
    assert TextReader.load(tmp_path, "ct-a", PROMPTS[::-1]) is None           # or other prompts
    assert TextReader.load(tmp_path / "missing", "ct-a") is None
    document = json.loads((tmp_path / TEXT_READING_JSON).read_text())
    del document["labels"][LABELS[3]]
    (tmp_path / TEXT_READING_JSON).write_text(json.dumps(document))
    assert TextReader.load(tmp_path, "ct-a") is None                          # a label missing: damaged
    (tmp_path / TEXT_READING_JSON).write_text("{not json")
    assert TextReader.load(tmp_path, "ct-a") is None


def test_latent_reader_file_round_trip_and_refusals(tmp_path):
    """The latent reader in its safetensors file: the same probabilities back (float32 storage), sigmoid(W x + b) by
    hand; refused when fitted for other weights, for another latent size, or damaged."""
    rng = np.random.default_rng(2)
    reader = LatentReader(weights=rng.standard_normal((len(LABELS), 8)), intercepts=rng.standard_normal(len(LABELS)),
                          info={"model_id": "ct-a", "C": 100.0})
    reader.save(tmp_path)
    loaded = LatentReader.load(tmp_path, "ct-a", 8)
    x = rng.standard_normal((3, 8))
    np.testing.assert_allclose(loaded.probabilities(x), 1 / (1 + np.exp(-(x @ reader.weights.T + reader.intercepts))),
                               rtol=1e-5)
    assert loaded.info == {"model_id": "ct-a", "C": 100.0}
    assert LatentReader.load(tmp_path, "ct-b", 8) is None                   # fitted for other weights
    assert LatentReader.load(tmp_path, "ct-a", 16) is None                  # or another latent size
    assert LatentReader.load(tmp_path / "missing", "ct-a") is None
    (tmp_path / TEXT_LATENT_READING).write_bytes(b"not a safetensors file")
    assert LatentReader.load(tmp_path, "ct-a", 8) is None                   # damaged


def test_latent_reader_fit_separates_what_one_direction_states():
    """Texts whose label 0 is stated exactly when their latent's first coordinate is positive: the fitted reader
    reads label 0 from that coordinate (a weight far larger than any other) and near 0 / 1 on either side."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2000, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.zeros((2000, len(LABELS)), dtype=np.int64)
    labels[:, 0] = x[:, 0] > 0
    reader = fit_latent_reader(x, labels, info={"model_id": "m"})
    assert np.argmax(np.abs(reader.weights[0])) == 0 and reader.weights[0, 0] > 5 * np.abs(reader.weights[0, 1:]).max()
    probe = np.zeros((2, 16))
    probe[:, 0] = [0.5, -0.5]
    probs = reader.probabilities(probe)[:, 0]
    assert probs[0] > 0.95 and probs[1] < 0.05
    assert reader.info["n_fit"] == 2000 and reader.info["model_id"] == "m"


@pytest.fixture(scope="module")
def shipped_ctclip():
    from engine.pipelines.ctclip import CTClipPipeline

    return CTClipPipeline.from_pretrained(preset="demo")


def fresh_reports(n: int, seed: int, style: str = "full") -> tuple[list[str], np.ndarray]:
    """n reports written now by the report writer for 0-4 random findings each (never a training text); style
    "brief": write_brief_report (the findings and the impression only, as a prompt is typed)."""
    from engine.phantom.findings import sample_findings
    from engine.report_writer import write_brief_report, write_report

    write = write_brief_report if style == "brief" else write_report

    rng = np.random.default_rng(seed)
    texts, labels = [], np.zeros((n, len(LABELS)), dtype=np.int64)
    for i in range(n):
        chosen = sorted(rng.choice(len(LABELS), size=int(rng.integers(0, 5)), replace=False))
        labels[i, chosen] = 1
        texts.append(write(sample_findings([LABELS[j] for j in chosen], rng), rng).text)
    return texts, labels


@pytest.mark.parametrize("style", ["full", "brief"])
def test_shipped_reader_reads_what_fresh_reports_state(shipped_ctclip, style):
    """40 reports written now for random findings (full CT-RATE style, and brief as a prompt is typed), read from
    their text latents. The image rule alone marks far more labels than they state; the reader marks about as many
    as they state, and gets far fewer report-label pairs wrong at 0.5."""
    assert shipped_ctclip.text_reader is not None, "assets/ctclip has no text_reading.json"
    texts, labels = fresh_reports(40, seed=20261201, style=style)
    latents = shipped_ctclip.embed_texts(texts)
    raw = np.array([[r[label] for label in LABELS] for r in map(shipped_ctclip.zero_shot_from_latent, latents)])
    read = np.array([[r[label] for label in LABELS] for r in map(shipped_ctclip.text_reading_from_latent, latents)])
    stated = labels.sum(1).mean()
    raw_marked, marked = (raw > 0.5).sum(1).mean(), (read > 0.5).sum(1).mean()
    raw_errors, errors = np.mean((raw > 0.5) != labels), np.mean((read > 0.5) != labels)
    assert raw_marked > stated + 3, (raw_marked, stated)
    assert abs(marked - stated) < 1.0, (marked, stated)
    assert errors < raw_errors / 2, (errors, raw_errors)
    # a stated label reads higher than the same label where it is not stated, label by label
    for j, label in enumerate(LABELS):
        if 0 < labels[:, j].sum() < len(texts):
            assert read[labels[:, j] == 1, j].mean() > read[labels[:, j] == 0, j].mean(), label


def test_prompts_typed_by_hand_read_by_the_latent_reader(shipped_ctclip):
    """The 30 prompts of training/typed_prompts.json (typed by hand, not by the report writer; 42 findings stated),
    read as the Generate tab reads a prompt (source "text": the latent reader) and as a speech latent would be read
    (the prompt-feature reader). Measured on the shipped checkpoint: 8 and 33 of the 540 prompt-label pairs wrong.
    The Generate tab's first example reads exactly the three findings it states."""
    from app.generate_tab import EXAMPLES
    from training.ctclip_text_reading import typed_by_hand

    assert shipped_ctclip.latent_reader is not None, "assets/ctclip has no text_latent_reading.safetensors"
    texts, labels = typed_by_hand()
    latents = shipped_ctclip.embed_texts(texts)

    def wrong(source):
        read = np.array([[r[label] for label in LABELS]
                         for r in (shipped_ctclip.text_reading_from_latent(x, source) for x in latents)])
        return int(((read > 0.5) != labels.astype(bool)).sum())

    text_wrong, speech_wrong = wrong("text"), wrong("speech")
    assert text_wrong <= 12 and text_wrong < speech_wrong / 2, (text_wrong, speech_wrong)
    example = shipped_ctclip.text_reading_from_latent(shipped_ctclip.embed_query(EXAMPLES[0]))
    assert {label for label, p in example.items() if p > 0.5} == {"Pleural effusion", "Atelectasis", "Cardiomegaly"}
    with pytest.raises(ValueError):
        shipped_ctclip.text_reading_from_latent(latents[0], "image")


def test_a_folder_without_a_reader_reads_by_the_uncalibrated_rule(tmp_path, shipped_ctclip):
    """A copy of assets/ctclip without the reader's file: no reader, and text_reading_from_latent is the image rule
    itself (what callers then title as uncalibrated)."""
    from engine.pipelines.ctclip import CTClipPipeline

    folder = tmp_path / "ctclip"
    folder.mkdir()
    for path in ctclip_dir().iterdir():
        if path.name != TEXT_READING_JSON:
            (folder / path.name).symlink_to(path.resolve(), target_is_directory=path.is_dir())
    pipeline = CTClipPipeline.from_pretrained(folder)
    assert pipeline.text_reader is None
    latent = pipeline.embed_query("Moderate cardiomegaly.")
    assert pipeline.text_reading_from_latent(latent) == pipeline.zero_shot_from_latent(latent)


def test_a_dictation_reads_the_findings_it_names(tmp_path, shipped_ctclip):
    """The Dictate tab's bars for a report read aloud by espeak-ng (a synthesiser the speech encoder never trained
    its prompts or queries on): the four findings it names read above 0.5, and on average far above the 14 it does
    not name (the image rule alone marked 17 of 18 above 0.7 on this kind of dictation)."""
    from engine.audio import read_audio
    from engine.pipelines.speech import SpeechPipeline
    from tests.trained_speech import espeak_wav, trained_speech_dir

    text = ("Findings: There is a large right pleural effusion with compressive atelectasis of the right lower lobe. "
            "The heart is enlarged. There is a small pericardial effusion. "
            "Impression: Right pleural effusion with atelectasis. Cardiomegaly. Pericardial effusion.")
    named = {"Pleural effusion", "Atelectasis", "Cardiomegaly", "Pericardial effusion"}
    pipeline = SpeechPipeline.from_pretrained(trained_speech_dir(), ctclip=shipped_ctclip)
    latent = pipeline.embed_audio(read_audio(espeak_wav(text, tmp_path / "dictation.wav")))
    reading = pipeline.findings(latent)
    assert all(reading[label] > 0.5 for label in named), reading
    others = [p for label, p in reading.items() if label not in named]
    assert np.mean([reading[label] for label in named]) > np.mean(others) + 0.5, reading
