"""Pooling and min-max: shapes, geometry and the [0, 1] range."""

import numpy as np
import pytest

from medtx.preprocess.intensity import (
    average_pool,
    clip_value,
    minmax,
    pool_shape,
    pooled_affine,
)


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


def _paper_minmax(data, mask):
    """The plain min-max as it stood before clip_percentile (the paper's)."""
    region = data[mask]
    lo, hi = float(region.min()), float(region.max())
    out = np.clip((data - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    out[~mask] = 0.0
    return out


def _bright_brain(seed=0):
    """A brain ~N(100, 10) with a few skull-base voxels at 1000 (0.1% of the brain)."""
    rng = np.random.default_rng(seed)
    data = np.zeros((24, 24, 24), np.float32)
    mask = np.zeros(data.shape, bool)
    mask[2:22, 2:22, 2:22] = True
    data[mask] = rng.normal(100, 10, int(mask.sum()))
    data[2, 2, 2:10] = 1000.0
    return data, mask


def test_clipping_undoes_the_squeeze_of_a_few_bright_voxels():
    data, mask = _bright_brain()
    plain = minmax(data, mask)
    assert np.median(plain[mask]) < 0.15  # squeezed by the 1000s
    clipped = minmax(data, mask, clip_percentile=99.5)
    assert 0.4 < np.median(clipped[mask]) < 0.7
    assert clipped[mask].min() == 0.0 and clipped[mask].max() == 1.0
    assert np.all(clipped[~mask] == 0.0) and clipped.dtype == np.float32
    assert np.all(clipped[2, 2, 2:10] == 1.0)


def test_clip_percentile_none_is_the_papers_minmax_byte_for_byte():
    data, mask = _bright_brain(1)
    expected = _paper_minmax(data, mask)
    for out in (minmax(data, mask), minmax(data, mask, clip_percentile=None)):
        assert out.dtype == expected.dtype and out.tobytes() == expected.tobytes()


def test_clip_percentile_hand_computed():
    """11 brain values: the 95th percentile sits at index 0.95 * 10 = 9.5, halfway
    between 60 and 68 (numpy's linear interpolation): clip at 64, then divide by 64."""
    brain = [0, 8, 16, 24, 32, 40, 48, 52, 56, 60, 68]
    order = [3, 10, 0, 7, 5, 1, 9, 2, 8, 4, 6]  # shuffled: order must not matter
    data = np.array([brain[i] for i in order] + [5000], np.float32)
    mask = np.array([True] * 11 + [False])
    out = minmax(data, mask, clip_percentile=95)
    expected = np.array([brain[i] / 64 for i in order] + [0.0], np.float32)
    expected[order.index(10)] = 1.0  # 68 clipped to 64
    np.testing.assert_array_equal(out, expected)
    assert clip_value(data, mask, 95) == 64.0
    np.testing.assert_array_equal(
        minmax(data, mask), np.array([brain[i] / 68 for i in order] + [0.0], np.float32)
    )


def _run_normalize(tmp_path, name, data, mask, params):
    from medtx.preprocess.context import StepContext
    from medtx.preprocess.intensity import run_normalize
    from tests.conftest import write_nifti

    image = write_nifti(tmp_path / f"{name}-in.nii.gz", data)
    maskp = write_nifti(tmp_path / f"{name}-mask.nii.gz", mask.astype(np.float32))
    rec = run_normalize(
        image,
        maskp,
        image_out=tmp_path / f"{name}.nii.gz",
        record_out=tmp_path / f"{name}.json",
        ctx=StepContext(scan="s"),
        params=params,
    )
    import nibabel as nib

    return rec, np.asarray(nib.load(str(tmp_path / f"{name}.nii.gz")).dataobj)


def test_normalize_records_the_clip_and_defaults_to_the_schema(tmp_path):
    """The record names the percentile and the intensity clipped at; params without
    clip_percentile take the schema's default (99.5), null gives plain min-max."""
    from medtx.config import load_config

    data, mask = _bright_brain(2)
    default = load_config()["preprocess"]["normalize"]["clip_percentile"]
    assert default == 99.5
    rec, out = _run_normalize(tmp_path, "default", data, mask, {"within": "brain"})
    call = rec["calls"][0]
    assert call["function"] == "medtx.preprocess.intensity.minmax"
    assert call["arguments"]["clip_percentile"] == default
    assert call["arguments"]["clip_value"] == float(np.float32(np.percentile(data[mask], default)))
    assert 100 < call["arguments"]["clip_value"] < 200
    np.testing.assert_array_equal(out, minmax(data, mask, clip_percentile=default))
    assert rec["params"] == {"within": "brain"}
    qc = rec["qc"]["metrics"]
    assert (qc["min"], qc["max"], qc["shape"]) == (0.0, 1.0, [24, 24, 24])
    assert 0.4 < qc["p50"] < 0.7

    rec, out = _run_normalize(
        tmp_path, "plain", data, mask, {"within": "brain", "clip_percentile": None}
    )
    args = rec["calls"][0]["arguments"]
    assert args["clip_percentile"] is None and args["clip_value"] is None
    assert out.tobytes() == _paper_minmax(data, mask).tobytes()
    assert rec["qc"]["metrics"]["p50"] < 0.15


@pytest.mark.parametrize("value,ok", [(20, False), (50, False), (100.5, False), (None, True)])
def test_schema_bounds_clip_percentile(value, ok):
    import copy

    import yaml

    from medtx.config import DEFAULT_CONFIG, validate_config
    from medtx.errors import ConfigError

    config = copy.deepcopy(yaml.safe_load(DEFAULT_CONFIG.read_text()))
    config["preprocess"]["normalize"]["clip_percentile"] = value
    if ok:
        assert validate_config(config)["preprocess"]["normalize"]["clip_percentile"] is None
    else:
        with pytest.raises(ConfigError, match="preprocess/normalize/clip_percentile"):
            validate_config(config)
