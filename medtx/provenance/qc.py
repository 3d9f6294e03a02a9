"""QC thresholds applied to the metrics the steps record.

Steps record metrics only; pass/fail is decided when a scan's records are
merged, so changing a threshold re-judges scans without recomputing them.

A rule whose metric a step did not record is not judged: records written
before the rule existed (the face check's, from before it was added) keep
their verdict, and ``unmeasured`` and ``face_status`` say "not measured"
instead of failing them or crashing on the missing figure.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# metric -> (step, config key under qc, bound). The schema's ``qc`` section
# says what each threshold guards against and what it was calibrated on.
# "equal": the metric must be the threshold itself (a measuring parameter the
# step recorded: a figure measured otherwise cannot be judged by this config).
QC_RULES = {
    "voxel_mm_min": ("bet", "voxel_min_mm", "min"),
    "voxel_mm_max": ("bet", "voxel_max_mm", "max"),
    "fov_mm_min": ("bet", "fov_min_mm", "min"),
    "head_ncc_template": ("bet", "head_ncc_min", "min"),
    "brain_volume_ml": ("bet", "brain_volume_ml", "range"),
    "ncc_template": ("flirt", "ncc_min", "min"),
    "misalignment_mm": ("flirt", "misalignment_max_mm", "max"),
    "dice_template_mask": ("flirt", "dice_min", "min"),
    "bias_ratio": ("n4", "bias_max_ratio", "max"),
    # the face check of the model-ready volume (medtx.provenance.face)
    "face_margin_mm": ("normalize", "face_margin_mm", "equal"),
    "face_signal": ("normalize", "face_signal_max", "max"),
    "face_component_ml": ("normalize", "face_component_max_ml", "max"),
}
FACE_RULES = ("face_margin_mm", "face_signal", "face_component_ml")
NOT_MEASURED = "not measured"


def check(
    metric: str, value: float, *, minimum: float | None = None, maximum: float | None = None
) -> dict[str, Any]:
    """One QC check of ``value`` against optional bounds."""
    ok = value == value  # NaN fails
    if minimum is not None:
        ok = ok and value >= minimum
    if maximum is not None:
        ok = ok and value <= maximum
    return {"metric": metric, "value": value, "min": minimum, "max": maximum, "passed": bool(ok)}


def _check(metric: str, value: Any, bound: Any, kind: str) -> dict[str, Any]:
    if kind == "range":
        return check(metric, value, minimum=bound[0], maximum=bound[1])
    if kind == "min":
        return check(metric, value, minimum=bound)
    if kind == "equal":
        return check(metric, value, minimum=bound, maximum=bound)
    return check(metric, value, maximum=bound)


def judge(step: dict[str, Any], thresholds: dict[str, Any]) -> list[dict[str, Any]]:
    """Checks for one step record's metrics against ``thresholds``."""
    checks = []
    for metric, value in step["qc"]["metrics"].items():
        rule = QC_RULES.get(metric)
        if not rule or rule[0] != step["step"] or rule[1] not in thresholds:
            continue
        checks.append(_check(metric, value, thresholds[rule[1]], rule[2]))
    return checks


def judge_face(metrics: Mapping[str, Any], thresholds: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The face rules' checks of ``metrics`` from any step (``medtx.share.deface``
    judges a defaced copy with them); a rule without its metric or threshold is skipped."""
    return [
        _check(metric, metrics[metric], thresholds[QC_RULES[metric][1]], QC_RULES[metric][2])
        for metric in FACE_RULES
        if metric in metrics and QC_RULES[metric][1] in thresholds
    ]


def unmeasured(step: Mapping[str, Any], thresholds: Mapping[str, Any]) -> list[str]:
    """The metrics this step has a configured rule for but did not record (an old
    record, from before the rule): judged neither pass nor fail, but "not measured"."""
    metrics = (step.get("qc") or {}).get("metrics") or {}
    return [
        metric
        for metric, (name, key, _) in QC_RULES.items()
        if name == step.get("step") and key in thresholds and metric not in metrics
    ]


def face_status(record: Mapping[str, Any]) -> dict[str, Any]:
    """The face check of a merged scan record, for the report's face column.

    Returns ``{"status", "face_signal", "face_component_ml", "note"}``; status is
    ``pass`` or ``fail`` (from the checks the record holds), ``not judged`` (the
    metrics are there, the thresholds were not configured) or ``not measured``
    (the normalize record has no face metrics: it was written before the face
    check existed, or its volume was not in template space).
    """
    steps = [s for s in record.get("steps") or [] if isinstance(s, Mapping)]
    step = next((s for s in reversed(steps) if s.get("step") == "normalize"), None)
    qc = (step or {}).get("qc") or {}
    metrics = qc.get("metrics") or {}
    out: dict[str, Any] = {
        "face_signal": metrics.get("face_signal"),
        "face_component_ml": metrics.get("face_component_ml"),
    }
    if step is None:
        return {**out, "status": NOT_MEASURED, "note": "no normalize step in this record"}
    if "face_signal" not in metrics:
        note = (
            "the normalize record has no face metrics: written before the face check "
            "was added (or its volume is not in template space); rerun pool_normalize "
            "to measure it"
        )
        return {**out, "status": NOT_MEASURED, "note": note}
    checks = [c for c in qc.get("checks") or [] if c.get("metric") in FACE_RULES]
    if not checks:
        return {**out, "status": "not judged", "note": "no face thresholds were configured"}
    failed = [c["metric"] for c in checks if not c.get("passed")]
    return {
        **out,
        "status": "fail" if failed else "pass",
        "note": f"failed: {', '.join(failed)}" if failed else "",
    }
