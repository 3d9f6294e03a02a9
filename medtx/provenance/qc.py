"""QC thresholds applied to the metrics the steps record.

Steps record metrics only; pass/fail is decided when a scan's records are
merged, so changing a threshold re-judges scans without recomputing them.
"""

from __future__ import annotations

from typing import Any

from medtx.provenance.records import check

# metric -> (step, config key under qc, bound). The schema's ``qc`` section
# says what each threshold guards against and what it was calibrated on.
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
}


def judge(step: dict[str, Any], thresholds: dict[str, Any]) -> list[dict[str, Any]]:
    """Checks for one step record's metrics against ``thresholds``."""
    checks = []
    for metric, value in step["qc"]["metrics"].items():
        rule = QC_RULES.get(metric)
        if not rule or rule[0] != step["step"] or rule[1] not in thresholds:
            continue
        bound = thresholds[rule[1]]
        if rule[2] == "range":
            checks.append(check(metric, value, minimum=bound[0], maximum=bound[1]))
        elif rule[2] == "min":
            checks.append(check(metric, value, minimum=bound))
        else:
            checks.append(check(metric, value, maximum=bound))
    return checks
