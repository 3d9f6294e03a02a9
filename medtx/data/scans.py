"""The scan table: every dataset normalized once into rows the rules read.

A dataset (``bids``, ``csv`` or ``brats``; or generated, for the demo) becomes a
table with one row per scan: dataset, subject, session, scan id, image paths,
labels, and a status (``ok`` or ``excluded``) with the reason. Building it
checks every scan on entry (readable NIfTI, 3-D, finite, not empty, invertible
affine); results are cached per file (path, size, mtime) in
``<results>/scans/<dataset>.tsv`` so a rerun or one new subject re-reads only
what changed. Problems across the cohort are collected and raised once.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import pandas as pd

from medtx.data.scan_ids import brats_subject, scan_id
from medtx.domain import BRATS_FILES
from medtx.errors import BadScanError, CohortError, MedtxError
from medtx.io import load_volume, write_text

ID_PATTERN = re.compile(r"^[A-Za-z0-9]+$")
LABEL_COLUMNS = ("diagnosis", "age", "sex", "site")
COLUMNS = [
    "dataset",
    "kind",
    "subject",
    "session",
    "scan",
    "t1",
    "t1ce",
    "t2",
    "flair",
    "seg",
    *LABEL_COLUMNS,
    "status",
    "reason",
    "signature",
]


def _row(dataset: str, kind: str, subject: str, session: str | None, **fields: Any) -> dict:
    row: dict[str, Any] = {c: None for c in COLUMNS}
    row.update(
        dataset=dataset,
        kind=kind,
        subject=subject,
        session=session,
        scan=scan_id(subject, session),
        status="ok",
        reason="",
    )
    row.update(fields)
    return row


def _check_id(value: Any, what: str, where: str) -> str | None:
    """Return a problem string when an id has characters outside [A-Za-z0-9]."""
    text = "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)
    if not text:
        return f"{where}: empty {what}"
    if not ID_PATTERN.match(text):
        return f"{where}: {what} {text!r} has characters outside [A-Za-z0-9]"
    return None


# --- readers: each returns (rows, problems); a problem with a row excludes it ---

# A dataset reader's result: usable rows, and (row or None, problem) for the rest.
ReadResult = tuple[list[dict], list[tuple[dict | None, str]]]


def read_bids(name: str, root: Path) -> ReadResult:
    rows: list[dict] = []
    problems: list[tuple[dict | None, str]] = []
    participants = root / "participants.tsv"
    if not root.is_dir():
        raise MedtxError(f"dataset {name!r}: BIDS folder {root} does not exist")
    labels: dict[str, dict] = {}
    if participants.exists():
        table = pd.read_csv(participants, sep="\t", dtype=str, keep_default_na=False)
        if "participant_id" not in table.columns:
            raise MedtxError(
                f"{participants}: no participant_id column (found {list(table.columns)})"
            )
        dup = table["participant_id"][table["participant_id"].duplicated()].unique()
        for pid in dup:
            problems.append(
                (None, f"{participants}: participant_id {pid!r} is listed more than once")
            )
        for rec in table.to_dict("records"):
            labels[rec["participant_id"].removeprefix("sub-")] = rec
    on_disk = {p.name.removeprefix("sub-") for p in root.glob("sub-*") if p.is_dir()}
    for subject in sorted(set(labels) | on_disk):
        lab = {k: _label(labels.get(subject, {}).get(k)) for k in LABEL_COLUMNS}
        problem = _check_id(subject, "subject id", str(participants if subject in labels else root))
        sub_dir = root / f"sub-{subject}"
        sessions = sorted(p.name.removeprefix("ses-") for p in sub_dir.glob("ses-*") if p.is_dir())
        if problem:
            problems.append((_row(name, "bids", subject, None, **lab), problem))
            continue
        if subject not in on_disk:
            row = _row(name, "bids", subject, None, **lab)
            problems.append(
                (row, f"{participants}: sub-{subject} is listed but {sub_dir} does not exist")
            )
            continue
        visits: list[str | None] = list(sessions) or [None]  # None: no session level
        for session in visits:
            anat = sub_dir / (f"ses-{session}" if session else "") / "anat"
            t1s = sorted(anat.glob("*_T1w.nii.gz")) + sorted(anat.glob("*_T1w.nii"))
            row = _row(name, "bids", subject, session, t1=str(t1s[0]) if t1s else None, **lab)
            if session and (p := _check_id(session, "session id", str(anat.parent))):
                problems.append((row, p))
            elif not t1s:
                problems.append((row, f"{anat}: no *_T1w.nii[.gz] for sub-{subject}"))
            else:
                rows.append(row)
    return rows, problems


def read_csv(name: str, path: Path, columns: dict[str, str] | None = None) -> ReadResult:
    if not path.is_file():
        raise MedtxError(f"dataset {name!r}: CSV file {path} does not exist")
    cols = {k: k for k in ("subject", "session", "t1", *LABEL_COLUMNS)}
    cols.update(columns or {})
    sep = "\t" if path.suffix in (".tsv", ".txt") else ","
    table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    for need in ("subject", "t1"):
        if cols[need] not in table.columns:
            raise MedtxError(f"{path}: missing column {cols[need]!r} (found {list(table.columns)})")
    rows: list[dict] = []
    problems: list[tuple[dict | None, str]] = []
    seen: dict[tuple[str, str | None], int] = {}
    for i, rec in enumerate(table.to_dict("records"), start=2):  # line 1 is the header
        subject = str(rec[cols["subject"]]).strip().removeprefix("sub-")
        session = str(rec.get(cols["session"], "")).strip().removeprefix("ses-") or None
        t1 = str(rec[cols["t1"]]).strip()
        t1_path = (path.parent / t1) if t1 and not os.path.isabs(t1) else Path(t1)
        lab = {k: _label(rec.get(cols[k])) for k in LABEL_COLUMNS}
        row = _row(name, "csv", subject, session, t1=str(t1_path) if t1 else None, **lab)
        where = f"{path} line {i}"
        problem = _check_id(subject, "subject id", where)
        if not problem and session:
            problem = _check_id(session, "session id", where)
        key = (subject, session)
        if not problem and key in seen:
            problem = (
                f"{where}: duplicate row for subject {subject!r}"
                + (f" session {session!r}" if session else "")
                + f" (first on line {seen[key]})"
            )
        seen.setdefault(key, i)
        if not problem and not t1:
            problem = f"{where}: no T1 path for subject {subject!r}"
        if problem:
            problems.append((row, problem))
        else:
            rows.append(row)
    return rows, problems


def read_brats(name: str, root: Path) -> ReadResult:
    if not root.is_dir():
        raise MedtxError(f"dataset {name!r}: BraTS folder {root} does not exist")
    rows: list[dict] = []
    problems: list[tuple[dict | None, str]] = []
    for case_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        case = case_dir.name
        subject = brats_subject(case)
        files: dict[str, str | None] = {}
        for mod in BRATS_FILES:
            found = sorted(case_dir.glob(f"*_{mod}.nii.gz")) + sorted(case_dir.glob(f"*_{mod}.nii"))
            files[mod] = str(found[0]) if found else None
        row = _row(name, "brats", subject, None, **files)
        row["scan"] = case
        missing = [m for m in BRATS_FILES if files[m] is None]
        if missing:
            problems.append((row, f"{case_dir}: missing {', '.join(missing)} image(s)"))
        else:
            rows.append(row)
    return rows, problems


def _label(value: Any) -> Any:
    if value is None:
        return None
    text = str(value).strip()
    return None if text in ("", "n/a", "NA", "nan") else text


# --- checks with a per-file cache ---


def file_signature(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


def check_row(row: dict, cache: dict[str, tuple[str, str]]) -> str | None:
    """Check every image of a row; return the first problem or None."""
    images = [row[m] for m in ("t1", "t1ce", "t2", "flair", "seg") if row.get(m)]
    sigs = []
    for image in images:
        try:
            sig = file_signature(image)
        except OSError:
            return f"{image}: file does not exist"
        sigs.append(sig)
        cached = cache.get(image)
        if cached and cached[0] == sig:
            if cached[1]:
                return cached[1]
            continue
        try:
            is_seg = image == row.get("seg")
            load_volume(image, subject=row["subject"], check_data=not is_seg)
            cache[image] = (sig, "")
        except BadScanError as err:
            cache[image] = (sig, str(err))
            return str(err)
    row["signature"] = ";".join(sigs)
    return None


def build_scan_table(
    name: str, dataset: dict, *, cache_path: str | Path | None = None, on_bad_scan: str = "fail"
) -> pd.DataFrame:
    """Read, check and cache one dataset's scan table.

    Raises:
        CohortError: listing every bad scan, when ``on_bad_scan`` is ``fail``.
    """
    kind, path = dataset["kind"], Path(dataset["path"])
    problems: list[tuple[dict | None, str]] = []
    if dataset.get("generate"):
        rows = generated_rows(name, dataset)
    elif kind == "bids":
        rows, problems = read_bids(name, path)
    elif kind == "csv":
        rows, problems = read_csv(name, path, dataset.get("columns"))
    elif kind == "brats":
        rows, problems = read_brats(name, path)
    else:  # the schema already refuses this
        raise MedtxError(f"dataset {name!r}: unknown kind {kind!r}")
    if not dataset.get("generate"):
        cache = _load_cache(cache_path)
        for row in rows:
            problem = check_row(row, cache)
            if problem:
                problems.append((row, problem))
        rows = [r for r in rows if not any(r is p[0] for p in problems)]
    if problems and on_bad_scan == "fail":
        raise CohortError([p for _, p in problems], what=f"dataset {name!r}")
    excluded = [
        {**bad, "status": "excluded", "reason": problem}
        for bad, problem in problems
        if bad is not None
    ]
    table = pd.DataFrame(rows + excluded, columns=COLUMNS)
    if not rows:
        raise MedtxError(
            f"dataset {name!r} ({path}): no usable scans"
            + (f"; {len(excluded)} excluded" if excluded else "")
        )
    if cache_path:
        # Rewrite only on change: rules take this file as input, so a new
        # mtime alone would rerun them.
        text = table.to_csv(sep="\t", index=False)
        path = Path(cache_path)
        if not path.exists() or path.read_text() != text:
            write_text(text, path)
    return table


def _load_cache(cache_path) -> dict[str, tuple[str, str]]:
    """image path -> (signature, problem or '') from a previous table."""
    if not cache_path or not Path(cache_path).exists():
        return {}
    old = pd.read_csv(cache_path, sep="\t", dtype=str, keep_default_na=False)
    cache = {}
    for rec in old.to_dict("records"):
        sigs = rec.get("signature", "").split(";") if rec.get("signature") else []
        images = [rec[m] for m in ("t1", "t1ce", "t2", "flair", "seg") if rec.get(m)]
        if rec.get("status") == "ok" and len(sigs) == len(images):
            cache.update({img: (sig, "") for img, sig in zip(images, sigs)})
    return cache


def generated_rows(name: str, dataset: dict) -> list[dict]:
    """Rows of a demo dataset, known from its plan before any file exists."""
    from medtx.data import demo

    root = Path(dataset["path"])
    spec = dataset["generate"]
    if dataset["kind"] == "brats":
        rows = []
        for plan in demo.plan_brats_cohort(spec):
            files = {m: str(root / rel) for m, rel in plan["files"].items()}
            row = _row(name, "brats", brats_subject(plan["case"]), None, **files)
            row["scan"] = plan["case"]
            rows.append(row)
        return rows
    return [
        _row(
            name,
            "bids",
            p["subject"],
            p.get("session"),
            t1=str(root / p["t1"]),
            **{k: p.get(k) for k in LABEL_COLUMNS},
        )
        for p in demo.plan_t1_cohort(spec)
    ]


def read_scan_table(path: str | Path) -> pd.DataFrame:
    """A scan table as ``build_scan_table`` wrote it: every column text, blanks empty."""
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def excluded_scans(table_paths: list[str]) -> list[dict]:
    """The scans the tables left out, with their reasons (for the report)."""
    rows = []
    for path in table_paths:
        table = read_scan_table(path)
        for row in table[table["status"] == "excluded"].to_dict("records"):
            rows.append(
                {
                    "dataset": row["dataset"],
                    "subject": row["subject"],
                    "session": row["session"] or None,
                    "path": row["t1"] or row["flair"] or "",
                    "reason": row["reason"],
                }
            )
    return rows


def usable_subjects(table_paths: list[str]) -> list[tuple[str, str]]:
    """(dataset, subject) of every usable scan in the tables (one per scan)."""
    pairs: list[tuple[str, str]] = []
    for path in table_paths:
        table = read_scan_table(path)
        ok = table[table["status"] == "ok"]
        pairs += list(zip(ok["dataset"], ok["subject"]))
    return pairs
