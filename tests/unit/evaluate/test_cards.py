"""Model cards from run folders written as fine-tuning writes them: the training data's
counts and subject-list hash checked against hand-built lists, the pooled test metric
against metrics.json, a too-small subgroup without a number, the face check from
provenance records, and the study card's rows and links.

The checkpoint is saved in ``medtx.train.loop``'s final format with a tiny state (two
tensors): the card reads only what the checkpoint records, no model is built.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from medtx.evaluate import cards, tables
from medtx.evaluate.cards import (
    build_model_card,
    model_card,
    results_root,
    study_card,
    write_model_cards,
)
from medtx.evaluate.subgroups import read_scan_tables, too_small_text
from medtx.evaluate.summary import evaluate_runs
from medtx.evaluate.tables import collect_runs
from medtx.evaluate.tables import table3 as real_table3
from medtx.workflow.paths import cache_index, preprocess_dir, t1_outputs
from tests.unit.evaluate.test_tables import CLS, MT, PUMIT, REG, write_run

DS = "demo_adni"
SETTINGS = {"age_bands": [60, 70, 80], "min_group": 5, "bootstrap": 200, "seed": 7}
SIDECAR_HASH = "f" * 64  # what the fold sidecar records (all of the manifest's subjects)

# Training subjects: tr0 has two sessions; F: tr0-tr3 (4 subjects, 5 scans),
# M: tr4-tr8 (5 subjects, 5 scans), tr9's sex not recorded.
TRAIN = [("tr0", "sub-tr0_ses-1"), ("tr0", "sub-tr0_ses-2")] + [
    (f"tr{i}", f"sub-tr{i}") for i in range(1, 10)
]
VAL = [("va0", "sub-va0"), ("va1", "sub-va1")]
# Test subjects t0..t11: F (even i < 11, 6), M (odd, 5), t11's sex not recorded (1).
TEST = [(f"t{i}", f"sub-t{i}") for i in range(12)]


def sex_of(subject: str) -> str:
    if subject.startswith("tr"):
        i = int(subject[2:])
        return "F" if i < 4 else "M" if i < 9 else ""
    if subject.startswith("t"):
        i = int(subject[1:])
        return "" if i == 11 else "F" if i % 2 == 0 else "M"
    return "F"


def age_of(scan: str) -> float:
    return 55.0 + (int(hashlib.sha256(scan.encode()).hexdigest()[:4], 16) % 300) / 10


def scan_table(dataset: str = DS) -> pd.DataFrame:
    rows = [
        {
            "dataset": dataset,
            "kind": "bids",
            "subject": subject,
            "session": scan.split("_ses-")[1] if "_ses-" in scan else "",
            "scan": scan,
            "diagnosis": "CN",
            "age": f"{age_of(scan):.1f}",
            "sex": sex_of(subject),
            "site": "siteA",
            "status": "ok",
        }
        for subject, scan in [*TRAIN, *VAL, *TEST]
    ]
    return pd.DataFrame(rows).astype(str)


def face_record(passed: bool) -> dict:
    """A merged provenance record whose normalize step judged the face metrics."""
    return {
        "scan": "x",
        "steps": [
            {
                "step": "normalize",
                "qc": {
                    "metrics": {"face_signal": 0.01, "face_component_ml": 2.0},
                    "checks": [
                        {"metric": "face_signal", "passed": passed},
                        {"metric": "face_component_ml", "passed": True},
                    ],
                },
            }
        ],
    }


def write_provenance(results: Path, scan: str, record: dict, dataset: str = DS) -> Path:
    path = Path(t1_outputs(preprocess_dir(str(results), dataset, scan), scan)["provenance"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


def regression_run(
    results: Path,
    fold: int,
    *,
    init: str = "pretrained",
    backbone: str = MT,
    record_cache: bool = True,
    error: float = 2.0,
) -> Path:
    """A regression run folder: predictions.tsv + metrics.json (``write_run``), the fold
    manifest and its sidecar, and model.pt in the loop's final format."""
    rows = [
        {"scan": scan, "subject": subject, "label": age_of(scan)}
        for subject, scan in TEST  # predictions off by ``error`` (+ a little per subject)
    ]
    for i, r in enumerate(rows):
        r["prediction"] = r["label"] + error + 0.25 * i
    metrics = write_run(results, DS, REG, init, 100, fold, pd.DataFrame(rows), backbone=backbone)
    manifest = results / "folds" / f"{DS}_task-{REG}_folds.tsv"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(
        [
            {"dataset": DS, "subject": subject, "scan": scan, "label": f"{age_of(scan):.1f}"}
            for subject, scan in [*TRAIN, *VAL, *TEST]
        ]
    ).to_csv(manifest, sep="\t", index=False)
    subjects = sorted({f"{DS}:{s}" for s, _ in TRAIN})
    metadata = {
        "preprocess_hash": "pre123",
        "backend": "fsl",
        "manifest": str(manifest),
        "cache_index": cache_index(str(results), DS) if record_cache else None,
        "folds_sidecar": {
            "subjects_sha256": SIDECAR_HASH,
            "n_subjects": 24,
            "seed": 42,
            "method": "hash",
            "n_folds": 5,
            "exclusions": [{"scan": "sub-bad"}],
        },
        "run": {"dataset": DS, "task": REG, "backbone": backbone, "init": init},
        "stage": "finetune",
        "task": REG,
        "preset": "tiny",
        "model_kwargs": {"backbone": backbone, "preset": "tiny"},
        "trained": ["encoders", "head"],
        "downsample": 2,
        "seed": 11,
        "subjects": subjects,
        "train_scans": [scan for _, scan in TRAIN],
        "val_scans": [scan for _, scan in VAL],
        "init": None
        if init == "scratch"
        else {"init": "pre.pt", "init_sha256": "e" * 64, "init_stage": "pretrain_masked"},
        "selected_by": "val MAE",
        "label_map": {"CN": 0, "MCI": 1, "AD": 2},
        "loss": "l1 on standardized age",
    }
    torch.save(
        {
            "format": "medtx-model",
            "model": {"w": torch.zeros(2, 3), "b": torch.zeros(3)},  # 9 numbers
            "config": {"code": "codehash42", "seed": 11},
            "config_hash": "cfg0123",
            "seed": 11,
            "metadata": metadata,
            "best_metric": 3.25,
            "best_epoch": 4,
            "epochs_done": 7,
            "status": "finished",
            "history": [{"epoch": 0, "train_loss": 1.0, "val_metric": 3.5}],
            "device": "cpu",
            "world_size": 1,
            "torch_version": "2.13.0",
        },
        metrics.parent / "model.pt",
    )
    return metrics


