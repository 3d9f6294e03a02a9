"""The scan table: every dataset normalized once into rows the rules read.

A dataset (``bids``, ``csv`` or ``brats``; or generated, for the demo) becomes a
table with one row per image found: dataset, subject, session, scan id, image
paths, labels, and a status with the reason:

* ``ok``: a scan the workflow preprocesses;
* ``skipped``: a BIDS image the dataset's ``select`` block does not take (e.g.
  ``run-1 not selected (runs: first)``; ``medtx.data.bids``), a subject or
  session without a T1w (MEG's ``sub-emptyroom``, a functional-only session), or
  a participants.tsv row without a folder; it has no scan id. Such datasets are
  valid BIDS, so they are noted, not refused;
* ``excluded``: a scan that failed an input check, under ``on_bad_scan: exclude``.

An ``ok`` row may carry a note in ``reason`` (an age read from ``89+`` or ``35-40``;
``medtx.data.labels``).

Building it checks every scan on entry (readable NIfTI, 3-D, finite, not empty,
invertible affine) and every label (``medtx.data.labels``); image checks are
cached per file (path, size, mtime) in ``<results>/scans/<dataset>.tsv`` so a
rerun or one new subject re-reads only what changed. Problems across the cohort
are collected and raised once, and a short summary per dataset (taken, skipped,
excluded, the commonest reasons) goes to stderr.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from medtx.data import bids
from medtx.data.labels import (
    LABEL_COLUMNS,
    TASK_LABELS,
    check_labels,
    clear_unused_ages,
    missing_counts,
    read_labels,
)
from medtx.data.scan_ids import brats_subject, check_id, scan_id, shown
from medtx.domain import BRATS_FILES, DEFAULT_LABEL_MAP
from medtx.errors import BadScanError, CohortError, ConfigError, MedtxError
from medtx.io import load_volume, write_text

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
IMAGES = ("t1", "t1ce", "t2", "flair", "seg")
MAX_REASON_LINES = 3  # reason lines per dataset in the stderr summary
MAX_VALIDATOR_LINES = 20  # the BIDS validator's errors shown when it refuses an input
SAME_ID = "ids compare without 'sub-' and ignoring case"
NOTED = "taken with a note"  # an ok row whose reason says how a label was read


def _row(
    dataset: str, kind: str, subject: str, session: str | None, run: str | None = None, **fields
) -> dict:
    row: dict[str, Any] = {c: None for c in COLUMNS}
    row.update(
        dataset=dataset,
        kind=kind,
        subject=subject,
        session=session,
        scan=scan_id(subject, session, run),
        status="ok",
        reason="",
    )
    row.update(fields)
    return row


class Table:
    """A CSV/TSV read as text: its header, and each row with its line number."""

    def __init__(self, path: Path, what: str):
        self.path = path
        sep = "\t" if path.suffix in (".tsv", ".txt") else ","
        try:
            with path.open(newline="", encoding="utf-8-sig") as f:
                reader = csv.reader(f, delimiter=sep)
                lines = [(reader.line_num, rec) for rec in reader]
        except UnicodeDecodeError as err:
            raise MedtxError(
                f"{path}: {what} is not UTF-8 text ({err.reason} at byte {err.start})"
            ) from err
        except (csv.Error, OSError) as err:
            raise MedtxError(f"{path}: {what} is not a readable table ({err})") from err
        lines = [(n, rec) for n, rec in lines if any(cell.strip() for cell in rec)]
        if not lines:
            raise MedtxError(f"{path}: {what} is empty; its first line must name the columns")
        self.columns = [c.strip() for c in lines[0][1]]
        first: dict[str, int] = {}
        for i, name in enumerate(self.columns, 1):
            if name and name in first:  # a dict per row would keep the last one, silently
                raise MedtxError(
                    f"{path}: {what} has two columns named {shown(name, 30)} "
                    f"(columns {first[name]} and {i} of line {lines[0][0]}); keep one"
                )
            first[name] = i
        ragged = [
            f"{path} line {n}: {len(rec)} field(s), but the header (line {lines[0][0]}) "
            f"has {len(self.columns)}"
            for n, rec in lines[1:]
            if len(rec) != len(self.columns)
        ]
        if ragged:
            raise CohortError(ragged, what=str(path))
        self.rows = [(n, dict(zip(self.columns, rec))) for n, rec in lines[1:]]

    def require(self, names: Iterable[str]) -> None:
        """MedtxError naming the first missing column and the columns found."""
        for name in names:
            if name not in self.columns:
                found = [shown(c, 30) for c in self.columns[:6]]
                more = ", …" if len(self.columns) > 6 else ""
                raise MedtxError(
                    f"{self.path}: missing column {name!r} (found [{', '.join(found)}{more}]); "
                    "the first line must name the columns"
                )


def _cell(value: str | None) -> str:
    """A table cell as stripped text ('' for a column the table lacks)."""
    return "" if value is None else value.strip()


# --- readers: each returns (rows, problems); a problem's row is excluded ---

# A dataset reader's result: rows found (status ok or skipped), and (row or None, problem).
ReadResult = tuple[list[dict], list[tuple[dict | None, str]]]


def _read_participants(path: Path) -> tuple[dict[str, tuple[dict, int]], dict[str, list[str]]]:
    """subject -> (row, line), and lower-case id -> problems of rows that collide.

    Ids compare without ``sub-`` and ignoring case: ``sub-07`` and ``07`` name one
    subject, and two rows for it would otherwise overwrite each other's labels.
    """
    table = Table(path, "participants.tsv")
    table.require(["participant_id"])
    listed: dict[str, tuple[dict, int]] = {}
    first: dict[str, tuple[str, int]] = {}
    clashes: dict[str, list[str]] = {}
    for i, rec in table.rows:
        pid = _cell(rec["participant_id"])
        subject = pid.removeprefix("sub-")
        norm = subject.lower()
        if norm in first:
            other, j = first[norm]
            what = (
                "is listed more than once"
                if other == pid
                else f"is the same subject as {other!r} ({SAME_ID})"
            )
            clashes.setdefault(norm, []).append(
                f"{path} line {i}: participant_id {shown(pid)} {what} (first on line {j})"
            )
            continue
        first[norm] = (pid, i)
        listed[subject] = (rec, i)
    return listed, clashes


def read_bids(name: str, root: Path, select: dict | None = None) -> ReadResult:
    """Rows for every T1w image of a BIDS folder, taken or skipped by ``select``.

    A subject or session without a T1w and a participants.tsv row without a
    folder are ``skipped`` rows with the reason: BIDS allows them (MEG's
    ``sub-emptyroom``, a functional-only session, subjects whose images were not
    shared). What ``.bidsignore`` names is not looked at.
    """
    if not root.is_dir():
        raise MedtxError(f"dataset {name!r}: BIDS folder {root} does not exist")
    key = f"datasets/{name}/select"
    sel = bids.Selection.from_config(select, key)
    ignore = bids.BidsIgnore.read(root)
    participants = root / "participants.tsv"
    listed, clashes = _read_participants(participants) if participants.is_file() else (None, {})
    rows: list[dict] = []
    problems: list[tuple[dict | None, str]] = []
    dirs = {p.name.removeprefix("sub-"): p for p in sorted(root.glob("sub-*")) if p.is_dir()}
    hidden = {s for s, p in dirs.items() if ignore.ignores(p, is_dir=True)}
    dirs = {s: p for s, p in dirs.items() if s not in hidden}
    folded = Counter(s.lower() for s in dirs)
    found: list[bids.BidsImage] = []
    for subject, sub_dir in dirs.items():
        record, line = (listed or {}).get(subject, ({}, None))
        where = f"{participants} line {line}" if line else None
        lab, note = read_labels(record, where or str(participants))

        def row_for(
            session=None, run=None, image=None, lab=lab, where=where, subject=subject, note=note
        ):
            row = _row(name, "bids", subject, session, run, t1=image and str(image), **lab)
            row["_where"], row["reason"] = where, note
            return row

        def skipped(reason: str, session: str | None = None, subject=subject) -> dict:
            return _row(name, "bids", subject, session, scan="", status="skipped", reason=reason)

        paths = bids.find_images(sub_dir, ignore)
        if not paths:  # nothing to process: its id and participants row do not matter
            rows.append(skipped(_no_t1w(sub_dir, ignore)))
            continue
        if problem := check_id(subject, "subject id", str(sub_dir)):
            problems.append((row_for(), problem))
            continue
        problem = _subject_problem(subject, sub_dir, dirs, folded, listed, clashes, participants)
        images: list[bids.BidsImage] = []
        for path in paths:
            ses_dir = path.parent.parent
            session = ses_dir.name.removeprefix("ses-") if ses_dir != sub_dir else None
            bad = session and check_id(session, "session id", str(ses_dir))
            if not bad:
                try:
                    image = bids.read_image(path)
                    bad = _folder_mismatch(image, subject, session)
                except ValueError as err:
                    bad = f"{path}: not a BIDS file name: {err}"
            if bad:
                problems.append((row_for(session, image=path), bad))
            else:
                images.append(image)
        found += images
        rows += [
            skipped(_no_t1w(sub_dir / f"ses-{s}", ignore), s)
            for s in _sessions_without_images(sub_dir, paths, sel, ignore)
        ]
        for v in bids.select_images(images, sel, key):
            run = v.image.run if sel.runs == "all" else None
            row = row_for(v.image.session, run, v.image.path)
            if v.status == "skipped":
                rows.append({**row, "scan": "", "status": "skipped", "reason": v.reason})
            elif v.status == "problem":
                problems.append((row, v.reason))
            elif problem:
                problems.append((row, problem))
            else:
                rows.append(row)
    _listed_without_folder(name, root, listed or {}, dirs, hidden, folded, clashes, rows, problems)
    if unmatched := bids.unmatched_choices(sel, found, key):
        raise ConfigError("; ".join(unmatched))
    return rows, problems


def _listed_without_folder(
    name: str,
    root: Path,
    listed: dict,
    dirs: dict,
    hidden: set,
    folded: Counter,
    clashes: dict,
    rows: list[dict],
    problems: list[tuple[dict | None, str]],
) -> None:
    """participants.tsv rows with no subject folder: a skipped row with the reason,
    or the problem with the id (and its clashes), added to ``rows`` and ``problems``."""
    participants = root / "participants.tsv"
    for subject, (record, line) in listed.items():
        if subject in dirs:
            continue
        where = f"{participants} line {line}"
        lab, _ = read_labels(record, where)
        row = _row(name, "bids", subject, None, **lab)
        row["_where"] = where
        if problem := check_id(subject, "participant_id", where):
            problems.append((row, problem))
        else:
            folder = root / f"sub-{subject}"
            state = "is in .bidsignore" if subject in hidden else "does not exist"
            reason = f"{where}: sub-{subject} is listed but {folder} {state}"
            rows.append({**row, "scan": "", "status": "skipped", "reason": reason})
        if not folded[subject.lower()]:  # else the subject's images carry the clash
            problems += [
                (_row(name, "bids", subject, None), p) for p in clashes.get(subject.lower(), [])
            ]


def _subject_problem(subject, sub_dir, dirs, folded, listed, clashes, participants) -> str | None:
    """Why a subject's images cannot be used as they stand (ids, participants.tsv), or None."""
    norm = subject.lower()
    if folded[norm] > 1:
        twins = " and ".join(f"sub-{s}" for s in dirs if s.lower() == norm)
        return (
            f"{sub_dir}: {twins} differ only in case; their outputs would share files "
            "on a case-insensitive file system"
        )
    if listed is None:
        return None
    if norm in clashes:
        return "; ".join(clashes[norm])
    if subject not in listed:
        near = next((s for s in listed if s.lower() == norm), None)
        return f"{participants}: sub-{subject} has images but no participant_id row" + (
            f" (sub-{near} differs in case)" if near else ""
        )
    return None


