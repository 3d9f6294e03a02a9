"""Pre-training pieces: Bézier intensity map, triplet loss, slice masking, masked loss."""

import numpy as np
import pytest
import torch

from medtx.models import build_model
from medtx.models.pretext import (
    MaskToken,
    apply_mask,
    batch_negatives,
    bezier_curve,
    bezier_intensity,
    constant_slice_embedding,
    exemplar_loss,
    mask_slices,
    masked_encoding_loss,
    masked_prediction_loss,
    triplet_loss,
    weighted_masked_mse,
)

TINY = (16, 20, 12)


def tiny_volumes(batch=2, seed=0):
    return torch.rand(batch, 1, *TINY, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- stage 1


@pytest.mark.parametrize("seed", range(20))
def test_bezier_intensity_is_monotone_and_stays_in_unit_interval(seed):
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, 501)
    out = bezier_intensity(ramp, rng)
    steps = np.diff(out)
    assert (steps >= -1e-12).all() or (steps <= 1e-12).all()
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert {round(out[0]), round(out[-1])} == {0, 1}  # ends map to the ends, maybe swapped


def test_bezier_intensity_flips_about_half_the_time():
    rng = np.random.default_rng(1)
    decreasing = sum(bezier_intensity(np.array([0.0, 1.0]), rng)[0] > 0.5 for _ in range(400))
    assert 150 < decreasing < 250


def test_bezier_curve_ends_at_corners():
    xs, ys = bezier_curve(np.random.default_rng(0))
    assert (xs[0], ys[0], xs[-1], ys[-1]) == (0.0, 0.0, 1.0, 1.0)


def test_bezier_intensity_keeps_tensor_type_and_rejects_out_of_range():
    rng = np.random.default_rng(0)
    vol = torch.rand(4, 5, 6)
    out = bezier_intensity(vol, rng)
    assert isinstance(out, torch.Tensor) and out.shape == vol.shape and out.dtype == vol.dtype
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        bezier_intensity(np.array([0.0, 2.0]), rng)


def test_triplet_loss_zero_for_equal_positive_and_far_negative():
    a = [torch.randn(3, n, 8) for n in (4, 5, 4)]
    far = [x + 10.0 for x in a]
    assert triplet_loss(a, a, far).item() == pytest.approx(0.0, abs=1e-6)


def test_triplet_loss_is_margin_when_negative_equals_anchor():
    a = [torch.randn(3, 4, 8) for _ in range(3)]
    assert triplet_loss(a, a, a, margin=1.0).item() == pytest.approx(1.0, abs=1e-4)


def test_triplet_loss_averages_planes_and_slices():
    a = torch.zeros(1, 2, 2)
    p = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])  # slice mean (1, 0): distance 1
    n = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])  # slice mean (0, 0.5): distance 0.5
    expected = (1.0 - 0.5 + 1.0 + 0.0) / 2  # plane 1: 1.5; plane 2 (a, a, far): 0
    got = triplet_loss([a, a], [p, a], [n, a + 5], margin=1.0)
    assert got.item() == pytest.approx(expected, abs=1e-4)


def test_negatives_come_from_another_volume():
    x = torch.arange(3.0)[:, None]
    assert batch_negatives(x).flatten().tolist() == [2.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="at least 2 volumes"):
        batch_negatives(x[:1])


def test_exemplar_loss_trains_the_encoders_only():
    model = build_model("table3", "classification")
    loss = exemplar_loss(model, tiny_volumes(), np.random.default_rng(0))
    loss.backward()
    assert loss.item() >= 0.0
    assert model.encoders[2].stem.weight.grad is not None
    assert all(p.grad is None for p in model.transformer.parameters())


# ---------------------------------------------------------------------------- stage 2


@pytest.mark.parametrize("n, expected", [(96, 9), (114, 11), (96, 9), (30, 3), (5, 1)])
def test_mask_slices_counts(n, expected):
    idx = mask_slices(n, generator=torch.Generator().manual_seed(0))
    assert len(idx) == expected and len(set(idx.tolist())) == expected
    assert idx.min() >= 0 and idx.max() < n and torch.equal(idx, idx.sort().values)


def test_mask_slices_checks_ratio():
    with pytest.raises(ValueError, match="ratio"):
        mask_slices(96, ratio=1.5)


def test_apply_mask_replaces_only_masked_slices():
    emb = torch.randn(2, 6, 4)
    mask = torch.tensor([1, 4])
    out = apply_mask(emb, mask, torch.full((4,), 7.0))
    assert (out[:, [1, 4]] == 7.0).all()
    keep = [0, 2, 3, 5]
    assert torch.equal(out[:, keep], emb[:, keep])


def test_masked_prediction_loss_is_mse_at_masked_positions_summed_over_planes():
    target = [torch.zeros(2, 5, 3), torch.zeros(2, 4, 3)]
    pred = [torch.zeros(2, 5, 3), torch.zeros(2, 4, 3)]
    pred[0][:, 1] = 2.0  # masked: contributes 4
    pred[0][:, 2] = 9.0  # not masked: ignored
    pred[1][:, 0] = 1.0  # masked together with slice 3 (error 0): mean 0.5
    masks = [torch.tensor([1]), torch.tensor([0, 3])]
    assert masked_prediction_loss(pred, target, masks).item() == pytest.approx(4.5)


def test_constant_slice_embedding_is_encoder_bias():
    model = build_model("table3", "classification")
    vec = constant_slice_embedding(model.encoders[0], (1, 20, 12))
    torch.testing.assert_close(vec, model.encoders[0].fc.bias.detach())


@pytest.mark.parametrize("learned", [False, True])
def test_masked_encoding_loss_trains_transformer_not_encoders(learned):
    model = build_model("table3", "regression")
    token = MaskToken(d_model=64) if learned else None
    loss = masked_encoding_loss(
        model, tiny_volumes(), generator=torch.Generator().manual_seed(0), mask_token=token
    )
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert model.transformer.layers[0].attn.q.weight.grad is not None
    assert all(p.grad is None for p in model.encoders.parameters())
    if learned:
        assert token.tokens.grad is not None


def test_the_sync_free_masked_mse_is_the_picked_one():
    g = torch.Generator().manual_seed(4)
    pred, target = torch.randn(2, 3, 11, 8, generator=g).unbind(0)
    flags = torch.rand(3, 11, generator=g) < 0.3
    flags[:, 0] = True
    want = torch.nn.functional.mse_loss(pred[flags], target[flags])
    torch.testing.assert_close(weighted_masked_mse(pred, target, flags), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_masked_encoding_loss_on_cuda_matches_the_cpu():
    model = build_model("table3", "classification")
    volumes = torch.rand(2, 1, 24, 28, 20, generator=torch.Generator().manual_seed(1))
    cpu = masked_encoding_loss(model, volumes, generator=torch.Generator().manual_seed(2))
    gpu = masked_encoding_loss(
        model.cuda(), volumes.cuda(), generator=torch.Generator().manual_seed(2)
    )
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)


def test_masked_encoding_needs_the_transformer():
    model = build_model("table3", "regression", use_transformer=False)
    with pytest.raises(ValueError, match="use_transformer=True"):
        masked_encoding_loss(model, tiny_volumes())
