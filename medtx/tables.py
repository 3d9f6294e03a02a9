"""The study's result tables and figures from the fine-tuning runs' outputs.

Every fine-tuning run writes ``predictions.tsv`` and ``metrics.json`` under

    <results>/finetune/<dataset>/task-<task>/init-<init>_frac-<frac>/fold-<k>/

``collect_runs`` reads them into one row per run; the test metrics are recomputed
from the predictions beside each JSON (``medtx.stages.evaluate_predictions``), so
a table never shows a number its predictions no longer support: a disagreement
beyond 1e-9 is an error naming the file.

Tables, like the paper's (Jun et al. 2021), each cell "mean ± std" over folds
(std with ddof = 1; a single fold shows the value alone; "—" where there is no run):

- Table 1: scratch / pre-trained (/ w/o transformer) at 100 % labels, the headline
  metric of each task, a chance / baseline row and the paper's published values
  (marked as published, not reproduced);
- Table 3: parameters per task and model preset, with the paper's printed figure;
- Table 4: label fractions (10 ... 100 %), pre-trained vs scratch;
- Table 5: with vs without the transformer (pre-trained encoders either way).

Figures (``plot_roc``, ``plot_age``, ``plot_curves``) are small Agg PNGs.
Segmentation overlays are not drawn here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medtx.errors import MedtxError
from medtx.io import atomic_path, write_text

TASKS = ("classification", "regression", "segmentation")
INITS = ("scratch", "pretrained", "notransformer")  # notransformer = "w/o transformer"
FRACTIONS = (10, 30, 50, 70, 100)
RUN_KEYS = ("dataset", "task", "init", "frac", "fold")
MISSING = "—"
TOLERANCE = 1e-9

# The headline metrics of each task: (metrics key, column label, decimals).
HEADLINES: dict[str, tuple[tuple[str, str, int], ...]] = {
    "classification": (("mauc", "mAUC", 3),),
    "regression": (("mae", "MAE (years)", 2),),
    "segmentation": (("dice_WT", "Dice WT", 3), ("dice_TC", "Dice TC", 3),
                     ("dice_ET", "Dice ET", 3)),
}
# Every metric ``evaluate_predictions`` returns, as run-table columns.
METRIC_KEYS = ("n", "mauc", "accuracy", "mae", "dice_WT", "dice_TC", "dice_ET", "dice_mean")
# The paper's published test results (Jun et al. 2021, Table 1, pre-trained model).
PAPER = {"mauc": 0.835, "mae": 3.49, "dice_WT": 0.873, "dice_TC": 0.697, "dice_ET": 0.588}
PAPER_ROW = "paper (Jun et al.)"
BASELINE_ROW = "chance / baseline"
CHANCE_MAUC = 0.5
INIT_TITLES = {"pretrained": "with transformer (pretrained)",
               "notransformer": "w/o transformer (notransformer)"}


# ---------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunId:
    """Who a fine-tuning run is, as its output path says."""

    dataset: str
    task: str
    init: str
    frac: int
    fold: int


def parse_run_path(path: str | Path) -> RunId:
    """A run's identity from ``.../<dataset>/task-<task>/init-<init>_frac-<frac>/fold-<k>/<file>``.

    ``path`` is a file in the run's fold directory (metrics.json, predictions.tsv) or
    that directory. Only the last components are read, so any results root works.
    """
    p = Path(path)
    parts = p.parts if p.name.startswith("fold-") else p.parts[:-1]
    expected = ("expected .../<dataset>/task-<task>/init-<init>_frac-<frac>/fold-<k>/"
                "metrics.json")
    if len(parts) < 4:
        raise MedtxError(f"{path}: not a fine-tuning run path ({expected})")
    dataset, task_dir, run_dir, fold_dir = parts[-4:]
    problems = []
    task = task_dir[len("task-"):] if task_dir.startswith("task-") else None
    if task not in TASKS:
        problems.append(f"{task_dir!r} is not task-<{'|'.join(TASKS)}>")
    init, sep, frac_text = run_dir.partition("_frac-")
    init = init[len("init-"):] if init.startswith("init-") and sep else None
    if init not in INITS:
        problems.append(f"{run_dir!r} is not init-<{'|'.join(INITS)}>_frac-<percent>")
    frac = int(frac_text) if frac_text.isdigit() else -1
    if init in INITS and not 0 < frac <= 100:
        problems.append(f"label fraction {frac_text!r} is not a percentage 1..100")
    fold_text = fold_dir[len("fold-"):] if fold_dir.startswith("fold-") else ""
    if not fold_text.isdigit():
        problems.append(f"{fold_dir!r} is not fold-<k>")
    if not dataset or dataset in (".", "..", "/"):
        problems.append("no dataset directory")
    if problems:
        raise MedtxError(f"{path}: not a fine-tuning run path: {'; '.join(problems)} "
                         f"({expected})")
    return RunId(dataset, task, init, frac, int(fold_text))


def _read_json(path: Path) -> dict[str, Any]:
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
        return isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) \
            and list(a) == list(b)
    try:
        return math.isclose(float(a), float(b), rel_tol=0.0, abs_tol=TOLERANCE)
    except (TypeError, ValueError):
        return a == b


def _check_identity(run: RunId, stored: Mapping[str, Any], path: Path) -> None:
    """The JSON's own task / init / use_transformer must agree with its path."""
    problems = []
    if "task" in stored and stored["task"] != run.task:
        problems.append(f"task {stored['task']!r} but the path says {run.task!r}")
    init, use_tf = stored.get("init"), stored.get("use_transformer")
    if init is not None and (init == "scratch") != (run.init == "scratch"):
        problems.append(f"init {init!r} but the path says init-{run.init}")
    if use_tf is not None and bool(use_tf) != (run.init != "notransformer"):
        problems.append(f"use_transformer {use_tf} but the path says init-{run.init}")
    if problems:
        raise MedtxError(f"{path}: {'; '.join(problems)}")


