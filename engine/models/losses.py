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
