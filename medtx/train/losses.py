"""Fine-tuning losses that torch does not ship: soft Dice for the tumour regions,
and a cross-entropy that stays deterministic on CUDA.

Brain age uses L1 (or MSE) on standardized ages from ``torch.nn.functional``.
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


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy of (B, K) logits against class indices (B,).

    ``F.cross_entropy``'s values, from elementwise products and sums only: its CUDA
    NLLLoss kernel has no deterministic mode, so ``train: {deterministic: true}``
    would refuse it.
    """
    log_probs = torch.log_softmax(logits.float(), dim=1)
    picked = F.one_hot(target, num_classes=logits.shape[1]).to(log_probs.dtype)
    return -(picked * log_probs).sum(dim=1).mean()