def _folder_mismatch(image: bids.BidsImage, subject: str, session: str | None) -> str | None:
    """A problem when the file name's sub/ses entities disagree with its folders."""
    named = image.entities.get("sub", ""), image.session
    if named != (subject, session):
        said = scan_id(*named).replace("_", " ")
        folder = scan_id(subject, session).replace("_", " ")
        return f"{image.path}: the file name says {said} but its folders say {folder}"
    return None


def _sessions_without_images(
    sub_dir: Path, paths: list[Path], sel: bids.Selection, ignore: bids.BidsIgnore
) -> list[str]:
    """Selected session folders of a subject that hold no T1w image.

    A subject without any image is one skipped row already, not one per session.
    """
    if not paths:
        return []
    with_images = {p.parent.parent for p in paths}
    return [
        p.name.removeprefix("ses-")
        for p in sorted(sub_dir.glob("ses-*"), key=lambda p: bids.natural_key(p.name))
        if p.is_dir()
        and p not in with_images
        and not ignore.ignores(p, is_dir=True)
        and (sel.sessions == "all" or p.name.removeprefix("ses-") in sel.session_list)
    ]


def _no_t1w(folder: Path, ignore: bids.BidsIgnore) -> str:
    """Why a subject or session folder gives no scan, and what it holds instead."""
    found = bids.data_folders(folder, ignore)
    return f"{folder}: no {bids.SUFFIX} image in anat (found: {', '.join(found) or 'nothing'})"


