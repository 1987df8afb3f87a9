"""CT-ViT: the 3-D vision transformer that encodes a chest CT for CT-CLIP.

Matches the encoder of ibrahimethemhamamci/CT-CLIP (itself lucidrains' Phenaki C-ViT with 3-D patches) so the
official `CT-CLIP_v2.pt` weights load by name and compute the same function:

    volume (b, 1, z, y, x)                              z = slices (the reference calls it "time"/t)
    -> patches  b c (t pt) (h p1) (w p2) -> b t h w (c pt p1 p2)
    -> LayerNorm, Linear, LayerNorm                     (b, t, h, w, dim)
    -> spatial transformer over (b t) (h w) dim          2-D continuous position bias on (h, w)
    -> temporal transformer over (b h w) t dim           no position bias; not causal
    -> cosine-similarity vector quantiser (optional)     tokens replaced by their codebook vector
    -> token grid (b, t, h, w, dim)

A second vision family for the demo preset (`CTViTConfig.family = "token_features"`, `TokenFeatureViT`, issue 12):
the frozen per-token features of engine/token_features.py replace the patch embedding, and the same spatial and
temporal transformers run on top:

    features (b, t, h, w, F) (engine.transforms.TokenFeatures: HU windows up to metal, Hessian blob/tube/plate, ...)
    -> standardise with the training cache's mean / SD (config: feature_mean, feature_std), clip to +-8 SD
    -> Linear(F, dim) + learned position embedding (t, h, w, dim) -> LayerNorm
    -> spatial transformer, temporal transformer (as above)   -> token grid (b, t, h, w, dim)

Every transformer layer is [PEG, self-attention, (no cross-attention), GEGLU feed-forward], pre-norm, residual.
Paper preset (v2): dim 512, image 480, patch 20, temporal patch 10, depth 4 + 4, 8 heads x 32 -> grid 24 x 24 x 24.

Two behaviours of the reference are kept on purpose because the public weights were trained with them:
- attention keys/values are computed from the layer input *before* its LayerNorm (only queries are normalised);
- the temporal transformer's PEG reshapes its ((b h w), t, d) tokens straight to (b, t, h, w, d), i.e. it convolves a
  scrambled grid. It is still a fixed, learnable token mixing, and changing it would break the official weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import UserError
from engine.models.base import ModelConfig

# HU thresholds of the demo CT-ViT's per-patch density input: below -950 = emphysema (LAA-950), lung, ground glass,
# fat, fluid (0-20) vs soft tissue (35-55), calcification, bone/metal (ct-appearance values).
DEMO_PATCH_HU_EDGES = (-950.0, -800.0, -500.0, -200.0, -50.0, 25.0, 100.0, 300.0, 950.0)


@dataclass
class CTViTConfig(ModelConfig):
    """Shape of the CT-ViT. Sizes are in voxels of the preprocessed volume, (z, y, x) order."""

    dim: int = 512
    # (z, y, x) of the training input: (y, x) is fixed by the position bias and the CT CLIP head; z may be any
    # positive multiple of temporal_patch_size (the CT CLIP mean-pools it away)
    input_shape: tuple[int, int, int] = (240, 480, 480)
    patch_size: int = 20  # in-plane voxels per token side (y and x)
    temporal_patch_size: int = 10  # slices per token (z)
    spatial_depth: int = 4
    temporal_depth: int = 4
    heads: int = 8
    dim_head: int = 32
    channels: int = 1
    ff_mult: int = 4
    use_vq: bool = True  # cosine-similarity vector quantiser after the encoder (the reference always has it)
    codebook_size: int = 8192
    vq_decay: float = 0.8  # EMA decay of the codebook (train mode only)
    official_decoder_heads: bool = True  # keep the unused decoder-side modules of the official file (name compat)
    # Demo-only: HU thresholds (in HU; the input is HU / hu_per_unit) whose per-patch "fraction of voxels above"
    # is embedded and added to each token (PatchDensityEmbedding). () = off, as in the reference.
    patch_hu_edges: tuple[float, ...] = ()
    # Demo-only: also embed log(share above) and log(share below) of each edge (PatchDensityEmbedding.log_proj)
    patch_hu_log_share: bool = False
    hu_per_unit: float = 1000.0  # CT-CLIP's input scaling: model unit = HU / 1000
    # "ctvit" (voxels -> patch embedding, CTViT) or "token_features" (cached per-token features, TokenFeatureViT)
    family: str = "ctvit"
    # token_features only: the TokenFeatureConfig preset ("demo" 71 features | "fast" 45) and each feature's mean
    # and SD over the training cache (feature units, see engine/token_features.py), written by the trainer
    token_feature_preset: str = "demo"
    feature_mean: tuple[float, ...] = ()
    feature_std: tuple[float, ...] = ()

    @classmethod
    def paper(cls) -> "CTViTConfig":
        """CT-CLIP v2's CT-ViT: dim 512 on (240, 480, 480), patches 10 x 20 x 20 -> a 24 x 24 x 24 token grid."""
        return cls()

    @classmethod
    def demo(cls) -> "CTViTConfig":
        """Small CPU CT-ViT on (64, 128, 128), patches 8 x 16 x 16 -> 8 x 8 x 8 tokens. No vector quantiser: CT-CLIP
        inherits it from the video VQ-autoencoder its CT-ViT came from; trained from scratch on little data, its EMA
        codebook uses few codes, snaps every token to one of them and passes only a straight-through gradient,
        which throws away detail a small model needs. No unused official heads (no official file to load). One
        addition the official model lacks: the per-patch density input (DEMO_PATCH_HU_EDGES; its log-share
        channels, patch_hu_log_share, are switched on by `--density-log-share` for the stage that added them)."""
        return cls(dim=192, input_shape=(64, 128, 128), patch_size=16, temporal_patch_size=8, spatial_depth=2,
                   temporal_depth=2, heads=4, dim_head=32, use_vq=False, official_decoder_heads=False,
                   patch_hu_edges=DEMO_PATCH_HU_EDGES)

    @classmethod
    def demo_token_features(cls, preset: str = "demo") -> "CTViTConfig":
        """The demo encoder on frozen per-token features (issue 12): the demo CT-ViT's transformers and token grid
        (8 x 8 x 8 of 8 x 16 x 16 voxels), no patch or density embedding. feature_mean / feature_std start empty
        (identity) and are set by the trainer from its cache."""
        return cls(dim=128, input_shape=(64, 128, 128), patch_size=16, temporal_patch_size=8, spatial_depth=2,
                   temporal_depth=2, heads=4, dim_head=32, use_vq=False, official_decoder_heads=False,
                   family="token_features", token_feature_preset=preset)

    @property
    def n_features(self) -> int:
        """F, the per-token feature count of token_feature_preset."""
        from engine.transforms import TokenFeatures
        from engine.token_features import feature_names
        return len(feature_names(TokenFeatures(self.token_feature_preset).config()))

    @property
    def image_size(self) -> tuple[int, int]:
        """(y, x) voxels of every input slice."""
        return self.input_shape[1], self.input_shape[2]

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid (t, h, w) for `input_shape`."""
        z, y, x = self.input_shape
        return z // self.temporal_patch_size, y // self.patch_size, x // self.patch_size


def l2norm(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t, dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# building blocks


class BiaslessLayerNorm(nn.Module):
    """LayerNorm with a learned gain and a fixed zero bias (kept as the persistent `beta` buffer of the reference)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.register_buffer("beta", torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.gamma, self.beta)


class GEGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.gelu(gate) * x


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """Pre-norm GEGLU MLP; the inner width int(mult * 2/3 * dim) keeps the parameter count of a plain 4x MLP."""
    inner = int(mult * (2 / 3) * dim)
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner * 2, bias=False),
        GEGLU(),
        nn.Dropout(0.0),
        nn.Linear(inner, dim, bias=False),
    )


class PEG(nn.Module):
    """Position-generating depthwise 3x3x3 convolution over the (t, h, w) token grid, causally padded along t."""

    def __init__(self, dim: int, causal: bool = True):
        super().__init__()
        self.causal = causal
        self.dsconv = nn.Conv3d(dim, dim, 3, groups=dim)

    def forward(self, x: torch.Tensor, video_shape: tuple[int, int, int, int]) -> torch.Tensor:
        orig_shape = x.shape
        # Plain reshape to (b, t, h, w, d) whatever the token order is (see the module docstring).
        x = x.reshape(*video_shape, -1).permute(0, 4, 1, 2, 3)
        frame_pad = (2, 0) if self.causal else (1, 1)
        x = F.pad(x, (1, 1, 1, 1, *frame_pad))
        x = self.dsconv(x)
        return x.permute(0, 2, 3, 4, 1).reshape(orig_shape)


class Attention(nn.Module):
    """Multi-head self-attention with L2-normalised queries/keys, learned per-dim q/k scales and a fixed scale 8."""

    def __init__(self, dim: int, dim_head: int = 32, heads: int = 8, scale: float = 8.0):
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.scale = scale
        self.norm = BiaslessLayerNorm(dim)
        self.context_norm = BiaslessLayerNorm(dim)  # for cross-attention in the reference; unused, kept for names
        self.null_kv = nn.Parameter(torch.zeros(heads, 0, dim_head))  # zero "null" key/values: empty, for names
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.q_scale = nn.Parameter(torch.ones(dim_head))
        self.k_scale = nn.Parameter(torch.ones(dim_head))
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # (b, n, h*d) -> (b, h, n, d)
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (b, n, dim); attn_bias (heads, n, n) added to the logits. Returns (b, n, dim)."""
        k, v = self.to_kv(x).chunk(2, dim=-1)  # from the un-normalised input, as in the reference
        q = self.to_q(self.norm(x))
        q, k, v = map(self._heads, (q, k, v))
        q = l2norm(q) * self.q_scale
        k = l2norm(k) * self.k_scale
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale)
        b, h, n, d = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, h * d))


class ContinuousPositionBias(nn.Module):
    """Per-head attention bias from an MLP on signed log-distances between (h, w) token positions (SwinV2)."""

    def __init__(self, dim: int, heads: int, layers: int = 2):
        super().__init__()
        self.net = nn.ModuleList([nn.Sequential(nn.Linear(2, dim), nn.LeakyReLU(0.1))])
        for _ in range(layers - 1):
            self.net.append(nn.Sequential(nn.Linear(dim, dim), nn.LeakyReLU(0.1)))
        self.net.append(nn.Linear(dim, heads))

    def forward(self, h: int, w: int) -> torch.Tensor:
        """Returns (heads, h*w, h*w). The MLP is run on the (2h-1)(2w-1) distinct offsets and then gathered, which
        gives the reference's values while avoiding its (hw, hw, dim) intermediate (680 MB at 24 x 24)."""
        device = self.net[-1].weight.device
        dy = torch.arange(-(h - 1), h, device=device, dtype=torch.float32)
        dx = torch.arange(-(w - 1), w, device=device, dtype=torch.float32)
        offsets = torch.stack(torch.meshgrid(dy, dx, indexing="ij"), dim=-1)  # (2h-1, 2w-1, 2)
        rel = torch.sign(offsets) * torch.log(offsets.abs() + 1)
        for layer in self.net:
            rel = layer(rel)
        table = rel.permute(2, 0, 1)  # (heads, 2h-1, 2w-1)
        yy, xx = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        yy, xx = yy.flatten(), xx.flatten()
        iy = yy[:, None] - yy[None, :] + (h - 1)  # offset of token i relative to token j
        ix = xx[:, None] - xx[None, :] + (w - 1)
        return table[:, iy, ix]


