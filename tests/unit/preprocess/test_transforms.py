"""Transform algebra the registration benchmark rests on, checked on known transforms."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from medtx.preprocess.transforms import (
    ants_affine,
    displacement_mm,
    fsl_affine,
    template_brain_points,
    write_ants_affine,
)


def known_affine(angles=(10, -5, 3), scale=1.05, shift=(5, -7, 12)) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() * scale
    m[:3, 3] = shift
    return m


def test_ants_affine_reads_back_what_ants_applies(tmp_path):
    import ants

    m = known_affine()
    path = tmp_path / "affine.mat"
    write_ants_affine(m, path)
    assert np.allclose(ants_affine(path), m, atol=1e-5)
    # ANTs itself maps the LPS point of a RAS point p to the LPS point of m @ p.
    p = np.array([10.0, 20.0, 30.0])
    lps = ants.read_transform(str(path)).apply_to_point([-p[0], -p[1], p[2]])
    expected = m[:3, :3] @ p + m[:3, 3]
    assert np.allclose([-lps[0], -lps[1], lps[2]], expected, atol=1e-4)


def test_displacement_of_a_translation_is_its_length():
    a = np.eye(4)
    b = np.eye(4)
    b[:3, 3] = [3.0, 4.0, 0.0]
    points = np.random.default_rng(0).uniform(-80, 80, (500, 3))
    assert displacement_mm(a, b, points) == pytest.approx((5.0, 5.0))


def test_displacement_of_a_rotation_grows_with_distance_from_its_axis():
    rot = np.eye(4)
    rot[:3, :3] = Rotation.from_euler("z", 90, degrees=True).as_matrix()
    points = np.array([[10.0, 0, 0], [0, 0, 50.0]])  # 10 mm off the axis, and on it
    mean, worst = displacement_mm(rot, np.eye(4), points)
    assert worst == pytest.approx(10 * np.sqrt(2))
    assert mean == pytest.approx(5 * np.sqrt(2))


def test_fsl_matrix_between_flipped_grids():
    """Identity FLIRT matrix between a LAS and a RAS image of the same size and spacing.

    FSL's scaled-voxel frame flips x only for the RAS (positive determinant)
    image, so the identity maps voxel i of one onto voxel n-1-i of the other.
    """
    shape = (10, 12, 8)
    ras = np.diag([2.0, 2.0, 2.0, 1.0])
    las = np.diag([-2.0, 2.0, 2.0, 1.0])
    las[0, 3] = 18.0  # voxel 0 of the LAS grid sits where voxel 9 of the RAS grid does
    world = fsl_affine(np.eye(4), src_affine=las, src_shape=shape, ref_affine=ras, ref_shape=shape)
    assert np.allclose(world, np.eye(4))


def test_recovered_shift_of_a_real_registration(tmp_path):
    """ANTs recovers a known 4 mm translation of a blob to well under a voxel."""
    import ants

    grid = np.indices((40, 40, 40)).astype(float)
    blob = np.exp(-(((grid - [[[[18]]], [[[20]]], [[[22]]]]) ** 2).sum(0)) / 40.0)
    blob += 0.5 * np.exp(-(((grid - [[[[26]]], [[[14]]], [[[20]]]]) ** 2).sum(0)) / 10.0)
    fixed = ants.from_numpy(blob.astype(np.float32), spacing=(2.0, 2.0, 2.0))
    moving = ants.from_numpy(blob.astype(np.float32), spacing=(2.0, 2.0, 2.0))
    moving.set_origin((4.0, 0.0, 0.0))  # LPS: the scan sits 4 mm further along x
    reg = ants.registration(fixed, moving, type_of_transform="Translation")
    recovered = ants_affine(reg["fwdtransforms"][0])
    truth = np.eye(4)
    truth[0, 3] = -4.0  # RAS: template point p sits at p - 4 mm (x) in the scan
    points = np.argwhere(blob > 0.2) * 2.0 * [-1, -1, 1]
    mean, worst = displacement_mm(recovered, truth, points)
    assert mean < 0.5 and worst < 0.5
    # and a wrong truth is caught by as much as it is wrong
    assert displacement_mm(recovered, np.eye(4), points)[0] == pytest.approx(4.0, abs=0.5)


def test_template_brain_points_lie_in_the_brain():
    pts = template_brain_points(4)
    assert 20_000 < len(pts) < 40_000
    # the ICBM brain spans about -70..70 (x), -105..70 (y), -60..80 (z) mm
    assert pts[:, 0].min() > -80 and pts[:, 0].max() < 80
    assert pts[:, 2].min() > -80 and pts[:, 2].max() < 90
