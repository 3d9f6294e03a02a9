"""`medtx export`: a real two-fold ensemble of tiny fine-tuned models becomes a bundle
whose models predict what the checkpoints predict, and whose files cannot change
unnoticed."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from medtx.bundle import MANIFEST, SIGNATURE, BundleError, load_bundle, tensor_shapes
from medtx.config import load_config
from medtx.predict.run import fold_models
from medtx.provenance.manifest import KEY_ENV
from medtx.share.export import export_bundle
from medtx.train.checkpoints import model_from_checkpoint
from medtx.train.finetune import finetune
from medtx.workflow import paths
from medtx.workflow.inputs import model_input_settings, settings_hash
from tests.unit.train.test_stages import FAST, TWO_CLASSES, write_items

PUMIT = {**FAST, "backbone": "pumit", "preset": "tiny", "batch_size": 2, "epochs": 1}
SHAPE = (20, 24, 18)


def train_ensemble(root, task, fold_items, train_config, config, sidecar):
    """A two-fold (or more) ensemble of ``task`` trained for real under ``root``/run,
    as the workflow's fold-<k>/ folders, and the fold sidecar export reads.

    ``fold_items``: fold -> items, split 50/25/25 into train, val and test;
    ``config``: the study config, whose preprocessing the checkpoints record.
    """
    brats = task == "segmentation"
    settings = model_input_settings(config["preprocess"], "ants", brats=brats)
    metadata = {"preprocess_hash": settings_hash(settings), "backend": "ants"}
    run_dir = root / "run"
    for fold, items in fold_items.items():
        n = len(items)
        out = run_dir / f"fold-{fold}"
        finetune(
            task,
            items[: n // 2],
            items[n // 2 : 3 * n // 4],
            items[3 * n // 4 :],
            out=out / "model.pt",
            predictions_out=out / "predictions.tsv",
            metrics_out=out / "metrics.json",
            config=train_config,
            metadata=metadata,
            run={
                "dataset": "toy",
                "task": task,
                "backbone": train_config.get("backbone", "medical_transformer"),
                "init": "scratch",
                "frac": 100,
                "fold": fold,
            },
            log=lambda _: None,
        )
    path = Path(paths.manifest_sidecar(config["results"], "toy", task))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(sidecar))
    return run_dir


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A two-fold PUMIT classifier trained for real (fold-{0,1}/model.pt) and the config."""
    root = tmp_path_factory.mktemp("study")
    config = load_config()
    config["results"] = str(root / "results")
    folds = {
        k: write_items(root / f"cache{k}", 8, shape=SHAPE, seed=k, prefix=f"f{k}") for k in (0, 1)
    }
    side = {"subjects_sha256": "ab" * 32, "n_subjects": 16, "n_scans": 16, "n_folds": 2}
    run_dir = train_ensemble(root, "classification", folds, {**PUMIT, **TWO_CLASSES}, config, side)
    return run_dir, config


@pytest.fixture
def bundle(study, tmp_path, monkeypatch):
    """Exported and loaded with no signing key set."""
    monkeypatch.delenv(KEY_ENV, raising=False)
    run_dir, config = study
    return export_bundle(run_dir, tmp_path / "bundle", config=config)


def test_the_bundle_predicts_what_the_checkpoints_predict(study, bundle):
    run_dir, _ = study
    loaded = load_bundle(bundle.path)
    x = torch.rand(2, 1, *SHAPE)
    for fold, model in zip(loaded.meta["folds"], fold_models(loaded)):
        original, _ = model_from_checkpoint(run_dir / f"fold-{fold['fold']}" / "model.pt")
        with torch.no_grad():
            torch.testing.assert_close(model(x), original(x), rtol=0, atol=0)


def test_bundle_json_says_what_the_inputs_must_be(study, bundle):
    run_dir, _ = study
    meta = json.loads((bundle.path / "bundle.json").read_text())
    assert meta["backbone"] == "pumit" and meta["task"] == "classification"
    assert meta["label_map"] == TWO_CLASSES["label_map"]
    assert [f["fold"] for f in meta["folds"]] == [0, 1]
    for fold in meta["folds"]:  # the test metrics the fold's own metrics.json holds
        metrics = json.loads((run_dir / f"fold-{fold['fold']}" / "metrics.json").read_text())
        assert fold["test"]["mauc"] == metrics["mauc"] and fold["test"]["n"] == metrics["n"]
    assert meta["training"]["subjects_sha256"] == "ab" * 32
    assert meta["preprocessing"]["settings"]["flirt"]["ants"]["registration_mm"] == 2.0
    assert meta["input"]["model_ready_shape"] == [96, 114, 96]  # the template pooled by 2


