"""Spatially adaptive convolution: token grids by the paper's rule, one set of weights."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medtx.models.pumit.sac import MAX_ANISO_D, Grid, SACConv3d, SACConvTranspose3d, aniso_d

SHAPE = (32, 64, 48)  # depth, height, width of a 1 mm isotropic crop


def embed(seed=0, channels=4):
    torch.manual_seed(seed)
    return SACConv3d(1, channels, 16, stride=16)


def official_aniso_d(spacing, stride=16):
    """The authors' sampler, ``pumit/datamodule.py:97-119`` at 67218a2 (scale 1), verbatim
    but for the names: spacing (z, y, x), z the depth."""
    spacing = np.array(spacing)
    spacing_z = spacing[0]
    spacing_x = min(spacing[1:])
    rz = np.clip(spacing_z / spacing_x, 1, stride << 1)
    return int(rz).bit_length() - 1


def official_eval_aniso_d(spacing):
    """The authors' evaluation padding, ``pumit/transforms.py:106`` (no cap)."""
    return max(int(spacing[0] / min(spacing[1:])).bit_length() - 1, 0)


# (depth, height, width) spacings in mm: the thick-slice cases of the authors' data
# (1 x 1 x 3 mm, 0.5 mm in-plane by 5 mm, thicker than 32x: a 2D image) and edges.
OFFICIAL_EXAMPLES = [
    ((1.0, 1.0, 1.0), 0),
    ((1.2, 1.0, 1.0), 0),
    ((1.99, 1.0, 1.0), 0),
    ((2.0, 1.0, 1.0), 1),
    ((3.0, 1.0, 1.0), 1),  # 1 x 1 x 3 mm: 1, not round(log2 3) = 2
    ((3.0, 0.9, 0.8), 1),  # the finer in-plane spacing counts: 3.75
    ((4.0, 1.0, 1.0), 2),
    ((5.0, 0.5, 0.5), 3),  # 10
    ((6.0, 0.9, 0.8), 2),  # 7.5
    ((0.5, 1.0, 1.0), 0),  # thinner than in-plane
    ((31.9, 1.0, 1.0), 4),
    ((32.0, 1.0, 1.0), 5),
    ((100.0, 1.0, 1.0), 5),  # capped: the sampler clips t / s at 2 x stride = 32
]


@pytest.mark.parametrize("spacing,expected", OFFICIAL_EXAMPLES)
def test_anisotropy_is_the_authors_floor_of_log2_capped_at_5(spacing, expected):
    assert aniso_d(spacing) == expected == official_aniso_d(spacing)
    assert MAX_ANISO_D == 5
    if spacing[0] / min(spacing[1:]) < 32:  # below the cap the evaluation rule agrees
        assert official_eval_aniso_d(spacing) == expected


def test_anisotropy_matches_the_authors_rule_on_a_sweep():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        spacing = tuple(float(v) for v in rng.uniform(0.2, 8.0, 3) ** rng.uniform(0.5, 2.0, 3))
        assert aniso_d(spacing) == official_aniso_d(spacing), spacing


@pytest.mark.parametrize(
    "spacing,depth,grid",
    [
        ((1.0, 1.0, 1.0), 32, (2, 4, 3)),  # isotropic: 16 in every axis
        ((3.0, 1.0, 1.0), 32, (4, 4, 3)),  # aniso_d 1: depth stride 16 / 2
        ((4.0, 1.0, 1.0), 32, (8, 4, 3)),  # aniso_d 2: depth stride 16 / 4
        ((5.0, 0.5, 0.5), 32, (16, 4, 3)),  # aniso_d 3: depth stride 16 / 8
        ((1.0, 1.0, 1.0), 1, (1, 4, 3)),  # a 2D slice: no depth stride
    ],
)
def test_patch_embedding_token_grid_follows_the_rule(spacing, depth, grid):
    conv = embed()
    x = torch.rand(1, 1, depth, *SHAPE[1:])
    y, after = conv(x, Grid.of(spacing, depth))
    assert tuple(y.shape[2:]) == grid
    assert after.downsamples == 4 and conv.weight.shape[2:] == (16, 16, 16)  # weights untouched


@pytest.mark.parametrize("aniso", [1, 2, 3])
def test_a_thick_slice_scan_gives_the_tokens_of_the_isotropic_volume_it_stands_for(aniso):
    """The same weights: a volume constant within depth blocks of 2**aniso slices,
    embedded isotropically, equals one slice per block embedded with aniso_d."""
    conv = embed(seed=aniso)
    thick = torch.rand(2, 1, 32 >> aniso, 32, 32, generator=torch.Generator().manual_seed(aniso))
    iso = thick.repeat_interleave(1 << aniso, dim=2)
    y_iso, _ = conv(iso, Grid(0))
    y_thick, _ = conv(thick, Grid(aniso))
    assert y_thick.shape == y_iso.shape
    torch.testing.assert_close(y_thick, y_iso, rtol=1e-4, atol=1e-5)


def test_a_3x3_convolution_of_a_2d_image_is_its_depth_summed_kernel_in_2d():
    torch.manual_seed(3)
    conv = SACConv3d(2, 5, 3)
    x = torch.rand(1, 2, 1, 20, 24)
    y, grid = conv(x, Grid.of((1.0, 1.0, 1.0), 1))
    want = F.conv2d(x[:, :, 0], conv.weight.sum(2), conv.bias, padding=1)
    torch.testing.assert_close(y[:, :, 0], want)
    assert grid.downsamples == 0
    iso, _ = conv(torch.rand(1, 2, 6, 20, 24), Grid(0))
    assert iso.shape == (1, 5, 6, 20, 24)  # isotropic: a full 3x3x3 convolution


@pytest.mark.parametrize(
    "spacing,depth",
    [((1.0, 1.0, 1.0), 32), ((3.0, 1.0, 1.0), 32), ((5.0, 0.5, 0.5), 32), ((1.0, 1.0, 1.0), 1)],
)
def test_upsampling_returns_to_the_input_grid(spacing, depth):
    torch.manual_seed(0)
    down, up = SACConv3d(1, 4, 4, stride=4), SACConvTranspose3d(4, 1, 4)
    x = torch.rand(1, 1, depth, 64, 48)
    mid, grid = down(x, Grid.of(spacing, depth))
    mid, grid = SACConv3d(4, 4, 4, stride=4)(mid, grid)
    out, grid = up(mid, grid)
    out, grid = SACConvTranspose3d(1, 1, 4)(out, grid)
    assert out.shape == x.shape and grid.downsamples == 0


def test_bad_sac_shapes_are_named():
    with pytest.raises(ValueError, match="powers of 2"):
        SACConv3d(1, 1, 3, stride=3)
    with pytest.raises(ValueError, match="kernel = stride"):
        SACConv3d(1, 1, 3, stride=2)
    with pytest.raises(ValueError, match="positive and finite"):
        aniso_d((0.0, 1.0, 1.0))
