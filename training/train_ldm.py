"""Train the generator's latent diffusion U-Net (engine/models/diffusion_unet.py) through training/loop.py.

    python -m training ldm --preset demo [--vae runs/vae-demo/model] [--steps N] [--time-budget-min M] [--resume]
    python -m training ldm-export [--vae DIR] [--unet DIR] [--out assets/generator]

What is the LDM's (everything else is the loop's):
- latents precomputed ONCE with the frozen VAE (posterior means of the training phantoms; resumable, about a second
  of CPU per study) in cache/generator-demo/latents-<vae id>-....pt, and the context latents of their reports with
  the frozen text encoder in contexts-<encoder id>-....pt (a retrained CT CLIP or VAE gets a new file: retraining is
  the same command);
- the context encoder is the U-Net config's `context_encoder`: the demo CT CLIP's text side ("ctclip"), or for the
  ablation "text encoder not aligned with CT" all-MiniLM-L6-v2 mean-pooled ("minilm-mean", `--context-encoder`);
- the latent scale factor = 1 / std(latents) (Text2CT: of its first batch), written into the U-Net's config;
- 10 % of the samples get a ZERO context (classifier-free guidance's unconditional input);
- the objective of the config's prediction type, noising and targets from engine/pipelines/generate.py (the one
  home the sampler shares): rectified flow, velocity x0 - noise, L1 (Text2CT's code) or DDPM epsilon, L2 (its paper);
- paper: Adam lr 1e-4, PolynomialLR power 2 (the loop's "polynomial" schedule), bf16 autocast on GPU (the loop).
Demo data: the phantom studies (and real CT-RATE reports paired to phantoms by their labels, n_real) conditioned on
the demo CT CLIP's text latent of each study's report.
"""
from __future__ import annotations

import hashlib
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from engine.models.diffusion_unet import DiffusionUNet, DiffusionUNetConfig
from engine.models.vae import CTAutoencoder, hu_to_unit
from engine.pipelines.generate import make_scheduler, noisy_latent_and_target, sample_training_timesteps
from engine.settings import training_cache_dir, training_runs_dir
from engine.volume import DEMO_SHAPE_ZYX
from training.loop import LoopConfig, TrainingLoop
from training.train_vae import generator_phantom_cache


@dataclass
class LDMTrainConfig:
    """The loop's fields (by name) and the LDM's own."""

    preset: str = "demo"
    model: DiffusionUNetConfig = field(default_factory=DiffusionUNetConfig.demo)
    steps: int = 5000
    batch_size: int = 8
    lr: float = 1e-4
    warmup_steps: int = 0
    schedule: str = "polynomial"
    time_budget_s: float = 0.0
    grad_clip: float = 1.0
    amp: bool = True
    seed: int = 0
    ckpt_every: int = 500
    ckpt_every_s: float = 300.0
    log_every: int = 10
    num_workers: int = 0
    context_dropout: float = 0.1  # share of samples trained with a zero context (classifier-free guidance)
    n_generated: int = 2000  # the VAE's phantom studies (training/train_vae.py)
    n_real: int = 800
    n_studies: int = 0  # studies to train on, spread evenly over the cache (0 = all): each costs one VAE encoding
    grid_zyx: tuple[int, int, int] = DEMO_SHAPE_ZYX  # phantom render grid (the VAE's input size)

    @classmethod
    def demo(cls) -> "LDMTrainConfig":
        return cls(lr=3e-4, warmup_steps=20)

    @classmethod
    def paper(cls) -> "LDMTrainConfig":
        return cls(preset="paper", model=DiffusionUNetConfig.paper(), lr=1e-4, batch_size=4, steps=200_000)


def folder_id(directory: Path) -> str:
    """A short content id of a checkpoint folder (its config and the head of its weights)."""
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        with open(Path(directory) / name, "rb") as f:
            h.update(f.read(1 << 20))
    return h.hexdigest()[:12]


def study_text(record: dict) -> str:
    """The report a study is generated from: the real CT-RATE report of a real row, else the generated one."""
    return record.get("real_report") or record["report"]


