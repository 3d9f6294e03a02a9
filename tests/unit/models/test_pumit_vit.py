"""The universal ViT: token grids for any spacing, the class token, masking."""

import pytest
import torch

from medtx.models.pumit.sac import Grid
from medtx.models.pumit.vit import VIT_SIZES, UniversalViT, random_token_mask


@pytest.mark.parametrize(
    "spacing,shape,grid",
    [
        ((1.0, 1.0, 1.0), (32, 48, 32), (2, 3, 2)),
        ((3.0, 1.0, 1.0), (16, 48, 32), (4, 3, 2)),  # aniso_d 2: depth stride 4
        ((1.0, 1.0, 1.0), (1, 48, 32), (1, 3, 2)),  # a 2D slice
    ],
)
def test_one_model_tokenizes_every_spacing(spacing, shape, grid):
    torch.manual_seed(0)
    vit = UniversalViT(VIT_SIZES["tiny"])
    out, tokens_grid = vit(torch.rand(2, 1, *shape), Grid.of(spacing, shape[0]))
    assert tokens_grid == grid
    assert out.shape == (2, 1 + grid[0] * grid[1] * grid[2], 64)
    assert torch.isfinite(out).all()


def test_masked_patches_take_the_mask_token_and_change_the_output():
    torch.manual_seed(1)
    vit = UniversalViT(VIT_SIZES["tiny"]).eval()
    x = torch.rand(1, 1, 32, 32, 32)
    mask = torch.zeros(1, 8, dtype=torch.bool)
    plain, _ = vit(x, Grid(0))
    same, _ = vit(x, Grid(0), mask)
    torch.testing.assert_close(plain, same)  # an empty mask changes nothing
    mask[0, 3] = True
    masked, _ = vit(x, Grid(0), mask)
    assert not torch.allclose(plain, masked)
    # a masked patch's own content no longer matters: change only patch 3
    y = x.clone()
    y[..., :16, 16:32, 16:32] = torch.rand(16, 16, 16)  # patch (0, 1, 1) = index 3
    masked_y, _ = vit(y, Grid(0), mask)
    torch.testing.assert_close(masked, masked_y)


@pytest.mark.parametrize("tokens", [8, 20, 57, 1000])
def test_the_mask_ratio_is_honoured(tokens):
    mask = random_token_mask(6, tokens, 0.55, torch.Generator().manual_seed(tokens))
    assert mask.shape == (6, tokens)
    assert (mask.sum(1) == round(0.55 * tokens)).all()
    assert not torch.equal(mask[0], mask[1])  # drawn per volume


def test_base_preset_is_vit_b_sized():
    n = sum(p.numel() for p in UniversalViT(VIT_SIZES["base"]).parameters())
    assert 85e6 < n < 100e6, n  # ViT-B's ~86 M plus a 16^3 patch embedding (88.6 M)
