"""The chest-radiograph (CXR) encoder of X2CT-CLIP (You et al., MICCAI 2025; shared/notes/reference-implementations.md
section 4): a 2-D backbone trained from scratch whose latent joins the frozen CT CLIP's space.

    radiograph (engine.radiograph.Radiograph, [0, 1], brighter = more attenuation)
        -> `prepare`: resized (aspect kept, padded) to image_size x image_size, standardised per image
        -> backbone: feature map (b, c, h, w)                                   ResNet (MONAI) or Swin (MONAI)
        -> global average pool -> Linear(c, latent, no bias) -> unit latent (b, latent)

The backbones are MONAI's 2-D networks (monai.networks.nets.ResNet with spatial_dims=2; the SwinTransformer of
monai.networks.nets.swin_unetr with spatial_dims=2): torchvision and timm do not install beside the pinned torch, and
the paper trains from scratch anyway (no ImageNet weights are needed).

Because the head is linear over globally pooled features and has no bias, the cosine score of a text latent q splits
exactly over the feature map's locations (a class activation map, CAM): v = W mean_k f_k, so location k contributes
<W f_k, q> / (n |v|) and the contributions sum to <v / |v|, q>. `location_scores` returns them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import UserError
from engine.models.base import ModelConfig, PretrainedModel
from engine.radiograph import Radiograph, normalise_for_model

BACKBONES = ("resnet", "swin")


@dataclass
class CXREncoderConfig(ModelConfig):
    """The CXR encoder. paper: ResNet-50 (bottleneck blocks 3-4-6-3, widths 64..512 x 4), input 224, latent 512 (the
    CT-CLIP v2 latent). demo: a small ResNet (basic blocks 1-1-1-1, widths 32..256: 1.3 M parameters, chosen over
    widths 16..128 and over blocks 2-2-2-2 by measured runs, docs/x2ct.md) on 128-pixel input (the demo DRRs
    are ~110 x 128 pixels of 2.7 mm), its latent the demo CT CLIP's latent_dim (256; the trainer reads it from the CT
    CLIP checkpoint's config) and a stem of stride 1, so its CAM has 8 x 8 locations. backbone "swin": Swin-T
    (embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7, patch 4) in the paper; the paper reports both backbones."""
    preset: str = "paper"
    backbone: str = "resnet"
    image_size: int = 224
    latent_dim: int = 512
    resnet_block: str = "bottleneck"
    resnet_layers: tuple[int, ...] = (3, 4, 6, 3)
    resnet_widths: tuple[int, ...] = (64, 128, 256, 512)
    resnet_stem_stride: int = 2          # the 7 x 7 stem convolution's stride (2 as in ResNet-50; MONAI's default is 1)
    swin_embed_dim: int = 96
    swin_depths: tuple[int, ...] = (2, 2, 6, 2)
    swin_heads: tuple[int, ...] = (3, 6, 12, 24)
    swin_window: int = 7
    swin_patch: int = 4

    @classmethod
    def paper(cls, backbone: str = "resnet") -> "CXREncoderConfig":
        return cls(preset="paper", backbone=backbone)

    @classmethod
    def demo(cls, latent_dim: int = 256, backbone: str = "resnet") -> "CXREncoderConfig":
        return cls(preset="demo", backbone=backbone, image_size=128, latent_dim=latent_dim, resnet_block="basic",
                   resnet_layers=(1, 1, 1, 1), resnet_widths=(32, 64, 128, 256), resnet_stem_stride=1,
                   swin_embed_dim=24,
                   swin_depths=(2, 2, 2, 2), swin_heads=(3, 3, 3, 3), swin_window=4)

    @property
    def feature_dim(self) -> int:
        """Channels of the backbone's last feature map (the head's input)."""
        if self.backbone == "swin":
            return self.swin_embed_dim * 2 ** len(self.swin_depths)    # MONAI's Swin merges after every stage
        expansion = 4 if self.resnet_block == "bottleneck" else 1
        return self.resnet_widths[-1] * expansion


def prepare_radiograph(radiograph: Radiograph, image_size: int) -> torch.Tensor:
    """The one radiograph -> model tensor path (training DRRs and uploaded films alike): (1, S, S) float32, aspect
    kept and padded, standardised over the image (engine.radiograph.normalise_for_model), so a film's own grey
    scale (exposure, bit depth, window) matters less than its shapes."""
    return normalise_for_model(radiograph, size=image_size, standardise=True)


class CXREncoder(PretrainedModel):
    """Radiograph -> unit latent in the CT CLIP's space; feature maps and their exact CAM shares."""

    config_class = CXREncoderConfig
    model_name = "CXR encoder"

    def __init__(self, config: CXREncoderConfig):
        super().__init__()
        if config.backbone not in BACKBONES:
            raise UserError(f"The CXR encoder backbone must be one of {', '.join(BACKBONES)}, not {config.backbone!r}.")
        self.config = config
        if config.backbone == "resnet":
            from monai.networks.nets import ResNet

            self.backbone = ResNet(block=config.resnet_block, layers=list(config.resnet_layers),
                                   block_inplanes=list(config.resnet_widths), spatial_dims=2, n_input_channels=1,
                                   conv1_t_stride=config.resnet_stem_stride, feed_forward=False)
        else:
            from monai.networks.nets.swin_unetr import SwinTransformer

            self.backbone = SwinTransformer(in_chans=1, embed_dim=config.swin_embed_dim,
                                            window_size=(config.swin_window,) * 2, patch_size=(config.swin_patch,) * 2,
                                            depths=config.swin_depths, num_heads=config.swin_heads, spatial_dims=2)
        self.to_latent = nn.Linear(config.feature_dim, config.latent_dim, bias=False)

    # ------------------------------------------------------------------------------------------------ input
    def prepare(self, radiograph: Radiograph) -> torch.Tensor:
        """This encoder's input for a radiograph: prepare_radiograph at its image_size."""
        return prepare_radiograph(radiograph, self.config.image_size)

    # ----------------------------------------------------------------------------------------------- encoding
    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """(b, 1, S, S) -> the backbone's last feature map (b, c, h, w)."""
        if self.config.backbone == "swin":
            return self.backbone(images)[-1]
        net = self.backbone
        x = net.act(net.bn1(net.conv1(images)))
        if not net.no_max_pool:
            x = net.maxpool(x)
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(b, 1, S, S) -> unit latent (b, latent)."""
        return F.normalize(self.to_latent(self.feature_map(images).mean(dim=(2, 3))), dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_image(images)

    def location_scores(self, images: torch.Tensor, text_latent: torch.Tensor) -> torch.Tensor:
        """Each feature-map location's exact share of the cosine score <latent, q> (b, h, w); they sum to the score.
        text_latent: (latent,) or (b, latent), unit norm (a report's, or a finding prompt's, latent)."""
        features = self.feature_map(images)                                   # (b, c, h, w)
        b, _, h, w = features.shape
        per_location = torch.einsum("lc,bchw->bhwl", self.to_latent.weight, features)   # W f_k
        norm = per_location.mean(dim=(1, 2)).norm(dim=-1)                     # |v|, v = W mean_k f_k
        q = text_latent.expand(b, -1) if text_latent.ndim == 1 else text_latent
        return torch.einsum("bhwl,bl->bhw", per_location, q.to(per_location.dtype)) / (h * w * norm[:, None, None])
