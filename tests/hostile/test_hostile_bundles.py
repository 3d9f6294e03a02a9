"""Hostile bundles: a received bundle that reaches outside itself, lies about its
model, carries a broken weights file or was edited and re-listed is refused in one
line when it is loaded, before `medtx predict` touches a scan.

Each bundle here is a real export of a tiny trained two-fold classifier (or a
pre-trained encoder), then edited on disk as a careless or hostile sender would.
"""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from medtx.bundle import encoder_bundles, load_bundle, write_manifest
from medtx.cli import main
from medtx.errors import MedtxError
from medtx.predict.run import fold_models
from medtx.share.export import export_bundle
from tests.conftest import sphere, write_nifti
from tests.unit.share.test_encoder_bundle import encoder  # noqa: F401  (a module fixture)
from tests.unit.test_bundle import study  # noqa: F401  (a module fixture)

KEY = "MEDTX_PROVENANCE_KEY"
SIGNATURE = "MANIFEST.sha256.hmac"


@pytest.fixture(scope="module")
def exported(study, tmp_path_factory):  # noqa: F811
    run_dir, config = study
    return export_bundle(run_dir, tmp_path_factory.mktemp("exported") / "bundle", config=config)


@pytest.fixture
def bundle(exported, tmp_path, monkeypatch):
    """A fresh copy of the exported bundle, loaded with no key set."""
    monkeypatch.delenv(KEY, raising=False)
    copy = tmp_path / "bundle"
    shutil.copytree(exported.path, copy)
    return copy


def edit_meta(path, change):
    """``change(meta)`` on bundle.json, then a manifest consistent with the edit."""
    meta = json.loads((path / "bundle.json").read_text())
    change(meta)
    (path / "bundle.json").write_text(json.dumps(meta))
    write_manifest(path)


def refused(path, match):
    """load_bundle's one-line refusal, matching ``match``."""
    with pytest.raises(MedtxError, match=match) as err:
        load_bundle(path)
    assert "\n" not in str(err.value)
    return str(err.value)


def foreign_weights(bundle, tmp_path):
    """Another model's weights outside the bundle: fold 1's, with its head zeroed."""
    tensors = load_file(str(bundle / "fold-1.safetensors"))
    for name in tensors:
        if "head" in name:
            tensors[name] = tensors[name] * 0
    out = tmp_path / "elsewhere" / "x.safetensors"
    out.parent.mkdir()
    save_file(tensors, str(out))
    return out


# -- weights from outside the bundle ------------------------------------------------------


def test_weights_named_through_dotdot_are_refused(bundle, tmp_path):
    foreign_weights(bundle, tmp_path)

    def escape(meta):
        meta["folds"][0]["weights"] = "../elsewhere/x.safetensors"

    edit_meta(bundle, escape)
    line = refused(bundle, r"folds\[0\]\.weights")
    assert str(bundle) in line and "../elsewhere/x.safetensors" in line
    assert "not in MANIFEST.sha256" in line


def test_weights_named_by_absolute_path_are_refused(bundle, tmp_path):
    outside = foreign_weights(bundle, tmp_path)
    edit_meta(bundle, lambda meta: meta["folds"][1].update(weights=str(outside)))
    line = refused(bundle, r"folds\[1\]\.weights")
    assert str(outside) in line and "not in MANIFEST.sha256" in line


def test_a_weights_symlink_out_of_the_bundle_is_refused(bundle, tmp_path):
    outside = foreign_weights(bundle, tmp_path)
    (bundle / "fold-0.safetensors").unlink()
    (bundle / "fold-0.safetensors").symlink_to(outside)
    write_manifest(bundle)  # sha256 follows the link: the manifest agrees
    line = refused(bundle, r"fold-0\.safetensors: a link to .* outside the bundle")
    assert str(outside) in line


