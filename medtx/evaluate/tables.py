"""The study's result tables from the fine-tuning runs' outputs.

Every fine-tuning run writes ``predictions.tsv`` and ``metrics.json`` (with the
run's identity, ``run``) into its folder (``medtx.workflow.paths.finetune_dir``).
``collect_runs`` reads them into one row per run; the test metrics are recomputed
from the predictions beside each JSON (``medtx.train.inference.evaluate_predictions``), so
a table never shows a number its predictions no longer support: a disagreement
beyond 1e-9 is an error naming the file.

Tables, like the paper's (Jun et al. 2021), each cell "mean ± std" over folds
(std with ddof = 1; a single fold shows the value alone; "—" where there is no run).
The study compares backbones (``medtx.domain.BACKBONES``) on the same folds, so
Tables 1, 3, 4 and 5 have a ``backbone`` column:

- Table 1: per backbone, scratch / pre-trained (/ w/o transformer) at 100 % labels,
  the headline metric of each task, a chance / baseline row and the Medical
  Transformer paper's published values (marked as published, not reproduced);
- Table 3: parameters per backbone, task and model preset, with the paper's printed
  figure (the Medical Transformer's only);
- Table 4: per backbone, label fractions (10 ... 100 %), pre-trained vs scratch;
- Table 5: with vs without the transformer (pre-trained encoders either way), for
  the backbones that have that ablation (the Medical Transformer).

The figures are ``medtx.evaluate.figures``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medtx.domain import BACKBONE_INITS, BACKBONES, DEFAULT_BACKBONE, FRACTIONS, TASKS, RunId
from medtx.errors import MedtxError
from medtx.io import atomic_path, write_text

RUN_KEYS = RunId.KEYS
MISSING = "—"
TOLERANCE = 1e-9

# The headline metrics of each task: (metrics key, column label, decimals).
HEADLINES: dict[str, tuple[tuple[str, str, int], ...]] = {
    "classification": (("mauc", "mAUC", 3),),
    "regression": (("mae", "MAE (years)", 2),),
    "segmentation": (
        ("dice_WT", "Dice WT", 3),
        ("dice_TC", "Dice TC", 3),
        ("dice_ET", "Dice ET", 3),
    ),
}
# Every metric ``evaluate_predictions`` returns, as run-table columns.
METRIC_KEYS = ("n", "mauc", "accuracy", "mae", "dice_WT", "dice_TC", "dice_ET", "dice_mean")
# Brain age's gap, raw and corrected for the age bias fitted on validation
# (``medtx.brainage``), and its Pearson r with age over the test scans.
GAP_KEYS = (
    ("mean_gap", "mean gap (years)", 2),
    ("r_gap_age", "r(gap, age)", 2),
    ("mean_gap_corrected", "mean corrected gap (years)", 2),
    ("r_gap_corrected_age", "r(corrected gap, age)", 2),
)
# The paper's published test results (Jun et al. 2021, Table 1, pre-trained model).
PAPER = {"mauc": 0.835, "mae": 3.49, "dice_WT": 0.873, "dice_TC": 0.697, "dice_ET": 0.588}
PAPER_ROW = "paper (Jun et al.)"
PAPER_BACKBONE = "medical_transformer"  # the published numbers are the Medical Transformer's
# The initializations every backbone has: their rows appear even without runs.
COMMON_INITS = ("scratch", "pretrained")
ABLATION_INIT = "notransformer"
BASELINE_ROW = "chance / baseline"
CHANCE_MAUC = 0.5
INIT_TITLES = {
    "pretrained": "with transformer (pretrained)",
    "notransformer": "w/o transformer (notransformer)",
}


# ---------------------------------------------------------------------------- runs


def run_identity(stored: Mapping[str, Any], path: str | Path) -> RunId:
    """The identity a run recorded in its metrics JSON (``run``), checked.

    A record without ``backbone`` (written before the study had several) is the
    default backbone's, the Medical Transformer's.
    """
    record = stored.get("run")
    if not isinstance(record, Mapping):
        raise MedtxError(
            f"{path}: no run identity recorded (a metrics file from before "
            "medtx recorded it, or not a fine-tuning run's); rerun fine-tuning"
        )
    try:
        # None for a missing key: RunId names what is missing or bad
        fields: dict[str, Any] = {k: record.get(k) for k in RunId.KEYS}
        fields["backbone"] = record.get("backbone", DEFAULT_BACKBONE)
        return RunId(**fields)
    except (TypeError, ValueError) as err:
        raise MedtxError(f"{path}: bad run identity {dict(record)}: {err}") from err


def read_metrics_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise MedtxError(f"{path}: cannot read the run's metrics ({err})") from err
    if not isinstance(obj, dict):
        raise MedtxError(f"{path}: expected a JSON object of metrics")
    return obj


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)
    try:
        return math.isclose(float(a), float(b), rel_tol=0.0, abs_tol=TOLERANCE)
    except (TypeError, ValueError):
        return a == b


def _run_row(path: Path) -> dict[str, Any]:
    from medtx.train.inference import evaluate_predictions  # torch: import only when reading runs

    stored = read_metrics_json(path)
    run = run_identity(stored, path)
    tsv = path.parent / "predictions.tsv"
    metrics, source = stored, "metrics.json (no predictions.tsv to check)"
    if tsv.exists():
        metrics, source = evaluate_predictions(run.task, tsv), "predictions.tsv"
        stale = [
            f"{k}: stored {stored.get(k, 'nothing')!r}, predictions give {v!r}"
            for k, v in metrics.items()
            if k != "task" and (k not in stored or not _same(stored[k], v))
        ]
        if stale:
            raise MedtxError(
                f"{path}: stale metrics, they disagree with {tsv.name} "
                f"beside it ({'; '.join(stale)}); rerun the evaluation"
            )
    row: dict[str, Any] = run.as_dict()
    for key in (*METRIC_KEYS, *(k for k, _, _ in GAP_KEYS)):
        value = metrics.get(key)
        row[key] = np.nan if value is None else value
    row.update(
        {key: stored.get(key) for key in ("selected_by", "val_metric", "best_epoch", "status")}
    )
    row.update(
        source=source, metrics_path=str(path), predictions_path=str(tsv) if tsv.exists() else ""
    )
    return row


RUN_COLUMNS = (
    *RUN_KEYS,
    *METRIC_KEYS,
    *(k for k, _, _ in GAP_KEYS),
    "selected_by",
    "val_metric",
    "best_epoch",
    "status",
    "source",
    "metrics_path",
    "predictions_path",
)


def collect_runs(metrics_paths: Iterable[str | Path]) -> pd.DataFrame:
    """One row per fine-tuning run: identity, test metrics (recomputed), selection info.

    Raises MedtxError on a path that is not a run's, an unreadable or stale metrics
    JSON, or two files for one run.
    """
    rows = [_run_row(Path(p)) for p in metrics_paths]
    runs = pd.DataFrame(rows, columns=list(RUN_COLUMNS))
    dup = runs[runs.duplicated(list(RUN_KEYS), keep=False)]
    if not dup.empty:
        raise MedtxError(
            "several metrics files for one run: " + ", ".join(dup["metrics_path"].tolist())
        )
    runs["frac"] = runs["frac"].astype(int)
    runs["fold"] = runs["fold"].astype(int)
    return runs.sort_values(list(RUN_KEYS), ignore_index=True)


# ---------------------------------------------------------------------------- cells


def _finite(values: Iterable[Any]) -> list[float]:
    out = []
    for v in values:
        if v is None:
            continue
        f = float(v)
        if np.isfinite(f):
            out.append(f)
    return out


def format_mean_std(values: Iterable[Any], digits: int = 3) -> str:
    """ "mean ± std" (std with ddof = 1) of the finite values; one value alone; "—" if none."""
    v = _finite(values)
    if not v:
        return MISSING
    mean = f"{np.mean(v):.{digits}f}"
    return mean if len(v) == 1 else f"{mean} ± {np.std(v, ddof=1):.{digits}f}"


@dataclass(frozen=True)
class _Column:
    task: str
    dataset: str | None
    key: str
    label: str
    digits: int


def _columns(runs: pd.DataFrame) -> list[_Column]:
    """Every task's headline metrics; one column per dataset when a task has several."""
    cols = []
    for task in TASKS:
        datasets = sorted(runs.loc[runs["task"] == task, "dataset"].unique())
        for key, label, digits in HEADLINES[task]:
            for ds in datasets or [None]:
                shown = f"{label} [{ds}]" if len(datasets) > 1 else label
                cols.append(_Column(task, ds, key, shown, digits))
    return cols


