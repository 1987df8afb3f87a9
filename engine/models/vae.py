"""The 3-D variational autoencoder of the generator (Text2CT's latent space): MONAI's AutoencoderKL family.

    HU volume (z, y, x) -> intensity in [0, 1] ((HU + 1000) / 2000, clipped) -> encoder -> latent (C, z/f, y/f, x/f)
    (paper: C = 4, f = 4; demo: C = 8, f = 8)
    latent -> decoder -> intensity -> HU = intensity * 2000 - 1000 (clipped to [-1000, 1000])

Two MONAI classes, one family (the same encoder / decoder / quant_conv_mu / quant_conv_log_sigma / post_quant_conv
layout, KL-regularised Gaussian latent):
- paper: `monai.apps.generation.maisi.networks.autoencoderkl_maisi.AutoencoderKlMaisi`, the MAISI autoencoder
  Text2CT ships (autoencoder_epoch273.pt). Its state-dict names are exactly those of the official file
  (../shared/manifests/text2ct_autoencoder.json; e.g. `encoder.blocks.1.conv1.conv.conv.weight`, nested because
  MAISI's convolution wraps MONAI's), so the `network` attribute loads that file with no renaming.
- demo: `monai.networks.nets.AutoencoderKL`, the generic class (`encoder.blocks.1.conv1.conv.weight`), sized for a
  2-core CPU: the decoder's full-resolution layers dominate decoding (../shared/notes/generation-evidence.md).
The paper's downsamples 4x per axis (three levels = two downsamplings), the demo's 8x (four levels). Long volumes
(and every volume when the config names decode_window_zyx) decode in sliding windows (engine/pipelines/generate.py),
which this file does not need to know about.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.models.base import ModelConfig, PretrainedModel

HU_MIN, HU_MAX = -1000.0, 1000.0  # Text2CT's intensity window: [-1000, 1000] HU <-> [0, 1]


@dataclass
class VAEConfig(ModelConfig):
    """An AutoencoderKL of either class. Channels per level; len(channels) - 1 downsamplings by 2."""

    preset: str = "paper"
    network: str = "maisi"  # "maisi" (AutoencoderKlMaisi, the official file's names) | "generic" (AutoencoderKL)
    latent_channels: int = 4
    channels: tuple[int, ...] = (64, 128, 256)
    num_res_blocks: tuple[int, ...] = (2, 2, 2)
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    # MAISI only: convolutions split into num_splits chunks along spatial dim dim_split (memory, not maths), and
    # group norms computed in float16 (norm_float16), as the official configuration sets them
    num_splits: int = 4
    dim_split: int = 1
    norm_float16: bool = True
    # Voxels (z, y, x) of gaussian-blended windows to decode in (engine/pipelines/generate.py), e.g. the crop the
    # autoencoder was trained on, whose group-norm statistics its decoder learned; () = decode whole (the shipped
    # demo and MAISI). Measured on the demo autoencoder (docs/generation.md): reconstructions of 40 held-out
    # phantoms read 0.661 macro AUROC decoded in its 32 x 64 x 64 crops against 0.584 whole, but volumes GENERATED
    # from 40 reports only 0.598 against 0.578 (16-report guidance sweep lower), with grey air and seams: not set.
    decode_window_zyx: tuple[int, ...] = ()

    @classmethod
    def paper(cls) -> "VAEConfig":
        """Text2CT's MAISI autoencoder (20.9 M parameters, no attention): 512 x 512 x 128 -> 4 x 128 x 128 x 32."""
        return cls()

    @classmethod
    def demo(cls) -> "VAEConfig":
        """3.0 M parameters, 8x downsampling and 8 latent channels: the demo grid 64 x 128 x 128 -> latent
        8 x 8 x 16 x 16 (64x fewer values than voxels; the paper's 4x / 4 channels keep 16x fewer). Chosen by measurement
        on this CPU (docs/generation.md): on the 4x latent 4 x 16 x 32 x 32 one U-Net training step (batch 8) costs
        4.9 s on one core, on this latent 0.6 s, and the U-Net has to learn text conditioning in CPU hours. Decoding
        a whole volume costs about 3 s on one core (the full-resolution 16-channel layers dominate). One residual block
        per level; the generic class: no official file to match, and no float16 norms on a CPU."""
        return cls(preset="demo", network="generic", latent_channels=8, channels=(16, 32, 64, 128),
                   num_res_blocks=(1, 1, 1, 1), norm_num_groups=16, num_splits=1, dim_split=0, norm_float16=False)

    @property
    def downsampling(self) -> int:
        """Voxels per latent voxel along each axis."""
        return 2 ** (len(self.channels) - 1)

    @property
    def latent_decode_window(self) -> tuple[int, ...] | None:
        """decode_window_zyx in latent voxels, or None (decode whole)."""
        return tuple(v // self.downsampling for v in self.decode_window_zyx) if self.decode_window_zyx else None


def build_autoencoder(config: VAEConfig) -> torch.nn.Module:
    """The MONAI network the config names (spatial_dims 3, one image channel, no attention)."""
    common = dict(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=config.latent_channels,
                  num_res_blocks=tuple(config.num_res_blocks), norm_num_groups=config.norm_num_groups,
                  norm_eps=config.norm_eps, attention_levels=(False,) * len(config.channels),
                  with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False, use_convtranspose=False)
    if config.network == "maisi":
        from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

        return AutoencoderKlMaisi(num_channels=tuple(config.channels), use_checkpointing=False,
                                  norm_float16=config.norm_float16, num_splits=config.num_splits,
                                  dim_split=config.dim_split, **common)
    if config.network == "generic":
        from monai.networks.nets import AutoencoderKL

        return AutoencoderKL(channels=tuple(config.channels), **common)
    raise ValueError(f"VAEConfig.network must be 'maisi' or 'generic', not {config.network!r}")


def hu_to_unit(hu: torch.Tensor) -> torch.Tensor:
    """HU -> the VAE's input intensity in [0, 1] (clipped to [-1000, 1000] HU first)."""
    return (hu.clamp(HU_MIN, HU_MAX) - HU_MIN) / (HU_MAX - HU_MIN)


def unit_to_hu(unit: torch.Tensor) -> torch.Tensor:
    """The VAE's output intensity -> HU in [-1000, 1000] (Text2CT: x * 2000 - 1000, clipped)."""
    return (unit * (HU_MAX - HU_MIN) + HU_MIN).clamp(HU_MIN, HU_MAX)


class CTAutoencoder(PretrainedModel):
    """A 3-D AutoencoderKL on CT intensity in [0, 1]: `network` is the MONAI module (official names beneath it)."""

    config_class = VAEConfig
    model_name = "CT autoencoder"

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.network = build_autoencoder(config)

    def encode(self, unit: torch.Tensor, generator: torch.Generator | None = None,
               sample: bool = False) -> torch.Tensor:
        """(B, 1, z, y, x) intensity in [0, 1] -> latent (B, C, z/f, y/f, x/f): the posterior mean, or a draw
        from the posterior when `sample` (training)."""
        mu, sigma = self.network.encode(unit)
        if not sample:
            return mu
        noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + sigma * noise

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent (B, C, ...) -> intensity (B, 1, z, y, x) (not clipped)."""
        return self.network.decode(latent)

    def forward(self, unit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction, posterior mean, posterior sigma) of a (B, 1, z, y, x) batch in [0, 1]."""
        return self.network(unit)