def test_the_workflows_init_from_refuses_an_encoder_linked_out(encoder, tmp_path):  # noqa: F811
    """`train: {init_from: ...}` is checked when the workflow starts (encoder_bundles)."""
    _, received, _ = encoder
    copy = tmp_path / "enc"
    shutil.copytree(received.path, copy)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(copy / "encoder.safetensors", outside)
    (copy / "encoder.safetensors").unlink()
    (copy / "encoder.safetensors").symlink_to(outside)
    write_manifest(copy)
    with pytest.raises(MedtxError, match=r"encoder\.safetensors: a link to .* outside") as err:
        encoder_bundles([copy], ["medical_transformer"])
    assert "\n" not in str(err.value)


# -- bundle.json that does not say what the loader needs ----------------------------------


def _drop(key):
    return lambda meta: meta.pop(key)


BROKEN_META = {
    "no task": (_drop("task"), r"bundle\.json: task is missing"),
    "no preprocessing": (_drop("preprocessing"), r"bundle\.json: preprocessing is missing"),
    "no folds": (_drop("folds"), r"bundle\.json: folds is missing"),
    "no model_kwargs": (_drop("model_kwargs"), r"bundle\.json: model_kwargs is missing"),
    "no input": (_drop("input"), r"bundle\.json: input is missing"),
    "unknown task": (
        lambda m: m.update(task="survival"),
        r"bundle\.json: task is \"survival\", not one of",
    ),
    "folds not a list": (
        lambda m: m.update(folds={"0": "fold-0.safetensors"}),
        r"bundle\.json: folds is .*, not a list",
    ),
    "no folds at all": (lambda m: m.update(folds=[]), r"bundle\.json: folds is empty"),
    "a fold without weights": (
        lambda m: m["folds"][1].pop("weights"),
        r"bundle\.json: folds\[1\]\.weights is missing",
    ),
    "weights that are not a file of the bundle": (
        lambda m: m["folds"][0].update(weights="fold-7.safetensors"),
        r"folds\[0\]\.weights \"fold-7\.safetensors\" is not in MANIFEST\.sha256",
    ),
    "outputs as text": (
        lambda m: m["model_kwargs"].update(num_outputs="two"),
        r"bundle\.json: model_kwargs\.num_outputs is \"two\", not a whole number",
    ),
    "an unknown model argument": (
        lambda m: m["model_kwargs"].update(d_model=10**6),
        r"bundle\.json: model_kwargs\.d_model is not a model argument a bundle can set",
    ),
    "an unknown preset": (
        lambda m: m["model_kwargs"].update(preset="huge"),
        r"bundle\.json: model_kwargs do not build a model: .*preset",
    ),
    "a label map that disagrees with the outputs": (
        lambda m: m.update(label_map={"CN": 0, "MCI": 1, "AD": 2}),
        r"bundle\.json: label_map has 3 classes, model_kwargs\.num_outputs is 2",
    ),
    "kwargs of another task": (
        lambda m: m["model_kwargs"].update(task="regression"),
        r"bundle\.json: model_kwargs\.task is \"regression\", task is \"classification\"",
    ),
    "a downsample of zero": (
        lambda m: m["input"].update(downsample=0),
        r"bundle\.json: input\.downsample is 0; it must be 1 to",
    ),
    "an unknown kind": (
        lambda m: m.update(kind="toaster"),
        r"bundle\.json: kind is \"toaster\", not one of",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN_META))
def test_a_broken_bundle_json_is_refused_at_load_naming_the_key(bundle, case):
    change, match = BROKEN_META[case]
    edit_meta(bundle, change)
    assert str(bundle) in refused(bundle, match)


def test_an_absurd_number_of_outputs_is_refused_before_any_allocation(bundle):
    """num_outputs 10^8 would make each fold's head a 77 GB allocation."""
    edit_meta(bundle, lambda m: m["model_kwargs"].update(num_outputs=10**8))
    refused(bundle, r"model_kwargs\.num_outputs is 100000000; it must be 1 to 10000")
    edit_meta(bundle, lambda m: m["model_kwargs"].update(num_outputs=1e8))
    refused(bundle, r"model_kwargs\.num_outputs is 100000000\.0, not a whole number")
    edit_meta(bundle, lambda m: m["model_kwargs"].update(num_outputs=2, in_channels=4096))
    refused(bundle, r"model_kwargs\.in_channels is 4096; it must be 1 to 16")


