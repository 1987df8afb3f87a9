"""training/train_speech.py: the loss, the cached Whisper prefix and what is trained, on real espeak-ng speech."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.audio import read_audio
from engine.models.losses import symmetric_infonce
from engine.models.speech_encoder import SpeechEncoder, SpeechEncoderConfig
from training.train_speech import (CachedWindows, SpeechStep, SpeechTrainConfig, WhisperPrefixCache,
                                   make_optimizer_factory)

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
    read_when_asked = CachedWindows(cache)["clip0"]          # what training's SpeechPairs reads per batch
    assert torch.equal(windows[0][0], read_when_asked[0][0]) and windows[0][1] == read_when_asked[0][1]
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


def test_a_spoken_prompt_row_is_distilled_but_never_a_contrastive_candidate(model, clips, tmp_path):
    """Rows 0 and 2 are studies, row 1 a spoken prompt (no CT): the contrastive term is the 2 x 2 InfoNCE of rows 0
    and 2 alone, whatever row 1's CT latent holds; the distillation averages all three rows."""
    cache = WhisperPrefixCache(model, tmp_path)
    batch = [cache.get(k, lambda k=k: clips[k]) for k in clips]
    ct = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    text = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    paired = torch.tensor([True, False, True])
    step = SpeechStep(model, 10.0, 0.5)
    with torch.no_grad():
        audio = step.audio_latents(batch)
        loss, logs = step(batch, ct, text, paired)
        other_ct = ct.clone()
        other_ct[1] = -ct[0]                                      # row 1's "CT" must not matter
        loss_other, _ = step(batch, other_ct, text, paired)
    keep = [0, 2]
    expected_contrastive = symmetric_infonce(10.0 * audio[keep] @ ct[keep].T)
    expected_distill = (1 - (audio * text).sum(-1)).mean()
    assert torch.allclose(logs["contrastive"], expected_contrastive, atol=1e-5)
    assert torch.allclose(loss, expected_contrastive + 0.5 * expected_distill, atol=1e-5)
    assert torch.allclose(loss, loss_other, atol=1e-6)
    with torch.no_grad():                                         # one study alone: no contrastive term at all
        lone, lone_logs = step(batch, ct, text, torch.tensor([False, False, True]))
    assert float(lone_logs["contrastive"]) == 0.0 and torch.allclose(lone, 0.5 * expected_distill, atol=1e-5)


def test_a_spoken_prompt_row_must_pick_its_own_prompt_out_of_the_prompt_table(model, clips, tmp_path):
    """The prompt term: each row without a study is scored against the 4 prompt latents by cross-entropy at the CT
    CLIP's scale, its target the prompt whose text latent it carries (row 1: prompt 2, row 2: prompt 0); the study
    row 0 does not enter it. Worked as -log softmax by hand."""
    cache = WhisperPrefixCache(model, tmp_path)
    batch = [cache.get(k, lambda k=k: clips[k]) for k in clips]
    table = F.normalize(torch.randn(4, 16, generator=torch.Generator().manual_seed(2)), dim=-1)
    study_text = F.normalize(torch.randn(16, generator=torch.Generator().manual_seed(3)), dim=-1)
    text = torch.stack([study_text, table[2], table[0]])
    ct = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    paired = torch.tensor([True, False, False])
    step = SpeechStep(model, 10.0, 0.5, prompt_latents=table, prompt_contrast_weight=2.0)
    with torch.no_grad():
        audio = step.audio_latents(batch)
        loss, logs = step(batch, ct, text, paired)
        without, _ = SpeechStep(model, 10.0, 0.5)(batch, ct, text, paired)
    logits = 10.0 * audio[1:] @ table.T
    expected = ((torch.logsumexp(logits[0], 0) - logits[0, 2]) + (torch.logsumexp(logits[1], 0) - logits[1, 0])) / 2
    assert torch.allclose(logs["prompt_contrast"], expected, atol=1e-5)
    assert torch.allclose(loss, without + 2.0 * expected, atol=1e-5)
    assert "prompt_latents" not in step.state_dict()           # frozen data: checkpoints of older runs still resume


