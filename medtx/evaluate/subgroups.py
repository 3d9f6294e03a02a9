"""Subgroup metrics: does a model work as well for every sex, site, age band and diagnosis?

A pooled metric can hide a group the model fails. For every run group (dataset x
task x backbone x init x label fraction, its folds pooled) each task's headline
metric is computed per subgroup of the test scans: sex, site, age band (edges in
the config) and, where it is not the target (regression, segmentation), diagnosis.
The attributes come from the workflow's scan tables, matched on (dataset, scan); a
scan without them, or missing a value, is in the group "unknown", reported like any
other so that nothing silently disappears.

Per group: the metric per fold (mean ± std over folds), pooled over all folds' test
predictions with a bootstrap 95 % confidence interval (percentile; test subjects
resampled with replacement, seeded per run group so the result does not depend on
the order anything is read in), and its gap to the value over all test scans, with
a paired interval from the same resamples, flagged when it excludes 0. The worst
group of each attribute is named. A group of fewer than ``min_group`` distinct test
subjects is reported as too small and never given a number, and a classification
group where a class does not occur as not computable (mAUC needs every class).

Pure pandas / numpy / scikit-learn: no torch.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medtx.domain import REGION_NAMES, TASKS
from medtx.errors import MedtxError
from medtx.evaluate.tables import MISSING, format_mean_std, write_table
from medtx.metrics import mae, mauc

SUBGROUP_DEFAULTS: dict[str, Any] = {
    "age_bands": [60, 70, 80],  # band edges in years: <60, 60–70, 70–80, ≥80
    "min_group": 5,  # fewer distinct test subjects: "too small", no number
    "bootstrap": 1000,  # resamples of the test subjects
    "seed": 42,
}
ATTRIBUTES = ("sex", "site", "age", "diagnosis")  # scan-table columns, in table order
ATTRIBUTE_TITLES = {"sex": "sex", "site": "site", "age": "age band", "diagnosis": "diagnosis"}
UNKNOWN = "unknown"
ALL = "all"
RUN_GROUP = ["dataset", "task", "backbone", "init", "frac"]
MISSING_TEXT = ("", "n/a", "na", "nan", "none")  # an attribute cell that says nothing
CI_LEVEL = 95.0
NOT_COMPUTABLE_CLASSES = "not computable: classes missing"


@dataclass(frozen=True)
class TaskMetric:
    """The metric a task's subgroups are compared on."""

    label: str
    digits: int
    higher_is_better: bool


METRICS = {
    "classification": TaskMetric("mAUC", 3, True),
    "regression": TaskMetric("MAE (years)", 2, False),
    "segmentation": TaskMetric("Dice (mean of WT, TC, ET)", 3, True),
}

# The written table's columns; the metric's name goes in the column titles.
IDENTITY_COLUMNS = ["dataset", "backbone", "init", "label fraction (%)", "attribute", "group"]
NUMBER_COLUMNS = [
    "n subjects",
    "folds",
    "mean ± std over folds",
    "pooled",
    "95 % CI",
    "gap to all",
    "gap 95 % CI",
]
TABLE_COLUMNS = [*IDENTITY_COLUMNS, *NUMBER_COLUMNS, "flag", "note"]
# Kept beside them for the plot (NaN wherever no number may be shown); not written.
INTERNAL_COLUMNS = ["task", "metric", "status", "value", "ci_low", "ci_high"]


# ---------------------------------------------------------------------------- settings


