"""Label values, checked once when a dataset is read (before any job runs).

The fold step used to find a diagnosis missing from ``label_map`` or an age of
``seventy`` only after all preprocessing; now every label of every scan is
checked when the scan table is built, and every problem is listed with its file
and row. The fold step uses the same parsers (``class_index``, ``parse_age``),
so the rules live here only.

What a label may be:

* ``diagnosis``: a key of ``folds/label_map``, for datasets with the
  ``classification`` role (elsewhere it is free text that nothing reads).
* ``age``: a number of years in ``AGE_RANGE`` (0-120, inclusive). De-identified
  tables cap ages (``89+``: HIPAA's rule for ages over 89) or give bands (``35-40``); a
  cap reads as its bound, a band as its midpoint, and the scan table keeps that
  number with a note in the row's ``reason``. Where no task of the dataset reads
  age (no ``regression`` role), an age that is still no number is left empty
  with a note instead of stopping the run.
* ``sex``: one of ``SEX_CODES`` (BIDS' participants.tsv levels, any case).
* ``site``: free text.

A missing label (empty, ``n/a``, ``NA``, ``nan``) is not an error: the scan is
preprocessed and pre-trained on, and the fold step leaves it out of the task
that needs that label (with the reason in the manifest's sidecar). A dataset
whose task label is missing on every scan is an error here, since its task
could not train. Bad labels stop the run whatever ``on_bad_scan`` says: they
are typos in a table the user owns, not scans that cannot be read.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from medtx.errors import MedtxError

LABEL_COLUMNS = ("diagnosis", "age", "sex", "site")
MISSING = ("", "n/a", "na", "nan")  # compared lower-case
AGE_RANGE = (0.0, 120.0)
# BIDS participants.tsv: male/m, female/f, other/o in any case.
SEX_CODES = {"m": "male", "male": "male", "f": "female", "female": "female"}
SEX_CODES |= {"o": "other", "other": "other"}
# Which label each task trains on.
TASK_LABELS = {"classification": "diagnosis", "regression": "age"}
_NUMBER = r"(\d+(?:\.\d+)?)"
AGE_CAP = re.compile(rf"^{_NUMBER}\s*\+$")  # 89+
AGE_BAND = re.compile(rf"^{_NUMBER}\s*[-\u2013]\s*{_NUMBER}$")  # 35-40, 35–40


class LabelError(MedtxError):
    """A label value that is not allowed; the message says which and why."""


def label_text(value: Any) -> str | None:
    """A label cell as stripped text, or None when it is missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return None if text.lower() in MISSING else text


def class_index(diagnosis: str, label_map: Mapping[str, int]) -> int:
    """The class of a diagnosis; LabelError when ``label_map`` lacks it."""
    if diagnosis not in label_map:
        raise LabelError(
            f"diagnosis {diagnosis!r} is not in the label map ({', '.join(label_map)})"
        )
    return int(label_map[diagnosis])


def read_age(text: str) -> tuple[float, str | None]:
    """An age in years and, for a cap (``89+``) or a band (``35-40``), how it was read.

    LabelError unless a number, cap or band within ``AGE_RANGE``.
    """
    note = None
    if cap := AGE_CAP.match(text):
        age = float(cap[1])
        note = f"age {text!r} read as {age:g}, its lower bound"
    elif band := AGE_BAND.match(text):
        lo_, hi_ = float(band[1]), float(band[2])
        if hi_ < lo_:
            raise LabelError(f"age {text!r} is a range whose end is below its start")
        age = (lo_ + hi_) / 2
        note = f"age {text!r} read as {age:g}, its midpoint"
    else:
        try:
            age = float(text)
        except ValueError:
            age = math.nan
    if not math.isfinite(age):
        raise LabelError(f"age {text!r} is not a number")
    lo, hi = AGE_RANGE
    if not lo <= age <= hi:
        raise LabelError(f"age {text!r} is outside {lo:g}-{hi:g} years")
    return age, note


def parse_age(text: str) -> float:
    """An age in years (``read_age``); LabelError unless within ``AGE_RANGE``."""
    return read_age(text)[0]