def test_the_same_run_exports_the_same_bytes(study, bundle, tmp_path):
    run_dir, config = study
    again = export_bundle(run_dir, tmp_path / "again", config=config)
    assert (again.path / MANIFEST).read_text() == (bundle.path / MANIFEST).read_text()


def test_the_manifest_is_sha256sum_format(bundle):
    if not shutil.which("sha256sum"):
        pytest.skip("no sha256sum here")
    proc = subprocess.run(
        ["sha256sum", "-c", MANIFEST], cwd=bundle.path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_changed_weight_file_is_refused_by_name(bundle):
    weights = bundle.path / "fold-1.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"fold-1\.safetensors: changed since export"):
        load_bundle(bundle.path)


def test_a_missing_or_added_file_is_refused_by_name(bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bundle.path, copy)
    (copy / "notes.txt").write_text("mine")
    with pytest.raises(BundleError, match=r"notes\.txt: not in MANIFEST"):
        load_bundle(copy)
    (copy / "notes.txt").unlink()
    (copy / "bundle.json").unlink()
    with pytest.raises(BundleError, match=r"bundle\.json: listed in MANIFEST.sha256 but missing"):
        load_bundle(copy)


def test_other_preprocessing_settings_are_refused(study, tmp_path):
    run_dir, config = study
    other = json.loads(json.dumps(config))
    other["preprocess"]["n4"]["shrink_factor"] = 4
    with pytest.raises(BundleError, match="not the ones these models were trained on"):
        export_bundle(run_dir, tmp_path / "b", config=other)
    assert not (tmp_path / "b").exists()
    elsewhere = {**config, "results": str(tmp_path / "no-results")}  # no fold sidecar there
    with pytest.raises(BundleError, match="the fold sidecar is missing"):
        export_bundle(run_dir, tmp_path / "b", config=elsewhere)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-written


def test_the_command_says_what_it_wrote_and_fails_in_one_line(study, tmp_path):
    run_dir, config = study
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))

    def export(source, out):
        cmd = ["export", str(source), "--out", str(out), "--config", str(cfg)]
        return subprocess.run([sys.executable, "-m", "medtx", *cmd], capture_output=True, text=True)

    ok = export(run_dir, tmp_path / "b")
    assert ok.returncode == 0, ok.stderr
    assert "pumit classification, folds 0, 1" in ok.stdout
    bad = export(tmp_path, tmp_path / "c")
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        f"medtx: error: {tmp_path}: no fold-*/model.pt to export (a fine-tuning run folder?)"
    ]


def test_a_bundle_is_readable_by_others_under_the_umask(bundle):
    """safetensors writes 0600 and mkdtemp 0700: both are opened up to the umask."""
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(bundle.path.stat().st_mode) == 0o777 & ~umask
    for path in bundle.path.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


def test_a_signed_bundle_loads_under_its_key_and_sha256sum_still_checks_it(
    study, bundle, tmp_path, monkeypatch
):
    """The signature signs the manifest and lies beside it: the listed files, and so
    the manifest, are the unsigned export's byte for byte."""
    run_dir, config = study
    monkeypatch.setenv(KEY_ENV, "lab secret")
    signed = export_bundle(run_dir, tmp_path / "signed", config=config).path
    manifest = (signed / MANIFEST).read_bytes()
    assert manifest == (bundle.path / MANIFEST).read_bytes() and b"hmac" not in manifest
    record = json.loads((signed / SIGNATURE).read_text())
    assert record["sha256"] == hashlib.sha256(manifest).hexdigest() and len(record["hmac"]) == 64
    load_bundle(signed)
    monkeypatch.delenv(KEY_ENV)
    load_bundle(signed)  # no key here: the manifest alone is checked
    if shutil.which("sha256sum"):
        proc = subprocess.run(["sha256sum", "-c", MANIFEST], cwd=signed, capture_output=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_header_reader_reads_what_safetensors_reads(bundle):
    from safetensors.torch import load_file

    for name in ("fold-0.safetensors", "fold-1.safetensors"):
        tensors = load_file(str(bundle.path / name))
        assert tensor_shapes(bundle.path / name) == {k: tuple(v.shape) for k, v in tensors.items()}


def test_checking_the_shapes_allocates_and_draws_nothing(bundle):
    """load_bundle builds the model on the meta device: fine-tuning from a bundle,
    seeded before it loads one, draws the numbers it would draw without it."""
    torch.manual_seed(3)
    before = torch.random.get_rng_state()
    load_bundle(bundle.path)
    assert torch.equal(torch.random.get_rng_state(), before)
