"""PUMIT's MIM from EVA-02's ImageNet weights: the conversion of an EVA-02 state dict
into our ViT (checked against the authors' ``ViT._load_from_state_dict`` steps,
transcribed here from ``pumit/model/vit.py:251-282`` and ``sac.py:321-327`` at
67218a2) and the MIM stage's file checks. The EVA-02 states are synthetic: random
tensors with EVA-02's names and shapes (``EVA-02/asuka/modeling_pretrain.py``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medtx.errors import ConfigError, MedtxError
from medtx.io import sha256
from medtx.models.pumit.eva02 import IMAGENET_MEAN, IMAGENET_STD, eva02_to_vit
from medtx.models.pumit.sac import Grid
from medtx.models.pumit.vit import VIT_SIZES, UniversalViT, mlp_hidden
from medtx.train.checkpoints import last_path, load_state
from medtx.train.config import resolve_config
from medtx.train.mim import pretrain_mim, pretrain_tokenizer
from tests.unit.train.test_stages import FAST, write_items

PUMIT = {**FAST, "backbone": "pumit", "preset": "tiny", "batch_size": 2}
SHAPE = (20, 24, 18)  # 8 tokens


def eva02_like(dim: int, depth: int, *, patch: int = 14, side: int = 16, seed: int = 0) -> dict:
    """An EVA-02 MIM checkpoint's state (base: dim 768, depth 12, patch 14, 16 x 16
    positions): every parameter, the RoPE buffers (top level and each block's) and
    the MIM head ``lm_head``, which the conversion drops."""
    g = torch.Generator().manual_seed(seed)
    hidden = mlp_hidden(dim)  # EVA-02's int(dim * 4 * 2 / 3), the same number

    def r(*shape: int, scale: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    state = {
        "cls_token": r(1, 1, dim),
        "mask_token": r(1, 1, dim),
        "pos_embed": r(1, 1 + side * side, dim),
        "patch_embed.proj.weight": r(dim, 3, patch, patch),
        "patch_embed.proj.bias": r(dim),
        "rope.freqs_cos": r(side * side, 64, scale=1),
        "rope.freqs_sin": r(side * side, 64, scale=1),
        "norm.weight": 3 + r(dim),  # far from LayerNorm's 1: visible after a few steps
        "norm.bias": r(dim),
        "lm_head.weight": r(32, dim),
        "lm_head.bias": r(32),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        state.update(
            {
                b + "norm1.weight": 1 + r(dim),
                b + "norm1.bias": r(dim),
                b + "attn.q_proj.weight": r(dim, dim),
                b + "attn.k_proj.weight": r(dim, dim),
                b + "attn.v_proj.weight": r(dim, dim),
                b + "attn.q_bias": r(dim),
                b + "attn.v_bias": r(dim),
                b + "attn.rope.freqs_cos": state["rope.freqs_cos"],
                b + "attn.rope.freqs_sin": state["rope.freqs_sin"],
                b + "attn.proj.weight": r(dim, dim),
                b + "attn.proj.bias": r(dim),
                b + "norm2.weight": 1 + r(dim),
                b + "norm2.bias": r(dim),
                b + "mlp.w1.weight": r(hidden, dim),
                b + "mlp.w1.bias": r(hidden),
                b + "mlp.w2.weight": r(hidden, dim),
                b + "mlp.w2.bias": r(hidden),
                b + "mlp.ffn_ln.weight": 1 + r(hidden),
                b + "mlp.ffn_ln.bias": r(hidden),
                b + "mlp.w3.weight": r(dim, hidden),
                b + "mlp.w3.bias": r(dim),
            }
        )
    return state


def official_resample(x: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """The authors' ``sac.resample`` (sac.py:321-327)."""
    down = tuple(min(a, b) for a, b in zip(x.shape[2:], shape))
    if down != tuple(x.shape[2:]):
        x = F.interpolate(x, down, mode="area")
    if tuple(shape) != tuple(x.shape[2:]):
        x = F.interpolate(x, shape, mode="trilinear")
    return x


def official_patch_kernel(weight2d: torch.Tensor, d: int = 16) -> torch.Tensor:
    """vit.py:259-260: bicubic to 16 x 16, then repeated over depth divided by d."""
    weight = F.interpolate(weight2d.float(), (16, 16), mode="bicubic")
    return (weight / d)[:, :, None].repeat(1, 1, d, 1, 1)


def official_pos_embed(pos: torch.Tensor, side: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """vit.py:271-280 with the patch grid only: '1 (h w) c -> 1 c d h w', resampled."""
    planar = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    return official_resample(planar[:, :, None].repeat(1, 1, grid[0], 1, 1), grid)


def official_embed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, grid: Grid):
    """The authors' input path: grey copied to 3 channels (transforms.py:80-85),
    ImageNet-normalised (mim.py:85-86), through their SAC patch conv (sac.py:121-142):
    depth stride 16 >> pending and the kernel's depth sum-pooled to it."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
    normalised = (x.expand(-1, 3, -1, -1, -1) - mean) / std
    dr = max(16 >> grid.pending, 1)
    pooled = weight.unflatten(2, (dr, 16 // dr)).sum(3)
    return F.conv3d(normalised, pooled, bias, stride=(dr, 16, 16))


@pytest.fixture(scope="module")
def base():
    """Our base ViT with a synthetic EVA-02 B checkpoint converted into it."""
    size = VIT_SIZES["base"]
    state = eva02_like(size.dim, size.depth)
    vit = UniversalViT(size)
    converted = eva02_to_vit({"module": state}, vit)
    vit.load_state_dict(converted, strict=True)
    return vit, state, converted


def test_an_eva02_b_state_loads_into_our_base_vit_strictly(base):
    vit, state, converted = base
    assert converted.keys() == vit.state_dict().keys()
    ours = vit.state_dict()
    for key in ("mask_token", "norm.weight", "blocks.11.mlp.w3.weight", "blocks.0.attn.q_bias"):
        assert torch.equal(ours[key], state[key]), key
    # the position grid: theirs repeated over our depth and resampled to 5 x 10 x 10
    expected = official_pos_embed(state["pos_embed"], 16, (5, 10, 10))
    torch.testing.assert_close(ours["pos_embed"], expected, rtol=1e-5, atol=1e-6)
    # the 3D kernel before the fold: the authors' bicubic 14 -> 16 and depth spread
    assert ours["patch_embed.weight"].shape == (768, 1, 16, 16, 16)


def test_the_class_token_takes_eva02s_class_position(base):
    _, state, converted = base
    pos = state["pos_embed"]
    torch.testing.assert_close(converted["cls_token"], state["cls_token"] + pos[:, :1])
    # the authors' vit.py:273 adds pos_embed[:, 1], the first patch's entry: not ours
    assert not torch.allclose(converted["cls_token"], state["cls_token"] + pos[:, 1:2])


@pytest.mark.parametrize("grid", [Grid(0), Grid(1), Grid(64)], ids=["iso", "thick", "2d"])
def test_the_folded_patch_embedding_is_the_official_3_channel_conv(base, grid):
    vit, state, _ = base
    weight = official_patch_kernel(state["patch_embed.proj.weight"])
    bias = state["patch_embed.proj.bias"]
    depth = 1 if grid.aniso_d == 64 else 32 >> grid.aniso_d
    x = torch.rand(2, 1, depth, 32, 32, generator=torch.Generator().manual_seed(1))
    x[..., -5:] = 0  # zero padding too: theirs pads before normalising
    with torch.no_grad():
        ours, _ = vit.patch_embed(x, grid)
        theirs = official_embed(x, weight, bias, grid)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=2e-5)


def test_positions_are_resampled_up_where_our_grid_is_larger():
    size = VIT_SIZES["tiny"]  # (2, 4, 4) positions from a 3 x 3 EVA-02 grid: trilinear
    state = eva02_like(size.dim, size.depth, side=3)
    vit = UniversalViT(size)
    converted = eva02_to_vit(state, vit)  # at the top level, not under "module"
    vit.load_state_dict(converted, strict=True)
    expected = official_pos_embed(state["pos_embed"], 3, (2, 4, 4))
    torch.testing.assert_close(converted["pos_embed"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "change,match",
    [
        (
            {"blocks.0.attn.inner_attn_ln.weight": torch.ones(64)},
            "unknown keys blocks.0.attn.inner",
        ),
        ({"blocks.1.mlp.w3.bias": None}, "missing keys blocks.1.mlp.w3.bias"),
        (
            {"patch_embed.proj.weight": torch.zeros(64, 1, 14, 14)},
            r"patch_embed.proj.weight \(64, 1",
        ),
        ({"pos_embed": torch.zeros(1, 1 + 15, 64)}, r"pos_embed \(1, 16, 64\)"),
    ],
    ids=["unknown", "missing", "grey-kernel", "not-square"],
)
def test_a_state_that_is_not_eva02_is_refused_in_one_line(change, match):
    size = VIT_SIZES["tiny"]
    state = eva02_like(size.dim, size.depth)
    for key, value in change.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    with pytest.raises(MedtxError, match=match) as err:
        eva02_to_vit(state, UniversalViT(size))
    assert "\n" not in str(err.value)


def test_another_model_size_is_refused_in_one_line():
    size = VIT_SIZES["tiny"]
    state = eva02_like(96, size.depth)  # widths not the tiny ViT's
    with pytest.raises(MedtxError, match=r"cls_token \(1, 1, 96\) \(ours \(1, 1, 64\)\)") as err:
        eva02_to_vit(state, UniversalViT(size))
    assert "\n" not in str(err.value)


def test_the_config_takes_a_path_and_a_sha256_or_null():
    cfg = resolve_config({"backbone": "pumit"})
    assert cfg["eva02_weights"] is None and cfg["eva02_sha256"] is None
    resolve_config({"backbone": "pumit", "eva02_weights": "w.pt", "eva02_sha256": "aB" * 32})
    for bad in ({"eva02_weights": ""}, {"eva02_weights": 3}, {"eva02_sha256": "ab" * 31}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            resolve_config({"backbone": "pumit", **bad})


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("eva02")
    items = write_items(root / "pre", 2, shape=SHAPE, prefix="p")
    pretrain_tokenizer(items, out=root / "tokenizer.pt", config={**PUMIT, "epochs": 1})
    size = VIT_SIZES["tiny"]
    torch.save({"module": eva02_like(size.dim, size.depth)}, root / "eva02.pt")
    torch.save({"module": eva02_like(size.dim, size.depth, seed=1)}, root / "other.pt")
    return root, items


def test_mim_starts_from_eva02_and_records_its_sha256(tokenizer, tmp_path):
    root, items = tokenizer
    weights = root / "eva02.pt"
    digest = sha256(weights)
    config = {**PUMIT, "epochs": 1, "eva02_weights": str(weights), "eva02_sha256": digest}
    pretrain_mim(items, init=root / "tokenizer.pt", out=tmp_path / "m.pt", config=config)
    saved = load_state(tmp_path / "m.pt")
    assert saved["metadata"]["eva02"] == {"path": str(weights), "sha256": digest}
    # one step of AdamW at 1e-3 from EVA-02's final norm (3 ± 0.06), not LayerNorm's 1
    eva = torch.load(weights, weights_only=True)["module"]
    torch.testing.assert_close(
        saved["model"]["vit.norm.weight"], eva["norm.weight"], atol=5e-3, rtol=0
    )
    assert load_state(last_path(tmp_path / "m.pt"))["config"]["eva02"]["sha256"] == digest


def test_another_eva02_file_does_not_resume_the_run(tokenizer, tmp_path):
    root, items = tokenizer
    config = {**PUMIT, "epochs": 1, "eva02_weights": str(root / "eva02.pt")}
    out, init = tmp_path / "m.pt", root / "tokenizer.pt"
    first = pretrain_mim(items, init=init, out=out, config=config, max_steps_this_run=0)
    assert first.status == "interrupted"
    lines: list[str] = []
    config["eva02_weights"] = str(root / "other.pt")
    again = pretrain_mim(items, init=init, out=out, config=config, log=lines.append)
    assert again.resumed_from is None
    assert any("written for another config" in line and "eva02" in line for line in lines)


def test_a_missing_or_wrong_eva02_file_stops_mim_before_training(tokenizer, tmp_path):
    root, items = tokenizer
    init, out = root / "tokenizer.pt", tmp_path / "m.pt"
    missing = {**PUMIT, "eva02_weights": str(tmp_path / "missing.pt")}
    with pytest.raises(MedtxError, match=r"eva02_weights .*missing.pt: no such file$"):
        pretrain_mim(items, init=init, out=out, config=missing)
    wrong = {**PUMIT, "eva02_weights": str(root / "eva02.pt"), "eva02_sha256": "0" * 64}
    with pytest.raises(MedtxError, match=r"eva02_weights .*eva02.pt: sha256 .*not the expected"):
        pretrain_mim(items, init=init, out=out, config=wrong)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    junk = {**PUMIT, "eva02_weights": str(tmp_path / "junk.pt")}
    with pytest.raises(MedtxError, match=r"eva02_weights .*junk.pt: cannot read it") as err:
        pretrain_mim(items, init=init, out=out, config=junk)
    assert "\n" not in str(err.value)
    torch.save({"module": eva02_like(96, 2)}, tmp_path / "wide.pt")
    wide = {**PUMIT, "eva02_weights": str(tmp_path / "wide.pt")}
    with pytest.raises(MedtxError, match=r"eva02_weights .*wide.pt: not an EVA-02 state dict"):
        pretrain_mim(items, init=init, out=out, config=wide)
    assert not out.exists() and not last_path(out).exists()
