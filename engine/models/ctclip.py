"""CT-CLIP: a CT-ViT image tower and a text tower meeting in one L2-normalised latent space.

    volume (b, 1, z, y, x) -> CT-ViT -> tokens (b, t, h, w, d) -> mean over t -> (b, h, w, d) -> flatten
        -> to_visual_latent (Linear h*w*d -> latent, no bias) -> L2 normalise
    report tokens -> text tower (engine/models/text.py; BERT: [CLS] of the last hidden state)
        -> to_text_latent (Linear, no bias) -> L2 normalise
    logits = exp(temperature) * text_latent @ image_latent.T; loss = symmetric InfoNCE (engine/models/losses.py)

Two presets share this code:
- `CTCLIPConfig.paper()`: the official CT-CLIP v2 (ibrahimethemhamamci/CT-CLIP) so `CT-CLIP_v2.pt` loads by name
  (see engine/convert/ctclip.py): CT-ViT dim 512 on (240, 480, 480), BERT-base (CXR-BERT-specialized), latent 512.
- `CTCLIPConfig.demo()`: small enough to train on a 2-core CPU from this repository's phantom data: CT-ViT dim 192 on
  (64, 128, 128), the offline all-MiniLM-L6-v2 text tower (384-d), latent 256, no vector quantiser.
  `CTCLIPConfig.demo_token_features()` is the same with the token-feature vision family (vision.family =
  "token_features": frozen per-token features -> the CT-ViT's transformers; engine/models/ctvit.py).

Because to_visual_latent is linear and the depth pooling a mean, the image-text score splits exactly over the CT-ViT
tokens: `token_scores` gives each token's share, a heat map of where the text matches that sums to the score.
Zero-shot reading (CT-CLIP's rule, `zero_shot_probabilities`): per label, a softmax over the scaled cosines of the
prompt pair ("{label} is present." / "{label} is not present.", `zero_shot_prompts`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import UserError
from engine.labels import LABELS
from engine.models.base import TOKENIZER_DIR, ModelConfig, PretrainedModel
from engine.models.ctvit import CTViTConfig, vision_encoder
from engine.models.losses import symmetric_infonce
from engine.models.text import TextConfig, load_pretrained_text_weights, pretrained_text_state, text_family
from engine.transforms import Preprocessing

ZERO_SHOT_PROMPTS = ("{label} is present.", "{label} is not present.")


def zero_shot_prompts(label: str) -> tuple[str, str]:
    """CT-CLIP's prompt pair for one label: (present, not present)."""
    return tuple(p.format(label=label) for p in ZERO_SHOT_PROMPTS)


def all_zero_shot_prompts(labels=LABELS) -> list[str]:
    """The 2 * len(labels) prompts in (label, pair) order: reshape their latents to (labels, 2, latent)."""
    return [p for label in labels for p in zero_shot_prompts(label)]


def zero_shot_logits(image_latents: torch.Tensor, prompt_latents: torch.Tensor, scale) -> torch.Tensor:
    """The zero-shot rule as logits (n, labels): scale * (cos(image, present) - cos(image, not present)); a softmax
    over a pair of logits is the sigmoid of their difference. image_latents (n, latent) and prompt_latents
    (labels, 2, latent), all unit norm. Training's prompt-label loss is a BCE on exactly these."""
    cos = torch.einsum("nd,lpd->nlp", image_latents, prompt_latents)
    return scale * (cos[..., 0] - cos[..., 1])


def zero_shot_probabilities(image_latents: torch.Tensor, prompt_latents: torch.Tensor, scale: float) -> torch.Tensor:
    """P(present) (n, labels): softmax over each label's prompt pair of scale * cosine (CT-CLIP's rule)."""
    return torch.sigmoid(zero_shot_logits(image_latents, prompt_latents, scale))


