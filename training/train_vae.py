"""Train the generator's 3-D autoencoder (engine/models/vae.py) through training/loop.py.

    python -m training vae --preset demo [--steps N] [--time-budget-min M] [--out DIR] [--resume]

Demo: phantom volumes (the CT CLIP's resumable phantom cache, training/ctclip_data.py: by default the very studies the
demo CT CLIP trained on, 2,000 generated + 800 real-report phantoms, read from its cache cache/ctclip-demo/train so
they are rendered once for both; another plan gets cache/generator-demo/train) as Text2CT intensity ((HU + 1000) / 2000 in [0, 1]); random crops of `crop_zyx` voxels (the
network is fully convolutional: crops train the same weights 8x cheaper than whole volumes), loss = L1
reconstruction + kl_weight x KL to N(0, I). Paper: Text2CT does not train its autoencoder, it uses MAISI's
published one (engine/convert/text2ct.py loads it); this preset fine-tunes that architecture with MAISI's
optimiser settings (Adam 1e-4) and the same L1 + KL terms. MAISI's adversarial term is an option
(`--adversarial-weight`: a 3-D patch discriminator trained from scratch alongside); its perceptual term is not
implemented (it needs pretrained feature networks this offline project does not have).

The run's model folder OUT/model (save_pretrained at every checkpoint) is what `python -m training ldm --vae` takes.

Decoder fine-tuning (`--init-from VAE --decoder-only`): start from a trained autoencoder, freeze its encoder and train
only the decoder on the encoder's posterior means, on whole volumes (`--crop 64,128,128`). The latents a U-Net was
trained on do not change, so the fine-tuned decoder drops into an existing generator (`ldm-export --vae`); its point is
the decoder's group-norm statistics, learned on crops and wrong on whole volumes. Measured on the demo (docs/
generation.md): the error falls, the CT CLIP's reading of the reconstructions falls too (L1 alone rewards smoothness).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.errors import UserError
from engine.models.vae import CTAutoencoder, VAEConfig, hu_to_unit
from engine.settings import training_cache_dir
from engine.volume import DEMO_SHAPE_ZYX
from training.loop import LoopConfig, TrainingLoop


@dataclass
class VAETrainConfig:
    """The loop's fields (by name) and the autoencoder's own."""

    preset: str = "demo"
    model: VAEConfig = field(default_factory=VAEConfig.demo)
    steps: int = 2000
    batch_size: int = 2
    lr: float = 1e-4
    warmup_steps: int = 0
    schedule: str = "constant"
    time_budget_s: float = 0.0
    grad_clip: float = 1.0
    amp: bool = True
    seed: int = 0
    ckpt_every: int = 200
    ckpt_every_s: float = 300.0
    log_every: int = 10
    num_workers: int = 0
    kl_weight: float = 1e-6
    crop_zyx: tuple[int, int, int] = (32, 64, 64)  # voxels per training crop; multiples of the downsampling
    n_generated: int = 2000  # phantom studies (seeds 0..n-1): the demo CT CLIP's training plan
    n_real: int = 800  # phantoms of real CT-RATE reports (label-level pairing)
    grid_zyx: tuple[int, int, int] = DEMO_SHAPE_ZYX  # phantom render grid over the demo field of view
    init_from: str = ""  # an autoencoder folder to start from ("" = fresh weights of `model`)
    decoder_only: bool = False  # freeze the encoder, train the decoder on its posterior means (needs init_from)
    # > 0: a 3-D patch discriminator (MONAI PatchDiscriminator, least-squares PatchAdversarialLoss, as MAISI's
    # autoencoder training) trained alongside, its generator term added to the loss at this weight (MAISI: 0.1)
    adversarial_weight: float = 0.0
    discriminator_channels: int = 32
    discriminator_layers: int = 3  # stride-2 layers (MAISI: 3; each halves the grid, so crops need >= 32 voxels)

    @classmethod
    def demo(cls) -> "VAETrainConfig":
        return cls(lr=3e-4)

    @classmethod
    def paper(cls) -> "VAETrainConfig":
        return cls(preset="paper", model=VAEConfig.paper(), lr=1e-4, batch_size=1, kl_weight=1e-7,
                   crop_zyx=(64, 128, 128), steps=100_000)


def generator_phantom_cache(n_generated: int, n_real: int, cache_root: Path | None = None, progress: bool = True,
                            grid_zyx: tuple[int, int, int] = DEMO_SHAPE_ZYX):
    """The generator's phantom studies (int16 HU + reports) on `grid_zyx` voxels over the demo field of view
    (350 x 350 x 300 mm), rendered once and resumable: cache_root/train, or by default the demo CT CLIP's training
    cache when the plan is its plan (the same studies), else cache/generator-demo/train."""
    from training.ctclip_data import CachePlan, PhantomCache, build_cache, field_spacing_xyz
    from training.train_ctclip import TrainConfig

    spacing = field_spacing_xyz(grid_zyx)
    ctclip = TrainConfig.demo()
    shared = (n_generated, n_real, tuple(grid_zyx)) == (ctclip.n_train_generated, ctclip.n_train_real, DEMO_SHAPE_ZYX)
    default = training_cache_dir() / ("ctclip-demo" if shared else "generator-demo")
    root = Path(cache_root or default) / "train"
    build_cache(root, CachePlan("train", n_generated, n_real, tuple(grid_zyx), spacing), progress=progress)
    return PhantomCache(root)


class PhantomCrops(torch.utils.data.Dataset):
    """(1, cz, cy, cx) float32 intensity crops of cached phantoms; crop place drawn from rng(seed, index), so a
    resumed run sees the same stream. Whole volumes when the crop is the volume."""

    def __init__(self, cache, crop_zyx: tuple[int, int, int], seed: int = 0):
        self.cache, self.crop, self.seed = cache, tuple(crop_zyx), seed
        self.epoch = 0  # set by the loop's EpochIndexed

    def __len__(self):
        return len(self.cache)

    def __getitem__(self, i: int):
        hu = self.cache.hu(i)
        rng = np.random.default_rng((self.seed, self.epoch, i))
        starts = [int(rng.integers(0, n - c + 1)) for n, c in zip(hu.shape, self.crop)]
        crop = hu[tuple(slice(s, s + c) for s, c in zip(starts, self.crop))]
        return hu_to_unit(torch.from_numpy(np.ascontiguousarray(crop)))[None]


class VAEStep(nn.Module):
    """forward(batch (B, 1, z, y, x) in [0, 1]) -> (L1 + kl_weight * KL [+ adversarial terms], logs). decoder_only: the
    frozen encoder's posterior mean (what a U-Net's latents are) decoded, no KL (it has no gradient then).

    With a discriminator (adversarial_weight > 0) one backward pass trains both sides through the loop's one
    optimizer: the generator term reads the reconstruction with the discriminator's parameters detached
    (torch.func.functional_call), so it moves only the autoencoder; the discriminator's own least-squares term reads
    the real batch and the detached reconstruction, so it moves only the discriminator. Written by hand because the
    training loop steps one optimizer per step; the two terms touch disjoint parameters, so one step is the usual two
    (with one difference: the loop clips the gradient norm of both sides together, and both share the lr)."""

    def __init__(self, vae: CTAutoencoder, kl_weight: float, decoder_only: bool = False,
                 adversarial_weight: float = 0.0, discriminator_channels: int = 32, discriminator_layers: int = 3):
        super().__init__()
        self.vae, self.kl_weight, self.decoder_only = vae, kl_weight, decoder_only
        self.adversarial_weight = adversarial_weight
        self.discriminator = None
        if adversarial_weight > 0:
            from monai.losses import PatchAdversarialLoss
            from monai.networks.nets import PatchDiscriminator
            self.discriminator = PatchDiscriminator(spatial_dims=3, channels=discriminator_channels, in_channels=1,
                                                    out_channels=1, num_layers_d=discriminator_layers,
                                                    norm="INSTANCE")
            self.adversarial_loss = PatchAdversarialLoss(criterion="least_squares")

    def forward(self, unit: torch.Tensor):
        if self.decoder_only:
            with torch.no_grad():
                mu = self.vae.encode(unit)
            reconstruction, kl = self.vae.decode(mu), None
        else:
            reconstruction, mu, sigma = self.vae(unit)
            kl = 0.5 * (mu.pow(2) + sigma.pow(2) - 2 * torch.log(sigma.clamp_min(1e-8)) - 1).sum(dim=1).mean()
        l1 = (reconstruction - unit).abs().mean()
        loss = l1 if kl is None else l1 + self.kl_weight * kl
        logs = {"l1": float(l1.detach()), "kl": 0.0 if kl is None else float(kl.detach())}
        if self.discriminator is not None:
            frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
            fooled = torch.func.functional_call(self.discriminator, frozen, (reconstruction,))[-1]
            generator_term = self.adversarial_loss(fooled, target_is_real=True, for_discriminator=False)
            real = self.discriminator(unit)[-1]
            fake = self.discriminator(reconstruction.detach())[-1]
            discriminator_term = 0.5 * (self.adversarial_loss(real, target_is_real=True, for_discriminator=True)
                                        + self.adversarial_loss(fake, target_is_real=False, for_discriminator=True))
            loss = loss + self.adversarial_weight * generator_term + discriminator_term
            logs.update(adv_g=float(generator_term.detach()), adv_d=float(discriminator_term.detach()))
        return loss, logs


def freeze_encoder(vae: CTAutoencoder) -> None:
    """requires_grad off for everything up to the posterior (MONAI AutoencoderKL: encoder, quant_conv_mu,
    quant_conv_log_sigma); post_quant_conv and the decoder stay trainable. (Group norms keep no running statistics
    and the network has no dropout, so the loop's train() does not change what the frozen part computes.)"""
    for name in ("encoder", "quant_conv_mu", "quant_conv_log_sigma"):
        getattr(vae.network, name).requires_grad_(False)


def train_vae(cfg: VAETrainConfig, out_dir: Path, cache_root: Path | None = None, resume: bool = False,
              progress: bool = True) -> dict:
    """One run in out_dir (resumable); OUT/model is the autoencoder's checkpoint folder."""
    if cfg.preset == "paper":
        raise NotImplementedError("the paper autoencoder is MAISI's published one: convert it with "
                                  "engine.convert.text2ct (CT-RATE fine-tuning needs a CT-RATE dataset loader)")
    if cfg.decoder_only and not cfg.init_from:
        raise UserError("--decoder-only fine-tunes a trained autoencoder: give it with --init-from.")
    vae = CTAutoencoder.from_pretrained(cfg.init_from) if cfg.init_from else CTAutoencoder(cfg.model)
    cfg = replace(cfg, model=vae.config)                 # the run's config states the network it trains
    out_dir = Path(out_dir)
    loop = TrainingLoop(LoopConfig.from_config(cfg), out_dir, resume=resume, progress=progress, desc="vae")
    loop.write_run_config(asdict(cfg))
    cache = generator_phantom_cache(cfg.n_generated, cfg.n_real, cache_root, progress and loop.dist.main,
                                    cfg.grid_zyx)
    vae = vae.train().to(loop.dist.device)
    if cfg.decoder_only:
        freeze_encoder(vae)
    step = VAEStep(vae, cfg.kl_weight, cfg.decoder_only, cfg.adversarial_weight, cfg.discriminator_channels,
                   cfg.discriminator_layers)

    def save_model():
        vae.save_pretrained(out_dir / "model", half=False)

    trainable = [p for p in step.parameters() if p.requires_grad]
    summary = loop.run(step, lambda: torch.optim.Adam(trainable, lr=cfg.lr),
                       PhantomCrops(cache, cfg.crop_zyx, cfg.seed), on_checkpoint=save_model)
    return {**summary, "model": str(out_dir / "model")}
