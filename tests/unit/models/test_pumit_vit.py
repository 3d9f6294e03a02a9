"""The universal ViT: token grids for any spacing, the class token, masking, and the
authors' layout (``pumit/model/vit.py`` and ``mim.py`` at commit 67218a2; each "same"
row of ``docs/pumit-parity.md`` that concerns the ViT has a test here)."""

import pytest
import torch
import torch.nn.functional as F

from medtx.models.pumit.sac import Grid
from medtx.models.pumit.vit import (
    OFFICIAL_NAMES,
    VIT_SIZES,
    Attention,
    SwiGLU,
    UniversalViT,
    VitSize,
    official_vit_parameters,
    random_token_mask,
    resample_pos_embed,
    shrink_pos_embed,
    vit_parameter_count,
)


@pytest.mark.parametrize(
    "spacing,shape,grid",
    [
        ((1.0, 1.0, 1.0), (32, 48, 32), (2, 3, 2)),
        ((3.0, 1.0, 1.0), (16, 48, 32), (2, 3, 2)),  # aniso_d 1: depth stride 8
        ((4.0, 1.0, 1.0), (16, 48, 32), (4, 3, 2)),  # aniso_d 2: depth stride 4
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


def first_block_input(vit, x, grid, mask=None):
    seen = []
    hook = vit.blocks[0].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        vit(x, grid, mask)
    hook.remove()
    return seen[0]


def test_mask_tokens_carry_no_absolute_position_and_visible_patches_do():
    """The authors' ViTForMIM.forward (mim.py:97-110): position embedding added to the
    patches (vit.py:221-223), then masked positions set to the bare mask token."""
    torch.manual_seed(2)
    vit = UniversalViT(VIT_SIZES["tiny"]).eval()
    x = torch.rand(2, 1, 48, 96, 80)  # tokens 3 x 6 x 5, position grid 2 x 4 x 4
    mask = random_token_mask(2, 90, 0.55, torch.Generator().manual_seed(0))
    tokens = first_block_input(vit, x, Grid(0), mask)
    with torch.no_grad():
        patches, _ = vit.patch_embed(x, Grid(0))
        pos = vit.position_embedding((3, 6, 5))
    want_visible = (patches + pos).flatten(2).transpose(1, 2)
    assert torch.equal(tokens[:, 0], vit.cls_token[0].detach().expand(2, -1))  # no position
    assert torch.equal(
        tokens[:, 1:][mask], vit.mask_token[0, 0].detach().expand(int(mask.sum()), -1)
    )
    torch.testing.assert_close(tokens[:, 1:][~mask], want_visible[~mask], rtol=0, atol=0)


@pytest.mark.parametrize("tokens", [8, 20, 57, 288, 500, 1000])
def test_the_mask_keeps_the_authors_visible_count(tokens):
    """mim.py:130-131: int(L · (1 - 0.55)) visible, a uniform subset per volume."""
    mask = random_token_mask(6, tokens, 0.55, torch.Generator().manual_seed(tokens))
    assert mask.shape == (6, tokens)
    assert ((~mask).sum(1) == int(tokens * (1 - 0.55))).all()
    assert not torch.equal(mask[0], mask[1])  # drawn per volume


def official_layout(dim, depth, in_channels, pos_grid):
    """The authors' ViT state at 67218a2, with sub_ln=True, qkv_bias=True, mlp_ratio
    8/3 (vit.py:163-218): names and shapes, transcribed; their code, instantiated,
    printed exactly these for base."""
    hidden = int(dim * 8 / 3)
    layout = {
        "cls_token": (1, 1, dim),  # vit.py:190
        "pos_embed": (1, dim, *pos_grid),  # vit.py:191
        "patch_embed.proj.weight": (dim, in_channels, 16, 16, 16),  # vit.py:26, sac.py:152
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),  # vit.py:215
        "norm.bias": (dim,),
    }
    block = {
        "norm1.weight": (dim,),  # vit.py:146
        "norm1.bias": (dim,),
        "attn.q_bias": (dim,),  # vit.py:62-63: no k bias
        "attn.v_bias": (dim,),
        "attn.q_proj.weight": (dim, dim),  # vit.py:55-57: bias=False
        "attn.k_proj.weight": (dim, dim),
        "attn.v_proj.weight": (dim, dim),
        "attn.proj.weight": (dim, dim),  # vit.py:68
        "attn.proj.bias": (dim,),
        "norm2.weight": (dim,),  # vit.py:149
        "norm2.bias": (dim,),
        "mlp.w1.weight": (hidden, dim),  # vit.py:118-122
        "mlp.w1.bias": (hidden,),
        "mlp.w2.weight": (hidden, dim),
        "mlp.w2.bias": (hidden,),
        "mlp.ffn_ln.weight": (hidden,),
        "mlp.ffn_ln.bias": (hidden,),
        "mlp.w3.weight": (dim, hidden),
        "mlp.w3.bias": (dim,),
    }
    for i in range(depth):
        layout.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    return layout


@pytest.mark.parametrize("in_channels", [1, 3])
def test_base_has_the_authors_parameter_names_shapes_and_count(in_channels):
    size = VIT_SIZES["base"]
    assert size == VitSize(768, 12, 12, (5, 10, 10))  # vit-b.yaml, model.yaml pos_embed_shape
    with torch.device("meta"):
        vit = UniversalViT(size, in_channels)
    ours = {
        OFFICIAL_NAMES.get(name, name): tuple(p.shape)
        for name, p in vit.named_parameters()
        if name != "mask_token"  # the authors': in ViTForMIM (mim.py:51), not ViT
    }
    assert ours == official_layout(768, 12, in_channels, (5, 10, 10))
    assert tuple(vit.mask_token.shape) == (1, 1, 768)
    n = vit_parameter_count(vit)
    # the authors' ViT, instantiated at 67218a2: 88,639,488 (1 channel), 94,930,944 (3)
    assert (
        n
        == official_vit_parameters(size, in_channels)
        == {1: 88_639_488, 3: 94_930_944}[in_channels]
    )
    assert n == sum(p.numel() for p in vit.parameters()) - 768
    block = sum(p.numel() for p in vit.blocks[0].parameters())
    assert block == 4 * 768**2 + 3 * 768 * 2048 + 8 * 768 + 4 * 2048 == 7_092_224


def test_tiny_keeps_the_layout_and_the_formula():
    vit = UniversalViT(VIT_SIZES["tiny"])
    size = VIT_SIZES["tiny"]
    ours = {OFFICIAL_NAMES.get(k, k): tuple(p.shape) for k, p in vit.named_parameters()}
    ours.pop("mask_token")
    assert ours == official_layout(size.dim, size.depth, 1, size.pos_grid)
    assert vit_parameter_count(vit) == official_vit_parameters(size, 1) == 364_880


def test_attention_and_swiglu_compute_the_authors_formulas():
    """vit.py:81-104 (sub_ln path: three F.linear, q and v biased, RoPE on q and k
    after the class token, softmax(q kᵀ / √d) v, proj) and vit.py:124-130."""
    torch.manual_seed(3)
    grid = (2, 3, 2)
    attn = Attention(64, 4).double()
    mlp = SwiGLU(64, 170).double()
    for p in [*attn.parameters(), *mlp.parameters()]:
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 13, 64, dtype=torch.float64)

    def heads(t):
        return t.view(2, 13, 4, 16).transpose(1, 2)

    q = heads(F.linear(x, attn.q_proj.weight, attn.q_bias))
    k = heads(F.linear(x, attn.k_proj.weight))
    v = heads(F.linear(x, attn.v_proj.weight, attn.v_bias))
    q, k = attn.rope(q, grid), attn.rope(k, grid)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 16**0.5, dim=-1)
    want = attn.proj((weights @ v).transpose(1, 2).reshape(2, 13, 64))
    torch.testing.assert_close(attn(x, grid), want)
    hidden = F.silu(mlp.w1(x)) * mlp.w2(x)
    want_mlp = mlp.w3(F.layer_norm(hidden, (170,), mlp.ffn_ln.weight, mlp.ffn_ln.bias))
    torch.testing.assert_close(mlp(x), want_mlp)


