"""`medtx predict` with a real two-fold segmentation bundle on a generated BraTS case:
the label volume lands on the case's own 240x240x155 grid, each fold's output is
the fold model's own, and inputs it cannot use are named, not guessed at.

(T1 bundles run the whole registration chain: tests/integration/test_workflow.py
predicts a workflow scan and matches the evaluation's prediction.)"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from medtx.bundle import load_bundle
from medtx.config import load_config
from medtx.data.demo import plan_brats_cohort, write_demo_part
from medtx.domain import BRATS_REGIONS
from medtx.errors import MedtxError
from medtx.predict.inputs import collect_inputs
from medtx.predict.run import BY_FOLD, PREDICTIONS, fold_models, predict_bundle
from medtx.share.export import export_bundle
from medtx.train.data import downsample_volume, read_cached
from tests.unit.test_bundle import train_ensemble
from tests.unit.train.test_stages import FAST, write_items

CROP = [40, 48, 36]  # pooled by 2: the model reads 20x24x18
SEG = {**FAST, "backbone": "pumit", "preset": "tiny", "batch_size": 2, "epochs": 1}
SPEC = {"n_cases": 2, "seed": 13}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A segmentation fold ensemble trained for real on toy crops, exported."""
    root = tmp_path_factory.mktemp("seg")
    config = load_config()
    config["results"] = str(root / "results")
    config["preprocess"]["brats"]["crop"] = CROP
    folds = {
        k: write_items(root / f"c{k}", 8, task="segmentation", shape=tuple(CROP), seed=k)
        for k in (0, 1)
    }
    side = {"subjects_sha256": "cd" * 32, "n_subjects": 16}
    run_dir = train_ensemble(root, "segmentation", folds, {**SEG, "downsample": 2}, config, side)
    return export_bundle(run_dir, root / "bundle", config=config)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("cases")
    for row in plan_brats_cohort(SPEC):
        write_demo_part("brats-case", SPEC, root, subject=row["case"])
    return root


@pytest.fixture(scope="module")
def predicted(bundle, cases, tmp_path_factory):
    out = tmp_path_factory.mktemp("pred") / "out"
    lines = []
    table = predict_bundle(bundle.path, [cases], out, log=lines.append)
    return out, table, lines


def test_the_label_volume_is_on_the_cases_native_grid(cases, predicted):
    out, table, _ = predicted
    assert len(table) == 2 and "error" not in table  # no case failed
    for row in table.to_dict("records"):
        raw = nib.load(str(cases / row["scan"] / f"{row['scan']}_t1.nii.gz"))
        seg = nib.load(row["segmentation"])
        assert seg.shape == raw.shape == (240, 240, 155)
        np.testing.assert_array_equal(seg.affine, raw.affine)
        labels = np.asarray(seg.dataobj)
        assert set(np.unique(labels)) <= {0, 1, 2, 4}
        for name, values in BRATS_REGIONS.items():  # the volumes are of this file
            assert row[f"volume_{name}_ml"] == pytest.approx(np.isin(labels, values).sum() / 1000)


def test_each_fold_output_is_that_fold_models_own(bundle, predicted):
    """Fold rows of predictions_by_fold.tsv: the fold model run by hand on the model
    input predict wrote, brought back to the native grid the same way."""
    from medtx.predict.segmentation import native_labels, region_volumes_ml

    out, table, _ = predicted
    by_fold = pd.read_csv(out / BY_FOLD, sep="\t")
    models = fold_models(load_bundle(bundle.path))
    for row in table.to_dict("records"):
        scan = row["scan"]
        x = downsample_volume(torch.from_numpy(read_cached(out / scan / f"{scan}_input.npy")), 2)
        record = json.loads((out / scan / f"{scan}_brats.json").read_text())
        raw = nib.load(row["segmentation"])
        for fold, model in zip(bundle.meta["folds"], models):
            with torch.no_grad():
                probs = torch.sigmoid(model(x[None]))[0].double().numpy()
            labels = native_labels(
                probs,
                factor=2,
                crop_start=record["qc"]["metrics"]["crop_start"],
                crop_size=CROP,
                native_shape=raw.shape,
            )
            want = region_volumes_ml(labels, raw.affine)
            got = by_fold[(by_fold["scan"] == scan) & (by_fold["fold"] == fold["fold"])]
            for key, value in want.items():
                assert got[key].item() == pytest.approx(value, abs=1e-6)