def read_csv(name: str, path: Path, columns: dict[str, str] | None = None) -> ReadResult:
    """Rows of a CSV/TSV dataset, one per line; rows whose ids collide are problems."""
    if not path.is_file():
        raise MedtxError(f"dataset {name!r}: CSV file {path} does not exist")
    table = Table(path, "the dataset table")
    cols = {k: k for k in ("subject", "session", "t1", *LABEL_COLUMNS)}
    for role, column in (columns or {}).items():
        where = f"config key 'datasets/{name}/columns/{role}'"
        if role not in cols:
            raise ConfigError(f"{where}: not a column role; use one of {', '.join(cols)}")
        if column not in table.columns:
            raise MedtxError(f"{path}: no column {column!r} ({where})")
        cols[role] = column
    table.require([cols["subject"], cols["t1"]])
    problems: list[tuple[dict | None, str]] = []
    seen: dict[tuple[str, str], list[tuple[int, str, dict]]] = {}
    for i, rec in table.rows:
        raw = _cell(rec[cols["subject"]])
        subject = raw.removeprefix("sub-")
        session = _cell(rec.get(cols["session"])).removeprefix("ses-") or None
        t1 = _cell(rec[cols["t1"]])
        t1_path = (path.parent / t1) if t1 and not os.path.isabs(t1) else Path(t1)
        where = f"{path} line {i}"
        lab, note = read_labels({k: rec.get(c) for k, c in cols.items()}, where)
        row = _row(name, "csv", subject, session, t1=str(t1_path) if t1 else None, **lab)
        row["_where"], row["reason"] = where, note
        problem = check_id(subject, "subject id", where)
        if not problem and session:
            problem = check_id(session, "session id", where)
        if not problem and not t1:
            problem = f"{where}: no T1 path for subject {subject!r}"
        if problem:
            problems.append((row, problem))
        else:
            seen.setdefault((subject.lower(), (session or "").lower()), []).append((i, raw, row))
    rows = []
    for entries in seen.values():
        (j, first, first_row), *others = entries
        if not others:
            rows.append(first_row)
            continue
        who = f"subject {first_row['subject']!r}" + (
            f" session {first_row['session']!r}" if first_row["session"] else ""
        )
        lines = ", ".join(str(i) for i, _, _ in others)
        problems.append((first_row, f"{path} line {j}: {who} is also on line {lines} ({SAME_ID})"))
        for i, raw, row in others:
            as_written = "" if raw == first else f" as {shown(first)}"
            problems.append(
                (row, f"{path} line {i}: duplicate row for {who} (first on line {j}{as_written})")
            )
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