@dataclass
class CTCLIPConfig(ModelConfig):
    """Everything that fixes the architecture: the vision config, the text config and the shared space."""

    preset: str = "paper"
    vision: CTViTConfig = field(default_factory=CTViTConfig.paper)
    text: TextConfig = field(default_factory=TextConfig.paper)
    latent_dim: int = 512
    temperature_init: float = 1.0  # logit scale = exp(temperature)
    # CLOOB's extra projections, present in CT-CLIP_v2.pt but disabled in v2: kept only so the file loads strictly
    official_extra_projections: bool = True

    @classmethod
    def paper(cls) -> "CTCLIPConfig":
        """CT-CLIP v2 exactly (438,148,761 parameters with the unused official modules)."""
        return cls()

    @classmethod
    def demo(cls) -> "CTCLIPConfig":
        """Small CPU preset (why each part differs from the paper: CTViTConfig.demo and TextConfig.demo)."""
        return cls(preset="demo", vision=CTViTConfig.demo(), text=TextConfig.demo(), latent_dim=256,
                   official_extra_projections=False)

    @classmethod
    def demo_token_features(cls, preset: str = "demo") -> "CTCLIPConfig":
        """The demo CT CLIP on frozen per-token features (CTViTConfig.demo_token_features; issue 12)."""
        return cls(preset="demo", vision=CTViTConfig.demo_token_features(preset), text=TextConfig.demo(),
                   latent_dim=256, official_extra_projections=False)

    @classmethod
    def from_dict(cls, d: dict) -> "CTCLIPConfig":
        """Nested (this code's) or flat (config.json files written before the vision/text split) layout."""
        return super().from_dict(_nest_flat_layout(d))

    @property
    def visual_dim(self) -> int:
        """Input width of to_visual_latent: h * w * vision dim (the depth axis is mean-pooled)."""
        _, h, w = self.vision.grid
        return h * w * self.vision.dim

    def default_preprocessing(self) -> Preprocessing:
        """For a folder without preprocessing.json: paper -> CT-CLIP's (0.75, 0.75, 1.5 mm, 240 x 480 x 480);
        otherwise the demo field of view (350 x 350 x 300 mm) on the vision input_shape (= transforms.DEMO at the
        demo's (64, 128, 128)); the token-feature family takes that grid in HU, then TokenFeatures."""
        from dataclasses import replace

        from engine.transforms import CTCLIP, DEMO

        shape = tuple(self.vision.input_shape)
        if self.preset == "paper":
            return CTCLIP
        if shape == tuple(DEMO.shape_zyx):
            grid = DEMO
        else:
            fov_zyx = [n * s for n, s in zip(DEMO.shape_zyx, reversed(DEMO.spacing_xyz))]
            spacing_xyz = tuple(f / n for f, n in zip(reversed(fov_zyx), reversed(shape)))
            grid = Preprocessing(f"demo-{'x'.join(map(str, shape))}", spacing_xyz, shape)
        if self.vision.family == "token_features":   # HU on the same grid, then TokenFeatures
            preset = self.vision.token_feature_preset
            return replace(grid, name=f"{grid.name}-token-features-{preset}", token_features=preset)
        return grid


# config.json keys of the flat layout (before the vision/text split) -> (nested config, field name)
_FLAT_KEYS = {
    "input_shape": ("vision", "input_shape"), "patch_size": ("vision", "patch_size"),
    "temporal_patch_size": ("vision", "temporal_patch_size"), "vision_dim": ("vision", "dim"),
    "spatial_depth": ("vision", "spatial_depth"), "temporal_depth": ("vision", "temporal_depth"),
    "heads": ("vision", "heads"), "dim_head": ("vision", "dim_head"), "use_vq": ("vision", "use_vq"),
    "codebook_size": ("vision", "codebook_size"), "patch_hu_edges": ("vision", "patch_hu_edges"),
    "patch_hu_log_share": ("vision", "patch_hu_log_share"),
    "text_model": ("text", "pretrained"), "tokenizer_path": ("text", "tokenizer_path"),
    "text_config": ("text", "architecture"), "max_length": ("text", "max_length"),
    "pretrained_text_tensors": ("text", "pretrained_tensors"),
}


def _nest_flat_layout(d: dict) -> dict:
    """Move flat-layout keys into the nested vision / text dicts (also accepts flat override keys on top of a
    nested dict, as training's model_overrides give them). The flat `official_unused_modules` switched both the
    CT-ViT decoder heads and the extra projections."""
    d = dict(d)
    nested = {"vision": dict(d.pop("vision", {})), "text": dict(d.pop("text", {}))}
    for key in [k for k in d if k in _FLAT_KEYS]:
        part, name = _FLAT_KEYS[key]
        nested[part][name] = d.pop(key)
    if "official_unused_modules" in d:
        unused = d.pop("official_unused_modules")
        nested["vision"]["official_decoder_heads"] = unused
        d["official_extra_projections"] = unused
    # a flat file states every field; a missing nested one keeps the paper default, as the flat loader did
    return {**d, **{part: values for part, values in nested.items() if values}}