def section(text: str, title: str) -> str:
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def table_row(text: str, *first: str) -> list[str]:
    """The cells of the Markdown row starting with ``first``."""
    prefix = "| " + " | ".join(first) + " |"
    hits = [line for line in text.splitlines() if line.startswith(prefix)]
    assert len(hits) == 1, (first, hits)
    return [c.strip() for c in hits[0].strip("|").split("|")]


@pytest.fixture
def study(tmp_path):
    results = tmp_path / "results"
    scans_tsv = results / "scans" / f"{DS}.tsv"
    scans_tsv.parent.mkdir(parents=True)
    scan_table().to_csv(scans_tsv, sep="\t", index=False)
    write_provenance(results, "sub-tr1", face_record(passed=True))
    write_provenance(results, "sub-t0", face_record(passed=False))
    return results, scans_tsv


# ---------------------------------------------------------------------------- a card


def test_the_card_counts_the_training_data_by_hand(study):
    results, scans_tsv = study
    metrics = regression_run(results, 0)
    text = model_card(
        metrics.parent, attributes=read_scan_tables([scans_tsv]), subgroup_settings=SETTINGS
    )
    data = section(text, "Training data")
    assert "- training subjects: 10; training scans: 11" in data
    assert "- validation subjects: 2; validation scans: 2" in data
    assert table_row(data, "sex", "F") == ["sex", "F", "4", "5"]  # subjects, scans
    assert table_row(data, "sex", "M") == ["sex", "M", "5", "5"]
    assert table_row(data, "sex", "unknown") == ["sex", "unknown", "1", "1"]
    assert table_row(data, "site", "siteA") == ["site", "siteA", "10", "11"]
    # the training subject list's hash, from a list built here, and the sidecar's own
    lines = "\n".join(sorted(f"{DS}:tr{i}" for i in range(10)))
    assert f"sha256 `{hashlib.sha256(lines.encode()).hexdigest()}` (computed here" in data
    assert f"sha256 `{SIDECAR_HASH}` (as the sidecar records it: all 24 subjects" in data
    # label distribution: the training scans' ages from the manifest
    ages = [float(f"{age_of(scan):.1f}") for _, scan in TRAIN]
    assert (
        f"age {np.mean(ages):.1f} ± {np.std(ages, ddof=1):.1f} years (mean ± std over "
        f"11 training scans), range {min(ages):.1f}–{max(ages):.1f}"
    ) in data
    model = section(text, "Model")
    assert "- parameters: 9 (all 2 tensors of the saved state)" in model
    assert f"sha256 {'e' * 64}" in model and "stage pretrain_masked" in model
    assert "- seed: 11" in model and "validated on fold 1, 5 folds" in model
    code = section(text, "Preprocessing and code")
    assert (
        "- preprocessing hash: pre123" in code
        and "- training code hash (finetune stage): codehash42" in code
    )
    assert "- config hash: cfg0123" in code
    selection = section(text, "Selection")
    assert "- best validation metric: 3.2500" in selection
    assert (
        "- best epoch: 5 (counted from 1); epochs done: 7; status: finished" in selection
    )  # recorded 0-based as 4