# --- checks with a per-file cache ---


def file_signature(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


def check_row(row: dict, cache: dict[str, tuple[str, str]]) -> str | None:
    """Check every image of a row; return the first problem or None."""
    images = [row[m] for m in IMAGES if row.get(m)]
    sigs = []
    for image in images:
        if "{" in image or "}" in image:
            # Snakemake reads braces in an input path as wildcards and cannot escape them.
            return f"{image}: braces in a file name are not supported; rename the file"
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
    name: str,
    dataset: dict,
    *,
    cache_path: str | Path | None = None,
    on_bad_scan: str = "fail",
    label_map: Mapping[str, int] | None = None,
    write: bool = True,
) -> pd.DataFrame:
    """Read, check and cache one dataset's scan table, and summarize it on stderr.

    Args:
        dataset: the dataset's config (kind, role, path, and select/columns/generate).
        cache_path: the previous table, read as the per-file check cache, and
            rewritten with this one when ``write`` says so.
        label_map: the config's ``folds/label_map`` (diagnoses of classification datasets).
        write: False while Snakemake reads the workflow: the table is then only
            read, and the ``scan_table`` job writes it (``table_text``), under the
            run's lock, never in a dry run or a refused one.

    Raises:
        CohortError: listing every bad scan when ``on_bad_scan`` is ``fail``, and
            every bad label whatever ``on_bad_scan`` says.
    """
    kind, path = dataset["kind"], Path(dataset["path"])
    roles = [dataset["role"]] if isinstance(dataset["role"], str) else list(dataset["role"])
    if "select" in dataset and (kind != "bids" or dataset.get("generate")):
        raise ConfigError(
            f"config key 'datasets/{name}/select': only a bids dataset that is read "
            "(not generated) has images to select"
        )
    if dataset.get("bids_validate"):
        _validate_bids(name, dataset)
    problems: list[tuple[dict | None, str]] = []
    if dataset.get("generate"):
        found = generated_rows(name, dataset)
    elif kind == "bids":
        found, problems = read_bids(name, path, dataset.get("select"))
    elif kind == "csv":
        found, problems = read_csv(name, path, dataset.get("columns"))
    elif kind == "brats":
        found, problems = read_brats(name, path)
    else:  # the schema already refuses this
        raise MedtxError(f"dataset {name!r}: unknown kind {kind!r}")
    rows = [r for r in found if r["status"] == "ok"]
    skipped = [r for r in found if r["status"] == "skipped"]
    clear_unused_ages([*rows, *(bad for bad, _ in problems if bad)], roles, name)
    label_problems = check_labels(
        rows,
        dataset=name,
        roles=roles,
        label_map=DEFAULT_LABEL_MAP if label_map is None else label_map,
        source=str(path / "participants.tsv" if kind == "bids" else path),
        also=[bad for bad, _ in problems if bad] if on_bad_scan == "fail" else (),
    )
    if not dataset.get("generate"):
        cache = _load_cache(cache_path)
        for row in rows:
            problem = check_row(row, cache)
            if problem:
                problems.append((row, problem))
        rows = [r for r in rows if not any(r is p[0] for p in problems)]
    if problems and on_bad_scan == "fail":
        lines = list(dict.fromkeys([p for _, p in problems] + label_problems))
        raise CohortError(lines, what=f"dataset {name!r}")
    if label_problems:
        raise CohortError(label_problems, what=f"dataset {name!r} labels")
    excluded = [
        {**(bad or _row(name, kind, "", None, scan="")), "status": "excluded", "reason": problem}
        for bad, problem in problems
    ]
    table = pd.DataFrame(rows + excluded + skipped, columns=COLUMNS)
    if not rows:
        raise MedtxError(
            f"dataset {name!r} ({path}): no usable scans"
            + (f"; {len(excluded)} excluded" if excluded else "")
            + (f"; {len(skipped)} skipped ({skipped[0]['reason']}, ...)" if skipped else "")
        )
    if cache_path and write:
        # Rewrite only on change: rules take this file as input, so a new
        # mtime alone would rerun them.
        text = table_text(table)
        if _current_text(cache_path) != text:
            write_text(text, cache_path)
    print("\n".join(summary_lines(name, table, roles, cache_path)), file=sys.stderr)
    return table


