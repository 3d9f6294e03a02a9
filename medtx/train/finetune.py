"""Fine-tuning, the paper's third stage: one task model per fold, init and fraction.

A task model (diagnosis, brain age, tumour segmentation) starts from the
pre-trained encoders (+ transformer), or from scratch, and is selected by its
validation metric (mAUC max / MAE min / mean Dice max); the best state then
predicts the test set: a per-scan TSV and a JSON of the test metrics. Brain age
adds the gap (predicted - age), raw and corrected for the age bias fitted on the
validation set (``medtx.brainage``).

Losses: cross-entropy; L1 (default, ``loss_regression: l1``: the paper reports
MAE, and L1 optimizes it directly) or MSE on standardized ages (the training
set's mean/std, stored in the checkpoint, so the head starts near the right
scale); BCE-with-logits + soft Dice over the WT/TC/ET region channels.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medtx.brainage import fit_age_bias
from medtx.bundle import ENCODER, load_bundle
from medtx.data.cache import read_cache_index
from medtx.domain import REGION_NAMES, TASKS, RunId
from medtx.errors import CohortError, ConfigError, MedtxError
from medtx.folds.manifest import read_manifest
from medtx.io import write_json, write_text
from medtx.metrics import mae
from medtx.models.registry import backbone, build
from medtx.train.checkpoints import (
    load_pretrained,
    load_state,
    model_kwargs,
    run_config,
    scans_of,
    stage_metadata,
)
from medtx.train.config import n_classes, resolve_config
from medtx.train.data import VolumeSet, collate, manifest_items, read_cached
from medtx.train.distributed import Group
from medtx.train.inference import (
    evaluate_predictions,
    log_likelihood,
    predict,
    prediction_table,
    selection_mauc,
)
from medtx.train.loop import (
    TrainResult,
    default_log,
    pick_device,
    seed_everything,
    train,
)
from medtx.train.losses import cross_entropy, segmentation_loss


def finetune(
    task: str,
    train_items: Sequence[Mapping[str, Any]],
    val_items: Sequence[Mapping[str, Any]],
    test_items: Sequence[Mapping[str, Any]],
    *,
    init: str | Path | None = None,
    use_transformer: bool = True,
    out: str | Path,
    predictions_out: str | Path,
    metrics_out: str | Path | None = None,
    config: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
    max_steps_this_run: int | None = None,
    log: Callable[[str], None] | None = None,
    run: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Stage 3: train a task model, select it on validation, predict the test set.

    Args:
        task: classification (K = classes of ``label_map``), regression (brain age) or
            segmentation (WT/TC/ET from as many channels as the cached images have).
        train_items, val_items, test_items: ``manifest_items`` of one fold.
        init: a pre-trained checkpoint (stage 1 or 2), a received encoder bundle
            folder (``train: {init_from: ...}``), or None for scratch. Its
            trained encoders (+ transformer when ``use_transformer``) are loaded; heads
            are fresh; 1-channel stems are inflated for 4-channel input. PUMIT loads
            its pre-trained ViT (``config["backbone"]`` picks the model).
        use_transformer: False is the "w/o transformer" ablation (encoders only).
        out: the final checkpoint (best-by-validation state + metadata).
        predictions_out: per-scan test predictions TSV: scan, subject, label, then
            prediction + p_0..p_{K-1} (classification), prediction = age in years,
            gap = prediction - age and gap_corrected (regression), or dice_WT,
            dice_TC, dice_ET (segmentation).
        metrics_out: the test metrics JSON (default: predictions_out with .json);
            regression adds ``age_bias``, the line predicted = slope * age + intercept
            fitted on the validation set (``medtx.brainage``; Beheshti et al.
            2019, de Lange & Cole 2020), whose residual is the TSV's gap_corrected;
            null (and no gap_corrected) when it cannot be fitted, e.g. one
            validation scan.
        config: ``DEFAULTS`` keys.
        metadata: stored in the checkpoint (fold sidecar, preprocessing fingerprint).
        device, max_steps_this_run, log: as ``medtx.train.loop.train``.
        run: the run's identity (``RunId.as_dict()``), recorded in the checkpoint and
            the metrics JSON, where the tables read it.

    Returns:
        The TrainResult; ``extra["metrics"]`` holds the test metrics unless interrupted
        (then nothing is predicted and the next call resumes).
    """
    if task not in TASKS:
        raise ConfigError(f"task {task!r} is not one of {list(TASKS)}")
    cfg = resolve_config(config)
    sets = _volume_sets(task, cfg, train_items, val_items, test_items)
    dev = pick_device(device)
    outputs, channels = _outputs_and_channels(task, cfg, sets)
    stats = _target_stats(task, sets)
    seed_everything(cfg["seed"])
    kwargs = model_kwargs(cfg, task, outputs, channels, use_transformer)
    model = build(kwargs)
    info = _load_init(model, init, cfg, use_transformer, log) if init is not None else None
    frozen = backbone(cfg["backbone"]).unused_when_finetuning
    for name, param in model.named_parameters():
        if name in frozen:  # no gradient would reach it: DDP needs it out of the step
            param.requires_grad_(False)

    meta, resume_key = _records(
        task,
        cfg,
        model,
        kwargs,
        (train_items, val_items, test_items),
        {**(metadata or {}), "run": dict(run) if run else None},
        info,
        stats,
        use_transformer,
    )
    mode: Literal["max", "min"] = "min" if task == "regression" else "max"
    result = train(
        model,
        sets["train"],
        loss_fn=_loss_fn(task, cfg, stats),
        out=out,
        config=resume_key,
        validate=_validator(task, cfg, sets["val"], dev, stats),
        mode=mode,
        collate=collate,
        prepare=sets["train"].prepare,
        metadata=meta,
        device=dev,
        max_steps_this_run=max_steps_this_run,
        log=log,
    )
    if result.status == "interrupted" or result.rank != 0:
        return result  # one process (rank 0) predicts and writes

    model.load_state_dict(load_state(out)["model"])
    tested = _predict_test(
        task, model, sets, cfg, dev, stats, predictions_out=predictions_out, log=log
    )
    result.extra["metrics"] = _write_metrics(
        tested,
        result,
        metrics_out=metrics_out,
        predictions_out=predictions_out,
        task=task,
        out=out,
        init=init,
        use_transformer=use_transformer,
        run=run,
    )
    return result