def test_the_record_names_the_bundle_and_weights_it_used(bundle, predicted):
    out, table, _ = predicted
    scan = table["scan"].iloc[0]
    record = json.loads((out / scan / f"{scan}_predict.json").read_text())
    manifest = dict(
        reversed(line.split("  "))
        for line in (bundle.path / "MANIFEST.sha256").read_text().splitlines()
    )
    for entry in record["bundle"]["weights"]:
        assert entry["sha256"] == manifest[Path(entry["path"]).name]
    assert record["outputs"][0]["path"] == table["segmentation"].iloc[0]


def test_an_existing_output_is_never_overwritten(bundle, cases, predicted):
    out, _, _ = predicted
    before = (out / PREDICTIONS).read_bytes()
    with pytest.raises(MedtxError, match="exists; give a new --out folder"):
        predict_bundle(bundle.path, [cases], out)
    assert (out / PREDICTIONS).read_bytes() == before


def test_unusable_inputs_are_named_one_line_each(cases, tmp_path):
    t1 = next(cases.glob("*/*_t1.nii.gz"))
    found, problems = collect_inputs([tmp_path / "nope", t1, cases / t1.parent.name], brats=True)
    assert [s.scan for s in found] == [t1.parent.name]
    assert problems == [
        f"{tmp_path / 'nope'}: does not exist",
        f"{t1}: a segmentation model reads BraTS case folders, not files",
    ]
    unlabelled = tmp_path / "cases" / "new"  # a case to predict has no seg yet
    unlabelled.mkdir(parents=True)
    for mod in ("t1", "t1ce", "t2", "flair"):
        (unlabelled / f"new_{mod}.nii.gz").symlink_to(t1)
    found, problems = collect_inputs([unlabelled.parent], brats=True)
    assert [s.scan for s in found] == ["new"] and problems == []
    (unlabelled / "new_t2.nii.gz").unlink()
    found, problems = collect_inputs([unlabelled], brats=True)
    assert not found and problems == [f"{unlabelled}: missing t2 image(s)"]
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    found, problems = collect_inputs([notes], brats=False)
    assert not found and problems == [
        f"{notes}: not a NIfTI file (.nii, .nii.gz), a BIDS folder or a CSV/TSV table"
    ]


def test_the_command_prints_the_table_and_fails_in_one_line(bundle, cases, tmp_path):
    def predict(*args):
        return subprocess.run(
            [sys.executable, "-m", "medtx", "predict", str(bundle.path), *map(str, args)],
            capture_output=True,
            text=True,
        )

    case = next(p for p in cases.iterdir() if p.is_dir())
    ok = predict(case, "--out", tmp_path / "one")
    assert ok.returncode == 0, ok.stderr
    printed = ok.stdout.splitlines()
    assert printed[0].startswith("scan\t") and printed[1].startswith(case.name + "\t")
    assert printed == (tmp_path / "one" / PREDICTIONS).read_text().splitlines()
    # one unreadable case beside a good one: the good one is predicted, exit 5
    broken = tmp_path / "broken" / "badcase"
    broken.mkdir(parents=True)
    for f in case.iterdir():
        shutil.copy(f, broken / f.name.replace(case.name, "badcase"))
    t1 = next(broken.glob("*_t1.nii.gz"))
    img = nib.load(t1)
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.int16), img.affine), t1)
    mixed = predict(case, broken, "--out", tmp_path / "mixed")
    assert mixed.returncode == 5, mixed.stderr
    table = pd.read_csv(tmp_path / "mixed" / PREDICTIONS, sep="\t", keep_default_na=False)
    errors = dict(zip(table["scan"], table["error"]))
    assert errors[case.name] == "" and "all zeros" in errors["badcase"], errors
    assert mixed.stderr.strip().splitlines()[-1] == (
        "medtx: 1 scan(s) skipped: see the error column"
    )
    bad = predict(tmp_path / "nope", "--out", tmp_path / "two")
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1] == (
        "medtx: error: nothing to predict: no usable scan among the inputs"
    )