def _validate_bids(name: str, dataset: dict) -> None:
    """The official validator's errors on a BIDS input, one line per file."""
    from medtx.data.bids_validation import errors, validate

    if dataset["kind"] != "bids" or dataset.get("generate"):
        raise ConfigError(
            f"config key 'datasets/{name}/bids_validate': only a bids dataset that is read "
            "(not generated) is validated"
        )
    found = errors(validate(dataset["path"]))
    if found:
        lines = [f.line(dataset["path"]) for f in found[:MAX_VALIDATOR_LINES]]
        if len(found) > MAX_VALIDATOR_LINES:
            lines.append(f"... and {len(found) - MAX_VALIDATOR_LINES} more errors")
        raise CohortError(lines, what=f"dataset {name!r} (the BIDS validator)")


def build_scan_tables(
    datasets: Mapping[str, dict], *, table_path: Callable[[str], str | Path], **options
) -> dict[str, pd.DataFrame]:
    """``build_scan_table`` for every dataset, with the problems of all raised at once.

    Args:
        table_path: dataset name -> its scan table (the per-file cache).
        options: ``on_bad_scan``, ``label_map`` and ``write``, as ``build_scan_table``
            takes them.
    """
    tables: dict[str, pd.DataFrame] = {}
    failed: dict[str, MedtxError] = {}
    for name, dataset in datasets.items():
        try:
            tables[name] = build_scan_table(name, dataset, cache_path=table_path(name), **options)
        except MedtxError as err:
            failed[name] = err
    if len(failed) == 1:
        raise next(iter(failed.values()))
    if failed:
        lines = [
            line
            for err in failed.values()
            for line in (err.problems if isinstance(err, CohortError) else [str(err)])
        ]
        raise CohortError(lines, what="datasets " + ", ".join(map(repr, failed)))
    return tables


