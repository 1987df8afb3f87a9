"""The token-feature vision family of the demo CT CLIP (issue 12): its input path, the encoder, the focal-finding
masks, the token-level loss, the feature cache, a tiny training run and the pointing game.

Tiny configs on the 16 x 32 x 32 test grid (2 x 2 x 2 tokens of 8 x 16 x 16 voxels) and real phantoms."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from engine.errors import UserError
from engine.labels import FOCAL_LABELS
from engine.models.ctclip import CTCLIP
from engine.models.losses import balanced_token_bce
from engine.phantom import finding_masks, make_study, phantom_masks, render_phantom, sample_findings, study_findings
from engine.token_features import FEATURE_NAMES, token_features
from engine.transforms import DEMO_TOKEN_FEATURES, Preprocessing, prepare
from engine.volume import Volume
from tests.tiny_models import TINY_SHAPE, TINY_SPACING, tiny_ctclip_overrides
from training.ctclip_data import (CachePlan, PhantomCache, TokenFeatureDataset, build_cache, build_token_features,
                                  token_shares)
from training.evaluate import pointing_game
from training.train_ctclip import ContrastiveStep, TrainConfig, build_model, model_config, train

F = len(FEATURE_NAMES)


def tiny_config(**vision) -> TrainConfig:
    return TrainConfig(preset="demo", vision="token_features", text_max_length=48,
                       model_overrides={**tiny_ctclip_overrides(max_length=48), "vision": vision})


# ------------------------------------------------------------------------------------------------ input path

def test_token_feature_preprocessing_keeps_metal_and_matches_the_features_of_the_hu_grid():
    """prepare() with the token-feature preset = token_features of the resampled, unclipped HU: metal stays > 1800 HU
    (the [-1000, 1000] clip of the voxel presets would make it bone)."""
    findings = sample_findings(["Medical material"], np.random.default_rng(15))
    volume = render_phantom(findings, 15)
    prepared, tensor = prepare(volume, DEMO_TOKEN_FEATURES)
    assert tensor.shape == (8, 8, 8, F)
    np.testing.assert_array_equal(prepared.array, volume.array)        # on its own grid: no clip, no change
    np.testing.assert_allclose(tensor.numpy(), token_features(volume.array, volume.spacing), rtol=0, atol=0)
    assert tensor[..., FEATURE_NAMES.index("hu_max")].max() > 1800
    assert tensor[..., FEATURE_NAMES.index("share_metal")].max() > 0
    assert Preprocessing.from_dict(json.loads(json.dumps(DEMO_TOKEN_FEATURES.to_dict()))) == DEMO_TOKEN_FEATURES


def test_model_config_selects_the_family_and_its_preprocessing():
    config = model_config(tiny_config())
    assert config.vision.family == "token_features" and config.vision.n_features == F
    pre = config.default_preprocessing()
    assert pre.token_features == "demo" and tuple(pre.shape_zyx) == TINY_SHAPE
    assert model_config(TrainConfig(preset="demo")).vision.family == "ctvit"      # the shipped family by default
    with pytest.raises(ValueError):
        model_config(TrainConfig(preset="paper", vision="token_features"))


# ------------------------------------------------------------------------------------------------ the encoder

def test_encoder_standardises_by_its_config_and_the_folder_describes_itself(tmp_path):
    mean, std = list(np.linspace(-1, 1, F)), list(np.linspace(1, 3, F))
    model = build_model(tiny_config(feature_mean=mean, feature_std=std), pretrained_text=False).eval()
    vit = model.visual_transformer
    x = torch.randn(3, 2, 2, 2, F) * 5
    expected = ((x - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(std, dtype=torch.float32)).clamp(-8, 8)
    torch.testing.assert_close(vit.standardise(x), expected)
    with torch.no_grad():
        tokens = vit(x)
        latent = model.encode_image(x)
        assert tokens.shape == (3, 2, 2, 2, 32)
        # the exact heat map still holds: token shares sum to the cosine with any text latent
        shares = model.token_scores(tokens, latent[0])
        torch.testing.assert_close(shares.sum(dim=(1, 2, 3)), latent @ latent[0], atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["vision"]["family"] == "token_features" and len(config["vision"]["feature_std"]) == F
    assert json.loads((tmp_path / "m" / "preprocessing.json").read_text())["token_features"] == "demo"
    loaded = CTCLIP.from_pretrained(tmp_path / "m")
    assert loaded.preprocessing.token_features == "demo"
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(x), latent, atol=2e-3, rtol=0)     # float16 weights
    with pytest.raises(UserError):
        loaded.encode_image(torch.randn(1, 2, 2, 2, F - 1))


# ------------------------------------------------------------------------------------------------ masks and loss

def test_finding_masks_cover_the_drawn_lesion_only():
    seed = 7
    labels, findings, _ = study_findings(seed, ["Lung nodule", "Pleural effusion", "Emphysema"])
    assert labels == make_study(seed, ["Lung nodule", "Pleural effusion", "Emphysema"], with_report=False).labels
    masks = finding_masks(seed, findings)
    assert set(masks) == {"Lung nodule", "Pleural effusion"}                  # emphysema is not focal
    lungs = phantom_masks(seed)["lungs"]
    nodule, effusion = masks["Lung nodule"], masks["Pleural effusion"]
    assert 0 < nodule.sum() < 2000 and (nodule & lungs).sum() >= 0.5 * nodule.sum()
    assert effusion.sum() > 5 * nodule.sum()
    assert finding_masks(seed, [f for f in findings if f.label == "Emphysema"]) == {}
    shares = token_shares(nodule, (8, 16, 16))
    assert shares.shape == (8, 8, 8) and math.isclose(shares.sum() * 2048, nodule.sum())


def test_balanced_token_bce_hand_worked():
    """Two tokens per study: logits 0 give BCE ln 2 everywhere, so each counted pair scores ln 2; a pair whose
    finding is absent, or whose masks are unknown (NaN), is not counted."""
    logits = torch.zeros(3, 1, 1, 2, 2)
    masks = torch.tensor([[[[[0.5, 0.0], [0.0, 0.0]]]],          # study 0: finding 0 in token 0, finding 1 absent
                          [[[[0.0, 0.2], [0.0, 0.1]]]],          # study 1: finding 1 in both tokens (no negatives)
                          [[[[math.nan, math.nan], [math.nan, math.nan]]]]])
    assert math.isclose(float(balanced_token_bce(logits, masks)), math.log(2), rel_tol=1e-6)
    # token 0 of study 0 scores logit 2 (positive), token 1 logit -1 (negative): 0.5 * (BCE(2, 1) + BCE(-1, 0))
    logits2 = torch.zeros(1, 1, 1, 2, 1)
    logits2[0, 0, 0, 0, 0], logits2[0, 0, 0, 1, 0] = 2.0, -1.0
    m2 = torch.tensor([0.3, 0.0]).reshape(1, 1, 1, 2, 1)
    expected = 0.5 * (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.0)))
    assert math.isclose(float(balanced_token_bce(logits2, m2)), expected, rel_tol=1e-6)
    assert float(balanced_token_bce(logits2, torch.zeros_like(m2))) == 0.0


# ------------------------------------------------------------------------------------------------ cache and training

@pytest.fixture(scope="module")
def tiny_feature_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("tf_cache")
    build_cache(root / "train", CachePlan("train", n_generated=6, shape_zyx=TINY_SHAPE, spacing_xyz=TINY_SPACING),
                workers=1, progress=False)
    return root


def test_feature_cache_stores_the_engine_path_and_resumes(tiny_feature_cache):
    pre = model_config(tiny_config()).default_preprocessing()
    root = tiny_feature_cache / "train"
    build_token_features(root, pre, n_masks=3, workers=1, progress=False)
    cache = PhantomCache(root)
    dataset = TokenFeatureDataset(cache, pre, with_labels=True, with_token_masks=True)
    assert len(dataset) == 6
    for i in (0, 5):
        x, text, labels, masks = dataset[i]
        hu = cache.hu(i)
        expected = prepare(Volume(array=hu, spacing=cache.spacing_xyz), pre)[1]
        torch.testing.assert_close(x, expected)                          # the engine's one path, cached
        assert isinstance(text, str) and labels.shape == (18,) and masks.shape == (2, 2, 2, len(FOCAL_LABELS))
        assert torch.isnan(masks).all() == (i >= 3)                       # masks for the first 3 studies only
    lines = (root / "token_features_demo.jsonl").read_text().splitlines()
    build_token_features(root, pre, n_masks=3, workers=1, progress=False)     # nothing left to do
    assert (root / "token_features_demo.jsonl").read_text().splitlines() == lines
    mean, std = dataset.features.statistics()
    flat = np.stack([dataset[i][0].numpy() for i in range(6)]).reshape(-1, F)
    np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(std, flat.std(0), rtol=1e-4, atol=1e-3)


def test_tiny_token_feature_run_trains_with_the_token_loss(tiny_feature_cache, tmp_path):
    cfg = TrainConfig(preset="demo", vision="token_features", steps=3, batch_size=3, lr=1e-3, log_every=1,
                      ckpt_every=3, text_max_length=48, frozen_text_layers=5, cache_text=True,
                      cls_only_top_layer=True, label_loss_weight=1.0, token_loss_weight=1.0, n_token_masks=6,
                      n_train_generated=6, model_overrides=tiny_ctclip_overrides(max_length=48))
    summary = train(cfg, tmp_path / "run", cache_root=tiny_feature_cache, progress=False)
    assert summary["steps"] == 3
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(row["loss"]) for row in log)
    stats = json.loads((tmp_path / "run" / "feature_stats.json").read_text())
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())["vision"]
    assert saved["feature_mean"] == pytest.approx(stats["feature_mean"]) and saved["family"] == "token_features"


def test_token_logits_are_the_heat_maps():
    """ContrastiveStep.token_logits is scale * n_tokens * CTCLIP.token_scores + bias for each prompt."""
    model = build_model(tiny_config(), pretrained_text=False).eval()
    step = ContrastiveStep(model, token_loss=True)
    tokens = torch.randn(2, 2, 2, 2, 32)
    prompts = torch.nn.functional.normalize(torch.randn(3, 32), dim=-1)
    logits = step.token_logits(tokens, prompts)
    assert logits.shape == (2, 2, 2, 2, 3)
    for k in range(3):
        torch.testing.assert_close(logits[..., k], 10.0 * 8 * model.token_scores(tokens, prompts[k]) - 2.0)


# ------------------------------------------------------------------------------------------------ pointing game

def test_pointing_game_hand_worked():
    """Three pairs on a 1 x 3 x 4 grid. Pair 0: peak at (0, 0, 0), mask at (0, 1, 1): diagonal neighbour -> hit.
    Pair 1: peak at (0, 0, 0), mask at (0, 2, 3): two tokens away -> miss. Pair 2: tie at (0, 1, 2) and (0, 2, 3),
    the first in C order, (0, 1, 2), is the peak; mask at (0, 2, 3) is its diagonal neighbour -> hit."""
    heat = np.zeros((3, 1, 3, 4))
    masks = np.zeros((3, 1, 3, 4), bool)
    heat[0, 0, 0, 0], masks[0, 0, 1, 1] = 1.0, True
    heat[1, 0, 0, 0], masks[1, 0, 2, 3] = 1.0, True
    heat[2] -= 1.0
    heat[2, 0, 1, 2] = heat[2, 0, 2, 3] = 0.5
    masks[2, 0, 2, 3] = True
    result = pointing_game(heat, masks, ["Lung nodule", "Lung nodule", "Pleural effusion"])
    assert result["per_label"]["Lung nodule"] == {"hits": 1, "n": 2, "rate": 0.5}
    assert result["per_label"]["Pleural effusion"] == {"hits": 1, "n": 1, "rate": 1.0}
    assert result["overall"]["hits"] == 2 and result["overall"]["n"] == 3
    strict = pointing_game(heat, masks, ["a", "a", "b"], tolerance=0)
    assert strict["overall"]["hits"] == 0
    with pytest.raises(ValueError):
        pointing_game(heat, np.zeros_like(masks), ["a", "a", "b"])


def test_pipeline_reads_a_token_feature_folder_end_to_end(tmp_path):
    """A (random, small) token-feature CT CLIP on the demo grid through CTClipPipeline: the folder's preprocessing
    computes the features, the latent is unit norm and the heat map lands on the caller's grid."""
    from engine.pipelines.ctclip import CTClipPipeline
    cfg = TrainConfig(preset="demo", vision="token_features", text_max_length=48,
                      model_overrides={"vision_dim": 32, "spatial_depth": 1, "temporal_depth": 1, "heads": 2,
                                       "dim_head": 16, "latent_dim": 32})
    build_model(cfg, pretrained_text=True).save_pretrained(tmp_path / "m")
    pipeline = CTClipPipeline.from_pretrained(tmp_path / "m")
    volume = render_phantom(sample_findings(["Pleural effusion"], np.random.default_rng(12)), 12)
    latent = pipeline.embed_volume(volume)
    assert latent.shape == (32,) and math.isclose(float(np.linalg.norm(latent)), 1.0, rel_tol=1e-4)
    heat, score = pipeline.heatmap(volume, "right pleural effusion")
    assert heat.shape == volume.array.shape and 0 <= heat.min() and heat.max() <= 1 and -1 <= score <= 1