# -- weights files that are not what bundle.json says -------------------------------------


def test_a_corrupt_safetensors_header_is_one_line(bundle):
    weights = bundle / "fold-1.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = (2**40).to_bytes(8, "little")  # a header "a terabyte long"
    weights.write_bytes(bytes(data))
    write_manifest(bundle)
    refused(bundle, r"fold-1\.safetensors: not a safetensors file: header length 1099511627776")
    data[:8] = (len(data) - 8).to_bytes(8, "little")
    data[8:16] = b"{garbage"
    weights.write_bytes(bytes(data))
    write_manifest(bundle)
    refused(bundle, r"fold-1\.safetensors: not a safetensors file: the header is not JSON")


def test_weights_of_another_shape_are_refused_naming_the_tensor(bundle):
    weights = bundle / "fold-0.safetensors"
    tensors = load_file(str(weights))
    head = next(name for name in sorted(tensors) if "head" in name and name.endswith("weight"))
    tensors[head] = tensors[head][:1].clone()  # one class instead of two
    save_file(tensors, str(weights), metadata={"format": "medtx-bundle/1"})
    write_manifest(bundle)
    line = refused(bundle, rf"fold-0\.safetensors: tensor {head} has shape \[1, ")
    assert "model_kwargs" in line


def test_a_broken_bundle_stops_medtx_predict_before_any_scan(bundle, tmp_path, capsys):
    foreign_weights(bundle, tmp_path)
    edit_meta(bundle, lambda m: m["folds"][0].update(weights="../elsewhere/x.safetensors"))
    scan = write_nifti(tmp_path / "scans" / "sub-01_T1w.nii.gz", sphere())
    code = main(["predict", str(bundle), str(scan), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"medtx: error: {bundle}/bundle.json: folds[0].weights")
    assert not (tmp_path / "out").exists()  # nothing was preprocessed


# -- signed bundles (MEDTX_PROVENANCE_KEY) ------------------------------------------------


@pytest.fixture
def signed(study, tmp_path, monkeypatch):  # noqa: F811
    run_dir, config = study
    monkeypatch.setenv(KEY, "lab secret")
    return export_bundle(run_dir, tmp_path / "signed", config=config).path


def test_weights_edited_and_re_listed_are_refused_under_the_key(signed, monkeypatch):
    assert (signed / SIGNATURE).is_file()
    load_bundle(signed)  # as exported: accepted
    weights = signed / "fold-1.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one weight's last byte: the header stays valid
    weights.write_bytes(bytes(data))
    with monkeypatch.context() as m:  # the editor has no key; sha256sum would pass
        m.delenv(KEY)
        write_manifest(signed)
        load_bundle(signed)  # without the key the manifest only catches accidents
    line = refused(signed, r"MANIFEST\.sha256 is not the one signed at export")
    assert str(signed) in line and KEY in line


def test_a_missing_signature_is_refused_under_the_key(signed, monkeypatch):
    (signed / SIGNATURE).unlink()
    line = refused(signed, rf"{SIGNATURE} is missing, but {KEY} is set")
    assert str(signed) in line


def test_an_unsigned_bundle_is_refused_under_the_key(bundle, monkeypatch):
    monkeypatch.setenv(KEY, "lab secret")
    refused(bundle, rf"{SIGNATURE} is missing, but {KEY} is set")


def test_another_key_is_refused(signed, monkeypatch):
    monkeypatch.setenv(KEY, "another lab's secret")
    refused(signed, rf"{KEY} does not give its signature")


def test_fold_models_refuses_a_name_outside_the_manifest_even_unchecked(bundle, tmp_path):
    """A Bundle built by hand (not by load_bundle) still loads only listed files."""
    from medtx.bundle import Bundle

    outside = foreign_weights(bundle, tmp_path)
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["folds"][0]["weights"] = str(outside)
    with pytest.raises(MedtxError, match=r"folds\[0\]\.weights .* not in MANIFEST\.sha256"):
        fold_models(Bundle(bundle, meta))
