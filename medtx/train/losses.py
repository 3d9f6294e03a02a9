"""Fine-tuning losses that torch does not ship: soft Dice for the tumour regions.

Classification uses cross-entropy and brain age L1 (or MSE) on standardized ages,
both from ``torch.nn.functional``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def soft_dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """1 - soft Dice per case and region channel, averaged: (B, K, X, Y, Z) logits."""
    probs = torch.sigmoid(logits.float())
    dims = tuple(range(2, logits.ndim))
    inter = (probs * target).sum(dims)
    total = probs.sum(dims) + target.sum(dims)
    return (1 - (2 * inter + smooth) / (total + smooth)).mean()


def segmentation_loss(logits: Tensor, target: Tensor) -> Tensor:
    """BCE-with-logits + soft Dice on the WT/TC/ET region channels."""
    return F.binary_cross_entropy_with_logits(logits.float(), target) + soft_dice_loss(
        logits, target
    )
