"""The generator's two trainers on tiny configs and tiny phantoms (the real training code, a few steps each): the
autoencoder run writes a loadable folder and resumes; the LDM run precomputes latents once, takes the scale factor
from their std, applies context dropout, and its exported folder generates through GeneratePipeline."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from engine.models.diffusion_unet import DiffusionUNet
from engine.models.vae import CTAutoencoder
from engine.pipelines.ctclip import CTClipPipeline
from engine.pipelines.generate import GeneratePipeline
from tests.tiny_models import TINY_SHAPE, tiny_ctclip_config, tiny_unet_config, tiny_vae_config
from training.ctclip_data import PhantomCache
from training.loop import LoopConfig, lr_at
from training.train_ldm import (LDMStep, LDMTrainConfig, context_encoder_for, export_generator, precompute_vae_latents,
                                study_indices, train_ldm)
from training.train_vae import VAETrainConfig, train_vae

TINY_RUN = dict(steps=2, batch_size=2, n_generated=3, n_real=0, grid_zyx=TINY_SHAPE, ckpt_every=1, log_every=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from engine.models.ctclip import CTCLIP

    root = tmp_path_factory.mktemp("train_gen")
    torch.manual_seed(0)
    CTCLIP.build(tiny_ctclip_config()).save_pretrained(root / "ctclip")
    ctclip = CTClipPipeline.from_pretrained(root / "ctclip")
    vae_cfg = replace(VAETrainConfig.demo(), model=tiny_vae_config(), crop_zyx=(8, 16, 16), **TINY_RUN)
    vae_summary = train_vae(vae_cfg, root / "vae", cache_root=root / "cache", progress=False)
    ldm_cfg = replace(LDMTrainConfig.demo(), model=tiny_unet_config(), **TINY_RUN)
    ldm_summary = train_ldm(ldm_cfg, root / "ldm", root / "vae" / "model", ctclip=ctclip, cache_root=root / "cache",
                            progress=False)
    return root, ctclip, vae_cfg, vae_summary, ldm_summary


def test_vae_run_writes_a_loadable_autoencoder_and_resumes(trained):
    root, _, vae_cfg, summary, _ = trained
    assert summary["steps"] == 2
    vae = CTAutoencoder.from_pretrained(root / "vae" / "model")
    assert vae.encode(torch.rand(1, 1, *TINY_SHAPE)).shape == (1, 4, 4, 8, 8)
    again = train_vae(replace(vae_cfg, steps=3), root / "vae", cache_root=root / "cache", resume=True, progress=False)
    assert again["steps"] == 3


def test_decoder_only_fine_tuning_keeps_the_latents_and_trains_the_decoder(trained):
    """--init-from + --decoder-only on whole volumes: every encoder weight (so every latent a U-Net trained on) stays
    bit-identical, the decoder moves, and the run's config states the network it started from."""
    import json

    from safetensors.torch import load_file

    root, _, vae_cfg, _, _ = trained
    start = root / "vae" / "model"
    cfg = replace(vae_cfg, init_from=str(start), decoder_only=True, crop_zyx=TINY_SHAPE, lr=1e-2, steps=2)
    train_vae(cfg, root / "vae-decoder", cache_root=root / "cache", progress=False)
    before, after = load_file(str(start / "model.safetensors")), load_file(str(root / "vae-decoder" / "model" /
                                                                             "model.safetensors"))
    frozen = [k for k in before if k.startswith(("network.encoder.", "network.quant_conv_"))]
    trained_keys = [k for k in before if k.startswith(("network.decoder.", "network.post_quant_conv."))]
    assert frozen and trained_keys and set(frozen) | set(trained_keys) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert sum(not torch.equal(before[k], after[k]) for k in trained_keys) > len(trained_keys) // 2
    unit = torch.rand(1, 1, *TINY_SHAPE)
    old, new = CTAutoencoder.from_pretrained(start), CTAutoencoder.from_pretrained(root / "vae-decoder" / "model")
    assert torch.equal(old.encode(unit), new.encode(unit))
    assert not torch.allclose(old.decode(old.encode(unit)), new.decode(new.encode(unit)))
    run_config = json.loads((root / "vae-decoder" / "train_config.json").read_text())
    assert run_config["model"] == json.loads(json.dumps(old.config.to_dict())) and run_config["decoder_only"] is True


