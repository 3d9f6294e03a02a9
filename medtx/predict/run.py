"""``medtx predict``: raw scans -> the bundle's preprocessing -> its fold ensemble -> a TSV.

Each scan is preprocessed with the settings, backend, seed and QC thresholds the
bundle recorded (never the local config), so a scan the study preprocessed
gets the same model input, and each fold model then gives what the study's
evaluation gave. The fold spread is reported as the prediction's uncertainty.

Outputs in ``out``:

- ``predictions.tsv``: a row per scan: identity, QC verdict and face check, then
  class probabilities (mean and fold sd), the brain age (mean, sd, and with a
  chronological age the gap, raw and bias-corrected) or the segmentation file
  and region volumes in ml;
- ``predictions_by_fold.tsv``: each fold model's own output per scan;
- ``<scan>/``: the preprocessing outputs and provenance, the model input
  (``<scan>_input.npy``) and ``<scan>_predict.json`` (bundle, weights, device,
  outputs, with sha256s); segmentation: ``<scan>_seg.nii.gz`` on the input's grid.

A scan that fails QC is predicted and flagged (``qc_passed`` false, a warning
line naming it); one that cannot be read or preprocessed (a corrupt, empty or
oversized image: ``medtx.io``) is one ``medtx: skipped:`` line and a row with
only its identity and ``error`` filled, and the others are predicted and written.

The workflow's predict rule runs the same models and writes the same files from
its own caches and provenance records (``predict_cached``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medtx import __version__
from medtx.bundle import ENSEMBLE, META, Bundle, load_bundle
from medtx.errors import MedtxError
from medtx.predict.inputs import DATASET, ScanInput, collect_inputs

PREDICTIONS = "predictions.tsv"
BY_FOLD = "predictions_by_fold.tsv"


def predict_bundle(
    bundle_path: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    device: str = "cpu",
    batch_size: int = 2,
    log: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Predict every scan named by ``inputs`` (``medtx.predict.inputs``); return the table.

    ``log`` gets the skipped inputs, QC warnings and progress (default: stderr).
    """
    from medtx.train.loop import pick_device

    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    bundle = load_bundle(bundle_path)
    bundle.require(ENSEMBLE)  # before any scan is preprocessed
    out = Path(out)
    if (out / PREDICTIONS).exists():
        raise MedtxError(f"{out / PREDICTIONS}: exists; give a new --out folder")
    if batch_size < 1:
        raise MedtxError(f"--batch-size must be at least 1, not {batch_size}")
    dev = pick_device(device)
    task = bundle.meta["task"]
    scans, problems = collect_inputs(inputs, brats=task == "segmentation")
    for line in problems:
        say(f"medtx: skipped: {line}")
    if not scans:
        raise MedtxError("nothing to predict: no usable scan among the inputs")
    rows, ready = [], []
    for n, scan in enumerate(scans, 1):
        say(f"medtx predict: preprocessing {scan.scan} ({n}/{len(scans)})")
        try:
            prepared = _prepare(bundle, scan, out / scan.scan)
        except Exception as err:  # one scan's failure never costs the others their predictions
            rows.append(_skipped(scan, err, say))
            continue
        _warn_if_failed(scan.scan, prepared, say)
        ready.append((scan, prepared))
    return _predict_and_write(bundle, ready, rows, out, device=dev, batch_size=batch_size, say=say)