def study_indices(n_cached: int, n_studies: int) -> list[int]:
    """Which cached studies the LDM trains on: all (n_studies 0), else n_studies spread evenly over the cache (so
    generated and real-report studies keep their shares)."""
    if n_studies <= 0 or n_studies >= n_cached:
        return list(range(n_cached))
    return sorted({int(i) for i in np.linspace(0, n_cached - 1, n_studies).round()})


@torch.inference_mode()
def precompute_vae_latents(cache, vae: CTAutoencoder, indices: list[int], path: Path, progress: bool = True,
                           save_every: int = 50) -> dict:
    """{"latents" (N, C, ...) VAE posterior means of the studies `indices`, "indices", "scale_factor" = 1 / std}
    computed once and kept in `path`; an interrupted pass resumes (PATH.partial is saved every `save_every`)."""
    if path.is_file():
        return torch.load(path, weights_only=True)
    partial = path.with_suffix(".partial")
    done = torch.load(partial, weights_only=True)["latents"] if partial.is_file() else []
    latents = list(done)
    path.parent.mkdir(parents=True, exist_ok=True)
    for k in tqdm(range(len(latents), len(indices)), desc="latents", disable=not progress, initial=len(latents),
                  total=len(indices), unit="study"):
        unit = hu_to_unit(torch.from_numpy(np.asarray(cache.hu(indices[k]))))[None, None]
        latents.append(vae.encode(unit)[0])
        if (k + 1) % save_every == 0:
            torch.save({"latents": torch.stack(latents)}, partial)
    latents = torch.stack(latents)
    out = {"latents": latents, "indices": torch.tensor(indices),
           "scale_factor": torch.tensor(1.0 / float(latents.std()))}
    torch.save(out, path)
    partial.unlink(missing_ok=True)
    return out


def context_encoder_for(name: str, ctclip=None):
    """texts -> (N, D) unit latents: the CT CLIP's text side ("ctclip", default the shipped one) or the
    unaligned sentence encoder of the ablation ("minilm-mean")."""
    if name == "minilm-mean":
        from engine.models.text import SentenceMeanEncoder

        return SentenceMeanEncoder()
    if name != "ctclip":
        raise ValueError(f"the demo LDM is conditioned on 'ctclip' or 'minilm-mean', not {name!r}")
    from engine.pipelines.ctclip import CTClipPipeline

    return (ctclip or CTClipPipeline.from_pretrained(preset="demo")).embed_texts


def precompute_contexts(texts: list[str], encode, path: Path) -> torch.Tensor:
    """(N, D) context latents of the studies' reports, computed once and kept in `path`."""
    if path.is_file():
        return torch.load(path, weights_only=True)
    text = torch.from_numpy(np.asarray(encode(texts), dtype=np.float32))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(text, path)
    return text


class LatentTexts(torch.utils.data.Dataset):
    """(scaled latent (C, ...), text latent (D,)) pairs."""

    def __init__(self, latents: torch.Tensor, text: torch.Tensor, scale_factor: float):
        self.latents, self.text, self.scale = latents, text, scale_factor

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, i: int):
        return self.latents[i] * self.scale, self.text[i]


class LDMStep(nn.Module):
    """forward(latent (B, C, ...), text latent (B, D)) -> (loss, {"dropped"}): a random timestep per sample, the
    config's noising and target, context zeroed for `context_dropout` of the samples."""

    def __init__(self, unet: DiffusionUNet, context_dropout: float):
        super().__init__()
        self.unet, self.context_dropout = unet, context_dropout

    def forward(self, latent: torch.Tensor, text: torch.Tensor):
        keep = (torch.rand(latent.shape[0], device=latent.device) >= self.context_dropout).to(text.dtype)
        context = (text * keep[:, None])[:, None, :]
        scheduler = make_scheduler(self.unet.config, training=True)  # MONAI's are nn.Modules: not a submodule here
        noise = torch.randn_like(latent)
        timesteps = sample_training_timesteps(scheduler, latent)
        noisy, target = noisy_latent_and_target(scheduler, latent, noise, timesteps, self.unet.config.prediction)
        prediction = self.unet(noisy, timesteps.to(latent.dtype), context)
        if self.unet.config.prediction == "velocity":
            loss = (prediction - target).abs().mean()  # Text2CT's code: L1 on the velocity
        else:
            loss = (prediction - target).pow(2).mean()  # the paper: L2 on epsilon
        return loss, {"dropped": float(1 - keep.mean())}


