"""Masked image modelling must use context: a masked token predicted from its neighbours.

The volumes are 2 x 4 x 4 patches of 16^3 voxels. Each half of a volume (along its
last axis) holds a texture or its negative, drawn per volume and half; a patch's
code (the MIM target) is which. A masked patch shows nothing of itself, and the codes are
used half and half at every position, so the marginal code distribution predicts it
at cross-entropy ln 2 (the baseline, computed here from the targets), and so does
its position. Its code is that of the visible patches of its half: only a model
that reads them beats the baseline. The same training with a head that sees each
token alone (its embedding, mask token and position, but no attention) stays at the
baseline: the test can fail.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medtx.models.pumit.mim import MimHead, soft_cross_entropy
from medtx.models.pumit.sac import Grid
from medtx.models.pumit.vit import PATCH, VIT_SIZES, UniversalViT, random_token_mask

GRID = (2, 4, 4)  # patches per axis
TOKENS = math.prod(GRID)
CODES = 8  # the head's codebook; the targets use codes 0 and 1


def halves(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n volumes (n, 1, 32, 64, 64) and their targets (n, tokens, CODES)."""
    bits = torch.randint(0, 2, (n, 2), generator=generator)
    half = torch.arange(GRID[2]) * 2 // GRID[2]  # 0 0 1 1 along the last axis
    code = bits[:, half][:, None, None, :].expand(n, *GRID)
    # a texture, or its negative: a patch's brightness alone would not do, as the
    # blocks' LayerNorm removes the scale of a patch embedding
    texture = torch.rand((PATCH,) * 3, generator=torch.Generator().manual_seed(0)) - 0.5
    sign = (2 * code - 1).float()
    for axis in (1, 2, 3):
        sign = sign.repeat_interleave(PATCH, axis)
    volume = 0.5 + 0.6 * sign * texture.repeat(GRID)
    volume = volume + 0.05 * torch.randn(volume.shape, generator=generator)
    return volume[:, None], nn.functional.one_hot(code.flatten(1), CODES).float()


class ContextFree(nn.Module):
    """The ViT's own token embedding (patch, mask token, position) without its
    blocks: each output token sees only itself."""

    def __init__(self, vit: UniversalViT):
        super().__init__()
        self.vit = vit
        self.mix = nn.Sequential(nn.LayerNorm(vit.size.dim), nn.Linear(vit.size.dim, vit.size.dim))

    def forward(self, x, grid, mask):
        blocks = self.vit.blocks
        self.vit.blocks = nn.ModuleList()  # no attention: no context
        try:
            out, tokens_grid = self.vit(x, grid, mask=mask)
        finally:
            self.vit.blocks = blocks
        return self.mix(out), tokens_grid


def masked_loss_after_training(encoder: nn.Module, steps: int = 50) -> tuple[float, float]:
    """Train ``encoder`` and a MIM head; (held-out masked cross-entropy, baseline)."""
    torch.manual_seed(0)
    head = MimHead(VIT_SIZES["tiny"].dim, CODES)
    params = list(encoder.parameters()) + list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=2e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, target = halves(8, g)
        mask = random_token_mask(8, TOKENS, 0.55, generator=g)
        out, _ = encoder(x, Grid(0), mask=mask)
        loss = soft_cross_entropy(head(out[:, 1:]), target, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        x, target = halves(32, torch.Generator().manual_seed(2))
        mask = random_token_mask(32, TOKENS, 0.55, generator=torch.Generator().manual_seed(3))
        out, _ = encoder(x, Grid(0), mask=mask)
        held_out = float(soft_cross_entropy(head(out[:, 1:]), target, mask))
        marginal = target[mask].mean(dim=0)  # the code distribution at masked tokens
        used = marginal > 0
        baseline = float(-(marginal[used] * marginal[used].log()).sum())
    return held_out, baseline


def test_mim_predicts_masked_tokens_from_context_better_than_the_marginal():
    torch.manual_seed(0)
    held_out, baseline = masked_loss_after_training(UniversalViT(VIT_SIZES["tiny"]))
    print(f"MIM masked cross-entropy {held_out:.3f} against the marginal's {baseline:.3f}")
    assert baseline == pytest.approx(math.log(2), abs=0.02)
    assert held_out < 0.25 * baseline


def test_a_head_without_context_stays_at_the_marginal():
    torch.manual_seed(0)
    held_out, baseline = masked_loss_after_training(ContextFree(UniversalViT(VIT_SIZES["tiny"])))
    print(f"context-free masked cross-entropy {held_out:.3f} against {baseline:.3f}")
    assert held_out > 0.9 * baseline