def test_a_spoken_prompt_row_must_score_the_training_cts_as_its_prompt_text_does(model, clips, tmp_path):
    """The CT-logit term: each row without a study scores the 5 bank CT latents at the CT CLIP's scale, and its
    squared error against its text latent's scores is averaged over rows and bank; the study row 0 does not enter
    it. Worked by hand from the audio latents; a bank equal to the text latent's own direction gives a known value."""
    from training.train_speech import SpeechItem, ct_bank

    cache = WhisperPrefixCache(model, tmp_path)
    batch = [cache.get(k, lambda k=k: clips[k]) for k in clips]
    text = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(4)), dim=-1)
    ct = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    bank = F.normalize(torch.randn(5, 16, generator=torch.Generator().manual_seed(5)), dim=-1)
    paired = torch.tensor([True, False, False])
    step = SpeechStep(model, 10.0, 0.5, ct_bank=bank, prompt_ct_logit_weight=3.0)
    with torch.no_grad():
        audio = step.audio_latents(batch)
        loss, logs = step(batch, ct, text, paired)
        without, _ = SpeechStep(model, 10.0, 0.5)(batch, ct, text, paired)
    expected = sum(float((10.0 * (audio[r] - text[r]) @ bank[j]) ** 2) for r in (1, 2) for j in range(5)) / 10
    assert abs(float(logs["prompt_ct_logit"]) - expected) < 1e-3 * max(1.0, expected)
    assert torch.allclose(loss, without + 3.0 * logs["prompt_ct_logit"], atol=1e-4)
    assert "ct_bank" not in step.state_dict()                  # frozen data: checkpoints of older runs still resume
    # the bank is the distinct CT latents of the studies; prompts (unpaired) add nothing
    a, b = np.eye(4, dtype=np.float32)[:2]
    items = [SpeechItem("q", 0, a, b), SpeechItem("r", 0, a, a), SpeechItem("s", 1, b, a),
             SpeechItem("p", -1, np.zeros(4, np.float32), b, paired=False)]
    assert sorted(map(tuple, ct_bank(items).tolist())) == sorted([tuple(a.tolist()), tuple(b.tolist())])


def test_training_prompts_are_every_training_voice_and_no_evaluation_voice(monkeypatch, tmp_path):
    """36 prompts x 14 Kokoro training voices and x 6 espeak-ng training voices, speeds in [0.9, 1.1]; the
    evaluation's voice never reads one; a run without distillation (or with --no-spoken-prompts) plans none.
    The phantom splits' plan is replaced by an empty one: only the prompt phases are asked about here, and the real
    plan would render 400 phantoms (it once did, into the directory this test passed)."""
    import training.train_speech as train_speech
    from engine.models.ctclip import all_zero_shot_prompts
    from training.speech_data import ESPEAK_TRAIN_VOICES, EVAL_VOICES, TRAIN_VOICES
    from training.train_speech import prompt_training_clips, training_phases

    monkeypatch.setattr(train_speech, "split_plan", lambda *args, **kwargs: (None, [], []))

    prompts = all_zero_shot_prompts()
    kokoro, espeak = prompt_training_clips("kokoro"), prompt_training_clips("espeak")
    assert len(prompts) == 36 and len(kokoro) == 36 * 14 and len(espeak) == 36 * 6
    assert [c.text for c in kokoro[:36]] == prompts and {c.voice for c in kokoro} == set(TRAIN_VOICES)
    assert {c.voice for c in espeak} == set(ESPEAK_TRAIN_VOICES) and {c.engine for c in espeak} == {"espeak"}
    assert not {c.voice for c in kokoro + espeak} & set(EVAL_VOICES)
    assert all(0.9 <= c.speed <= 1.1 for c in kokoro + espeak) and len({c.key for c in kokoro + espeak}) == 720
    # the blended voices come after the plain ones (whose clips stay the same) and are pairs of training voices only
    blended = prompt_training_clips("kokoro", blended=True)
    assert blended[:len(kokoro)] == kokoro and len(blended) == 36 * 28
    pairs = [c.voice.split("+") for c in blended[len(kokoro):]]
    assert all(len(p) == 2 and p[0] != p[1] and set(p) <= set(TRAIN_VOICES) for p in pairs)
    assert len({tuple(p) for p in pairs}) == 14 and len({c.key for c in blended}) == 36 * 28
    for cfg in (SpeechTrainConfig(n_real_studies=0, distill_weight=0.0),
                SpeechTrainConfig(n_real_studies=0, spoken_prompts=False)):
        phases = dict(training_phases(cfg, tmp_path, progress=False)[2:4])
        assert phases == {"espeak-ng zero-shot prompts": [], "zero-shot prompts (Kokoro, training)": []}


