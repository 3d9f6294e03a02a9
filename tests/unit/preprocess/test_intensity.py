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


def test_normalize_writes_the_float16_cache_of_its_output(tmp_path):
    """The training cache is the normalized volume itself (channels-first, float16),
    and the step records it like its NIfTI output."""
    import nibabel as nib

    from medtx.preprocess.context import StepContext
    from medtx.preprocess.intensity import run_normalize
    from tests.conftest import write_nifti

    rng = np.random.default_rng(0)
    mask = np.zeros((12, 14, 12), np.float32)
    mask[2:10, 3:11, 2:10] = 1
    image = write_nifti(
        tmp_path / "pooled.nii.gz", (rng.random(mask.shape) * 500 * mask).astype(np.float32)
    )
    maskp = write_nifti(tmp_path / "mask.nii.gz", mask)
    rec = run_normalize(
        image,
        maskp,
        image_out=tmp_path / "preproc.nii.gz",
        record_out=tmp_path / "r.json",
        ctx=StepContext(scan="s"),
        params={"within": "brain"},
        cache_out=tmp_path / "s.npy",
    )
    cache = np.load(tmp_path / "s.npy")
    assert cache.dtype == np.float16 and cache.shape == (1, 12, 14, 12)
    preproc = nib.load(str(tmp_path / "preproc.nii.gz")).get_fdata()
    assert np.allclose(cache[0], preproc, atol=1e-3) and cache.max() == 1.0
    assert [o["role"] for o in rec["outputs"]] == ["preproc", "cache"]
    plain = run_normalize(
        image,
        maskp,
        image_out=tmp_path / "p2.nii.gz",
        record_out=tmp_path / "r2.json",
        ctx=StepContext(scan="s"),
        params={"within": "brain"},
    )
    assert [o["role"] for o in plain["outputs"]] == ["preproc"]  # no cache_out, no cache


def test_pool_normalize_writes_both_steps_records(tmp_path):
    """One job, two steps: each keeps its own record, params and outputs, and the
    normalize step reads what the pool step wrote."""
    import json

    from medtx.preprocess.context import StepContext
    from medtx.preprocess.intensity import run_pool_normalize
    from tests.conftest import write_nifti

    rng = np.random.default_rng(2)
    mask = np.zeros((16, 18, 16), np.float32)
    mask[3:13, 4:14, 3:13] = 1
    image = write_nifti(
        tmp_path / "n4.nii.gz", (rng.random(mask.shape) * 900 * mask).astype(np.float32)
    )
    maskp = write_nifti(tmp_path / "mask.nii.gz", mask)
    pool, norm = run_pool_normalize(
        image,
        maskp,
        pooled_out=tmp_path / "pooled.nii.gz",
        mask_out=tmp_path / "pmask.nii.gz",
        pool_record_out=tmp_path / "pool.json",
        image_out=tmp_path / "preproc.nii.gz",
        record_out=tmp_path / "norm.json",
        cache_out=tmp_path / "s.npy",
        ctx=StepContext(scan="s"),
        params={"pool": {"factor": 2}, "normalize": {"within": "brain"}},
    )
    assert (pool["step"], norm["step"]) == ("pool", "normalize")
    assert pool["params"] == {"factor": 2} and norm["params"] == {"within": "brain"}
    assert pool["qc"]["metrics"]["shape"] == [8, 9, 8] == norm["qc"]["metrics"]["shape"]
    pooled_out = {o["role"]: o["path"] for o in pool["outputs"]}["pooled"]
    assert {i["role"]: i["path"] for i in norm["inputs"]}["pooled"] == pooled_out
    assert json.loads((tmp_path / "norm.json").read_text())["outputs"][1]["role"] == "cache"
    assert np.load(tmp_path / "s.npy").shape == (1, 8, 9, 8)