def _run_row(path: Path) -> dict[str, Any]:
    from medtx.stages import evaluate_predictions  # torch: import only when reading runs

    run = parse_run_path(path)
    stored = _read_json(path)
    _check_identity(run, stored, path)
    tsv = path.parent / "predictions.tsv"
    metrics, source = stored, "metrics.json (no predictions.tsv to check)"
    if tsv.exists():
        metrics, source = evaluate_predictions(run.task, tsv), "predictions.tsv"
        stale = [f"{k}: stored {stored.get(k, 'nothing')!r}, predictions give {v!r}"
                 for k, v in metrics.items()
                 if k != "task" and (k not in stored or not _same(stored[k], v))]
        if stale:
            raise MedtxError(f"{path}: stale metrics, they disagree with {tsv.name} "
                             f"beside it ({'; '.join(stale)}); rerun the evaluation")
    row: dict[str, Any] = {**run.__dict__}
    for key in METRIC_KEYS:
        value = metrics.get(key)
        row[key] = np.nan if value is None else value
    row.update({key: stored.get(key) for key in ("selected_by", "val_metric", "best_epoch",
                                                 "status")})
    row.update(source=source, metrics_path=str(path),
               predictions_path=str(tsv) if tsv.exists() else "")
    return row


RUN_COLUMNS = (*RUN_KEYS, *METRIC_KEYS, "selected_by", "val_metric", "best_epoch", "status",
               "source", "metrics_path", "predictions_path")


def collect_runs(metrics_paths: Iterable[str | Path]) -> pd.DataFrame:
    """One row per fine-tuning run: identity, test metrics (recomputed), selection info.

    Raises MedtxError on a path that is not a run's, an unreadable or stale metrics
    JSON, or two files for one run.
    """
    rows = [_run_row(Path(p)) for p in metrics_paths]
    runs = pd.DataFrame(rows, columns=list(RUN_COLUMNS))
    dup = runs[runs.duplicated(list(RUN_KEYS), keep=False)]
    if not dup.empty:
        raise MedtxError("several metrics files for one run: "
                         + ", ".join(dup["metrics_path"].tolist()))
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
    with rotating folds, the other folds' test scans are this rotation's training and
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


