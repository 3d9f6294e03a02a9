"""A predicted segmentation goes back to the case's own grid: checked against a
demo BraTS case's true labels, pooled as the model sees them and brought back."""

import nibabel as nib
import numpy as np
import pytest

from medtx.data.demo import plan_brats_cohort, write_demo_part
from medtx.domain import BRATS_REGIONS, regions_from_labels
from medtx.predict.segmentation import labels_from_regions, native_labels, region_volumes_ml
from medtx.preprocess.brats import crop_box
from medtx.train.data import downsample_volume

SPEC = {"n_cases": 1, "seed": 13}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A generated BraTS case (240x240x155 at 1 mm): its labels, brain and affine."""
    root = tmp_path_factory.mktemp("brats")
    (row,) = plan_brats_cohort(SPEC)
    write_demo_part("brats-case", SPEC, root, subject=row["case"])
    seg = nib.load(str(root / row["files"]["seg"]))
    t1 = nib.load(str(root / row["files"]["t1"]))
    labels = np.asarray(seg.dataobj).astype(np.uint8)
    return labels, np.asarray(t1.dataobj) != 0, seg.affine


def dice(a, b):
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def test_labels_from_regions_inverts_regions_from_labels(case):
    labels, _, _ = case
    assert set(np.unique(labels)) == {0, 1, 2, 4}  # every label occurs
    np.testing.assert_array_equal(labels_from_regions(regions_from_labels(labels)), labels)


def test_regions_that_do_not_nest_are_nested_as_the_challenge_defines():
    wt = np.array([1, 1, 0, 0, 0], bool)
    tc = np.array([0, 1, 1, 0, 0], bool)  # TC outside WT at 2
    et = np.array([0, 0, 0, 1, 0], bool)  # ET outside both at 3
    np.testing.assert_array_equal(labels_from_regions([wt, tc, et]), [2, 1, 1, 4, 0])


@pytest.mark.parametrize("factor", [1, 2, 3])
def test_pooled_true_regions_come_back_on_the_native_grid(case, factor):
    """The model's view of the truth (the crop, average-pooled) -> native labels that
    agree with the truth: exactly at factor 1; when pooled, Dice >= 0.95 for the large
    regions (the thin enhancing rim loses most), and no one-voxel shift agrees better."""
    labels, brain, _ = case
    size = (160, 192, 128)
    box = crop_box(brain, size)
    import torch

    truth = torch.from_numpy(regions_from_labels(labels[box]).astype(np.float32))
    pooled = downsample_volume(truth, factor).numpy()
    out = native_labels(
        pooled,
        factor=factor,
        crop_start=[s.start for s in box],
        crop_size=size,
        native_shape=labels.shape,
    )
    assert out.shape == labels.shape == (240, 240, 155)
    for name, values in BRATS_REGIONS.items():
        got, true = np.isin(out, values), np.isin(labels, values)
        score = dice(got, true)
        assert score == 1.0 if factor == 1 else score >= (0.7 if name == "ET" else 0.95)
        shifted = [dice(np.roll(got, s, axis=a), true) for a in range(3) for s in (-1, 1)]
        assert max(shifted) < score, (name, factor)
    outside = np.ones(labels.shape, bool)
    outside[box] = False
    assert not out[outside].any()


def test_region_volumes_use_the_voxel_size():
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[0, 0, :3] = 4  # ET (in TC and WT)
    labels[1, 0, :2] = 1  # TC
    labels[2, 0, 0] = 2  # edema: WT only
    affine = np.diag([2.0, 1.0, 1.5, 1.0])  # 3 mm^3 voxels
    got = region_volumes_ml(labels, affine)
    assert got == {
        "volume_WT_ml": pytest.approx(6 * 0.003),
        "volume_TC_ml": pytest.approx(5 * 0.003),
        "volume_ET_ml": pytest.approx(3 * 0.003),
    }
