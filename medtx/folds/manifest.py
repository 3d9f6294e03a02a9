"""Subject-level, stratified, seeded fold manifests (the firewall is ``firewall.py``).

The module is long because grouping, stratification, QC gating, overrides and the
nested label fractions all decide one manifest together, and the measurements
below are the reasons for its defaults.

``make_manifest`` turns one dataset's scan table into a manifest: one row per
usable scan with its preprocessed path, label, fold, and for every fold k
the scan's role (``role_k``: train/val/test) and the smallest label fraction
that holds it (``frac_k``). Run k tests on fold k, validates on fold
(k + 1) % n and trains on the rest, so each fold is test once and validation
once. All sessions of a subject share one fold, so no person is in two splits.
Scans that were excluded as bad input, failed QC or lack a label are left out
and listed with the reason in the sidecar JSON; an overrides file can
force-include a QC-failed scan or force-exclude any scan. The sidecar records
the seed, the scikit-learn version and a sha256 of the subject list, so a
trained model names exactly which subjects it saw.

Fold assignment (``method``):

* ``"hash"`` (default): within each stratum (diagnosis, age bin, or one
  stratum for segmentation) subjects are ordered by sha256 of
  ``"<seed>:fold:<subject>"`` and cut into ``n_folds`` contiguous blocks whose
  sizes differ by at most one (block j starts at rank ceil(j * m / n_folds));
  block j goes to fold (j + offset) % n_folds, the offset spreading each
  stratum's larger blocks over different folds. A subject's fold depends only
  on its rank within its stratum, so adding a subject moves at most
  ``n_folds - 1`` others (the ones that sit at block boundaries).
* ``"sklearn"``: scikit-learn's ``StratifiedGroupKFold(n_folds, shuffle=True,
  random_state=seed)`` on one row per subject (sorted by id, label = first
  session's), as the issue asked. Its shuffle permutes the whole cohort, so
  one added subject reshuffles almost every fold.

Measured stability (``bench/folds.py``; 60 subjects, 20 each CN/MCI/AD,
5 folds, one subject of a random class added, 200 seeds; "moved" = existing
subjects whose fold index changed; in brackets, after the best relabelling of
the new folds onto the old ones, which forgives a mere renaming of folds):

* ``sklearn``: mean 78.6% moved (max 90.0%) [relabelled: mean 67.0%, max
  73.3%]: no better than a fresh random split (80%). This is why it is not the
  default.
* ``hash``: mean 2.8% moved (max 6.7% = 4 of 60 = n_folds - 1) [relabelled:
  the same]; nobody moved in 30.5% of cases.

Regression (same cohort, ages uniform in 55-90): with fixed ``age_bins``
([67, 78]) ``hash`` moves mean 2.9% (max 6.7%); with the default quantile bins
the edges shift a little when a subject is added and a subject near an edge
changes stratum, so ``hash`` moves mean 10.2% (max 26.7%). ``sklearn`` moves
79% either way. Pin ``age_bins`` (the sidecar records the ones used) for a
cohort that will grow.

Balance: with ``hash`` each fold holds floor or ceil of m / n_folds subjects of
every stratum of size m, so per-fold class counts are within one subject of the
overall proportion; fold sizes differ by at most the number of strata. Measured
over 48 synthetic CN/MCI/AD cohorts of 30-79 subjects: per-fold class counts
at most 0.81 subject from n_k * p and fold sizes at most 2 apart, for both
methods. The offsets follow the strata's sorted order, so a class that is new
to the cohort (or a change in the number of default age bins) reshuffles.

Label fractions: for each fold the training subjects are put in a seeded
stratified order (a seeded hash order within each stratum, interleaved so that
every prefix keeps each stratum within one subject of its quota) and the p%
subset is the first ceil(p / 100 * N) of them (at least one). Hence
10% ⊂ 30% ⊂ ... ⊂ 100% = the whole training set.

"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medtx.data.labels import TASK_LABELS, LabelError, class_index, parse_age
from medtx.domain import DEFAULT_LABEL_MAP, FRACTIONS, TASKS
from medtx.errors import CohortError, MedtxError
from medtx.io import write_json, write_text

METHODS = ("hash", "sklearn")
MAX_AGE_BINS = 5
OVERRIDE_ACTIONS = ("include", "exclude")
BASE_COLUMNS = ["dataset", "subject", "session", "scan", "path", "label", "fold", "override"]


# --- small helpers ---


def cell_text(value: Any) -> str:
    """A table cell as text: None and NaN become ''."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def _hash(seed: int, salt: str, key: str) -> str:
    return hashlib.sha256(f"{seed}:{salt}:{key}".encode()).hexdigest()


