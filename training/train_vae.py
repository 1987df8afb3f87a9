"""Train the generator's 3-D autoencoder (engine/models/vae.py) through training/loop.py.

    python -m training vae --preset demo [--steps N] [--time-budget-min M] [--out DIR] [--resume]

Demo: phantom volumes (the CT CLIP's resumable phantom cache, training/ctclip_data.py: by default the very studies the
demo CT CLIP trained on, 2,000 generated + 800 real-report phantoms, read from its cache cache/ctclip-demo/train so
they are rendered once for both; another plan gets cache/generator-demo/train) as Text2CT intensity ((HU + 1000) / 2000 in [0, 1]); random crops of `crop_zyx` voxels (the
network is fully convolutional: crops train the same weights 8x cheaper than whole volumes), loss = L1
reconstruction + kl_weight x KL to N(0, I). Paper: Text2CT does not train its autoencoder, it uses MAISI's
published one (engine/convert/text2ct.py loads it); this preset fine-tunes that architecture with MAISI's
optimiser settings (Adam 1e-4) and the same L1 + KL terms. MAISI's perceptual and adversarial terms are not
implemented here (they need pretrained feature networks this offline project does not have).

The run's model folder OUT/model (save_pretrained at every checkpoint) is what `python -m training ldm --vae` takes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

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
    """forward(batch (B, 1, z, y, x) in [0, 1]) -> (L1 + kl_weight * KL, {"l1", "kl"})."""

    def __init__(self, vae: CTAutoencoder, kl_weight: float):
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, unit: torch.Tensor):
        reconstruction, mu, sigma = self.vae(unit)
        l1 = (reconstruction - unit).abs().mean()
        kl = 0.5 * (mu.pow(2) + sigma.pow(2) - 2 * torch.log(sigma.clamp_min(1e-8)) - 1).sum(dim=1).mean()
        return l1 + self.kl_weight * kl, {"l1": float(l1.detach()), "kl": float(kl.detach())}


def train_vae(cfg: VAETrainConfig, out_dir: Path, cache_root: Path | None = None, resume: bool = False,
              progress: bool = True) -> dict:
    """One run in out_dir (resumable); OUT/model is the autoencoder's checkpoint folder."""
    out_dir = Path(out_dir)
    loop = TrainingLoop(LoopConfig.from_config(cfg), out_dir, resume=resume, progress=progress, desc="vae")
    loop.write_run_config(asdict(cfg))
    if cfg.preset == "paper":
        raise NotImplementedError("the paper autoencoder is MAISI's published one: convert it with "
                                  "engine.convert.text2ct (CT-RATE fine-tuning needs a CT-RATE dataset loader)")
    cache = generator_phantom_cache(cfg.n_generated, cfg.n_real, cache_root, progress and loop.dist.main,
                                    cfg.grid_zyx)
    vae = CTAutoencoder(cfg.model).to(loop.dist.device)
    step = VAEStep(vae, cfg.kl_weight)

    def save_model():
        vae.save_pretrained(out_dir / "model", half=False)

    summary = loop.run(step, lambda: torch.optim.Adam(step.parameters(), lr=cfg.lr),
                       PhantomCrops(cache, cfg.crop_zyx, cfg.seed), on_checkpoint=save_model)
    return {**summary, "model": str(out_dir / "model")}
