"""The brain-age gap's age-bias correction: fitted on one half, it removes the bias in the other."""

import numpy as np
import pytest

from medtx.brainage import corrected_gap, fit_age_bias, gap_summary, pearson_r
from medtx.errors import MedtxError


def biased(n=400, seed=0):
    """Ages uniform 50-90; predictions regress to the mean: 0.6 * age + 28 + noise."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(50, 90, n)
    return age, 0.6 * age + 28 + rng.normal(0, 1.0, n)


def test_fit_on_validation_removes_the_bias_on_the_other_half():
    age, pred = biased()
    val, test = slice(0, 200), slice(200, None)
    fit = fit_age_bias(age[val], pred[val])
    assert fit["slope"] == pytest.approx(0.6, abs=0.02)
    assert fit["intercept"] == pytest.approx(28, abs=1.5)
    assert fit["n"] == 200 and fit["fitted_on"] == "validation"
    raw_r = np.corrcoef(pred[test] - age[test], age[test])[0, 1]
    gap = corrected_gap(pred[test], age[test], fit)
    assert raw_r < -0.8
    assert abs(np.corrcoef(gap, age[test])[0, 1]) < 0.1
    summary = gap_summary(age[test], pred[test], fit)
    assert summary["r_gap_age"] == pytest.approx(raw_r)
    assert summary["mean_gap"] == pytest.approx(np.mean(pred[test] - age[test]))
    assert abs(summary["r_gap_corrected_age"]) < 0.1
    assert summary["mean_gap_corrected"] == pytest.approx(gap.mean())
    assert abs(summary["mean_gap_corrected"]) < 0.3


def test_fit_equals_numpy_polyfit():
    age, pred = biased(n=30, seed=1)
    fit = fit_age_bias(age, pred)
    slope, intercept = np.polyfit(age, pred, 1)
    assert (fit["slope"], fit["intercept"]) == pytest.approx((slope, intercept), abs=1e-9)


@pytest.mark.parametrize(
    ("age", "pred", "problem"),
    [
        ([60.0], [62.0], "at least 2 validation scans, got 1"),
        ([], [], "at least 2 validation scans, got 0"),
        ([70.0, 70.0, 70.0], [68.0, 71.0, 72.0], "zero spread"),
        ([60.0, np.nan, 80.0], [61.0, 70.0, 75.0], "non-finite age"),
        ([60.0, 70.0, 80.0], [61.0, np.inf, 75.0], "non-finite predicted age"),
        ([60.0, 70.0], [61.0, 70.0, 75.0], "2 ages but 3 predicted ages"),
    ],
)
def test_fit_refuses_what_cannot_be_fitted(age, pred, problem):
    with pytest.raises(MedtxError, match=problem):
        fit_age_bias(age, pred)


def test_undefined_correlations_are_none():
    assert pearson_r([1.0, 2.0], [3.0, 4.0]) is None  # n < 3
    assert pearson_r([1.0, 1.0, 1.0], [3.0, 4.0, 5.0]) is None  # no spread
    summary = gap_summary([60.0, 70.0], [62.0, 69.0])
    assert summary == {"mean_gap": pytest.approx(0.5), "r_gap_age": None}
