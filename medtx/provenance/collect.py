"""A scan's provenance: its step records merged, judged against QC, with thumbnails.

The records name the scan and every file the steps read and wrote, so the
thumbnail rows are found there, not passed on the command line. The merged
record is chained into the scan's manifest with the hash of each step record
it merged (``merge_steps``), which ``medtx audit`` checks it against.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from medtx.domain import BRATS_MODALITIES
from medtx.provenance.records import load_step_records, merge_steps, step_file
from medtx.provenance.thumbnails import scan_thumbnails

# QC thumbnail rows: (label, image, mask), each file named by the step that
# recorded it, as (step, direction, role).
T1_PANELS = (
    ("raw + brain mask", ("bet", "inputs", "t1"), ("bet", "outputs", "brain_mask")),
    ("affine to template", ("flirt", "outputs", "brain"), ("flirt", "outputs", "brain_mask")),
    ("N4", ("n4", "outputs", "n4"), ("n4", "inputs", "brain_mask")),
    (
        "model input 2 mm",
        ("normalize", "outputs", "preproc"),
        ("normalize", "inputs", "brain_mask"),
    ),
)


def t1_panels(steps: list[dict]) -> list[tuple[str, str, str]]:
    """The T1 chain's thumbnail rows, with the files the step records name."""

    def find(step: str, direction: str, role: str) -> str:
        return step_file(steps, step, role, direction=direction)

    return [(label, find(*image), find(*mask)) for label, image, mask in T1_PANELS]


def brats_panels(steps: list[dict]) -> list[tuple[str, str, str | None]]:
    """Thumbnail rows of a BraTS case: each modality (channel) with the tumour outline."""
    (record,) = [s for s in steps if s.get("step") == "brats"]
    image = step_file(steps, "brats", "preproc")
    outputs = {e["role"] for e in record["outputs"]}
    seg = step_file(steps, "brats", "seg") if "seg" in outputs else None
    modalities = record["params"].get("modalities", BRATS_MODALITIES)
    return [(f"{m} + tumour", f"{image}#{i}", seg) for i, m in enumerate(modalities)]


def collect_scan(
    record_files: Sequence[str | Path],
    out: str | Path,
    *,
    thumbnail: str | None = None,
    qc: dict | None = None,
) -> dict:
    """``medtx collect``: merge a scan's step records and draw its QC thumbnail strip."""
    steps = load_step_records(record_files)
    extra = {}
    if thumbnail:
        is_brats = any(s.get("step") == "brats" for s in steps)
        scan_thumbnails(brats_panels(steps) if is_brats else t1_panels(steps), thumbnail)
        extra["thumbnail"] = thumbnail
    return merge_steps(steps, out, qc=qc or {}, extra=extra)