def _baseline_cell(runs: pd.DataFrame, col: _Column, baselines: Mapping[str, float] | None,
                   frac: int) -> str:
    given = dict(baselines or {})
    if col.task in given and given[col.task] is not None:
        return f"{float(given[col.task]):.{col.digits}f}"
    if col.key == "mauc":
        return f"{CHANCE_MAUC:.{col.digits}f}"
    if col.key != "mae":
        return MISSING
    mask = ((runs["task"] == "regression") & (runs["frac"] == frac)
            & (runs["predictions_path"] != ""))
    if col.dataset is not None:
        mask &= runs["dataset"] == col.dataset
    tsvs: dict[int, str] = {}
    for fold, tsv in zip(runs.loc[mask, "fold"], runs.loc[mask, "predictions_path"]):
        tsvs.setdefault(int(fold), tsv)  # a fold's test scans are the same for every init
    return format_mean_std(mean_age_baseline(tsvs).values(), col.digits)


# ---------------------------------------------------------------------------- tables


def table1(runs: pd.DataFrame, *, baselines: Mapping[str, float] | None = None,
           frac: int = 100) -> pd.DataFrame:
    """Table 1: each task's headline metric per initialization at ``frac`` % labels.

    Rows: scratch, pretrained, notransformer (when run), the chance / baseline row
    (chance mAUC 0.5; MAE of predicting the mean age, from ``baselines["regression"]``
    when given, else ``mean_age_baseline``), and the paper's published values.
    ``baselines`` maps a task to its baseline headline value (overrides the defaults).
    """
    cols = _columns(runs)
    inits = [i for i in INITS if i != "notransformer" or (runs["init"] == i).any()]
    rows = [{"init": init, **_init_row(runs, cols, init=init, frac=frac),
             "source": "reproduced"} for init in inits]
    rows.append({"init": BASELINE_ROW,
                 **{c.label: _baseline_cell(runs, c, baselines, frac) for c in cols},
                 "n folds": MISSING, "source": "baseline"})
    rows.append({"init": PAPER_ROW,
                 **{c.label: f"{PAPER[c.key]:.{c.digits}f}" for c in cols},
                 "n folds": MISSING, "source": "published, not reproduced"})
    return pd.DataFrame(rows, columns=["init", *[c.label for c in cols], "n folds", "source"])


def table3(rows: Sequence[Mapping[str, Any]] | None = None) -> pd.DataFrame:
    """Table 3: trainable parameters per task and preset, with the paper's printed figure.

    ``rows`` defaults to ``medtx.models.slice_transformer.params_table()``.
    """
    if rows is None:
        from medtx.models.slice_transformer import params_table
        rows = params_table()
    out = []
    for r in rows:
        n, printed = int(r["parameters"]), str(r.get("paper") or "")
        out.append({"task": r["task"], "preset": r["preset"],
                    "in channels": r["in_channels"], "outputs": r["num_outputs"],
                    "parameters": f"{n:,}", "paper (printed)": printed or MISSING,
                    "matches paper": (MISSING if not printed
                                      else "yes" if _printed_match(n, printed) else "no")})
    return pd.DataFrame(out)


def _printed_match(n: int, printed: str) -> bool:
    """The paper prints millions to 3 decimals, truncated (2,401,777 -> 2.401M)."""
    return printed in (f"{n // 1000 / 1000:.3f}M", f"{n / 1e6:.3f}M")


def table4(runs: pd.DataFrame, *, fractions: Sequence[int] = FRACTIONS,
           inits: Sequence[str] = ("pretrained", "scratch")) -> pd.DataFrame:
    """Table 4: headline metrics per label fraction (rows), pre-trained vs scratch."""
    cols = _columns(runs)
    fracs = sorted(set(fractions) | set(runs["frac"].astype(int)))
    rows = []
    for frac in fracs:
        row: dict[str, Any] = {"label fraction (%)": frac}
        counts = []
        for col in cols:
            for init in inits:
                values = _finite(_select(runs, col, init=init, frac=frac))
                row[f"{col.label}, {init}"] = format_mean_std(values, col.digits)
                counts.append(len(values))
        row["n folds"] = _n_folds(counts)
        rows.append(row)
    return pd.DataFrame(rows)