def parameters_moved_by_one_step(model, clips, cache_dir) -> set[str]:
    """Names of the parameters that one optimiser step of the training loss changes."""
    cache = WhisperPrefixCache(model, cache_dir)
    batch = [cache.get(k, lambda k=k: clips[k]) for k in clips]
    ct = F.normalize(torch.randn(3, 16), dim=-1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = make_optimizer_factory(model, SpeechTrainConfig(lr=1e-3))()
    loss, _ = SpeechStep(model, 10.0, 1.0)(batch, ct, ct)
    loss.backward()
    optimizer.step()
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def test_only_the_top_is_trained(clips, tmp_path):
    """Two trainable Whisper layers (the paper's recipe, mean pooling): layers 2-3 and the head move, 0-1 do not."""
    from dataclasses import replace

    config = replace(SpeechEncoderConfig.demo(latent_dim=16), trainable_layers=2, pooling="mean")
    changed = parameters_moved_by_one_step(SpeechEncoder.from_whisper(config, seed=0), clips, tmp_path)
    assert "to_latent.weight" in changed and any(n.startswith("whisper.layers.3.") for n in changed)
    assert not any(n.startswith(("whisper.layers.0.", "whisper.layers.1.", "whisper.conv")) for n in changed)


def test_demo_trains_the_attention_pooling_and_head_only(model, clips, tmp_path):
    changed = {n.split(".")[0] for n in parameters_moved_by_one_step(model, clips, tmp_path)}
    assert changed == {"pool_queries", "pool_attention", "to_latent"}


def test_a_deeper_prefix_continues_from_a_shallower_cache(clips, tmp_path):
    """The demo caches the whole encoder's output; a clip cached two layers deep (another trainable_layers) is
    continued from there, and gives what the audio gives."""
    from dataclasses import replace

    demo = SpeechEncoderConfig.demo(latent_dim=16)
    shallow = SpeechEncoder.from_whisper(replace(demo, trainable_layers=2), seed=0)
    WhisperPrefixCache(shallow, tmp_path).get("clip1", lambda: clips["clip1"])
    deep = SpeechEncoder.from_whisper(demo, seed=0)
    continued = WhisperPrefixCache(deep, tmp_path).get("clip1", lambda: pytest.fail("must continue from the cache"))
    direct = WhisperPrefixCache(deep, tmp_path / "other").get("clip1", lambda: clips["clip1"])
    assert continued[0][1] == direct[0][1]
    assert torch.allclose(continued[0][0].float(), direct[0][0].float(), atol=0.05)   # float16 prefix in between
    assert F.cosine_similarity(continued[0][0].float().flatten(), direct[0][0].float().flatten(), dim=0) > 0.9999


def test_synthesis_only_plans_every_clip_queries_first_and_loads_no_ct_clip(tmp_path):
    """`--synthesis-only` with no CPU budget left: the phantom splits are rendered, every phase of the plan is listed
    in order with its clip count (nothing made), and no CT CLIP latents are computed (no teachers/ folder)."""
    import json

    from engine.models.ctclip import all_zero_shot_prompts

    command = [sys.executable, "-m", "training", "speech", "--synthesis-only", "--studies", "3", "--test-studies",
               "2", "--real-studies", "3", "--cache", str(tmp_path), "--synthesis-budget-min", "0"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    phases = json.loads(done.stdout.strip().splitlines()[-1])["synthesis"]
    assert list(phases) == ["espeak-ng train split", "espeak-ng real reports", "espeak-ng zero-shot prompts",
                            "zero-shot prompts (Kokoro, training)", "train queries", "test queries",
                            "spoken zero-shot prompts", "espeak-ng test split", "real reports (acceptance test)",
                            "test reports", "real reports (Kokoro, training)", "train reports"]
    counts = {name: phase["clips"] for name, phase in phases.items()}
    assert counts == {"espeak-ng train split": 3, "espeak-ng real reports": 3, "espeak-ng zero-shot prompts": 36 * 6,
                      "zero-shot prompts (Kokoro, training)": 36 * 14, "train queries": 3, "test queries": 2,
                      "spoken zero-shot prompts": len(all_zero_shot_prompts()), "espeak-ng test split": 4,
                      "real reports (acceptance test)": 6, "test reports": 2, "real reports (Kokoro, training)": 3,
                      "train reports": 3}
    assert all(phase["made"] == 0 and phase["skipped"] == phase["clips"] for phase in phases.values())
    assert (tmp_path / "phantoms-train-3" / "studies.jsonl").is_file() and not (tmp_path / "teachers").exists()
    assert (tmp_path / "phantoms-real-3" / "studies.jsonl").is_file()     # 3 rows: not the CT CLIP's plan, own folder


def test_comparison_table_is_written_into_the_distilled_metrics(tmp_path):
    """speech-eval --compare-no-distill: the paper's three rows, each figure from the right checkpoint; two
    evaluations against different CT CLIPs are refused in one sentence."""
    import json

    from engine.errors import UserError
    from training.eval_speech import add_comparison

    def metrics(text_zs, speech_zs, r10, ctclip="ctclip-a"):
        return {"ctclip": ctclip, "n_test_studies": 100, "text_zero_shot_macro_auroc": text_zs,
                "speech_zero_shot": {"macro": {"auroc": speech_zs}},
                "text_report_recall": {"R@5": 0.5, "R@10": 0.7},
                "speech_report_recall": {"R@5": r10 - 0.1, "R@10": r10},
                "text_query_recall": {"R@10": 0.6}, "speech_query_recall": {"R@10": r10 / 2}}
    distilled, plain = tmp_path / "distilled.json", tmp_path / "plain" / "metrics.json"
    plain.parent.mkdir()
    distilled.write_text(json.dumps(metrics(0.80, 0.78, 0.6)))
    plain.write_text(json.dumps(metrics(0.80, 0.70, 0.4)))
    markdown = add_comparison(distilled, plain)
    rows = json.loads(distilled.read_text())["comparison"]["rows"]
    assert [r["encoder"] for r in rows] == ["text teacher (CT CLIP)", "speech, no distillation", "speech, distillation"]
    assert [r["zero-shot macro AUROC"] for r in rows] == [0.80, 0.70, 0.78]
    assert [r["report R@10"] for r in rows] == [0.7, 0.4, 0.6] and [r["query R@10"] for r in rows] == [0.6, 0.2, 0.3]
    assert rows[0]["report R@50"] is None and "| - |" in markdown and markdown.count("\n") == 4
    plain.write_text(json.dumps(metrics(0.80, 0.70, 0.4, ctclip="ctclip-b")))
    with pytest.raises(UserError, match="different ctclip"):
        add_comparison(distilled, plain)


# ----------------------------------------------------------------------------- real CT-RATE reports in the training set

TINY_GRID_ZYX = (8, 16, 16)      # the demo field of view on 8 x 16 x 16 voxels: phantoms in a tenth of a second
HELD_OUT_ROW = 54                # the smallest CSV row among the acceptance test's six reports (rows 54, 178, 343,
#                                  348, 358, 767: the shortest reports with at least two hand-set labels)


def test_real_reports_enter_the_training_plan_without_the_acceptance_tests(tmp_path):
    """The first 56 CSV rows (tiny phantoms): the training plan reads 55 real reports, each by espeak-ng and by a
    training Kokoro voice, in row order; row 54, one of the acceptance test's six, is read by neither."""
    from training.ctclip_data import load_real_reports
    from training.eval_speech import real_report_clips
    from training.speech_data import ESPEAK_TRAIN_VOICES, TRAIN_VOICES
    from training.train_speech import training_phases

    reports = load_real_reports()
    acceptance = {clip.text for _, clip in real_report_clips()}
    assert reports.text[HELD_OUT_ROW] in acceptance and not set(reports.text[:HELD_OUT_ROW]) & acceptance
    cfg = SpeechTrainConfig(n_studies=2, n_real_studies=HELD_OUT_ROW + 2, real_grid_zyx=TINY_GRID_ZYX)
    phases = dict(training_phases(cfg, tmp_path, progress=False, workers=1))
    expected = [reports.text[row] for row in range(HELD_OUT_ROW + 2) if row != HELD_OUT_ROW]
    espeak, kokoro = phases["espeak-ng real reports"], phases["real reports (Kokoro, training)"]
    assert [c.text for c in espeak] == expected and [c.text for c in kokoro] == expected
    assert {c.voice for c in espeak} <= set(ESPEAK_TRAIN_VOICES) and {c.voice for c in kokoro} <= set(TRAIN_VOICES)
    every_training_text = {clip.text for clips in phases.values() for clip in clips}
    assert not every_training_text & acceptance
    assert len(phases["espeak-ng train split"]) == 2 and len(phases["train queries"]) == 2   # the phantom studies


@pytest.mark.slow
def test_real_report_items_pair_the_spoken_report_with_its_phantom_and_its_text(tmp_path):
    """A tiny training set (2 phantom studies, the first 3 real reports, no Kokoro budget): the espeak-ng clips of the
    real reports are made and become items whose CT latent is the frozen CT CLIP's latent of the phantom rendered
    from THAT report's hand-set labels, and whose text latent is the CT CLIP's latent of that report."""
    import soundfile

    from engine.phantom import make_study
    from engine.volume import Volume
    from training.ctclip_data import REAL_SEED_BASE, field_spacing_xyz, load_real_reports
    from training.train_speech import ctclip_pipeline, training_data

    reports = load_real_reports()
    cfg = SpeechTrainConfig(n_studies=2, n_real_studies=3, real_grid_zyx=TINY_GRID_ZYX, synthesis_budget_cpu_s=0.0,
                            spoken_prompts=False)
    pipeline = ctclip_pipeline()
    data = training_data(cfg, tmp_path, pipeline, progress=False)
    assert data["synthesis"]["kokoro"]["made"] == 0 and data["synthesis"]["espeak-ng real reports"]["made"] == 3
    real = {data["clips"][item.key].text: item for item in data["items"]
            if data["clips"][item.key].text in set(reports.text[:3])}
    assert len(data["items"]) == 2 + 3 and len(real) == 3        # the phantom reports (espeak-ng) and the real ones
    phantoms, texts = [], pipeline.embed_texts(list(reports.text[:3]))
    for row in range(3):
        study = make_study(REAL_SEED_BASE + row, labels=reports.labels[row], shape_zyx=TINY_GRID_ZYX,
                           spacing_xyz=field_spacing_xyz(TINY_GRID_ZYX))
        assert sorted(study.labels) == sorted(reports.labels[row])
        phantoms.append(pipeline.embed_volume(Volume(array=np.rint(study.volume.array),
                                                     spacing=field_spacing_xyz(TINY_GRID_ZYX))))
    for row in range(3):
        item, clip = real[reports.text[row]], data["clips"][real[reports.text[row]].key]
        assert clip.engine == "espeak" and soundfile.info(str(data["synthesizer"].path(clip))).duration > 20.0
        np.testing.assert_allclose(item.text_latent, texts[row], atol=1e-4)
        similarity = np.array([item.ct_latent @ p for p in phantoms])
        assert similarity[row] > 0.999 and similarity.argmax() == row, similarity


def test_prompt_items_are_unpaired_made_clips_distilled_towards_their_prompts_latent(tmp_path):
    """Two espeak-ng prompt clips, one made: one item, unpaired (study -1, CT zeros), its target the CT CLIP's text
    latent of that very prompt."""
    from training.speech_data import SpeechSynthesizer
    from training.train_speech import ctclip_pipeline, prompt_items, prompt_training_clips

    pipeline = ctclip_pipeline()
    clips = prompt_training_clips("espeak")[1:3]           # "... is not present." then the next label's "present"
    synthesizer = SpeechSynthesizer(tmp_path)
    synthesizer.make(clips[1])
    items = prompt_items(clips, pipeline, synthesizer)
    assert [item.key for item in items] == [clips[1].key]
    item = items[0]
    assert not item.paired and item.study == -1 and not item.ct_latent.any()
    assert np.allclose(item.text_latent, pipeline.embed_texts([clips[1].text])[0], atol=1e-4)