def _ceil_pct(pct: int, n: int) -> int:
    """ceil(pct / 100 * n) in integers, at least 1."""
    return max(1, -(-pct * n // 100))


def subjects_sha256(subjects: Iterable[str]) -> str:
    """sha256 of the sorted, newline-joined unique subject ids."""
    return hashlib.sha256("\n".join(sorted(set(subjects))).encode()).hexdigest()


# --- inputs: QC records and the overrides file ---


def load_qc(
    records: Iterable[str | Path | Mapping[str, Any]], *, dataset: str | None = None
) -> dict[str, tuple[bool, str]]:
    """scan -> (QC passed, failures) from per-scan provenance JSONs.

    Args:
        records: provenance JSON paths or already-loaded records.
        dataset: keep only records of this dataset (scan ids repeat across datasets).
    """
    import json

    out: dict[str, tuple[bool, str]] = {}
    for item in records:
        if isinstance(item, Mapping):
            rec, where = item, "record"
        else:
            where = str(item)
            try:
                rec = json.loads(Path(item).read_text())
            except (OSError, ValueError) as err:
                raise MedtxError(f"{where}: cannot read provenance record ({err})") from err
        if "scan" not in rec or "qc_passed" not in rec:
            raise MedtxError(f"{where}: provenance record has no 'scan' or 'qc_passed' key")
        if dataset is not None and rec.get("dataset") not in (None, dataset):
            continue
        failures = rec.get("qc_failures") or []
        out[str(rec["scan"])] = (bool(rec["qc_passed"]), "; ".join(map(str, failures)))
    return out


def load_overrides(
    path: str | Path, *, reasons: bool = False
) -> dict[str, str] | dict[str, tuple[str, str]]:
    """Read a user's QC overrides: a TSV with columns scan, action, reason.

    ``action`` is ``include`` (use a scan that failed QC) or ``exclude`` (drop
    any scan). A scan may be written ``dataset:scan`` to apply to one dataset
    only. Returns scan -> action, or scan -> (action, reason) with ``reasons``.

    Raises:
        CohortError: naming the file and line of every bad row.
        MedtxError: for a missing file or a missing column.
    """
    path = Path(path)
    if not path.is_file():
        raise MedtxError(f"overrides file {path} does not exist")
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError as err:
        raise MedtxError(
            f"{path}: empty overrides file (expected columns scan, action, reason)"
        ) from err
    missing = [c for c in ("scan", "action") if c not in table.columns]
    if missing:
        raise MedtxError(
            f"{path}: missing column(s) {', '.join(map(repr, missing))} "
            f"(found {list(table.columns)}; expected scan, action, reason)"
        )
    out: dict[str, tuple[str, str]] = {}
    first_line: dict[str, int] = {}
    problems = []
    for line, rec in enumerate(table.to_dict("records"), start=2):  # line 1 is the header
        scan, action = rec["scan"].strip(), rec["action"].strip().lower()
        reason = rec.get("reason", "").strip()
        where = f"{path} line {line}"
        if not scan:
            problems.append(f"{where}: empty scan")
        elif action not in OVERRIDE_ACTIONS:
            problems.append(
                f"{where}: action {rec['action']!r} for scan {scan!r} must be "
                f"one of {', '.join(OVERRIDE_ACTIONS)}"
            )
        elif scan in out and out[scan][0] != action:
            problems.append(
                f"{where}: scan {scan!r} is set to {action!r} here but to "
                f"{out[scan][0]!r} on line {first_line[scan]}"
            )
        else:
            out.setdefault(scan, (action, reason))
            first_line.setdefault(scan, line)
    if problems:
        raise CohortError(problems, what=f"overrides file {path}")
    return out if reasons else {scan: action for scan, (action, _) in out.items()}


def _overrides_for(
    overrides: Mapping[str, Any] | None, dataset: str, scans: set[str]
) -> dict[str, tuple[str, str]]:
    """Overrides that apply to ``dataset``: bare scan ids, or ``dataset:scan``."""
    out: dict[str, tuple[str, str]] = {}
    problems = []
    for key, value in (overrides or {}).items():
        action, reason = (value, "") if isinstance(value, str) else (value[0], value[1])
        action = str(action).strip().lower()
        prefix, sep, scan = str(key).rpartition(":")
        if sep and prefix != dataset:
            continue
        if action not in OVERRIDE_ACTIONS:
            problems.append(
                f"override for scan {key!r}: action {action!r} must be "
                f"one of {', '.join(OVERRIDE_ACTIONS)}"
            )
            continue
        if sep and scan not in scans:
            problems.append(f"override {key!r}: dataset {dataset!r} has no scan {scan!r}")
            continue
        if scan in scans and (scan not in out or sep):  # dataset:scan beats a bare scan
            out[scan] = (action, str(reason))
    if problems:
        raise CohortError(problems, what=f"overrides for dataset {dataset!r}")
    return out


# --- strata ---


def _label_of(
    task: str, rec: dict, label_map: Mapping[str, int], dataset: str
) -> tuple[Any, str | None, str | None]:
    """(label, reason to exclude, error) for one scan row.

    The scan table already checked every label when the dataset was read; the
    same parsers (``medtx.data.labels``) guard a table written some other way.
    """
    column = TASK_LABELS.get(task)
    if column is None:
        return "", None, None
    text = cell_text(rec.get(column))
    if not text:
        return None, f"missing {column} label", None
    try:
        label = class_index(text, label_map) if task == "classification" else parse_age(text)
    except LabelError as err:
        who = f"dataset {dataset!r} subject {cell_text(rec.get('subject'))!r} scan {rec['scan']!r}"
        return None, None, f"{who}: {err}"
    return label, None, None


def _bin_name(edges: list[float], b: int) -> str:
    lo = edges[b - 1] if b > 0 else -math.inf
    hi = edges[b] if b < len(edges) else math.inf
    return f"[{lo:g}, {hi:g})"


def age_strata(
    ages: Mapping[str, float],
    n_folds: int,
    age_bins: Sequence[float] | None = None,
    *,
    dataset: str = "?",
) -> tuple[list[float], dict[str, int]]:
    """Age bin of each subject, and the interior bin edges used.

    Bins are [-inf, e0), [e0, e1), ..., [e_last, inf). Without ``age_bins`` the
    edges are quantiles, as many bins as possible up to ``MAX_AGE_BINS`` with
    each holding at least ``n_folds`` subjects (fewest 2), so each fold gets
    some of every age range.
    """
    subjects = sorted(ages)
    values = np.array([ages[s] for s in subjects], dtype=float)

    def assign(edges: list[float]) -> dict[str, int]:
        return {s: int(b) for s, b in zip(subjects, np.searchsorted(edges, values, side="right"))}

    def small_bins(edges: list[float], bins: dict[str, int]) -> list[str]:
        counts = pd.Series(bins).value_counts()
        return [
            f"age bin {_bin_name(edges, b)} has {c} subjects, {n_folds} folds need ≥ {n_folds}"
            for b, c in sorted(counts.items())
            if c < n_folds
        ]

    if age_bins is not None:
        edges = sorted(float(e) for e in age_bins)
        bins = assign(edges)
        small = small_bins(edges, bins)
        if small:
            raise CohortError(
                [f"too few to stratify: {p}" for p in small], what=f"dataset {dataset!r} age bins"
            )
        return edges, bins
    for n_bins in range(min(MAX_AGE_BINS, len(values) // n_folds), 1, -1):
        qs = np.quantile(values, np.linspace(0, 1, n_bins + 1)[1:-1])
        edges = sorted({round(float(q), 2) for q in qs})
        bins = assign(edges)
        if len(set(bins.values())) >= 2 and not small_bins(edges, bins):
            return edges, bins
    raise CohortError(
        [
            f"too few to stratify by age: {len(values)} subjects in "
            f"{len(set(values.tolist()))} distinct ages cannot fill 2 age bins of "
            f"≥ {n_folds} subjects ({n_folds} folds); give fewer folds or age_bins"
        ],
        what=f"dataset {dataset!r}",
    )


# --- fold assignment ---


def hash_folds(strata: Mapping[str, Any], n_folds: int, seed: int) -> dict[str, int]:
    """Stratified subject -> fold by contiguous blocks of a seeded hash order.

    Stable: a subject's fold depends only on its rank in its stratum, so one
    added subject moves at most ``n_folds - 1`` others.
    """
    names = sorted(set(strata.values()))
    base = int(_hash(seed, "offset", ""), 16) % n_folds
    folds = {}
    for i, name in enumerate(names):
        members = sorted(
            (s for s in strata if strata[s] == name), key=lambda s: (_hash(seed, "fold", s), s)
        )
        offset = base + (i * n_folds) // len(names)
        m = len(members)
        for rank, subject in enumerate(members):
            folds[subject] = (rank * n_folds // m + offset) % n_folds
    return folds


def sklearn_folds(strata: Mapping[str, Any], n_folds: int, seed: int) -> dict[str, int]:
    """Stratified subject -> fold with scikit-learn's StratifiedGroupKFold."""
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    subjects = sorted(strata)
    codes = {name: i for i, name in enumerate(sorted(set(strata.values())))}
    y = np.array([codes[strata[s]] for s in subjects])
    cv = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = {}
    with warnings.catch_warnings():  # class sizes are checked before, with clearer messages
        warnings.simplefilter("ignore", UserWarning)
        splits = cv.split(np.zeros(len(subjects)), y, groups=np.arange(len(subjects)))
        for k, (_, test) in enumerate(splits):
            for i in test:
                folds[subjects[i]] = k
    return folds


def fraction_order(subjects: Iterable[str], strata: Mapping[str, Any], seed: int) -> list[str]:
    """Seeded order whose every prefix keeps each stratum within one of its quota.

    Within a stratum subjects follow a seeded hash; strata are interleaved by
    taking, at each step, the stratum furthest behind its proportional share.
    """
    by: dict[Any, list[str]] = {}
    for s in subjects:
        by.setdefault(strata[s], []).append(s)
    keys = sorted(by)
    for k in keys:
        by[k].sort(key=lambda s: (_hash(seed, "fraction", s), s))
    total = sum(len(v) for v in by.values())
    taken = dict.fromkeys(keys, 0)
    order = []
    for t in range(total):
        open_keys = [k for k in keys if taken[k] < len(by[k])]
        # deficit * total, in integers: (t + 1) * m_k - taken_k * total
        best = max(
            open_keys,
            key=lambda k: ((t + 1) * len(by[k]) - taken[k] * total, len(by[k]), -keys.index(k)),
        )
        order.append(by[best][taken[best]])
        taken[best] += 1
    return order


# --- the manifest ---


def _check_args(task: str, n_folds: int, fractions: Sequence[int], method: str) -> list[int]:
    if task not in TASKS:
        raise MedtxError(f"task {task!r} is not one of {', '.join(TASKS)}")
    if method not in METHODS:
        raise MedtxError(f"fold method {method!r} is not one of {', '.join(METHODS)}")
    if not isinstance(n_folds, (int, np.integer)) or n_folds < 3:
        raise MedtxError(
            f"n_folds must be an integer ≥ 3 (a test, a validation and at least one "
            f"training fold), not {n_folds!r}"
        )
    fracs = sorted({int(p) for p in fractions} | {100})
    if any(p < 1 or p > 100 for p in fracs):
        raise MedtxError(f"fractions must be percentages in 1..100, not {list(fractions)}")
    return fracs


def make_manifest(
    table: pd.DataFrame,
    *,
    dataset: str,
    task: str,
    n_folds: int = 5,
    seed: int = 42,
    paths: Mapping[str, str],
    label_map: Mapping[str, int] | None = None,
    age_bins: Sequence[float] | None = None,
    fractions: Sequence[int] = FRACTIONS,
    qc: Mapping[str, tuple[bool, str]] | None = None,
    overrides: Mapping[str, Any] | None = None,
    method: str = "hash",
) -> tuple[pd.DataFrame, dict]:
    """Build one dataset's fold manifest and its sidecar.

    Args:
        table: the scan table (``medtx.data.scans``), all columns text.
        dataset: which dataset of the table to split.
        task: ``classification`` (label = diagnosis through ``label_map``),
            ``regression`` (label = age) or ``segmentation`` (no label).
        n_folds: folds; run k tests on fold k, validates on k + 1.
        seed: seeds the split and the fraction order.
        paths: scan -> preprocessed image, for every scan that is kept.
        label_map: diagnosis -> class index (default CN/MCI/AD -> 0/1/2).
        age_bins: age bin edges for regression (default: quantile bins).
        fractions: label fractions in percent; 100 is always added.
        qc: this dataset's scan -> (passed, failures), e.g. from
            ``load_qc(records, dataset=dataset)``; a scan not listed passed.
        overrides: scan (or ``dataset:scan``) -> ``include``/``exclude``, or
            -> (action, reason), as ``load_overrides`` returns.
        method: ``hash`` (stable, default) or ``sklearn`` (StratifiedGroupKFold).

    Returns:
        (manifest, sidecar). Same inputs give the same manifest, row for row.

    Raises:
        MedtxError, CohortError: bad labels or too few subjects to split,
            naming the dataset, subject and value.

    Example:
        manifest, sidecar = make_manifest(table, dataset="adni", task="classification",
                                          paths=paths, qc=load_qc(records, dataset="adni"))
        write_manifest(manifest, sidecar, "folds/adni.tsv", "folds/adni.json")
    """
    import sklearn

    fracs = _check_args(task, n_folds, fractions, method)
    label_map = {str(k): int(v) for k, v in (label_map or DEFAULT_LABEL_MAP).items()}
    kept, exclusions, applied = _select_scans(table, dataset, task, label_map, qc or {}, overrides)
    no_path = [r["scan"] for r in kept if not cell_text(paths.get(r["scan"]))]
    if no_path:
        raise MedtxError(
            f"dataset {dataset!r}: no preprocessed path for scan(s) "
            f"{', '.join(no_path[:10])}" + (" ..." if len(no_path) > 10 else "")
        )
    first: dict[str, dict] = {}  # a subject's stratum comes from its first session
    for rec in kept:
        first.setdefault(rec["subject"], rec)
    subjects = sorted(first)
    strata, names, extra = _stratify(first, dataset, task, n_folds, label_map, age_bins)
    fold_of = (hash_folds if method == "hash" else sklearn_folds)(strata, n_folds, seed)

    role, frac, frac_counts = _roles_and_fractions(subjects, fold_of, strata, n_folds, fracs, seed)
    out = []
    for rec in kept:
        s = rec["subject"]
        row = {
            "dataset": dataset,
            "subject": s,
            "session": rec["session"],
            "scan": rec["scan"],
            "path": cell_text(paths[rec["scan"]]),
            "label": rec["label"],
            "fold": fold_of[s],
            "override": rec["override"],
        }
        for k in range(n_folds):
            row[f"role_{k}"], row[f"frac_{k}"] = role[s, k], frac[s, k]
        out.append(row)
    columns = BASE_COLUMNS + [c for k in range(n_folds) for c in (f"role_{k}", f"frac_{k}")]
    manifest = pd.DataFrame(out, columns=columns)
    folds_info = _folds_info(manifest, first, fold_of, strata, names, task, frac_counts)
    sidecar = {
        "dataset": dataset,
        "task": task,
        "method": method,
        "n_folds": int(n_folds),
        "seed": int(seed),
        "sklearn_version": sklearn.__version__,
        "subjects_sha256": subjects_sha256(subjects),
        "n_subjects": len(subjects),
        "n_scans": len(manifest),
        "roles": "role_k: test = fold k, val = fold (k + 1) % n_folds, train = the rest",
        "folds": folds_info,
        "fractions": fracs,
        "exclusions": exclusions,
        "overrides": applied,
        **extra,
    }
    return manifest, sidecar


def _roles_and_fractions(
    subjects: Sequence[str],
    fold_of: Mapping[str, int],
    strata: Mapping[str, Any],
    n_folds: int,
    fracs: Sequence[int],
    seed: int,
) -> tuple[dict[tuple[str, int], str], dict[tuple[str, int], Any], list[dict[str, int]]]:
    """Each subject's role in each run k (test: fold k, val: fold k + 1, train: the
    rest), the smallest label fraction that holds it there, and each run's counts."""
    role: dict[tuple[str, int], str] = {}
    frac: dict[tuple[str, int], Any] = {}
    frac_counts = []
    for k in range(n_folds):
        val_fold = (k + 1) % n_folds
        for s in subjects:
            role[s, k] = "test" if fold_of[s] == k else "val" if fold_of[s] == val_fold else "train"
            frac[s, k] = ""
        train = fraction_order([s for s in subjects if role[s, k] == "train"], strata, seed)
        sizes = {p: _ceil_pct(p, len(train)) for p in fracs}
        for rank, s in enumerate(train):
            frac[s, k] = next(p for p in fracs if rank < sizes[p])
        frac_counts.append({str(p): sizes[p] for p in fracs})
    return role, frac, frac_counts


def _folds_info(
    manifest: pd.DataFrame,
    first: Mapping[str, dict],
    fold_of: Mapping[str, int],
    strata: Mapping[str, Any],
    names: Mapping[int, str],
    task: str,
    frac_counts: Sequence[Mapping[str, int]],
) -> list[dict[str, Any]]:
    """The sidecar's per-fold figures: subjects, scans, classes or ages, fractions."""
    subjects = sorted(first)
    folds_info = []
    for k in range(len(frac_counts)):
        members = [s for s in subjects if fold_of[s] == k]
        info: dict[str, Any] = {
            "fold": k,
            "n_subjects": len(members),
            "n_scans": int((manifest["fold"] == k).sum()),
        }
        if task == "classification":
            info["class_counts"] = {names[c]: sum(strata[s] == c for s in members) for c in names}
        elif task == "regression":
            info["age_mean"] = round(float(np.mean([first[s]["label"] for s in members])), 2)
            info["age_bin_counts"] = {names[b]: sum(strata[s] == b for s in members) for b in names}
        info["train_subjects_by_fraction"] = frac_counts[k]
        folds_info.append(info)
    return folds_info


def _dataset_rows(table: pd.DataFrame, dataset: str) -> list[dict]:
    """The dataset's scans (skipped images left out) with text ids, in subject order;
    a usable scan id may appear once."""
    rows = [
        rec
        for rec in table.to_dict("records")
        if cell_text(rec.get("dataset")) == dataset and cell_text(rec.get("status")) != "skipped"
    ]  # a skipped image is no scan: the dataset's select block did not take it
    if not rows:
        raise MedtxError(f"dataset {dataset!r}: no scans in the scan table")
    for rec in rows:
        rec["subject"], rec["session"], rec["scan"] = (
            cell_text(rec.get("subject")),
            cell_text(rec.get("session")),
            cell_text(rec.get("scan")),
        )
    rows.sort(key=lambda r: (r["subject"], r["session"], r["scan"]))
    usable = [r["scan"] for r in rows if cell_text(r.get("status")) in ("", "ok")]
    dup = sorted(scan for scan, c in Counter(usable).items() if c > 1)
    if dup:
        raise MedtxError(f"dataset {dataset!r}: scan id(s) {', '.join(dup)} appear more than once")
    return rows


def _select_scans(
    table: pd.DataFrame,
    dataset: str,
    task: str,
    label_map: Mapping[str, int],
    qc: Mapping[str, tuple[bool, str]],
    overrides: Mapping[str, Any] | None,
) -> tuple[list[dict], list[dict], list[dict]]:
    """(kept rows with label, exclusions, overrides as applied), in subject order.

    Order of judgement: bad input, override exclude, bad label (an error),
    QC failure unless overridden, missing label.
    """
    rows = _dataset_rows(table, dataset)
    ovr = _overrides_for(overrides, dataset, {r["scan"] for r in rows})

    kept, exclusions, applied, errors = [], [], [], []
    n_good, n_unlabelled = 0, 0
    for rec in rows:
        scan = rec["scan"]
        action, why = ovr.get(scan, ("", ""))
        passed, failures = qc.get(scan, (True, ""))
        note, reason, forced, label = None, None, "", None
        if cell_text(rec.get("status")) not in ("", "ok"):
            reason = f"excluded as bad input: {cell_text(rec.get('reason'))}"
            note = "not applied: a bad input cannot be included" if action == "include" else None
        elif action == "exclude":
            reason = "excluded by override" + (f": {why}" if why else "")
        else:
            n_good += 1
            label, missing, error = _label_of(task, rec, label_map, dataset)
            if error:
                errors.append(error)
                continue
            n_unlabelled += bool(missing)
            if not passed and action != "include":
                reason = f"QC failed: {failures or 'no reason recorded'}"
            elif missing:
                reason = missing
                note = f"not applied: {missing}" if action == "include" else None
            elif not passed:
                forced = "include"
            elif action == "include":
                note = "not needed: the scan passed QC"
        if action:
            entry = {
                "scan": scan,
                "subject": rec["subject"],
                "session": rec["session"],
                "action": action,
                "reason": why,
                "applied": note is None,
            }
            if note:
                entry["note"] = note
            applied.append(entry)
        if reason:
            exclusions.append(
                {
                    "scan": scan,
                    "subject": rec["subject"],
                    "session": rec["session"],
                    "reason": reason,
                }
            )
        else:
            kept.append({**rec, "label": label, "override": forced})
    if errors:
        raise CohortError(errors, what=f"dataset {dataset!r} labels")
    if n_unlabelled and n_unlabelled == n_good:
        raise MedtxError(
            f"dataset {dataset!r}: every scan lacks a "
            f"{'diagnosis' if task == 'classification' else 'age'} label "
            f"({n_unlabelled} scans); check the participants table"
        )
    if not kept:
        raise MedtxError(
            f"dataset {dataset!r}: no scan left after exclusions ({len(exclusions)} excluded)"
        )
    return kept, exclusions, applied


def _stratify(
    first: Mapping[str, dict],
    dataset: str,
    task: str,
    n_folds: int,
    label_map: Mapping[str, int],
    age_bins: Sequence[float] | None,
) -> tuple[dict[str, int], dict[int, str], dict[str, Any]]:
    """(subject -> stratum, stratum -> name, sidecar extras), checking sizes first."""
    subjects = sorted(first)
    n = len(subjects)
    where = f"dataset {dataset!r}"
    if n < n_folds:
        raise MedtxError(f"{where}: {n} subjects are fewer than the {n_folds} folds")
    if task == "classification":
        strata = {s: int(first[s]["label"]) for s in subjects}
        counts = Counter(strata.values())
        names = {v: "/".join(d for d in label_map if label_map[d] == v) for v in sorted(counts)}
        if n < len(counts) * n_folds:
            raise MedtxError(
                f"{where}: {n} subjects are too few to stratify {len(counts)} classes "
                f"into {n_folds} folds (need ≥ {len(counts) * n_folds})"
            )
        small = [
            f"too few to stratify: class {names[c]} has {counts[c]} subjects, {n_folds} "
            f"folds need ≥ {n_folds}"
            for c in names
            if counts[c] < n_folds
        ]
        if small:
            raise CohortError(small, what=where)
        return strata, names, {"label_map": dict(label_map)}
    if task == "regression":
        edges, strata = age_strata(
            {s: first[s]["label"] for s in subjects}, n_folds, age_bins, dataset=dataset
        )
        names = {b: _bin_name(edges, b) for b in sorted(set(strata.values()))}
        return strata, names, {"age_bins": edges}
    return dict.fromkeys(subjects, 0), {0: "all"}, {}


def write_manifest(
    manifest: pd.DataFrame, sidecar: Mapping[str, Any], tsv_path: str | Path, json_path: str | Path
) -> None:
    """Write the manifest TSV and its sidecar JSON, each atomically."""
    write_text(manifest.to_csv(sep="\t", index=False), tsv_path)
    write_json(dict(sidecar), json_path)


def read_manifest(path: str | Path) -> pd.DataFrame:
    """A manifest TSV as text columns (empty cells are '')."""
    try:
        return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, pd.errors.EmptyDataError) as err:
        raise MedtxError(f"{path}: cannot read fold manifest ({err})") from err


def moved_subjects(old: pd.DataFrame, new: pd.DataFrame) -> list[str]:
    """Subjects in both manifests whose fold index differs (e.g. after adding one)."""
    a = old.drop_duplicates("subject").set_index("subject")["fold"].astype(int)
    b = new.drop_duplicates("subject").set_index("subject")["fold"].astype(int)
    common = a.index.intersection(b.index)
    return sorted(s for s in common if a[s] != b[s])


def preproc_paths(records: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """scan -> its model input (the last recorded ``preproc`` output) from provenance."""
    paths = {}
    for rec in records:
        outputs = [o for step in rec["steps"] for o in step["outputs"] if o["role"] == "preproc"]
        if outputs:
            paths[rec["scan"]] = outputs[-1]["path"]
    return paths


def manifest_from_files(
    *,
    dataset: str,
    task: str,
    table: str | Path,
    records: Sequence[str | Path],
    params: Mapping[str, Any],
    out_tsv: str | Path,
    out_json: str | Path,
    overrides: str | Path | None = None,
) -> pd.DataFrame:
    """``medtx folds``: one dataset x task manifest, QC-gated, from the scan table and records.

    Args:
        params: the config's ``folds`` section (n_folds, seed, fractions, label_map,
            age_bins, method).
    """
    from medtx.data.scans import read_scan_table
    from medtx.provenance.records import load_scan_records

    loaded = load_scan_records(list(records)) if records else []
    loaded = [r for r in loaded if r.get("dataset") == dataset]
    manifest, sidecar = make_manifest(
        read_scan_table(table),
        dataset=dataset,
        task=task,
        n_folds=params["n_folds"],
        seed=params["seed"],
        paths=preproc_paths(loaded),
        label_map=params.get("label_map"),
        age_bins=params.get("age_bins"),
        fractions=params["fractions"],
        qc=load_qc(loaded, dataset=dataset),
        overrides=load_overrides(overrides, reasons=True) if overrides else None,
        method=params.get("method", "hash"),
    )
    write_manifest(manifest, sidecar, out_tsv, out_json)
    return manifest
