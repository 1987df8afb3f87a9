"""Train the X2CT-CLIP CXR encoder against the FROZEN CT CLIP (You et al., MICCAI 2025).

    python -m training x2ct --preset demo        # phantom DRRs against assets/ctclip (retraining = this one command)
    torchrun --nproc_per_node G -m training x2ct --preset paper --ctclip DIR --data-root DIR --reports-csv F
        --metadata-csv F --labels-csv F

Tri-modal loss over a batch of (DRR, CT latent, report latent) triples:
    L = alpha * L(CT, report) + beta * L(CXR, report) + gamma * L(CXR, CT)
each the symmetric InfoNCE (engine.models.losses.symmetric_infonce) of cosine logits / tau, tau = 0.07 (fixed), with
the paper's alpha = 0, beta = gamma = 1. The CT CLIP is frozen in eval mode (its CT-ViT has no EMA codebook update
in eval) and its CT and report latents are computed once into the cache (training/x2ct_data.py), so with alpha = 0
only the CXR encoder trains; alpha > 0 is logged but has no gradient (both of its latents are frozen), as in the
paper where it keeps the CT-report alignment out of the objective.

A fourth term is ours, off by default (`--finding-weight`): delta * BCE(s * cxr @ (P_present - P_absent).T, labels),
with P the frozen CT CLIP's 18 prompt-pair latents and s its logit scale. That logit is exactly what the CT CLIP's
zero-shot rule reads from a latent (the pair's softmax is the sigmoid of it), so the term trains the reading the
evaluation scores, from the study's labels (the phantom's exact ones; CT-RATE's label table with the paper preset). AdamW; training/loop.py runs the rest (torchrun,
checkpoint/resume, time budget, progress bar); RUN/model is the encoder's save_pretrained folder at each checkpoint.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.models.cxr_encoder import CXREncoder, CXREncoderConfig
from engine.models.losses import symmetric_infonce
from engine.settings import training_cache_dir
from training.loop import LoopConfig, TrainingLoop
from training.x2ct_data import DRRPlan, X2CTCache, X2CTDataset, build_split, phantom_seed_base


@dataclass
class X2CTTrainConfig:
    """One run's hyper-parameters (lr in AdamW units, times in seconds) and data plan."""
    preset: str = "demo"
    backbone: str = "resnet"                 # "resnet" | "swin"
    resnet_widths: tuple[int, ...] = ()      # () = the preset's (CXREncoderConfig); set for a candidate run
    resnet_layers: tuple[int, ...] = ()      # blocks per stage, () = the preset's
    steps: int = 1200
    batch_size: int = 32                     # per process
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    schedule: str = "cosine"
    grad_clip: float = 1.0
    amp: bool = True
    fsdp: bool = False
    ckpt_every: int = 500
    ckpt_every_s: float = 600.0
    time_budget_s: float = 0.0
    log_every: int = 10
    seed: int = 0
    num_workers: int = 0
    # the tri-modal loss
    alpha: float = 0.0                       # L(CT, report): frozen on both sides, no gradient
    beta: float = 1.0                        # L(CXR, report)
    gamma: float = 1.0                       # L(CXR, CT)
    tau: float = 0.07
    finding_weight: float = 0.0              # delta of the finding term (module docstring); 0 = the paper's loss
    # data
    ctclip: str = ""                         # CT CLIP checkpoint folder ("" = settings.ctclip_dir())
    n_train: int = 400
    n_test: int = 300
    n_views: int = 4                         # DRRs per study (clean + augmented)
    drr_view: str = "ap"                     # the paper simulates anteroposterior films
    cache_workers: int = 2
    data_root: str = ""                      # paper: CT-RATE
    reports_csv: str = ""
    metadata_csv: str = ""
    labels_csv: str = ""

    @classmethod
    def demo(cls) -> "X2CTTrainConfig":
        """The paper's loss plus the finding term at weight 3 (measured against 0, 1 and 10: docs/x2ct.md)."""
        return cls(finding_weight=3.0)

    @classmethod
    def paper(cls) -> "X2CTTrainConfig":
        """AdamW lr 5e-5, batch 360, 50 epochs of CT-RATE's ~47k training volumes (~6,500 steps), one A100."""
        return cls(preset="paper", steps=6500, batch_size=360, lr=5e-5, weight_decay=0.05, warmup_steps=200,
                   schedule="cosine", ckpt_every=1000, n_train=10**9, n_test=0, n_views=2, cache_workers=1)