def test_adversarial_terms_train_each_side_only(trained):
    """--adversarial-weight: the generator term moves the autoencoder and never the discriminator (its gradient in
    the discriminator is the same whatever the weight), the discriminator term moves only the discriminator (at a
    vanishing weight the decoder's gradient is that of L1 + KL alone)."""
    from training.train_vae import VAEStep

    root, _, _, _, _ = trained
    unit = torch.rand(2, 1, *TINY_SHAPE)
    grads = {}
    for weight in (0.0, 1e-12, 0.1, 10.0):
        vae = CTAutoencoder.from_pretrained(root / "vae" / "model")
        torch.manual_seed(0)
        step = VAEStep(vae, 1e-6, adversarial_weight=weight, discriminator_channels=8, discriminator_layers=1)
        torch.manual_seed(1)             # the same posterior sample for every weight
        loss, logs = step(unit)
        loss.backward()
        decoder = [p.grad.clone() for p in vae.network.decoder.parameters()]
        if weight == 0.0:
            assert step.discriminator is None and "adv_g" not in logs
            grads[weight] = ([], decoder)
            continue
        assert logs["adv_g"] > 0 and logs["adv_d"] > 0
        grads[weight] = ([p.grad.clone() for p in step.discriminator.parameters()], decoder)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0.1][0], grads[10.0][0]))
    assert not all(torch.allclose(a, b) for a, b in zip(grads[0.1][1], grads[10.0][1]))
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(grads[0.0][1], grads[1e-12][1]))


def test_adversarial_run_resumes_with_its_discriminator(trained):
    """The discriminator is part of the run (checkpointed, resumed) and not of the exported autoencoder."""
    from safetensors.torch import load_file

    root, _, vae_cfg, _, _ = trained
    cfg = replace(vae_cfg, adversarial_weight=0.1, discriminator_channels=8, discriminator_layers=1, steps=2)
    train_vae(cfg, root / "vae-adv", cache_root=root / "cache", progress=False)
    ckpt = torch.load(root / "vae-adv" / "ckpt.pt", weights_only=False)
    assert any(k.startswith("discriminator.") for k in ckpt["model"])
    assert train_vae(replace(cfg, steps=3), root / "vae-adv", cache_root=root / "cache", resume=True,
                     progress=False)["steps"] == 3
    exported = load_file(str(root / "vae-adv" / "model" / "model.safetensors"))
    assert exported and not any("discriminator" in k for k in exported)


def test_decoder_only_without_a_start_says_so(tmp_path):
    from engine.errors import UserError

    with pytest.raises(UserError, match="--init-from"):
        train_vae(replace(VAETrainConfig.demo(), decoder_only=True), tmp_path / "run", progress=False)


def test_ldm_latents_are_computed_once_and_set_the_scale_factor(trained):
    root, ctclip, _, _, summary = trained
    files = list((root / "cache").glob("latents-*.pt"))
    assert len(files) == 1 and not list((root / "cache").glob("*.partial"))
    stored = torch.load(files[0], weights_only=True)
    assert stored["latents"].shape == (3, 4, 4, 8, 8) and stored["indices"].tolist() == [0, 1, 2]
    contexts = torch.load(next((root / "cache").glob("contexts-*.pt")), weights_only=True)
    reports = [r["report"] for r in PhantomCache(root / "cache" / "train").records]
    assert np.allclose(contexts.numpy(), ctclip.embed_texts(reports), atol=1e-5)  # the CT CLIP's text latents
    assert summary["scale_factor"] == pytest.approx(1.0 / float(stored["latents"].std()), rel=1e-6)
    unet = DiffusionUNet.from_pretrained(root / "ldm" / "model")
    assert unet.config.scale_factor == pytest.approx(summary["scale_factor"], rel=1e-6)
    assert unet.config.context_dim == 32 and unet.config.context_encoder == "ctclip"


