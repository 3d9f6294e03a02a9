"""``evaluate_runs``: figures per backbone's run group, and the pre-training section
(training-loss curves, a tokenizer's codebook usage) from fake checkpoints saved in
the format ``medtx.train.loop`` writes (``metadata``, ``history``, ``epochs_done``).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from medtx.errors import MedtxError
from medtx.evaluate import figures
from medtx.evaluate.summary import evaluate_runs
from tests.unit.evaluate.test_tables import (
    CLS,
    MT,
    PUMIT,
    REG,
    REG_LABELS,
    assert_png,
    cls_table,
    reg_table,
    write_run,
)


def history(n: int, start: float = 1.0, val: bool = False) -> list[dict]:
    return [
        {"epoch": e, "train_loss": start / (e + 1), "val_metric": 0.5 + 0.1 * e if val else None}
        for e in range(n)
    ]


def save_checkpoint(path: Path, metadata: dict, hist: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"metadata": metadata, "history": hist, "epochs_done": len(hist)}, path)
    return path


def pretrain_checkpoint(
    root: Path, backbone: str | None, stage: str, n: int, usage: list[int] | None = None
) -> Path:
    """A pre-training stage's checkpoint; ``backbone=None``: model_kwargs without one
    (a Medical Transformer checkpoint from before PUMIT)."""
    kwargs = {"preset": "x"} if backbone is None else {"preset": "x", "backbone": backbone}
    meta: dict = {"stage": f"pretrain_{stage}", "task": "pretrain", "model_kwargs": kwargs}
    if usage is not None:
        meta["codebook_usage"] = usage
    return save_checkpoint(root / f"stage-{stage}.pt", meta, history(n, start=2.0))


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    """Regression (both backbones, pretrained) and classification (PUMIT, scratch) on
    2 folds at 100 %, each run folder with a model.pt holding its history."""
    root = tmp_path / "results"
    paths = []
    for fold in (0, 1):
        for backbone in (MT, PUMIT):
            paths.append(
                write_run(
                    root, "demo_adni", REG, "pretrained", 100, fold,
                    reg_table(REG_LABELS[fold], 2.0), backbone=backbone,
                )
            )  # fmt: skip
        paths.append(
            write_run(root, "demo_adni", CLS, "scratch", 100, fold, cls_table(fold), backbone=PUMIT)
        )
    for p in paths:
        save_checkpoint(p.parent / "model.pt", {}, history(3, val=True))
    return paths


# ---------------------------------------------------------------------------- codebook


@pytest.mark.parametrize(
    "counts, expected",
    [
        ([2, 2, 0, 0], (2, 4, 2.0)),  # two codes, equally used: perplexity 2
        ([7, 7, 7, 7], (4, 4, 4.0)),
        ([0, 5, 0], (1, 3, 1.0)),  # one code only: entropy 0
        # p = (1/4, 3/4): H = 1/4 ln 4 + 3/4 ln 4/3 = 0.5623, exp(H) = 1.7548
        ([1, 3], (2, 2, math.exp(0.25 * math.log(4) + 0.75 * math.log(4 / 3)))),
    ],
)
def test_codebook_stats(counts, expected):
    used, total, perplexity = figures.codebook_stats(counts)
    assert (used, total) == expected[:2]
    assert perplexity == pytest.approx(expected[2], rel=1e-12)
    assert figures.codebook_stats([1, 3])[2] == pytest.approx(1.7548, abs=1e-4)


@pytest.mark.parametrize(
    "counts, why",
    [([0, 0, 0], "sums to 0"), ([], "non-empty"), ([1, -1], "non-negative"), ([0.5, 1], "integer")],
)
def test_codebook_stats_refuses_bad_usage(counts, why):
    with pytest.raises(MedtxError, match=why):
        figures.codebook_stats(counts)


def test_plot_codebook_draws_few_and_many_codes(tmp_path):
    assert_png(figures.plot_codebook([2, 2, 0, 0], tmp_path / "few.png", title="tokenizer"))
    many = [(k * 7919) % 13 for k in range(4096)]
    assert_png(figures.plot_codebook(many, tmp_path / "many.png"))
    with pytest.raises(MedtxError, match="sums to 0"):
        figures.plot_codebook([0, 0], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_plot_curves_without_validation_draws_the_loss_alone(tmp_path):
    from matplotlib.image import imread

    both = imread(figures.plot_curves(history(4, val=True), tmp_path / "both.png"))
    loss = imread(figures.plot_curves(history(4), tmp_path / "loss.png", title="pre-training"))
    assert loss.shape[1] < both.shape[1]  # one panel, not an empty validation panel


# ---------------------------------------------------------------------------- evaluate_runs


def test_evaluate_runs_names_the_backbone_in_each_group(runs, tmp_path):
    out = tmp_path / "tables"
    summary = evaluate_runs(runs, out).read_text()
    group = "demo_adni_task-{}_backbone-{}_init-{}_frac-100"
    for task, backbone, init, kind in (
        (REG, MT, "pretrained", "age"),
        (REG, PUMIT, "pretrained", "age"),
        (CLS, PUMIT, "scratch", "roc"),
    ):
        for fig in (kind, "curves"):
            png = out / f"{group.format(task, backbone, init)}_{fig}.png"
            assert_png(png)
            assert f"({png.name})" in summary
    assert not list(out.glob(f"*backbone-{MT}_init-scratch*"))  # no such runs
    assert "## Pre-training" not in summary  # no pre-training checkpoints given


def test_evaluate_runs_summarizes_pretraining_per_backbone(runs, tmp_path):
    ckpts = tmp_path / "pretrain"
    pretrain = [
        pretrain_checkpoint(ckpts / PUMIT, PUMIT, "mim", 2),
        pretrain_checkpoint(ckpts / PUMIT, PUMIT, "tokenizer", 3, usage=[2, 2, 0, 0]),
        pretrain_checkpoint(ckpts / MT, None, "masked", 4),
        pretrain_checkpoint(ckpts / MT, MT, "exemplar", 5),
    ]
    out = tmp_path / "tables"
    summary = evaluate_runs(runs, out, pretrain=pretrain).read_text()
    section = summary[summary.index("## Pre-training") : summary.index("## Figures")]
    # backbones, and stages within one, in the study's order, whatever the order given
    assert section.index(f"### {MT}") < section.index(f"### {PUMIT}")
    order = [section.index(f"- {s}:") for s in ("exemplar", "masked", "tokenizer", "mim")]
    assert order == sorted(order)
    # stage lines: epochs done and the last epoch's loss (2 / n)
    assert "- exemplar: 5 epoch(s), final train loss 0.4 " in section
    assert "- masked: 4 epoch(s), final train loss 0.5 " in section  # no backbone recorded: MT
    assert (
        "- tokenizer: 3 epoch(s), final train loss 0.6667; codes used: 2 of 4, perplexity 2.00"
        in section
    )
    assert "codes used" not in section.split("- mim:")[1]
    # figures: a loss curve per stage, the tokenizer's codebook usage, linked from the section
    figs = out / "pretrain"
    expected = [f"{MT}_stage-exemplar_loss", f"{MT}_stage-masked_loss"]
    expected += [f"{PUMIT}_stage-tokenizer_loss", f"{PUMIT}_stage-tokenizer_codebook"]
    expected += [f"{PUMIT}_stage-mim_loss"]
    assert sorted(p.stem for p in figs.glob("*.png")) == sorted(expected)
    for stem in expected:
        assert_png(figs / f"{stem}.png")
        assert f"](pretrain/{stem}.png)" in section
    # the fine-tuning figures section does not list them again
    assert "stage-" not in summary[summary.index("## Figures") :]


def test_a_summary_elsewhere_links_the_figures_relative_to_itself(runs, tmp_path):
    ckpt = pretrain_checkpoint(tmp_path / "ck", PUMIT, "tokenizer", 2, usage=[1, 0, 3])
    summary = evaluate_runs(runs, tmp_path / "tables", tmp_path / "report" / "s.md", [ckpt])
    text = summary.read_text()
    assert f"](../tables/pretrain/{PUMIT}_stage-tokenizer_codebook.png)" in text
    assert text.startswith("# medtx study: results") and "codes used: 2 of 3" in text


def test_a_tokenizer_that_used_no_code_is_refused_naming_the_file(runs, tmp_path):
    ckpt = pretrain_checkpoint(tmp_path / "ck", PUMIT, "tokenizer", 2, usage=[0, 0, 0, 0])
    with pytest.raises(MedtxError, match="sums to 0") as err:
        evaluate_runs(runs, tmp_path / "tables", pretrain=[ckpt])
    assert str(ckpt) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "tables").exists()  # refused before anything was written


def test_an_unreadable_or_foreign_checkpoint_is_refused_naming_the_file(runs, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(MedtxError, match="cannot read checkpoint") as err:
        evaluate_runs(runs, tmp_path / "tables", pretrain=[junk])
    assert str(junk) in str(err.value) and "\n" not in str(err.value)
    finetuned = runs[0].parent / "model.pt"
    with pytest.raises(MedtxError, match="not a pre-training checkpoint") as err:
        evaluate_runs(runs, tmp_path / "tables", pretrain=[finetuned])
    assert str(finetuned) in str(err.value)
    with pytest.raises(MedtxError, match="does not exist"):
        evaluate_runs(runs, tmp_path / "tables", pretrain=[tmp_path / "missing.pt"])


def test_one_stage_twice_is_refused(runs, tmp_path):
    a = pretrain_checkpoint(tmp_path / "a", MT, "exemplar", 2)
    b = pretrain_checkpoint(tmp_path / "b", None, "exemplar", 3)
    with pytest.raises(MedtxError, match="two checkpoints of pre-training stage exemplar") as err:
        evaluate_runs(runs, tmp_path / "tables", pretrain=[a, b])
    assert str(a) in str(err.value) and str(b) in str(err.value)


def test_the_subgroups_section_keeps_a_blank_line_between_tasks():
    """summary.md's subgroup section, one block per task: a task's heading is a block of
    its own after the previous task's plot (the template's line breaks)."""
    from medtx.evaluate.summary import SECTIONS

    tasks = [
        {"task": task, "table": f"| {task} |", "worst": [f"- worst {task}"], "link": f"{task}.png"}
        for task in ("classification", "regression")
    ]
    assert str(SECTIONS.subgroups(tasks)) == (
        "## Subgroups\n\n### classification\n\n| classification |\n\n"
        "Worst group per attribute (group − all):\n\n- worst classification\n\n"
        "![subgroups_classification](classification.png)\n\n### regression\n\n"
        "| regression |\n\nWorst group per attribute (group − all):\n\n- worst regression\n\n"
        "![subgroups_regression](regression.png)\n"
    )
    assert str(SECTIONS.subgroups([])) == (
        "## Subgroups\n\nNo run has test predictions to split into subgroups."
    )