def official_resample(x, shape):
    """The authors' ``sac.resample`` (sac.py:321-327), verbatim but for numpy."""
    downsample_shape = tuple(min(a, b) for a, b in zip(x.shape[2:], shape))
    if downsample_shape != tuple(x.shape[2:]):
        x = F.interpolate(x, downsample_shape, mode="area")
    if tuple(shape) != tuple(x.shape[2:]):
        x = F.interpolate(x, shape, mode="trilinear")
    return x


@pytest.mark.parametrize(
    "pos_grid, grid",
    [
        ((5, 10, 10), (6, 8, 6)),  # base on a 96 x 128 x 96 volume: up, down, down
        ((5, 10, 10), (2, 4, 4)),  # down in every axis, not by a divisor
        ((5, 10, 10), (4, 12, 10)),
        ((5, 10, 10), (5, 10, 10)),  # its own grid
        ((2, 4, 4), (3, 6, 5)),  # tiny: up in every axis
        ((2, 4, 4), (1, 3, 7)),
    ],
)
def test_pos_embed_is_resampled_as_the_authors(pos_grid, grid):
    g = torch.Generator().manual_seed(sum(grid))
    pos = torch.randn(1, 8, *pos_grid, generator=g)
    upstream = torch.randn(1, 8, *grid, generator=g)
    results = []
    for f in (lambda p: resample_pos_embed(shrink_pos_embed(p, grid), grid), official_resample):
        leaf = pos.clone().requires_grad_(True)
        out = f(leaf) if f is not official_resample else f(leaf, grid)
        (out * upstream).sum().backward()
        results.append((out.detach(), leaf.grad))
    (ours, ours_grad), (theirs, theirs_grad) = results
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=0, atol=1e-5)


def test_no_layer_scale_no_drop_path_and_no_patch_embed_gradient_scaling():
    """The authors' Block has neither layer scale nor (drop_path_rate 0 in every
    config) drop path (vit.py:132-156); ``patch_embed_grad_scale`` (model.yaml: 0.1) is
    stored at vit.py:217 and read nowhere, so the patch embedding's gradient is the
    plain one: the forward written out by hand gives the same gradient."""
    torch.manual_seed(4)
    vit = UniversalViT(VIT_SIZES["tiny"])
    names = [n for n, _ in vit.named_modules()] + [n for n, _ in vit.named_parameters()]
    assert not any(key in n for n in names for key in ("gamma", "ls1", "ls2", "drop_path"))
    x = torch.rand(2, 1, 32, 48, 32)
    upstream = torch.randn(2, 13, 64)

    def by_hand():
        patches = F.conv3d(x, vit.patch_embed.weight, vit.patch_embed.bias, stride=16)
        grid = (patches.shape[2], patches.shape[3], patches.shape[4])
        tokens = (patches + vit.position_embedding(grid)).flatten(2).transpose(1, 2)
        out = torch.cat([vit.cls_token.expand(2, -1, -1), tokens], dim=1)
        for block in vit.blocks:
            out = block(out, grid)
        return vit.norm(out)

    grads = []
    for forward in (lambda: vit(x, Grid(0))[0], by_hand):
        vit.zero_grad()
        (forward() * upstream).sum().backward()
        grads.append(vit.patch_embed.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
