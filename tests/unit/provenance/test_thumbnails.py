"""QC thumbnails: size, orientation, aspect and the red mask outline."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medtx.errors import BadScanError, MedtxError
from medtx.io import save_nifti
from medtx.provenance.thumbnails import (
    CELL_PX,
    HEADER_PX,
    LABEL_PX,
    canonical_volume,
    display_grid,
    outline,
    plane_slices,
    scan_thumbnails,
    thumbnail_shape,
)

SHAPE = (20, 24, 20)


def _sphere(shape=SHAPE, radius=7.0):
    grid = np.indices(shape).astype(float)
    centre = (np.array(shape, dtype=float) - 1) / 2
    dist = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(axis=0))
    return dist <= radius


@pytest.fixture
def scan(tmp_path):
    """A 20x24x20 1 mm head with a bright 'brain' sphere, its mask, and a 2 mm pooled copy."""
    rng = np.random.default_rng(0)
    mask = _sphere()
    data = rng.normal(100, 5, SHAPE) + 400 * mask
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = -np.array(SHAPE) / 2
    vol = save_nifti(data, affine, tmp_path / "vol.nii.gz")
    msk = save_nifti(mask, affine, tmp_path / "mask.nii.gz", dtype=np.uint8)
    pooled = data.reshape(10, 2, 12, 2, 10, 2).mean(axis=(1, 3, 5))
    pmask = mask.reshape(10, 2, 12, 2, 10, 2).mean(axis=(1, 3, 5)) > 0.5
    paff = affine.copy()
    paff[:3, :3] *= 2
    paff[:3, 3] += 0.5
    pool = save_nifti(pooled, paff, tmp_path / "pool.nii.gz")
    pool_mask = save_nifti(pmask, paff, tmp_path / "pool_mask.nii.gz", dtype=np.uint8)
    return {
        "vol": vol,
        "mask": msk,
        "pool": pool,
        "pool_mask": pool_mask,
        "affine": affine,
        "data": data,
        "maskdata": mask,
    }


def _rgb(path):
    return np.asarray(Image.open(path).convert("RGB"))


def _red(rgb):
    return (rgb[..., 0] == 255) & (rgb[..., 1] == 0) & (rgb[..., 2] == 0)


def _row_slice(row, cell=CELL_PX):
    top = HEADER_PX + row * (LABEL_PX + cell) + LABEL_PX
    return slice(top, top + cell)


def test_png_size_and_red_outline_only_where_a_mask_is_given(scan, tmp_path):
    out = scan_thumbnails(
        [("brain", scan["vol"], scan["mask"]), ("raw", scan["vol"], None)],
        tmp_path / "qc" / "sub-01_qc.png",
    )
    assert out == tmp_path / "qc" / "sub-01_qc.png"
    rgb = _rgb(out)
    assert (
        rgb.shape[:2]
        == thumbnail_shape(2)
        == (HEADER_PX + 2 * (LABEL_PX + CELL_PX), 3 * CELL_PX + 4)
    )
    red = _red(rgb)
    assert red[_row_slice(0)].sum() > 50  # outline in all three planes of row 0
    for col in range(3):
        x = col * (CELL_PX + 2)
        assert red[_row_slice(0), x : x + CELL_PX].any()
    assert not red[_row_slice(1)].any()
    assert out.stat().st_size < 150_000
    assert not list(tmp_path.joinpath("qc").glob(".*tmp*"))  # atomic write left no temp file


def test_no_mask_no_red(scan, tmp_path):
    rgb = _rgb(scan_thumbnails([("raw", scan["vol"], None)], tmp_path / "a.png"))
    assert not _red(rgb).any()
    assert rgb[_row_slice(0)].max() > 200  # the bright sphere is drawn


def test_outline_encloses_the_bright_sphere(scan, tmp_path):
    rgb = _rgb(scan_thumbnails([("brain", scan["vol"], scan["mask"])], tmp_path / "a.png"))
    cell = rgb[_row_slice(0), :CELL_PX]
    red = _red(cell)
    rows, cols = np.nonzero(red)
    # inside the outline's bounding box the image is bright; far outside it is dark
    centre = cell[(rows.min() + rows.max()) // 2, (cols.min() + cols.max()) // 2]
    assert centre[0] > 150 and centre[0] == centre[1] == centre[2]
    assert cell[2, 2].max() < 100


def test_mask_on_another_grid_is_matched_in_world_space(scan, tmp_path):
    """A 2 mm mask over a 1 mm volume: outline lands where the 1 mm mask's does."""
    a = _red(_rgb(scan_thumbnails([("x", scan["vol"], scan["mask"])], tmp_path / "a.png")))
    b = _red(_rgb(scan_thumbnails([("x", scan["vol"], scan["pool_mask"])], tmp_path / "b.png")))
    assert b.any()
    ra, ca = np.nonzero(a)
    rb, cb = np.nonzero(b)
    assert abs(ra.mean() - rb.mean()) < 4 and abs(ca.mean() - cb.mean()) < 4


