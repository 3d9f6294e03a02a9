"""BraTS: crop centred on the brain, labels checked, channels normalized."""

import json

import nibabel as nib
import numpy as np
import pytest

from medtx.errors import BadScanError
from medtx.preprocess.brats import check_labels, crop_box, run_brats
from medtx.preprocess.context import StepContext
from tests.conftest import write_nifti


def test_crop_box_centres_on_brain_and_stays_inside():
    brain = np.zeros((240, 240, 155), bool)
    brain[40:200, 30:210, 10:140] = True
    box = crop_box(brain, (160, 192, 128))
    assert [s.stop - s.start for s in box] == [160, 192, 128]
    assert box[0] == slice(40, 200)
    assert box[2].start >= 0 and box[2].stop <= 155
    brain[:] = False
    brain[0:20, 0:20, 0:20] = True  # brain in a corner: box clamps to the image
    assert crop_box(brain, (160, 192, 128))[0] == slice(0, 160)


def test_crop_larger_than_image():
    with pytest.raises(ValueError, match="larger than the image"):
        crop_box(np.ones((10, 10, 10), bool), (20, 10, 10))


def test_labels_outside_brats_convention(tmp_path):
    with pytest.raises(BadScanError, match=r"seg\.nii\.gz: unexpected label value\(s\) \[3\]"):
        check_labels(np.array([0, 1, 2, 3, 4]), tmp_path / "seg.nii.gz")


def _case(tmp_path):
    """A 4-modality case with a small tumour of labels 1, 2 and 4."""
    rng = np.random.default_rng(1)
    shape = (40, 44, 36)
    brain = np.zeros(shape, bool)
    brain[8:32, 6:38, 4:30] = True
    seg = np.zeros(shape, np.float32)
    seg[15:20, 15:20, 10:15] = 2
    seg[16:19, 16:19, 11:14] = 1
    seg[17, 17, 12] = 4
    images = {}
    for i, mod in enumerate(("t1", "t1ce", "t2", "flair")):
        data = np.where(brain, rng.normal(100 + 10 * i, 5, shape), 0).astype(np.float32)
        images[mod] = str(write_nifti(tmp_path / f"c_{mod}.nii.gz", data))
    return images, str(write_nifti(tmp_path / "c_seg.nii.gz", seg))


PARAMS = {"crop": [24, 32, 24], "modalities": ["t1", "t1ce", "t2", "flair"]}


def test_run_brats_writes_four_channels_and_labels(tmp_path):
    images, segp = _case(tmp_path)
    rec = run_brats(
        images,
        segp,
        image_out=tmp_path / "o.nii.gz",
        seg_out=tmp_path / "s.nii.gz",
        record_out=tmp_path / "r.json",
        ctx=StepContext(scan="c"),
        params=PARAMS,
    )
    out = nib.load(str(tmp_path / "o.nii.gz")).get_fdata()
    assert out.shape == (24, 32, 24, 4)
    assert out.min() == 0.0 and np.allclose(out.reshape(-1, 4).max(axis=0), 1.0)
    labels = nib.load(str(tmp_path / "s.nii.gz")).get_fdata()
    assert set(np.unique(labels)) == {0, 1, 2, 4}
    assert rec["qc"]["metrics"]["et_voxels"] == 1
    assert rec["qc"]["metrics"]["tumour_fraction_kept"] == 1.0
    assert json.loads((tmp_path / "r.json").read_text())["outputs"][0]["role"] == "preproc"


def test_run_brats_writes_training_caches_it_records(tmp_path):
    """The float16 channels-first image and the WT/TC/ET masks the models read,
    recorded with their hashes like the step's other outputs."""
    images, segp = _case(tmp_path)
    rec = run_brats(
        images,
        segp,
        image_out=tmp_path / "o.nii.gz",
        seg_out=tmp_path / "s.nii.gz",
        record_out=tmp_path / "r.json",
        ctx=StepContext(scan="c"),
        params=PARAMS,
        cache_out=tmp_path / "c.npy",
        regions_out=tmp_path / "c_regions.npy",
    )
    image = np.load(tmp_path / "c.npy")
    assert image.dtype == np.float16 and image.shape == (4, 24, 32, 24)
    channels_last = nib.load(str(tmp_path / "o.nii.gz")).get_fdata()
    assert np.allclose(np.moveaxis(image, 0, -1), channels_last, atol=1e-3)
    regions = np.load(tmp_path / "c_regions.npy")
    labels = nib.load(str(tmp_path / "s.nii.gz")).get_fdata()
    assert regions.shape == (3, 24, 32, 24)
    assert [int(r.sum()) for r in regions] == [
        int(np.isin(labels, v).sum()) for v in ((1, 2, 4), (1, 4), (4,))
    ]
    outputs = {o["role"]: o for o in rec["outputs"]}
    assert {"cache", "regions"} <= set(outputs) and all(o["sha256"] for o in outputs.values())