def predict_cached(
    bundle_path: str | Path,
    cache_index: str | Path,
    records: Sequence[str | Path],
    scan_table: str | Path,
    out: str | Path,
    *,
    device: str = "cpu",
    batch_size: int = 2,
    log: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """The workflow's predict rule: a dataset's model-ready caches, already made by
    the workflow, through the bundle. The workflow checks at start that its
    preprocessing settings are the bundle's (``ensemble_bundles``); QC verdicts
    come from the scans' provenance ``records``, ages from the ``scan_table``."""
    from medtx.data.cache import read_cache_index
    from medtx.data.scans import read_scan_table
    from medtx.train.loop import pick_device

    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    bundle = load_bundle(bundle_path)
    bundle.require(ENSEMBLE)
    verdicts = dict(_verdict(path) for path in records)
    table = read_scan_table(scan_table).set_index("scan")
    ready = []
    for row in read_cache_index(cache_index).to_dict("records"):
        scan = row["scan"]
        if scan not in verdicts:
            raise MedtxError(f"{cache_index}: no provenance record given for scan {scan!r}")
        age = table.at[scan, "age"] if scan in table.index and "age" in table.columns else ""
        item = ScanInput(
            scan,
            {"t1": str(table.at[scan, "t1"]) if scan in table.index else ""},
            row["subject"],
            row["session"] or None,
            float(age) if age else None,
        )
        prepared = {"cache": row["image"], **verdicts[scan]}
        _warn_if_failed(scan, prepared, say)
        ready.append((item, prepared))
    dev = pick_device(device)
    return _predict_and_write(
        bundle, ready, [], Path(out), device=dev, batch_size=batch_size, say=say
    )


def _predict_and_write(
    bundle: Bundle,
    ready: list[tuple[ScanInput, dict[str, Any]]],
    rows: list[dict[str, Any]],
    out: Path,
    *,
    device: Any,
    batch_size: int,
    say: Callable[[str], None],
) -> pd.DataFrame:
    """Each fold on the prepared scans; the TSVs and a record per scan into ``out``."""
    from medtx.io import write_text

    by_fold = fold_outputs(bundle, ready, device=device, batch_size=batch_size, say=say)
    fold_rows = []
    for (scan, prepared), outputs in zip(ready, by_fold):
        try:
            row, per_fold = _summarize(bundle, scan, prepared, outputs, out / scan.scan)
            _write_record(bundle, scan, prepared, row, out / scan.scan, device=str(device))
        except MedtxError as err:
            rows.append(_skipped(scan, err, say))
            continue
        rows.append(row)
        fold_rows += per_fold
    table = pd.DataFrame(rows)
    failed = int(table["error"].notna().sum()) if "error" in table else 0
    if failed:
        say(
            f"medtx predict: {len(table) - failed} scan(s) predicted, {failed} skipped "
            f"(named in the error column of {out / PREDICTIONS})"
        )
    write_text(table.to_csv(sep="\t", index=False, float_format="%.6g"), out / PREDICTIONS)
    write_text(
        pd.DataFrame(fold_rows).to_csv(sep="\t", index=False, float_format="%.6g"),
        out / BY_FOLD,
    )
    return table


def fold_models(bundle: Bundle) -> list:
    """The bundle's fold models in eval mode. Weights come only from files its
    manifest lists, inside its folder (``Bundle.file``), even for a ``Bundle`` not
    made by ``load_bundle``, which has also checked their shapes."""
    from safetensors.torch import load_file

    from medtx.models.registry import build

    bundle.require(ENSEMBLE)
    out = []
    for i, fold in enumerate(bundle.meta["folds"]):
        weights = bundle.file(fold.get("weights"), f"folds[{i}].weights")
        model = build(bundle.meta["model_kwargs"])
        model.load_state_dict(load_file(str(weights)))
        out.append(model.eval())
    return out


def _skipped(scan: ScanInput, err: Exception, say: Callable[[str], None]) -> dict[str, Any]:
    """The row of a scan that could not be predicted: its identity and, in ``error``,
    why in one line (a library's exception by its type, as the command line says it)."""
    if isinstance(err, MedtxError):
        why = str(err)
    else:
        first = (str(err).strip().splitlines() or [""])[0]
        why = f"{scan.scan}: unexpected {type(err).__name__}: {first}".rstrip(": ")
    why = " ".join(why.split())  # one line in the log and one cell in the table
    say(f"medtx: skipped: {why}")
    return {**_identity(scan), "error": why}


def _identity(scan: ScanInput) -> dict[str, Any]:
    return {
        "scan": scan.scan,
        "subject": scan.subject,
        "session": scan.session or "",
        "input": ";".join(scan.images.values()),
    }


def _prepare(bundle: Bundle, scan: ScanInput, folder: Path) -> dict[str, Any]:
    """The scan through the bundle's preprocessing: model-input cache, QC and face check."""
    from medtx.data.cache import cache_volume
    from medtx.preprocess.context import StepContext

    prep = bundle.meta["preprocessing"]
    settings = prep["settings"]
    cache = folder / f"{scan.scan}_input.npy"
    brats = bundle.meta["task"] == "segmentation"
    ctx = StepContext(
        scan=scan.scan,
        backend=prep["backend"],
        seed=prep.get("seed"),
        dataset=DATASET,
        subject=scan.subject,
        session=scan.session,
        threads=int(settings.get("threads", 1)),
        deterministic=bool(settings.get("deterministic", True)),
    )
    if brats:
        from medtx.preprocess.brats import run_brats

        record = run_brats(
            scan.images,
            None,
            image_out=folder / f"{scan.scan}_preproc.nii.gz",
            seg_out=None,
            record_out=folder / f"{scan.scan}_brats.json",
            ctx=ctx,
            params=settings["brats"],
            cache_out=cache,
        )
        return {
            "cache": cache,
            "qc_passed": True,
            "qc_failures": [],
            "face_check": "not measured",
            "crop_start": record["qc"]["metrics"]["crop_start"],
        }
    from medtx.preprocess.backend import require_fsl
    from medtx.preprocess.chain import run_chain

    if prep["backend"] == "fsl":
        require_fsl()
    files = run_chain(
        scan.images["t1"],
        folder,
        ctx=ctx,
        settings=settings,
        qc=prep.get("qc"),
        subject=scan.subject,
        session=scan.session,
    )
    cache_volume(files["preproc"], cache)
    return {"cache": cache, **_verdict(files["provenance"])[1]}


def _verdict(provenance: str | Path) -> tuple[str, dict[str, Any]]:
    """A scan's id, and its QC verdict and face check, from its merged provenance record."""
    import json

    from medtx.provenance.qc import face_status

    record = json.loads(Path(provenance).read_text())
    return record["scan"], {
        "qc_passed": bool(record["qc_passed"]),
        "qc_failures": list(record["qc_failures"]),
        "face_check": face_status(record)["status"],
        "provenance": str(provenance),
    }


def _warn_if_failed(scan: str, prepared: dict[str, Any], say: Callable[[str], None]) -> None:
    if not prepared["qc_passed"]:
        say(
            f"medtx: warning: {scan} fails QC ({'; '.join(prepared['qc_failures'])}); "
            "its prediction is flagged (qc_passed false)"
        )


def fold_outputs(
    bundle: Bundle,
    ready: list[tuple[ScanInput, dict[str, Any]]],
    *,
    device: Any,
    batch_size: int,
    say: Callable[[str], None],
) -> list[list[np.ndarray]]:
    """Each scan's outputs, one array per fold: class probabilities, the age in
    years, or WT/TC/ET probabilities on the pooled grid."""
    import torch

    from medtx.train.data import VolumeSet, collate

    if not ready:
        return []
    meta = bundle.meta
    task = meta["task"]
    data = VolumeSet(
        [{"scan": s.scan, "image": str(p["cache"])} for s, p in ready],
        task="pretrain",  # inputs only: no labels here
        downsample=int(meta["input"]["downsample"]),
    )
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=collate)
    models = [m.to(device) for m in fold_models(bundle)]
    outputs: list[list[np.ndarray]] = []
    with torch.no_grad():
        for batch in loader:
            image = batch["image"].to(device)
            per_fold = []
            for model, fold in zip(models, meta["folds"]):
                logits = model(image).float()
                if task == "classification":
                    per_fold.append(torch.softmax(logits, dim=1))
                elif task == "regression":  # each fold in its own training ages' units
                    scale = fold["target"]
                    per_fold.append(logits[:, 0] * scale["std"] + scale["mean"])
                else:
                    per_fold.append(torch.sigmoid(logits))
            for i in range(image.shape[0]):
                outputs.append([f[i].double().cpu().numpy() for f in per_fold])
            say(f"medtx predict: {len(outputs)}/{len(ready)} scans through {len(models)} folds")
    return outputs


