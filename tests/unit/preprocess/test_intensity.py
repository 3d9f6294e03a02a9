"""Pooling and min-max: shapes, geometry and the [0, 1] range."""

import numpy as np
import pytest

from medtx.preprocess.intensity import average_pool, minmax, pool_shape, pooled_affine


def test_template_grid_pools_to_model_input():
    assert pool_shape((193, 229, 193), 2) == (96, 114, 96)


def test_average_pool_is_block_mean():
    data = np.arange(5 * 4 * 3, dtype=np.float32).reshape(5, 4, 3)
    pooled = average_pool(data, 2)
    assert pooled.shape == (2, 2, 1)
    assert pooled[1, 0, 0] == pytest.approx(data[2:4, 0:2, 0:2].mean())


def test_pooled_affine_maps_block_centres():
    affine = np.array([[-1.0, 0, 0, 96], [0, 1.0, 0, -132], [0, 0, 1.0, -78], [0, 0, 0, 1]])
    new = pooled_affine(affine, 2)
    # pooled voxel (i,j,k) sits at the centre of old voxels 2i..2i+1
    old_centre = affine @ np.array([2 * 3 + 0.5, 2 * 5 + 0.5, 2 * 7 + 0.5, 1])
    np.testing.assert_allclose(new @ np.array([3, 5, 7, 1]), old_centre)
    np.testing.assert_allclose(np.abs(np.diag(new)[:3]), [2, 2, 2])


def test_minmax_in_brain_reaches_exactly_zero_and_one():
    rng = np.random.default_rng(0)
    data = rng.normal(100, 20, (8, 8, 8)).astype(np.float32)
    mask = np.zeros(data.shape, bool)
    mask[2:6, 2:6, 2:6] = True
    data[0, 0, 0] = 1e6  # outside the brain: must not set the scale
    out = minmax(data, mask)
    assert out[mask].min() == 0.0 and out[mask].max() == 1.0
    assert np.all(out[~mask] == 0.0)
    assert out.dtype == np.float32


def test_minmax_constant_brain_is_an_error():
    with pytest.raises(ValueError, match="constant intensity"):
        minmax(np.ones((4, 4, 4), np.float32), np.ones((4, 4, 4), bool))