def _select(runs: pd.DataFrame, col: _Column, **where: Any) -> pd.Series:
    mask = runs["task"] == col.task
    if col.dataset is not None:
        mask &= runs["dataset"] == col.dataset
    for name, value in where.items():
        mask &= runs[name] == value
    return runs.loc[mask, col.key]


def _n_folds(counts: list[int]) -> str:
    """The row's fold count: "5", or "3–5" when its cells rest on different counts."""
    counts = [c for c in counts if c > 0]
    if not counts:
        return MISSING
    lo, hi = min(counts), max(counts)
    return str(lo) if lo == hi else f"{lo}–{hi}"


def _init_row(runs: pd.DataFrame, cols: list[_Column], **where: Any) -> dict[str, str]:
    row, counts = {}, []
    for col in cols:
        values = _finite(_select(runs, col, **where))
        row[col.label] = format_mean_std(values, col.digits)
        counts.append(len(values))
    row["n folds"] = _n_folds(counts)
    return row


# ---------------------------------------------------------------------------- baselines


def mean_age_baseline(predictions_tsvs: Mapping[int, str | Path]) -> dict[int, float]:
    """Per fold, the MAE of predicting the mean age of the OTHER folds' test labels.

    A stand-in for "predict the training-set mean" that needs no training manifest:
    with rotating folds, the other folds' test scans are this fold's training and
    validation scans. Never the fold's own mean, which would use its test labels.
    """
    labels = {}
    for fold, tsv in predictions_tsvs.items():
        table = pd.read_csv(tsv, sep="\t", dtype={"scan": str, "subject": str})
        labels[fold] = table["label"].to_numpy(dtype=np.float64)
    out = {}
    for fold, y in labels.items():
        others = [v for f, v in labels.items() if f != fold]
        if others:
            out[fold] = float(np.abs(y - np.concatenate(others).mean()).mean())
    return out


