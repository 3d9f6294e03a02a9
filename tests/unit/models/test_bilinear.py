"""bilinear_resize: the same values and gradients as F.interpolate, as matrix products."""

import pytest
import torch
import torch.nn.functional as F

from medtx.models import build_model
from medtx.models import slice_transformer as st
from medtx.models.slice_transformer import bilinear_matrix, bilinear_resize

SHAPES = [
    ((2, 3, 8, 6), (16, 12)),  # up by 2
    ((2, 3, 7, 5), (24, 19)),  # up by non-integer factors
    ((1, 4, 9, 11), (9, 11)),  # identity
    ((2, 3, 24, 19), (7, 5)),  # down by non-integer factors
    ((3, 2, 10, 10), (5, 20)),  # down along one axis, up along the other
    ((1, 1, 1, 1), (4, 3)),  # a single pixel
    ((2, 5, 6, 4), (1, 1)),  # down to a single pixel
]


def reference(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@pytest.mark.parametrize("shape, size", SHAPES)
def test_forward_equals_interpolate(shape, size):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    out = bilinear_resize(x, size)
    assert out.shape == (*shape[:2], *size) and out.dtype == torch.float32
    torch.testing.assert_close(out, reference(x, size), rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape, size", SHAPES)
def test_gradient_equals_interpolate(shape, size):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g)
    upstream = torch.randn(*shape[:2], *size, generator=g)
    grads = []
    for f in (bilinear_resize, reference):
        leaf = x.clone().requires_grad_(True)
        (f(leaf, size) * upstream).sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-5)


def test_float64_stays_float64_and_matches():
    x = torch.randn(2, 3, 7, 5, dtype=torch.float64)
    out = bilinear_resize(x, (24, 19))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference(x, (24, 19)), rtol=0, atol=1e-12)


def test_matrix_rows_are_convex_weights():
    m = bilinear_matrix(19, 5)
    assert m.shape == (19, 5)
    torch.testing.assert_close(m.sum(dim=1), torch.ones(19))
    assert (m >= 0).all() and ((m > 0).sum(dim=1) <= 2).all()


def test_segmentation_model_output_unchanged(monkeypatch):
    torch.manual_seed(0)
    model = build_model("table3", "segmentation").eval()
    volume = torch.rand(1, 4, 20, 24, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.nn.init.normal_(model.head.linear.bias)
        ours = model(volume)
        calls = []

        def interpolate(x, size):
            calls.append(size)
            return reference(x, size)

        monkeypatch.setattr(st, "bilinear_resize", interpolate)
        old = model(volume)
    assert len(calls) == 9  # 3 planes x layer1-3 maps, all through F.interpolate
    assert ours.shape == (1, 3, 20, 24, 16)
    torch.testing.assert_close(ours, old, rtol=0, atol=1e-5)
