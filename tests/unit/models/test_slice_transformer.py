"""The Medical Transformer: Table 3 parameter counts, shapes, exact cheap heads, gradients."""

import pytest
import torch
import torch.nn.functional as F

from medtx.errors import ConfigError
from medtx.models import build_model, count_parameters, inflate_stem, params_table
from medtx.models.slice_transformer import (
    MedicalTransformer,
    PlaneEncoder,
    SliceStackNorm,
    inflate_state_dict,
    literal_pooled_logits,
    literal_segmentation_logits,
    slices_to_volume,
    volume_to_slices,
)

SMALL = (32, 36, 32)  # a tiny volume; the real one is 96 x 114 x 96
UNEQUAL = (24, 28, 20)  # smaller still, three different sizes to catch swapped axes


def small_volume(batch=2, channels=1, dtype=torch.float32, seed=0, shape=SMALL):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, *shape, generator=g, dtype=dtype)


@pytest.mark.parametrize(
    "preset, task, expected",
    [
        ("table3", "classification", 2_402_163),
        ("table3", "regression", 2_401_777),
        ("table3", "segmentation", 2_410_227),
        ("paper_text", "classification", 2_104_083),
    ],
)
def test_parameter_counts_match_table3(preset, task, expected):
    assert count_parameters(build_model(preset, task)) == expected


def test_segmentation_defaults_to_four_modalities_and_three_regions():
    model = build_model("table3", "segmentation")
    assert model.in_channels == 4
    assert model.head.linear.in_features == 528 and model.head.linear.out_features == 3


def test_params_table_rows():
    rows = {(r["task"], r["preset"]): r for r in params_table()}
    assert rows[("classification", "table3")]["parameters"] == 2_402_163
    assert rows[("classification", "table3")]["paper"] == "2.402M"
    assert rows[("classification", "paper_text")]["parameters"] == 2_104_083


@pytest.mark.parametrize("task, k", [("classification", 3), ("regression", 1)])
@pytest.mark.parametrize("use_transformer", [True, False])
def test_pooled_output_shapes(task, k, use_transformer):
    model = build_model("table3", task, use_transformer=use_transformer).eval()
    with torch.no_grad():
        assert model(small_volume()).shape == (2, k)


def test_segmentation_output_shape():
    model = build_model("table3", "segmentation").eval()
    with torch.no_grad():
        assert model(small_volume(channels=4)).shape == (2, 3, *SMALL)


def test_per_plane_sequences_also_run():
    model = build_model("table3", "classification", joint_planes=False).eval()
    with torch.no_grad():
        assert model(small_volume()).shape == (2, 3)


def test_without_transformer_has_no_transformer_parameters():
    full = count_parameters(build_model("table3", "classification"))
    ablated = count_parameters(build_model("table3", "classification", use_transformer=False))
    assert full - ablated == 282_432


def test_features_are_per_plane_slice_embeddings():
    model = build_model("table3", "segmentation").eval()
    with torch.no_grad():
        feats = model.forward_features(small_volume(channels=4))
    assert [e.shape for e in feats.embeddings] == [(2, 32, 64), (2, 36, 64), (2, 32, 64)]
    assert [m.shape[2] for m in feats.maps[0]] == [16, 32, 64]


def test_planes_slice_and_restore():
    v = small_volume()
    for p, n in enumerate(SMALL):
        s = volume_to_slices(v, p)
        assert s.shape[1] == n
        assert torch.equal(slices_to_volume(s, p), v)
    assert torch.equal(volume_to_slices(v, 1)[:, 5, 0], v[:, 0, :, 5, :])


def test_slice_stack_norm_uses_statistics_of_the_whole_stack():
    x = torch.randn(2 * 5, 3, 4, 6, dtype=torch.float64)
    out = SliceStackNorm()(x, 5).unflatten(0, (2, 5))
    ref = x.unflatten(0, (2, 5))
    mean = ref.mean(dim=(1, 3, 4), keepdim=True)
    var = ref.var(dim=(1, 3, 4), keepdim=True, unbiased=False)
    torch.testing.assert_close(out, (ref - mean) / torch.sqrt(var + 1e-5))
    # per slice, the statistics are NOT normalized away
    assert out[0, 0].mean(dim=(1, 2)).abs().max() > 1e-3


def test_pooled_head_equals_linear_on_3d_map_then_average():
    model = build_model("table3", "classification").double().eval()
    with torch.no_grad():
        feats = model.forward_features(small_volume(dtype=torch.float64, shape=UNEQUAL))
        torch.testing.assert_close(
            model.forward_head(feats), literal_pooled_logits(model.head, feats.embeddings)
        )


def test_segmentation_projection_before_upsampling_is_exact():
    model = build_model("table3", "segmentation").double().eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.head.linear.bias)
        volume = small_volume(channels=4, dtype=torch.float64, shape=UNEQUAL)
        feats = model.forward_features(volume)
        cheap = model.forward_head(feats)
        literal = literal_segmentation_logits(model.head, feats.embeddings, feats.maps)
    assert cheap.shape == (2, 3, *UNEQUAL)
    torch.testing.assert_close(cheap, literal)


def test_gradient_reaches_every_parameter():
    for task, channels, loss_fn in (
        ("classification", 1, lambda out: F.cross_entropy(out, torch.tensor([0, 2]))),
        ("segmentation", 4, lambda out: out.square().mean()),
    ):
        model = build_model("table3", task)
        loss_fn(model(small_volume(channels=channels))).backward()
        missing = [
            n
            for n, p in model.named_parameters()
            if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0
        ]
        assert not missing, f"{task}: no gradient for {missing}"


def test_inflate_stem_duplicates_over_channels():
    w = torch.randn(16, 1, 7, 7)
    inflated = inflate_stem(w, 4)
    assert inflated.shape == (16, 4, 7, 7)
    assert all(torch.equal(inflated[:, c], w[:, 0]) for c in range(4))


def test_inflated_encoder_sees_four_copies_of_t1_as_t1():
    t1 = PlaneEncoder(in_channels=1).eval()
    brats = PlaneEncoder(in_channels=4).eval()
    brats.load_state_dict(inflate_state_dict(t1.state_dict(), 4))
    slices = volume_to_slices(small_volume(batch=1), 0).flatten(0, 1)
    copies = slices.repeat(1, 4, 1, 1)
    with torch.no_grad():  # the stem output is 4x larger; the norm after it is scale-free
        torch.testing.assert_close(brats.stem(copies), 4 * t1.stem(slices))
        torch.testing.assert_close(
            brats(copies[None])[0], t1(slices[None])[0], rtol=1e-2, atol=1e-2
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"task": "survival", "num_outputs": 1}, "task 'survival'"),
        ({"task": "regression", "num_outputs": 0}, "num_outputs must be a positive integer"),
        ({"task": "regression", "num_outputs": 1, "d_model": 15}, "d_model must be even"),
        ({"task": "regression", "num_outputs": 1, "dropout": 1.5}, "dropout must be in"),
    ],
)
def test_bad_hyperparameters_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MedicalTransformer(**kwargs)


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError, match="paper_text"):
        build_model("huge", "classification")


def test_wrong_input_is_named():
    model = build_model("table3", "classification")
    with pytest.raises(ValueError, match="must be 5D"):
        model(torch.rand(1, *SMALL))
    with pytest.raises(ValueError, match="in_channels=1"):
        model(small_volume(channels=4))
