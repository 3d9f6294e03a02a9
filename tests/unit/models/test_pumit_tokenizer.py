"""The tokenizer and masked image modelling: shapes for any spacing, the soft
cross-entropy by hand, and both objectives falling on crops of a real head."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medtx.data.demo import template
from medtx.models.pumit.mim import MimHead, soft_cross_entropy
from medtx.models.pumit.sac import Grid
from medtx.models.pumit.tokenizer import TOKENIZER_SIZES, Tokenizer, tokenizer_loss
from medtx.models.pumit.vit import VIT_SIZES, UniversalViT, random_token_mask

pytestmark = pytest.mark.slow


def crops(n, size=32, seed=0):
    """n random size^3 crops of the ICBM head (1 mm), scaled to [0, 1]."""
    t1 = template().t1
    t1 = (t1 - t1.min()) / (np.percentile(t1, 99.5) - t1.min())
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        corner = [rng.integers(20, s - size - 20) for s in t1.shape]
        out.append(t1[tuple(slice(c, c + size) for c in corner)])
    return torch.from_numpy(np.clip(np.stack(out), 0, 1)[:, None]).float()


@pytest.mark.parametrize(
    "spacing,shape",
    [
        ((1.0, 1.0, 1.0), (32, 32, 32)),
        ((3.0, 1.0, 1.0), (16, 32, 32)),
        ((1.0, 1.0, 1.0), (1, 32, 32)),
    ],
)
def test_the_tokenizer_reconstructs_any_spacing_on_the_vits_patch_grid(spacing, shape):
    torch.manual_seed(0)
    tokenizer = Tokenizer(TOKENIZER_SIZES["tiny"])
    vit = UniversalViT(VIT_SIZES["tiny"])
    x = torch.rand(2, 1, *shape)
    grid = Grid.of(spacing, shape[0])
    recon, soft = tokenizer(x, grid)
    assert recon.shape == x.shape
    _, tokens_grid = vit(x, grid)
    assert tuple(soft.probs.shape[1:4]) == tokens_grid  # one soft token per ViT patch
    assert soft.probs.shape[-1] == 64


def test_soft_cross_entropy_is_the_hard_one_for_one_hot_targets_and_masks():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)
    hard = F.cross_entropy(logits[mask], labels[mask])
    soft = soft_cross_entropy(logits, F.one_hot(labels, 7).float(), mask)
    torch.testing.assert_close(soft, hard)


def test_tokenizer_and_mim_objectives_fall_on_crops_of_a_real_head():
    torch.manual_seed(0)
    data = crops(8)
    grid = Grid(0)
    tokenizer = Tokenizer(TOKENIZER_SIZES["tiny"])
    opt = torch.optim.Adam(tokenizer.parameters(), lr=3e-3)
    first = last = None
    for step in range(30):
        batch = data[step % 2 * 4 : step % 2 * 4 + 4]
        recon, soft = tokenizer(batch, grid)
        loss = tokenizer_loss(batch, recon, soft)
        opt.zero_grad()
        loss.backward()
        opt.step()
        l1 = float((recon - batch).abs().mean().detach())
        first = l1 if first is None else first
        last = l1
    assert last < 0.6 * first, (first, last)

    tokenizer.eval().requires_grad_(False)
    vit = UniversalViT(VIT_SIZES["tiny"])
    head = MimHead(64, 64)
    opt = torch.optim.Adam([*vit.parameters(), *head.parameters()], lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    halves = [data[:4], data[4:]]
    with torch.no_grad():  # the frozen tokenizer's targets, once per batch
        targets = [tokenizer.encode(half, grid)[0].probs.flatten(1, 3) for half in halves]
    losses = []
    for step in range(200):
        batch, target = halves[step % 2], targets[step % 2]
        mask = random_token_mask(4, target.shape[1], 0.55, gen)
        out, _ = vit(batch, grid, mask)
        loss = soft_cross_entropy(head(out[:, 1:]), target, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    early, late = np.mean(losses[:20]), np.mean(losses[-20:])
    print(f"tokenizer L1 {first:.3f} -> {last:.3f}; MIM {early:.3f} -> {late:.3f}")
    assert late < 0.9 * early, (early, late)