class TriModalStep(nn.Module):
    """The step module: (DRRs (b, 1, S, S), CT latents (b, D), report latents (b, D)[, labels (b, L)]) -> (loss,
    logs). `prompt_latents` (L, 2, D) and `logit_scale`: the frozen CT CLIP's prompt pairs and scale, for the finding
    term (module docstring; finding_weight 0 leaves it out and the labels may be omitted)."""

    def __init__(self, encoder: CXREncoder, alpha: float, beta: float, gamma: float, tau: float,
                 finding_weight: float = 0.0, prompt_latents: torch.Tensor | None = None, logit_scale: float = 1.0):
        super().__init__()
        self.encoder, self.alpha, self.beta, self.gamma, self.tau = encoder, alpha, beta, gamma, tau
        self.finding_weight = finding_weight if prompt_latents is not None else 0.0
        pairs = torch.zeros(0, 2, 1) if prompt_latents is None else torch.as_tensor(prompt_latents, dtype=torch.float32)
        self.register_buffer("finding_directions", pairs[:, 0] - pairs[:, 1], persistent=False)   # frozen data
        self.logit_scale = float(logit_scale)

    def forward(self, images: torch.Tensor, ct_latent: torch.Tensor, report_latent: torch.Tensor,
                labels: torch.Tensor | None = None):
        cxr = self.encoder(images)
        ct, report = F.normalize(ct_latent.float(), dim=-1), F.normalize(report_latent.float(), dim=-1)
        ct_report = symmetric_infonce(ct @ report.t() / self.tau)
        cxr_report = symmetric_infonce(cxr @ report.t() / self.tau)
        cxr_ct_logits = cxr @ ct.t() / self.tau
        cxr_ct = symmetric_infonce(cxr_ct_logits)
        loss = self.alpha * ct_report + self.beta * cxr_report + self.gamma * cxr_ct
        if self.finding_weight > 0:
            finding_logits = self.logit_scale * cxr @ self.finding_directions.t()
            findings = F.binary_cross_entropy_with_logits(finding_logits, labels.float())
            loss = loss + self.finding_weight * findings
        else:
            findings = cxr.new_zeros(())
        target = torch.arange(len(cxr), device=cxr.device)
        return loss, {"loss_ct_report": ct_report.detach(), "loss_cxr_report": cxr_report.detach(),
                      "loss_cxr_ct": cxr_ct.detach(), "loss_findings": findings.detach(),
                      "batch_acc_cxr_ct": (cxr_ct_logits.argmax(1) == target).float().mean().detach()}


def load_ctclip(cfg: X2CTTrainConfig):
    """The frozen CT CLIP pipeline (eval mode, no gradients) whose latents the encoder learns."""
    from engine.pipelines.ctclip import CTClipPipeline

    pipeline = CTClipPipeline.from_pretrained(cfg.ctclip or None, preset="demo" if cfg.preset == "demo" else "paper")
    pipeline.model.eval().requires_grad_(False)
    return pipeline


def encoder_config(cfg: X2CTTrainConfig, latent_dim: int) -> CXREncoderConfig:
    """The preset's encoder, its latent the CT CLIP's latent size (read from the CT CLIP's own config)."""
    base = CXREncoderConfig.demo(backbone=cfg.backbone) if cfg.preset == "demo" \
        else CXREncoderConfig.paper(backbone=cfg.backbone)
    shape = {name: tuple(int(v) for v in value) for name, value in
             (("resnet_widths", cfg.resnet_widths), ("resnet_layers", cfg.resnet_layers)) if value}
    return replace(base, latent_dim=int(latent_dim), **shape)


def cache_dir(cfg: X2CTTrainConfig, cache_root: Path | None) -> Path:
    return Path(cache_root) if cache_root else training_cache_dir() / f"x2ct-{cfg.preset}"


def split_plan(cfg: X2CTTrainConfig, split: str, image_size: int) -> DRRPlan:
    n = cfg.n_train if split == "train" else cfg.n_test
    if cfg.preset == "demo":
        return DRRPlan(source="phantom", split=split, n_studies=n, n_views=cfg.n_views if split == "train" else 1,
                       image_size=image_size, view=cfg.drr_view, seed_base=phantom_seed_base(split))
    return DRRPlan(source="ctrate", split=split, n_studies=n, n_views=cfg.n_views, image_size=image_size,
                   view=cfg.drr_view, seed_base=0)


def prepare_split(cfg: X2CTTrainConfig, split: str, pipeline, image_size: int, cache_root: Path | None) -> X2CTCache:
    """Build (once) and open a split's DRR + latent cache."""
    ctrate = None
    if cfg.preset == "paper":
        from training.ctrate import CTRATEDataset

        ctrate = CTRATEDataset(Path(cfg.data_root), Path(cfg.reports_csv), Path(cfg.metadata_csv),
                               Path(cfg.labels_csv) if cfg.labels_csv else None)
    plan = split_plan(cfg, split, image_size)
    if cfg.preset == "paper":
        plan = replace(plan, n_studies=min(plan.n_studies, len(ctrate)))
    root = build_split(cache_dir(cfg, cache_root) / split, plan, pipeline, cfg.cache_workers, ctrate)
    return X2CTCache(root, pipeline.model_id)


def train(cfg: X2CTTrainConfig, out_dir: Path, cache_root: Path | None = None, resume: bool = False,
          progress: bool = True) -> dict:
    """Build the caches (train, and the test split the evaluation reads), then run the loop. Returns its summary."""
    loop = TrainingLoop(LoopConfig.from_config(cfg), out_dir, resume=resume, progress=progress, desc="x2ct")
    pipeline = load_ctclip(cfg)
    encoder = CXREncoder(encoder_config(cfg, pipeline.model.config.latent_dim))
    loop.write_run_config({**asdict(cfg), "ctclip_model_id": pipeline.model_id,
                           "cache": str(cache_dir(cfg, cache_root)), "encoder": encoder.config.to_dict()})
    dataset = X2CTDataset(prepare_split(cfg, "train", pipeline, encoder.config.image_size, cache_root),
                          augment=True, seed=cfg.seed)
    if cfg.n_test:
        prepare_split(cfg, "test", pipeline, encoder.config.image_size, cache_root)
    step = TriModalStep(encoder, cfg.alpha, cfg.beta, cfg.gamma, cfg.tau, cfg.finding_weight,
                        torch.from_numpy(pipeline.prompt_latents), float(pipeline.model.logit_scale.detach())
                        ).to(loop.dist.device)

    def make_optimizer():
        decay = [p for n, p in encoder.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in encoder.named_parameters() if p.ndim < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)

    summary = loop.run(step, make_optimizer, dataset,
                       on_checkpoint=lambda: encoder.save_pretrained(Path(out_dir) / "model"))
    return {**summary, "ctclip_model_id": pipeline.model_id, "model": str(Path(out_dir) / "model")}