def table5(runs: pd.DataFrame, *, frac: int = 100) -> pd.DataFrame:
    """Table 5: with vs without the transformer (both from pre-trained encoders)."""
    cols = _columns(runs)
    rows = [{"model": INIT_TITLES[init], **_init_row(runs, cols, init=init, frac=frac)}
            for init in ("pretrained", "notransformer")]
    return pd.DataFrame(rows, columns=["model", *[c.label for c in cols], "n folds"])


# ---------------------------------------------------------------------------- writing


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub pipe table (no tabulate needed); number columns right-aligned."""
    def cell(v: Any) -> str:
        return MISSING if v is None or (isinstance(v, float) and np.isnan(v)) else \
            str(v).replace("|", "\\|").replace("\n", " ")

    def numeric(column: pd.Series) -> bool:
        shown = [cell(v) for v in column if cell(v) != MISSING]
        return bool(shown) and all(s[:1].isdigit() or s[:1] == "-" for s in shown)

    header = "| " + " | ".join(cell(c) for c in df.columns) + " |"
    align = "|" + "|".join("---:" if i and numeric(df.iloc[:, i]) else ":---"
                           for i in range(len(df.columns))) + "|"
    body = ["| " + " | ".join(cell(v) for v in rec) + " |"
            for rec in df.itertuples(index=False, name=None)]
    return "\n".join([header, align, *body]) + "\n"


def write_table(df: pd.DataFrame, tsv_path: str | Path, md_path: str | Path, *,
                caption: str) -> tuple[Path, Path]:
    """Write ``df`` as a TSV (data only) and as Markdown (bold caption + pipe table)."""
    with atomic_path(tsv_path) as tmp:
        df.to_csv(tmp, sep="\t", index=False)
    write_text(f"**{caption}**\n\n{to_markdown(df)}", md_path)
    return Path(tsv_path), Path(md_path)


CAPTIONS = {
    "table1": ("Table 1. Test performance at 100 % labels, mean ± std over folds: "
               "mAUC (AD/MCI/CN), MAE in years (brain age), Dice (BraTS WT/TC/ET). "
               "Chance / baseline: mAUC 0.5; MAE of predicting the mean age of the other "
               "folds' test labels unless a baseline was given. The paper row is the "
               "published result (Jun et al. 2021), not reproduced here."),
    "table3": ("Table 3. Trainable parameters per task. Preset table3 (d = 64, d_ff = 128) "
               "matches the paper's printed counts; paper_text (d_emb 16, d_ff 64, as the "
               "paper's text states) does not, so the text and Table 3 disagree."),
    "table4": ("Table 4. Test performance by label fraction, pre-trained vs trained from "
               "scratch, mean ± std over folds."),
    "table5": ("Table 5. With vs without the transformer: pre-trained encoders with the "
               "fine-tuned slice transformer, or the encoders alone, at 100 % labels."),
}


def _note(runs: pd.DataFrame) -> str:
    datasets = sorted(runs["dataset"].unique())
    n_folds = runs.groupby(["dataset", "task"])["fold"].nunique()
    folds = f"{n_folds.min()}–{n_folds.max()}" if len(n_folds) and n_folds.min() != n_folds.max() \
        else str(n_folds.max() if len(n_folds) else 0)
    what = (f"{len(runs)} fine-tuning run(s) on {', '.join(datasets) or 'no dataset'}, "
            f"{folds} fold(s) per task")
    if any(d.startswith("demo") for d in datasets):
        return (f"These tables summarize {what}. The demo cohort is synthetic and tiny "
                "(a handful of generated scans, few epochs on downsampled volumes), so the "
                "numbers only show that the workflow runs end to end; they are not "
                "comparable to the paper's, whose row is quoted from the publication, not "
                "reproduced.")
    return (f"These tables summarize {what}. Metrics are recomputed from each run's "
            "predictions. The paper row is quoted from the publication, not reproduced; "
            "compare with it only where cohort, preprocessing and protocol match.")


def build_tables(metrics_paths: Iterable[str | Path], out_dir: str | Path, *,
                 baselines: Mapping[str, float] | None = None,
                 note: str | None = None) -> dict[str, Path]:
    """Write table1/3/4/5 (.tsv, .md), runs.tsv (every run) and summary.md to ``out_dir``.

    Returns {"table1_tsv", "table1_md", ..., "runs", "summary"} -> path.
    """
    out = Path(out_dir)
    runs = collect_runs(metrics_paths)
    tables = {"table1": table1(runs, baselines=baselines), "table3": table3(),
              "table4": table4(runs), "table5": table5(runs)}
    written: dict[str, Path] = {}
    for name, df in tables.items():
        written[f"{name}_tsv"], written[f"{name}_md"] = write_table(
            df, out / f"{name}.tsv", out / f"{name}.md", caption=CAPTIONS[name])
    with atomic_path(out / "runs.tsv") as tmp:
        runs.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    written["runs"] = out / "runs.tsv"
    parts = ["# Medical Transformer reproduction: results\n", note or _note(runs), ""]
    parts += [f"**{CAPTIONS[name]}**\n\n{to_markdown(df)}" for name, df in tables.items()]
    written["summary"] = write_text("\n".join(parts), out / "summary.md")
    return written


# ---------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _read_predictions(tsvs: Sequence[str | Path]) -> list[pd.DataFrame]:
    if not tsvs:
        raise MedtxError("no prediction files to plot")
    return [pd.read_csv(p, sep="\t", dtype={"scan": str, "subject": str}) for p in tsvs]


def _save(fig, out_png: str | Path) -> Path:
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    _pyplot().close(fig)
    return Path(out_png)


def plot_roc(predictions_tsvs: Sequence[str | Path], out_png: str | Path, *,
             class_names: Sequence[str] | None = None, title: str = "ROC") -> Path:
    """One-vs-rest ROC curve per class, predictions pooled over folds."""
    from sklearn.metrics import auc, roc_curve

    table = pd.concat(_read_predictions(predictions_tsvs), ignore_index=True)
    probs = sorted((c for c in table.columns if c.startswith("p_")), key=lambda c: int(c[2:]))
    if not probs or table[probs].isna().any().any():
        raise MedtxError(f"classification predictions need p_0..p_K-1 in every file "
                         f"({list(map(str, predictions_tsvs))})")
    y = table["label"].astype(int).to_numpy()
    fig, ax = _pyplot().subplots(figsize=(4, 4))
    for c, col in enumerate(probs):
        name = class_names[c] if class_names else f"class {c}"
        if 0 < (y == c).sum() < len(y):
            fpr, tpr, _ = roc_curve(y == c, table[col].to_numpy(float))
            ax.plot(fpr, tpr, label=f"{name} (AUC {auc(fpr, tpr):.2f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate",
           title=f"{title} (n = {len(y)}, {len(predictions_tsvs)} fold(s))")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(fig, out_png)


def _fold_label(path: str | Path) -> str:
    try:
        return f"fold {parse_run_path(path).fold}"
    except MedtxError:
        return Path(path).parent.name or str(path)


def plot_age(predictions_tsvs: Sequence[str | Path], out_png: str | Path, *,
             title: str = "Brain age") -> Path:
    """Predicted vs true age, one colour per fold, identity line, pooled MAE in the title."""
    tables = _read_predictions(predictions_tsvs)
    fig, ax = _pyplot().subplots(figsize=(4, 4))
    for path, t in zip(predictions_tsvs, tables):
        ax.scatter(t["label"], t["prediction"], s=12, label=_fold_label(path))
    both = pd.concat(tables, ignore_index=True)[["label", "prediction"]].to_numpy(float)
    lo, hi = float(np.nanmin(both)), float(np.nanmax(both))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    mae = float(np.nanmean(np.abs(both[:, 1] - both[:, 0])))
    ax.set(xlabel="true age (years)", ylabel="predicted age (years)",
           title=f"{title}: MAE {mae:.2f} y (n = {len(both)})")
    if len(tables) <= 10:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out_png)


def _history(h: Any) -> list[Mapping[str, Any]]:
    """A history list, or the "history" of a checkpoint / metadata dict."""
    return list(h["history"]) if isinstance(h, Mapping) else list(h)


def plot_curves(histories: Sequence[Mapping[str, Any]] | Mapping[str, Any],
                out_png: str | Path, *, val_label: str = "validation metric") -> Path:
    """Training loss and validation metric per epoch.

    ``histories``: one history (a list of {"epoch", "train_loss", "val_metric"} dicts,
    as ``medtx.training`` stores in checkpoints), a dict with a "history" key, or a
    mapping run name -> either of those for several runs on one figure.
    """
    if isinstance(histories, Mapping) and "history" not in histories:
        runs = {str(k): _history(v) for k, v in histories.items()}
    else:
        runs = {"run": _history(histories)}
    if not any(runs.values()):
        raise MedtxError("no training history to plot (no completed epoch)")
    fig, (ax_loss, ax_val) = _pyplot().subplots(1, 2, figsize=(7, 3))
    for name, hist in runs.items():
        epochs = [e.get("epoch", i) for i, e in enumerate(hist)]
        for ax, key in ((ax_loss, "train_loss"), (ax_val, "val_metric")):
            values = [np.nan if e.get(key) is None else float(e[key]) for e in hist]
            ax.plot(epochs, values, marker=".", label=name)
    ax_loss.set(xlabel="epoch", ylabel="training loss")
    ax_val.set(xlabel="epoch", ylabel=val_label)
    if len(runs) > 1:
        ax_val.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out_png)


REGION_COLOURS = {"WT": "#2ca02c", "TC": "#ffbf00", "ET": "#d62728"}


def plot_segmentation(checkpoint: str | Path, cases: Sequence[Mapping[str, Any]],
                      out_png: str | Path, *, title: str = "Segmentation") -> Path:
    """Per case, the axial slice with the most tumour: FLAIR with the reference
    WT/TC/ET outlines (left) and the model's (right), at the model's input size.

    ``cases``: {"scan", "image" (.npy cache), "seg" (.npy region cache)} dicts.
    """
    import torch

    from medtx.metrics import BRATS_REGIONS
    from medtx.stages import VolumeSet, model_from_checkpoint

    if not cases:
        raise MedtxError("no segmentation cases to draw")
    model, ckpt = model_from_checkpoint(checkpoint)
    data = VolumeSet(list(cases), task="segmentation",
                     downsample=int((ckpt.get("metadata") or {}).get("downsample", 1)))
    fig, axes = _pyplot().subplots(len(data), 2, figsize=(6, 3 * len(data)), squeeze=False)
    for i in range(len(data)):
        sample = data[i]
        with torch.no_grad():
            # the same binarization as the Dice the run was scored with (dice_per_case)
            pred = (model(sample["image"][None]).float()[0] > 0).numpy()
        truth = sample["target"].numpy() > 0.5
        z = int(np.argmax(truth[0].sum(axis=(0, 1)))) if truth[0].any() else truth.shape[-1] // 2
        flair = sample["image"][-1, :, :, z].numpy().T
        for ax, masks, name in ((axes[i, 0], truth, "reference"), (axes[i, 1], pred, "model")):
            ax.imshow(flair, cmap="gray", origin="lower")
            for r, region in enumerate(BRATS_REGIONS):
                if masks[r, :, :, z].any():
                    ax.contour(masks[r, :, :, z].T.astype(float), levels=[0.5], linewidths=1,
                               colors=REGION_COLOURS[region])
            ax.set_title(f"{cases[i].get('scan', i)}: {name}", fontsize=8)
            ax.axis("off")
    fig.suptitle(f"{title} (WT green, TC yellow, ET red)", fontsize=9)
    fig.tight_layout()
    return _save(fig, out_png)


def figures_section(pngs: Iterable[str | Path], relative_to: str | Path) -> str:
    """Markdown for summary.md: every figure in name order, captioned by its file stem."""
    lines = ["## Figures", ""]
    for png in sorted(map(Path, pngs)):
        lines += [f"![{png.stem}]({png.relative_to(relative_to).as_posix()})", ""]
    return "\n".join(lines)
