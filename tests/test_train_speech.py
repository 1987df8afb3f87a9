"""training/train_speech.py: the loss, the cached Whisper prefix and what is trained, on real espeak-ng speech."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def test_only_the_top_is_trained(clips, tmp_path):
    """Two trainable Whisper layers (the paper's recipe, mean pooling): layers 2-3 and the head move, 0-1 do not."""
    from dataclasses import replace

    config = replace(SpeechEncoderConfig.demo(latent_dim=16), trainable_layers=2, pooling="mean")
    model = SpeechEncoder.from_whisper(config, seed=0)
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


def test_demo_trains_the_attention_pooling_and_head_only(model, clips, tmp_path):
    cache = WhisperPrefixCache(model, tmp_path)
    batch = [cache.get(k, lambda k=k: clips[k]) for k in clips]
    ct = F.normalize(torch.randn(3, 16), dim=-1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = make_optimizer_factory(model, SpeechTrainConfig(lr=1e-3))()
    loss, _ = SpeechStep(model, 10.0, 1.0)(batch, ct, ct)
    loss.backward()
    optimizer.step()
    changed = {n.split(".")[0] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
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
               "2", "--cache", str(tmp_path), "--synthesis-budget-min", "0"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    phases = json.loads(done.stdout.strip().splitlines()[-1])["synthesis"]
    assert list(phases) == ["espeak-ng train split", "train queries", "test queries", "spoken zero-shot prompts", "espeak-ng test split",
                            "real reports (acceptance test)", "test reports", "train reports"]
    counts = {name: phase["clips"] for name, phase in phases.items()}
    assert counts == {"espeak-ng train split": 3, "train queries": 3, "test queries": 2, "spoken zero-shot prompts": len(all_zero_shot_prompts()),
                      "espeak-ng test split": 4, "real reports (acceptance test)": 6, "test reports": 2,
                      "train reports": 3}
    assert all(phase["made"] == 0 and phase["skipped"] == phase["clips"] for phase in phases.values())
    assert (tmp_path / "phantoms-train-3" / "studies.jsonl").is_file() and not (tmp_path / "teachers").exists()


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
