"""The registration QC figures: they must fail when registration fails."""

import numpy as np
import pytest

from medtx.data.templates import template_path
from medtx.io import load_volume
from medtx.preprocess.flirt import registration_qc
from medtx.preprocess.intensity import average_pool
from medtx.preprocess.similarity import ncc, shift_mm, template_similarity
from medtx.provenance.qc import judge


@pytest.fixture(scope="module")
def template():
    head, _ = load_volume(template_path("t1"), check_data=False)
    brain, _ = load_volume(template_path("t1_brain"), check_data=False)
    mask, _ = load_volume(template_path("brain_mask"), check_data=False)
    return head, brain, mask > 0.5


def test_ncc_hand_computed():
    a = np.array([1.0, 2.0, 3.0, 10.0])
    b = np.array([2.0, 4.0, 6.0, -5.0])
    mask = np.array([True, True, True, False])
    assert ncc(a, b, mask) == pytest.approx(1.0)
    assert ncc(a, -b, mask) == pytest.approx(-1.0)


def test_template_matches_itself_without_shift(template):
    head, _, _ = template
    score, shift = template_similarity(average_pool(head, 2))
    assert score == pytest.approx(1.0, abs=1e-6)
    assert shift == (0, 0, 0)


def test_shift_is_found_and_undone(template):
    head, _, _ = template
    moved = np.roll(average_pool(head, 2), (0, 1, -2), axis=(0, 1, 2))
    score, shift = template_similarity(moved)
    assert shift == (0, -1, 2)
    assert score < 0.95
    assert shift_mm(shift) == pytest.approx(2 * np.sqrt(5), abs=0.01)


def test_registration_qc_fails_a_brain_4_mm_off(template):
    _, brain, mask = template
    good = registration_qc(brain, mask)
    assert good["misalignment_mm"] == 0.0 and good["ncc_template"] > 0.95
    assert good["dice_template_mask"] == pytest.approx(1.0)
    off = registration_qc(np.roll(brain, 4, axis=2), np.roll(mask, 4, axis=2))
    assert off["misalignment_mm"] == pytest.approx(4.0)
    checks = judge({"step": "flirt", "qc": {"metrics": off}}, {"misalignment_max_mm": 2.0})
    assert [c["passed"] for c in checks] == [False]


def test_registration_qc_fails_a_mask_that_is_no_brain(template):
    _, brain, mask = template
    grid = np.indices(mask.shape)
    centre = np.array(mask.shape)[:, None, None, None] / 2
    blob = ((grid - centre) ** 2).sum(0) < 60**2  # 905 ml, where the brain is
    metrics = registration_qc(brain, blob)
    assert metrics["dice_template_mask"] == pytest.approx(0.637, abs=0.01)
    checks = judge({"step": "flirt", "qc": {"metrics": metrics}}, {"dice_min": 0.85})
    assert [(c["metric"], c["passed"]) for c in checks] == [("dice_template_mask", False)]
