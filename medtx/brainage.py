"""The brain-age gap and its age-bias correction, fitted on the validation set only.

A brain-age model regresses towards the training set's mean age: it over-estimates
the young and under-estimates the old, so the raw gap (predicted minus chronological
age) correlates negatively with age and a group's mean gap partly reflects its ages.
The correction fits predicted = slope * age + intercept on held-out scans and
reports each scan's prediction minus that line (Beheshti et al. 2019; de Lange &
Cole 2020). Fitting it on the test set would leak the test labels into the very
quantity being reported, so fine-tuning fits it on the validation set.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from medtx.errors import MedtxError


def _vector(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    if not np.isfinite(arr).all():
        bad = np.flatnonzero(~np.isfinite(arr))
        raise MedtxError(
            f"age-bias fit: {len(bad)} non-finite {name} value(s) (at {bad[:5].tolist()})"
        )
    return arr


def fit_age_bias(age: Any, predicted: Any) -> dict[str, Any]:
    """Least-squares line predicted = slope * age + intercept on the validation set.

    Beheshti et al. 2019, NeuroImage: Clinical 24:102063, "Bias-adjustment in
    neuroimaging-based brain age frameworks: A robust scheme"; de Lange & Cole 2020,
    NeuroImage: Clinical 26:102229, "Commentary: Correction procedures in brain-age
    prediction" (their "predicted age on age" fit, applied by ``corrected_gap``).

    Args:
        age: chronological ages (years) of the validation scans.
        predicted: the model's predicted ages for the same scans.

    Returns:
        {"slope", "intercept", "n", "fitted_on": "validation"}.

    Raises:
        MedtxError: fewer than 2 scans, unequal lengths, non-finite values, or
            ages without spread (the line is then undefined).
    """
    x = _vector(age, "age")
    y = _vector(predicted, "predicted age")
    if x.shape != y.shape:
        raise MedtxError(f"age-bias fit: {x.size} ages but {y.size} predicted ages")
    if x.size < 2:
        raise MedtxError(f"age-bias fit: needs at least 2 validation scans, got {x.size}")
    if np.ptp(x) == 0:
        raise MedtxError(
            f"age-bias fit: the {x.size} validation ages have zero spread (all {x[0]:g})"
        )
    xc = x - x.mean()
    slope = float(np.dot(xc, y - y.mean()) / np.dot(xc, xc))
    intercept = float(y.mean() - slope * x.mean())
    return {"slope": slope, "intercept": intercept, "n": int(x.size), "fitted_on": "validation"}


def corrected_gap(predicted: Any, age: Any, fit: Mapping[str, Any]) -> np.ndarray:
    """Bias-corrected gap: predicted - (slope * age + intercept).

    de Lange & Cole 2020 (NeuroImage: Clinical 26:102229): the corrected brain age
    minus age, with ``fit`` from ``fit_age_bias`` on the validation set.
    """
    pred = np.asarray(predicted, dtype=np.float64)
    return pred - (fit["slope"] * np.asarray(age, dtype=np.float64) + fit["intercept"])


def pearson_r(x: Any, y: Any) -> float | None:
    """Pearson correlation, or None when undefined (n < 3, or either has zero spread)."""
    a = np.asarray(x, dtype=np.float64).ravel()
    b = np.asarray(y, dtype=np.float64).ravel()
    if a.size < 3 or a.size != b.size or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return None
    a, b = a - a.mean(), b - b.mean()
    denom = float(np.sqrt(np.dot(a, a) * np.dot(b, b)))
    if denom == 0 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(np.clip(np.dot(a, b) / denom, -1.0, 1.0))


def gap_summary(age: Any, predicted: Any, fit: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Mean gap and its correlation with age, raw and (given ``fit``) corrected.

    Returns ``mean_gap`` and ``r_gap_age`` (Pearson of predicted - age with age; a
    strongly negative r is the regression-to-the-mean bias), plus
    ``mean_gap_corrected`` and ``r_gap_corrected_age`` when ``fit`` is given. An r is
    None when undefined (fewer than 3 scans or no spread).
    """
    x = np.asarray(age, dtype=np.float64).ravel()
    gap = np.asarray(predicted, dtype=np.float64).ravel() - x
    out: dict[str, Any] = {
        "mean_gap": float(gap.mean()) if gap.size else None,
        "r_gap_age": pearson_r(gap, x),
    }
    if fit is not None:
        corrected = corrected_gap(predicted, x, fit).ravel()
        out["mean_gap_corrected"] = float(corrected.mean()) if corrected.size else None
        out["r_gap_corrected_age"] = pearson_r(corrected, x)
    return out