def _baseline_cell(
    runs: pd.DataFrame, col: _Column, baselines: Mapping[str, float] | None, frac: int
) -> str:
    given = dict(baselines or {})
    if col.task in given and given[col.task] is not None:
        return f"{float(given[col.task]):.{col.digits}f}"
    if col.key == "mauc":
        return f"{CHANCE_MAUC:.{col.digits}f}"
    if col.key != "mae":
        return MISSING
    mask = (
        (runs["task"] == "regression") & (runs["frac"] == frac) & (runs["predictions_path"] != "")
    )
    if col.dataset is not None:
        mask &= runs["dataset"] == col.dataset
    tsvs: dict[int, str] = {}
    for fold, tsv in zip(runs.loc[mask, "fold"], runs.loc[mask, "predictions_path"]):
        # a fold's test scans are the same for every backbone and init
        tsvs.setdefault(int(fold), tsv)
    return format_mean_std(mean_age_baseline(tsvs).values(), col.digits)


# ---------------------------------------------------------------------------- tables


def _backbones_run(runs: pd.DataFrame) -> list[str]:
    """The backbones with at least one run, in ``BACKBONES`` order."""
    present = set(runs["backbone"])
    return [b for b in BACKBONES if b in present]


def _table1_inits(runs: pd.DataFrame, backbone: str) -> list[str]:
    """Table 1's rows of ``backbone``: its inits in order; scratch and pretrained even
    without runs (the default backbone always, another one when it has any run),
    an ablation (notransformer) only when run."""
    mine = runs["backbone"] == backbone
    if backbone != DEFAULT_BACKBONE and not mine.any():
        return []
    return [
        init
        for init in BACKBONE_INITS[backbone]
        if init in COMMON_INITS or (mine & (runs["init"] == init)).any()
    ]


def table1(
    runs: pd.DataFrame, *, baselines: Mapping[str, float] | None = None, frac: int = 100
) -> pd.DataFrame:
    """Table 1: each task's headline metric per backbone and initialization at ``frac`` % labels.

    Rows, per backbone (``BACKBONES`` order; the default one always, another one when
    it has runs): scratch, pretrained, then its other inits (notransformer) when run;
    then the chance / baseline row (backbone "—"; chance mAUC 0.5; MAE of predicting
    the mean age, from ``baselines["regression"]`` when given, else
    ``mean_age_baseline``), and the paper's published values (backbone
    medical_transformer: the Medical Transformer paper's). ``baselines`` maps a task
    to its baseline headline value (overrides the defaults).
    """
    cols = _columns(runs)
    rows = [
        {
            "backbone": backbone,
            "init": init,
            **_init_row(runs, cols, backbone=backbone, init=init, frac=frac),
            "source": "reproduced",
        }
        for backbone in BACKBONES
        for init in _table1_inits(runs, backbone)
    ]
    rows.append(
        {
            "backbone": MISSING,
            "init": BASELINE_ROW,
            **{c.label: _baseline_cell(runs, c, baselines, frac) for c in cols},
            "n folds": MISSING,
            "source": "baseline",
        }
    )
    rows.append(
        {
            "backbone": PAPER_BACKBONE,
            "init": PAPER_ROW,
            **{c.label: f"{PAPER[c.key]:.{c.digits}f}" for c in cols},
            "n folds": MISSING,
            "source": "published, not reproduced",
        }
    )
    return pd.DataFrame(
        rows, columns=["backbone", "init", *[c.label for c in cols], "n folds", "source"]
    )