class Transformer(nn.Module):
    """`depth` layers of [PEG, self-attention, None (no cross-attention), feed-forward] then a bias-less LayerNorm.

    The None slot keeps the reference's layer indices (`layers.N.3` is the feed-forward)."""

    def __init__(self, dim: int, depth: int, dim_head: int, heads: int, ff_mult: int = 4):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([PEG(dim, causal=True), Attention(dim, dim_head, heads), None, feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )
        self.norm_out = BiaslessLayerNorm(dim)

    def forward(self, x, video_shape, attn_bias=None):
        for peg, attn, _, ff in self.layers:
            x = peg(x, video_shape) + x
            x = attn(x, attn_bias=attn_bias) + x
            x = ff(x) + x
        return self.norm_out(x)


# ----------------------------------------------------------------------------------------------------------------
# vector quantiser (layout of vector-quantize-pytorch 1.1.2, `VectorQuantize(use_cosine_sim=True)`)


class CosineCodebook(nn.Module):
    """Codebook buffers: `initted` [1], `cluster_size` [1, K], `embed` [1, K, dim] (one codebook, no projection)."""

    def __init__(self, dim: int, codebook_size: int, decay: float = 0.8):
        super().__init__()
        self.decay = decay
        self.codebook_size = codebook_size
        self.register_buffer("initted", torch.ones(1))
        self.register_buffer("cluster_size", torch.zeros(1, codebook_size))
        self.register_buffer("embed", l2norm(torch.empty(1, codebook_size, dim).uniform_(-1.0, 1.0)))

    @torch.no_grad()
    def nearest(self, flat: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Index of the most cosine-similar code for each row of `flat` (n, dim), in chunks to bound memory."""
        codes = l2norm(self.embed[0].float())
        return torch.cat([(l2norm(c) @ codes.t()).argmax(dim=-1) for c in flat.split(chunk)])

    @torch.no_grad()
    def ema_update(self, flat: torch.Tensor, index: torch.Tensor) -> None:
        """One EMA step of the reference (train mode only): cluster sizes and normalised code means."""
        flat = l2norm(flat.float())
        bins = torch.bincount(index, minlength=self.codebook_size).to(flat.dtype)
        self.cluster_size[0].lerp_(bins, 1 - self.decay)
        sums = torch.zeros_like(self.embed[0]).index_add_(0, index, flat)
        means = l2norm(sums / bins.clamp(min=1)[:, None])
        embed_normed = l2norm(self.embed[0])
        means = torch.where((bins == 0)[:, None], embed_normed, means)
        self.embed[0].lerp_(means, 1 - self.decay)


class VectorQuantizer(nn.Module):
    """Replaces every token by its nearest codebook vector (cosine similarity); straight-through in train mode.

    The codebook is a set of buffers updated by EMA in train mode, even when no optimiser touches the model, so a
    frozen CT-CLIP teacher must stay in eval()."""

    def __init__(self, dim: int, codebook_size: int, decay: float = 0.8):
        super().__init__()
        self._codebook = CosineCodebook(dim, codebook_size, decay)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (b, n, dim) -> (quantised (b, n, dim), code indices (b, n))."""
        b, n, d = x.shape
        flat = x.reshape(b * n, d).detach()
        index = self._codebook.nearest(flat)
        quantised = self._codebook.embed[0][index].view(b, n, d).to(x.dtype)
        if self.training:
            self._codebook.ema_update(flat, index)
            quantised = x + (quantised - x).detach()  # straight-through gradient to the encoder
        return quantised, index.view(b, n)


# ----------------------------------------------------------------------------------------------------------------
# the encoder


class PatchEmbedding(nn.Sequential):
    """b c (t pt) (h p1) (w p2) -> b t h w (c pt p1 p2) -> LayerNorm -> Linear -> LayerNorm (indices 1, 2, 3)."""

    def __init__(self, channels: int, pt: int, p: int, dim: int):
        patch_dim = channels * pt * p * p
        super().__init__(Patchify(pt, p), nn.LayerNorm(patch_dim), nn.Linear(patch_dim, dim), nn.LayerNorm(dim))


class Patchify(nn.Module):
    """Cut (b, c, z, y, x) into non-overlapping (pt, p, p) patches -> (b, t, h, w, c*pt*p*p) with the reference's
    (c, pt, p1, p2) ordering of the features. Written with reshape/permute because einops is not a dependency."""

    def __init__(self, pt: int, p: int):
        super().__init__()
        self.pt, self.p = pt, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, z, y, xx = x.shape
        pt, p = self.pt, self.p
        x = x.reshape(b, c, z // pt, pt, y // p, p, xx // p, p)
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # b t h w c pt p1 p2
        return x.reshape(b, z // pt, y // p, xx // p, c * pt * p * p)


class PatchDensityEmbedding(nn.Module):
    """Per patch, the fraction of voxels above each HU threshold (a soft step, width `softness_hu`) -> Linear -> dim.

    Written by hand because the patch embedding's LayerNorm over the patch's voxels removes each patch's mean and
    spread: a patch inside a pleural effusion (0-20 HU) and one inside the heart (35-55 HU) become alike, and the
    share of lung below -950 HU (how emphysema is quantified, "LAA-950") is gone. These fractions put the densities
    back as a few numbers per token. Demo preset only; the official CT-CLIP has no such input.

    With log_share, log(share above + 1e-3) and log(share below + 1e-3) of each edge go through a second projection.
    Why: what marks emphysema, calcium or metal is a rare voxel class, about 1 % of a patch (emphysema's lung LAA-950
    is 0.4-5 % against 0.05 % in normal lung, phantom measurements), so its share moves the linear input by 0.01,
    which Adam at lr 1e-4 cannot amplify within a CPU run; on the log scale the same change is 2-3 units. log_proj
    starts at zero, so a model continued from a checkpoint without it computes exactly what that checkpoint did."""

    LOG_FLOOR = 1e-3   # about two voxels of a 2,048-voxel demo patch

    def __init__(self, edges_hu: tuple[float, ...], hu_per_unit: float, pt: int, p: int, dim: int,
                 softness_hu: float = 10.0, log_share: bool = False):
        super().__init__()
        self.edges = tuple(float(e) / hu_per_unit for e in edges_hu)  # model units; config, not state
        self.softness = softness_hu / hu_per_unit
        self.pt, self.p = pt, p
        self.proj = nn.Linear(len(edges_hu), dim)
        self.log_proj = nn.Linear(2 * len(edges_hu), dim) if log_share else None
        if self.log_proj is not None:
            nn.init.zeros_(self.log_proj.weight)
            nn.init.zeros_(self.log_proj.bias)

    @torch.no_grad()
    def fractions(self, volume: torch.Tensor) -> torch.Tensor:
        """(b, 1, z, y, x) model units -> (b, t, h, w, n_edges): share of each patch's voxels above each edge."""
        b, _, z, y, x = volume.shape
        pt, p = self.pt, self.p
        out = []
        for edge in self.edges:  # one edge at a time bounds the memory to one volume-sized tensor
            above = torch.sigmoid((volume[:, 0].float() - edge) / self.softness)
            out.append(above.reshape(b, z // pt, pt, y // p, p, x // p, p).mean(dim=(2, 4, 6)))
        return torch.stack(out, dim=-1)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        above = self.fractions(volume).to(self.proj.weight.dtype)
        out = self.proj(above)
        if self.log_proj is not None:
            out = out + self.log_proj(torch.log(torch.cat([above, 1.0 - above], dim=-1).clamp_min(0) + self.LOG_FLOOR))
        return out


class TokenGridEncoder(nn.Module):
    """The spatial then temporal transformer over a (b, t, h, w, dim) token grid, shared by both vision families."""

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Spatial then temporal transformer on a (b, t, h, w, dim) grid; returns the same shape."""
        b, t, h, w, d = tokens.shape
        video_shape = (b, t, h, w)
        attn_bias = self.spatial_rel_pos_bias(h, w)
        x = tokens.reshape(b * t, h * w, d)
        x = self.enc_spatial_transformer(x, video_shape, attn_bias=attn_bias)
        x = x.reshape(b, t, h, w, d).permute(0, 2, 3, 1, 4).reshape(b * h * w, t, d)
        x = self.enc_temporal_transformer(x, video_shape)
        return x.reshape(b, h, w, t, d).permute(0, 3, 1, 2, 4)


class CTViT(TokenGridEncoder):
    """CT-ViT encoder. `forward(volume (b, c, z, y, x))` -> token grid (b, t, h, w, dim) (quantised if use_vq)."""

    def __init__(self, config: CTViTConfig):
        super().__init__()
        self.config = c = config
        if c.image_size[0] % c.patch_size or c.image_size[1] % c.patch_size:
            raise ValueError("image_size must be divisible by patch_size")
        self.spatial_rel_pos_bias = ContinuousPositionBias(c.dim, c.heads)
        if c.official_decoder_heads:  # first-frame patch embedding of the video autoencoder: unused for CT
            first = c.channels * c.patch_size**2
            self.to_patch_emb_first_frame = nn.Sequential(
                nn.Identity(), nn.LayerNorm(first), nn.Linear(first, c.dim), nn.LayerNorm(c.dim)
            )
        self.to_patch_emb = PatchEmbedding(c.channels, c.temporal_patch_size, c.patch_size, c.dim)
        self.patch_density_emb = PatchDensityEmbedding(tuple(c.patch_hu_edges), c.hu_per_unit, c.temporal_patch_size,
                                                       c.patch_size, c.dim, log_share=c.patch_hu_log_share) \
            if c.patch_hu_edges else None
        self.enc_spatial_transformer = Transformer(c.dim, c.spatial_depth, c.dim_head, c.heads, c.ff_mult)
        self.enc_temporal_transformer = Transformer(c.dim, c.temporal_depth, c.dim_head, c.heads, c.ff_mult)
        self.vq = VectorQuantizer(c.dim, c.codebook_size, c.vq_decay) if c.use_vq else None
        if c.official_decoder_heads:  # pixel heads of the video autoencoder: unused by CT-CLIP, kept for names
            self.to_pixels_first_frame = nn.Sequential(nn.Linear(c.dim, c.channels * c.patch_size**2))
            self.to_pixels = nn.Sequential(
                nn.Linear(c.dim, c.channels * c.temporal_patch_size * c.patch_size**2)
            )

    def check_input(self, volume: torch.Tensor) -> None:
        c = self.config
        if volume.ndim != 5 or volume.shape[1] != c.channels:
            raise UserError(f"CT-ViT expects a (batch, {c.channels}, z, y, x) tensor, got shape {tuple(volume.shape)}.")
        z, y, x = volume.shape[2:]
        if (y, x) != tuple(c.image_size) or z % c.temporal_patch_size or z == 0:
            raise UserError(
                f"CT-ViT expects (y, x) = {tuple(c.image_size)} and z a positive multiple of "
                f"{c.temporal_patch_size} slices, got (z, y, x) = {(z, y, x)}."
            )

    def forward(self, volume: torch.Tensor, return_indices: bool = False):
        """volume (b, c, z, y, x), float (CT-CLIP: HU / 1000 clipped to [-1, 1]).

        Returns the token grid (b, t, h, w, dim) with t = z / temporal_patch, h = y / patch, w = x / patch,
        plus the codebook indices (b, t, h, w) when return_indices (requires use_vq)."""
        self.check_input(volume)
        tokens = self.to_patch_emb(volume)
        if self.patch_density_emb is not None:
            tokens = tokens + self.patch_density_emb(volume)
        tokens = self.encode(tokens)
        if self.vq is None:
            if return_indices:
                raise ValueError("return_indices needs use_vq=True")
            return tokens
        shape = tokens.shape
        quantised, index = self.vq(tokens.reshape(shape[0], -1, shape[-1]))
        quantised = quantised.reshape(shape)
        return (quantised, index.reshape(shape[:-1])) if return_indices else quantised


class TokenFeatureViT(TokenGridEncoder):
    """The token-feature vision family: `forward(features (b, t, h, w, F))` -> token grid (b, t, h, w, dim).

    Standardisation is config, not state: feature_mean / feature_std come from the training cache and live in
    config.json, so a checkpoint folder says by itself how its inputs are scaled. The +-8 SD clip bounds the rare
    extreme token (a metal lead's HU maximum) without touching the bulk."""

    CLIP_SD = 8.0

    def __init__(self, config: CTViTConfig):
        super().__init__()
        self.config = c = config
        n = c.n_features
        if c.feature_mean and (len(c.feature_mean) != n or len(c.feature_std) != n):
            raise ValueError(f"feature_mean / feature_std need {n} values for preset {c.token_feature_preset!r}")
        self.feature_proj = nn.Linear(n, c.dim)
        self.pos_emb = nn.Parameter(torch.randn(*c.grid, c.dim) * 0.02)
        self.norm_in = nn.LayerNorm(c.dim)
        self.spatial_rel_pos_bias = ContinuousPositionBias(c.dim, c.heads)
        self.enc_spatial_transformer = Transformer(c.dim, c.spatial_depth, c.dim_head, c.heads, c.ff_mult)
        self.enc_temporal_transformer = Transformer(c.dim, c.temporal_depth, c.dim_head, c.heads, c.ff_mult)

    def check_input(self, features: torch.Tensor) -> None:
        want = (*self.config.grid, self.config.n_features)
        if features.ndim != 5 or tuple(features.shape[1:]) != want:
            raise UserError(f"The token-feature encoder expects a (batch, {', '.join(map(str, want))}) tensor, got "
                            f"shape {tuple(features.shape)}.")

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        """(feature - mean) / SD per feature (identity while the config has no statistics), clipped to +-8."""
        c = self.config
        if not c.feature_mean:
            return features
        mean = torch.tensor(c.feature_mean, dtype=features.dtype, device=features.device)
        std = torch.tensor(c.feature_std, dtype=features.dtype, device=features.device).clamp_min(1e-6)
        return ((features - mean) / std).clamp(-self.CLIP_SD, self.CLIP_SD)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self.check_input(features)
        x = self.feature_proj(self.standardise(features).to(self.feature_proj.weight.dtype))
        return self.encode(self.norm_in(x + self.pos_emb))


def vision_encoder(config: CTViTConfig) -> nn.Module:
    """The image tower of a vision config: CTViT ("ctvit") or TokenFeatureViT ("token_features")."""
    families = {"ctvit": CTViT, "token_features": TokenFeatureViT}
    if config.family not in families:
        raise UserError(f"Unknown vision family {config.family!r}: use 'ctvit' or 'token_features'.")
    return families[config.family](config)