# ------------------------------------------------------------------------------------------------ frozen text side

def test_zero_shot_logits_hand_worked():
    """scale * (cos present - cos absent); the probability is CT-CLIP's softmax over the pair: for the image
    (0.6, 0.8), present (1, 0), absent (0, 1) and scale 10 the logits are 6 and 8, so P = e^6 / (e^6 + e^8)
    = 1 / (1 + e^2) = 0.1192 and the logit difference is -2."""
    from engine.models.ctclip import zero_shot_logits, zero_shot_probabilities
    image = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    prompts = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    torch.testing.assert_close(zero_shot_logits(image, prompts, 10.0), torch.tensor([[-2.0], [10.0]]))
    torch.testing.assert_close(zero_shot_probabilities(image, prompts, 10.0),
                               torch.tensor([[1 / (1 + math.e ** 2)], [1 / (1 + math.e ** -10)]]))


def test_frozen_text_run_keeps_the_donor_text_side_and_trains_the_image_side(tiny_feature_cache, tmp_path):
    """--init-text-from: the text tower and text head are the donor's, bit for bit, after training; the image side
    moved; every text a step can draw is in OUT/text_latents.safetensors and equals the donor's encode_text."""
    from safetensors.torch import load_file

    from training.train_ctclip import TextLatentTable
    donor = build_model(tiny_config())
    with torch.no_grad():
        donor.to_text_latent.weight.mul_(-1.0)          # a text side a fresh build would not have
    donor.save_pretrained(tmp_path / "donor")
    donor = CTCLIP.from_pretrained(tmp_path / "donor").eval()
    cfg = TrainConfig(preset="demo", vision="token_features", steps=3, batch_size=3, lr=1e-3, log_every=1,
                      ckpt_every=3, text_max_length=48, label_loss_weight=1.0, prompt_label_loss_weight=1.0,
                      token_loss_weight=1.0, n_token_masks=6, n_train_generated=6, frozen_text=True,
                      init_text_from=str(tmp_path / "donor"), model_overrides=tiny_ctclip_overrides(max_length=48))
    train(cfg, tmp_path / "run", cache_root=tiny_feature_cache, progress=False)
    trained = CTCLIP.from_pretrained(tmp_path / "run" / "model")
    before, after = donor.state_dict(), trained.state_dict()
    text_keys = [k for k in after if k.startswith(("text_transformer.", "to_text_latent."))]
    assert text_keys and all(torch.equal(after[k], before[k]) for k in text_keys)
    assert not torch.equal(after["to_visual_latent.weight"], before["to_visual_latent.weight"])
    records = PhantomCache(tiny_feature_cache / "train").records
    texts = [r[k] for r in records for k in ("report", "query", "real_report") if r.get(k)]
    stored = load_file(str(tmp_path / "run" / "text_latents.safetensors"))
    assert len(stored) == len(set(texts)) + 36
    table = TextLatentTable(donor, texts[:2], tmp_path / "run" / "text_latents.safetensors", progress=False)
    with torch.no_grad():
        direct = donor.encode_text(**donor.tokenize(texts[:2]))
    torch.testing.assert_close(table(texts[:2]), direct, atol=1e-5, rtol=0)
