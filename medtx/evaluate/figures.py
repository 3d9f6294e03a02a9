"""The study's figures: ROC, brain age, training curves, segmentation overlays,
a tokenizer's codebook usage, and per-subgroup metrics with their intervals.

Small Agg PNGs, linked from ``summary.md`` (``figures_section``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medtx.domain import BRATS_REGIONS
from medtx.errors import MedtxError
from medtx.io import atomic_path


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


def plot_roc(
    predictions_tsvs: Sequence[str | Path],
    out_png: str | Path,
    *,
    class_names: Sequence[str] | None = None,
    title: str = "ROC",
) -> Path:
    """One-vs-rest ROC curve per class, predictions pooled over folds."""
    from sklearn.metrics import auc, roc_curve

    table = pd.concat(_read_predictions(predictions_tsvs), ignore_index=True)
    probs = sorted((c for c in table.columns if c.startswith("p_")), key=lambda c: int(c[2:]))
    if not probs or table[probs].isna().any().any():
        raise MedtxError(
            f"classification predictions need p_0..p_K-1 in every file "
            f"({list(map(str, predictions_tsvs))})"
        )
    y = table["label"].astype(int).to_numpy()
    fig, ax = _pyplot().subplots(figsize=(4, 4))
    for c, col in enumerate(probs):
        name = class_names[c] if class_names else f"class {c}"
        if 0 < (y == c).sum() < len(y):
            fpr, tpr, _ = roc_curve(y == c, table[col].to_numpy(float))
            ax.plot(fpr, tpr, label=f"{name} (AUC {auc(fpr, tpr):.2f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="chance")
    ax.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        title=f"{title} (n = {len(y)}, {len(predictions_tsvs)} fold(s))",
    )
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(fig, out_png)


def plot_age(
    predictions_tsvs: Sequence[str | Path],
    out_png: str | Path,
    *,
    title: str = "Brain age",
    labels: Sequence[str] | None = None,
) -> Path:
    """Predicted vs true age, one colour per fold, identity line, pooled MAE in the title.

    ``labels`` name the files in the legend (default: each file's folder name).
    """
    tables = _read_predictions(predictions_tsvs)
    names = list(labels) if labels else [Path(p).parent.name or str(p) for p in predictions_tsvs]
    fig, ax = _pyplot().subplots(figsize=(4, 4))
    for name, t in zip(names, tables):
        ax.scatter(t["label"], t["prediction"], s=12, label=name)
    both = pd.concat(tables, ignore_index=True)[["label", "prediction"]].to_numpy(float)
    lo, hi = float(np.nanmin(both)), float(np.nanmax(both))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    mae = float(np.nanmean(np.abs(both[:, 1] - both[:, 0])))
    ax.set(
        xlabel="true age (years)",
        ylabel="predicted age (years)",
        title=f"{title}: MAE {mae:.2f} y (n = {len(both)})",
    )
    if len(tables) <= 10:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out_png)


def _history(h: Any) -> list[Mapping[str, Any]]:
    """A history list, or the "history" of a checkpoint / metadata dict."""
    return list(h["history"]) if isinstance(h, Mapping) else list(h)


def plot_curves(
    histories: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    out_png: str | Path,
    *,
    val_label: str = "validation metric",
    title: str | None = None,
) -> Path:
    """Training loss and validation metric per epoch.

    ``histories``: one history (a list of {"epoch", "train_loss", "val_metric"} dicts,
    as ``medtx.train.loop`` stores in checkpoints), a dict with a "history" key, or a
    mapping run name -> either of those for several runs on one figure. Without any
    validation metric (pre-training) only the training loss is drawn.
    """
    if isinstance(histories, Mapping) and "history" not in histories:
        runs = {str(k): _history(v) for k, v in histories.items()}
    else:
        runs = {"run": _history(histories)}
    if not any(runs.values()):
        raise MedtxError("no training history to plot (no completed epoch)")
    validated = any(e.get("val_metric") is not None for hist in runs.values() for e in hist)
    keys = ["train_loss", "val_metric"] if validated else ["train_loss"]
    fig, axes = _pyplot().subplots(1, len(keys), figsize=(3.5 * len(keys), 3), squeeze=False)
    for name, hist in runs.items():
        epochs = [e.get("epoch", i) for i, e in enumerate(hist)]
        for ax, key in zip(axes[0], keys):
            values = [np.nan if e.get(key) is None else float(e[key]) for e in hist]
            ax.plot(epochs, values, marker=".", label=name)
    for ax, ylabel in zip(axes[0], ["training loss", val_label]):
        ax.set(xlabel="epoch", ylabel=ylabel)
    if len(runs) > 1:
        axes[0, -1].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, out_png)


def codebook_stats(counts: Sequence[int] | np.ndarray) -> tuple[int, int, float]:
    """A codebook's usage: (codes used, codes in all, perplexity).

    ``counts[k]``: how many tokens picked code k. Used: codes with a count > 0;
    perplexity: exp of the usage distribution's entropy (natural log), the
    number of equally used codes it is worth (1 .. codes used). MedtxError on
    counts that are not a list of non-negative integers summing to more than 0.
    """
    try:
        usage = np.asarray(counts, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise MedtxError(f"codebook usage is not a list of counts ({err})") from err
    if usage.ndim != 1 or not len(usage):
        raise MedtxError(f"codebook usage must be a non-empty list of counts, not {usage.shape}")
    if not np.isfinite(usage).all() or (usage < 0).any() or (usage != np.round(usage)).any():
        raise MedtxError("codebook usage must be non-negative integer counts")
    total = float(usage.sum())
    if total <= 0:
        raise MedtxError(f"codebook usage sums to 0 over {len(usage)} codes: no token was counted")
    p = usage[usage > 0] / total
    entropy = float(-(p * np.log(p)).sum())
    return int((usage > 0).sum()), len(usage), math.exp(entropy)


def plot_codebook(
    counts: Sequence[int] | np.ndarray, out_png: str | Path, *, title: str = "Codebook usage"
) -> Path:
    """Bar chart of how many tokens picked each code, by code index; the codes used
    out of all and the usage perplexity (``codebook_stats``) in the title."""
    used, total, perplexity = codebook_stats(counts)
    usage = np.asarray(counts, dtype=np.float64)
    fig, ax = _pyplot().subplots(figsize=(7, 3))
    if total <= 256:
        ax.bar(np.arange(total), usage, width=1.0, align="edge", color="#1f77b4")
    else:  # thousands of bars: one filled step line draws the same, fast
        ax.stairs(usage, np.arange(total + 1), fill=True, color="#1f77b4")
    ax.set_xlim(0, total)
    ax.set(
        xlabel="code index",
        ylabel="tokens",
        title=f"{title}\n{used} of {total} codes used, perplexity {perplexity:.1f}",
    )
    ax.title.set_fontsize(9)
    fig.tight_layout()
    return _save(fig, out_png)


def plot_subgroups(
    table: pd.DataFrame,
    out_png: str | Path,
    *,
    title: str = "Subgroups",
    max_series: int = 8,
) -> Path:
    """Per-group pooled metric with its bootstrap 95 % CI, one panel per attribute.

    ``table``: one task's rows of ``medtx.evaluate.subgroups.subgroup_metrics``. Each
    run group (dataset, backbone, init, label fraction; the first ``max_series``) is a
    series of points with error bars, "all" first in every panel and dotted across it;
    a group too small (or not computable) is a labelled gap, never a point.
    """
    if table.empty:
        raise MedtxError("no subgroup metrics to plot")
    ident = ["dataset", "backbone", "init", "label fraction (%)"]
    series = list(table.groupby(ident, sort=False))
    shown = series[:max_series]
    attributes = [a for a in dict.fromkeys(table["attribute"]) if a != "all"] or ["all"]
    plt = _pyplot()
    widths = [len(set(table.loc[table["attribute"] == a, "group"])) + 1 for a in attributes]
    fig, axes = plt.subplots(
        len(attributes),
        1,
        figsize=(max(4.5, 0.9 * max(widths) + 2.5), 2.4 * len(attributes) + 0.8),
        squeeze=False,
    )
    step = 0.6 / max(len(shown), 1)
    for ax, attribute in zip(axes[:, 0], attributes):
        # "all" (every test scan) first, then the attribute's groups in table order
        cells = [("all", "all")]
        if attribute != "all":
            groups = table.loc[table["attribute"] == attribute, "group"]
            cells += [(attribute, g) for g in dict.fromkeys(groups)]
        for s, ((dataset, backbone, init, frac), rows) in enumerate(shown):
            offset = (s - (len(shown) - 1) / 2) * step
            found = {(r["attribute"], r["group"]): r for _, r in rows.iterrows()}
            xs: list[float] = []
            ys: list[float] = []
            err: list[list[float]] = [[], []]
            gaps: list[tuple[float, str]] = []
            for x, cell in enumerate(cells):
                r = found.get(cell)
                if r is None:
                    continue
                if r["status"] != "ok" or not np.isfinite(r["value"]):
                    gaps.append((x + offset, "too small" if r["status"] == "too small" else "n/c"))
                    continue
                v = float(r["value"])
                xs.append(x + offset)
                ys.append(v)
                err[0].append(v - float(r["ci_low"]) if np.isfinite(r["ci_low"]) else 0.0)
                err[1].append(float(r["ci_high"]) - v if np.isfinite(r["ci_high"]) else 0.0)
            label = f"{dataset}, {backbone}, {init}, {frac} %"
            bars = ax.errorbar(xs, ys, yerr=err, fmt="o", ms=4, capsize=3, label=label)
            colour = bars[0].get_color()
            reference = found.get(("all", "all"))
            if reference is not None and reference["status"] == "ok":  # the gaps' zero
                ax.axhline(float(reference["value"]), color=colour, ls=":", lw=0.8)
            for gx, text in gaps:  # a labelled gap where no number may be shown
                ax.text(
                    gx, 0.5, text, transform=ax.get_xaxis_transform(), rotation=90,
                    ha="center", va="center", fontsize=7, color=colour, alpha=0.8,
                )  # fmt: skip
        groups = [g for _, g in cells]
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, fontsize=8)
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.set_ylabel(str(table["metric"].iloc[0]), fontsize=8)
        ax.set_title(attribute, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=6, loc="best")
    more = f" (first {len(shown)} of {len(series)} run groups)" if len(series) > len(shown) else ""
    fig.suptitle(f"{title}{more}\npooled folds, bootstrap 95 % CI", fontsize=9)
    fig.tight_layout()
    return _save(fig, out_png)


REGION_COLOURS = {"WT": "#2ca02c", "TC": "#ffbf00", "ET": "#d62728"}


def plot_segmentation(
    checkpoint: str | Path,
    cases: Sequence[Mapping[str, Any]],
    out_png: str | Path,
    *,
    title: str = "Segmentation",
) -> Path:
    """Per case, the axial slice with the most tumour: FLAIR with the reference
    WT/TC/ET outlines (left) and the model's (right), at the model's input size.

    ``cases``: {"scan", "image" (.npy cache), "seg" (.npy region cache)} dicts.
    """
    import torch

    from medtx.train.checkpoints import model_from_checkpoint
    from medtx.train.data import VolumeSet

    if not cases:
        raise MedtxError("no segmentation cases to draw")
    model, ckpt = model_from_checkpoint(checkpoint)
    data = VolumeSet(
        list(cases),
        task="segmentation",
        downsample=int((ckpt.get("metadata") or {}).get("downsample", 1)),
    )
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
                    ax.contour(
                        masks[r, :, :, z].T.astype(float),
                        levels=[0.5],
                        linewidths=1,
                        colors=REGION_COLOURS[region],
                    )
            ax.set_title(f"{cases[i].get('scan', i)}: {name}", fontsize=8)
            ax.axis("off")
    fig.suptitle(f"{title} (WT green, TC yellow, ET red)", fontsize=9)
    fig.tight_layout()
    return _save(fig, out_png)


def figures_section(pngs: Iterable[str | Path], relative_to: str | Path) -> str:
    """Markdown for summary.md: every figure in name order, captioned by its file stem."""
    lines = ["## Figures", ""]
    for png in sorted(map(Path, pngs)):
        lines += [f"![{png.stem}]({relative_link(png, relative_to)})", ""]
    return "\n".join(lines)


def relative_link(path: str | Path, relative_to: str | Path) -> str:
    """``path`` as a Markdown link target relative to the folder ``relative_to``."""
    return Path(os.path.relpath(path, relative_to)).as_posix()
