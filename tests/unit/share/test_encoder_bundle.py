"""A pre-trained encoder as a bundle: `medtx export` of a real stage-2 checkpoint,
fine-tuning that starts from it (`train: {init_from: ...}`), and the leakage
firewall that refuses it when its pre-training subjects are evaluated here."""

import hashlib
import json
import shutil

import pandas as pd
import pytest
import torch

from medtx.bundle import MANIFEST, BundleError, encoder_bundles, load_bundle, write_manifest
from medtx.config import load_config
from medtx.errors import ConfigError
from medtx.folds.firewall import LeakageError, bundle_leaks, run_firewall
from medtx.models.registry import build
from medtx.share.export import export_bundle, export_encoder
from medtx.train.checkpoints import load_pretrained, model_kwargs
from medtx.train.config import resolve_config
from medtx.train.pretrain import pretrain_exemplar, pretrain_masked
from medtx.workflow.inputs import model_input_settings, settings_hash
from tests.unit.train.test_stages import FAST, TWO_CLASSES, write_items

CFG = {**FAST, **TWO_CLASSES, "epochs": 1}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """Stages 1 and 2 trained for real on toy:pre00..pre04, then exported."""
    root = tmp_path_factory.mktemp("encoder")
    config = load_config()
    settings = model_input_settings(config["preprocess"], "ants", brats=False)
    meta = {"preprocess_hash": settings_hash(settings), "backend": "ants"}
    items = write_items(root / "data", 5, seed=5, prefix="pre")
    quiet = {"config": CFG, "log": lambda _: None, "metadata": meta}
    pretrain_exemplar(items, out=root / "s1.pt", **quiet)
    pretrain_masked(items, init=root / "s1.pt", out=root / "s2.pt", **quiet)
    bundle = export_encoder(root / "s2.pt", root / "bundle", config=config)
    return root, bundle, config


def digest(text):
    return hashlib.sha256(text.encode()).hexdigest()


def test_the_bundle_lists_its_subjects_by_digest_only(encoder):
    _, bundle, _ = encoder
    text = (bundle.path / "bundle.json").read_text()
    training = json.loads(text)["training"]
    assert training["n_subjects"] == 5
    assert training["subject_id_sha256"] == sorted(digest(f"toy:pre{i:02d}") for i in range(5))
    assert "pre00" not in text  # the ids themselves stay home
    assert bundle.meta["kind"] == "pretrained-encoder" and bundle.meta["stage"] == "pretrain_masked"