def table3(rows: Sequence[Mapping[str, Any]] | None = None) -> pd.DataFrame:
    """Table 3: trainable parameters per backbone, task and preset, with the paper's
    printed figure.

    ``rows`` ({"task", "preset", "in_channels", "num_outputs", "parameters", "paper"}
    and optionally "backbone", default medical_transformer) default to
    ``medtx.models.slice_transformer.params_table()`` (the Medical Transformer's)
    followed by ``medtx.models.pumit.model.params_table()`` (PUMIT's; its paper
    prints no per-task counts, so its "paper" is empty).
    """
    if rows is None:
        from medtx.models.pumit.model import params_table as pumit_params
        from medtx.models.slice_transformer import params_table as medtx_params

        rows = [
            *({**r, "backbone": "medical_transformer"} for r in medtx_params()),
            *({**r, "backbone": "pumit"} for r in pumit_params()),
        ]
    out = []
    for r in rows:
        n, printed = int(str(r["parameters"])), str(r.get("paper") or "")
        out.append(
            {
                "backbone": r.get("backbone") or DEFAULT_BACKBONE,
                "task": r["task"],
                "preset": r["preset"],
                "in channels": r["in_channels"],
                "outputs": r["num_outputs"],
                "parameters": f"{n:,}",
                "paper (printed)": printed or MISSING,
                "matches paper": (
                    MISSING if not printed else "yes" if _printed_match(n, printed) else "no"
                ),
            }
        )
    return pd.DataFrame(
        out,
        columns=[
            "backbone",
            "task",
            "preset",
            "in channels",
            "outputs",
            "parameters",
            "paper (printed)",
            "matches paper",
        ],
    )


def _printed_match(n: int, printed: str) -> bool:
    """The paper prints millions to 3 decimals, truncated (2,401,777 -> 2.401M)."""
    return printed in (f"{n // 1000 / 1000:.3f}M", f"{n / 1e6:.3f}M")


def table4(
    runs: pd.DataFrame,
    *,
    fractions: Sequence[int] = FRACTIONS,
    inits: Sequence[str] = ("pretrained", "scratch"),
) -> pd.DataFrame:
    """Table 4: headline metrics per backbone and label fraction (rows), pre-trained
    vs scratch.

    One block of rows per backbone with runs (the default backbone's when there are
    none), each with every fraction in ``fractions`` or run.
    """
    cols = _columns(runs)
    fracs = sorted(set(fractions) | set(runs["frac"].astype(int)))
    rows = []
    for backbone in _backbones_run(runs) or [DEFAULT_BACKBONE]:
        for frac in fracs:
            row: dict[str, Any] = {"backbone": backbone, "label fraction (%)": frac}
            counts = []
            for col in cols:
                for init in inits:
                    values = _finite(_select(runs, col, backbone=backbone, init=init, frac=frac))
                    row[f"{col.label}, {init}"] = format_mean_std(values, col.digits)
                    counts.append(len(values))
            row["n folds"] = _n_folds(counts)
            rows.append(row)
    columns = ["backbone", "label fraction (%)"]
    columns += [f"{c.label}, {i}" for c in cols for i in inits] + ["n folds"]
    return pd.DataFrame(rows, columns=columns)


