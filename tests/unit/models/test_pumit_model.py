"""PUMIT's fine-tuning model: shapes on odd sizes, pooling, padding, inflation, counts."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from medtx.errors import ConfigError
from medtx.models.pumit.model import (
    POOLINGS,
    PRESETS,
    PumitModel,
    build_model,
    inflate_state_dict,
    params_table,
    vit_params_rows,
)
from medtx.models.pumit.sac import Grid
from medtx.models.slice_transformer import TASK_DEFAULTS

BRAIN = (48, 57, 48)  # the 2 mm MNI grid pooled by 2: not a multiple of 16 in height


def volume(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("task, k", [("classification", 3), ("regression", 1)])
def test_pooled_tasks_give_one_row_per_volume(task, k):
    torch.manual_seed(0)
    model = build_model("tiny", task).eval()
    with torch.no_grad():
        out = model(volume(2, 1, *BRAIN))
    assert out.shape == (2, k)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("shape", [(40, 48, 32), (35, 41, 29)])
def test_segmentation_logits_have_the_input_size(shape):
    torch.manual_seed(0)
    model = build_model("tiny", "segmentation").eval()
    assert model.in_channels == 4
    with torch.no_grad():
        out = model(volume(1, 4, *shape))
    assert out.shape == (1, 3, *shape)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "grid, shape", [(Grid(2), (10, 41, 29)), (Grid.of((1.0, 1.0, 1.0), 1), (1, 41, 29))]
)
def test_segmentation_takes_thick_slices_and_2d_images(grid, shape):
    torch.manual_seed(0)
    model = build_model("tiny", "segmentation", in_channels=1).eval()
    with torch.no_grad():
        assert model(volume(1, 1, *shape), grid).shape == (1, 3, *shape)


def test_mean_pooling_reads_the_patch_tokens_and_cls_the_class_token():
    torch.manual_seed(0)
    cls_model = build_model("tiny", "classification").eval()
    mean_model = build_model("tiny", "classification", pooling="mean").eval()
    mean_model.load_state_dict(cls_model.state_dict())  # the same weights throughout
    x = volume(2, 1, 32, 48, 32)
    with torch.no_grad():
        tokens, _ = cls_model.vit(x, Grid(0))
        by_cls, by_mean = cls_model(x), mean_model(x)
        torch.testing.assert_close(by_cls, cls_model.head(tokens[:, 0]))
        torch.testing.assert_close(by_mean, cls_model.head(tokens[:, 1:].mean(dim=1)))
    assert not torch.allclose(by_cls, by_mean)


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        ({"preset": "huge"}, "'huge'"),
        ({"task": "detection"}, "'detection'"),
        ({"pooling": "max"}, "'max'"),
    ],
)
def test_bad_choices_raise_a_config_error_naming_them(kwargs, bad):
    with pytest.raises(ConfigError, match=bad):
        build_model(**kwargs)
    args = {"preset": "tiny", "task": "classification", "num_outputs": 3, **kwargs}
    with pytest.raises(ConfigError, match=bad) as err:
        PumitModel(**args)
    name = next(iter(kwargs))
    allowed = {"preset": PRESETS, "task": TASK_DEFAULTS, "pooling": POOLINGS}[name]
    assert all(repr(choice) in str(err.value) for choice in allowed)
    assert "\n" not in str(err.value)


def test_segmentation_gradients_reach_the_patch_embedding_and_the_decoder():
    torch.manual_seed(0)
    model = build_model("tiny", "segmentation")
    model(volume(2, 4, 32, 36, 32)).square().mean().backward()
    for weight in (model.vit.patch_embed.weight, model.decoder.bottleneck.conv1.weight):
        assert weight.grad is not None
        assert torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0


def test_padding_is_zeros_at_the_end_and_changes_nothing():
    torch.manual_seed(0)
    x = volume(1, 1, *BRAIN)
    padded = F.pad(x, (0, 0, 0, 64 - BRAIN[1]))  # height 57 -> 64 with zeros at the end
    model = build_model("tiny", "classification", pooling="mean").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(padded), rtol=0, atol=0)
        # not vacuous: other padding does change the output
        assert not torch.allclose(model(x), model(F.pad(x, (0, 0, 7, 0))))
        assert not torch.allclose(model(x), model(F.pad(x, (0, 0, 0, 7), value=1.0)))
    # segmentation: the ViT pads to 64 as above, the full-size stem to an even 58;
    # the logits are cropped back from the end
    seg = build_model("tiny", "segmentation", in_channels=1).eval()
    with torch.no_grad():
        even = seg(F.pad(x, (0, 0, 0, 1)))
        torch.testing.assert_close(seg(x), even[..., : BRAIN[1], :], rtol=0, atol=0)


def test_an_inflated_checkpoint_embeds_a_repeated_volume_as_the_one_channel_model():
    torch.manual_seed(0)
    one = build_model("tiny", "classification").eval()
    state = one.state_dict()
    inflated = inflate_state_dict(state, 4)
    assert inflated["vit.patch_embed.weight"].shape == (64, 4, 16, 16, 16)
    assert state["vit.patch_embed.weight"].shape == (64, 1, 16, 16, 16)  # not mutated
    assert inflated["vit.cls_token"] is state["vit.cls_token"]

    four = build_model("tiny", "segmentation").eval()  # 4 channels, a fresh decoder
    vit_state = {k: v for k, v in inflated.items() if k.startswith("vit.")}
    missing, unexpected = four.load_state_dict(vit_state, strict=False)
    assert not unexpected
    assert missing and not any(k.startswith("vit.") for k in missing)
    # float64: the sub-LN on the MLP's hidden (ffn_ln) magnifies float32 rounding of the
    # 4-channel sum past 1e-5 at a fresh init
    x = volume(2, 1, 32, 48, 32).double()
    one, four = one.double(), four.double()
    with torch.no_grad():
        ref, _ = one.vit(x, Grid(0))
        got, _ = four.vit(x.repeat(1, 4, 1, 1, 1), Grid(0))
    torch.testing.assert_close(got[:, 0], ref[:, 0], rtol=0, atol=1e-10)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)  # the patch tokens as well


def test_params_table_covers_every_preset_and_task_at_the_right_scale():
    rows = params_table()
    assert {(r["preset"], r["task"]) for r in rows} == set(
        itertools.product(PRESETS, TASK_DEFAULTS)
    )
    assert all(
        set(r) == {"task", "preset", "in_channels", "num_outputs", "parameters", "paper"}
        for r in rows
    )
    by = {(r["preset"], r["task"]): r for r in rows}
    assert 80e6 < by["base", "classification"]["parameters"] < 100e6  # ViT-B scale
    assert by["base", "segmentation"]["parameters"] > by["base", "classification"]["parameters"]
    assert all(by["tiny", task]["parameters"] < 3e6 for task in TASK_DEFAULTS)
    assert by["tiny", "segmentation"]["in_channels"] == 4
    torch.manual_seed(0)
    tiny = build_model("tiny", "regression")
    assert by["tiny", "regression"]["parameters"] == sum(p.numel() for p in tiny.parameters())


def test_vit_rows_give_ours_and_the_authors_count_for_base():
    """``medtx params``'s vit_only rows: the ViT alone, ours against the authors'
    code (instantiated at 67218a2: 88,639,488 with 1 input channel, 94,930,944 with
    the 3 they train on)."""
    rows = {r["in_channels"]: r for r in vit_params_rows("base")}
    assert set(rows) == {1, 3}
    assert rows[1]["parameters"] == 88_639_488 and rows[1]["paper"] == "88,639,488"
    assert rows[3]["parameters"] == 94_930_944 and rows[3]["paper"] == "94,930,944"
    assert all(
        set(r) == {"task", "preset", "in_channels", "num_outputs", "parameters", "paper"}
        for r in rows.values()
    )
    by = {(r["preset"], r["task"]): r for r in params_table()}
    head = 768 * 3 + 3
    assert by["base", "classification"]["parameters"] == 88_639_488 + 768 + head  # + mask token