@dataclass
class CTCLIPOutput:
    loss: torch.Tensor  # symmetric InfoNCE, scalar
    logits_per_text: torch.Tensor  # (b_text, b_image), scaled by exp(temperature)
    logits_per_image: torch.Tensor  # its transpose
    text_latent: torch.Tensor  # (b, latent), unit norm
    image_latent: torch.Tensor  # (b, latent), unit norm


class CTCLIP(PretrainedModel):
    config_class = CTCLIPConfig
    keep_float32 = (".vq.",)  # the codebook: float16 would move nearest-code lookups
    model_name = "CT-CLIP"

    def __init__(self, config: CTCLIPConfig):
        super().__init__()
        self.config = config
        self.visual_transformer = vision_encoder(config.vision)   # CTViT or TokenFeatureViT
        self.text_transformer = text_family(config.text).build(config.text.architecture)
        self.to_text_latent = nn.Linear(config.text.hidden_size, config.latent_dim, bias=False)
        self.to_visual_latent = nn.Linear(config.visual_dim, config.latent_dim, bias=False)
        self.temperature = nn.Parameter(torch.tensor(float(config.temperature_init)))
        if config.official_extra_projections:
            # CT-CLIP_v2.pt always stores these deep copies (CLOOB's extra projections, disabled in v2). Never used
            # by this class; they exist only so the official file loads strictly. engine/convert can drop them.
            self.to_text_latent_extra = nn.Linear(config.text.hidden_size, config.latent_dim, bias=False)
            self.to_visual_latent_extra = nn.Linear(config.visual_dim, config.latent_dim, bias=False)
        self._tokenizer = None

    # ------------------------------------------------------------------------------------------------ text side
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self.config.text.load_tokenizer()
        return self._tokenizer

    def tokenize(self, texts: str | list[str]) -> dict[str, torch.Tensor]:
        """Report text(s) -> {"input_ids", "attention_mask"} (b, n) padded to the longest, truncated at max_length.
        (The reference pads to max_length; with the attention mask the [CLS] output is the same.)"""
        if isinstance(texts, str):
            texts = [texts]
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.config.text.max_length,
                             return_tensors="pt")
        device = self.to_text_latent.weight.device
        return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}

    def text_latent_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Text tower features (b, hidden) -> unit-norm text latent (b, latent)."""
        return F.normalize(self.to_text_latent(features), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (b, n) -> unit-norm text latent (b, latent)."""
        features = text_family(self.config.text).features(self.text_transformer, input_ids, attention_mask)
        return self.text_latent_from_features(features)

    # ----------------------------------------------------------------------------------------------- image side
    def image_tokens(self, volume: torch.Tensor) -> torch.Tensor:
        """Volume (b, 1, z, y, x) (or token features (b, t, h, w, F) for the token-feature family) -> the vision
        tower's tokens mean-pooled over depth: (b, h, w, vision dim)."""
        return self.visual_transformer(volume).mean(dim=1)

    def image_latent_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pooled tokens (b, h, w, d) -> unit-norm image latent (b, latent)."""
        return F.normalize(self.to_visual_latent(tokens.flatten(1)), dim=-1)

    def encode_image(self, volume: torch.Tensor) -> torch.Tensor:
        """Volume (b, 1, z, y, x), HU/1000 in [-1, 1] (engine/transforms) -> unit-norm image latent (b, latent)."""
        return self.image_latent_from_tokens(self.image_tokens(volume))

    def token_scores(self, tokens: torch.Tensor, text_latent: torch.Tensor) -> torch.Tensor:
        """Exact share of each token in the cosine image-text score, summing to the score.

        tokens: pooled (b, h, w, d) from `image_tokens` -> shares (b, h, w); or the CT-ViT's unpooled grid
        (b, t, h, w, d) -> shares (b, t, h, w) (depth pooling is a mean: each slab token counts 1/t).
        score = <v / |v|, q> with v = W x = sum_k W_k x_k, so token k contributes <W_k x_k, q> / |v|.
        text_latent (latent,) or (b, latent), unit norm. Multiply by `logit_scale` for the share of the logit."""
        if text_latent.ndim == 1:
            return self.token_score_maps(tokens, text_latent[None])[..., 0]
        pooled = tokens.mean(dim=1) if tokens.ndim == 5 else tokens
        b, h, w, d = pooled.shape
        weight = self.to_visual_latent.weight.view(-1, h, w, d)  # (latent, h, w, d)
        q = text_latent
        back = torch.einsum("bl,lhwd->bhwd", q.to(weight.dtype), weight)  # q^T W_k per token
        norm = self.to_visual_latent(pooled.flatten(1)).norm(dim=-1)  # |v|
        if tokens.ndim == 5:
            return (back[:, None] * tokens).sum(-1) / (tokens.shape[1] * norm[:, None, None, None])
        return (back * tokens).sum(-1) / norm[:, None, None]

    def token_score_maps(self, tokens: torch.Tensor, prompt_latents: torch.Tensor) -> torch.Tensor:
        """token_scores of several text latents at once: tokens (b, [t,] h, w, d), prompt_latents (p, latent) unit
        norm -> shares (b, [t,] h, w, p), each map summing to that prompt's cosine score (one pass, not p)."""
        pooled = tokens.mean(dim=1) if tokens.ndim == 5 else tokens
        b, h, w, d = pooled.shape
        weight = self.to_visual_latent.weight.view(-1, h, w, d)  # (latent, h, w, d)
        back = torch.einsum("pl,lhwd->hwdp", prompt_latents.to(weight.dtype), weight)  # q^T W_k per token
        norm = self.to_visual_latent(pooled.flatten(1)).norm(dim=-1)  # |v| (b,)
        if tokens.ndim == 5:
            shares = torch.einsum("bthwd,hwdp->bthwp", tokens, back) / tokens.shape[1]
            return shares / norm[:, None, None, None, None]
        return torch.einsum("bhwd,hwdp->bhwp", tokens, back) / norm[:, None, None, None]

    # -------------------------------------------------------------------------------------------------- CLIP
    @property
    def logit_scale(self) -> torch.Tensor:
        return self.temperature.exp()

    def forward(self, input_ids, attention_mask, volume) -> CTCLIPOutput:
        """Paired batch: texts (b, n) and volumes (b, 1, z, y, x). Text i matches volume i."""
        text_latent = self.encode_text(input_ids, attention_mask)
        image_latent = self.encode_image(volume)
        logits_per_text = self.logit_scale * text_latent @ image_latent.t()
        loss = symmetric_infonce(logits_per_text)
        return CTCLIPOutput(loss, logits_per_text, logits_per_text.t(), text_latent, image_latent)

    # --------------------------------------------------------------------------------------- weights and assets
    def load_pretrained_text(self, source: str | None = None) -> None:
        """Copy pretrained text weights (local dir, or hub id if the user has it) into the text tower."""
        load_pretrained_text_weights(self.text_transformer, self.config.text, source)

    @classmethod
    def build(cls, config: CTCLIPConfig, pretrained_text: bool = True) -> "CTCLIP":
        """A fresh model for training: random CT-ViT and heads, pretrained text tower (if pretrained_text)."""
        model = cls(config)
        if pretrained_text:
            model.load_pretrained_text()
        return model

    @classmethod
    def default_preprocessing(cls, config: CTCLIPConfig) -> Preprocessing:
        return config.default_preprocessing()

    @classmethod
    def config_from_json(cls, d: dict, directory: Path) -> CTCLIPConfig:
        config = CTCLIPConfig.from_dict(d)
        if config.text.tokenizer_path and (directory / config.text.tokenizer_path).is_dir():
            config.text.tokenizer_path = str(directory / config.text.tokenizer_path)
        return config

    def extra_state(self, device) -> dict[str, torch.Tensor]:
        """The frozen pretrained text tensors the weights file leaves out (config.text.pretrained_tensors)."""
        return pretrained_text_state(self.config.text, "text_transformer.", device)

    def after_load(self, device) -> None:
        text_family(self.config.text).reset_buffers(self.text_transformer, device)

    def save_extras(self, directory: Path, config: dict) -> None:
        """The tokenizer files into DIR/tokenizer (config.json then names it relative to the folder)."""
        import shutil

        try:
            tokenizer_dir = directory / TOKENIZER_DIR
            if tokenizer_dir.exists():
                shutil.rmtree(tokenizer_dir)
            self.tokenizer.save_pretrained(str(tokenizer_dir))
            config["text"]["tokenizer_path"] = TOKENIZER_DIR
        except UserError:
            pass  # tokenizer unavailable offline (paper hub id): keep the id so users with it can load it
