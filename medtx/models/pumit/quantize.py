"""The soft token: a categorical distribution over the codebook, not a sampled index.

The tokenizer's encoder gives each position logits over K codes; the token is the
expectation of the code embedding under their softmax, p @ codebook, which is
differentiable without a straight-through estimator and leaves reconstruction
deterministic. This is the official ``VectorQuantizer(mode="soft")``
(``pumit/tokenizer/quantize.py``, function2-llx/PUMIT at 67218a2): a Linear
projection to the logits, the codebook ``nn.Embedding`` initialised uniformly in
±1/K, ``z_q = softmax(logits) @ embedding``. Its two prior terms:

- diversity (the official ``vq_out.loss``, weighted by loss.yaml's
  ``quant_weight`` 1): Σ_k p̄_k log p̄_k, with p̄ the mean distribution over all
  positions of the batch; the negative entropy of the mean, minimal when codes are
  used evenly;
- sharpness (the official ``vq_out.entropy``, weighted by ``entropy_weight`` 0.2):
  the mean over positions of each position's entropy -Σ_k p_k log p_k; minimal when
  each position is sure of its code.

Both are added to the loss with a positive sign: the objective is
1·diversity + 0.2·sharpness (our config keys ``diversity``, ``sharpness``). Under
data parallelism p̄ is the mean over every process's positions, as the official
code averages it (an all-gather of the detached means, the local mean keeping the
gradient); here ``prior_terms``' ``all_sum`` gives N processes the term, and the
gradient, one process computes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class SoftTokens:
    """What ``SoftQuantizer`` gives: the token embeddings (B, dim, *grid), their
    distributions (B, *grid, K) and logits, and the two prior terms (scalars)."""

    tokens: Tensor
    probs: Tensor
    logits: Tensor
    diversity: Tensor
    sharpness: Tensor


class SoftQuantizer(nn.Module):
    """Logits over ``num_codes`` codes from each position's features; soft tokens."""

    def __init__(self, in_channels: int, num_codes: int, code_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_channels, num_codes)
        self.codebook = nn.Embedding(num_codes, code_dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / num_codes, 1.0 / num_codes)

    def forward(self, z: Tensor) -> SoftTokens:
        """``z`` (B, C, *grid) encoder features."""
        logits = self.proj(z.movedim(1, -1))
        probs = logits.softmax(dim=-1)
        tokens = (probs @ self.codebook.weight).movedim(-1, 1)
        return SoftTokens(tokens, probs, logits, *prior_terms(probs, logits))


def prior_terms(
    probs: Tensor, logits: Tensor, all_sum: Callable[[Tensor], Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """(diversity, sharpness) of distributions (..., K): Σ p̄ log p̄ of the mean
    distribution, and the mean entropy of each. ``all_sum`` (a differentiable sum over
    the processes of a data-parallel run) makes p̄ the mean over all their positions."""
    flat = probs.flatten(0, -2)
    if all_sum is None:
        mean = flat.mean(dim=0)
    else:
        count = flat.new_full((1,), float(flat.shape[0]))
        total = all_sum(torch.cat([flat.sum(dim=0), count]))
        mean = total[:-1] / total[-1]
    diversity = (mean * mean.log()).sum()
    sharpness = -(probs * logits.log_softmax(dim=-1)).sum(dim=-1).mean()
    return diversity, sharpness
