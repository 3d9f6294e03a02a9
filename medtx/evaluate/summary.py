"""``medtx evaluate``: the tables, then per run group its figures, all in summary.md.

A group is one dataset x task x init x label fraction, its folds pooled. Each
run's identity and cache index are read from what the run recorded (its
metrics JSON and checkpoint), never from its folder names.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from medtx.data.cache import read_cache_index
from medtx.evaluate.figures import (
    figures_section,
    plot_age,
    plot_curves,
    plot_roc,
    plot_segmentation,
)
from medtx.evaluate.tables import build_tables
from medtx.train.loop import load_state

OVERLAY_CASES = 2  # test cases drawn per segmentation group


def evaluate_runs(
    metrics_paths: Sequence[str | Path], out_dir: str | Path, summary: str | Path | None = None
) -> Path:
    """Tables 1/3/4/5 and figures for every run group; returns summary.md's path.

    Figures: ROC (classification) and predicted-vs-true age (regression) over the
    pooled folds, segmentation overlays of the first fold's first test cases, and
    every group's training curves.
    """
    out = Path(out_dir)
    written = build_tables(metrics_paths, out)
    runs = _read_runs(written["runs"])
    for (dataset, task, init, frac), group in runs.groupby(["dataset", "task", "init", "frac"]):
        group = group.sort_values("fold")
        name = out / f"{dataset}_task-{task}_init-{init}_frac-{frac}"
        folders = [Path(p).parent for p in group["metrics_path"]]
        predictions = [f / "predictions.tsv" for f in folders]
        checkpoints = {
            f"fold {k}": load_state(f / "model.pt") for k, f in zip(group["fold"], folders)
        }
        if task == "classification":
            plot_roc(predictions, f"{name}_roc.png", title=f"ROC, {dataset}, {init}")
        elif task == "regression":
            plot_age(
                predictions,
                f"{name}_age.png",
                title=f"Brain age, {dataset}, {init}",
                labels=list(checkpoints),
            )
        else:
            first = next(iter(checkpoints.values()))
            _draw_segmentation(
                folders[0],
                first,
                f"{name}_overlay.png",
                title=f"{dataset}, {init}, fold {group['fold'].iloc[0]}",
            )
        plot_curves({k: c.get("history", []) for k, c in checkpoints.items()}, f"{name}_curves.png")
    path = Path(summary) if summary else out / "summary.md"
    with path.open("a") as fh:
        fh.write("\n" + figures_section(out.glob("*.png"), path.parent) + "\n")
    return path


def _read_runs(runs_tsv: Path):
    import pandas as pd

    return pd.read_csv(runs_tsv, sep="\t", dtype={"dataset": str, "task": str, "init": str})


def _draw_segmentation(run_dir: Path, checkpoint: dict, out_png: str, *, title: str) -> None:
    """Overlays of the run's first test cases, their files from the run's cache index."""
    import pandas as pd

    index_path = (checkpoint.get("metadata") or {}).get("cache_index")
    if not index_path:
        return  # a run trained outside the workflow: no recorded cache to draw from
    index = read_cache_index(index_path).set_index("scan")
    scans = pd.read_csv(run_dir / "predictions.tsv", sep="\t", dtype={"scan": str})["scan"]
    cases = [
        {"scan": s, "image": index.at[s, "image"], "seg": index.at[s, "regions"]}
        for s in scans[:OVERLAY_CASES]
        if s in index.index
    ]
    if cases:
        plot_segmentation(run_dir / "model.pt", cases, out_png, title=title)
