"""What ``medtx predict`` reads: raw NIfTI files, a BIDS folder, a CSV/TSV, or BraTS cases.

The study's own readers (``medtx.data.scans``) list folders and tables, so a
scan is named and checked as it would be for training; a row they cannot use
is reported in one line and skipped, never guessed at.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medtx.data import scans as readers
from medtx.data.scan_ids import scan_identity
from medtx.domain import BRATS_MODALITIES
from medtx.io import is_nifti_path
from medtx.preprocess.chain import default_scan_id

DATASET = "predict"  # the dataset name the readers put in their messages


@dataclass
class ScanInput:
    """One scan to predict: its id, raw image(s) by role (t1, or the BraTS modalities)
    and, when the input gave it, the chronological age (for the brain-age gap)."""

    scan: str
    images: dict[str, str]
    subject: str
    session: str | None = None
    age: float | None = None
    extra: dict[str, str] = field(default_factory=dict)


def collect_inputs(
    paths: Sequence[str | Path], *, brats: bool
) -> tuple[list[ScanInput], list[str]]:
    """The scans named by ``paths``, and one line per input that cannot be used.

    T1 models read NIfTI files, BIDS folders and CSV/TSV tables (columns
    ``subject``, ``t1`` and optionally ``session``, ``age``, ``sex``, ``site``,
    as a ``kind: csv`` dataset); segmentation models read BraTS case folders,
    or a folder of them.
    """
    found: list[ScanInput] = []
    problems: list[str] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            problems.append(f"{path}: does not exist")
        elif brats:
            _brats(path, found, problems)
        elif path.is_dir():
            _rows(readers.read_bids(DATASET, path), found, problems)
        elif path.suffix.lower() in (".csv", ".tsv"):
            _rows(readers.read_csv(DATASET, path), found, problems)
        elif is_nifti_path(path):
            scan = default_scan_id(path)
            who = scan_identity(scan)
            found.append(ScanInput(scan, {"t1": str(path)}, str(who["subject"]), who["session"]))
        else:
            problems.append(
                f"{path}: not a NIfTI file (.nii, .nii.gz), a BIDS folder or a CSV/TSV table"
            )
    seen: dict[str, str] = {}
    unique = []
    for item in found:
        source = next(iter(item.images.values()))
        first = seen.setdefault(item.scan, source)
        if first == source:
            unique.append(item)
        else:
            problems.append(
                f"{source}: scan id {item.scan!r} is also that of {first}; give each scan "
                "its own name (the output keeps one folder per scan)"
            )
    return unique, problems


def _brats(path: Path, found: list[ScanInput], problems: list[str]) -> None:
    """A BraTS case folder (it holds ``*_t1.nii.gz`` ...) or a folder of case folders."""
    if not path.is_dir():
        problems.append(f"{path}: a segmentation model reads BraTS case folders, not files")
        return
    own = any(path.glob(f"*_{BRATS_MODALITIES[0]}.nii*"))
    root = path.parent if own else path
    rows, bad = readers.read_brats(DATASET, root)
    for row, why in bad:  # a case to predict has no labels yet: only its images count
        if own and (row or {}).get("scan") != path.name:
            continue
        if row is None:
            problems.append(why)
            continue
        missing = [m for m in BRATS_MODALITIES if not row.get(m)]
        if missing:
            problems.append(f"{root / row['scan']}: missing {', '.join(missing)} image(s)")
        else:
            rows.append(row)
    if own:
        rows = [r for r in rows if r["scan"] == path.name]
    for row in rows:
        images = {m: row[m] for m in BRATS_MODALITIES}
        found.append(ScanInput(row["scan"], images, subject=row["subject"]))


def _rows(result: readers.ReadResult, found: list[ScanInput], problems: list[str]) -> None:
    rows, bad = result
    problems += [why for _, why in bad]
    for row in rows:
        if row.get("status") == "skipped":
            continue
        age = row.get("age") or None
        try:
            age_value = float(age) if age is not None else None
        except ValueError:
            problems.append(f"{row.get('_where') or row['t1']}: age {age!r} is not a number")
            age_value = None
        found.append(
            ScanInput(
                row["scan"],
                {"t1": row["t1"]},
                subject=row["subject"],
                session=row.get("session") or None,
                age=age_value,
                extra={k: str(row.get(k) or "") for k in ("sex", "site")},
            )
        )
