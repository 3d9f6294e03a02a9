"""Bad input is refused on entry with the file and the problem named."""

import gzip

import nibabel as nib
import numpy as np
import pytest

from medtx.errors import BadScanError
from medtx.io import atomic_path, load_volume, save_nifti, sha256, write_json
from tests.conftest import sphere, write_nifti


def test_loads_3d_and_drops_trailing_singleton(tmp_path):
    data = sphere()
    path = write_nifti(tmp_path / "four.nii.gz", data[..., None])
    loaded, affine = load_volume(path)
    assert loaded.shape == data.shape
    np.testing.assert_allclose(loaded, data, rtol=1e-6)
    assert affine.shape == (4, 4)


def test_not_nifti(tmp_path):
    path = tmp_path / "scan.nii.gz"
    path.write_text("this is not an image")
    with pytest.raises(BadScanError, match=r"scan\.nii\.gz: not a readable NIfTI"):
        load_volume(path)


def test_wrong_extension(tmp_path):
    path = tmp_path / "scan.mgz"
    path.write_bytes(b"\x00" * 10)
    with pytest.raises(BadScanError, match=r"not a NIfTI file"):
        load_volume(path)


def test_truncated_gzip(tmp_path):
    path = write_nifti(tmp_path / "full.nii.gz", sphere())
    raw = path.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(BadScanError, match=r"cut\.nii\.gz: (truncated|not a readable)"):
        load_volume(cut)


def test_missing_file(tmp_path):
    with pytest.raises(BadScanError, match="does not exist"):
        load_volume(tmp_path / "nope.nii.gz")


@pytest.mark.parametrize("shape", [(20, 24), (20, 24, 20, 3)])
def test_2d_and_4d_refused(tmp_path, shape):
    path = write_nifti(tmp_path / "bad.nii.gz", np.ones(shape, np.float32))
    with pytest.raises(BadScanError, match=r"expected a 3-D volume, found \d-D"):
        load_volume(path)


@pytest.mark.parametrize("value,message", [(np.nan, "NaN or Inf"), (np.inf, "NaN or Inf")])
def test_non_finite(tmp_path, value, message):
    data = sphere()
    data[3, 4, 5] = value
    path = write_nifti(tmp_path / "nan.nii.gz", data)
    with pytest.raises(BadScanError, match=rf"nan\.nii\.gz: 1 voxel\(s\) are {message}"):
        load_volume(path)


def test_all_zero(tmp_path):
    path = write_nifti(tmp_path / "zero.nii.gz", np.zeros((10, 10, 10), np.float32))
    with pytest.raises(BadScanError, match="all zeros"):
        load_volume(path)


def _raw_header_nifti(path, *, srow=None):
    """A NIfTI whose header fields are written as given (nibabel would refuse)."""
    img = nib.Nifti1Image(sphere(), np.eye(4))
    hdr = img.header
    hdr.set_qform(None, code=0)
    if srow is None:
        hdr.set_sform(None, code=0)
    else:
        hdr["sform_code"] = 1
        hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = srow
    nib.save(nib.Nifti1Image(sphere(), None, hdr), str(path))
    return path


def test_zero_affine(tmp_path):
    path = _raw_header_nifti(tmp_path / "zero_affine.nii.gz", srow=np.zeros((3, 4)))
    with pytest.raises(
        BadScanError, match=r"zero_affine\.nii\.gz: affine is zero or not invertible"
    ):
        load_volume(path)


def test_zero_voxel_size_without_sform(tmp_path):
    plain = _raw_header_nifti(tmp_path / "plain.nii")
    raw = bytearray(plain.read_bytes())
    raw[80:92] = bytes(12)  # pixdim[1..3] = 0.0 (nibabel refuses to write that)
    path = tmp_path / "zero_pixdim.nii.gz"
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(BadScanError, match="not invertible"):
        load_volume(path)


def test_singular_affine(tmp_path):
    srow = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 1.0, 0, 0]])  # y and z rows equal
    path = _raw_header_nifti(tmp_path / "singular.nii.gz", srow=srow)
    with pytest.raises(BadScanError, match="not invertible"):
        load_volume(path)


def test_subject_named_in_error(tmp_path):
    path = write_nifti(tmp_path / "zero.nii.gz", np.zeros((5, 5, 5), np.float32))
    with pytest.raises(BadScanError, match=r"^subject 07: .*zero\.nii\.gz: image is all zeros"):
        load_volume(path, subject="07")


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "out.json"
    write_json({"v": 1}, target)
    before = target.read_bytes()
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp left behind


def test_atomic_write_mode_follows_umask(tmp_path):
    out = save_nifti(sphere(), np.eye(4), tmp_path / "a.nii.gz")
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert sha256(out) == sha256(out) and len(sha256(out)) == 64


def _umask():
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_save_nifti_roundtrip_gzip(tmp_path):
    affine = np.diag([-1.2, 1.1, 1.3, 1.0])
    path = save_nifti(sphere(), affine, tmp_path / "x.nii.gz")
    with gzip.open(path) as fh:  # really gzip-compressed
        fh.read(10)
    data, aff = load_volume(path)
    np.testing.assert_allclose(aff, affine)
