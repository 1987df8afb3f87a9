"""Contrastive losses shared by every model that aligns two embeddings (CT CLIP, and the speech / CXR encoders that
join its space): the one home of the symmetric InfoNCE."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def symmetric_infonce(logits: torch.Tensor) -> torch.Tensor:
    """CLIP's loss on a (b, b) logit matrix whose diagonal holds the matching pairs:
    (CE over rows + CE over columns) / 2, each the mean over the batch of -log softmax at the diagonal."""
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def balanced_token_bce(token_logits: torch.Tensor, token_masks: torch.Tensor) -> torch.Tensor:
    """Token-level BCE that teaches which tokens hold which finding (issue 12 item 3).

    token_logits (b, t, h, w, L): one logit per token and finding; token_masks (b, t, h, w, L): the share of each
    token's voxels inside the finding's mask (0-1), NaN for a study whose masks are unknown. A token is positive when
    any of its voxels is in the mask. Only (study, finding) pairs where the finding is present count; each pair's
    loss is the mean BCE over its positive tokens plus the mean over its negative tokens, halved (a nodule fills 1 of
    512 tokens: a plain mean would teach "never here"); a pair without negative tokens scores its positives' mean.
    Returns a scalar (0 when no pair counts)."""
    known = ~torch.isnan(token_masks).flatten(1, 3).any(dim=1)                  # (b, L)
    target = torch.nan_to_num(token_masks, nan=0.0) > 0
    present = target.flatten(1, 3).any(dim=1) & known                           # (b, L)
    if not bool(present.any()):
        return token_logits.sum() * 0.0
    bce = F.binary_cross_entropy_with_logits(token_logits, target.to(token_logits.dtype), reduction="none")
    pos, neg = target.to(bce.dtype), (~target).to(bce.dtype)
    n_pos, n_neg = pos.sum((1, 2, 3)), neg.sum((1, 2, 3))
    pos_mean = (bce * pos).sum((1, 2, 3)) / n_pos.clamp_min(1.0)
    neg_mean = (bce * neg).sum((1, 2, 3)) / n_neg.clamp_min(1.0)
    has_pos, has_neg = (n_pos > 0).to(bce.dtype), (n_neg > 0).to(bce.dtype)    # a finding filling every token
    return ((pos_mean * has_pos + neg_mean * has_neg) / (has_pos + has_neg))[present].mean()
