"""The latent diffusion U-Net of the generator: MONAI's DiffusionModelUNet family with cross-attention to text.

    noisy latent (B, C, ...) + timestep (B,) in [0, num_train_timesteps) + context (B, 1, D) [+ spacing (B, 3)]
        -> prediction (B, C, ...): the velocity x0 - noise (rectified flow) or the noise (DDPM/DDIM epsilon)

The context is ONE token: the unit-norm text latent of a CT-aligned text encoder (Text2CT: its CLIP3D text tower,
D = 768; demo: the demo CT CLIP's text latent, D = 256). A zero context is the unconditional input of
classifier-free guidance (trained with 10 % zero contexts).

Two MONAI classes, one family:
- paper: `monai.apps.generation.maisi.networks.diffusion_model_unet_maisi.DiffusionModelUNetMaisi`, Text2CT's
  unet_rflow_200ep.pt. Its state-dict names are exactly the official file's (../shared/manifests/text2ct_unet.json:
  q/k/v without bias, out_proj with one, cross-attention k/v [C, 768], `spacing_layer`, `class_embedding` with
  class 1 = CT, no region-index layers), so the `network` attribute loads it with no renaming. Flash attention is
  off (the class refuses it on a CPU; the weights are the same).
- demo: `monai.networks.nets.DiffusionModelUNet`, channels (32, 64, 128), attention at the lowest level only: 8.5 M
  parameters (../shared/notes/generation-evidence.md: attention at two levels costs 2x, wider channels 3x), on the
  demo VAE's 8 x 8 x 16 x 16 latent (8x cheaper per step than the 4x latent 4 x 16 x 32 x 32; docs/generation.md).
  No spacing input: every demo volume has the demo grid's spacing.

The config also carries what the weights were trained to make (prediction type, latent scale factor, latent grid,
voxel spacing and array axes): a checkpoint folder says by itself how to sample from it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.models.base import ModelConfig, PretrainedModel
from engine.volume import DEMO_SHAPE_ZYX, DEMO_SPACING_XYZ

PREDICTIONS = ("velocity", "epsilon")
CONTEXT_ENCODERS = ("clip3d", "ctclip", "minilm-mean")


@dataclass
class DiffusionUNetConfig(ModelConfig):
    """The U-Net's shape and the generation facts that belong to its weights."""

    preset: str = "paper"
    network: str = "maisi"  # "maisi" (DiffusionModelUNetMaisi, the official names) | "generic" (DiffusionModelUNet)
    latent_channels: int = 4
    channels: tuple[int, ...] = (64, 128, 256, 512)
    attention_levels: tuple[bool, ...] = (False, False, True, True)
    num_head_channels: tuple[int, ...] = (0, 0, 32, 32)  # channels per attention head (0 where no attention)
    num_res_blocks: int = 2
    norm_num_groups: int = 32
    context_dim: int = 768  # size of the one context token (the text latent)
    # which text encoder makes the context: "clip3d" (Text2CT's CT-aligned CLIP3D text tower), "ctclip" (the demo
    # CT CLIP's text latent) or "minilm-mean" (all-MiniLM-L6-v2 mean-pooled, NOT aligned with CT: the ablation)
    context_encoder: str = "clip3d"
    resblock_updown: bool = True
    include_fc: bool = True
    spacing_input: bool = True  # MAISI: voxel spacing (x, y, z) mm x 100 is embedded with the timestep
    num_class_embeds: int | None = 128  # MAISI: a class-label embedding; Text2CT always passes label 1 (CT)
    class_label: int = 1
    # what the weights were trained to make
    prediction: str = "velocity"  # "velocity" (rectified flow, target x0 - noise) | "epsilon" (DDPM)
    num_train_timesteps: int = 1000
    default_steps: int = 30  # sampling steps when the caller gives none (Text2CT: 30)
    scale_factor: float = 1.0287  # latent = VAE latent x scale_factor (1 / std of the training latents)
    latent_shape: tuple[int, ...] = (4, 128, 128, 32)  # (C, spatial...) in the network's axes
    image_spacing: tuple[float, float, float] = (0.75, 0.75, 3.0)  # (x, y, z) mm of a generated voxel
    axes: str = "RAS-xyz"  # network array axes: "RAS-xyz" (MONAI's NIfTI order after Orientation RAS: Text2CT)
    #                       or "LPS-zyx" (this engine's Volume order)

    @classmethod
    def paper(cls) -> "DiffusionUNetConfig":
        """Text2CT's MAISI U-Net (217.7 M parameters): a 512 x 512 x 128 volume at 0.75 x 0.75 x 3 mm."""
        return cls()

    @classmethod
    def demo(cls) -> "DiffusionUNetConfig":
        """8.5 M parameters on the demo VAE's latent 8 x 8 x 16 x 16 (the demo grid 64 x 128 x 128 / 8; VAEConfig.demo),
        context = the demo CT CLIP's 256-d text latent. A training step (batch 8) costs 0.6 s on one core here, a
        guided sampling step a few hundredths of a second (docs/generation.md). Rectified flow: straight paths sample
        well in 15-20 Euler steps. scale_factor is replaced by the LDM trainer with 1 / std of the demo latents."""
        z, y, x = DEMO_SHAPE_ZYX
        return cls(preset="demo", network="generic", latent_channels=8, channels=(32, 64, 128),
                   attention_levels=(False, False, True), num_head_channels=(32, 32, 32), num_res_blocks=1,
                   context_dim=256, context_encoder="ctclip", resblock_updown=False, include_fc=True,
                   spacing_input=False, num_class_embeds=None,
                   default_steps=15, scale_factor=1.0, latent_shape=(8, z // 8, y // 8, x // 8),
                   image_spacing=tuple(DEMO_SPACING_XYZ), axes="LPS-zyx")

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, not {self.prediction!r}")
        if self.context_encoder not in CONTEXT_ENCODERS:
            raise ValueError(f"context_encoder must be one of {CONTEXT_ENCODERS}, not {self.context_encoder!r}")
        if self.axes not in ("RAS-xyz", "LPS-zyx"):
            raise ValueError(f"axes must be 'RAS-xyz' or 'LPS-zyx', not {self.axes!r}")


def build_unet(config: DiffusionUNetConfig) -> torch.nn.Module:
    """The MONAI network the config names, conditioned by cross-attention on a (B, 1, context_dim) context."""
    common = dict(spatial_dims=3, in_channels=config.latent_channels, out_channels=config.latent_channels,
                  num_res_blocks=config.num_res_blocks, attention_levels=tuple(config.attention_levels),
                  norm_num_groups=config.norm_num_groups, resblock_updown=config.resblock_updown,
                  num_head_channels=tuple(config.num_head_channels), with_conditioning=True,
                  cross_attention_dim=config.context_dim, num_class_embeds=config.num_class_embeds,
                  include_fc=config.include_fc, use_flash_attention=False)
    if config.network == "maisi":
        from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi

        return DiffusionModelUNetMaisi(num_channels=tuple(config.channels), include_spacing_input=config.spacing_input,
                                       include_top_region_index_input=False,
                                       include_bottom_region_index_input=False, **common)
    if config.network == "generic":
        if config.spacing_input:
            raise ValueError("the generic DiffusionModelUNet has no spacing input; use network='maisi'")
        from monai.networks.nets import DiffusionModelUNet

        return DiffusionModelUNet(channels=tuple(config.channels), **common)
    raise ValueError(f"DiffusionUNetConfig.network must be 'maisi' or 'generic', not {config.network!r}")


class DiffusionUNet(PretrainedModel):
    """The denoiser: `network` is the MONAI module (official names beneath it)."""

    config_class = DiffusionUNetConfig
    model_name = "diffusion U-Net"

    def __init__(self, config: DiffusionUNetConfig):
        super().__init__()
        self.config = config
        self.network = build_unet(config)

    def forward(self, latent: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """latent (B, C, ...), timesteps (B,) float in [0, num_train_timesteps), context (B, 1, context_dim)
        -> the prediction (B, C, ...) of config.prediction. Spacing and class label, when the network takes them,
        are the config's (every generated volume has image_spacing)."""
        batch = latent.shape[0]
        kwargs = {}
        if self.config.num_class_embeds:
            kwargs["class_labels"] = torch.full((batch,), self.config.class_label, dtype=torch.long,
                                                device=latent.device)
        if self.config.spacing_input:  # Text2CT / MAISI embed spacing in units of 0.01 mm
            spacing = torch.tensor(self.config.image_spacing, dtype=latent.dtype, device=latent.device) * 100.0
            kwargs["spacing_tensor"] = spacing.expand(batch, 3)
        return self.network(latent, timesteps, context=context, **kwargs)
