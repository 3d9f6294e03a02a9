"""QC metrics across a cohort: each scan's values, robust outliers, per-site summaries.

A threshold catches a scan that is plainly broken; an auditor of thousands of
scans also wants the ones that pass but sit far from the rest of the cohort.
This module gathers every numeric QC value the records hold (each step's
``qc.checks`` and ``qc.metrics``, keyed by step and metric), flags the robust
outliers per metric and summarises them per site, for the report's table,
plots and site summary.

The outlier rule is the modified z-score of Iglewicz and Hoaglin (1993): a
value x is an outlier when ``|x - median| / (1.4826 * MAD) > 3.5``, over the
scans that recorded the metric (MAD: the median of ``|x - median|``;
1.4826 * MAD estimates the standard deviation of normal data). When MAD is 0
(more than half the scans share one value) the scale is ``1.2533 * mean
|x - median|`` instead (the same estimate from the mean absolute deviation);
when that is 0 too, every value is equal and none is flagged. With fewer than
``MIN_SCANS`` values no scan is flagged: there is no cohort to differ from.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

OUTLIER_Z = 3.5  # modified z-score above which a value is an outlier
MAD_SCALE = 1.4826  # MAD -> standard deviation, for normal data
MEAN_AD_SCALE = 1.2533  # mean absolute deviation -> standard deviation (sqrt(pi / 2))
MIN_SCANS = 5  # fewer values than this: no outliers
OUTLIER_RULE = (
    f"|value − median| / (1.4826 · MAD) > {OUTLIER_Z:g} over the scans with the metric "
    "(the modified z-score of Iglewicz and Hoaglin; 1.2533 · mean absolute deviation "
    f"replaces 1.4826 · MAD when MAD is 0; no outliers among fewer than {MIN_SCANS} scans)"
)
UNKNOWN_SITE = "unknown"
STATUSES = ("failed", "outlier", "passed")  # the table's default order


def robust_scale(values: Sequence[float]) -> tuple[float, float]:
    """``(median, scale)`` of ``values``: scale is 1.4826·MAD, or 1.2533·mean |x − median|
    when MAD is 0 (0 when all values are equal)."""
    med = statistics.median(values)
    dev = [abs(v - med) for v in values]
    mad = statistics.median(dev)
    if mad > 0:
        return med, MAD_SCALE * mad
    return med, MEAN_AD_SCALE * (sum(dev) / len(dev))


def robust_outliers(values: Sequence[float], z: float = OUTLIER_Z) -> list[bool]:
    """Per value: is it a robust outlier (modified z-score above ``z``; see the module)."""
    if len(values) < MIN_SCANS:
        return [False] * len(values)
    med, scale = robust_scale(values)
    if scale <= 0:
        return [False] * len(values)
    return [abs(v - med) / scale > z for v in values]


def _number(value: Any) -> float | None:
    """A finite float, or None for anything else (bools, lists, text, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    out = float(value)
    return out if math.isfinite(out) else None


@dataclass
class Metric:
    """One QC metric of one step across the cohort; scans are indices into the records."""

    step: str
    name: str
    values: dict[int, float] = field(default_factory=dict)
    failed: set[int] = field(default_factory=set)  # scans whose check on it failed
    outliers: set[int] = field(default_factory=set)
    bounds: set[tuple[str, float]] = field(default_factory=set)  # ("min" | "max", value)
    median: float | None = None
    scale: float | None = None

    @property
    def key(self) -> str:
        return f"{self.step}.{self.name}"

    @property
    def constant(self) -> bool:
        """Every scan that recorded it has the same value (nothing to plot)."""
        return len(set(self.values.values())) <= 1


def cohort_metrics(records: Sequence[Mapping[str, Any]]) -> list[Metric]:
    """Every numeric QC metric of the records, in order of first appearance, with its
    values per scan, the failed checks, the thresholds and the robust outliers."""
    metrics: dict[tuple[str, str], Metric] = {}

    def get(step: str, name: str) -> Metric:
        if (step, name) not in metrics:
            metrics[(step, name)] = Metric(step, name)
        return metrics[(step, name)]

    for i, record in enumerate(records):
        for step in record.get("steps") or []:
            if not isinstance(step, Mapping):
                continue
            qc = step.get("qc") or {}
            name = str(step.get("step") or "")
            for check in qc.get("checks") or []:
                value = _number(check.get("value"))
                if value is None or not check.get("metric"):
                    continue
                m = get(name, str(check["metric"]))
                m.values[i] = value
                if check.get("passed") is False:
                    m.failed.add(i)
                for kind in ("min", "max"):
                    bound = _number(check.get(kind))
                    if bound is not None:
                        m.bounds.add((kind, bound))
            for metric, raw in (qc.get("metrics") or {}).items():
                value = _number(raw)
                if value is not None:  # a check's value, recorded above, wins
                    get(name, str(metric)).values.setdefault(i, value)
    for m in metrics.values():
        scans = list(m.values)
        values = [m.values[i] for i in scans]
        if values:
            m.median, m.scale = robust_scale(values)
        m.outliers = {i for i, out in zip(scans, robust_outliers(values)) if out}
    return list(metrics.values())


def qc_passed(record: Mapping[str, Any]) -> bool:
    """The record's QC verdict (``qc_passed``, or every step's ``qc.passed``)."""
    if "qc_passed" in record:
        return bool(record["qc_passed"])
    return all((s.get("qc") or {}).get("passed", True) for s in record.get("steps", []))


def scan_statuses(records: Sequence[Mapping[str, Any]], metrics: Sequence[Metric]) -> list[str]:
    """Per scan: ``failed`` (QC failed), ``outlier`` (passed, but a metric is a robust
    outlier) or ``passed``; the three are exclusive, in the table's default order."""
    outlying = {i for m in metrics for i in m.outliers}
    return [
        "failed" if not qc_passed(r) else "outlier" if i in outlying else "passed"
        for i, r in enumerate(records)
    ]


def site_of(record: Mapping[str, Any], sites: Mapping[tuple[str, str], str]) -> str:
    """The scan's site from the scan tables (by dataset and scan), else ``unknown``."""
    key = (str(record.get("dataset") or ""), str(record.get("scan") or ""))
    return str(sites.get(key) or "").strip() or UNKNOWN_SITE


@dataclass
class SiteSummary:
    """One (dataset, site) group of scans: counts by status and each metric's median."""

    dataset: str
    site: str
    scans: list[int] = field(default_factory=list)
    passed: int = 0
    outliers: int = 0
    failed: int = 0
    medians: dict[str, float | None] = field(default_factory=dict)  # metric key -> median


def site_summaries(
    records: Sequence[Mapping[str, Any]],
    statuses: Sequence[str],
    metrics: Sequence[Metric],
    sites: Mapping[tuple[str, str], str],
) -> list[SiteSummary]:
    """Per (dataset, site), sorted: the scans, how many passed clean, were outliers or
    failed, and the median of each metric over the group's scans that recorded it."""
    groups: dict[tuple[str, str], SiteSummary] = {}
    for i, record in enumerate(records):
        key = (str(record.get("dataset") or ""), site_of(record, sites))
        group = groups.setdefault(key, SiteSummary(*key))
        group.scans.append(i)
        status = statuses[i]
        if status == "failed":
            group.failed += 1
        elif status == "outlier":
            group.outliers += 1
        else:
            group.passed += 1
    for group in groups.values():
        for m in metrics:
            values = [m.values[i] for i in group.scans if i in m.values]
            group.medians[m.key] = statistics.median(values) if values else None
    return [groups[k] for k in sorted(groups)]