def planned_scan_tables(
    datasets: Mapping[str, dict], *, table_path: Callable[[str], str | Path], **options
) -> dict[str, pd.DataFrame]:
    """The tables the planning run wrote, for a job Snakemake spawned on a cluster.

    Each SLURM job reads the whole workflow again to run its one scan. Building
    every table there would check every image in every job (O(scans) work in
    each of O(scans) jobs); the planner wrote them under the run's lock before
    any job started, so a job runs the scan its planner saw. A dataset whose
    table is missing is built as ``build_scan_tables`` builds it.
    """
    tables: dict[str, pd.DataFrame] = {}
    missing = {}
    for name, dataset in datasets.items():
        path = Path(table_path(name))
        if path.is_file():
            tables[name] = read_scan_table(path)
        else:
            missing[name] = dataset
    if missing:
        tables.update(build_scan_tables(missing, table_path=table_path, **options))
    return {name: tables[name] for name in datasets}


def table_text(table: pd.DataFrame) -> str:
    """A scan table as its file holds it (tab-separated, with the header)."""
    return table.to_csv(sep="\t", index=False)


# --- writing the tables: jobs of the workflow, under the run's lock ---
#
# Snakemake reads the workflow (and so builds every table) before a run takes
# its lock, in dry runs and in refused runs too, so a table is written by the
# workflow's scan_table job only. Its content is known at parse time; the job's
# input is a stamp in the working directory (not the results folder) that is
# newer than the table exactly when the table does not hold that content. So a
# changed table is rewritten, and every rule that reads it reruns, from any
# working directory (``-d``), without Snakemake metadata; an unchanged one is
# left alone (its mtime would rerun those rules).


