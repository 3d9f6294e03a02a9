"""Result tables and figures from synthetic fine-tuning run folders.

Each run's metrics JSON is written the way ``medtx.train.finetune.finetune`` writes it: the test
metrics from ``medtx.train.inference.evaluate_predictions`` on the predictions TSV, plus the
selection fields.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medtx.domain import DEFAULT_BACKBONE
from medtx.errors import MedtxError
from medtx.evaluate import figures, tables
from medtx.io import write_json, write_text
from medtx.metrics import mauc
from medtx.train.inference import evaluate_predictions
from medtx.workflow.paths import finetune_dir

CLS, REG, SEG = "classification", "regression", "segmentation"
MT, PUMIT = "medical_transformer", "pumit"


def run_dir(
    root: Path,
    dataset: str,
    task: str,
    init: str,
    frac: int,
    fold: int,
    backbone: str = DEFAULT_BACKBONE,
) -> Path:
    return Path(finetune_dir(str(root), dataset, task, backbone, init, frac, fold))


def write_run(
    root: Path,
    dataset: str,
    task: str,
    init: str,
    frac: int,
    fold: int,
    table: pd.DataFrame,
    *,
    backbone: str = DEFAULT_BACKBONE,
    record_backbone: bool = True,
) -> Path:
    """Write predictions.tsv + metrics.json (as finetune does) and return the JSON path.

    ``record_backbone=False``: a metrics file from before the run identity had a backbone.
    """
    d = run_dir(root, dataset, task, init, frac, fold, backbone)
    tsv = write_text(
        table.to_csv(sep="\t", index=False, float_format="%.6g"), d / "predictions.tsv"
    )
    metrics = evaluate_predictions(task, tsv)
    run = {"dataset": dataset, "task": task, "init": init, "frac": frac, "fold": fold}
    if record_backbone:
        run["backbone"] = backbone
    return write_json(
        {
            "run": run,
            **metrics,
            "selected_by": "val",
            "val_metric": 0.5,
            "best_epoch": 1,
            "status": "done",
            "init": "scratch" if init == "scratch" else "pre.pt",
            "use_transformer": init != "notransformer",
        },
        d / "metrics.json",
    )


def reg_table(labels, error: float) -> pd.DataFrame:
    """Ages predicted ``error`` years too high: MAE = error exactly."""
    y = np.asarray(labels, dtype=float)
    return pd.DataFrame(
        {
            "scan": [f"s{i}" for i in range(len(y))],
            "subject": [f"sub{i}" for i in range(len(y))],
            "label": y,
            "prediction": y + error,
        }
    )


def seg_table(wt: float, tc: float, et: float, n: int = 2) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "scan": [f"c{i}" for i in range(n)],
            "subject": [f"c{i}" for i in range(n)],
            "label": [""] * n,
            "dice_WT": [wt] * n,
            "dice_TC": [tc] * n,
            "dice_ET": [et] * n,
        }
    )


def cls_table(seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = np.array([0, 0, 1, 1, 2, 2])
    logits = rng.normal(size=(6, 3)) + 1.5 * np.eye(3)[y]
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    p = np.round(p, 4)
    p[:, 2] = 1 - p[:, 0] - p[:, 1]
    t = pd.DataFrame(
        {
            "scan": [f"a{seed}_{i}" for i in range(6)],
            "subject": [f"a{seed}_{i}" for i in range(6)],
            "label": y,
            "prediction": p.argmax(axis=1),
        }
    )
    for c in range(3):
        t[f"p_{c}"] = p[:, c]
    return t


REG_LABELS = {0: [60, 70], 1: [80, 90], 2: [70, 80]}


@pytest.fixture
def study(tmp_path) -> dict:
    """3 folds; regression (pretrained, scratch, notransformer) at 100 %, pretrained at 10 %;
    classification pretrained + scratch; segmentation pretrained only (2 folds)."""
    root = tmp_path / "results"
    paths = []
    for fold, labels in REG_LABELS.items():
        paths.append(
            write_run(
                root,
                "demo_adni",
                REG,
                "pretrained",
                100,
                fold,
                reg_table(labels, [2.0, 3.0, 4.0][fold]),
            )
        )
        paths.append(
            write_run(root, "demo_adni", REG, "scratch", 100, fold, reg_table(labels, 6.0))
        )
        paths.append(
            write_run(root, "demo_adni", REG, "notransformer", 100, fold, reg_table(labels, 5.0))
        )
        paths.append(
            write_run(
                root,
                "demo_adni",
                REG,
                "pretrained",
                10,
                fold,
                reg_table(labels, [7.0, 8.0, 9.0][fold]),
            )
        )
        for init in ("pretrained", "scratch"):
            paths.append(
                write_run(
                    root,
                    "demo_adni",
                    CLS,
                    init,
                    100,
                    fold,
                    cls_table(fold + (10 if init == "scratch" else 0)),
                )
            )
    for fold, dice in enumerate([(0.8, 0.6, 0.5), (0.9, 0.7, 0.4)]):
        paths.append(write_run(root, "demo_brats", SEG, "pretrained", 100, fold, seg_table(*dice)))
    return {"root": root, "paths": paths}


# ---------------------------------------------------------------------------- identity


def test_identity_is_read_from_the_record_not_the_folder(tmp_path):
    path = write_run(tmp_path, "demo_adni", REG, "notransformer", 30, 2, reg_table([60, 70], 1.0))
    moved = tmp_path / "renamed" / "anything" / "metrics.json"
    moved.parent.mkdir(parents=True)
    path.rename(moved)
    (path.parent / "predictions.tsv").rename(moved.parent / "predictions.tsv")
    run = tables.collect_runs([moved]).iloc[0]
    assert (run["dataset"], run["task"], run["backbone"], run["init"], run["frac"]) == (
        "demo_adni",
        REG,
        MT,
        "notransformer",
        30,
    )
    assert run["fold"] == 2 and run["mae"] == pytest.approx(1.0)


def test_a_run_recorded_before_backbones_is_the_medical_transformers(tmp_path):
    old = write_run(
        tmp_path, "demo_adni", REG, "scratch", 100, 0, reg_table([60, 70], 2.0),
        record_backbone=False,
    )  # fmt: skip
    assert "backbone" not in json.loads(old.read_text())["run"]
    new = write_run(
        tmp_path, "demo_adni", REG, "scratch", 100, 0, reg_table([60, 70], 1.0), backbone=PUMIT
    )
    assert tables.run_identity(json.loads(old.read_text()), old).backbone == MT
    runs = tables.collect_runs([old, new])
    assert runs.set_index("backbone")["mae"].to_dict() == pytest.approx({MT: 2.0, PUMIT: 1.0})
    t1 = tables.table1(runs).set_index(["backbone", "init"])
    assert t1.loc[(MT, "scratch"), "MAE (years)"] == "2.00"
    assert t1.loc[(PUMIT, "scratch"), "MAE (years)"] == "1.00"


@pytest.mark.parametrize(
    "run, why",
    [
        (None, "no run identity recorded"),
        ({"dataset": "d", "task": "diagnosis", "init": "scratch", "frac": 100, "fold": 0}, "task"),
        ({"dataset": "d", "task": REG, "init": "imagenet", "frac": 100, "fold": 0}, "init"),
        ({"dataset": "d", "task": REG, "init": "scratch", "frac": 150, "fold": 0}, "fraction"),
        ({"dataset": "d", "task": REG, "init": "scratch", "frac": "10", "fold": 0}, "fraction"),
        ({"dataset": "d", "task": REG, "init": "scratch", "frac": 10, "fold": -1}, "fold"),
        ({"dataset": "", "task": REG, "init": "scratch", "frac": 10, "fold": 0}, "no dataset"),
        ({"task": REG, "init": "scratch", "frac": 10, "fold": 0}, "no dataset"),
        (
            {
                "dataset": "d",
                "task": REG,
                "init": "scratch",
                "frac": 10,
                "fold": 0,
                "backbone": "vit",
            },
            "backbone 'vit'",
        ),
        (
            {
                "dataset": "d",
                "task": REG,
                "init": "scratch",
                "frac": 10,
                "fold": 0,
                "backbone": None,
            },
            "backbone None",
        ),
        (
            {
                "dataset": "d",
                "task": REG,
                "init": "notransformer",
                "frac": 10,
                "fold": 0,
                "backbone": PUMIT,
            },
            "init 'notransformer' is not one of ['scratch', 'pretrained'] (backbone pumit)",
        ),
    ],
)
def test_missing_or_bad_identity_is_refused_naming_the_file(tmp_path, run, why):
    path = write_run(tmp_path, "d", REG, "scratch", 100, 0, reg_table([60, 70], 1.0))
    stored = json.loads(path.read_text())
    stored["run"] = run
    path.write_text(json.dumps(stored))
    with pytest.raises(MedtxError, match=re.escape(why)) as err:
        tables.collect_runs([path])
    assert str(path) in str(err.value)


# ---------------------------------------------------------------------------- cells


def test_format_mean_std_uses_sample_std():
    assert tables.format_mean_std([1, 2, 3]) == "2.000 ± 1.000"
    assert tables.format_mean_std([2.0, 3.0, 4.0], 2) == "3.00 ± 1.00"
    assert tables.format_mean_std([0.5]) == "0.500"
    assert tables.format_mean_std([np.nan, None, 0.25]) == "0.250"
    assert tables.format_mean_std([]) == tables.MISSING == "—"


# ---------------------------------------------------------------------------- runs


def test_collect_runs_recomputes_metrics(study):
    runs = tables.collect_runs(study["paths"])
    assert len(runs) == len(study["paths"]) == 20
    assert (runs["source"] == "predictions.tsv").all()
    reg = runs[(runs["task"] == REG) & (runs["init"] == "pretrained") & (runs["frac"] == 100)]
    assert reg["mae"].tolist() == pytest.approx([2.0, 3.0, 4.0])
    cls = runs[(runs["task"] == CLS) & (runs["init"] == "scratch")].iloc[0]
    t = cls_table(10)
    assert cls["mauc"] == pytest.approx(mauc(t["label"], t[["p_0", "p_1", "p_2"]].to_numpy()))


def test_stale_metrics_json_is_detected(study):
    path = run_dir(study["root"], "demo_adni", REG, "scratch", 100, 1) / "metrics.json"
    stored = json.loads(path.read_text())
    stored["mae"] += 0.01
    path.write_text(json.dumps(stored))
    with pytest.raises(MedtxError, match="stale") as err:
        tables.collect_runs(study["paths"])
    assert str(path) in str(err.value) and "mae" in str(err.value)


def test_metrics_without_predictions_are_used_and_marked(study):
    d = run_dir(study["root"], "demo_brats", SEG, "pretrained", 100, 0)
    (d / "predictions.tsv").unlink()
    runs = tables.collect_runs(study["paths"])
    row = runs[(runs["task"] == SEG) & (runs["fold"] == 0)].iloc[0]
    assert row["dice_WT"] == pytest.approx(0.8) and row["source"].startswith("metrics.json")


def test_one_run_twice_is_refused(study):
    with pytest.raises(MedtxError, match="several metrics files"):
        tables.collect_runs(study["paths"][:1] * 2)


# ---------------------------------------------------------------------------- tables


HEADLINE_COLUMNS = ["mAUC", "MAE (years)", "Dice WT", "Dice TC", "Dice ET"]


def test_table1_values_rows_and_paper_reference(study):
    t1 = tables.table1(tables.collect_runs(study["paths"]))
    # only Medical Transformer runs: no PUMIT rows
    assert list(zip(t1["backbone"], t1["init"])) == [
        (MT, "scratch"),
        (MT, "pretrained"),
        (MT, "notransformer"),
        ("—", "chance / baseline"),
        (MT, "paper (Jun et al.)"),
    ]
    assert list(t1.columns) == ["backbone", "init", *HEADLINE_COLUMNS, "n folds", "source"]
    t1 = t1.set_index("init")
    assert t1.loc["pretrained", "MAE (years)"] == "3.00 ± 1.00"
    assert t1.loc["scratch", "MAE (years)"] == "6.00 ± 0.00"
    # Dice WT 0.8, 0.9: mean 0.85, sample std 0.0707
    assert t1.loc["pretrained", "Dice WT"] == "0.850 ± 0.071"
    assert t1.loc["pretrained", "Dice ET"] == "0.450 ± 0.071"
    assert t1.loc["pretrained", "n folds"] == "2–3"
    # segmentation was never trained from scratch or without the transformer
    assert t1.loc["scratch", "Dice WT"] == "—" and t1.loc["notransformer", "mAUC"] == "—"
    paper = t1.loc["paper (Jun et al.)"]
    assert [paper[c] for c in HEADLINE_COLUMNS] == ["0.835", "3.49", "0.873", "0.697", "0.588"]
    assert paper["source"] == "published, not reproduced"
    assert set(t1.loc[["scratch", "pretrained", "notransformer"], "source"]) == {"reproduced"}


def test_table1_chance_and_mean_age_baseline(study):
    runs = tables.collect_runs(study["paths"])
    base = tables.table1(runs).set_index("init").loc["chance / baseline"]
    # mean of the other folds' labels: fold 0 -> 80 (MAE 15), 1 -> 70 (15), 2 -> 75 (5)
    assert base["MAE (years)"] == "11.67 ± 5.77"
    assert base["mAUC"] == "0.500" and base["Dice WT"] == "—"
    given = tables.table1(runs, baselines={"regression": 5.7}).set_index("init")
    assert given.loc["chance / baseline", "MAE (years)"] == "5.70"


def test_mean_age_baseline_never_uses_the_folds_own_labels(study):
    d = {
        f: run_dir(study["root"], "demo_adni", REG, "scratch", 100, f) / "predictions.tsv"
        for f in REG_LABELS
    }
    assert tables.mean_age_baseline(d) == pytest.approx({0: 15.0, 1: 15.0, 2: 5.0})


def test_table4_rows_are_label_fractions(study):
    t4 = tables.table4(tables.collect_runs(study["paths"]))
    assert (t4["backbone"] == MT).all()
    t4 = t4.drop(columns="backbone").set_index("label fraction (%)")
    assert list(t4.index) == [10, 30, 50, 70, 100]
    assert list(t4.columns) == [
        f"{c}, {i}" for c in HEADLINE_COLUMNS for i in ("pretrained", "scratch")
    ] + ["n folds"]
    assert t4.loc[10, "MAE (years), pretrained"] == "8.00 ± 1.00"
    assert t4.loc[10, "MAE (years), scratch"] == "—"
    assert t4.loc[30].drop("n folds").eq("—").all() and t4.loc[30, "n folds"] == "—"
    assert t4.loc[100, "MAE (years), pretrained"] == "3.00 ± 1.00"


def test_table5_with_and_without_transformer(study):
    t5 = tables.table5(tables.collect_runs(study["paths"]))
    assert list(t5.columns) == ["backbone", "model", *HEADLINE_COLUMNS, "n folds"]
    assert (t5["backbone"] == MT).all()
    t5 = t5.set_index("model")
    assert list(t5.index) == ["with transformer (pretrained)", "w/o transformer (notransformer)"]
    assert t5.iloc[1]["MAE (years)"] == "5.00 ± 0.00" and t5.iloc[1]["Dice WT"] == "—"


def test_tables_of_no_runs_are_all_missing():
    runs = tables.collect_runs([])
    t1 = tables.table1(runs)
    assert list(t1["backbone"]) == [MT, MT, "—", MT]  # the default backbone's rows stay
    t1 = t1.set_index("init")
    assert (t1.loc[["scratch", "pretrained"], HEADLINE_COLUMNS] == "—").all().all()
    assert t1.loc["chance / baseline", "MAE (years)"] == "—"
    t4 = tables.table4(runs)
    assert list(t4["backbone"]) == [MT] * 5 and (t4["n folds"] == "—").all()
    t5 = tables.table5(runs)
    assert list(t5["backbone"]) == [MT, MT]
    assert (t5[HEADLINE_COLUMNS] == "—").all().all()


def test_a_task_on_two_datasets_gets_a_column_each(study):
    extra = write_run(
        study["root"], "demo_camcan", REG, "pretrained", 100, 0, reg_table([30, 40], 1.0)
    )
    t1 = tables.table1(tables.collect_runs(study["paths"] + [extra])).set_index("init")
    assert t1.loc["pretrained", "MAE (years) [demo_camcan]"] == "1.00"
    assert t1.loc["pretrained", "MAE (years) [demo_adni]"] == "3.00 ± 1.00"


# ---------------------------------------------------------------------------- backbones


@pytest.fixture
def two_backbones(study) -> dict:
    """The study plus PUMIT runs on the same folds: regression scratch + pretrained at
    100 %, pretrained at 10 %, classification pretrained at 100 %; no segmentation."""
    paths = list(study["paths"])
    for fold, labels in REG_LABELS.items():
        for init, frac, error in (
            ("pretrained", 100, [1.0, 2.0, 3.0][fold]),
            ("scratch", 100, 4.0),
            ("pretrained", 10, [5.0, 5.0, 8.0][fold]),
        ):
            paths.append(
                write_run(
                    study["root"], "demo_adni", REG, init, frac, fold,
                    reg_table(labels, error), backbone=PUMIT,
                )
            )  # fmt: skip
        paths.append(
            write_run(
                study["root"], "demo_adni", CLS, "pretrained", 100, fold, cls_table(fold + 20),
                backbone=PUMIT,
            )
        )  # fmt: skip
    return {**study, "paths": paths}


def test_runs_of_two_backbones_are_kept_apart(two_backbones):
    runs = tables.collect_runs(two_backbones["paths"])
    assert len(runs) == 20 + 12
    assert runs.groupby("backbone").size().to_dict() == {MT: 20, PUMIT: 12}
    # one fold, task, init and fraction twice: once per backbone, no "several files"
    same = runs[(runs["task"] == REG) & (runs["init"] == "pretrained") & (runs["frac"] == 100)]
    assert sorted(zip(same["backbone"], same["fold"])) == [
        (b, f) for b in (MT, PUMIT) for f in range(3)
    ]


def test_table1_has_a_block_of_rows_per_backbone(two_backbones):
    runs = tables.collect_runs(two_backbones["paths"])
    t1 = tables.table1(runs)
    assert list(t1.columns) == ["backbone", "init", *HEADLINE_COLUMNS, "n folds", "source"]
    assert list(zip(t1["backbone"], t1["init"])) == [
        (MT, "scratch"),
        (MT, "pretrained"),
        (MT, "notransformer"),
        (PUMIT, "scratch"),
        (PUMIT, "pretrained"),
        ("—", "chance / baseline"),
        (MT, "paper (Jun et al.)"),
    ]
    t1 = t1.set_index(["backbone", "init"])
    assert t1.loc[(MT, "pretrained"), "MAE (years)"] == "3.00 ± 1.00"
    assert t1.loc[(PUMIT, "pretrained"), "MAE (years)"] == "2.00 ± 1.00"
    assert t1.loc[(PUMIT, "scratch"), "MAE (years)"] == "4.00 ± 0.00"
    aucs = [
        mauc(t["label"], t[["p_0", "p_1", "p_2"]].to_numpy()) for t in map(cls_table, (20, 21, 22))
    ]
    assert t1.loc[(PUMIT, "pretrained"), "mAUC"] == tables.format_mean_std(aucs)
    assert t1.loc[(PUMIT, "scratch"), "mAUC"] == "—"  # PUMIT classification: pretrained only
    assert t1.loc[(PUMIT, "pretrained"), "Dice WT"] == "—"
    assert t1.loc[(PUMIT, "pretrained"), "n folds"] == "3"
    assert set(t1.xs(PUMIT)["source"]) == {"reproduced"}
    # the baseline's folds are the same for both backbones
    assert t1.loc[("—", "chance / baseline"), "MAE (years)"] == "11.67 ± 5.77"


def test_table1_shows_another_backbone_only_when_it_has_runs(two_backbones):
    pumit_only = [p for p in two_backbones["paths"] if f"backbone-{PUMIT}" in str(p)]
    t1 = tables.table1(tables.collect_runs(pumit_only))
    # the Medical Transformer's scratch/pretrained rows stay (empty), as before
    assert list(zip(t1["backbone"], t1["init"]))[:4] == [
        (MT, "scratch"),
        (MT, "pretrained"),
        (PUMIT, "scratch"),
        (PUMIT, "pretrained"),
    ]
    assert (t1.iloc[:2][HEADLINE_COLUMNS] == "—").all().all()


def test_table4_has_label_fractions_per_backbone(two_backbones):
    t4 = tables.table4(tables.collect_runs(two_backbones["paths"]))
    assert list(t4.columns[:2]) == ["backbone", "label fraction (%)"]
    assert list(zip(t4["backbone"], t4["label fraction (%)"])) == [
        (b, f) for b in (MT, PUMIT) for f in (10, 30, 50, 70, 100)
    ]
    t4 = t4.set_index(["backbone", "label fraction (%)"])
    assert t4.loc[(MT, 10), "MAE (years), pretrained"] == "8.00 ± 1.00"
    assert t4.loc[(PUMIT, 10), "MAE (years), pretrained"] == "6.00 ± 1.73"
    assert t4.loc[(PUMIT, 10), "MAE (years), scratch"] == "—"
    assert t4.loc[(PUMIT, 100), "MAE (years), scratch"] == "4.00 ± 0.00"
    assert t4.loc[(PUMIT, 100), "Dice WT, pretrained"] == "—"
    assert t4.loc[(PUMIT, 30), "n folds"] == "—"


def test_table5_is_only_for_backbones_with_the_ablation(two_backbones):
    t5 = tables.table5(tables.collect_runs(two_backbones["paths"]))
    assert list(t5["backbone"]) == [MT, MT]  # PUMIT has no notransformer init
    assert list(t5["model"]) == [
        "with transformer (pretrained)",
        "w/o transformer (notransformer)",
    ]
    assert t5.iloc[0]["MAE (years)"] == "3.00 ± 1.00"  # the Medical Transformer's, not PUMIT's
    pumit_only = [p for p in two_backbones["paths"] if f"backbone-{PUMIT}" in str(p)]
    t5 = tables.table5(tables.collect_runs(pumit_only))
    assert list(t5["backbone"]) == [MT, MT]
    assert (t5[HEADLINE_COLUMNS] == "—").all().all()


def test_summary_names_the_study_and_its_backbones(two_backbones, tmp_path):
    out = tables.build_tables(two_backbones["paths"], tmp_path / "tables")
    summary = out["summary"].read_text()
    assert summary.startswith("# medtx study: results")
    assert "backbone(s) medical_transformer, pumit" in summary
    assert "Medical Transformer only" in summary  # Table 5's caption
    t1 = pd.read_csv(out["table1_tsv"], sep="\t")
    assert t1.shape == (7, 9)


# ---------------------------------------------------------------------------- parameters


def test_table3_matches_the_papers_counts():
    t3 = tables.table3()
    assert list(t3.columns[:2]) == ["backbone", "task"]
    mt = t3[t3["backbone"] == MT]
    table3 = mt[mt["preset"] == "table3"].set_index("task")
    assert table3.loc["classification", "parameters"] == "2,402,163"
    assert (table3["matches paper"] == "yes").all()
    assert (mt.loc[mt["preset"] == "paper_text", "paper (printed)"] == "—").all()
    # PUMIT's counts are ours: nothing printed to match
    pumit = t3[t3["backbone"] == PUMIT]
    assert len(pumit) > 0 and set(pumit["task"]) == {CLS, REG, SEG}
    assert (pumit["paper (printed)"] == "—").all() and (pumit["matches paper"] == "—").all()
    assert list(t3["backbone"]) == sorted(t3["backbone"], key=[MT, PUMIT].index)


def test_table3_rows_without_a_backbone_are_the_medical_transformers():
    rows = [
        {"task": REG, "preset": "table3", "in_channels": 1, "num_outputs": 1,
         "parameters": 2_401_777, "paper": "2.401M"},
        {"backbone": PUMIT, "task": REG, "preset": "tiny", "in_channels": 1, "num_outputs": 1,
         "parameters": 5_000_000, "paper": ""},
    ]  # fmt: skip
    t3 = tables.table3(rows)
    assert list(t3["backbone"]) == [MT, PUMIT]
    assert list(t3["parameters"]) == ["2,401,777", "5,000,000"]
    assert list(t3["matches paper"]) == ["yes", "—"]
    assert list(t3["paper (printed)"]) == ["2.401M", "—"]


def assert_pipe_table(md: str, n_columns: int, n_rows: int) -> None:
    lines = [line for line in md.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + n_rows
    assert re.fullmatch(r"\|(:?-{3,}:?\|)+", lines[1])
    for line in lines:
        assert len(re.findall(r"(?<!\\)\|", line)) == n_columns + 1


def test_write_table_writes_tsv_and_markdown(tmp_path):
    df = pd.DataFrame({"init": ["a|b", "c"], "mAUC": ["0.5 ± 0.1", "—"]})
    tsv, md = tables.write_table(df, tmp_path / "t.tsv", tmp_path / "t.md", caption="Cap.")
    assert pd.read_csv(tsv, sep="\t").equals(df)
    text = md.read_text()
    assert text.startswith("**Cap.**\n\n")
    assert_pipe_table(text, 2, 2)
    assert "a\\|b" in text


def test_build_tables_writes_everything(study, tmp_path):
    out = tables.build_tables(study["paths"], tmp_path / "tables")
    for name in ("table1", "table3", "table4", "table5"):
        assert out[f"{name}_tsv"].exists() and out[f"{name}_md"].exists()
    t1 = pd.read_csv(out["table1_tsv"], sep="\t")
    assert t1.shape == (5, 9)
    assert_pipe_table(out["table1_md"].read_text(), 9, 5)
    summary = out["summary"].read_text()
    assert "synthetic" in summary and "not comparable" in summary
    assert summary.count("\n|:---|") == 5  # one pipe table per table, brain-age gap too
    assert len(pd.read_csv(out["runs"], sep="\t")) == 20


# ---------------------------------------------------------------------------- figures


def assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    pixels = matplotlib.image.imread(str(path))
    assert pixels.std() > 0.05  # not a blank canvas


def test_plots_are_written(study, tmp_path):
    cls = [
        run_dir(study["root"], "demo_adni", CLS, "pretrained", 100, f) / "predictions.tsv"
        for f in range(3)
    ]
    reg = [
        run_dir(study["root"], "demo_adni", REG, "pretrained", 100, f) / "predictions.tsv"
        for f in range(3)
    ]
    assert_png(figures.plot_roc(cls, tmp_path / "roc.png", class_names=["CN", "MCI", "AD"]))
    assert_png(figures.plot_age(reg, tmp_path / "age.png"))
    history = [
        {"epoch": e, "train_loss": 1.0 / (e + 1), "val_metric": 0.5 + 0.05 * e} for e in range(5)
    ]
    assert_png(figures.plot_curves(history, tmp_path / "curves.png"))
    assert_png(
        figures.plot_curves(
            {"pretrained": {"history": history}, "scratch": history}, tmp_path / "curves2.png"
        )
    )
    with pytest.raises(MedtxError, match="no training history"):
        figures.plot_curves([], tmp_path / "none.png")


def test_segmentation_overlay_draws_reference_and_model(tmp_path):
    from medtx.train.finetune import finetune
    from tests.unit.train.test_stages import FAST, write_items

    train, val, test = (
        write_items(tmp_path / "d", n, task="segmentation", seed=s, prefix=p)
        for n, s, p in ((2, 0, "tr"), (1, 1, "va"), (2, 2, "te"))
    )
    finetune(
        "segmentation",
        train,
        val,
        test,
        out=tmp_path / "m.pt",
        predictions_out=tmp_path / "p.tsv",
        config={**FAST, "epochs": 1},
        log=lambda _: None,
    )
    from matplotlib.image import imread

    one = imread(figures.plot_segmentation(tmp_path / "m.pt", test[:1], tmp_path / "one.png"))
    two = imread(figures.plot_segmentation(tmp_path / "m.pt", test, tmp_path / "two.png"))
    assert two.shape[0] == 2 * one.shape[0]  # one row of (reference, model) per case
    with pytest.raises(MedtxError, match="no segmentation cases"):
        figures.plot_segmentation(tmp_path / "m.pt", [], tmp_path / "none.png")


def test_figures_section_links_every_png_relative_to_the_summary(tmp_path):
    pngs = [tmp_path / "b_roc.png", tmp_path / "a_age.png"]
    text = figures.figures_section(pngs, tmp_path)
    assert text.startswith("## Figures")
    assert text.index("(a_age.png)") < text.index("(b_roc.png)")


def test_the_brain_age_gap_table_reports_both_gaps_over_folds(tmp_path):
    """Three folds whose test gaps are known: the table's cells are their mean ± std,
    and r is the Pearson r of each gap with age (hand-computed here)."""
    root = tmp_path / "results"
    ages = np.array([60.0, 70.0, 80.0, 90.0])
    paths, raw, corrected = [], [], []
    for fold, shrink in enumerate([0.5, 0.6, 0.7]):
        t = reg_table(ages, 0.0)
        t["prediction"] = 75 + shrink * (ages - 75)  # regression to the mean
        t["gap"] = t["prediction"] - ages
        t["gap_corrected"] = [0.5, -0.5, -0.5, 0.5]  # no trend with age left
        paths.append(write_run(root, "demo_adni", REG, "pretrained", 100, fold, t))
        raw.append(t["gap"].mean())
        corrected.append(0.0)
    runs = tables.collect_runs(paths)
    (row,) = tables.brain_age_gap(runs).to_dict("records")
    assert row["mean gap (years)"] == tables.format_mean_std(raw, 2)
    assert row["r(gap, age)"] == "-1.00 ± 0.00"  # a perfect negative trend in every fold
    assert row["mean corrected gap (years)"] == "0.00 ± 0.00"
    assert row["r(corrected gap, age)"] == "0.00 ± 0.00"
    assert row["n folds"] == 3 and row["init"] == "pretrained"
