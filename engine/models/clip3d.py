"""Text2CT's CLIP3D: the CT-aligned text encoder that conditions the paper generator (and its 3-D image side).

    report "Findings: ... Impression: ..." -> CLIP BPE tokens (<= 512) -> CLIP text transformer (causal, 12 x 768,
        quick_gelu) -> pooled at the end-of-text token -> text_projection 768 -> 768 -> L2-normalised (B, 768)
        -> the U-Net's context (B, 1, 768)
    CT (B, 1, 128, 512, 512) -> CT-ViT (dim 768, 16 x 16 x 16-voxel patches -> 8 x 32 x 32 tokens) -> mean over
        depth -> flatten (32 * 32 * 768 = 786432) -> visual_projection -> L2-normalised (B, 768)

The text tower is engine/models/text.py's "clip" family (transformers' CLIPTextModel) and the image tower
engine/models/ctvit.py's CT-ViT, so the state-dict names are those of CLIP3D_Finding_Impression_30ep.pt without its
`model.` wrapper prefix (../shared/manifests/text2ct_clip3d.json; engine/convert/text2ct.py maps it). There is no
demo preset: the demo generator is conditioned on the demo CT CLIP's text latent (engine/models/ctclip.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.base import ModelConfig, PretrainedModel
from engine.models.ctvit import CTViT, CTViTConfig
from engine.models.text import TextConfig, text_family

# Every OpenAI CLIP checkpoint ships the same BPE tokenizer (vocab 49408); CLIP3D uses it with 512 positions, so its
# text weights cannot come from OpenAI's 77-position models: they come from the official file only.
CLIP_TOKENIZER = "openai/clip-vit-base-patch32"
CLIP3D_TEXT_ARCHITECTURE = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                num_hidden_layers=12, projection_dim=768, max_position_embeddings=512,
                                hidden_act="quick_gelu", layer_norm_eps=1e-5)


def clip3d_text_config() -> TextConfig:
    return TextConfig(family="clip", pretrained="", tokenizer_path=CLIP_TOKENIZER,
                      architecture=dict(CLIP3D_TEXT_ARCHITECTURE), max_length=512)


def clip3d_vision_config() -> CTViTConfig:
    """CT-ViT(dim=768, image_size=512, patch_size=16, temporal_patch_size=16, depth 4 + 4, dim_head 32, heads 8) on
    Text2CT's 128 x 512 x 512 input, with the vector quantiser and the unused decoder heads of the official file."""
    return CTViTConfig(dim=768, input_shape=(128, 512, 512), patch_size=16, temporal_patch_size=16, spatial_depth=4,
                       temporal_depth=4, heads=8, dim_head=32, codebook_size=8192, use_vq=True,
                       official_decoder_heads=True)


@dataclass
class CLIP3DConfig(ModelConfig):
    preset: str = "paper"
    text: TextConfig = field(default_factory=clip3d_text_config)
    vision: CTViTConfig = field(default_factory=clip3d_vision_config)
    embed_dim: int = 768

    @classmethod
    def paper(cls) -> "CLIP3DConfig":
        return cls()

    @property
    def vision_embed_dim(self) -> int:
        """Flattened depth-pooled token grid: h * w * dim (32 * 32 * 768 = 786432)."""
        _, h, w = self.vision.grid
        return h * w * self.vision.dim


class CLIP3D(PretrainedModel):
    """CLIP3D with its official names (text_model.*, vision_model.*, text_projection, visual_projection,
    logit_scale)."""

    config_class = CLIP3DConfig
    keep_float32 = (".vq.",)
    model_name = "CLIP3D"

    def __init__(self, config: CLIP3DConfig):
        super().__init__()
        self.config = config
        self.text_model = text_family(config.text).build(config.text.architecture)
        self.vision_model = CTViT(config.vision)
        self.text_projection = nn.Linear(config.text.hidden_size, config.embed_dim, bias=False)
        self.visual_projection = nn.Linear(config.vision_embed_dim, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))  # log(1 / 0.07), CLIP's initial temperature
        self._tokenizer = None

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if self._tokenizer is None:
            self._tokenizer = self.config.text.load_tokenizer()
        return self._tokenizer(list(texts), padding=True, truncation=True, max_length=self.config.text.max_length,
                               return_tensors="pt")

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, n) -> unit-norm text latent (B, 768) (pooled at the end-of-text token, projected)."""
        pooled = text_family(self.config.text).features(self.text_model, input_ids, attention_mask)
        return F.normalize(self.text_projection(pooled), dim=-1)

    def encode_image(self, volume: torch.Tensor) -> torch.Tensor:
        """Volume (B, 1, 128, 512, 512) in Text2CT's [0, 1] intensity -> unit-norm image latent (B, 768)."""
        tokens = self.vision_model(volume)  # (B, t, h, w, d)
        return F.normalize(self.visual_projection(tokens.mean(dim=1).flatten(1)), dim=-1)

    def after_load(self, device) -> None:
        text_family(self.config.text).reset_buffers(self.text_model, device)
