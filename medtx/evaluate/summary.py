"""``medtx evaluate``: the tables, then per run group its figures, all in summary.md.

A group is one dataset x task x backbone x init x label fraction, its folds pooled.
Each run's identity and cache index are read from what the run recorded (its
metrics JSON and checkpoint), never from its folder names.

Pre-training checkpoints, when given, get a section of their own: per backbone,
each stage's training-loss curve and, for a tokenizer that recorded it, its
codebook usage. Scan tables, when given, add the subgroup metrics
(``medtx.evaluate.subgroups``): a table and a plot per task, and each attribute's
worst group. Every run gets a model card beside its model.pt, and the study a card
summarising them (``medtx.evaluate.cards``), linked from summary.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medtx.data.cache import read_cache_index
from medtx.domain import BACKBONES, DEFAULT_BACKBONE, PRETRAIN_STAGES
from medtx.errors import MedtxError
from medtx.evaluate.cards import PAGES, md_link, write_model_cards, write_study_card
from medtx.evaluate.figures import (
    codebook_stats,
    figures_section,
    plot_age,
    plot_codebook,
    plot_curves,
    plot_roc,
    plot_segmentation,
    plot_subgroups,
)
from medtx.evaluate.subgroups import (
    METRICS,
    read_scan_tables,
    subgroup_metrics,
    subgroup_settings,
    worst_lines,
    write_subgroup_tables,
)
from medtx.evaluate.tables import build_tables, md_text
from medtx.io import write_text
from medtx.pages import macros
from medtx.train.checkpoints import load_state

OVERLAY_CASES = 2  # test cases drawn per segmentation group
GROUP_KEYS = ["dataset", "task", "backbone", "init", "frac"]
PRETRAIN_DIR = "pretrain"  # pre-training figures: a subfolder, apart from "## Figures"
SUBGROUP_DIR = "subgroups"  # subgroup plots: a subfolder too
# summary.md's sections after the tables (templates/summary.md.j2's macros)
SECTIONS = macros(PAGES, "summary.md.j2")
# A pre-training stage's name (after "pretrain_"): it names figure files and summary lines.
STAGE_NAME = re.compile(r"[A-Za-z0-9_]+")


def evaluate_runs(
    metrics_paths: Sequence[str | Path],
    out_dir: str | Path,
    summary: str | Path | None = None,
    pretrain: Sequence[str | Path] = (),
    attributes: Sequence[str | Path] = (),
    subgroup_config: Mapping[str, Any] | None = None,
) -> Path:
    """Tables 1/3/4/5 and figures for every run group; returns summary.md's path
    (``summary``, default ``out_dir``/summary.md: the tables, then the figures).

    Figures: ROC (classification) and predicted-vs-true age (regression) over the
    pooled folds, segmentation overlays of the first fold's first test cases, and
    every group's training curves. ``pretrain``: pre-training checkpoints (any
    backbone's stages), summarized in a "## Pre-training" section. ``attributes``: the
    workflow's scan tables (``results/scans/<dataset>.tsv``); with them, subgroup
    metrics (``medtx.evaluate.subgroups``, settings ``subgroup_config`` over
    ``SUBGROUP_DEFAULTS``) in subgroups_<task>.tsv/.md and a "## Subgroups" section.
    Model cards: model_card.md in every run's folder (attributes "not recorded"
    without scan tables) and the study card ``out_dir``/model_cards.md, linked from a
    "## Model cards" section.
    """
    out = Path(out_dir)
    stages = [_read_pretrain(p) for p in pretrain]  # checked before anything is drawn
    _refuse_duplicate_stages(stages)
    settings = subgroup_settings(subgroup_config)
    scans = read_scan_tables(attributes) if attributes else None
    written = build_tables(metrics_paths, out)
    runs = _read_runs(written["runs"])
    cards = write_model_cards(runs, attributes=scans, subgroup_settings=settings)
    study_card = write_study_card(runs, cards, out)
    for (dataset, task, backbone, init, frac), group in runs.groupby(GROUP_KEYS):
        group = group.sort_values("fold")
        name = out / f"{dataset}_task-{task}_backbone-{backbone}_init-{init}_frac-{frac}"
        who = f"{dataset}, {backbone}, {init}"
        folders = [Path(p).parent for p in group["metrics_path"]]
        predictions = [f / "predictions.tsv" for f in folders]
        checkpoints = {
            f"fold {k}": load_state(f / "model.pt") for k, f in zip(group["fold"], folders)
        }
        if task == "classification":
            plot_roc(predictions, f"{name}_roc.png", title=f"ROC, {who}")
        elif task == "regression":
            plot_age(
                predictions,
                f"{name}_age.png",
                title=f"Brain age, {who}",
                labels=list(checkpoints),
            )
        else:
            first = next(iter(checkpoints.values()))
            _draw_segmentation(
                folders[0],
                first,
                f"{name}_overlay.png",
                title=f"{who}, fold {group['fold'].iloc[0]}",
            )
        plot_curves(
            {k: c.get("history", []) for k, c in checkpoints.items()},
            f"{name}_curves.png",
            title=f"{task}, {who}, {frac} % labels",
        )
    path = Path(summary) if summary else written["summary"]
    sections = [SECTIONS.cards(len(cards), md_link(study_card, path.parent))]
    if scans is not None:
        sections.append(subgroups_section(runs, scans, settings, out, path.parent))
    if stages:
        sections.append(pretrain_section(stages, out / PRETRAIN_DIR, path.parent))
    sections.append(figures_section(out.glob("*.png"), path.parent))
    # the tables' summary.md, then the figures: at ``summary`` wherever it is
    text = written["summary"].read_text() + "".join("\n" + s + "\n" for s in sections)
    return write_text(text, path)


def _read_runs(runs_tsv: Path):
    import pandas as pd

    return pd.read_csv(
        runs_tsv, sep="\t", dtype={"dataset": str, "task": str, "backbone": str, "init": str}
    )


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


# ---------------------------------------------------------------------------- subgroups


def subgroups_section(
    runs,
    scans,
    settings: Mapping[str, Any],
    out_dir: Path,
    relative_to: str | Path,
) -> str:
    """Subgroup metrics of every run group: subgroups_<task>.tsv/.md in ``out_dir``, a
    plot per task (its largest label fraction's run groups) in ``out_dir``/subgroups,
    and summary.md's "## Subgroups" section: per task the table, each attribute's
    worst group and the plot, linked relative to ``relative_to``."""
    table = subgroup_metrics(
        runs,
        scans,
        age_bands=settings["age_bands"],
        min_group=settings["min_group"],
        bootstrap=settings["bootstrap"],
        seed=settings["seed"],
    )
    written = write_subgroup_tables(table, out_dir)
    # worst_lines writes group names (sites, diagnoses: free text) as they are
    shown = table.assign(**{c: table[c].map(md_text) for c in ("dataset", "group")})
    tasks = []
    for task, (_, md) in written.items():
        rows = table[table["task"] == task]
        frac = int(rows["label fraction (%)"].max())
        png = plot_subgroups(
            rows[rows["label fraction (%)"] == frac],
            out_dir / SUBGROUP_DIR / f"subgroups_{task}.png",
            title=f"{task}: {METRICS[task].label} per subgroup, {frac} % labels",
        )
        tasks.append(
            {
                "task": task,
                "table": md.read_text().rstrip(),
                "worst": worst_lines(shown, task),
                "link": md_link(png, relative_to),
            }
        )
    return str(SECTIONS.subgroups(tasks))


# ---------------------------------------------------------------------------- pre-training


@dataclass(frozen=True)
class PretrainStage:
    """What summary.md shows of one pre-training checkpoint."""

    path: Path
    backbone: str
    stage: str  # as in medtx.domain.PRETRAIN_STAGES: "exemplar", "tokenizer", ...
    history: list[Mapping[str, Any]]
    epochs: int
    codebook_usage: list[int] | None


def _read_pretrain(path: str | Path) -> PretrainStage:
    """A pre-training checkpoint's stage, backbone, history and codebook usage, checked.

    MedtxError naming the file when it is unreadable, not a pre-training stage's,
    has no completed epoch, or records a codebook usage that sums to 0.
    """
    path = Path(path)
    ckpt = load_state(path)  # names the file when unreadable
    meta = ckpt.get("metadata") if isinstance(ckpt, Mapping) else None
    stage = str((meta or {}).get("stage") or "")
    if not isinstance(meta, Mapping) or not stage.startswith("pretrain_"):
        raise MedtxError(
            f"{path}: not a pre-training checkpoint (metadata stage {stage or 'missing'!r}, "
            "expected pretrain_<stage>)"
        )
    if not STAGE_NAME.fullmatch(stage.removeprefix("pretrain_")):
        # it names figure files ("../" would write elsewhere) and summary lines
        raise MedtxError(
            f"{path}: metadata stage {stage!r} is not pretrain_<stage> with a stage name of "
            "letters, digits and _"
        )
    kwargs = meta.get("model_kwargs")
    backbone = str(
        (kwargs if isinstance(kwargs, Mapping) else {}).get("backbone", DEFAULT_BACKBONE)
    )
    if backbone not in BACKBONES:
        raise MedtxError(f"{path}: backbone {backbone!r} is not one of {list(BACKBONES)}")
    history = list(ckpt.get("history") or [])
    if not history:
        raise MedtxError(f"{path}: no training history (no completed epoch of {stage})")
    usage = meta.get("codebook_usage")
    if usage is not None:
        try:
            codebook_stats(usage)
        except MedtxError as err:
            raise MedtxError(f"{path}: {err}") from err
    epochs = ckpt.get("epochs_done")
    return PretrainStage(
        path=path,
        backbone=backbone,
        stage=stage.removeprefix("pretrain_"),
        history=history,
        epochs=epochs if isinstance(epochs, int) and not isinstance(epochs, bool) else len(history),
        codebook_usage=None if usage is None else [int(c) for c in usage],
    )


def _refuse_duplicate_stages(stages: Sequence[PretrainStage]) -> None:
    seen: dict[tuple[str, str], Path] = {}
    for s in stages:
        key = (s.backbone, s.stage)
        if key in seen:
            raise MedtxError(
                f"two checkpoints of pre-training stage {s.stage} ({s.backbone}): "
                f"{seen[key]} and {s.path}"
            )
        seen[key] = s.path


def _stage_order(s: PretrainStage) -> tuple[int, int, str]:
    known = PRETRAIN_STAGES.get(s.backbone, ())
    rank = known.index(s.stage) if s.stage in known else len(known)
    return BACKBONES.index(s.backbone), rank, s.stage


def pretrain_section(
    stages: Sequence[PretrainStage], fig_dir: str | Path, relative_to: str | Path
) -> str:
    """Draw each stage's figures into ``fig_dir`` and return summary.md's
    "## Pre-training" section: per backbone, a line per stage (epochs, final training
    loss, a tokenizer's codebook usage) and its figures, linked relative to
    ``relative_to``."""
    fig_dir = Path(fig_dir)
    shown = []
    backbone = None
    for s in sorted(stages, key=_stage_order):
        stem = fig_dir / f"{s.backbone}_stage-{s.stage}"
        pngs = [plot_curves(s.history, f"{stem}_loss.png", title=f"{s.backbone}, {s.stage} stage")]
        loss = s.history[-1].get("train_loss")
        codes = None
        if s.codebook_usage is not None:
            codes = codebook_stats(s.codebook_usage)
            pngs.append(
                plot_codebook(
                    s.codebook_usage,
                    f"{stem}_codebook.png",
                    title=f"{s.backbone}, {s.stage}: codebook usage",
                )
            )
        shown.append(
            {
                "first_of_backbone": s.backbone != backbone,
                "backbone": s.backbone,
                "stage": s.stage,  # letters, digits and _ (_read_pretrain)
                "epochs": s.epochs,
                "loss": "—" if loss is None else f"{float(loss):.4g}",
                "codes": codes,
                "name": s.path.name,
                "figures": [{"stem": p.stem, "link": md_link(p, relative_to)} for p in pngs],
            }
        )
        backbone = s.backbone
    return str(SECTIONS.pretrain(shown))
