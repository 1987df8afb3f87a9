"""The one tiny CT CLIP the tests build (a few seconds on a CPU): the demo preset shrunk, on a 16 x 32 x 32 grid
over the demo field of view. Tests that need another variant pass the fields they change (either config layout)."""
from __future__ import annotations

from engine.models.ctclip import CTCLIPConfig

TINY_SHAPE = (16, 32, 32)  # (z, y, x) voxels
TINY_SPACING = (350.0 / 32, 350.0 / 32, 300.0 / 16)  # (x, y, z) mm: the demo field of view on TINY_SHAPE


def tiny_ctclip_overrides(**changes) -> dict:
    """Overrides of CTCLIPConfig.demo() (flat field names, as training's TrainConfig.model_overrides takes them):
    a 1 + 1-layer, 32-wide CT-ViT with 2 x 2 x 2 tokens, latent 32, 64 report tokens; MiniLM stays the text tower."""
    return {"input_shape": TINY_SHAPE, "patch_size": 16, "temporal_patch_size": 8, "vision_dim": 32,
            "spatial_depth": 1, "temporal_depth": 1, "heads": 2, "dim_head": 16, "latent_dim": 32, "max_length": 64,
            **changes}


def tiny_ctclip_config(small_text: bool = False, **changes) -> CTCLIPConfig:
    """The tiny config; small_text swaps MiniLM's architecture for a random 1-layer, 32-wide BERT (the MiniLM
    tokenizer still), for tests that never load pretrained text weights."""
    demo = CTCLIPConfig.demo()
    if small_text:
        changes.setdefault("text_config", dict(demo.text.architecture, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=64))
    return CTCLIPConfig.from_dict({**demo.to_dict(), "preset": "tiny", **tiny_ctclip_overrides(**changes)})


def tiny_vae_config():
    """The demo autoencoder's family at 8 channels and three levels (4x): TINY_SHAPE (16, 32, 32) <-> latent
    4 x 4 x 8 x 8."""
    from engine.models.vae import VAEConfig

    return VAEConfig.from_dict({**VAEConfig.demo().to_dict(), "preset": "tiny", "channels": (8, 8, 8),
                                "num_res_blocks": (1, 1, 1), "latent_channels": 4, "norm_num_groups": 4})


def tiny_unet_config(**changes):
    """The demo U-Net's family at 8-16 channels on the tiny latent (4, 4, 8, 8), context 32 = the tiny CT CLIP's
    latent, the tiny grid's spacing."""
    from engine.models.diffusion_unet import DiffusionUNetConfig

    z, y, x = TINY_SHAPE
    return DiffusionUNetConfig.from_dict({
        **DiffusionUNetConfig.demo().to_dict(), "preset": "tiny", "channels": (8, 16, 16),
        "num_head_channels": (8, 8, 8), "norm_num_groups": 8, "context_dim": 32, "default_steps": 4, "latent_channels": 4,
        "latent_shape": (4, z // 4, y // 4, x // 4), "image_spacing": TINY_SPACING, **changes})


def tiny_cxr_config(latent_dim: int = 32):
    """The demo chest X-ray encoder (already small: ResNet 1-1-1-1, widths 16..128, 128-pixel input) into a CT CLIP's
    latent of `latent_dim` (32: the tiny CT CLIP's)."""
    from engine.models.cxr_encoder import CXREncoderConfig

    return CXREncoderConfig.demo(latent_dim=latent_dim)


def tiny_unet(seed: int = 0, **changes):
    """A tiny U-Net (tiny_unet_config(**changes)) with random weights everywhere. MONAI zero-initialises the last
    convolution of every residual block, of every attention block and of the output, so a fresh U-Net predicts 0
    whatever its context: every prompt would give the same volume and guidance would be void. Those weights get
    PyTorch's default convolution initialisation (uniform within 1 / sqrt(fan-in)) here, so that the prompt changes
    the volume as it does in a trained model."""
    import math

    import torch

    from engine.models.diffusion_unet import DiffusionUNet

    unet = DiffusionUNet(tiny_unet_config(**changes))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in unet.parameters():
            if weight.dim() > 1 and not weight.any():
                bound = 1.0 / math.sqrt(weight[0].numel())
                weight.uniform_(-bound, bound, generator=generator)
    return unet