def train_ldm(cfg: LDMTrainConfig, out_dir: Path, vae_dir: Path, ctclip=None, cache_root: Path | None = None,
              resume: bool = False, progress: bool = True) -> dict:
    """One run in out_dir (resumable); OUT/model is the U-Net's checkpoint folder, its config holding the scale
    factor. `ctclip` (a CTClipPipeline) defaults to the shipped demo CT CLIP."""
    from engine.pipelines.ctclip import CTClipPipeline

    if cfg.preset == "paper":
        raise NotImplementedError("the paper LDM trains on CT-RATE latents; its dataset loader is not written yet")
    out_dir, vae_dir = Path(out_dir), Path(vae_dir)
    loop = TrainingLoop(LoopConfig.from_config(cfg), out_dir, resume=resume, progress=progress, desc="ldm")
    vae = CTAutoencoder.from_pretrained(vae_dir)
    cache = generator_phantom_cache(cfg.n_generated, cfg.n_real, cache_root, progress and loop.dist.main,
                                    cfg.grid_zyx)
    cache_dir = Path(cache_root or training_cache_dir() / "generator-demo")
    indices = study_indices(len(cache), cfg.n_studies)
    stored = precompute_vae_latents(cache, vae, indices, cache_dir / f"latents-{folder_id(vae_dir)}-"
                                    f"{len(cache)}-{len(indices)}.pt", progress and loop.dist.main)
    encoder_name = cfg.model.context_encoder
    if encoder_name == "ctclip":
        ctclip = ctclip or CTClipPipeline.from_pretrained(preset="demo")
        encoder_id = folder_id(ctclip.directory) if ctclip.directory else ctclip.model_id
    else:
        encoder_id = encoder_name
    texts = [study_text(cache.records[i]) for i in indices]
    stored["text"] = precompute_contexts(texts, context_encoder_for(encoder_name, ctclip),
                                         cache_dir / f"contexts-{encoder_id}-{len(cache)}-{len(indices)}.pt")
    scale = float(stored["scale_factor"])
    model_config = replace(cfg.model, scale_factor=scale, context_dim=int(stored["text"].shape[1]),
                           latent_channels=int(stored["latents"].shape[1]),
                           latent_shape=tuple(stored["latents"].shape[1:]), image_spacing=cache.spacing_xyz)
    cfg = replace(cfg, model=model_config)
    loop.write_run_config(asdict(cfg))
    unet = DiffusionUNet(model_config).to(loop.dist.device)
    step = LDMStep(unet, cfg.context_dropout)

    def save_model():
        unet.save_pretrained(out_dir / "model", half=False)

    summary = loop.run(step, lambda: torch.optim.Adam(step.parameters(), lr=cfg.lr),
                       LatentTexts(stored["latents"], stored["text"], scale), on_checkpoint=save_model)
    return {**summary, "model": str(out_dir / "model"), "scale_factor": scale}


def export_generator(vae_dir: Path, unet_dir: Path, out_dir: Path) -> dict:
    """Copy a trained VAE and U-Net into one generator folder (OUT/vae, OUT/unet) as GeneratePipeline reads it
    (float16 weight matrices, as every shipped checkpoint)."""
    out_dir = Path(out_dir)
    for source, name, model_class in ((vae_dir, "vae", CTAutoencoder), (unet_dir, "unet", DiffusionUNet)):
        target = out_dir / name
        if target.exists():
            shutil.rmtree(target)
        model_class.from_pretrained(source).save_pretrained(target, half=True)
    return {"vae": str(out_dir / "vae"), "unet": str(out_dir / "unet")}


def default_run(name: str, preset: str) -> Path:
    return training_runs_dir() / f"{name}-{preset}"
