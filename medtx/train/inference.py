"""Inference: a model run over a manifest's split, the per-scan predictions TSV and its
test metrics.

The one place a fine-tuned model meets scans to predict: fine-tuning uses
``predict`` for validation and for the test set, ``medtx predict`` and
``medtx export`` run it on new scans and bundles, and the tables read
``evaluate_predictions`` back from the TSV it wrote. It sits below ``evaluate``
and above the training loop, so nothing here imports an evaluation module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from medtx.brainage import corrected_gap, pearson_r
from medtx.domain import REGION_NAMES, TASKS
from medtx.errors import ConfigError, MedtxError
from medtx.metrics import mae, mauc
from medtx.train.data import VolumeSet, collate
from medtx.train.loop import to_device


def dice_per_case(logits: Tensor, target: Tensor) -> Tensor:
    """Hard Dice (sigmoid > 0.5) per case and region: (B, K); empty vs empty = 1.0,
    as ``medtx.metrics.dice``."""
    pred = logits > 0
    truth = target > 0.5
    dims = tuple(range(2, logits.ndim))
    inter = (pred & truth).sum(dims).double()
    total = pred.sum(dims).double() + truth.sum(dims).double()
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))


def selection_mauc(y: np.ndarray, probs: np.ndarray) -> float:
    """mAUC for model selection: over the classes present when a small validation
    fold lacks some (probabilities renormalized over them); the mean log-probability
    of the true class when only one class is present."""
    present = sorted(set(np.asarray(y).tolist()))
    if len(present) == probs.shape[1]:
        return mauc(y, probs)
    if len(present) >= 2:
        sub = probs[:, present] / probs[:, present].sum(axis=1, keepdims=True)
        remap = {c: i for i, c in enumerate(present)}
        return mauc(np.array([remap[c] for c in y]), sub)
    return log_likelihood(y, probs)


def log_likelihood(y: np.ndarray, probs: np.ndarray) -> float:
    """The mean log-probability of the true class: what breaks a tie in mAUC."""
    y = np.asarray(y)
    return float(np.mean(np.log(probs[np.arange(len(y)), y] + 1e-12)))


@torch.no_grad()
def predict(
    model: nn.Module,
    data: VolumeSet,
    *,
    batch_size: int,
    device: torch.device,
    target_stats: tuple[float, float] = (0.0, 1.0),
    amp: bool = False,
    num_workers: int = 0,
) -> dict[str, np.ndarray]:
    """Run ``model`` over ``data``: {"target", "probs" | "age" | "dice" (n, 3)}.

    ``num_workers`` loader processes read ahead; the batch is converted on the
    device (``VolumeSet.prepare``).
    """
    was_training = model.training
    model.eval()
    use_amp = amp and device.type == "cuda"
    dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    outs, targets = [], []
    for batch in loader:
        batch = data.prepare(to_device(batch, device))
        target = batch["target"]
        with torch.autocast(device.type, dtype=dtype, enabled=use_amp):
            logits = model(batch["image"]).float()
        if data.task == "classification":
            outs.append(torch.softmax(logits, dim=1).cpu())
        elif data.task == "regression":
            mean, std = target_stats
            outs.append((logits[:, 0] * std + mean).cpu())
        else:
            outs.append(dice_per_case(logits, target).cpu())
        targets.append((batch["index"] if data.task == "segmentation" else target).cpu())
    model.train(was_training)
    key = {"classification": "probs", "regression": "age", "segmentation": "dice"}[data.task]
    return {key: torch.cat(outs).double().numpy(), "target": torch.cat(targets).numpy()}


def prediction_table(
    task: str,
    items: Sequence[Mapping[str, Any]],
    pred: Mapping[str, np.ndarray],
    *,
    gaps: bool = False,
    age_bias: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """The per-scan predictions TSV's rows (see ``finetune``).

    Regression with ``gaps`` (or an ``age_bias``) adds ``gap`` = predicted - age;
    ``age_bias`` (``medtx.brainage.fit_age_bias`` on the validation set) adds
    ``gap_corrected`` = predicted - (slope * age + intercept). The ages are
    ``pred["target"]``.
    """
    base = pd.DataFrame(
        {
            "scan": [i.get("scan", "") for i in items],
            "subject": [i.get("subject", "") for i in items],
            "label": [i.get("label", "") for i in items],
        }
    )
    if task == "classification":
        probs = pred["probs"]
        base["prediction"] = probs.argmax(axis=1)
        for c in range(probs.shape[1]):
            base[f"p_{c}"] = probs[:, c]
    elif task == "regression":
        base["prediction"] = pred["age"]
        if gaps or age_bias is not None:
            base["gap"] = pred["age"] - pred["target"]
        if age_bias is not None:
            base["gap_corrected"] = corrected_gap(pred["age"], pred["target"], age_bias)
    else:
        for r, name in enumerate(REGION_NAMES):
            base[f"dice_{name}"] = pred["dice"][:, r]
    return base


def evaluate_predictions(task: str, predictions_tsv: str | Path) -> dict[str, Any]:
    """Test metrics from a predictions TSV written by ``finetune``.

    classification: mAUC (Hand & Till, ``medtx.metrics.mauc``; over the classes present,
    listed in ``mauc_classes``, when the test set lacks some) and accuracy;
    regression: MAE (years), and, when the TSV has them, the mean ``gap`` /
    ``gap_corrected`` and their Pearson r with age (``mean_gap``, ``r_gap_age``,
    ``mean_gap_corrected``, ``r_gap_corrected_age``; r is None when undefined);
    segmentation: mean Dice of WT, TC, ET and their mean.
    """
    path = Path(predictions_tsv)
    try:
        table = pd.read_csv(path, sep="\t", dtype={"scan": str, "subject": str})
    except (OSError, pd.errors.EmptyDataError) as err:
        raise MedtxError(f"{path}: cannot read predictions ({err})") from err
    if task == "classification":
        prob_cols = sorted(
            (c for c in table.columns if c.startswith("p_")), key=lambda c: int(c[2:])
        )
        need = ["label"] + (prob_cols or ["p_0"])
    elif task == "regression":
        need = ["label", "prediction"]
    elif task == "segmentation":
        need = [f"dice_{r}" for r in REGION_NAMES]
    else:
        raise ConfigError(f"task {task!r} is not one of {list(TASKS)}")
    missing = [c for c in need if c not in table.columns]
    if missing or table.empty:
        raise MedtxError(
            f"{path}: {'no rows' if table.empty else f'missing column(s) {missing}'}"
            f" for {task} predictions (columns: {list(table.columns)})"
        )
    out: dict[str, Any] = {"task": task, "n": int(len(table))}
    if task == "classification":
        y = table["label"].astype(int).to_numpy()
        probs = table[prob_cols].to_numpy(dtype=np.float64)
        present = sorted(set(y.tolist()))
        out["mauc"] = selection_mauc(y, probs) if len(present) >= 2 else None
        out["mauc_classes"] = present
        out["accuracy"] = float((probs.argmax(axis=1) == y).mean())
    elif task == "regression":
        age = table["label"].to_numpy(float)
        out["mae"] = mae(age, table["prediction"].to_numpy(float))
        for column in ("gap", "gap_corrected"):
            if column in table.columns:
                values = table[column].to_numpy(float)
                out[f"mean_{column}"] = float(values.mean())
                out[f"r_{column}_age"] = pearson_r(values, age)
    else:
        for r in REGION_NAMES:
            out[f"dice_{r}"] = float(table[f"dice_{r}"].mean())
        out["dice_mean"] = float(np.mean([out[f"dice_{r}"] for r in REGION_NAMES]))
    return out