def table5(runs: pd.DataFrame, *, frac: int = 100) -> pd.DataFrame:
    """Table 5: with vs without the transformer (both from pre-trained encoders).

    Only backbones with the ablation (the "notransformer" init: the Medical
    Transformer) have these rows: one pair per such backbone with runs, or the
    default backbone's pair when none has any.
    """
    cols = _columns(runs)
    ablated = [b for b in _backbones_run(runs) if ABLATION_INIT in BACKBONE_INITS[b]]
    rows = [
        {
            "backbone": backbone,
            "model": INIT_TITLES[init],
            **_init_row(runs, cols, backbone=backbone, init=init, frac=frac),
        }
        for backbone in ablated or [DEFAULT_BACKBONE]
        for init in ("pretrained", ABLATION_INIT)
    ]
    return pd.DataFrame(rows, columns=["backbone", "model", *[c.label for c in cols], "n folds"])


def brain_age_gap(runs: pd.DataFrame) -> pd.DataFrame:
    """The brain-age gap per dataset, backbone, init and label fraction: before and
    after the age-bias correction, mean ± std over folds. A corrected gap whose r
    with age is near 0 shows the correction worked on the test scans."""
    regression = runs[runs["task"] == "regression"]
    rows = []
    keys = ["dataset", "backbone", "init", "frac"]
    for (dataset, backbone, init, frac), group in regression.groupby(keys, sort=True):
        row = {"dataset": dataset, "backbone": backbone, "init": init, "label fraction (%)": frac}
        for key, label, digits in GAP_KEYS:
            row[label] = format_mean_std(group[key], digits)
        row["n folds"] = len(group)
        rows.append(row)
    columns = [*keys[:3], "label fraction (%)", *(label for _, label, _ in GAP_KEYS), "n folds"]
    return pd.DataFrame(rows, columns=columns)


# ---------------------------------------------------------------------------- writing

# What makes free text Markdown inside a line: emphasis, strikethrough, code spans,
# links and images, backslash escapes, table cells; "_" only where it can open or close
# emphasis (not inside a word: site_A stays as written); "<" where it opens an HTML tag,
# comment or autolink ("n=3 < 5" stays); "&" where it opens an entity.
_MARKUP = re.compile(r"[\\`*\[\]|~]|(?<![^\W_])_|_(?![^\W_])|<(?=[A-Za-z/!?])|&(?=[A-Za-z#])")
# Line breaks (a new line starts a new block: a heading, raw HTML) and other controls.
_BREAKS = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]+")


def md_text(value: Any) -> str:
    """``value`` as Markdown that renders as its own text, on one line.

    Site names, diagnoses, paths and checkpoint records reach the reports as written;
    unescaped, ``<img src=x onerror=...>`` renders as a live element,
    ``[x](javascript:...)`` as a link and ``|`` as a new table cell. Every such
    character gets a CommonMark backslash escape (rendered as the character itself),
    and line breaks become spaces. For text inside a line: after a list marker, in a
    table cell, in a sentence.
    """
    text = _BREAKS.sub(" ", str(value))
    return _MARKUP.sub(lambda m: "\\" + m.group(0), text)