def read_labels(cells: Mapping[str, Any], where: str) -> tuple[dict[str, str | None], str]:
    """The label columns of one table row, and a note on any age read from a cap or band.

    A capped or banded age becomes the number it is read as, so every later step
    (folds, subgroups, predict) reads a plain number; the note (``where``: the
    file and line) goes to the row's ``reason``. Other text is kept as written
    for ``check_labels`` to judge.
    """
    labels = {k: label_text(cells.get(k)) for k in LABEL_COLUMNS}
    text = labels["age"]
    if text is None:
        return labels, ""
    try:
        age, note = read_age(text)
    except LabelError:
        return labels, ""
    if note is None:
        return labels, ""
    labels["age"] = f"{age:g}"
    return labels, f"{where}: {note}"


def clear_unused_ages(rows: Iterable[dict], roles: Iterable[str], dataset: str) -> None:
    """Empty each unreadable age where no task of the dataset reads age, with a note.

    A dataset only pre-trained on (or classified) does not need its ages; one
    written ``adult`` or ``>89`` should not stop it. Regression keeps the check.
    """
    if "age" in {TASK_LABELS.get(role) for role in roles}:
        return
    for row in rows:
        text = label_text(row.get("age"))
        if text is None:
            continue
        try:
            parse_age(text)
        except LabelError as err:
            row["age"] = None
            where = row.get("_where") or f"dataset {dataset!r} scan {row.get('scan')!r}"
            note = f"{where}: {err}; left empty (no task of dataset {dataset!r} reads age)"
            row["reason"] = "; ".join(r for r in (row.get("reason"), note) if r)


def check_sex(text: str) -> str:
    """The BIDS level (male, female, other) of a sex code; LabelError otherwise."""
    code = SEX_CODES.get(text.lower())
    if code is None:
        raise LabelError(f"sex {text!r} is not one of {', '.join(SEX_CODES)} (any case)")
    return code


def row_problems(row: Mapping[str, Any], roles: Iterable[str], label_map: Mapping[str, int]):
    """The label problems of one scan row, each without its location."""
    checks = [("age", parse_age), ("sex", check_sex)]
    if "classification" in roles:
        checks.insert(0, ("diagnosis", lambda text: class_index(text, label_map)))
    problems = []
    for column, check in checks:
        text = label_text(row.get(column))
        if text is None:
            continue
        try:
            check(text)
        except LabelError as err:
            problems.append(str(err))
    return problems


def check_labels(
    rows: list[dict],
    *,
    dataset: str,
    roles: Iterable[str],
    label_map: Mapping[str, int],
    source: str,
    also: Iterable[dict] = (),
) -> list[str]:
    """Every label problem of a dataset's rows, one line each with file and row.

    Args:
        rows: the usable scan rows; ``row["_where"]`` names the file and line the
            labels came from.
        roles: the dataset's roles (the diagnosis is checked for classification).
        source: where the labels come from, for a task label missing everywhere.
        also: more rows whose labels are checked (rows with other problems, so a
            run that stops lists everything at once).
    """
    roles = list(roles)
    problems: list[str] = []
    for row in [*rows, *also]:
        where = row.get("_where") or f"dataset {dataset!r} scan {row.get('scan')!r}"
        problems += [f"{where}: {p}" for p in row_problems(row, roles, label_map)]
    for task, column in TASK_LABELS.items():
        if task in roles and rows and all(label_text(r.get(column)) is None for r in rows):
            problems.append(
                f"{source}: dataset {dataset!r} has the {task} role but no scan has "
                f"a label in column {column!r}"
            )
    return list(dict.fromkeys(problems))  # a subject's sessions share one row


def missing_counts(rows: list[dict], roles: Iterable[str]) -> dict[str, int]:
    """task -> how many usable rows lack its label (they sit out that task)."""
    roles = list(roles)
    return {
        task: n
        for task, column in TASK_LABELS.items()
        if task in roles and (n := sum(label_text(r.get(column)) is None for r in rows))
    }