def test_test_metrics_are_metrics_json_and_small_groups_get_no_number(study):
    results, scans_tsv = study
    metrics = regression_run(results, 0)
    stored = json.loads(metrics.read_text())
    text = model_card(
        metrics.parent, attributes=read_scan_tables([scans_tsv]), subgroup_settings=SETTINGS
    )
    part = section(text, "Test metrics")
    assert f"- mae: {stored['mae']:.4f} (headline)" in part
    assert f"Pooled over the {stored['n']} test scans of fold 0" in part
    assert f"MAE (years) on all test scans: {stored['mae']:.2f}, bootstrap 95 % CI " in part
    assert "200 resamples of the 12 test subjects, seed 7" in part
    # sex not recorded for t11 alone: too small, and not a single number in its cells
    small = table_row(part, "sex", "unknown")
    too_small = too_small_text(1, 5)
    assert small[2:7] == [too_small] * 5
    assert not re.search(r"\d", " ".join(small[2:7]).replace(too_small, ""))
    # the groups with enough subjects have a number: F 6 subjects, M 5
    female = table_row(part, "sex", "F")
    errors = [2.0 + 0.25 * i for i in range(0, 11, 2)]
    assert female[2] == "6" and female[3] == f"{np.mean(errors):.2f}"
    assert re.fullmatch(r"\d+\.\d\d to \d+\.\d\d", female[4])
    assert table_row(part, "sex", "M")[2] == "5"
    limits = section(text, "Intended use and known limits")
    assert "not for clinical decisions" in limits and "No external validation" in limits
    assert "Demo: the data are synthetic and tiny" in limits
    assert "smallest group with a number has 5" in limits


