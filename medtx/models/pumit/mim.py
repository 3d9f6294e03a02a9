"""Masked image modelling against the tokenizer's soft tokens (BEiT with soft targets).

As the authors' ``ViTForMIM`` (``pumit/model/mim.py`` at commit 67218a2): 55 % of the
ViT's patches are replaced by its mask token (``vit.random_token_mask``); an MLP with
one hidden layer (Linear, GELU, Linear: their ``mim_head``, same parameter names) maps
each output token to logits over the codebook, and the loss is the cross-entropy of
those against the frozen tokenizer's distribution at the masked positions,
-Σ_k q_k log softmax(logits)_k, averaged over all masked positions of the batch
(their ``nn.CrossEntropyLoss`` with probability targets).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class MimHead(nn.Sequential):
    """Token features (..., dim) -> logits over ``codes``, through one hidden layer;
    parameters ``0.*`` and ``2.*`` as the authors' ``nn.Sequential`` ``mim_head``."""

    def __init__(self, dim: int, codes: int):
        super().__init__(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, codes))


def soft_cross_entropy(logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean over masked positions of -Σ target·log softmax(logits).

    logits, target (B, N, K); mask (B, N) bool. Weighted, not indexed: no host sync.
    """
    per_token = -(target * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1)
    weight = mask.to(per_token.dtype)
    return (per_token * weight).sum() / weight.sum()