# What each task selects its model by, and its loss (``{loss_regression}``: the config's).
SELECTED_BY = {
    "classification": "val mAUC (ties: val log-likelihood)",
    "regression": "val MAE",
    "segmentation": "val mean Dice",
}
LOSSES = {
    "classification": "cross_entropy",
    "regression": "{loss_regression} on standardized age",
    "segmentation": "bce_with_logits + soft_dice",
}


def _write_metrics(
    tested: tuple[dict[str, Any], dict[str, Any]],
    result: TrainResult,
    *,
    metrics_out: str | Path | None,
    predictions_out: str | Path,
    task: str,
    out: str | Path,
    init: str | Path | None,
    use_transformer: bool,
    run: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The metrics JSON: the test metrics with the run, how it was selected and
    trained, and its files; returns the test metrics."""
    metrics, extra = tested
    metrics_out = (
        Path(metrics_out) if metrics_out is not None else Path(predictions_out).with_suffix(".json")
    )
    write_json(
        {
            "run": dict(run) if run else None,
            **metrics,
            "selected_by": SELECTED_BY[task],
            "val_metric": result.best_metric,
            "best_epoch": result.best_epoch,
            "epochs_done": result.epochs_done,
            "status": result.status,
            "world_size": result.world_size,
            "device": result.device,
            "checkpoint": str(out),
            "predictions": str(predictions_out),
            "init": str(init) if init else "scratch",
            "use_transformer": use_transformer,
            **extra,
        },
        metrics_out,
    )
    return metrics


def _records(
    task: str,
    cfg: Mapping[str, Any],
    model: nn.Module,
    kwargs: Mapping[str, Any],
    splits: tuple[Sequence[Mapping[str, Any]], ...],
    metadata: Mapping[str, Any],
    info: Mapping[str, Any] | None,
    stats: tuple[float, float],
    use_transformer: bool,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checkpoint's metadata and the run's resume key."""
    train_items, val_items, test_items = splits
    # every part of the model is trained: encoders/transformer or vit, and the head
    trained = [n for n, part in model.named_children() if any(True for _ in part.parameters())]
    meta = stage_metadata(
        "finetune",
        task,
        cfg,
        kwargs,
        trained,
        train_items,
        metadata,
        init=info,
        val_scans=scans_of(val_items),
        selected_by=SELECTED_BY[task],
        target_mean=stats[0],
        target_std=stats[1],
        label_map=cfg["label_map"],
        loss=LOSSES[task].format(**cfg),
    )
    resume_key = run_config(
        cfg,
        [*train_items, *val_items, *test_items],
        stage="finetune",
        task=task,
        use_transformer=use_transformer,
        train_scans=scans_of(train_items),
        val_scans=scans_of(val_items),
        init_sha256=info["init_sha256"] if info else "scratch",
    )
    return meta, resume_key


def _volume_sets(
    task: str,
    cfg: Mapping[str, Any],
    train_items: Sequence[Mapping[str, Any]],
    val_items: Sequence[Mapping[str, Any]],
    test_items: Sequence[Mapping[str, Any]],
) -> dict[str, VolumeSet]:
    """The fold's three splits as cached volumes; each must hold a scan."""
    for name, items in (("training", train_items), ("validation", val_items), ("test", test_items)):
        if not items:
            raise MedtxError(f"finetune {task}: no {name} scans")
    return {
        name: VolumeSet(items, task=task, downsample=cfg["downsample"], stored=True)
        for name, items in (("train", train_items), ("val", val_items), ("test", test_items))
    }


def _outputs_and_channels(
    task: str, cfg: Mapping[str, Any], sets: Mapping[str, VolumeSet]
) -> tuple[int, int]:
    """The head's outputs and the stem's input channels; every class label checked."""
    if task == "classification":
        k = n_classes(cfg)
        bad = [
            f"scan {i.get('scan')!r}: class {t}"
            for s in sets.values()
            for i, t in zip(s.items, s.targets)
            if not 0 <= t < k
        ]
        if bad:
            raise CohortError(
                bad, what=f"class labels (label_map has {k} classes: {cfg['label_map']})"
            )
        return k, 1
    if task == "regression":
        return 1, 1
    first = sets["train"].items[0]
    return len(REGION_NAMES), int(read_cached(first["image"], scan=first.get("scan")).shape[0])


def _target_stats(task: str, sets: Mapping[str, VolumeSet]) -> tuple[float, float]:
    """Mean and std the regression target is standardized by (training ages)."""
    if task != "regression":
        return (0.0, 1.0)
    ages = np.asarray(sets["train"].targets, dtype=np.float64)
    std = float(ages.std())
    return (float(ages.mean()), std if std > 1e-8 else 1.0)


def _load_init(
    model: nn.Module,
    init: str | Path,
    cfg: Mapping[str, Any],
    use_transformer: bool,
    log: Callable[[str], None] | None,
) -> dict[str, Any]:
    """Load the pre-trained parts from a checkpoint or a received encoder bundle."""
    parts = backbone(cfg["backbone"]).pretrained if use_transformer else ("encoders",)
    received = None  # an encoder bundle from another study (train/init_from)
    if Path(init).is_dir():
        received = load_bundle(init)
        received.require(ENCODER)
    info = load_pretrained(
        model,
        init,
        parts=parts,
        backbone_name=cfg["backbone"],
        checkpoint=received.as_checkpoint() if received else None,
    )
    (log or default_log)(f"[finetune] loaded {', '.join(info['loaded'])} from {init}")
    return info


def _loss_fn(
    task: str, cfg: Mapping[str, Any], stats: tuple[float, float]
) -> Callable[[nn.Module, dict[str, Tensor], Any], Tensor]:
    """The task's training loss (brain age: on the standardized age)."""
    mean_t, std_t = (torch.tensor(v, dtype=torch.float32) for v in stats)

    def loss_fn(m: nn.Module, batch: dict[str, Tensor], ctx) -> Tensor:
        logits = m(batch["image"])
        if task == "classification":
            return cross_entropy(logits, batch["target"])
        if task == "regression":
            z = (batch["target"] - mean_t.to(logits.device)) / std_t.to(logits.device)
            loss = F.l1_loss if cfg["loss_regression"] == "l1" else F.mse_loss
            return loss(logits[:, 0].float(), z)
        return segmentation_loss(logits, batch["target"])

    return loss_fn


def _validator(
    task: str,
    cfg: Mapping[str, Any],
    val: VolumeSet,
    dev: torch.device,
    stats: tuple[float, float],
) -> Callable[[nn.Module, Group], float | tuple[float, float]]:
    """The selection metric on the validation set (``SELECTED_BY``)."""

    def validate(m: nn.Module, group: Group) -> float | tuple[float, float]:
        # each process predicts its shard; every one computes the metric from them all
        part = predict(
            m,
            val.subset(group.shard(list(range(len(val))))),
            batch_size=cfg["batch_size"],
            device=dev,
            target_stats=stats,
            amp=cfg["amp"],
            num_workers=cfg["num_workers"],
        )
        pred = group.gather_parts(part, len(val))
        if task == "classification":  # a tie in mAUC (1.0 on a small set) goes to the likelier
            y, probs = pred["target"], pred["probs"]
            return selection_mauc(y, probs), log_likelihood(y, probs)
        if task == "regression":
            return mae(pred["target"], pred["age"])
        return float(pred["dice"].mean())

    return validate


def _predict_test(
    task: str,
    model: nn.Module,
    sets: Mapping[str, VolumeSet],
    cfg: Mapping[str, Any],
    dev: torch.device,
    stats: tuple[float, float],
    *,
    predictions_out: str | Path,
    log: Callable[[str], None] | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The selected model on the test set: the predictions TSV written, its metrics,
    and for brain age the age-bias line fitted on validation (``extra``)."""

    def predict_set(name: str) -> dict[str, np.ndarray]:
        return predict(
            model,
            sets[name],
            batch_size=cfg["batch_size"],
            device=dev,
            target_stats=stats,
            amp=cfg["amp"],
            num_workers=cfg["num_workers"],
        )

    extra: dict[str, Any] = {}
    if task == "regression":
        # the age-bias line is fitted on validation only: the test set is what it corrects
        pred_val = predict_set("val")
        try:
            extra["age_bias"] = fit_age_bias(pred_val["target"], pred_val["age"])
        except MedtxError as err:
            (log or default_log)(f"[finetune] no age-bias correction: {err}")
            extra["age_bias"] = None
    pred = predict_set("test")
    table = prediction_table(
        task, sets["test"].items, pred, gaps=task == "regression", age_bias=extra.get("age_bias")
    )
    write_text(table.to_csv(sep="\t", index=False, float_format="%.6g"), predictions_out)
    return evaluate_predictions(task, predictions_out), extra


def finetune_fold(
    run: RunId,
    *,
    manifest: str | Path,
    cache_index: str | Path,
    init_checkpoint: str | Path | None,
    out: str | Path,
    predictions_out: str | Path,
    metrics_out: str | Path,
    config: Mapping[str, Any],
    metadata: Mapping[str, Any],
) -> TrainResult:
    """``medtx finetune``: one run, its scans from the manifest, their files from the index.

    The fold's sidecar (seed, subject hash, exclusions) and the run's identity go
    into the checkpoint; a manifest scan missing from the cache index is an error
    naming it.
    """
    config = {**config, "backbone": run.backbone}
    if (run.init == "scratch") != (init_checkpoint is None):
        raise MedtxError(
            f"init {run.init!r} "
            + ("takes no checkpoint" if init_checkpoint else "needs the pre-trained checkpoint")
        )
    table = read_manifest(manifest)
    index = read_cache_index(cache_index).set_index("scan")
    missing = sorted(set(table["scan"]) - set(index.index))
    if missing:
        raise MedtxError(f"{cache_index}: no cache for scan(s) {missing[:5]} of {manifest}")

    def image(row: Mapping[str, Any]) -> str:
        return index.at[row["scan"], "image"]

    def regions(row: Mapping[str, Any]) -> str | None:
        return index.at[row["scan"], "regions"] if run.task == "segmentation" else None

    kw: dict[str, Any] = {"fold": run.fold, "cache_dir_fn": image, "seg_fn": regions}
    sidecar = Path(manifest).with_suffix(".json")
    return finetune(
        run.task,
        manifest_items(table, role="train", fraction=run.frac, **kw),
        manifest_items(table, role="val", **kw),
        manifest_items(table, role="test", **kw),
        init=init_checkpoint,
        use_transformer=run.use_transformer,
        out=out,
        predictions_out=predictions_out,
        metrics_out=metrics_out,
        config=config,
        metadata={
            **metadata,
            "manifest": str(manifest),
            "cache_index": str(cache_index),
            "folds_sidecar": json.loads(sidecar.read_text()) if sidecar.exists() else None,
        },
        run=run.as_dict(),
    )
