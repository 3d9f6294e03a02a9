"""Bad input is refused on entry with the file and the problem named."""

import gzip

import nibabel as nib
import numpy as np
import pytest

from medtx.errors import BadScanError, MedtxError
from medtx.io import (
    DEFAULT_MAX_IMAGE_BYTES,
    MAX_IMAGE_BYTES_ENV,
    atomic_path,
    load_nifti,
    load_volume,
    max_image_bytes,
    save_nifti,
    sha256,
    write_json,
)
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


# --- bounded reads (issue 31): the header's size is checked before any allocation ---


def _plain_nifti(tmp_path, data=None, **header):
    """The bytes of an uncompressed NIfTI of ``data`` (the sphere), header fields set as given."""
    img = nib.Nifti1Image(sphere() if data is None else data, np.eye(4))
    for key, value in header.items():
        img.header[key] = value
    path = tmp_path / "plain.nii"
    nib.save(img, str(path))
    return bytearray(path.read_bytes())


def test_the_size_limit_comes_from_the_environment(tmp_path, monkeypatch):
    path = write_nifti(tmp_path / "scan.nii.gz", sphere())  # 20x24x20 float32: 37.5 KiB
    monkeypatch.setenv(MAX_IMAGE_BYTES_ENV, "32K")
    with pytest.raises(
        BadScanError,
        match=r"scan\.nii\.gz: header declares 20x24x20 float32 voxels: 37\.5 KiB to read, "
        r"more than the 32\.0 KiB limit \(MEDTX_MAX_IMAGE_BYTES\)$",
    ):
        load_volume(path)
    monkeypatch.setenv(MAX_IMAGE_BYTES_ENV, str(20 * 24 * 20 * 4))  # exactly its size: read
    assert load_volume(path)[0].shape == (20, 24, 20)
    monkeypatch.setenv(MAX_IMAGE_BYTES_ENV, "4 GiB")
    assert max_image_bytes() == 4 << 30
    monkeypatch.delenv(MAX_IMAGE_BYTES_ENV)
    assert max_image_bytes() == DEFAULT_MAX_IMAGE_BYTES == 2 << 30


@pytest.mark.parametrize("value", ["lots", "-1", "0", "4X"])
def test_a_bad_size_limit_is_named(tmp_path, monkeypatch, value):
    path = write_nifti(tmp_path / "scan.nii.gz", sphere())
    monkeypatch.setenv(MAX_IMAGE_BYTES_ENV, value)
    with pytest.raises(MedtxError, match=rf"^MEDTX_MAX_IMAGE_BYTES='{value}': not a size"):
        load_volume(path)


def test_small_int_images_count_at_their_float32_size(tmp_path, monkeypatch):
    """Loaders make a float32 copy: an int16 scan costs 4 bytes a voxel, not 2."""
    path = write_nifti(tmp_path / "int16.nii.gz", sphere().astype(np.int16))
    monkeypatch.setenv(MAX_IMAGE_BYTES_ENV, str(20 * 24 * 20 * 4 - 1))
    with pytest.raises(BadScanError, match="int16 voxels: 37.5 KiB to read"):
        load_volume(path)


@pytest.mark.parametrize(
    "dim,problem",
    [
        ([0, 20, 24, 20, 1, 1, 1, 1], r"header dim\[0\] = 0: a NIfTI image has 1 to 7 axes"),
        ([3, 20, 0, 20, 1, 1, 1, 1], r"header declares shape \(20, 0, 20\): every axis needs"),
        ([3, 20, -24, 20, 1, 1, 1, 1], r"header declares shape \(20, -24, 20\): every axis"),
        ([9, 20, 24, 20, 1, 1, 1, 1], r"not a readable NIfTI file"),  # nibabel: byte order
    ],
)
def test_absurd_dimensions_are_refused_in_one_line(tmp_path, dim, problem):
    raw = _plain_nifti(tmp_path)
    raw[40:56] = np.array(dim, np.int16).tobytes()
    path = tmp_path / "bad_dims.nii.gz"
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(BadScanError, match=rf"bad_dims\.nii\.gz: {problem}"):
        load_nifti(path)


def test_a_gzip_longer_than_its_header_declares_stops_early(tmp_path):
    raw = bytes(_plain_nifti(tmp_path))
    path = tmp_path / "long.nii.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(raw)
        for _ in range(4):  # 4 MiB more than the 38 KiB declared
            fh.write(bytes(1 << 20))
    with pytest.raises(
        BadScanError,
        match=r"long\.nii\.gz: gzip decompresses to more than the 37\.8 KiB its header "
        "declares; stopped reading$",
    ):
        load_volume(path)


def test_a_gzip_shorter_than_its_header_declares_is_truncated(tmp_path):
    raw = bytes(_plain_nifti(tmp_path))
    path = tmp_path / "short.nii.gz"
    path.write_bytes(gzip.compress(raw[:-1000]))  # a complete gzip, short of voxels
    with pytest.raises(
        BadScanError, match=r"short\.nii\.gz: truncated: 36\.9 KiB of the 37\.8 KiB its header"
    ):
        load_volume(path)


def test_a_gzip_in_several_members_is_read_whole(tmp_path):
    """bgzip and pigz --independent write several gzip members; they are one stream."""
    raw = bytes(_plain_nifti(tmp_path))
    path = tmp_path / "members.nii.gz"
    path.write_bytes(b"".join(gzip.compress(raw[i : i + 5000]) for i in range(0, len(raw), 5000)))
    data, _ = load_volume(path)
    np.testing.assert_array_equal(data, sphere())


def test_zero_voxels_scaled_by_an_intercept_are_constant_not_empty(tmp_path):
    raw = _plain_nifti(tmp_path, np.zeros((20, 24, 20), np.int16), scl_slope=1.0, scl_inter=7.0)
    path = tmp_path / "offset.nii.gz"
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(BadScanError, match=r"image is constant \(every voxel = 7\)$"):
        load_volume(path)
    assert load_volume(path, check_data=False)[0].max() == 7.0


def test_a_gzip_expanding_past_1000_to_1_is_refused_unread(tmp_path, monkeypatch):
    """Past the 64 MiB floor; the file is never opened for its data."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((512, 512, 300))  # 75 MiB of uint8
    hdr.set_data_dtype(np.uint8)
    hdr.set_data_offset(352)
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(gzip.compress(hdr.binaryblock + bytes(4)) + bytes(20_000))
    monkeypatch.setattr(gzip, "open", None)  # the streamed pass must not start
    with pytest.raises(
        BadScanError,
        match=r"bomb\.nii\.gz: gzip expands \d+:1 \(75\.0 MiB declared from 19\.6 KiB\), more "
        "than the 1000:1 a scan compresses: an empty, forged or truncated image$",
    ):
        load_volume(path)


def test_one_voxel_past_the_first_chunk_makes_an_image_not_empty(tmp_path):
    """The streamed emptiness check looks at every chunk's voxels, the last byte included."""
    data = np.zeros((128, 128, 80), np.float32)  # 5 MiB: two 4 MiB chunks
    data[-1, -1, -1] = 1.0
    path = write_nifti(tmp_path / "last.nii.gz", data)
    assert load_volume(path)[0][-1, -1, -1] == 1.0