def test_each_brain_age_fold_answers_in_its_own_training_ages(tmp_path):
    """Brain-age folds trained on different ages scale their outputs differently;
    predict's fold k gives fold k's own evaluation on its test scans."""
    from medtx.predict.inputs import ScanInput
    from medtx.predict.run import fold_outputs

    config = load_config()
    config["results"] = str(tmp_path / "results")
    folds = {}
    for fold in (0, 1):
        items = write_items(
            tmp_path / f"c{fold}", 8, task="regression", shape=(20, 24, 18), seed=fold
        )
        for item in items:  # fold 1 learns on ages 30 years older
            item["label"] = f"{float(item['label']) + 30 * fold:.1f}"
        folds[fold] = items
    side = {"subjects_sha256": "ef" * 32}
    run_dir = train_ensemble(tmp_path, "regression", folds, SEG, config, side)
    tested = {fold: items[6:] for fold, items in folds.items()}
    bundle = export_bundle(run_dir, tmp_path / "bundle", config=config)
    means = [f["target"]["mean"] for f in bundle.meta["folds"]]
    assert means[1] - means[0] == pytest.approx(30, abs=6)
    for fold, items in tested.items():
        ready = [(ScanInput(i["scan"], {}, i["subject"]), {"cache": i["image"]}) for i in items]
        outputs = fold_outputs(bundle, ready, device=torch.device("cpu"), batch_size=2, say=print)
        evaluated = pd.read_csv(run_dir / f"fold-{fold}/predictions.tsv", sep="\t")
        for ours, age in zip(outputs, evaluated["prediction"]):
            assert float(ours[fold]) == pytest.approx(age, rel=1e-5)  # the TSV keeps 6 digits


def test_a_library_failure_on_one_scan_keeps_the_others(bundle, cases, tmp_path, monkeypatch):
    """A MemoryError (or any library error) preparing one case is that case's row and
    one log line; the other case is predicted and written."""
    from medtx.predict import run

    real = run._prepare
    names = sorted(p.name for p in cases.iterdir() if p.is_dir())

    def prepare(bundle, scan, folder):
        if scan.scan == names[0]:
            raise MemoryError("Unable to allocate 29.8 GiB\nfor an array")
        return real(bundle, scan, folder)

    monkeypatch.setattr(run, "_prepare", prepare)
    lines: list[str] = []
    out = tmp_path / "out"
    run.predict_bundle(bundle.path, [cases], out, log=lines.append)
    table = pd.read_csv(out / PREDICTIONS, sep="\t", keep_default_na=False).set_index("scan")
    why = f"{names[0]}: unexpected MemoryError: Unable to allocate 29.8 GiB"
    assert table.at[names[0], "error"] == why and table.at[names[0], "segmentation"] == ""
    assert table.at[names[1], "error"] == "" and Path(table.at[names[1], "segmentation"]).exists()
    assert f"medtx: skipped: {why}" in lines
    assert lines[-1] == (
        "medtx predict: 1 scan(s) predicted, 1 skipped "
        f"(named in the error column of {out / PREDICTIONS})"
    )
    by_fold = pd.read_csv(out / BY_FOLD, sep="\t")
    assert set(by_fold["scan"]) == {names[1]}