def test_fine_tuning_from_the_bundle_loads_what_the_checkpoint_holds(encoder):
    root, bundle, _ = encoder
    cfg = resolve_config(CFG)
    kwargs = model_kwargs(cfg, "classification", 2, 1, True)
    torch.manual_seed(0)
    a = build(kwargs)
    torch.manual_seed(1)
    b = build(kwargs)
    from_ckpt = load_pretrained(a, root / "s2.pt")
    from_bundle = load_pretrained(b, bundle.path, checkpoint=bundle.as_checkpoint())
    assert from_bundle["loaded"] == from_ckpt["loaded"] == ["encoders", "transformer"]
    assert (
        from_bundle["init_sha256"]
        == hashlib.sha256((bundle.path / MANIFEST).read_bytes()).hexdigest()
    )
    for key, value in a.state_dict().items():
        if key.split(".")[0] in ("encoders", "transformer"):
            torch.testing.assert_close(b.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_finetune_starts_from_a_received_bundle_and_records_it(encoder, tmp_path):
    from medtx.train.checkpoints import load_state
    from medtx.train.finetune import finetune

    _, bundle, _ = encoder
    items = write_items(tmp_path / "d", 6)
    finetune(
        "classification",
        items[:2],
        items[2:4],
        items[4:],
        init=bundle.path,
        out=tmp_path / "m.pt",
        predictions_out=tmp_path / "m.tsv",
        config=CFG,
        log=lambda _: None,
    )
    init = load_state(tmp_path / "m.pt")["metadata"]["init"]
    assert init["init"] == str(bundle.path) and init["loaded"] == ["encoders", "transformer"]
    assert init["init_sha256"] == hashlib.sha256((bundle.path / MANIFEST).read_bytes()).hexdigest()


def manifest(rows):
    """A one-fold manifest: (dataset, subject, role_0)."""
    return pd.DataFrame(rows, columns=["dataset", "subject", "role_0"]).assign(scan="x")


def test_an_evaluated_pre_training_subject_is_refused(encoder):
    _, bundle, _ = encoder
    digests = bundle.meta["training"]["subject_id_sha256"]
    clean = manifest([("adni", "a1", "train"), ("adni", "a2", "test"), ("toy", "pre01", "train")])
    assert bundle_leaks({"adni": clean}, "B", digests) == []  # training on them is fine
    leaky = manifest([("adni", "a1", "val"), ("toy", "pre01", "test")])
    (line,) = bundle_leaks({"adni": leaky}, "B", digests)
    assert line.startswith("toy:pre01 is a pre-training subject of the encoder bundle B")
    assert "test of fold 0" in line
    # a different id, declared the same person as a pre-training subject
    same = {"p7": ["adni:a1", "toy:pre03"]}
    tested = manifest([("adni", "a1", "test"), ("adni", "a2", "test")])
    (line,) = bundle_leaks({"adni": tested}, "B", digests, same)
    assert "adni:a1 (declared the same person as toy:pre03)" in line


def test_the_firewall_command_refuses_and_warns(encoder, tmp_path):
    _, bundle, _ = encoder
    path = tmp_path / "adni_task-regression_folds.tsv"
    leaky = manifest([("adni", "a1", "train"), ("toy", "pre02", "val")])
    leaky.assign(role_1="test", frac_0=100, frac_1=100).to_csv(path, sep="\t", index=False)
    with pytest.raises(LeakageError, match="toy:pre02 is a pre-training subject"):
        run_firewall([path], [], {}, tmp_path / "fw.json", bundles=[bundle.path])
    assert not (tmp_path / "fw.json").exists()
    # a bundle without digests (another tool's, or edited and re-listed) cannot be checked
    blind = tmp_path / "blind"
    shutil.copytree(bundle.path, blind)
    meta = json.loads((blind / "bundle.json").read_text())
    del meta["training"]["subject_id_sha256"]
    (blind / "bundle.json").write_text(json.dumps(meta))
    write_manifest(blind)
    said = []
    result = run_firewall([path], [], {}, tmp_path / "fw.json", bundles=[blind], warn=said.append)
    assert result["bundles"] == [{"bundle": str(blind), "checked": False}]
    assert said and "cannot be checked" in said[0]


def test_init_from_takes_one_encoder_per_configured_backbone(encoder, tmp_path):
    _, bundle, _ = encoder
    assert encoder_bundles([bundle.path], ["medical_transformer"]) == {
        "medical_transformer": str(bundle.path)
    }
    with pytest.raises(ConfigError, match="is a medical_transformer encoder, but train/backbones"):
        encoder_bundles([bundle.path], ["pumit"])
    copy = tmp_path / "copy"
    shutil.copytree(bundle.path, copy)
    with pytest.raises(ConfigError, match="give one per backbone"):
        encoder_bundles([bundle.path, copy], ["medical_transformer"])
    (copy / "encoder.safetensors").write_bytes(b"changed")
    with pytest.raises(BundleError, match=r"encoder\.safetensors: changed since export"):
        encoder_bundles([copy], ["medical_transformer"])


def test_a_fine_tuned_checkpoint_is_not_an_encoder(encoder, tmp_path):
    root, bundle, config = encoder
    from medtx.train.finetune import finetune

    items = write_items(tmp_path / "d", 6)
    out = tmp_path / "run" / "fold-0"
    finetune(
        "classification",
        items[:2],
        items[2:4],
        items[4:],
        out=out / "model.pt",
        predictions_out=out / "predictions.tsv",
        config=CFG,
        metadata={"preprocess_hash": bundle.meta["preprocessing"]["hash"], "backend": "ants"},
        log=lambda _: None,
    )
    with pytest.raises(BundleError, match="not a pre-training stage"):
        export_encoder(out / "model.pt", tmp_path / "e", config=config)
    ensemble = export_bundle(tmp_path / "run", tmp_path / "ens", config=config)
    with pytest.raises(BundleError, match="holds a fold-ensemble, not a pretrained-encoder"):
        encoder_bundles([ensemble.path], ["medical_transformer"])
    assert load_bundle(ensemble.path).meta["kind"] == "fold-ensemble"