def subgroup_settings(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``SUBGROUP_DEFAULTS`` updated with ``config``, checked; MedtxError naming a bad key."""
    given = dict(config or {})
    unknown = sorted(set(given) - set(SUBGROUP_DEFAULTS))
    if unknown:
        raise MedtxError(
            f"subgroup settings: unknown key(s) {unknown} (known: {list(SUBGROUP_DEFAULTS)})"
        )
    out = {**SUBGROUP_DEFAULTS, **given}
    bands = out["age_bands"]
    if not isinstance(bands, (list, tuple)) or not all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) for b in bands
    ):
        raise MedtxError(f"subgroup settings: age_bands must be a list of numbers, not {bands!r}")
    if any(b >= c for b, c in zip(bands, bands[1:])):
        raise MedtxError(f"subgroup settings: age_bands must increase, not {list(bands)}")
    for key, least in (("min_group", 1), ("bootstrap", 1), ("seed", 0)):
        v = out[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < least:
            raise MedtxError(f"subgroup settings: {key} must be an integer ≥ {least}, not {v!r}")
    out["age_bands"] = list(bands)
    return out


# ---------------------------------------------------------------------------- groups


def _edge(x: float) -> str:
    return f"{x:g}"


def age_band_labels(age_bands: Sequence[float]) -> list[str]:
    """The bands' labels in order: "age <60", "age 60–70", ..., "age ≥80"."""
    edges = list(age_bands)
    if not edges:
        return ["age (any)"]
    labels = [f"age <{_edge(edges[0])}"]
    labels += [f"age {_edge(a)}–{_edge(b)}" for a, b in zip(edges, edges[1:])]
    return labels + [f"age ≥{_edge(edges[-1])}"]


def _age_band(value: Any, age_bands: Sequence[float]) -> str:
    """A band: lower edge included, upper excluded (60 is in "age 60–70")."""
    try:
        age = float(value)
    except (TypeError, ValueError):
        return UNKNOWN
    if not math.isfinite(age):
        return UNKNOWN
    return age_band_labels(age_bands)[int(np.searchsorted(np.asarray(age_bands), age, "right"))]


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return UNKNOWN
    text = str(value).strip()
    return UNKNOWN if text.lower() in MISSING_TEXT else text


def attributes_of(task: str) -> tuple[str, ...]:
    """The subgroup attributes of ``task``: diagnosis only where it is not the target."""
    return tuple(a for a in ATTRIBUTES if not (a == "diagnosis" and task == "classification"))


def group_labels(attributes: pd.DataFrame, task: str, age_bands: Sequence[float]) -> pd.DataFrame:
    """Each scan's group per attribute of ``task`` (same index as ``attributes``).

    Columns: sex, site, age (its band's label), diagnosis (not for classification,
    whose target it is). A missing column or value is "unknown".
    """
    out = pd.DataFrame(index=attributes.index)
    for attr in attributes_of(task):
        values = attributes[attr] if attr in attributes.columns else [None] * len(attributes)
        if attr == "age":
            out[attr] = [_age_band(_text(v), age_bands) for v in values]
        else:
            out[attr] = [_text(v) for v in values]
    return out


def _group_order(attr: str, values: Sequence[str], age_bands: Sequence[float]) -> list[str]:
    """Age bands in age order, other values alphabetically; "unknown" last."""
    present = set(values)
    known = sorted(present - {UNKNOWN})
    if attr == "age":
        known = [b for b in age_band_labels(age_bands) if b in present]
    return known + ([UNKNOWN] if UNKNOWN in present else [])


# ---------------------------------------------------------------------------- metrics


def _prediction_columns(task: str, table: pd.DataFrame) -> list[str]:
    if task == "classification":
        return sorted((c for c in table.columns if c.startswith("p_")), key=lambda c: int(c[2:]))
    if task == "regression":
        return ["prediction"]
    return [f"dice_{r}" for r in REGION_NAMES]


@dataclass(frozen=True)
class _Data:
    """A task's metric inputs for some prediction rows (numpy, one entry per row)."""

    task: str
    y: np.ndarray  # classification: labels 0..K-1; regression: absolute errors
    probs: np.ndarray | None = None  # classification: (n, K)
    per_case: np.ndarray | None = None  # segmentation: mean Dice of the regions

    def take(self, mask: np.ndarray) -> _Data:
        return _Data(
            self.task,
            self.y[mask],
            None if self.probs is None else self.probs[mask],
            None if self.per_case is None else self.per_case[mask],
        )


def _data(task: str, table: pd.DataFrame) -> _Data:
    if task == "classification":
        cols = _prediction_columns(task, table)
        return _Data(task, table["label"].astype(int).to_numpy(), table[cols].to_numpy(float))
    if task == "regression":
        err = np.abs(table["prediction"].to_numpy(float) - table["label"].to_numpy(float))
        return _Data(task, err)
    dice = table[_prediction_columns(task, table)].to_numpy(float)
    return _Data(task, np.zeros(len(table)), per_case=dice.mean(axis=1))


def _classes_complete(data: _Data) -> bool:
    assert data.probs is not None
    return set(range(data.probs.shape[1])) <= set(np.unique(data.y).tolist())


def point_metric(data: _Data) -> float:
    """The metric of these rows; NaN when not computable (no row, a class missing)."""
    if not len(data.y):
        return math.nan
    if data.task == "classification":
        assert data.probs is not None
        if not _classes_complete(data):
            return math.nan
        return mauc(data.y, data.probs)
    if data.task == "regression":
        return mae(data.y, np.zeros_like(data.y))
    assert data.per_case is not None
    return float(data.per_case.mean())


def _weighted_auc(score: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC per row of ``weights`` (B, n): the rows repeated as often as weighted.

    Mann-Whitney with ties counted half, which is the area under the ROC curve as
    scikit-learn draws it; NaN where a resample has no positive or no negative.
    """
    if not len(score):
        return np.full(len(weights), np.nan)
    order = np.argsort(score, kind="stable")
    ranked = score[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])  # each distinct score
    w = weights[:, order]
    pos = np.add.reduceat(w * positive[order], starts, axis=1)  # (B, distinct scores)
    neg = np.add.reduceat(w * ~positive[order], starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    num = (pos * (below + 0.5 * neg)).sum(axis=1)
    den = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def weighted_metric(data: _Data, weights: np.ndarray) -> np.ndarray:
    """The metric per resample, ``weights`` (B, n) the times each row was drawn.

    Classification: Hand & Till's mAUC (scikit-learn's one-vs-one macro average; for
    two classes the AUC of p_1, as ``medtx.metrics.mauc``); NaN where a class
    was not drawn. Regression: MAE; segmentation: mean per-case Dice. NaN where
    nothing was drawn.
    """
    w = np.asarray(weights, dtype=np.float64)
    total = w.sum(axis=1)
    if data.task != "classification":
        values = data.y if data.task == "regression" else data.per_case
        assert values is not None
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, (w @ values) / np.where(total > 0, total, 1.0), np.nan)
    probs = data.probs
    assert probs is not None
    k = probs.shape[1]
    if k == 2:
        return _weighted_auc(probs[:, 1], data.y == 1, w)
    pairs = []
    for i in range(k):
        for j in range(i + 1, k):
            m = (data.y == i) | (data.y == j)
            a = _weighted_auc(probs[m, i], data.y[m] == i, w[:, m])
            b = _weighted_auc(probs[m, j], data.y[m] == j, w[:, m])
            pairs.append((a + b) / 2)
    return np.mean(pairs, axis=0) if pairs else np.full(len(w), np.nan)


# ---------------------------------------------------------------------------- pooling


def _read_predictions(task: str, path: str) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, sep="\t", dtype={"scan": str, "subject": str})
    except (OSError, pd.errors.EmptyDataError) as err:
        raise MedtxError(f"{path}: cannot read predictions ({err})") from err
    need = ["scan", "subject"] + (["label"] if task != "segmentation" else [])
    need += _prediction_columns(task, table) or ["p_0"]
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise MedtxError(f"{path}: missing column(s) {missing} for {task} subgroup metrics")
    return table


def attribute_index(attributes: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, scan) of the scan tables, whatever their order: rows
    without a scan id are dropped; of duplicates an "ok" row wins, then the first
    in sorted order."""
    missing = [c for c in ("dataset", "scan") if c not in attributes.columns]
    if missing:
        raise MedtxError(f"scan table without column(s) {missing}")
    cols = ["dataset", "scan", *(a for a in ATTRIBUTES if a in attributes.columns)]
    t = attributes.copy()
    t["_rank"] = (t["status"].astype(str) != "ok").astype(int) if "status" in t.columns else 0
    t = t[cols + ["_rank"]].astype({c: str for c in cols})  # NaN, None: "nan", "none"
    t = t[t["scan"].map(_text) != UNKNOWN]
    t = t.sort_values(["dataset", "scan", "_rank", *cols[2:]], kind="stable")
    return (
        t.drop_duplicates(["dataset", "scan"]).drop(columns="_rank").set_index(["dataset", "scan"])
    )


@dataclass(frozen=True)
class _Pool:
    """A run group's test predictions, all folds pooled, with each row's groups."""

    task: str
    folds: list[int]
    fold: np.ndarray  # (n,) the fold of each row
    unit: np.ndarray  # (n,) int: the row's subject among ``subjects``
    subjects: list[str]
    groups: pd.DataFrame  # (n, attributes)
    data: _Data


def _pool(
    dataset: str, task: str, runs: pd.DataFrame, index: pd.DataFrame, age_bands: Sequence[float]
) -> _Pool | None:
    tables = []
    for fold, path in zip(runs["fold"], runs["predictions_path"]):
        if not isinstance(path, str) or not path:
            continue  # a run without predictions.tsv: nothing to split
        t = _read_predictions(task, path)
        t["_fold"] = int(fold)
        tables.append(t)
    if not tables:
        return None
    table = pd.concat(tables, ignore_index=True)
    table = table.sort_values(["_fold", "scan"], kind="stable", ignore_index=True)
    cols = [a for a in ATTRIBUTES if a in index.columns]
    keys = pd.MultiIndex.from_arrays([[dataset] * len(table), table["scan"].astype(str)])
    found = index.reindex(keys)[cols].reset_index(drop=True)
    groups = group_labels(found, task, age_bands)
    subject = [
        f"subject {s}" if _text(s) != UNKNOWN else f"scan {c}"
        for s, c in zip(table["subject"], table["scan"])
    ]
    subjects = sorted(set(subject))
    position = {s: i for i, s in enumerate(subjects)}
    return _Pool(
        task=task,
        folds=sorted(set(table["_fold"].tolist())),
        fold=table["_fold"].to_numpy(),
        unit=np.array([position[s] for s in subject], dtype=np.int64),
        subjects=subjects,
        groups=groups,
        data=_data(task, table),
    )


def stable_seed(seed: int, key: Sequence[Any]) -> np.random.Generator:
    """A generator seeded from ``seed`` and a hash of ``key`` (not Python's salted hash)."""
    digest = hashlib.sha256("\x1f".join(map(str, key)).encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def _resample_weights(pool: _Pool, bootstrap: int, rng: np.random.Generator) -> np.ndarray:
    """(bootstrap, n rows): how often each row's subject was drawn in each resample."""
    s = len(pool.subjects)
    draws = rng.integers(0, s, size=(bootstrap, s))
    flat = (draws + s * np.arange(bootstrap)[:, None]).ravel()
    counts = np.bincount(flat, minlength=bootstrap * s).reshape(bootstrap, s)
    return counts[:, pool.unit].astype(np.float64)


# ---------------------------------------------------------------------------- cells


@dataclass(frozen=True)
class _Interval:
    low: float
    high: float
    kept: int
    total: int

    @property
    def computable(self) -> bool:
        return self.kept * 2 >= self.total and math.isfinite(self.low)


def _interval(values: np.ndarray) -> _Interval:
    """Percentile 95 % interval of the finite resample values (the others dropped)."""
    finite = values[np.isfinite(values)]
    if not len(finite):
        return _Interval(math.nan, math.nan, 0, len(values))
    tail = (100.0 - CI_LEVEL) / 2
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return _Interval(float(low), float(high), len(finite), len(values))


def _ci_text(ci: _Interval, digits: int, signed: bool = False) -> str:
    if not ci.computable:
        return f"not computable ({ci.total - ci.kept} of {ci.total} resamples had no defined value)"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"{f.format(ci.low)} to {f.format(ci.high)}"


def _dropped_note(ci: _Interval) -> str:
    if ci.computable and ci.kept < ci.total:
        return f"CI from {ci.kept} of {ci.total} resamples (the others lacked a class or rows)"
    return ""


def too_small_text(n: int, min_group: int) -> str:
    return f"too small (n={n} < {min_group})"


def _cells(
    pool: _Pool,
    mask: np.ndarray,
    weights: np.ndarray,
    all_boot: np.ndarray,
    all_value: float,
    metric: TaskMetric,
    min_group: int,
    *,
    is_all: bool,
) -> dict[str, Any]:
    """The row of one group (or of all test scans): display cells and plot numbers."""
    n = len(set(pool.unit[mask].tolist()))
    row: dict[str, Any] = {"value": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    if n < min_group:
        text = too_small_text(n, min_group)
        row.update({c: text for c in NUMBER_COLUMNS}, folds=MISSING, status="too small")
        row.update(flag="", note="too small: no number reported")
        return row
    data = pool.data.take(mask)
    value = point_metric(data)
    if not math.isfinite(value):
        text = NOT_COMPUTABLE_CLASSES if pool.task == "classification" else "not computable"
        row.update({c: text for c in NUMBER_COLUMNS}, folds=MISSING, status="not computable")
        row.update({"n subjects": str(n), "flag": "", "note": text})
        return row
    per_fold = []
    for f in pool.folds:
        in_fold = mask & (pool.fold == f)
        if len(set(pool.unit[in_fold].tolist())) >= min_group:
            v = point_metric(pool.data.take(in_fold))
            if math.isfinite(v):
                per_fold.append(v)
    boot = weighted_metric(data, weights[:, mask])
    ci = _interval(boot)
    d = metric.digits
    row.update(
        {
            "n subjects": str(n),
            "folds": f"{len(per_fold)} of {len(pool.folds)}",
            "mean ± std over folds": (
                format_mean_std(per_fold, d)
                if per_fold
                else f"{MISSING} (no fold with {min_group} subjects)"
            ),
            "pooled": f"{value:.{d}f}",
            "95 % CI": _ci_text(ci, d),
            "status": "ok",
            "value": value,
            "flag": "",
        }
    )
    if ci.computable:
        row.update(ci_low=ci.low, ci_high=ci.high)
    notes = [_dropped_note(ci)]
    if is_all:
        row.update({"gap to all": MISSING, "gap 95 % CI": MISSING})
    elif not math.isfinite(all_value):  # all test scans have no number to compare with
        row.update({"gap to all": MISSING, "gap 95 % CI": MISSING})
    else:
        gap = value - all_value
        gap_ci = _interval(boot - all_boot)
        row.update({"gap to all": f"{gap:+.{d}f}", "gap 95 % CI": _ci_text(gap_ci, d, signed=True)})
        row["_gap_excludes_0"] = gap_ci.computable and (gap_ci.low > 0 or gap_ci.high < 0)
        notes.append(_dropped_note(gap_ci).replace("CI", "gap CI", 1))
    row["note"] = "; ".join(n for n in notes if n)
    return row


def _run_group_rows(
    key: tuple[Any, ...], pool: _Pool, *, age_bands, min_group: int, bootstrap: int, seed: int
) -> list[dict[str, Any]]:
    dataset, task, backbone, init, frac = key
    metric = METRICS[task]
    weights = _resample_weights(pool, bootstrap, stable_seed(seed, key))
    everything = np.ones(len(pool.unit), dtype=bool)
    all_boot = weighted_metric(pool.data, weights)
    all_value = point_metric(pool.data)
    ident = {
        "dataset": dataset,
        "backbone": backbone,
        "init": init,
        "label fraction (%)": int(frac),
        "task": task,
        "metric": metric.label,
    }

    def cells(mask: np.ndarray, is_all: bool) -> dict[str, Any]:
        return _cells(pool, mask, weights, all_boot, all_value, metric, min_group, is_all=is_all)

    rows = [{**ident, "attribute": ALL, "group": ALL, **cells(everything, True)}]
    for attr in attributes_of(task):
        labels = pool.groups[attr].to_numpy()
        block = []
        for g in _group_order(attr, labels.tolist(), age_bands):
            cells_ = cells(labels == g, False)
            block.append({**ident, "attribute": ATTRIBUTE_TITLES[attr], "group": g, **cells_})
        if [r["group"] for r in block] == [UNKNOWN]:
            block[0]["note"] = "; ".join(
                n for n in (f"{attr} not recorded for any test scan", block[0]["note"]) if n
            )
        _mark_worst(block, metric)
        rows += block
    return rows


def _mark_worst(block: list[dict[str, Any]], metric: TaskMetric) -> None:
    """Flag gaps whose interval excludes 0; name the worst of >= 2 groups with a number."""
    for r in block:
        if r.pop("_gap_excludes_0", False):
            r["flag"] = "gap CI excludes 0"
    eligible = [r for r in block if r["status"] == "ok"]
    if len(eligible) < 2:
        return
    sign = -1.0 if metric.higher_is_better else 1.0
    worst = max(eligible, key=lambda r: sign * r["value"])  # first of ties: group order
    worst["flag"] = "; ".join(x for x in ("worst", worst["flag"]) if x)


def subgroup_metrics(
    runs: pd.DataFrame,
    attributes: pd.DataFrame,
    *,
    age_bands: Sequence[float] = SUBGROUP_DEFAULTS["age_bands"],
    min_group: int = SUBGROUP_DEFAULTS["min_group"],
    bootstrap: int = SUBGROUP_DEFAULTS["bootstrap"],
    seed: int = SUBGROUP_DEFAULTS["seed"],
) -> pd.DataFrame:
    """Per run group (``runs``: ``medtx.evaluate.tables.collect_runs``' table, or runs.tsv
    read back) and subgroup, the task's metric on its test predictions.

    ``attributes``: the scan tables (dataset, scan, sex, site, age, diagnosis, ...).
    Rows: per run group, "all" (every test scan), then each attribute's groups;
    columns ``TABLE_COLUMNS`` (display text) and ``INTERNAL_COLUMNS`` (for the plot:
    NaN wherever no number may be shown). ``df.attrs`` holds the settings.
    """
    settings = subgroup_settings(
        {"age_bands": list(age_bands), "min_group": min_group, "bootstrap": bootstrap, "seed": seed}
    )
    index = attribute_index(attributes)
    rows: list[dict[str, Any]] = []
    usable = runs[runs["task"].isin(TASKS)]
    for key, group in usable.groupby(RUN_GROUP, sort=True):
        dataset, task = str(key[0]), str(key[1])
        group = group.sort_values("fold", kind="stable")
        pool = _pool(dataset, task, group, index, settings["age_bands"])
        if pool is None:
            continue
        rows += _run_group_rows(
            (dataset, task, str(key[2]), str(key[3]), int(key[4])),
            pool,
            age_bands=settings["age_bands"],
            min_group=settings["min_group"],
            bootstrap=settings["bootstrap"],
            seed=settings["seed"],
        )
    table = pd.DataFrame(rows, columns=[*TABLE_COLUMNS, *INTERNAL_COLUMNS])
    table.attrs.update(settings)
    return table


# ---------------------------------------------------------------------------- writing


def caption(task: str, settings: Mapping[str, Any]) -> str:
    """What a task's subgroup table shows and how its intervals were computed."""
    s = subgroup_settings(settings)
    metric = METRICS[task]
    attrs = ", ".join(ATTRIBUTE_TITLES[a] for a in attributes_of(task))
    worse = "lowest" if metric.higher_is_better else "highest"
    bands = ", ".join(age_band_labels(s["age_bands"]))
    return (
        f"Subgroups, {task}: {metric.label} per {attrs} ({bands}; "
        "a missing value is the group unknown), on the test scans of every fold. "
        "Mean ± std over the folds where the group has enough subjects; pooled: over all "
        "folds' test predictions, with a bootstrap 95 % CI (percentile, "
        f"{s['bootstrap']} resamples of the test subjects with replacement, seed "
        f"{s['seed']}). Gap to all: group − all test scans, its CI from the same "
        "resamples (paired); flagged where it excludes 0 (not corrected for multiple "
        f"comparisons). Worst: the {worse} {metric.label} among groups of at least "
        f"{s['min_group']} subjects. Groups of fewer than {s['min_group']} distinct test "
        "subjects are reported as too small, never as a number."
    )


def write_subgroup_tables(
    table: pd.DataFrame, out_dir: str | Path, *, settings: Mapping[str, Any] | None = None
) -> dict[str, tuple[Path, Path]]:
    """``subgroups_<task>.tsv`` and ``.md`` in ``out_dir`` for each task in ``table``
    (captioned with ``settings``, default ``table.attrs``); {task: (tsv, md)}."""
    given = settings if settings is not None else table.attrs
    s = {str(k): v for k, v in given.items()}
    out = Path(out_dir)
    written = {}
    for task in [t for t in TASKS if (table["task"] == t).any()]:
        rows = table.loc[table["task"] == task, TABLE_COLUMNS]
        label = METRICS[task].label
        rows = rows.rename(
            columns={
                "mean ± std over folds": f"{label}, mean ± std over folds",
                "pooled": f"{label}, pooled",
            }
        )
        written[task] = write_table(
            rows,
            out / f"subgroups_{task}.tsv",
            out / f"subgroups_{task}.md",
            caption=caption(task, s),
        )
    return written


def worst_lines(table: pd.DataFrame, task: str) -> list[str]:
    """Summary lines, per run group and attribute: its worst group and gap to all."""
    lines = []
    rows = table[table["task"] == task]
    label = METRICS[task].label
    for _, group in rows.groupby(["dataset", "backbone", "init", "label fraction (%)"], sort=False):
        first = group.iloc[0]
        who = (
            f"{first['dataset']}, {first['backbone']}, {first['init']}, "
            f"{first['label fraction (%)']} % labels"
        )
        everything = group[group["attribute"] == ALL].iloc[0]
        for attr, block in group[group["attribute"] != ALL].groupby("attribute", sort=False):
            worst = block[block["flag"].str.startswith("worst")]
            if worst.empty:
                lines.append(f"- {who}, {attr}: no worst group (fewer than 2 groups with a number)")
                continue
            w = worst.iloc[0]
            flagged = "excludes 0" in w["flag"]
            lines.append(
                f"- {who}, {attr}: worst group {w['group']}, {label} {w['pooled']} vs "
                f"{everything['pooled']} for all (gap {w['gap to all']}, 95 % CI "
                f"{w['gap 95 % CI']}"
                + ("; **flagged**: the interval excludes 0)" if flagged else ")")
            )
    return lines


def read_scan_tables(paths: Sequence[str | Path]) -> pd.DataFrame:
    """The workflow's scan tables (``results/scans/<dataset>.tsv``), as text, concatenated.

    MedtxError naming the file when one is missing, unreadable or lacks the dataset
    or scan column.
    """
    tables = []
    for p in map(Path, paths):
        if not p.is_file():
            raise MedtxError(f"{p}: scan table not found (subgroup attributes)")
        try:
            t = pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False)
        except (OSError, ValueError) as err:
            reason = str(err).replace("\n", " ")
            raise MedtxError(f"{p}: cannot read the scan table ({reason})") from err
        missing = [c for c in ("dataset", "scan") if c not in t.columns]
        if missing:
            raise MedtxError(
                f"{p}: scan table without column(s) {missing} (columns: {list(t.columns)})"
            )
        tables.append(t)
    if not tables:
        return pd.DataFrame(columns=["dataset", "scan", *ATTRIBUTES])
    return pd.concat(tables, ignore_index=True)