class Markdown(str):
    """Markdown medtx wrote itself (a link to a card): ``to_markdown`` keeps it as it is,
    where every other cell is free text and escaped (``md_text``)."""


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub pipe table (no tabulate needed); number columns right-aligned. Cells and
    headers are text (``md_text``) unless they are ``Markdown``."""

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return MISSING
        return v if isinstance(v, Markdown) else md_text(v)

    def numeric(column: pd.Series) -> bool:
        shown = [cell(v) for v in column if cell(v) != MISSING]
        return bool(shown) and all(s[:1].isdigit() or s[:1] == "-" for s in shown)

    header = "| " + " | ".join(cell(c) for c in df.columns) + " |"
    align = (
        "|"
        + "|".join(
            "---:" if i and numeric(df.iloc[:, i]) else ":---" for i in range(len(df.columns))
        )
        + "|"
    )
    body = [
        "| " + " | ".join(cell(v) for v in rec) + " |"
        for rec in df.itertuples(index=False, name=None)
    ]
    return "\n".join([header, align, *body]) + "\n"


def write_table(
    df: pd.DataFrame, tsv_path: str | Path, md_path: str | Path, *, caption: str
) -> tuple[Path, Path]:
    """Write ``df`` as a TSV (data only) and as Markdown (bold caption + pipe table)."""
    with atomic_path(tsv_path) as tmp:
        df.to_csv(tmp, sep="\t", index=False)
    write_text(f"**{caption}**\n\n{to_markdown(df)}", md_path)
    return Path(tsv_path), Path(md_path)


CAPTIONS = {
    "table1": (
        "Table 1. Test performance at 100 % labels per backbone (medical_transformer: "
        "the paper's slice transformer; pumit: PUMIT's ViT) and initialization, "
        "mean ± std over folds, every backbone on the same folds: "
        "mAUC (AD/MCI/CN), MAE in years (brain age), Dice (BraTS WT/TC/ET). "
        "Chance / baseline (no backbone): mAUC 0.5; MAE of predicting the mean age of "
        "the other folds' test labels unless a baseline was given. The paper row is the "
        "Medical Transformer's published result (Jun et al. 2021), not reproduced here."
    ),
    "table3": (
        "Table 3. Trainable parameters per backbone and task. Medical Transformer: "
        "preset table3 (d = 64, d_ff = 128) matches the paper's printed counts; "
        "paper_text (d_emb 16, d_ff 64, as the paper's text states) does not, so the "
        "text and Table 3 disagree. PUMIT: our counts of our implementation; the "
        "PUMIT paper prints no per-task figures to compare with."
    ),
    "table4": (
        "Table 4. Test performance by backbone and label fraction, pre-trained vs "
        "trained from scratch, mean ± std over folds."
    ),
    "brain_age_gap": (
        "Brain-age gap (predicted − chronological age) on the test scans, mean ± std over "
        "folds, raw and corrected for the regression-to-the-mean bias: the line "
        "predicted = slope × age + intercept fitted on each fold's validation scans, "
        "never on test (Beheshti et al. 2019; de Lange & Cole 2020). r: Pearson "
        "correlation of the gap with age; the correction should bring it towards 0."
    ),
    "table5": (
        "Table 5. With vs without the transformer: pre-trained encoders with the "
        "fine-tuned slice transformer, or the encoders alone, at 100 % labels. The "
        "ablation exists for the Medical Transformer only (PUMIT has no "
        "encoder-without-transformer variant)."
    ),
}


def _note(runs: pd.DataFrame) -> str:
    datasets = sorted(runs["dataset"].unique())
    n_folds = runs.groupby(["dataset", "task"])["fold"].nunique()
    folds = (
        f"{n_folds.min()}–{n_folds.max()}"
        if len(n_folds) and n_folds.min() != n_folds.max()
        else str(n_folds.max() if len(n_folds) else 0)
    )
    backbones = _backbones_run(runs)
    what = (
        f"{len(runs)} fine-tuning run(s) on {', '.join(map(md_text, datasets)) or 'no dataset'}, "
        f"{folds} fold(s) per task, backbone(s) {', '.join(backbones) or 'none'}"
    )
    if any(d.startswith("demo") for d in datasets):
        return (
            f"These tables summarize {what}. The demo cohort is synthetic and tiny "
            "(a handful of generated scans, few epochs on downsampled volumes), so the "
            "numbers only show that the workflow runs end to end; they are not "
            "comparable to the paper's, whose row is quoted from the publication, not "
            "reproduced."
        )
    return (
        f"These tables summarize {what}. Metrics are recomputed from each run's "
        "predictions. The paper row is quoted from the publication, not reproduced; "
        "compare with it only where cohort, preprocessing and protocol match."
    )


def build_tables(
    metrics_paths: Iterable[str | Path],
    out_dir: str | Path,
    *,
    baselines: Mapping[str, float] | None = None,
    note: str | None = None,
) -> dict[str, Path]:
    """Write table1/3/4/5 (.tsv, .md), runs.tsv (every run) and summary.md to ``out_dir``.

    Returns {"table1_tsv", "table1_md", ..., "runs", "summary"} -> path.
    """
    out = Path(out_dir)
    runs = collect_runs(metrics_paths)
    tables = {
        "table1": table1(runs, baselines=baselines),
        "table3": table3(),
        "table4": table4(runs),
        "table5": table5(runs),
    }
    if (runs["task"] == "regression").any():
        tables["brain_age_gap"] = brain_age_gap(runs)
    written: dict[str, Path] = {}
    for name, df in tables.items():
        written[f"{name}_tsv"], written[f"{name}_md"] = write_table(
            df, out / f"{name}.tsv", out / f"{name}.md", caption=CAPTIONS[name]
        )
    with atomic_path(out / "runs.tsv") as tmp:
        runs.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    written["runs"] = out / "runs.tsv"
    parts = ["# medtx study: results\n", note or _note(runs), ""]
    parts += [f"**{CAPTIONS[name]}**\n\n{to_markdown(df)}" for name, df in tables.items()]
    written["summary"] = write_text("\n".join(parts), out / "summary.md")
    return written