def test_canonical_orientation_puts_superior_up(tmp_path):
    """A blob in the superior half stays on top even when the file stores z inferior-first."""
    data = np.zeros(SHAPE)
    data[5:15, 6:18, 14:18] = 1.0  # superior in RAS voxel order
    ras = np.eye(4)
    flipped = np.diag([1.0, 1.0, -1.0, 1.0])  # voxel k increases inferiorly
    flipped[2, 3] = SHAPE[2] - 1
    for name, arr, aff in (("ras", data, ras), ("lps", data[:, :, ::-1], flipped)):
        cdata, caff = canonical_volume(arr, aff)
        assert np.allclose(cdata, data), name
        sag, cor, axi = plane_slices(cdata, caff)
        for s in (sag, cor):
            top, bottom = s.image[: s.image.shape[0] // 2], s.image[s.image.shape[0] // 2 :]
            assert top.sum() > 0 and bottom.sum() == 0, (name, s.plane)
    # and through the whole PNG: the sagittal cell is bright at the top only
    path = save_nifti(data[:, :, ::-1], flipped, tmp_path / "flip.nii.gz")
    cell = _rgb(scan_thumbnails([("flip", path, None)], tmp_path / "f.png"))[
        _row_slice(0), :CELL_PX, 0
    ]
    assert cell[: CELL_PX // 2].max() > 200 and cell[CELL_PX // 2 :].max() < 50


def test_aspect_follows_voxel_size():
    # 24 mm (rows) by 48 mm (cols) in physical space -> half as tall as wide
    rr, cc = display_grid((12, 48), (2.0, 1.0), 120)
    assert rr.shape == (60, 120)
    rr, cc = display_grid((24, 24), (1.0, 1.0), 120)
    assert rr.shape == (120, 120)


def test_outline_is_mask_xor_erosion():
    m = np.zeros((7, 7), dtype=bool)
    m[1:6, 1:6] = True
    ring = outline(m)
    assert ring.sum() == 16 and not ring[2:5, 2:5].any()


def test_errors(scan, tmp_path):
    with pytest.raises(MedtxError, match="no panels"):
        scan_thumbnails([], tmp_path / "a.png")
    with pytest.raises(BadScanError, match="does not exist"):
        scan_thumbnails([("x", tmp_path / "nope.nii.gz", None)], tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()


def test_window_is_robust_and_handles_binary_images():
    from medtx.provenance.thumbnails import window

    img = np.zeros((50, 50))
    img[10:40, 10:40] = np.linspace(100, 200, 900).reshape(30, 30)
    img[0, 0] = 1e6  # one hot voxel must not squash the gray scale
    lo, hi = window([img])
    assert 100 <= lo < 110 and 190 < hi <= 200
    assert window([np.eye(4)]) == (0.0, 1.0)
    assert window([np.zeros((4, 4))]) == (0.0, 1.0)