def stamp_scan_table(table_path: str | Path, text: str, stamp_path: str | Path) -> str:
    """Make ``stamp_path`` newer than the table if it does not hold ``text``, older if
    it does; return ``stamp_path``. Called at parse time; writes only the stamp.

    A stamp written anew holds the content's digest and the time, so its checksum
    (which Snakemake records for small inputs) differs from any recorded before.
    """
    table, stamp = Path(table_path), Path(stamp_path)
    if _current_text(table) != text:
        digest = hashlib.sha256(text.encode()).hexdigest()
        write_text(f"{digest} {time.time_ns()}\n", stamp)
        newer = time.time()
        with contextlib.suppress(OSError):  # strictly newer, even on a coarse clock
            newer = max(newer, table.stat().st_mtime + 1)
        os.utime(stamp, (newer, newer))
        return str(stamp)
    older = table.stat().st_mtime - 1
    try:
        if stamp.stat().st_mtime <= older:
            return str(stamp)
    except FileNotFoundError:
        write_text("current\n", stamp)
    os.utime(stamp, (older, older))
    return str(stamp)


def write_scan_table(text: str, table_path: str | Path) -> None:
    """The table as read at parse time, written whole (atomically) if it changed.

    The scan_table job calls it, and so does the run's ``onstart``, under the
    lock, before any job: ``snakemake --touch`` touches the job's outputs
    without running it, and would leave a table its readers were marked
    up to date against.
    """
    if _current_text(table_path) != text:
        write_text(text, table_path)


def _current_text(path: str | Path) -> str | None:
    """What a table file holds now; None if it is missing or cannot be read."""
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return None


# Paths, ids and line numbers vary from scan to scan; a reason's kind is what is left.
_KIND_SUBS = [
    (re.compile(r"^subject \S+: "), ""),
    (re.compile(r"\S*/\S*"), "…"),
    (re.compile(r"^…(?: line \d+)?: "), ""),
    (re.compile(r"\b(sub|ses|run|acq|rec|ce|echo|part)-[A-Za-z0-9]+"), r"\1-*"),
    (re.compile(r"\bline \d+"), "line *"),
    (re.compile(r"'[^']*'"), "'…'"),
    (re.compile(r"\bread as [0-9.]+"), "read as …"),
]


def reason_kind(reason: str) -> str:
    """A reason without its paths, ids and line numbers, for counting alike ones."""
    for pattern, repl in _KIND_SUBS:
        reason = pattern.sub(repl, reason)
    return reason


def summary_lines(
    name: str, table: pd.DataFrame, roles: Iterable[str] = (), table_path=None
) -> list[str]:
    """One line per dataset (taken, skipped, excluded) and its commonest reasons."""
    counts = Counter(table["status"])
    line = (
        f"medtx: dataset {name!r}: {counts['ok']} taken, {counts['skipped']} skipped, "
        f"{counts['excluded']} excluded"
    )
    ok = table[table["status"] == "ok"]
    labels = [c for c in TASK_LABELS.values() if c in ok.columns]  # the only keys read
    for task, n in missing_counts(ok[labels].to_dict("records"), roles).items():
        line += f"; {n} without {TASK_LABELS[task]} (left out of {task})"
    reasons = Counter(
        (status, reason_kind(reason))
        for status, reason in zip(table["status"], table["reason"])
        if reason
    )
    lines = [line] + [
        f"medtx:   {n} {NOTED if status == 'ok' else status}: {kind}"
        for (status, kind), n in reasons.most_common(MAX_REASON_LINES)
    ]
    if len(reasons) > MAX_REASON_LINES:
        where = f" in {table_path}" if table_path else ""
        lines.append(f"medtx:   and {len(reasons) - MAX_REASON_LINES} more reason(s){where}")
    return lines


def _load_cache(cache_path) -> dict[str, tuple[str, str]]:
    """image path -> (signature, problem or '') from a previous table."""
    if not cache_path or not Path(cache_path).exists():
        return {}
    old = pd.read_csv(cache_path, sep="\t", dtype=str, keep_default_na=False)
    cache = {}
    columns = [c for c in ("status", "signature", *IMAGES) if c in old.columns]
    for values in zip(*(old[c] for c in columns)):  # str columns: no per-value boxing
        rec = dict(zip(columns, values))
        sigs = rec.get("signature", "").split(";") if rec.get("signature") else []
        images = [rec[m] for m in IMAGES if rec.get(m)]
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
    """The scans the tables left out, with their reasons (for the report).

    Skipped images are not scans (the config did not select them), so they are
    not listed here; the scan tables and the parse-time summary show them.
    """
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
