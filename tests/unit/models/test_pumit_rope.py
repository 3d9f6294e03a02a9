"""3D RoPE: a pure rotation, relative in all three axes, 2D RoPE within a slice,
the class token left alone, and the authors' rotation (``pumit/model/rope.py``)."""

import math

import pytest
import torch

from medtx.models.pumit.rope import Rope3d

GRID = (3, 4, 5)


def tokens(grid=GRID, dim=16, seed=0, cls=True):
    n = math.prod(grid) + (1 if cls else 0)
    return torch.randn(2, 3, n, dim, generator=torch.Generator().manual_seed(seed)).double()


def index(d, h, w, grid=GRID):
    return 1 + (d * grid[1] + h) * grid[2] + w  # after the class token


def test_rope_rotates_each_pair_and_keeps_norms():
    rope = Rope3d(16)
    x = tokens()
    y = rope(x, GRID)
    pair_norm = lambda t: t.unflatten(-1, (-1, 2)).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pair_norm(y), pair_norm(x))
    torch.testing.assert_close(y[..., 0, :], x[..., 0, :], rtol=0, atol=0)  # class token
    assert not torch.allclose(y[..., 2:, :], x[..., 2:, :])  # the others turned


def test_dot_products_depend_only_on_relative_position():
    rope = Rope3d(16)
    q = tokens(seed=1)
    k = tokens(seed=2)
    a, b = (0, 1, 2), (1, 3, 0)
    shift = (1, 0, 1)
    a2, b2 = tuple(map(sum, zip(a, shift))), tuple(map(sum, zip(b, shift)))
    # the same vectors placed at the shifted positions
    q2, k2 = q.clone(), k.clone()
    q2[..., index(*a2), :], k2[..., index(*b2), :] = q[..., index(*a), :], k[..., index(*b), :]
    rq, rk, rq2, rk2 = (rope(t, GRID) for t in (q, k, q2, k2))
    dot = (rq[..., index(*a), :] * rk[..., index(*b), :]).sum(-1)
    dot2 = (rq2[..., index(*a2), :] * rk2[..., index(*b2), :]).sum(-1)
    torch.testing.assert_close(dot, dot2)
    moved = (rq[..., index(*a), :] * rk[..., index(2, 0, 4), :]).sum(-1)
    assert not torch.allclose(dot, moved)  # a different offset gives another product


def test_within_a_slice_it_is_2d_rope_shifted_by_one_depth_rotation():
    rope = Rope3d(16)
    theta = rope.angles(GRID).reshape(*GRID, -1)
    planar = theta[0]  # depth 0: the 2D RoPE angles
    h_freq, w_freq = rope.omega_hw, rope.omega_hw
    torch.testing.assert_close(planar[2, 3, :4], 2 * h_freq)
    torch.testing.assert_close(planar[2, 3, 4:], 3 * w_freq)
    torch.testing.assert_close(theta[2] - theta[0], (2 * rope.omega_d).expand(4, 5, 8))


def test_tokens_without_a_class_token_and_bad_shapes():
    rope = Rope3d(8)
    x = tokens(dim=8, cls=False)
    assert rope(x, GRID, cls_token=False).shape == x.shape
    with pytest.raises(ValueError, match="does not hold 60 tokens"):
        rope(x, GRID)
    with pytest.raises(ValueError, match="divisible by 4"):
        Rope3d(6)


def official_rope(x, grid, base=(2333.0, 10000.0, 10000.0)):
    """The authors' SpatialRotaryEmbedding (rope.py:24-84 at 67218a2, merge_hw=True,
    rescale_shape (-1, -1, -1)) and Attention.apply_rope (vit.py:76-79: the class token
    skipped), transcribed without einops, in float64; x (B, heads, 1 + L, head_dim)."""
    dim = x.shape[-1] >> 1
    omega = []
    for i in range(3):
        if i > 0:
            exp = -torch.arange(0, dim, 2, dtype=torch.float64) / dim
        else:
            exp = (-torch.arange(1, dim, 2, dtype=torch.float64) / dim).repeat(2)
        omega.append(torch.pow(torch.tensor(base[i], dtype=torch.float64), exp))
    theta = [torch.outer(torch.arange(grid[i], dtype=torch.float64), omega[i]) for i in range(3)]
    h, w = theta[1][:, None].expand(-1, grid[2], -1), theta[2][None, :].expand(grid[1], -1, -1)
    theta_hw = torch.cat([h, w], dim=-1)
    angles = (theta[0][:, None, None] + theta_hw[None]).reshape(-1, dim)
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    tokens = x[..., 1:, :]
    half = torch.stack([-tokens[..., 1::2], tokens[..., 0::2]], dim=-1).flatten(-2)
    return torch.cat([x[..., :1, :], tokens * cos + half * sin], dim=-2)


@pytest.mark.parametrize("head_dim, grid", [(64, (3, 4, 5)), (16, (2, 6, 5)), (64, (1, 8, 8))])
def test_the_rotation_is_the_authors(head_dim, grid):
    rope = Rope3d(head_dim)
    x = tokens(grid, head_dim, seed=head_dim)
    torch.testing.assert_close(rope(x, grid), official_rope(x, grid), rtol=0, atol=1e-12)