def test_privacy_counts_the_face_check_from_provenance_records(study):
    results, scans_tsv = study
    metrics = regression_run(results, 0)
    card = build_model_card(
        metrics.parent, attributes=read_scan_tables([scans_tsv]), subgroup_settings=SETTINGS
    )
    part = section(card.text, "Privacy")
    header = table_row(part, "scans")
    assert header == ["scans", "n", "pass", "fail", "not judged", "not measured", "not recorded"]
    assert table_row(part, "training") == ["training", "11", "1", "0", "0", "0", "10"]
    assert table_row(part, "validation") == ["validation", "2", "0", "0", "0", "0", "2"]
    assert table_row(part, "test") == ["test", "12", "0", "1", "0", "0", "11"]
    assert "skull-stripped, registered to the" in part and "Membership inference" in part
    assert card.face["sub-tr1"] == "pass" and card.face["sub-t0"] == "fail"
    assert card.face["sub-tr2"] == "not recorded" and card.train_subjects == 10
    # a record without face metrics: "not measured"; a run that recorded no cache index
    # (trained outside the workflow): no results folder to look in, all "not recorded"
    write_provenance(results, "sub-tr2", {"steps": [{"step": "normalize", "qc": {}}]})
    again = model_card(metrics.parent, attributes=None, subgroup_settings=SETTINGS)
    assert table_row(section(again, "Privacy"), "training")[2:] == ["1", "0", "0", "1", "9"]
    outside = regression_run(results, 1, record_cache=False)
    text = model_card(outside.parent, attributes=None, subgroup_settings=SETTINGS)
    privacy = section(text, "Privacy")
    assert table_row(privacy, "training") == ["training", "11", "0", "0", "0", "0", "11"]
    assert "no cache index" in privacy


def test_without_scan_tables_attributes_are_not_recorded(study):
    results, _ = study
    metrics = regression_run(results, 0)
    text = model_card(metrics.parent, attributes=None, subgroup_settings=SETTINGS)
    assert "Subjects per group: not recorded (no scan tables were given)." in text
    assert "Per subgroup: not recorded (no scan tables were given)." in text
    assert "| sex |" not in text
    assert "- training subjects: 10; training scans: 11" in text  # from the checkpoint


def test_classification_labels_per_class_name(tmp_path):
    results = tmp_path / "results"
    rng = np.random.default_rng(0)
    y = np.arange(12) % 3
    p = rng.dirichlet(np.ones(3), size=12).round(4)
    p[:, 2] = 1 - p[:, 0] - p[:, 1]
    table = pd.DataFrame(
        {"scan": [s for _, s in TEST], "subject": [s for s, _ in TEST], "label": y}
    )
    table["prediction"] = p.argmax(axis=1)
    for c in range(3):
        table[f"p_{c}"] = p[:, c]
    metrics = write_run(results, DS, CLS, "scratch", 100, 0, table)
    manifest = tmp_path / "folds.tsv"
    classes = {scan: str(i % 3) for i, (_, scan) in enumerate(TRAIN)}  # 4 CN, 4 MCI, 3 AD
    pd.DataFrame(
        [{"subject": s, "scan": scan, "label": classes[scan]} for s, scan in TRAIN]
    ).to_csv(manifest, sep="\t", index=False)
    torch.save(
        {
            "format": "medtx-model",
            "model": {"w": torch.zeros(4)},
            "metadata": {
                "manifest": str(manifest),
                "subjects": sorted({f"{DS}:{s}" for s, _ in TRAIN}),
                "train_scans": [scan for _, scan in TRAIN],
                "label_map": {"CN": 0, "MCI": 1, "AD": 2},
            },
        },
        metrics.parent / "model.pt",
    )
    text = model_card(metrics.parent, attributes=None, subgroup_settings=SETTINGS)
    # tr0's two sessions: classes 0 and 1, so CN and MCI each count it once
    assert (
        "- label distribution (fold manifest): CN (class 0): 4 scans, 4 subjects; "
        "MCI (class 1): 4 scans, 4 subjects; AD (class 2): 3 scans, 3 subjects"
    ) in text
    stored = json.loads(metrics.read_text())
    assert f"- mauc: {stored['mauc']:.4f} (headline)" in text
    assert "fold manifest's subject list sha256: not recorded (no fold sidecar)" in text
    assert "- preprocessing hash: not recorded" in text  # nothing guessed


def test_results_root_inverts_the_cache_index_path():
    assert results_root(cache_index("results", DS), DS) == Path("results")
    assert results_root(cache_index("/x/y", DS), DS) == Path("/x/y")
    assert results_root("/x/other.index.tsv", DS) is None
    assert results_root(f"/x/elsewhere/{DS}.index.tsv", DS) is None
    assert results_root(None, DS) is None