def test_the_unet_takes_its_latent_channels_from_the_autoencoder(trained):
    """An autoencoder with another latent width (`vae --latent-channels`): the LDM trainer sizes the U-Net's input and
    output to the latents it encoded, whatever its preset said, and the exported generator samples that shape."""
    root, ctclip, vae_cfg, _, _ = trained
    wide = replace(vae_cfg, model=replace(vae_cfg.model, latent_channels=6))
    cache = root / "cache-wide"  # its own latent cache: the fixture's holds exactly one latents file
    train_vae(wide, root / "vae-wide", cache_root=cache, progress=False)
    ldm_cfg = replace(LDMTrainConfig.demo(), model=tiny_unet_config(), **TINY_RUN)
    assert ldm_cfg.model.latent_channels == 4
    train_ldm(ldm_cfg, root / "ldm-wide", root / "vae-wide" / "model", ctclip=ctclip, cache_root=cache,
              progress=False)
    unet = DiffusionUNet.from_pretrained(root / "ldm-wide" / "model")
    assert unet.config.latent_channels == 6 and tuple(unet.config.latent_shape) == (6, 4, 8, 8)
    export_generator(root / "vae-wide" / "model", root / "ldm-wide" / "model", root / "gen-wide")
    pipe = GeneratePipeline.from_pretrained(root / "gen-wide", ctclip=ctclip)
    volume = pipe.generate("Small left pleural effusion.", steps=2, seed=0).volume
    assert volume.array.shape == TINY_SHAPE


def test_study_indices_spread_over_the_cache():
    assert study_indices(10, 0) == list(range(10)) and study_indices(3, 5) == [0, 1, 2]
    assert study_indices(2800, 4) == [0, 933, 1866, 2799]   # generated (first 2,000) and real-report studies both


def test_vae_latents_resume_from_a_partial_pass(tmp_path):
    class Cache:   # three constant volumes: latent k is the encoding of volume k
        def hu(self, i):
            return np.full(TINY_SHAPE, -1000 + 500 * i, dtype=np.int16)

    vae = CTAutoencoder(tiny_vae_config()).eval()
    path = tmp_path / "latents.pt"
    full = precompute_vae_latents(Cache(), vae, [0, 1, 2], tmp_path / "full.pt", progress=False)
    torch.save({"latents": full["latents"][:2] + 1.0}, path.with_suffix(".partial"))  # marked: must be kept
    resumed = precompute_vae_latents(Cache(), vae, [0, 1, 2], path, progress=False)
    assert torch.equal(resumed["latents"][:2], full["latents"][:2] + 1.0)
    assert torch.allclose(resumed["latents"][2], full["latents"][2])
    assert not path.with_suffix(".partial").exists()


def test_context_dropout_one_makes_the_loss_blind_to_the_text():
    step = LDMStep(DiffusionUNet(tiny_unet_config()), context_dropout=1.0)
    latent = torch.randn(2, 4, 4, 8, 8)
    losses = []
    for text in (torch.randn(2, 32), torch.randn(2, 32)):
        torch.manual_seed(5)
        losses.append(step(latent, text)[0])
    assert torch.equal(losses[0], losses[1])
    torch.manual_seed(5)
    assert not torch.equal(LDMStep(step.unet, 0.0)(latent, torch.randn(2, 32))[0], losses[0])


def test_polynomial_schedule_is_text2cts():
    cfg = LoopConfig(steps=100, lr=1e-4, schedule="polynomial")
    assert lr_at(cfg, 0, 0.0) == pytest.approx(1e-4)
    assert lr_at(cfg, 50, 0.5) == pytest.approx(1e-4 * 0.25)


def test_exported_generator_generates(trained, tmp_path):
    root, ctclip, _, _, _ = trained
    export_generator(root / "vae" / "model", root / "ldm" / "model", tmp_path / "generator")
    pipeline = GeneratePipeline.from_pretrained(tmp_path / "generator", ctclip=ctclip)
    volume = pipeline.generate("Findings: Right pleural effusion. Impression: Effusion.", steps=2, seed=0).volume
    assert volume.array.shape == TINY_SHAPE


def test_unaligned_context_encoder_is_unit_norm_and_ignores_padding():
    encode = context_encoder_for("minilm-mean")
    short = "Right pleural effusion."
    alone, batched = encode([short]), encode([short, "Emphysema in both upper lobes with a small hiatal hernia."])
    assert alone.shape == (1, 384) and np.allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    assert np.allclose(alone[0], batched[0], atol=1e-5)      # the padding of the batch does not leak into the mean
    with pytest.raises(ValueError):
        context_encoder_for("bert")
