"""Masked image modelling against the tokenizer's soft tokens (BEiT with soft targets).

55 % of the ViT's patches are replaced by its mask token; an MLP with one hidden
layer maps each output token to logits over the codebook, and the loss is the
cross-entropy of those against the frozen tokenizer's distribution at the masked
positions: -Σ_k q_k log softmax(logits)_k, averaged over them.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class MimHead(nn.Module):
    """Token features (..., dim) -> logits over ``codes``, through one hidden layer."""

    def __init__(self, dim: int, codes: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, codes))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


def soft_cross_entropy(logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean over masked positions of -Σ target·log softmax(logits).

    logits, target (B, N, K); mask (B, N) bool. Weighted, not indexed: no host sync.
    """
    per_token = -(target * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1)
    weight = mask.to(per_token.dtype)
    return (per_token * weight).sum() / weight.sum()