def _summarize(
    bundle: Bundle,
    scan: ScanInput,
    prepared: dict[str, Any],
    outputs: list[np.ndarray],
    folder: Path,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The scan's row (ensemble mean, fold sd) and its per-fold rows."""
    meta = bundle.meta
    task = meta["task"]
    folds = [f["fold"] for f in meta["folds"]]
    row: dict[str, Any] = {
        **_identity(scan),
        "qc_passed": prepared["qc_passed"],
        "qc_failures": "; ".join(prepared["qc_failures"]),
        "face_check": prepared["face_check"],
        "n_folds": len(folds),
    }
    per_fold: list[dict[str, Any]] = [{"scan": scan.scan, "fold": k} for k in folds]
    if task == "classification":
        names = sorted(meta["label_map"], key=meta["label_map"].get)
        probs = np.stack(outputs)  # (folds, classes)
        mean, sd = probs.mean(axis=0), probs.std(axis=0)
        row["prediction"] = names[int(mean.argmax())]
        for c, name in enumerate(names):
            row[f"p_{name}"] = mean[c]
            row[f"p_{name}_sd"] = sd[c]
            for r, p in zip(per_fold, probs):
                r[f"p_{c}"] = p[c]
        for r, p in zip(per_fold, probs):
            r["prediction"] = int(p.argmax())
    elif task == "regression":
        from medtx.brainage import corrected_gap

        ages = np.array([float(o) for o in outputs])
        row["brain_age"], row["brain_age_sd"] = ages.mean(), ages.std()
        row["age"] = scan.age if scan.age is not None else ""
        for r, a in zip(per_fold, ages):
            r["prediction"] = a
        if scan.age is not None:
            row["gap"] = ages.mean() - scan.age
            fits = [f.get("age_bias") for f in meta["folds"]]
            if all(fits):
                gaps = [
                    float(corrected_gap(np.array([a]), np.array([scan.age]), fit)[0])
                    for a, fit in zip(ages, fits)
                ]
                row["gap_corrected"] = float(np.mean(gaps))
                for r, g in zip(per_fold, gaps):
                    r["gap_corrected"] = g
    else:
        row.update(_segmentation(bundle, scan, prepared, outputs, folder, per_fold))
    return row, per_fold


def _segmentation(
    bundle: Bundle,
    scan: ScanInput,
    prepared: dict[str, Any],
    outputs: list[np.ndarray],
    folder: Path,
    per_fold: list[dict[str, Any]],
) -> dict[str, Any]:
    """The ensemble's label volume on the case's grid, and region volumes (fold sd too)."""
    import nibabel as nib

    from medtx.io import save_nifti
    from medtx.predict.segmentation import native_labels, region_volumes_ml

    meta = bundle.meta
    ref: Any = nib.load(scan.images[next(iter(scan.images))])
    grid = {
        "factor": int(meta["input"]["downsample"]),
        "crop_start": prepared["crop_start"],
        "crop_size": meta["input"]["model_ready_shape"],
        "native_shape": ref.shape[:3],
    }
    labels = native_labels(np.mean(outputs, axis=0), **grid)
    seg = save_nifti(labels, ref.affine, folder / f"{scan.scan}_seg.nii.gz", dtype=np.uint8)
    volumes = region_volumes_ml(labels, ref.affine)
    fold_volumes = [region_volumes_ml(native_labels(o, **grid), ref.affine) for o in outputs]
    for r, v in zip(per_fold, fold_volumes):
        r.update(v)
    spread = {f"{k}_sd": float(np.std([v[k] for v in fold_volumes])) for k in volumes}
    return {"segmentation": str(seg), **volumes, **spread}


def _write_record(
    bundle: Bundle,
    scan: ScanInput,
    prepared: dict[str, Any],
    row: dict[str, Any],
    folder: Path,
    *,
    device: str,
) -> None:
    """``<scan>_predict.json``: which bundle and weights made this prediction, from what."""
    from datetime import datetime, timezone

    from medtx.io import write_json
    from medtx.provenance.records import file_entry, tool_versions

    inputs = [file_entry(role, path) for role, path in scan.images.items()]
    inputs.append(file_entry("model_input", prepared["cache"]))
    weights = [
        file_entry(f"fold-{f['fold']}", bundle.path / f["weights"]) for f in bundle.meta["folds"]
    ]
    outputs = [file_entry("segmentation", row["segmentation"])] if "segmentation" in row else []
    write_json(
        {
            "step": "predict",
            "scan": scan.scan,
            "subject": scan.subject,
            "session": scan.session,
            "bundle": {
                "path": str(bundle.path.resolve()),
                "backbone": bundle.meta["backbone"],
                "task": bundle.meta["task"],
                "meta": file_entry("bundle", bundle.path / META),
                "weights": weights,
            },
            "provenance": str(prepared.get("provenance") or ""),
            "inputs": inputs,
            "outputs": outputs,
            "prediction": {k: v for k, v in row.items() if k not in ("input",)},
            "device": device,
            "medtx": __version__,
            "versions": tool_versions(),
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        folder / f"{scan.scan}_predict.json",
    )