# ---------------------------------------------------------------------------- the study card


def test_the_study_card_has_a_row_per_group_and_links_every_card(study, tmp_path):
    results, scans_tsv = study
    paths = [regression_run(results, f) for f in (0, 1)]
    paths += [regression_run(results, 0, init="scratch", error=4.0)]
    paths += [regression_run(results, 0, backbone=PUMIT, init="scratch")]
    runs = collect_runs(paths)
    written = write_model_cards(
        runs, attributes=read_scan_tables([scans_tsv]), subgroup_settings=SETTINGS
    )
    assert [c.path for c in written] == [
        Path(p).parent / "model_card.md" for p in runs["metrics_path"]
    ]
    assert all(c.path.read_text() == c.text for c in written)
    out = tmp_path / "tables"
    text = study_card(runs, written, relative_to=out)
    body = [line for line in text.splitlines() if line.startswith(f"| {DS} |")]
    assert len(body) == 3  # MT pretrained (2 folds), MT scratch, PUMIT scratch
    links = re.findall(r"\[fold (\d)\]\(([^)]+)\)", text)
    assert sorted((out / link).resolve() for _, link in links) == sorted(
        c.path.resolve() for c in written
    )
    pretrained = table_row(text, DS, REG, MT, "pretrained")
    maes = runs[(runs["backbone"] == MT) & (runs["init"] == "pretrained")]["mae"]
    assert (
        pretrained[5] == "2" and pretrained[6] == f"MAE (years) {tables.format_mean_std(maes, 2)}"
    )
    assert pretrained[7] == "10, 10"
    # distinct training + test scans of both folds (the same scans): 1 pass, 1 fail
    assert pretrained[8] == "pass 1, fail 1, not recorded 21"
    assert "research use only" in text


def test_evaluate_runs_writes_every_card_and_links_the_study_card(study, tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "table3", lambda rows=None: real_table3(rows=[]))
    results, scans_tsv = study
    paths = [regression_run(results, f) for f in (0, 1)]
    out = tmp_path / "tables"
    summary = evaluate_runs(
        paths, out, attributes=[scans_tsv], subgroup_config={"bootstrap": 50}
    ).read_text()
    assert "[model_cards.md](model_cards.md)" in summary
    study_text = (out / cards.STUDY_CARD_NAME).read_text()
    for p in paths:
        card = (p.parent / "model_card.md").read_text()
        assert card.startswith(f"# Model card: {DS}, {REG}, {MT}, pretrained, 100 % labels")
        assert "| sex | F |" in card and "50 resamples" in card
        assert Path(p.parent / "model_card.md").resolve() in [
            (out / link).resolve()
            for link in re.findall(r"\]\(([^)]+model_card\.md)\)", study_text)
        ]
    # a summary elsewhere links the study card relative to itself
    other = evaluate_runs(paths, out, tmp_path / "report" / "s.md").read_text()
    assert "[model_cards.md](../tables/model_cards.md)" in other
    assert "Subjects per group: not recorded" in (paths[0].parent / "model_card.md").read_text()


def test_study_card_links_survive_a_folder_name_with_spaces_and_parentheses(tmp_path):
    """A raw space or ")" in a link target ends a Markdown link early: the targets are
    percent-encoded, and a renderer's link decodes back to each card."""
    from urllib.parse import unquote

    from markdown_it import MarkdownIt

    results = tmp_path / "my results (v2)"
    paths = [regression_run(results, f) for f in (0, 1)]
    runs = collect_runs(paths)
    written = write_model_cards(runs, attributes=None, subgroup_settings=SETTINGS)
    out = tmp_path / "tables"
    rendered = (
        MarkdownIt("commonmark").enable("table").render(study_card(runs, written, relative_to=out))
    )
    links = re.findall(r'<a href="([^"]+)">fold \d</a>', rendered)
    assert sorted((out / unquote(link)).resolve() for link in links) == sorted(
        c.path.resolve() for c in written
    )
